//! Health, reflection, overload, cancellation and shutdown.

use std::time::{Duration, Instant};

use anyhow::Result;
use cadenza_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::{TestServer, model, test_config};

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn health_and_reflection() -> Result<()> {
    let srv = TestServer::default().await?;
    let ch = srv.channel().await?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "cadenza.v1.Codec", "cadenza.v1.Models"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    let msg = resp.next().await.expect("a reply")?;
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reply")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "cadenza.v1.Codec",
        "cadenza.v1.Models",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // Only services that work are registered.
    assert!(!names.contains(&"cadenza.v1.Speech"), "{names:?}");
    srv.stop().await
}

/// Opens a stream-decode session that stays open (input never ends).
async fn open_stream(
    c: &mut pb::codec_client::CodecClient<tonic::transport::Channel>,
) -> Result<(
    mpsc::Sender<pb::StreamDecodeRequest>,
    tonic::Streaming<pb::DecodeChunk>,
)> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::StreamDecodeRequest {
        config: Some(pb::StreamDecodeConfig {
            model: model("causal24"),
            ..Default::default()
        }),
        codes: Some(pb::Codes {
            num_codebooks: 1,
            frames: 20,
            codes: vec![3; 20],
        }),
    })
    .await?;
    let s = c.stream_decode(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, s))
}

#[tokio::test]
async fn overload_is_refused_at_once_with_retry_after() -> Result<()> {
    let srv = TestServer::start(
        &test_config("")
            .replace("max_active = 4", "max_active = 1")
            .replace("max_queue = 8", "max_queue = 1"),
    )
    .await?;
    let mut c = srv.codec().await?;
    let (_tx1, mut s1) = open_stream(&mut c).await?;
    let (_tx2, _s2) = open_stream(&mut c).await?;
    s1.next().await.expect("audio")?; // the first holds the slot, the second is queued
    let t = Instant::now();
    let Err(err) = open_stream(&mut c).await else {
        panic!("a third stream must be refused")
    };
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refusal must be immediate"
    );
    let st = err.downcast::<tonic::Status>()?;
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert!(
        st.message().contains("1 requests queued"),
        "{}",
        st.message()
    );
    assert!(st.metadata().get("retry-after").is_some());
    srv.stop().await
}

#[tokio::test]
async fn cancelled_stream_frees_its_slot() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    let (tx, mut s) = open_stream(&mut c).await?;
    s.next().await.expect("audio")?;
    assert_eq!(srv.engine.load(), 1);
    drop(tx);
    drop(s);
    wait_for("the session to be dropped", || srv.engine.load() == 0).await;
    srv.stop().await
}

#[tokio::test]
async fn slow_consumer_is_dropped_with_a_status() -> Result<()> {
    // slow_consumer_timeout_ms = 2000; codes limit raised so the stream can outgrow every buffer.
    let srv = TestServer::start(
        &test_config("").replace("max_code_frames = 3000", "max_code_frames = 40000"),
    )
    .await?;
    let mut c = srv.codec().await?;
    // 30000 frames of audio (400 s at 24 kHz, 38 MB of float PCM): far more than the session
    // channel, the server's stream buffer and the HTTP/2 windows hold. Sent from a task, since
    // the sends stop once every buffer is full.
    let (tx, mut s) = open_stream(&mut c).await?;
    tokio::spawn(async move {
        for _ in 0..300 {
            let codes = pb::Codes {
                num_codebooks: 1,
                frames: 100,
                codes: vec![5; 100],
            };
            if tx
                .send(pb::StreamDecodeRequest {
                    config: None,
                    codes: Some(codes),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Do not read at all until the server has dropped the session (its output stays blocked for
    // longer than the timeout), however slow the machine; then drain: the stream must end with
    // an error after what was already buffered.
    let t = Instant::now();
    while srv.engine.load() != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the slow reader was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut status = None;
    while let Some(m) = s.next().await {
        if let Err(e) = m {
            status = Some(e);
            break;
        }
    }
    let st = status.expect("the slow stream is ended with a status");
    assert_eq!(st.code(), Code::Cancelled, "{}", st.message());
    assert!(st.message().contains("did not read"), "{}", st.message());
    wait_for("the session to be dropped", || srv.engine.load() == 0).await;
    srv.stop().await
}

#[tokio::test]
async fn shutdown_with_a_stream_in_flight_ends_cleanly() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    let (_tx, mut s) = open_stream(&mut c).await?;
    s.next().await.expect("audio")?;
    let engine = srv.engine.clone();
    let t = Instant::now();
    srv.stop().await?; // drain_timeout_s = 2
    assert!(t.elapsed() < Duration::from_secs(8));
    // The open stream ends (with UNAVAILABLE or a closed connection), it does not hang.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = s.next().await {
            if m.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream must end after shutdown");
    wait_for("sessions to end", || engine.load() == 0).await;
    Ok(())
}
