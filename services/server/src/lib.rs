//! Cadenza's gRPC server: thin tonic handlers over [`cadenza_engine`].
//!
//! [`serve`] runs every registered service on one address with the standard health service and
//! server reflection; it drains in-flight streams (bounded) when its shutdown future resolves.
//! Errors become statuses in one place, [`error::status`].

pub mod codec;
pub mod config;
pub mod error;
pub mod models;
pub mod music;

use std::future::Future;
use std::time::{Duration, Instant};

use cadenza_engine::{Engine, RequestOptions};
use cadenza_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};

pub use config::Config;

/// Reads the gRPC deadline (`grpc-timeout` header) of a request into engine options.
pub(crate) fn request_options<T>(request: &Request<T>) -> Result<RequestOptions, Status> {
    let mut opts = RequestOptions::default();
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
/// `server.drain_timeout_s` and stops the engine.
pub async fn serve(
    cfg: &Config,
    engine: Engine,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let max = cfg.server.max_message_bytes;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let codec = pb::codec_server::CodecServer::new(codec::CodecService::new(engine.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let models = pb::models_server::ModelsServer::new(models::ModelsService::new(engine.clone()));
    // Music is registered only when a music model is loaded.
    let has_music = engine
        .models()
        .iter()
        .any(|m| m.kind == cadenza_engine::ModelKind::Music);
    let music = has_music
        .then(|| pb::music_server::MusicServer::new(music::MusicService::new(engine.clone())));
    // Reflection advertises only the services registered below, not every service the
    // descriptor set defines (the API is defined ahead of its implementations).
    let reflection = || {
        let b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cadenza_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(pb::codec_server::SERVICE_NAME)
            .with_service_name(pb::models_server::SERVICE_NAME)
            .with_service_name("grpc.health.v1.Health");
        if has_music {
            b.with_service_name(pb::music_server::SERVICE_NAME)
        } else {
            b
        }
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    health_reporter
        .set_serving::<pb::codec_server::CodecServer<codec::CodecService>>()
        .await;
    health_reporter
        .set_serving::<pb::models_server::ModelsServer<models::ModelsService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(codec)
        .add_service(models)
        .add_optional_service(music)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);
    tracing::info!(%addr, models = engine.models().len(), "serving");

    shutdown.await;
    tracing::info!("shutdown requested: health NOT_SERVING, draining in-flight requests");
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    health_reporter
        .set_not_serving::<pb::codec_server::CodecServer<codec::CodecService>>()
        .await;
    let _ = stop_tx.send(());
    let drain = Duration::from_secs(cfg.server.drain_timeout_s);
    let result = match tokio::time::timeout(drain, server).await {
        Ok(joined) => joined
            .map_err(anyhow::Error::from)
            .and_then(|r| r.map_err(anyhow::Error::from)),
        Err(_) => {
            tracing::warn!(?drain, "drain timed out; cancelling remaining sessions");
            Ok(())
        }
    };
    engine.shutdown();
    result
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
