//! Cadenza's gRPC server: thin tonic handlers over [`cadenza_engine`].
//!
//! [`serve`] runs every registered service on one address with the standard health service and
//! server reflection; it drains in-flight streams (bounded) when its shutdown future resolves.
//! Errors become statuses in one place, [`error::status`].

pub mod codec;
pub mod config;
pub mod error;
pub mod frontend;
pub mod metrics_http;
pub mod models;
pub mod music;
pub mod recognition;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cadenza_engine::{Engine, Priority, RequestOptions};
use cadenza_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};

pub use config::Config;

/// Reads the gRPC deadline (`grpc-timeout` header) and the `cadenza-priority` header
/// (`interactive`, the default, or `batch`; `live` is reserved for live streams and counts as
/// interactive elsewhere) of a request into engine options.
pub(crate) fn request_options<T>(request: &Request<T>) -> Result<RequestOptions, Status> {
    let mut opts = RequestOptions::default();
    if let Some(v) = request.metadata().get("cadenza-priority") {
        let v = v.to_str().unwrap_or("");
        opts.priority = match Priority::parse(v) {
            Some(Priority::Live) | Some(Priority::Interactive) => Priority::Interactive,
            Some(Priority::Batch) => Priority::Batch,
            None => {
                return Err(Status::invalid_argument(format!(
                    "invalid cadenza-priority header '{v}': use interactive or batch"
                )));
            }
        };
    }
    if let Some(v) = request.metadata().get("grpc-timeout") {
        let v = v
            .to_str()
            .map_err(|_| Status::invalid_argument("malformed grpc-timeout header"))?;
        let d = parse_grpc_timeout(v)
            .ok_or_else(|| Status::invalid_argument(format!("malformed grpc-timeout '{v}'")))?;
        opts.deadline = Some(Instant::now() + d);
    }
    Ok(opts)
}

/// The span every request's handler runs in; the engine's session spans (and their steps on
/// the worker) are its children, so one request can be followed from handler to model steps.
fn request_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("grpc", path = %req.uri().path(), request_id = id)
}

/// `grpc-timeout` is digits and a unit: H, M, S, m, u, n.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs the server on `listener` until `shutdown` resolves, then drains for at most
/// `server.drain_timeout_s` and stops the engine. Metrics are served on `server.metrics_addr`.
pub async fn serve(
    cfg: &Config,
    engine: Engine,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = bind_metrics(cfg).await?;
    serve_with(cfg, engine, listener, metrics, shutdown).await
}

async fn bind_metrics(cfg: &Config) -> anyhow::Result<Option<TcpListener>> {
    Ok(match cfg.server.metrics_addr {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("binding server.metrics_addr {a}: {e}"))?,
        ),
        None => None,
    })
}

/// [`serve`] with the metrics listener given (tests bind port 0).
///
/// Health reports NOT_SERVING until the warm-up (one short run of every model through the
/// workers, `engine.warmup`) is done, then SERVING; on shutdown NOT_SERVING again while
/// in-flight streams drain.
pub async fn serve_with(
    cfg: &Config,
    engine: Engine,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let max = cfg.server.max_message_bytes;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let codec = pb::codec_server::CodecServer::new(codec::CodecService::new(engine.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let models = pb::models_server::ModelsServer::new(models::ModelsService::new(engine.clone()));
    let serving = Arc::new(AtomicBool::new(false));
    let worker = pb::worker_server::WorkerServer::new(worker::WorkerService::new(
        engine.clone(),
        cfg.server.worker_id.clone(),
        serving.clone(),
    ));
    // Music is registered only when a music model is loaded.
    let has_music = engine
        .models()
        .iter()
        .any(|m| m.kind == cadenza_engine::ModelKind::Music);
    let music = has_music.then(|| {
        pb::music_server::MusicServer::new(music::MusicService::new(engine.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    });
    // Recognition likewise only with an asr model.
    let has_asr = engine
        .models()
        .iter()
        .any(|m| m.kind == cadenza_engine::ModelKind::Asr);
    let recognition = has_asr.then(|| {
        pb::recognition_server::RecognitionServer::new(recognition::RecognitionService::new(
            engine.clone(),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
    });
    let mut names = vec![
        pb::codec_server::SERVICE_NAME,
        pb::models_server::SERVICE_NAME,
        pb::worker_server::SERVICE_NAME,
    ];
    if has_music {
        names.push(pb::music_server::SERVICE_NAME);
    }
    if has_asr {
        names.push(pb::recognition_server::SERVICE_NAME);
    }
    let (reflection_v1, reflection_v1alpha) = reflection(&names)?;
    set_health(&health_reporter, &names, false).await;

    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(request_span)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(codec)
        .add_service(models)
        .add_service(worker)
        .add_optional_service(music)
        .add_optional_service(recognition)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);
    let metrics_task = metrics.map(|l| {
        let m = engine.metrics().clone();
        tracing::info!(addr = ?l.local_addr().ok(), "metrics at /metrics");
        tokio::spawn(metrics_http::serve_metrics(l, Arc::new(move || m.render())))
    });
    tracing::info!(%addr, models = engine.models().len(), "listening; warming up");

    // A shutdown during the warm-up (which can take long on a busy or slow machine) is obeyed
    // at once: the warm-up is abandoned and in-flight streams drain as usual.
    let mut shutdown = std::pin::pin!(shutdown);
    let mut stopped = false;
    if cfg.engine.warmup {
        tokio::select! {
            biased; // a shutdown already requested wins
            () = &mut shutdown => {
                tracing::info!("shutdown requested during warm-up; warm-up abandoned");
                stopped = true;
            }
            r = engine.warmup() => match r {
                Ok(t) => tracing::info!(took = ?t, "warm-up done"),
                Err(e) => {
                    tracing::error!(error = %e, "warm-up failed");
                    let _ = stop_tx.send(());
                    engine.shutdown();
                    anyhow::bail!("warm-up failed: {e}");
                }
            },
        }
    }
    if !stopped {
        serving.store(true, Ordering::SeqCst);
        set_health(&health_reporter, &names, true).await;
        tracing::info!(%addr, "serving");
        shutdown.await;
    }
    serving.store(false, Ordering::SeqCst);
    let result = drain(cfg, &health_reporter, &names, stop_tx, server).await;
    engine.shutdown();
    if let Some(t) = metrics_task {
        t.abort();
    }
    result
}

/// A front-end: loads no models, forwards every request to the `[frontend] upstreams`
/// (`proto/cadenza/v1/worker.proto`). Health reports SERVING while at least one upstream does.
pub async fn serve_frontend(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let max = cfg.server.max_message_bytes;
    let refresh = Duration::from_millis(cfg.frontend.refresh_ms.max(50));
    let ups = frontend::Upstreams::new(&cfg.frontend.upstreams, refresh, max)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let names = vec![
        pb::codec_server::SERVICE_NAME,
        pb::models_server::SERVICE_NAME,
        pb::music_server::SERVICE_NAME,
        pb::recognition_server::SERVICE_NAME,
    ];
    let (reflection_v1, reflection_v1alpha) = reflection(&names)?;
    set_health(&health_reporter, &names, false).await;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .trace_fn(request_span)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            pb::codec_server::CodecServer::new(frontend::CodecProxy(ups.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(pb::models_server::ModelsServer::new(frontend::ModelsProxy(
            ups.clone(),
        )))
        .add_service(
            pb::music_server::MusicServer::new(frontend::MusicProxy(ups.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            pb::recognition_server::RecognitionServer::new(frontend::RecognitionProxy(ups.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);
    tracing::info!(%addr, upstreams = ?cfg.frontend.upstreams, "front-end listening");
    // Health follows the upstreams.
    let watch = {
        let (ups, hr, names) = (ups.clone(), health_reporter.clone(), names.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                ups.refresh().await;
                let up = ups.any_serving().await;
                if last != Some(up) {
                    tracing::info!(serving = up, "upstream availability changed");
                    set_health(&hr, &names, up).await;
                    last = Some(up);
                }
                tokio::time::sleep(refresh).await;
            }
        })
    };
    shutdown.await;
    watch.abort();
    drain(cfg, &health_reporter, &names, stop_tx, server).await
}

/// Reflection (v1 and v1alpha) advertising only `names` and health, not every service the
/// descriptor set defines (the API is defined ahead of its implementations).
fn reflection(
    names: &[&'static str],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let b = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cadenza_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for n in names {
            b = b.with_service_name(*n);
        }
        b
    };
    Ok((b().build_v1()?, b().build_v1alpha()?))
}

async fn set_health(hr: &tonic_health::server::HealthReporter, names: &[&'static str], up: bool) {
    let st = if up {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    for n in names {
        hr.set_service_status(*n, st).await;
    }
    hr.set_service_status("", st).await;
}

/// NOT_SERVING, stop accepting, let in-flight streams finish for at most the drain timeout.
async fn drain(
    cfg: &Config,
    hr: &tonic_health::server::HealthReporter,
    names: &[&'static str],
    stop_tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) -> anyhow::Result<()> {
    tracing::info!("shutdown requested: health NOT_SERVING, draining in-flight requests");
    set_health(hr, names, false).await;
    let _ = stop_tx.send(());
    let drain = Duration::from_secs(cfg.server.drain_timeout_s);
    match tokio::time::timeout(drain, server).await {
        Ok(joined) => joined
            .map_err(anyhow::Error::from)
            .and_then(|r| r.map_err(anyhow::Error::from)),
        Err(_) => {
            tracing::warn!(?drain, "drain timed out; cancelling remaining sessions");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("10q"), None);
    }
}
