//! Parity with FunASR's `Paraformer` on tiny random-weight models (fixtures written by
//! `tools/fixtures/paraformer.py`, dither 0): features, encoder output, CIF weights, acoustic
//! embeddings, decoder log-probabilities, token ids, text and timestamps.

use std::path::PathBuf;

use anyhow::Result;
use cadenza_paraformer::{Paraformer, text};
use candle_core::{Device, Tensor};

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/paraformer")
        .join(name)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[derive(serde::Deserialize)]
struct Expected {
    token_num: usize,
    token_ids: Vec<u32>,
    text: String,
    timestamps: Vec<[i64; 2]>,
}

fn check(name: &str) -> Result<()> {
    let dev = Device::Cpu;
    let d = dir(name);
    let model = Paraformer::load(&d, &dev)?;
    let exp = candle_core::safetensors::load(d.join("expected.safetensors"), &dev)?;
    let want: Expected = serde_json::from_str(&std::fs::read_to_string(d.join("expected.json"))?)?;
    let wave: Vec<f32> = exp["wave"].to_vec1()?;

    let feats = model.frontend().features(&wave);
    let feats_diff = max_diff(&feats.data, &flat(&exp["feats"]));
    let net = model.network();
    // Encoder on the reference features, so its error is the network's alone.
    let enc = net.encoder.forward(&exp["feats"].unsqueeze(0)?)?;
    let enc_diff = max_diff(&flat(&enc), &flat(&exp["encoder_out"]));
    let cif = net.predictor.forward(&exp["encoder_out"].unsqueeze(0)?)?;
    let alpha_diff = max_diff(&cif.alphas, &flat(&exp["alphas"]));
    let peak_diff = max_diff(&cif.peaks, &flat(&exp["peaks"]));
    assert_eq!(cif.token_num, want.token_num, "{name}: token count");
    let emb_diff = max_diff(&flat(&cif.embeds), &flat(&exp["acoustic_embeds"]));
    let logp = net.decoder.forward(
        &exp["acoustic_embeds"].unsqueeze(0)?,
        &exp["encoder_out"].unsqueeze(0)?,
    )?;
    let logp_diff = max_diff(&flat(&logp), &flat(&exp["decoder_logprobs"]));
    println!(
        "{name}: feats {feats_diff:.2e} encoder {enc_diff:.2e} alphas {alpha_diff:.2e} \
         peaks {peak_diff:.2e} embeds {emb_diff:.2e} decoder log-probs {logp_diff:.2e}"
    );
    assert!(feats_diff < 1e-3);
    assert!(enc_diff < 1e-4);
    assert!(alpha_diff < 1e-4);
    assert!(peak_diff < 1e-4);
    assert!(emb_diff < 1e-4);
    assert!(logp_diff < 1e-4);

    // End to end from the waveform.
    let t = model.recognize(&wave)?;
    assert_eq!(t.token_ids, want.token_ids, "{name}: token ids");
    assert_eq!(t.text, want.text, "{name}: text");
    assert_eq!(t.timestamps, want.timestamps, "{name}: timestamps");
    println!(
        "{name}: {} tokens {:?} text {:?}",
        t.token_ids.len(),
        t.token_ids,
        t.text
    );

    // Streaming session: the final result equals offline recognition.
    let mut s = model.streaming().with_partial_every(3);
    let mut partials = 0;
    for c in wave.chunks(2400) {
        partials += s.push(c)?.len();
    }
    let fin = s.finish()?;
    assert!(fin.is_final && partials > 0);
    assert_eq!(fin.transcript, t);
    Ok(())
}

#[test]
fn tiny() -> Result<()> {
    check("tiny")
}

#[test]
fn tiny_decoders2_shifted_fsmn() -> Result<()> {
    check("tiny-d2")
}

#[derive(serde::Deserialize)]
struct Case {
    tokens: Vec<String>,
    text: String,
}

#[test]
fn sentence_postprocess_matches_funasr() -> Result<()> {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir("postprocess.json"))?)?;
    for c in cases {
        assert_eq!(
            text::sentence_postprocess(&c.tokens),
            c.text,
            "{:?}",
            c.tokens
        );
    }
    Ok(())
}

#[test]
fn unsupported_options_fail_at_load() {
    let cfg = std::fs::read_to_string(dir("tiny").join("config.yaml")).unwrap();
    let bad = cfg.replace("input_layer: pe", "input_layer: conv2d");
    let e = cadenza_paraformer::Config::from_yaml(&bad)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("input_layer"), "{e}");
    let bad = cfg.replace("model: Paraformer", "model: BiCifParaformer");
    let e = cadenza_paraformer::Config::from_yaml(&bad)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("BiCifParaformer"), "{e}");
    // A streaming model needs the chunked encoder.
    let bad = cfg.replace("model: Paraformer", "model: ParaformerStreaming");
    let e = cadenza_paraformer::Config::from_yaml(&bad)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("SANMEncoderChunkOpt"), "{e}");
}

/// Real checkpoint smoke test: `CADENZA_PARAFORMER_DIR=/path/to/paraformer-zh
/// CADENZA_PARAFORMER_WAV=/path/to/16k.wav cargo test -p cadenza-paraformer --release -- --ignored`
#[test]
#[ignore = "needs a published FunASR Paraformer directory"]
fn real_checkpoint() -> Result<()> {
    let dir = std::env::var("CADENZA_PARAFORMER_DIR")?;
    let wav = std::env::var("CADENZA_PARAFORMER_WAV")?;
    let model = Paraformer::load(dir, &Device::Cpu)?;
    let pcm = cadenza_audio::decode_file(
        std::path::Path::new(&wav),
        &cadenza_audio::Limits::default(),
    )?;
    let pcm = pcm.conform(model.sample_rate(), 1)?;
    let t = model.recognize(&pcm.samples)?;
    println!("{} {:?}", t.text, t.timestamps);
    assert!(!t.token_ids.is_empty());
    Ok(())
}

#[derive(serde::Deserialize)]
struct VtlnCase {
    warp: f32,
    token_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct VtlnExpected {
    warps: Vec<f32>,
    per_warp: Vec<VtlnCase>,
    selected_text: String,
}

/// Test-time VTLN (`vtln_warps`): the tiny model's greedy decode under each warp factor matches
/// FunASR on torchaudio's warped fbank, and the warp search keeps the transcript the reference
/// selection (`training/eval/asr_eval.py`'s `decode_warped`) keeps (fixture:
/// `tools/fixtures/fbank_vtln.py`; the warps decode differently there, so the choice matters).
#[test]
fn vtln_warp_search_matches_reference() -> Result<()> {
    let d = dir("tiny");
    let exp: VtlnExpected = serde_json::from_str(&std::fs::read_to_string(d.join("vtln.json"))?)?;
    let bytes = std::fs::read(d.join("expected.safetensors"))?;
    let st = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let wave: Vec<f32> = st["wave"].to_vec1()?;
    let with = |warps: &[f32]| {
        let cfg = cadenza_paraformer::DecodingConfig {
            vtln_warps: Some(warps.to_vec()),
            ..Default::default()
        };
        Paraformer::load_with(&d, &cfg, &Device::Cpu)
    };
    let mut distinct = std::collections::HashSet::new();
    for case in &exp.per_warp {
        let t = with(&[case.warp])?.recognize(&wave)?;
        assert_eq!(t.token_ids, case.token_ids, "warp {}", case.warp);
        distinct.insert(t.token_ids);
    }
    assert!(distinct.len() > 1, "the warps all decode alike");
    let all = with(&exp.warps)?;
    let t = all.recognize(&wave)?;
    assert_eq!(t.text, exp.selected_text);
    // no warps: the plain frontend (the same as warp 1.0 here)
    let plain = Paraformer::load(&d, &Device::Cpu)?.recognize(&wave)?;
    let one = exp.per_warp.iter().find(|c| c.warp == 1.0).unwrap();
    assert_eq!(plain.token_ids, one.token_ids);
    // a factor the frontend's mel range cannot take is refused at load
    let cfg = cadenza_paraformer::DecodingConfig {
        vtln_warps: Some(vec![2.5]),
        ..Default::default()
    };
    assert!(Paraformer::load_with(&d, &cfg, &Device::Cpu).is_err());
    Ok(())
}
