//! The shipped default models (`configs/default.toml`, weights embedded from
//! `models/pretrained/`), served exactly as `cadenza serve` with no arguments serves them: every
//! one is listed as trained with its card; the codec reconstructs; text-to-music gives non-silent
//! audio of the asked length with every schedule; speech recognition transcribes held-out voices
//! (`tests/fixtures/heldout-speech`: the first test-split clip under 3.5 s of each held-out voice,
//! never seen in training) within the model card's numbers.

use anyhow::Result;
use cadenza_proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::{TestServer, model};

async fn server() -> Result<TestServer> {
    TestServer::start(cadenza_server::config::DEFAULT_CONFIG).await
}

fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32).sqrt()
}

#[tokio::test]
async fn every_default_is_trained_and_has_a_card() -> Result<()> {
    let srv = server().await?;
    let mut m = pb::models_client::ModelsClient::new(srv.channel().await?);
    let all = m
        .list_models(pb::ListModelsRequest::default())
        .await?
        .into_inner()
        .models;
    let mut names: Vec<_> = all.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "encodec-tiny",
            "magnet-tiny",
            "musicgen-tiny",
            "paraformer-tiny-en"
        ]
    );
    for d in &all {
        assert!(!d.untrained, "{} is marked untrained", d.name);
        assert!(d.parameters > 100_000, "{}: {}", d.name, d.parameters);
        assert!(d.card.len() > 40, "{}: card summary {:?}", d.name, d.card);
        assert!(d.source.starts_with("embedded:"), "{}", d.source);
    }
    srv.stop().await
}

/// A held-out speech clip (unseen voice) through the default codec comes back the same length
/// and finite, with the input's spectral shape and loudness envelope. (Not its waveform: the
/// card measures SI-SDR near −30 dB on speech, so the test compares log-mel spectra, not
/// samples.)
#[tokio::test]
async fn default_codec_reconstructs_held_out_speech() -> Result<()> {
    let srv = server().await?;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/heldout-speech");
    let wav = std::fs::read(dir.join("espeak-en-gb-x-rp-m6.wav"))?;
    let sr = 32000usize;
    let pcm = cadenza_audio::decode(&wav, &Default::default())?;
    let x = cadenza_audio::resample(&pcm.samples, pcm.sample_rate, sr as u32)?;
    let mut c = srv.codec().await?;
    let encode = |bandwidth_kbps: f32| pb::EncodeRequest {
        model: model("encodec-tiny"),
        audio: wav.clone(),
        format: Some(pb::AudioFormat {
            encoding: pb::Encoding::File as i32,
            ..Default::default()
        }),
        bandwidth_kbps,
        ..Default::default()
    };
    // the default is the highest bandwidth: 3.2 kbps, 8 codebooks
    let enc = c.encode(encode(0.0)).await?.into_inner();
    let codes = enc.codes.expect("codes");
    assert_eq!((codes.num_codebooks, enc.bandwidth_kbps), (8, 3.2));
    assert_eq!(codes.frames as usize, x.len().div_ceil(640));
    // 1.6 kbps codes the same latent with the first 4 of those codebooks (residual VQ)
    let low = c
        .encode(encode(1.6))
        .await?
        .into_inner()
        .codes
        .expect("codes");
    assert_eq!((low.num_codebooks, low.frames), (4, codes.frames));
    assert_eq!(low.codes[..], codes.codes[..low.codes.len()]);
    let dec = c
        .decode(pb::DecodeRequest {
            model: model("encodec-tiny"),
            codes: Some(codes),
            num_samples: enc.num_samples,
            output_encoding: pb::Encoding::PcmF32le as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let y = crate::from_f32le(&dec.audio);
    assert_eq!(y.len(), x.len());
    assert!(y.iter().all(|v| v.is_finite()));
    let (fx, fy) = (log_mel(&x, sr as u32)?, log_mel(&y, sr as u32)?);
    // long-term spectrum (mean log-mel per bin) and loudness envelope (mean per frame)
    let bins = fx[0].len();
    let spectrum = |f: &[Vec<f32>]| -> Vec<f32> {
        (0..bins)
            .map(|b| f.iter().map(|r| r[b]).sum::<f32>() / f.len() as f32)
            .collect()
    };
    let envelope = |f: &[Vec<f32>]| -> Vec<f32> {
        f.iter()
            .map(|r| r.iter().sum::<f32>() / bins as f32)
            .collect()
    };
    let cs = corr(&spectrum(&fx), &spectrum(&fy));
    let ce = corr(&envelope(&fx), &envelope(&fy));
    // measured with the shipped weights at 3.2 kbps: 0.97 and 0.97 (the codec before: 0.97 and
    // 0.96; the 1.6 kbps codec before that: 0.95 and 0.83)
    assert!(cs > 0.9, "long-term log-mel spectrum correlation {cs}");
    assert!(ce > 0.85, "loudness envelope correlation {ce}");
    srv.stop().await
}

/// Kaldi log-mel frames (40 bins, 25 ms / 10 ms).
fn log_mel(x: &[f32], sr: u32) -> Result<Vec<Vec<f32>>> {
    let fb = cadenza_audio::Fbank::new(cadenza_audio::FbankOptions {
        sample_rate: sr,
        num_mel_bins: 40,
        input_scale: 1.0,
        ..Default::default()
    })?;
    let flat = fb.compute(x, &mut cadenza_audio::DitherRng::new(0));
    Ok(flat.chunks(40).map(<[f32]>::to_vec).collect())
}

fn corr(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len() as f32;
    let (ma, mb) = (a.iter().sum::<f32>() / n, b.iter().sum::<f32>() / n);
    let cov: f32 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f32 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f32 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt().max(1e-12)
}

async fn music(srv: &TestServer, name: &str, schedule: Option<pb::Schedule>) -> Result<Vec<f32>> {
    let mut c = pb::music_client::MusicClient::new(srv.channel().await?);
    let mut s = c
        .generate(pb::GenerateMusicRequest {
            model: model(name),
            prompt: "solo piano piece in C major at 120 bpm".into(),
            duration_s: 2.0,
            sampling: Some(pb::Sampling {
                seed: 3,
                ..Default::default()
            }),
            schedule,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut y = Vec::new();
    while let Some(m) = s.next().await {
        if let Some(pb::music_event::Event::Audio(a)) = m?.event {
            y.extend(crate::from_f32le(&a.data));
        }
    }
    Ok(y)
}

#[tokio::test]
async fn default_music_models_give_audible_audio_of_the_asked_length() -> Result<()> {
    let srv = server().await?;
    let hybrid = pb::Schedule {
        kind: pb::schedule::Kind::Hybrid as i32,
        prefix_s: 0.6,
        decoding_steps: vec![6, 3, 3, 3],
        ..Default::default()
    };
    let magnet = pb::Schedule {
        kind: pb::schedule::Kind::Magnet as i32,
        decoding_steps: vec![6, 3, 3, 3],
        ..Default::default()
    };
    for (name, schedule) in [
        ("musicgen-tiny", None),
        ("magnet-tiny", Some(magnet)),
        ("magnet-tiny", Some(hybrid)),
    ] {
        let y = music(&srv, name, schedule.clone()).await?;
        assert_eq!(y.len(), 64000, "{name} {schedule:?}");
        assert!(y.iter().all(|v| v.is_finite()));
        let r = rms(&y);
        assert!(r > 0.005, "{name} {schedule:?}: rms {r} (silent)");
        assert!(r < 0.9, "{name} {schedule:?}: rms {r} (clipping noise)");
    }
    srv.stop().await
}

/// Character error rate: Levenshtein distance over characters / reference length.
fn cer(reference: &str, hyp: &str) -> f64 {
    let r: Vec<char> = reference.chars().collect();
    let h: Vec<char> = hyp.chars().collect();
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rc) in r.iter().enumerate() {
        let mut cur = vec![i + 1; h.len() + 1];
        for (j, hc) in h.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(rc != hc))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[h.len()] as f64 / r.len().max(1) as f64
}

#[test]
fn cer_counts_edits() {
    assert_eq!(cer("abc", "abc"), 0.0);
    assert_eq!(cer("abcd", "abxd"), 0.25);
    assert_eq!(cer("ab", ""), 1.0);
    assert_eq!(cer("ab", "abcd"), 1.0);
}

#[tokio::test]
async fn default_asr_transcribes_held_out_voices() -> Result<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/heldout-speech");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
    let srv = server().await?;
    let mut c = pb::recognition_client::RecognitionClient::new(srv.channel().await?);
    let (mut edits, mut chars) = (0.0, 0usize);
    let mut report = Vec::new();
    for clip in manifest.as_array().expect("a list") {
        let text = clip["text"].as_str().unwrap_or_default();
        let audio = std::fs::read(dir.join(clip["file"].as_str().unwrap_or_default()))?;
        let r = c
            .recognize(pb::RecognizeRequest {
                meta: None,
                config: Some(pb::RecognitionConfig {
                    model: model("paraformer-tiny-en"),
                    input: Some(pb::AudioFormat {
                        encoding: pb::Encoding::File as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                audio,
            })
            .await?
            .into_inner();
        let hyp = r.text.to_lowercase();
        let e = cer(text, hyp.trim());
        edits += e * text.chars().count() as f64;
        chars += text.chars().count();
        report.push(format!(
            "{}: {text:?} -> {hyp:?} (CER {e:.3})",
            clip["voice"]
        ));
    }
    let total = edits / chars as f64;
    assert!(
        total <= MAX_HELDOUT_CER,
        "held-out CER {total:.3} > {MAX_HELDOUT_CER}:\n{}",
        report.join("\n")
    );
    srv.stop().await
}

/// The bound the four held-out clips must meet. The shipped paraformer-tiny-en transcribes
/// them at CER 0.138 with its shipped decoding, LM and CTC, with or without its test-time VTLN
/// warps (measured; the full held-out test set's CER, in its card, is 12.3%, 13.5% without the
/// warps; four clips are too few to rank models: the previous model
/// scored 0.115 here and 14.1% on the test set): this guards that level against regressions (a
/// broken front end, model or LM gives CER near 1). It is NOT issue 7's target of 0.10, which
/// the project's CPU-trained model does not reach.
const MAX_HELDOUT_CER: f64 = 0.17;
