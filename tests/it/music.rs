//! Text-to-music through a real server: streaming, determinism, parity with the model crate,
//! validation and cancellation.

use std::time::{Duration, Instant};

use anyhow::Result;
use cadenza_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

use crate::{TestServer, model};

pub(crate) fn req(prompt: &str, duration_s: f32) -> pb::GenerateMusicRequest {
    pb::GenerateMusicRequest {
        model: model("musicgen"),
        prompt: prompt.into(),
        duration_s,
        sampling: Some(pb::Sampling {
            seed: 11,
            ..Default::default()
        }),
        chunk_ms: 100,
        return_tokens: true,
        ..Default::default()
    }
}

pub(crate) struct Collected {
    pub chunks: usize,
    pub samples: Vec<f32>,
    pub tokens: pb::Codes,
    pub fin: pb::MusicFinal,
    pub progress: usize,
}

pub(crate) async fn collect(
    c: &mut pb::music_client::MusicClient<tonic::transport::Channel>,
    r: pb::GenerateMusicRequest,
) -> Result<Collected> {
    let mut s = c.generate(r).await?.into_inner();
    let (mut chunks, mut samples, mut tokens, mut fin, mut progress) =
        (0, Vec::new(), None, None, 0);
    let mut first = true;
    while let Some(m) = s.next().await {
        let ev = m?.event.expect("an event");
        if first {
            assert!(
                matches!(ev, pb::music_event::Event::Admitted(_)),
                "admission comes first"
            );
            first = false;
        }
        match ev {
            pb::music_event::Event::Audio(a) => {
                assert_eq!(a.start_sample as usize, samples.len());
                assert!(!a.provisional);
                samples.extend(crate::from_f32le(&a.data));
                chunks += 1;
            }
            pb::music_event::Event::Tokens(t) => tokens = Some(t),
            pb::music_event::Event::Final(f) => fin = Some(f),
            pb::music_event::Event::Progress(_) => progress += 1,
            pb::music_event::Event::Admitted(_) => {}
        }
    }
    Ok(Collected {
        chunks,
        samples,
        tokens: tokens.expect("tokens"),
        fin: fin.expect("final"),
        progress,
    })
}

#[tokio::test]
async fn generate_streams_audio_and_is_reproducible() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let a = collect(&mut c, req("happy rock song with guitar", 1.0)).await?;
    // 1 s at 50 frames/s = 50 frames of 640 samples at 32 kHz, in ~100 ms chunks.
    assert_eq!(a.samples.len(), 32000);
    assert!(
        a.chunks >= 5,
        "audio must stream in chunks, got {}",
        a.chunks
    );
    assert!(a.progress >= 5);
    assert_eq!((a.tokens.num_codebooks, a.tokens.frames), (4, 50));
    assert_eq!(a.fin.seed, 11);
    assert_eq!(a.fin.tokens, 200);
    assert_eq!(a.fin.model, "musicgen");
    assert!(a.samples.iter().all(|x| x.is_finite()));
    // Same seed, same tokens and audio; another seed, other tokens.
    let b = collect(&mut c, req("happy rock song with guitar", 1.0)).await?;
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.samples, b.samples);
    let mut r = req("happy rock song with guitar", 1.0);
    r.sampling = Some(pb::Sampling {
        seed: 12,
        ..Default::default()
    });
    let other = collect(&mut c, r).await?;
    assert_ne!(a.tokens, other.tokens);
    srv.stop().await
}

/// Greedy generation through the server gives exactly the reference tokens of the transformers
/// fixture (9 frames with guidance 3).
#[tokio::test]
async fn greedy_generation_matches_the_reference_through_the_server() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let fx = crate::Fixture::load("../musicgen/hf-tiny")?;
    let (_, want) = fx.u32("generated_codes"); // [1, 2, 4, 9]
    for (b, prompt) in ["happy rock song with guitar", "calm piano"]
        .iter()
        .enumerate()
    {
        let mut r = req(prompt, 9.0 / 50.0);
        r.sampling = Some(pb::Sampling {
            greedy: true,
            ..Default::default()
        });
        r.guidance = 3.0;
        let got = collect(&mut c, r).await?;
        assert_eq!(got.tokens.frames, 9);
        assert_eq!(
            got.tokens.codes[..],
            want[b * 36..(b + 1) * 36],
            "prompt {prompt}"
        );
    }
    srv.stop().await
}

#[tokio::test]
async fn bad_music_requests() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let cases: Vec<(pb::GenerateMusicRequest, Code, &str)> = vec![
        (req("", 1.0), Code::InvalidArgument, "prompt"),
        (req("x", 0.0), Code::InvalidArgument, "duration_s"),
        (req("x", 31.0), Code::InvalidArgument, "duration_s"),
        (req("x", f32::NAN), Code::InvalidArgument, "duration_s"),
        (
            pb::GenerateMusicRequest {
                sampling: Some(pb::Sampling {
                    temperature: -1.0,
                    ..Default::default()
                }),
                ..req("x", 1.0)
            },
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            pb::GenerateMusicRequest {
                sampling: Some(pb::Sampling {
                    top_p: 1.5,
                    ..Default::default()
                }),
                ..req("x", 1.0)
            },
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            pb::GenerateMusicRequest {
                sampling: Some(pb::Sampling {
                    top_k: 65,
                    ..Default::default()
                }),
                ..req("x", 1.0)
            },
            Code::InvalidArgument,
            "sampling.top_k",
        ),
        (
            pb::GenerateMusicRequest {
                guidance: 0.5,
                ..req("x", 1.0)
            },
            Code::InvalidArgument,
            "guidance",
        ),
        (
            pb::GenerateMusicRequest {
                model: model("nope"),
                ..req("x", 1.0)
            },
            Code::NotFound,
            "unknown model 'nope'",
        ),
        (
            pb::GenerateMusicRequest {
                schedule: Some(pb::Schedule {
                    kind: pb::schedule::Kind::Magnet as i32,
                    ..Default::default()
                }),
                ..req("x", 1.0)
            },
            Code::InvalidArgument,
            "schedule.kind",
        ),
        (
            pb::GenerateMusicRequest {
                output_encoding: pb::Encoding::File as i32,
                ..req("x", 1.0)
            },
            Code::InvalidArgument,
            "output_encoding",
        ),
    ];
    for (r, code, needle) in cases {
        let st = match c.generate(r).await {
            Err(st) => st,
            Ok(resp) => {
                // Errors found while running arrive on the stream.
                let mut s = resp.into_inner();
                let mut err = None;
                while let Some(m) = s.next().await {
                    if let Err(e) = m {
                        err = Some(e);
                        break;
                    }
                }
                err.unwrap_or_else(|| panic!("expected {code:?} for {needle}"))
            }
        };
        assert_eq!(st.code(), code, "{needle}: {}", st.message());
        assert!(
            st.message().contains(needle),
            "'{}' should mention '{needle}'",
            st.message()
        );
    }
    // Continuation codes outside the codebook fail on the stream with INVALID_ARGUMENT.
    let r = pb::GenerateMusicRequest {
        continuation: Some(pb::generate_music_request::Continuation::ContinuationCodes(
            pb::Codes {
                num_codebooks: 4,
                frames: 1,
                codes: vec![0, 1, 2, 99],
            },
        )),
        ..req("x", 1.0)
    };
    let mut s = c.generate(r).await?.into_inner();
    let mut err = None;
    while let Some(m) = s.next().await {
        if let Err(e) = m {
            err = Some(e);
        }
    }
    let err = err.expect("an error");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("continuation_codes"),
        "{}",
        err.message()
    );
    srv.stop().await
}

#[tokio::test]
async fn cancelling_mid_generation_frees_the_slot() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let mut r = req("calm piano", 30.0);
    r.chunk_ms = 20;
    let mut s = c.generate(r).await?.into_inner();
    // Wait for audio, then walk away.
    loop {
        if let Some(pb::music_event::Event::Audio(_)) = s.next().await.expect("event")?.event {
            break;
        }
    }
    assert_eq!(srv.engine.load(), 1);
    assert_eq!(
        srv.engine.metrics().active("musicgen"),
        1,
        "active-session gauge"
    );
    drop(s);
    let t = Instant::now();
    while srv.engine.load() != 0 || srv.engine.metrics().active("musicgen") != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the session must end after the client leaves"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.stop().await
}
