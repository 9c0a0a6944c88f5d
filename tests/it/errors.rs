//! Every bad input gets a clear status naming the problem; nothing panics or hangs.

use anyhow::Result;
use cadenza_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::{TestServer, f32le, model, raw_f32};

fn expect_err<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got Ok({v:?})"),
        Err(st) => {
            assert_eq!(st.code(), code, "message: {}", st.message());
            assert!(
                st.message().contains(needle),
                "'{}' should mention '{needle}'",
                st.message()
            );
        }
    }
}

fn file(bytes: Vec<u8>) -> pb::EncodeRequest {
    pb::EncodeRequest {
        model: model("causal24"),
        audio: bytes,
        format: Some(pb::AudioFormat {
            encoding: pb::Encoding::File as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_encode_requests() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    // Garbage bytes, an empty request, a truncated WAV header.
    expect_err(
        c.encode(file(b"this is not audio at all".repeat(10))).await,
        Code::InvalidArgument,
        "audio",
    );
    expect_err(
        c.encode(file(vec![])).await,
        Code::InvalidArgument,
        "no audio",
    );
    let wav = cadenza_audio::encode_wav(
        &cadenza_audio::Pcm::new(24000, 1, vec![0.1; 2400])?,
        cadenza_audio::WavFormat::I16,
    )?;
    expect_err(
        c.encode(file(wav[..30].to_vec())).await,
        Code::InvalidArgument,
        "audio",
    );
    // NaN samples in raw float PCM.
    let mut req = pb::EncodeRequest {
        model: model("causal24"),
        audio: f32le(&[0.0, f32::NAN, 0.1, 0.2]),
        format: raw_f32(24000, 1),
        ..Default::default()
    };
    expect_err(c.encode(req.clone()).await, Code::InvalidArgument, "NaN");
    // Raw bytes that are not whole frames; absurd rate and channel counts.
    req.audio = vec![0u8; 7];
    expect_err(c.encode(req.clone()).await, Code::InvalidArgument, "audio");
    req.audio = f32le(&[0.1; 64]);
    req.format = raw_f32(0, 1);
    expect_err(
        c.encode(req.clone()).await,
        Code::InvalidArgument,
        "format.sample_rate_hz",
    );
    req.format = raw_f32(1_000_000_000, 1);
    expect_err(
        c.encode(req.clone()).await,
        Code::InvalidArgument,
        "format.sample_rate_hz",
    );
    req.format = raw_f32(24000, 5000);
    expect_err(
        c.encode(req.clone()).await,
        Code::InvalidArgument,
        "format.channels",
    );
    // Longer than the configured limit (30 s): RESOURCE_EXHAUSTED.
    req.format = raw_f32(24000, 1);
    req.audio = f32le(&vec![0.01; 24000 * 31]);
    expect_err(
        c.encode(req.clone()).await,
        Code::ResourceExhausted,
        "audio",
    );
    // Unknown model, unsupported bandwidth.
    req.audio = f32le(&[0.1; 2400]);
    req.model = model("nope");
    expect_err(
        c.encode(req.clone()).await,
        Code::NotFound,
        "unknown model 'nope'",
    );
    req.model = model("causal24");
    req.bandwidth_kbps = 7.0;
    expect_err(
        c.encode(req.clone()).await,
        Code::InvalidArgument,
        "bandwidth_kbps",
    );
    req.bandwidth_kbps = f32::NAN;
    expect_err(c.encode(req).await, Code::InvalidArgument, "bandwidth_kbps");
    srv.stop().await
}

#[tokio::test]
async fn bad_decode_requests() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    let req = |codes: pb::Codes| pb::DecodeRequest {
        model: model("causal24"),
        codes: Some(codes),
        ..Default::default()
    };
    let ok = pb::Codes {
        num_codebooks: 2,
        frames: 3,
        codes: vec![1, 2, 3, 4, 5, 6],
    };
    assert!(c.decode(req(ok.clone())).await.is_ok());
    expect_err(
        c.decode(pb::DecodeRequest {
            codes: None,
            ..req(ok.clone())
        })
        .await,
        Code::InvalidArgument,
        "codes",
    );
    expect_err(
        c.decode(req(pb::Codes {
            codes: vec![1, 2, 3, 4, 5, 64],
            ..ok.clone()
        }))
        .await,
        Code::InvalidArgument,
        "outside the codebook",
    );
    expect_err(
        c.decode(req(pb::Codes {
            codes: vec![1, 2, 3],
            ..ok.clone()
        }))
        .await,
        Code::InvalidArgument,
        "3 codes given",
    );
    expect_err(
        c.decode(req(pb::Codes {
            num_codebooks: 40,
            frames: 1,
            codes: vec![0; 40],
        }))
        .await,
        Code::InvalidArgument,
        "40 codebooks",
    );
    expect_err(
        c.decode(req(pb::Codes {
            num_codebooks: 0,
            frames: 0,
            codes: vec![],
        }))
        .await,
        Code::InvalidArgument,
        "empty",
    );
    expect_err(
        c.decode(req(pb::Codes {
            num_codebooks: 1,
            frames: 5000,
            codes: vec![0; 5000],
        }))
        .await,
        Code::ResourceExhausted,
        "5000 frames",
    );
    expect_err(
        c.decode(pb::DecodeRequest {
            output_encoding: pb::Encoding::File as i32,
            ..req(ok.clone())
        })
        .await,
        Code::InvalidArgument,
        "output_encoding",
    );
    expect_err(
        c.decode(pb::DecodeRequest {
            scales: vec![1.0],
            ..req(ok.clone())
        })
        .await,
        Code::InvalidArgument,
        "scales",
    );
    // A chunked model needs whole chunks and one scale per chunk.
    let n48 = pb::DecodeRequest {
        model: model("norm48"),
        codes: Some(ok),
        scales: vec![1.0],
        ..Default::default()
    };
    expect_err(c.decode(n48).await, Code::InvalidArgument, "multiple of");
    srv.stop().await
}

#[tokio::test]
async fn bad_streams() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    // No config in the first message.
    let r = c
        .stream_decode(tokio_stream::iter(vec![pb::StreamDecodeRequest {
            config: None,
            codes: Some(pb::Codes {
                num_codebooks: 1,
                frames: 1,
                codes: vec![0],
            }),
        }]))
        .await;
    expect_err(r.map(|_| ()), Code::InvalidArgument, "config");
    // An empty stream.
    let r = c
        .stream_encode(tokio_stream::iter(Vec::<pb::StreamEncodeRequest>::new()))
        .await;
    expect_err(r.map(|_| ()), Code::InvalidArgument, "first message");
    // FILE encoding cannot be streamed; chunked models cannot stream.
    let cfg = |format, m: &str| pb::StreamEncodeRequest {
        config: Some(pb::StreamEncodeConfig {
            model: model(m),
            format,
            ..Default::default()
        }),
        audio: vec![],
    };
    let file = Some(pb::AudioFormat {
        encoding: pb::Encoding::File as i32,
        sample_rate_hz: 24000,
        channels: 1,
    });
    let r = c
        .stream_encode(tokio_stream::iter(vec![cfg(file, "causal24")]))
        .await;
    expect_err(
        r.map(|_| ()),
        Code::InvalidArgument,
        "config.format.encoding",
    );
    let r = c
        .stream_encode(tokio_stream::iter(vec![cfg(raw_f32(48000, 2), "norm48")]))
        .await;
    expect_err(r.map(|_| ()), Code::InvalidArgument, "chunked");
    // Codes out of range mid-stream end the stream with INVALID_ARGUMENT.
    let msgs = vec![
        pb::StreamDecodeRequest {
            config: Some(pb::StreamDecodeConfig {
                model: model("causal24"),
                ..Default::default()
            }),
            codes: Some(pb::Codes {
                num_codebooks: 1,
                frames: 2,
                codes: vec![0, 1],
            }),
        },
        pb::StreamDecodeRequest {
            config: None,
            codes: Some(pb::Codes {
                num_codebooks: 1,
                frames: 1,
                codes: vec![999],
            }),
        },
    ];
    let mut s = c
        .stream_decode(tokio_stream::iter(msgs))
        .await?
        .into_inner();
    let mut err = None;
    while let Some(m) = s.next().await {
        if let Err(e) = m {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("an error status");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("outside the codebook"),
        "{}",
        err.message()
    );
    srv.stop().await
}
