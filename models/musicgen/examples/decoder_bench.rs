//! Times MusicGen decoder steps (greedy, with the KV cache) on a fixed random-weight model.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run -p cadenza-musicgen --example decoder_bench -- \
//!     [DIR] [--steps 50] [--batch 1 8] [--repeats 2] [--no-probe]
//! ```
//! `DIR` (default `/tmp/cadenza-bench-musicgen`) holds `config.json` (a transformers
//! `MusicgenDecoderConfig`), `model.safetensors` (a `MusicgenForCausalLM` state dict) and
//! `cond.safetensors` (`encoder_hidden_states` (8, L, D), `encoder_attention_mask` (8, L)), as
//! written by `tools/bench/musicgen_torch.py`, which times transformers on the same files.
//!
//! Per batch size B: step 0 computes the cross-attention K/V and feeds one BOS column (token
//! `card` in every codebook); each later step feeds back the argmax of the last logits. The
//! steady-state rate is over steps 1.. (best of `--repeats`). Prints one JSON line per batch:
//! `{"impl": "cadenza", "batch", "steps", "frames_per_s", "step_ms", "first_step_ms", "threads",
//! "last_tokens_row0"}`, then (unless `--no-probe`) a memory-bandwidth probe and the batch-1
//! physical limit `{"probe": "bandwidth", "copy_gb_s", "read_gb_s", "weight_bytes_per_step",
//! "limit_step_ms", "limit_frames_per_s", "limit_step_ms_at_copy_rate"}`: weight bytes read per
//! step over the measured read-only bandwidth (and over the memcpy read+write rate).
//!
//! Threads: candle reads `RAYON_NUM_THREADS` (else the physical core count).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cadenza_musicgen::{DecoderConfig, Lm};
use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

struct Args {
    dir: PathBuf,
    steps: usize,
    batches: Vec<usize>,
    repeats: usize,
    probe: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("/tmp/cadenza-bench-musicgen"),
        steps: 50,
        batches: vec![1, 8],
        repeats: 2,
        probe: true,
    };
    let mut it = std::env::args().skip(1).peekable();
    while let Some(s) = it.next() {
        match s.as_str() {
            "--steps" => a.steps = it.next().context("--steps N")?.parse()?,
            "--repeats" => a.repeats = it.next().context("--repeats N")?.parse::<usize>()?.max(1),
            "--no-probe" => a.probe = false,
            "--batch" => {
                a.batches.clear();
                while let Some(v) = it.peek().and_then(|v| v.parse::<usize>().ok()) {
                    a.batches.push(v);
                    it.next();
                }
                if a.batches.is_empty() {
                    bail!("--batch B [B ...]")
                }
            }
            _ if s.starts_with("--") => bail!("unknown option {s}"),
            _ => a.dir = PathBuf::from(s),
        }
    }
    if a.steps < 2 {
        bail!("--steps must be at least 2")
    }
    Ok(a)
}

/// One decode run: (first step incl. cross K/V s, steady-state s per step, last tokens of row 0).
fn decode(
    lm: &Lm,
    cond: &Tensor,
    mask: &Tensor,
    batch: usize,
    steps: usize,
) -> Result<(f64, f64, Vec<u32>)> {
    let dev = cond.device();
    let k = lm.num_codebooks();
    let t0 = Instant::now();
    let mut caches = lm.caches(batch, steps, dev)?;
    let cross = lm.cross(&cond.narrow(0, 0, batch)?, Some(&mask.narrow(0, 0, batch)?))?;
    let mut tokens = Tensor::full(lm.card() as u32, (batch, k, 1), dev)?;
    let mut t1 = t0;
    for s in 0..steps {
        let logits = lm.forward(&tokens, &mut caches, &cross)?; // (B, K, 1, card)
        tokens = logits.argmax(D::Minus1)?; // (B, K, 1) u32
        if s == 0 {
            // Make sure the step's work is done (CPU ops are synchronous anyway).
            let _ = tokens.flatten_all()?.to_vec1::<u32>()?;
            t1 = Instant::now();
        }
    }
    let last = tokens.flatten_all()?.to_vec1::<u32>()?;
    let t2 = Instant::now();
    Ok((
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64() / (steps - 1) as f64,
        last[..k].to_vec(),
    ))
}

/// Bytes of weights (f32) read by one decode step: every layer's self-attention QKV and output,
/// cross-attention Q and output (cross K/V are precomputed), both FFN matrices, the LayerNorms,
/// the LM heads, and one embedding row per codebook.
fn weight_bytes_per_step(c: &DecoderConfig) -> u64 {
    let (d, f, k, v) = (
        c.hidden_size as u64,
        c.ffn_dim as u64,
        c.num_codebooks as u64,
        c.vocab_size as u64,
    );
    let layer = 3 * d * d + d * d + d * d + d * d + 2 * d * f + 3 * 2 * d;
    let params = c.num_hidden_layers as u64 * layer + 2 * d + k * v * d + k * d;
    params * 4
}

/// Memory bandwidth probes over a buffer much larger than the last-level cache, split over
/// `threads` threads: `memcpy` (reported as bytes read + written per second) and a read-only
/// reduction (candle's `sum_all` on per-thread slices). Best of 3.
fn bandwidth(threads: usize) -> Result<(f64, f64)> {
    const BYTES: usize = 2 << 30; // 2 GiB per buffer, well above the L3 cache
    let n = BYTES / 4;
    let src: Vec<f32> = (0..n).map(|i| (i % 1024) as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n.div_ceil(threads);
    let mut copy = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for (d, sr) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(sr));
            }
        });
        copy = copy.max(2.0 * BYTES as f64 / t.elapsed().as_secs_f64());
    }
    drop(dst);
    let parts = src
        .chunks(chunk)
        .map(|c| Tensor::from_slice(c, c.len(), &Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    drop(src);
    let mut read = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let sums = std::thread::scope(|s| {
            let hs: Vec<_> = parts
                .iter()
                .map(|p| s.spawn(move || p.sum_all().and_then(|x| x.to_scalar::<f32>())))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("probe thread"))
                .collect::<candle_core::Result<Vec<f32>>>()
        })?;
        std::hint::black_box(sums);
        read = read.max(BYTES as f64 / t.elapsed().as_secs_f64());
    }
    Ok((copy / 1e9, read / 1e9))
}

fn main() -> Result<()> {
    let a = args()?;
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let cfg: DecoderConfig = serde_json::from_str(
        &std::fs::read_to_string(a.dir.join("config.json"))
            .with_context(|| format!("{}/config.json", a.dir.display()))?,
    )?;
    let t = Instant::now();
    // `safetensors::load` maps the file and converts each tensor once (no intermediate copy of
    // the whole file); `from_mmaped_safetensors` would do the same but needs `unsafe`.
    let tensors = candle_core::safetensors::load(a.dir.join("model.safetensors"), &dev)
        .with_context(|| format!("{}/model.safetensors", a.dir.display()))?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let lm = Lm::new_hf(&cfg, vb)?;
    eprintln!(
        "loaded {} in {:.1} s",
        a.dir.display(),
        t.elapsed().as_secs_f64()
    );
    let mut cond = candle_core::safetensors::load(a.dir.join("cond.safetensors"), &dev)?;
    let hs = cond
        .remove("encoder_hidden_states")
        .context("cond.safetensors: no encoder_hidden_states")?
        .to_dtype(DType::F32)?;
    let mask = cond
        .remove("encoder_attention_mask")
        .context("cond.safetensors: no encoder_attention_mask")?
        .to_dtype(DType::F32)?;
    let rows = hs.dim(0)?;

    decode(&lm, &hs, &mask, 1, 3)?; // warm-up
    for &b in &a.batches {
        if b > rows {
            bail!("batch {b} > {rows} conditioning rows")
        }
        let mut best: Option<(f64, f64, Vec<u32>)> = None;
        for _ in 0..a.repeats {
            let r = decode(&lm, &hs, &mask, b, a.steps)?;
            if best.as_ref().is_none_or(|x| r.1 < x.1) {
                best = Some(r);
            }
        }
        let (first, step, toks) = best.expect("repeats >= 1");
        println!(
            "{}",
            serde_json::json!({
                "impl": "cadenza",
                "batch": b,
                "steps": a.steps,
                "frames_per_s": (1.0 / step * 1e3).round() / 1e3,
                "step_ms": (step * 1e6).round() / 1e3,
                "first_step_ms": (first * 1e6).round() / 1e3,
                "threads": threads,
                "last_tokens_row0": toks,
            })
        );
    }
    if a.probe {
        let (copy, read) = bandwidth(threads)?;
        let bytes = weight_bytes_per_step(&cfg);
        // Weights are only read: the read-only probe is the relevant rate; memcpy (read +
        // write traffic) is reported as an optimistic bound.
        let limit = |gb_s: f64| bytes as f64 / (gb_s * 1e9);
        let (limit_s, limit_copy_s) = (limit(read), limit(copy));
        println!(
            "{}",
            serde_json::json!({
                "probe": "bandwidth",
                "threads": threads,
                "copy_gb_s": (copy * 100.0).round() / 100.0,
                "read_gb_s": (read * 100.0).round() / 100.0,
                "weight_bytes_per_step": bytes,
                "limit_step_ms": (limit_s * 1e6).round() / 1e3,
                "limit_frames_per_s": (1.0 / limit_s * 100.0).round() / 100.0,
                "limit_step_ms_at_copy_rate": (limit_copy_s * 1e6).round() / 1e3,
            })
        );
    }
    Ok(())
}
