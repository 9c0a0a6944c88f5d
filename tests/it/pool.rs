//! The shared worker pool through a real server: sessions batched across requests give the same
//! results as alone, deadlines (at admission and while running), priorities, warm-up before
//! SERVING, and the Prometheus endpoint.

use std::time::{Duration, Instant};

use anyhow::Result;
use cadenza_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::music::{collect, req};
use crate::{TestServer, test_config};

/// `GET` over plain HTTP/1.1; returns (status line, body).
async fn http_get(url: &str) -> Result<(String, String)> {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// The value of one sample line of a metrics text (`name{labels} value`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn concurrent_generations_share_steps_and_match_solo_results() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let with_seed = |seed: u64, secs: f32| {
        let mut r = req("happy rock song with guitar", secs);
        r.sampling = Some(pb::Sampling {
            seed,
            ..Default::default()
        });
        r
    };
    let solo = collect(&mut c, with_seed(5, 1.0)).await?;
    let (_, before) = http_get(&srv.metrics_url).await?;
    let steps_before = sample(
        &before,
        "cadenza_batch_size_count{model=\"musicgen\",phase=\"ar_step\"}",
    )
    .unwrap_or(0.0);
    let sessions_before = sample(
        &before,
        "cadenza_batch_size_sum{model=\"musicgen\",phase=\"ar_step\"}",
    )
    .unwrap_or(0.0);
    // Three at once, of different lengths: they step together while all run.
    let mut c2 = c.clone();
    let mut c3 = c.clone();
    let (a, b, d) = tokio::join!(
        collect(&mut c, with_seed(5, 1.0)),
        collect(&mut c2, with_seed(6, 0.6)),
        collect(&mut c3, with_seed(7, 1.4)),
    );
    let (a, b, d) = (a?, b?, d?);
    assert_eq!(a.tokens, solo.tokens, "batched tokens equal the solo run's");
    assert_eq!(a.samples.len(), solo.samples.len());
    let diff = a
        .samples
        .iter()
        .zip(&solo.samples)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "audio differs by {diff}");
    assert_eq!(b.tokens.frames, 30);
    assert_eq!(d.tokens.frames, 70);
    let (status, after) = http_get(&srv.metrics_url).await?;
    assert!(status.contains("200"), "{status}");
    let steps = sample(
        &after,
        "cadenza_batch_size_count{model=\"musicgen\",phase=\"ar_step\"}",
    )
    .unwrap()
        - steps_before;
    let sessions = sample(
        &after,
        "cadenza_batch_size_sum{model=\"musicgen\",phase=\"ar_step\"}",
    )
    .unwrap()
        - sessions_before;
    // 53 + 33 + 73 session-steps (frames + 3 delays); batching needs far fewer model steps.
    assert_eq!(sessions, 159.0);
    assert!(
        steps < 110.0,
        "{steps} model steps for {sessions} session steps"
    );
    assert!(after.contains("# TYPE cadenza_step_seconds histogram"));
    assert!(
        after.contains(
            "cadenza_time_to_first_chunk_seconds_count{model=\"musicgen\",kind=\"audio\"}"
        )
    );
    assert!(sample(&after, "cadenza_tokens_total{model=\"musicgen\"}").unwrap() >= 4.0 * 160.0);
    let (status, _) = http_get(&srv.metrics_url.replace("/metrics", "/nope")).await?;
    assert!(status.contains("404"), "{status}");
    srv.stop().await
}

#[tokio::test]
async fn deadlines_stop_running_work_and_refuse_hopeless_requests() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    // Measured step times exist after one generation.
    collect(&mut c, req("warm", 0.2)).await?;
    // Running: a long generation with a short deadline stops with DEADLINE_EXCEEDED.
    let mut r = req("calm piano", 30.0);
    r.meta = Some(pb::RequestMeta {
        deadline_ms: 1500,
        ..Default::default()
    });
    r.chunk_ms = 20;
    let t = Instant::now();
    let err = match collect(&mut c, r).await {
        Ok(_) => panic!("a 30 s generation cannot finish in 1.5 s on the tiny test model's CPU"),
        Err(e) => e.downcast::<tonic::Status>()?,
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let t = Instant::now();
    while srv.engine.load() != 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the slot is freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Admission: a deadline far shorter than the measured work is refused at once.
    let mut r = req("calm piano", 30.0);
    r.meta = Some(pb::RequestMeta {
        deadline_ms: 20,
        ..Default::default()
    });
    let t = Instant::now();
    let err = c.generate(r).await.expect_err("refused at admission");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("needs about"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(srv.engine.metrics().rejections("deadline") >= 2);
    srv.stop().await
}

#[tokio::test]
async fn priority_is_read_from_the_request_or_header() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let mut r = tonic::Request::new(req("folk", 0.1));
    r.metadata_mut()
        .insert("cadenza-priority", "urgent".parse().unwrap());
    let err = c.generate(r).await.expect_err("bad header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("cadenza-priority"));
    let mut r = tonic::Request::new(req("folk", 0.1));
    r.metadata_mut()
        .insert("cadenza-priority", "batch".parse().unwrap());
    let mut s = c.generate(r).await?.into_inner();
    while s.message().await?.is_some() {}
    srv.stop().await
}

/// A shutdown requested before or during the warm-up is obeyed at once, not after every model
/// has run (which takes long on a busy machine): `serve` returns without warming anything.
#[tokio::test]
async fn shutdown_during_warm_up_is_obeyed_at_once() -> Result<()> {
    let cfg = cadenza_server::Config::parse(&test_config("warmup = true"), None)
        .map_err(anyhow::Error::msg)?;
    let engine = cadenza_engine::Engine::start(cfg.engine.clone(), &cfg.models, None)
        .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let served = cadenza_server::serve_with(&cfg, engine.clone(), listener, None, async {});
    tokio::time::timeout(Duration::from_secs(30), served).await??;
    assert_eq!(
        engine.metrics().steps("musicgen"),
        0,
        "warm-up was abandoned"
    );
    Ok(())
}

#[tokio::test]
async fn warm_up_runs_every_model_before_serving() -> Result<()> {
    let srv = TestServer::start(&test_config("warmup = true")).await?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(srv.channel().await?);
    let t = Instant::now();
    loop {
        let st = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "cadenza.v1.Music".into(),
            })
            .await?
            .into_inner()
            .status;
        if st == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // By the time it serves, every model has run (one music session, one encode per codec).
    let m = srv.engine.metrics();
    assert!(m.steps("musicgen") > 0, "the music model was warmed up");
    let (_, text) = http_get(&srv.metrics_url).await?;
    for codec in ["causal24", "noncausal32", "norm48", "default"] {
        assert!(
            text.contains(&format!(
                "cadenza_sessions_total{{model=\"{codec}\",outcome=\"ok\"}} 1"
            )),
            "{codec} warmed up:\n{text}"
        );
    }
    // The worker protocol reports it as serving.
    let mut w = pb::worker_client::WorkerClient::new(srv.channel().await?);
    let info = w.info(pb::WorkerInfoRequest {}).await?.into_inner();
    assert!(info.serving);
    assert_eq!(info.models.len(), 6);
    assert_eq!(info.load, 0);
    srv.stop().await
}
