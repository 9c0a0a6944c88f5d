//! Codec round trips through a real server, checked against the PyTorch reference fixtures.

use anyhow::Result;
use cadenza_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::{Fixture, TestServer, f32le, from_f32le, interleave, max_abs_diff, model, raw_f32};

/// Encoding the fixture input through the server gives exactly the reference codes.
#[tokio::test]
async fn encode_matches_reference_codes() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    for (name, rate, bw) in [
        ("causal24", 24000, "3.0"),
        ("noncausal32", 32000, "2.2"),
        ("norm48", 48000, "6.0"),
    ] {
        let fx = Fixture::load(name)?;
        let (shape, input) = fx.f32("input");
        let resp = c
            .encode(pb::EncodeRequest {
                model: model(name),
                audio: f32le(&interleave(&shape, &input)),
                format: raw_f32(rate, shape[1] as u32),
                bandwidth_kbps: bw.parse()?,
                ..Default::default()
            })
            .await?
            .into_inner();
        let codes = resp.codes.unwrap();
        let (cshape, want) = fx.u32(&format!("codes.{bw}"));
        // Reference is [n_chunks, 1, n_q, frames]; the API concatenates chunks along frames.
        let (n_chunks, n_q, frames) = (cshape[0], cshape[2], cshape[3]);
        assert_eq!(
            (codes.num_codebooks as usize, codes.frames as usize),
            (n_q, n_chunks * frames),
            "{name}"
        );
        for ch in 0..n_chunks {
            for q in 0..n_q {
                for t in 0..frames {
                    let got = codes.codes[q * n_chunks * frames + ch * frames + t];
                    let w = want[((ch * n_q) + q) * frames + t];
                    assert_eq!(got, w, "{name}: chunk {ch} q {q} t {t}");
                }
            }
        }
        assert_eq!(resp.num_samples as usize, shape[2]);
        if name == "norm48" {
            let (_, scales) = fx.f32(&format!("scales.{bw}"));
            assert_eq!(resp.scales.len(), scales.len());
            for (a, b) in resp.scales.iter().zip(&scales) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "scale {a} vs {b}");
            }
        }
    }
    srv.stop().await
}

/// Decoding the reference codes through the server (unary and streaming) gives the reference
/// audio within 1e-4.
#[tokio::test]
async fn decode_matches_reference_audio_unary_and_streaming() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    for (name, bw) in [("causal24", "3.0"), ("noncausal32", "2.2")] {
        let fx = Fixture::load(name)?;
        let (cshape, codes) = fx.u32(&format!("codes.{bw}"));
        let (n_q, frames) = (cshape[2], cshape[3]);
        let (_, want) = fx.f32(&format!("decoded.{bw}"));
        let resp = c
            .decode(pb::DecodeRequest {
                model: model(name),
                codes: Some(pb::Codes {
                    num_codebooks: n_q as u32,
                    frames: frames as u32,
                    codes: codes.clone(),
                }),
                output_encoding: pb::Encoding::PcmF32le as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        let got = from_f32le(&resp.audio);
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{name}: unary decode max abs diff {d}");

        // Streaming: codes in blocks of 7 frames.
        let mut msgs = vec![pb::StreamDecodeRequest {
            config: Some(pb::StreamDecodeConfig {
                model: model(name),
                ..Default::default()
            }),
            codes: None,
        }];
        for start in (0..frames).step_by(7) {
            let n = 7.min(frames - start);
            let mut part = Vec::new();
            for q in 0..n_q {
                part.extend_from_slice(&codes[q * frames + start..q * frames + start + n]);
            }
            msgs.push(pb::StreamDecodeRequest {
                config: None,
                codes: Some(pb::Codes {
                    num_codebooks: n_q as u32,
                    frames: n as u32,
                    codes: part,
                }),
            });
        }
        let mut stream = c
            .stream_decode(tokio_stream::iter(msgs))
            .await?
            .into_inner();
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            assert_eq!(
                chunk.start_sample as usize,
                got.len(),
                "chunks are contiguous"
            );
            got.extend(from_f32le(&chunk.audio));
            chunks += 1;
        }
        assert!(
            chunks > 3,
            "{name}: audio should stream in several chunks, got {chunks}"
        );
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{name}: stream decode max abs diff {d}");
    }
    srv.stop().await
}

/// Runs a streaming encode; returns its codes codebook by codebook (every chunk must carry `n_q`
/// codebooks) and its final summary.
async fn stream_encode_codes(
    c: &mut pb::codec_client::CodecClient<tonic::transport::Channel>,
    msgs: Vec<pb::StreamEncodeRequest>,
    n_q: usize,
) -> Result<(Vec<Vec<u32>>, pb::EncodeResponse)> {
    let mut stream = c
        .stream_encode(tokio_stream::iter(msgs))
        .await?
        .into_inner();
    let (mut rows, mut done) = (vec![Vec::new(); n_q], None);
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(pb::encode_chunk::Event::Codes(cd)) => {
                assert_eq!(cd.num_codebooks as usize, n_q);
                let f = cd.frames as usize;
                for (q, row) in rows.iter_mut().enumerate() {
                    row.extend_from_slice(&cd.codes[q * f..(q + 1) * f]);
                }
            }
            Some(pb::encode_chunk::Event::Done(d)) => done = Some(d),
            _ => {}
        }
    }
    Ok((rows, done.expect("a final summary")))
}

/// Streaming encode of raw PCM in uneven chunks gives the reference codes.
#[tokio::test]
async fn stream_encode_matches_reference_codes() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    let fx = Fixture::load("causal24")?;
    let (shape, input) = fx.f32("input");
    let (cshape, want) = fx.u32("codes.1.5");
    let (n_q, frames) = (cshape[2], cshape[3]);
    let mut msgs = vec![pb::StreamEncodeRequest {
        config: Some(pb::StreamEncodeConfig {
            model: model("causal24"),
            format: raw_f32(24000, 1),
            bandwidth_kbps: 1.5,
            ..Default::default()
        }),
        audio: vec![],
    }];
    let mut pos = 0;
    for n in [1000usize, 3333, 8000].iter().cycle() {
        if pos >= shape[2] {
            break;
        }
        let n = (*n).min(shape[2] - pos);
        msgs.push(pb::StreamEncodeRequest {
            config: None,
            audio: f32le(&input[pos..pos + n]),
        });
        pos += n;
    }
    let (rows, done) = stream_encode_codes(&mut c, msgs, n_q).await?;
    assert_eq!(done.num_samples as usize, shape[2]);
    for (q, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), frames);
        assert_eq!(row[..], want[q * frames..(q + 1) * frames], "codebook {q}");
    }
    srv.stop().await
}

/// `bandwidth_kbps = 0` means the model's highest bandwidth, as the API documents, for the
/// unary and the streaming encode alike (Hugging Face's `encode(bandwidth=None)`, which the
/// library keeps, takes the lowest).
#[tokio::test]
async fn zero_bandwidth_means_the_models_highest() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    let fx = Fixture::load("causal24")?;
    let (shape, input) = fx.f32("input");
    let (cshape, want) = fx.u32("codes.3.0");
    let (n_q, frames) = (cshape[2], cshape[3]);
    assert!(
        n_q > fx.u32("codes.1.5").0[2],
        "the fixture's bandwidths differ in codebooks"
    );
    let resp = c
        .encode(pb::EncodeRequest {
            model: model("causal24"),
            audio: f32le(&input),
            format: raw_f32(24000, 1),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(resp.bandwidth_kbps, 3.0);
    let codes = resp.codes.unwrap();
    assert_eq!(
        (codes.num_codebooks as usize, codes.frames as usize),
        (n_q, frames)
    );
    assert_eq!(codes.codes, want);

    let msgs = vec![
        pb::StreamEncodeRequest {
            config: Some(pb::StreamEncodeConfig {
                model: model("causal24"),
                format: raw_f32(24000, 1),
                ..Default::default()
            }),
            audio: vec![],
        },
        pb::StreamEncodeRequest {
            config: None,
            audio: f32le(&input[..shape[2]]),
        },
    ];
    let (rows, done) = stream_encode_codes(&mut c, msgs, n_q).await?;
    assert_eq!(done.bandwidth_kbps, 3.0);
    assert_eq!(rows.concat(), want);
    srv.stop().await
}

/// A WAV file at another rate and channel count is decoded, downmixed and resampled by the
/// server; the round trip through the codec returns audio of the same duration.
#[tokio::test]
async fn wav_file_round_trip_at_another_rate() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut c = srv.codec().await?;
    let rate = 44100;
    let n = rate as usize; // 1 s, stereo
    let samples: Vec<f32> = (0..n)
        .flat_map(|i| {
            let t = i as f32 / rate as f32;
            [
                0.3 * (std::f32::consts::TAU * 440.0 * t).sin(),
                0.3 * (std::f32::consts::TAU * 660.0 * t).sin(),
            ]
        })
        .collect();
    let pcm = cadenza_audio::Pcm::new(rate, 2, samples)?;
    let wav = cadenza_audio::encode_wav(&pcm, cadenza_audio::WavFormat::I16)?;
    let enc = c
        .encode(pb::EncodeRequest {
            model: model("causal24"),
            audio: wav,
            format: Some(pb::AudioFormat {
                encoding: pb::Encoding::File as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(enc.sample_rate_hz, 24000);
    assert_eq!(enc.num_samples, 24000);
    let codes = enc.codes.unwrap();
    assert_eq!(codes.frames, 75);
    let dec = c
        .decode(pb::DecodeRequest {
            model: model("causal24"),
            codes: Some(codes),
            num_samples: enc.num_samples,
            ..Default::default()
        })
        .await?
        .into_inner();
    // Default output is a WAV file, trimmed to the input length.
    let back = cadenza_audio::decode(&dec.audio, &cadenza_audio::Limits::default())?;
    assert_eq!(
        (back.sample_rate, back.channels, back.frames()),
        (24000, 1, 24000)
    );
    assert_eq!(dec.num_samples, 24000);
    srv.stop().await
}

/// `ListModels` reports every configured model with its card summary, and filters by kind.
#[tokio::test]
async fn list_models() -> Result<()> {
    let srv = TestServer::default().await?;
    let mut m = pb::models_client::ModelsClient::new(srv.channel().await?);
    let all = m
        .list_models(pb::ListModelsRequest::default())
        .await?
        .into_inner()
        .models;
    let names: Vec<_> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "causal24",
            "default",
            "musicgen",
            "noncausal32",
            "norm48",
            "paraformer"
        ]
    );
    let pf = all.iter().find(|m| m.name == "paraformer").unwrap();
    assert_eq!((pf.kind.as_str(), pf.sample_rate_hz), ("asr", 16000));
    assert!(pf.parameters > 1000, "parameter count: {}", pf.parameters);
    let d = all.iter().find(|m| m.name == "default").unwrap();
    assert!(!d.untrained);
    assert!(!d.card.is_empty());
    assert_eq!(d.source, "embedded:encodec-tiny");
    let n48 = all.iter().find(|m| m.name == "norm48").unwrap();
    assert_eq!((n48.sample_rate_hz, n48.channels), (48000, 2));
    let music = m
        .list_models(pb::ListModelsRequest {
            kind: "music".into(),
        })
        .await?
        .into_inner()
        .models;
    assert_eq!(music.len(), 1);
    assert_eq!(
        (
            music[0].architecture.as_str(),
            music[0].num_codebooks,
            music[0].sample_rate_hz
        ),
        ("musicgen", 4, 32000)
    );
    let none = m
        .list_models(pb::ListModelsRequest {
            kind: "speech".into(),
        })
        .await?
        .into_inner()
        .models;
    assert!(none.is_empty());
    srv.stop().await
}
