//! Parity with audiocraft 1.3.0's `MagnetLMModel` on the random-weight fixture of
//! `tools/fixtures/magnet.py` (`tests/fixtures/magnet/tiny/`): checkpoint loading, the
//! conditioner projection, the model input (masking decisions) and the raw (cond, uncond)
//! stage logits of every decoding iteration, and the greedy (`use_sampling=False`) decode's
//! tokens, for non-overlapping spans ('max' and 'prod' scoring), overlapping spans ('stride1'),
//! prompts (continuation), annealed and flat temperature, annealed CFG.
//! Plus the rescorer's teacher-forced probabilities against the MusicGen audiocraft fixture.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use cadenza_magnet::{
    DecodeParams, MagnetGeneration, MagnetLm, MagnetXpCfg, SpanArrangement, SpanScoring,
};
use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/magnet/tiny")
}

const FRAME_RATE: usize = 25;
/// Unpadded lengths of the fixture's two texts (`TEXT_LEN` in the generator).
const TEXT_LEN: [usize; 2] = [2, 3];

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    text: usize,
    frames: usize,
    prompt: usize,
    decoding_steps: Vec<usize>,
    span_arrangement: String,
    span_scoring: String,
    temp: f32,
    anneal_temp: bool,
    max_cfg_coef: f32,
    min_cfg_coef: f32,
    iterations: usize,
    out_frames: usize,
}

fn load() -> Result<(MagnetLm, HashMap<String, Tensor>, Vec<Case>)> {
    let lm = MagnetLm::load_audiocraft(&dir().join("state_dict.bin"), FRAME_RATE, &Device::Cpu)?;
    let io = candle_core::safetensors::load(dir().join("io.safetensors"), &Device::Cpu)?;
    let cases = serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json"))?)?;
    Ok((lm, io, cases))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn params(c: &Case, io: &HashMap<String, Tensor>) -> Result<DecodeParams> {
    let prompt = match io.get(&format!("{}.prompt", c.name)) {
        Some(p) => Some(p.to_dtype(DType::U32)?.to_vec2::<u32>()?),
        None => None,
    };
    assert_eq!(prompt.as_ref().map_or(0, |p| p[0].len()), c.prompt);
    Ok(DecodeParams {
        frames: c.frames,
        decoding_steps: c.decoding_steps.clone(),
        temperature: c.temp,
        anneal_temp: c.anneal_temp,
        greedy: true,
        max_cfg_coef: c.max_cfg_coef,
        min_cfg_coef: c.min_cfg_coef,
        span_arrangement: match c.span_arrangement.as_str() {
            "nonoverlap" => SpanArrangement::NonOverlap,
            "stride1" => SpanArrangement::Stride1,
            s => panic!("arrangement {s}"),
        },
        span_scoring: match c.span_scoring.as_str() {
            "max" => SpanScoring::Max,
            "prod" => SpanScoring::Prod,
            s => panic!("scoring {s}"),
        },
        prompt,
        ..DecodeParams::default()
    })
}

/// The case's conditioning as audiocraft builds it inside `generate`: the text alone, padded
/// to its own length (the null condition is padded to the same length).
fn case_cond(lm: &MagnetLm, io: &HashMap<String, Tensor>, text: usize) -> Result<Tensor> {
    let cond = lm.condition(&io["t5_states"], &io["t5_mask"])?;
    Ok(cond.narrow(0, text, 1)?.narrow(1, 0, TEXT_LEN[text])?)
}

#[test]
fn config_and_conditioning() -> Result<()> {
    let (lm, io, _) = load()?;
    assert_eq!(lm.num_codebooks(), 4);
    assert_eq!(lm.card(), 32);
    assert_eq!(lm.mask_id(), 32);
    assert_eq!(lm.config.span_len, 3);
    assert_eq!(lm.config.subcodes_context, Some(2));
    assert_eq!(lm.config.max_frames, 25);
    let cond = lm.condition(&io["t5_states"], &io["t5_mask"])?;
    let d = max_diff(&cond, &io["condition_embeds"])?;
    assert!(d <= 1e-5, "conditioning max abs diff {d}");
    Ok(())
}

#[test]
fn unsupported_options_fail_at_load_by_name() -> Result<()> {
    let yaml = std::fs::read_to_string(dir().join("xp_cfg.yaml"))?;
    assert!(MagnetXpCfg::from_yaml(&yaml).is_ok());
    let err = |from: &str, to: &str| {
        assert!(yaml.contains(from), "{from}");
        MagnetXpCfg::from_yaml(&yaml.replacen(from, to, 1))
            .unwrap_err()
            .to_string()
    };
    assert!(
        err(
            "lm_model: transformer_lm_magnet",
            "lm_model: transformer_lm"
        )
        .contains("lm_model")
    );
    assert!(err("causal: false", "causal: true").contains("causal"));
    assert!(err("modeling: parallel", "modeling: delay").contains("pattern"));
    assert!(err("activation: gelu", "activation: relu").contains("activation"));
    Ok(())
}

/// Every iteration: the model input (masking + prompt restore + placed tokens) equals
/// audiocraft's exactly, the raw cond/uncond logits of the stage within 1e-4; the final tokens
/// are equal.
#[test]
fn decoding_iterations_match_reference() -> Result<()> {
    let (lm, io, cases) = load()?;
    assert_eq!(cases.len(), 5);
    for c in &cases {
        let cond = case_cond(&lm, &io, c.text)?;
        let mut g = MagnetGeneration::new(&lm, &cond, None, params(c, &io)?)?;
        let inputs = io[&format!("{}.inputs", c.name)].to_dtype(DType::U32)?; // [iters, K, T]
        let logits = &io[&format!("{}.logits", c.name)]; // [iters, 2, T, card]
        assert_eq!(inputs.dim(0)?, c.iterations);
        assert_eq!(g.total_iterations(), c.iterations);
        let mut i = 0;
        while !g.is_done() {
            let (stage, it) = (g.stage(), g.iteration());
            let input = g.prepare(&lm)?;
            assert_eq!(
                input.i(0)?.to_vec2::<u32>()?,
                inputs.i(i)?.to_vec2::<u32>()?,
                "{}: input of iteration {i} (stage {stage}, iteration {it})",
                c.name
            );
            let out = lm.forward_stage(&input, g.cross(), stage)?;
            let d = max_diff(&out, &logits.i(i)?)?;
            assert!(
                d <= 1e-4,
                "{}: logits of iteration {i} (stage {stage}) max abs diff {d}",
                c.name
            );
            let info = g.finish(&out)?;
            assert_eq!((info.stage, info.iteration), (stage, it));
            i += 1;
        }
        assert_eq!(i, c.iterations);
        let want = io[&format!("{}.tokens", c.name)]
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?;
        assert_eq!(want[0].len(), c.out_frames);
        assert_eq!(g.frames(), want, "{}: tokens", c.name);
    }
    Ok(())
}

/// `step` (one call per iteration) gives the same tokens, and the full forward's stage head
/// equals `forward_stage`.
#[test]
fn step_and_full_forward() -> Result<()> {
    let (lm, io, cases) = load()?;
    let c = &cases[1];
    let cond = case_cond(&lm, &io, c.text)?;
    let mut g = MagnetGeneration::new(&lm, &cond, None, params(c, &io)?)?;
    let mut n = 0;
    while !g.is_done() {
        let info = g.step(&lm)?;
        n += 1;
        assert_eq!(info.done, g.is_done());
    }
    assert_eq!(n, c.iterations);
    let want = io[&format!("{}.tokens", c.name)]
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?;
    assert_eq!(g.frames(), want);
    let inputs = io[&format!("{}.inputs", c.name)].to_dtype(DType::U32)?;
    let x = inputs.narrow(0, 5, 1)?; // an iteration of stage 1 (restricted attention)
    let x = Tensor::cat(&[&x, &x], 0)?;
    let full = lm.forward(&x, g.cross(), 1)?;
    let one = lm.forward_stage(&x, g.cross(), 1)?;
    assert!(max_diff(&full.i((.., 1))?, &one)? == 0.0);
    Ok(())
}

/// Sampling decodes stay valid, are reproducible by seed, and never touch the prompt; the
/// rescoring hook and hybrid (AR prefix) start work.
#[test]
fn sampling_rescoring_and_hybrid() -> Result<()> {
    let (lm, io, cases) = load()?;
    let c = &cases[1];
    let cond = case_cond(&lm, &io, c.text)?;
    let base = DecodeParams {
        greedy: false,
        seed: 5,
        ..params(c, &io)?
    };
    let prompt = base.prompt.clone().unwrap();
    let run = |rescore: bool| -> Result<Vec<Vec<u32>>> {
        let mut g = MagnetGeneration::from_ar_prefix(&lm, &cond, None, &prompt, base.clone())?;
        while !g.is_done() {
            if rescore && g.awaiting_rescore() {
                let t = g.frames()[0].len();
                g.rescore(&vec![0.5; t], 0.7)?;
            }
            g.step(&lm)?;
        }
        Ok(g.frames().to_vec())
    };
    let a = run(false)?;
    assert_eq!(a, run(false)?);
    let b = run(true)?;
    for out in [&a, &b] {
        for (q, row) in out.iter().enumerate() {
            assert_eq!(&row[..prompt[q].len()], &prompt[q][..]);
            assert!(row.iter().all(|&x| x < lm.card() as u32));
        }
    }
    Ok(())
}

/// The rescorer input: MusicGen's teacher-forced probabilities in one pass through the delay
/// pattern equal softmax of audiocraft's teacher-forced logits of the delayed sequence (step
/// `t + delay[q]` predicts frame `t` of codebook `q`; delays `0..K`).
#[test]
fn rescorer_probs_match_musicgen_predictions() -> Result<()> {
    let mg_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/musicgen");
    let hf = cadenza_musicgen::MusicGen::load_hf(&mg_dir.join("hf-tiny"), &Device::Cpu)?;
    let io = candle_core::safetensors::load(
        mg_dir.join("audiocraft-tiny/io.safetensors"),
        &Device::Cpu,
    )?;
    let codes = io["codes"].to_dtype(DType::U32)?; // (B, K, T)
    let logits = &io["logits"]; // (B, K, S, card)
    for b in 0..codes.dim(0)? {
        let frames = codes.i(b)?.to_vec2::<u32>()?;
        let cond = io["condition_embeds"].narrow(0, b, 1)?;
        let probs = cadenza_magnet::rescore::teacher_forced_probs(
            &hf.lm,
            &hf.pattern,
            &cond,
            None,
            &frames,
            1.0,
        )?;
        let want = candle_nn::ops::softmax_last_dim(&logits.i(b)?)?.to_vec3::<f32>()?;
        for (q, row) in frames.iter().enumerate() {
            for (t, &x) in row.iter().enumerate() {
                let w = want[q][t + q][x as usize];
                assert!(
                    (probs[q][t] - w).abs() <= 1e-5,
                    "prompt {b} codebook {q} frame {t}: {} vs {w}",
                    probs[q][t]
                );
            }
        }
    }
    Ok(())
}

/// `Magnet::from_parts` reads the LM next to a T5 and codec and names a width mismatch (the
/// fixture's stand-in T5 states are 16 wide, the MusicGen fixture's T5 is 32 wide).
#[test]
fn full_model_checks_the_text_encoder_width() -> Result<()> {
    let mg_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/musicgen/hf-tiny");
    let hf = cadenza_musicgen::MusicGen::load_hf(&mg_dir, &Device::Cpu)?;
    let err = cadenza_magnet::Magnet::from_parts(
        &dir().join("state_dict.bin"),
        hf.t5.clone(),
        hf.tokenizer.clone(),
        hf.codec.clone(),
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("16-wide"), "{err}");
    Ok(())
}
