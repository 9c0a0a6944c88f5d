//! Parity with transformers' `MusicgenForConditionalGeneration` on the random-weight fixture of
//! `tools/fixtures/musicgen.py`: tokenizer ids, T5 states, teacher-forced decoder logits, the
//! per-step guided logits and greedy CFG tokens, and the decoded audio.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use cadenza_musicgen::{GenerateParams, Generation, MusicGen};
use cadenza_nn::sampling::SamplingParams;
use candle_core::{DType, Device, IndexOp, Tensor};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/musicgen/hf-tiny")
}

fn load() -> Result<(MusicGen, HashMap<String, Tensor>)> {
    let m = MusicGen::load_hf(&dir(), &Device::Cpu)?;
    let io = candle_core::safetensors::load(dir().join("io.safetensors"), &Device::Cpu)?;
    Ok((m, io))
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

const PROMPTS: [&str; 2] = ["happy rock song with guitar", "calm piano"];

#[test]
fn tokenizer_and_text_encoder_match() -> Result<()> {
    let (m, io) = load()?;
    let (ids, mask) = m.tokenize(&PROMPTS)?;
    assert_eq!(
        ids.to_dtype(DType::I64)?.to_vec2::<i64>()?,
        io["input_ids"].to_vec2::<i64>()?
    );
    assert_eq!(
        mask.to_dtype(DType::I64)?.to_vec2::<i64>()?,
        io["attention_mask"].to_vec2::<i64>()?
    );
    let h = m.t5.forward(&ids, &mask)?;
    let d = max_diff(&h, &io["encoder_hidden_states"])?;
    assert!(d <= 1e-4, "T5 states max abs diff {d}");
    let c = m.condition(&ids, &mask)?;
    let d = max_diff(&c, &io["decoder_encoder_hidden_states"])?;
    assert!(d <= 1e-4, "projected conditioning max abs diff {d}");
    Ok(())
}

#[test]
fn teacher_forced_logits_match() -> Result<()> {
    let (m, io) = load()?;
    let ids = io["decoder_input_ids"].to_dtype(DType::U32)?; // (B*K, S)
    let (bk, s) = ids.dims2()?;
    let k = m.lm.num_codebooks();
    let tokens = ids.reshape((bk / k, k, s))?;
    let cond = &io["decoder_encoder_hidden_states"];
    let mask = io["attention_mask"].to_dtype(DType::F32)?;
    let cross = m.lm.cross(cond, Some(&mask))?;
    let mut caches = m.lm.caches(bk / k, s, &Device::Cpu)?;
    let logits = m.lm.forward(&tokens, &mut caches, &cross)?; // (B, K, S, V)
    let logits = logits.reshape((bk, s, ()))?;
    let d = max_diff(&logits, &io["decoder_logits"])?;
    assert!(d <= 1e-4, "decoder logits max abs diff {d}");
    Ok(())
}

#[test]
fn greedy_cfg_generation_matches_tokens_logits_and_audio() -> Result<()> {
    let (m, io) = load()?;
    let k = m.lm.num_codebooks();
    let want_codes = io["generated_codes"].to_dtype(DType::U32)?.i(0)?; // (B, K, T)
    let frames = want_codes.dim(2)?;
    let scores = &io["step_scores"]; // (steps, B*K, V)
    let (ids, mask) = m.tokenize(&PROMPTS)?;
    let cond = m.condition(&ids, &mask)?;
    for b in 0..PROMPTS.len() {
        let params = GenerateParams {
            frames,
            sampling: SamplingParams {
                greedy: true,
                ..Default::default()
            },
            guidance: 3.0,
            seed: 0,
            prompt: None,
        };
        let mut g = Generation::new(&m, &cond.narrow(0, b, 1)?, &mask.narrow(0, b, 1)?, params)?;
        let mut completed = Vec::new();
        let mut step = 0;
        while !g.is_done(&m) {
            let out = g.step(&m)?;
            let want = scores.i(step)?.narrow(0, b * k, k)?;
            let got = Tensor::new(g.last_logits.clone(), &Device::Cpu)?;
            let d = max_diff(&got, &want)?;
            assert!(
                d <= 1e-4,
                "prompt {b} step {step}: guided logits max abs diff {d}"
            );
            completed.extend(out.completed);
            step += 1;
        }
        assert_eq!(step, scores.dim(0)?);
        assert_eq!(
            completed.len(),
            frames,
            "every frame is reported once complete"
        );
        let want = want_codes.i(b)?.to_vec2::<u32>()?;
        for (q, row) in want.iter().enumerate() {
            assert_eq!(&g.frames()[q], row, "prompt {b} codebook {q}");
            let streamed: Vec<u32> = completed.iter().map(|f| f[q]).collect();
            assert_eq!(&streamed, row);
        }
        // The codec decodes the tokens to the reference audio.
        let codes = want_codes.i(b)?.unsqueeze(0)?.unsqueeze(0)?;
        let audio = m.codec.decode(&codes, &[None], 0)?; // (1, 1, T)
        let d = max_diff(&audio, &io["generated_audio"].narrow(0, b, 1)?)?;
        assert!(d <= 1e-4, "prompt {b}: audio max abs diff {d}");
    }
    Ok(())
}

/// The same decoder as an audiocraft `LMModel` checkpoint (`state_dict.bin` with `best_state`
/// and the `xp.cfg` YAML): teacher-forced logits and greedy CFG generation match audiocraft
/// (which, unlike transformers, does not mask padded text positions in cross-attention).
#[test]
fn audiocraft_checkpoint_matches_reference() -> Result<()> {
    let (hf, _) = load()?;
    let dir = dir().join("../audiocraft-tiny");
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
    let m = MusicGen::from_audiocraft_parts(
        &dir.join("state_dict.bin"),
        hf.t5.clone(),
        hf.tokenizer.clone(),
        hf.codec.clone(),
        &Device::Cpu,
    )?;
    assert!(!m.mask_cross_attention);
    let (ids, mask) = m.tokenize(&PROMPTS)?;
    let cond = m.condition(&ids, &mask)?;
    let d = max_diff(&cond, &io["condition_embeds"])?;
    assert!(d <= 1e-4, "conditioning max abs diff {d}");
    // Teacher forcing.
    let seq = io["sequence"].to_dtype(DType::U32)?; // (B, K, S)
    let (b, _, s) = seq.dims3()?;
    let cross = m.lm.cross(&cond, None)?;
    let mut caches = m.lm.caches(b, s, &Device::Cpu)?;
    let logits = m.lm.forward(&seq, &mut caches, &cross)?;
    let d = max_diff(&logits, &io["logits"])?;
    assert!(d <= 1e-4, "audiocraft logits max abs diff {d}");
    // Greedy CFG generation (cfg_coef 3 from xp.cfg).
    assert_eq!(m.defaults.guidance_scale, 3.0);
    let want = io["generated_codes"].to_dtype(DType::U32)?; // (B, K, 9)
    let scores = &io["step_scores"]; // (B, K, steps, V)
    for bi in 0..b {
        let params = GenerateParams {
            frames: want.dim(2)?,
            sampling: SamplingParams {
                greedy: true,
                ..Default::default()
            },
            guidance: 3.0,
            seed: 0,
            prompt: None,
        };
        let mut g = Generation::new(&m, &cond.narrow(0, bi, 1)?, &mask.narrow(0, bi, 1)?, params)?;
        let mut step = 0;
        while !g.is_done(&m) {
            g.step(&m)?;
            let got = Tensor::new(g.last_logits.clone(), &Device::Cpu)?;
            let d = max_diff(&got, &scores.i(bi)?.narrow(1, step, 1)?.squeeze(1)?)?;
            assert!(
                d <= 1e-4,
                "prompt {bi} step {step}: audiocraft guided logits max abs diff {d}"
            );
            step += 1;
        }
        assert_eq!(
            g.frames(),
            want.i(bi)?.to_vec2::<u32>()?,
            "prompt {bi} codes"
        );
    }
    Ok(())
}

/// Sessions stepped together (different prompts, lengths, CFG on and off, one joining late and
/// one continuing from codes) produce the same logits and tokens as each stepped alone.
#[test]
fn batched_steps_equal_solo_steps() -> Result<()> {
    let (m, _) = load()?;
    let (ids, mask) = m.tokenize(&PROMPTS)?;
    let cond = m.condition(&ids, &mask)?;
    let k = m.lm.num_codebooks();
    let make = |b: usize, frames: usize, guidance: f32, prompt: Option<Vec<Vec<u32>>>| {
        let params = GenerateParams {
            frames,
            sampling: SamplingParams {
                temperature: 1.0,
                top_k: 8,
                ..Default::default()
            },
            guidance,
            seed: 7 + b as u64,
            prompt,
        };
        Generation::new(
            &m,
            &cond.narrow(0, b % PROMPTS.len(), 1)?,
            &mask.narrow(0, b % PROMPTS.len(), 1)?,
            params,
        )
    };
    let prompt = Some((0..k).map(|q| vec![q as u32 + 1, 5, 9]).collect::<Vec<_>>());
    let specs = [
        (0usize, 9usize, 3.0f32, None),
        (1, 6, 1.0, None),
        (2, 7, 2.0, prompt),
    ];
    let mut solo = Vec::new();
    for (b, f, g, p) in specs.clone() {
        let mut gen_ = make(b, f, g, p)?;
        let mut logits = Vec::new();
        while !gen_.is_done(&m) {
            gen_.step(&m)?;
            logits.push(gen_.last_logits.clone());
        }
        solo.push((gen_.frames().to_vec(), logits));
    }
    let mut gens = specs
        .iter()
        .cloned()
        .map(|(b, f, g, p)| make(b, f, g, p))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut logits: Vec<Vec<Vec<Vec<f32>>>> = vec![Vec::new(); gens.len()];
    let mut round = 0;
    loop {
        // Session 2 joins two steps late; finished sessions leave the batch.
        let mut active: Vec<(usize, &mut Generation)> = gens
            .iter_mut()
            .enumerate()
            .filter(|(i, g)| !g.is_done(&m) && (*i != 2 || round >= 2))
            .collect();
        if active.is_empty() {
            break;
        }
        let idx: Vec<usize> = active.iter().map(|(i, _)| *i).collect();
        let mut refs: Vec<&mut Generation> = active.iter_mut().map(|(_, g)| &mut **g).collect();
        Generation::step_batch(&m, &mut refs)?;
        for (i, g) in idx.iter().zip(refs) {
            logits[*i].push(g.last_logits.clone());
        }
        round += 1;
    }
    for (i, g) in gens.iter().enumerate() {
        let (frames, want) = &solo[i];
        assert_eq!(g.frames(), frames.as_slice(), "session {i} tokens");
        assert_eq!(logits[i].len(), want.len());
        for (s, (a, b)) in logits[i].iter().zip(want).enumerate() {
            let a = Tensor::new(a.clone(), &Device::Cpu)?;
            let b = Tensor::new(b.clone(), &Device::Cpu)?;
            let d = max_diff(&a, &b)?;
            assert!(d <= 1e-4, "session {i} step {s}: logits differ by {d}");
        }
    }
    Ok(())
}
