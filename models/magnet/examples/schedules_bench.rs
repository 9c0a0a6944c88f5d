//! Latency and throughput of the four music schedules on random weights: autoregressive
//! (MusicGen LM, delay pattern), MAGNeT, hybrid (AR prefix, then MAGNeT) and MAGNeT rescored by
//! the AR LM, counting the forward passes each makes.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p cadenza-magnet --example schedules_bench -- \
//!     [--size small|tiny] [--seconds 10] [--batch 1 8] [--steps 20,10,10,10] \
//!     [--prefix 3] [--measure-ar N] [--measure-magnet N]
//! ```
//!
//! Sizes: `small` = musicgen-small / magnet-small (dim 1024, 24 layers, 16 heads, 4 × 2048
//! codebooks, T5-base width 768), `tiny` = dim 256, 4 layers, 4 heads, 4 × 2048. Both LMs
//! (AR and MAGNeT) have the same backbone; weights are N(0, 0.02), text conditioning is 12
//! random T5 states. Only the LMs are timed (no T5, no codec decode: the same for every
//! schedule). AR: one forward per delay-pattern step over 2B rows (CFG) with the KV cache,
//! argmax fed back. MAGNeT: `MagnetGeneration` (masking, annealed CFG, top-p sampling) with
//! `step_batch` over the B sessions, one forward per iteration over 2B rows × T frames.
//! Rescored: after every iteration but the last of a stage, one teacher-forced AR forward over
//! the whole sequence per session (`rescore::teacher_forced_probs`), as the engine runs it.
//!
//! `--measure-ar N` / `--measure-magnet N` time only the first N AR steps / N MAGNeT
//! iterations (of a schedule with the given per-codebook steps) and extrapolate linearly to
//! the full count (every MAGNeT iteration costs the same; an AR step's cost grows slightly with
//! the cache, so the AR extrapolation is a lower bound). The JSON lines say which numbers are
//! measured and which are extrapolated.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cadenza_magnet::{DecodeParams, MagnetGeneration, MagnetLm, MagnetXpCfg};
use cadenza_musicgen::Lm;
use cadenza_musicgen::audiocraft::TransformerLmCfg;
use cadenza_nn::patterns::DelayPattern;
use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

struct Size {
    dim: usize,
    layers: usize,
    heads: usize,
    card: usize,
    t5: usize,
}

struct Args {
    size: String,
    seconds: f64,
    batches: Vec<usize>,
    steps: Vec<usize>,
    prefix: f64,
    measure_ar: Option<usize>,
    measure_magnet: Option<usize>,
    schedules: Vec<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        size: "tiny".into(),
        seconds: 10.0,
        batches: vec![1, 8],
        steps: vec![20, 10, 10, 10],
        prefix: 3.0,
        measure_ar: None,
        measure_magnet: None,
        schedules: ["ar", "magnet", "hybrid", "rescored"]
            .map(String::from)
            .to_vec(),
    };
    let mut it = std::env::args().skip(1).peekable();
    while let Some(s) = it.next() {
        let mut val = || it.next().with_context(|| format!("{s} needs a value"));
        match s.as_str() {
            "--size" => a.size = val()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--prefix" => a.prefix = val()?.parse()?,
            "--measure-ar" => a.measure_ar = Some(val()?.parse()?),
            "--measure-magnet" => a.measure_magnet = Some(val()?.parse()?),
            "--steps" => {
                a.steps = val()?
                    .split(',')
                    .map(|x| x.parse())
                    .collect::<Result<_, _>>()?
            }
            "--schedules" => a.schedules = val()?.split(',').map(String::from).collect(),
            "--batch" => {
                a.batches.clear();
                while let Some(v) = it.peek().and_then(|v| v.parse::<usize>().ok()) {
                    a.batches.push(v);
                    it.next();
                }
            }
            _ => bail!("unknown option {s}"),
        }
    }
    Ok(a)
}

/// Random audiocraft `LMModel` weights (the key layout MusicGen and MAGNeT checkpoints share).
fn weights(s: &Size, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    let (d, f) = (s.dim, 4 * s.dim);
    let mut rnd = |name: String, shape: &[usize]| -> Result<()> {
        m.insert(name, (Tensor::randn(0f32, 1.0, shape, dev)? * 0.02)?);
        Ok(())
    };
    for k in 0..4 {
        rnd(format!("emb.{k}.weight"), &[s.card + 1, d])?;
        rnd(format!("linears.{k}.weight"), &[s.card, d])?;
    }
    for l in 0..s.layers {
        let p = format!("transformer.layers.{l}");
        rnd(format!("{p}.self_attn.in_proj_weight"), &[3 * d, d])?;
        rnd(format!("{p}.self_attn.out_proj.weight"), &[d, d])?;
        rnd(format!("{p}.cross_attention.in_proj_weight"), &[3 * d, d])?;
        rnd(format!("{p}.cross_attention.out_proj.weight"), &[d, d])?;
        rnd(format!("{p}.linear1.weight"), &[f, d])?;
        rnd(format!("{p}.linear2.weight"), &[d, f])?;
    }
    rnd(
        "condition_provider.conditioners.description.output_proj.weight".into(),
        &[d, s.t5],
    )?;
    let mut norms = vec!["out_norm".to_string()];
    for l in 0..s.layers {
        for n in ["norm1", "norm2", "norm_cross"] {
            norms.push(format!("transformer.layers.{l}.{n}"));
        }
    }
    for n in norms {
        m.insert(format!("{n}.weight"), Tensor::ones(d, DType::F32, dev)?);
        m.insert(format!("{n}.bias"), Tensor::zeros(d, DType::F32, dev)?);
    }
    m.insert(
        "condition_provider.conditioners.description.output_proj.bias".into(),
        Tensor::zeros(d, DType::F32, dev)?,
    );
    Ok(m)
}

fn xp_yaml(s: &Size) -> String {
    format!(
        "lm_model: transformer_lm_magnet\n\
         transformer_lm: {{dim: {}, num_heads: {}, num_layers: {}, hidden_scale: 4, n_q: 4, card: {}, \
         causal: false, subcodes_context: 5, bias_ff: false, bias_attn: false, bias_proj: false, \
         norm_first: true, activation: gelu, norm: layer_norm, positional_embedding: sin}}\n\
         codebooks_pattern: {{modeling: parallel}}\n\
         masking: {{span_len: 3}}\n\
         dataset: {{segment_duration: 30}}\n\
         fuser: {{cross: [description], sum: [], prepend: [], input_interpolate: []}}\n",
        s.dim, s.heads, s.layers, s.card
    )
}

/// AR decoding of `steps` delay-pattern steps for `b` sessions (2b rows with CFG); returns
/// (seconds, forward passes). Only the first `measure` steps run when given; the time is then
/// extrapolated to `steps`.
fn run_ar(
    lm: &Lm,
    cond: &Tensor,
    b: usize,
    steps: usize,
    measure: Option<usize>,
) -> Result<(f64, usize, bool)> {
    let dev = cond.device();
    let rows = 2 * b;
    let run = measure.unwrap_or(steps).min(steps);
    let c = Tensor::cat(&vec![cond.clone(); b], 0)?;
    let c = Tensor::cat(&[&c, &c.zeros_like()?], 0)?;
    let t = Instant::now();
    let cross = lm.cross(&c, None)?;
    let mut caches = lm.caches(rows, steps + 1, dev)?;
    let mut tokens = Tensor::full(lm.card() as u32, (rows, 4, 1), dev)?;
    for _ in 0..run {
        let logits = lm.forward(&tokens, &mut caches, &cross)?; // (rows, K, 1, card)
        let g = logits.narrow(0, 0, b)?; // guided logits stand-in: argmax of the cond rows
        let next = g.argmax(D::Minus1)?; // (b, K, 1)
        tokens = Tensor::cat(&[&next, &next], 0)?;
    }
    let _ = tokens.flatten_all()?.to_vec1::<u32>()?;
    let secs = t.elapsed().as_secs_f64() * steps as f64 / run as f64;
    Ok((secs, steps, run < steps))
}

struct MagnetOut {
    secs: f64,
    forwards: usize,
    rescore_forwards: usize,
    extrapolated: bool,
}

/// MAGNeT decoding of `frames` frames for `b` sessions (optionally from an AR prefix and with
/// rescoring by `rescorer`).
#[allow(clippy::too_many_arguments)]
fn run_magnet(
    lm: &MagnetLm,
    cond: &Tensor,
    b: usize,
    frames: usize,
    steps: &[usize],
    prefix: Option<&[Vec<u32>]>,
    rescorer: Option<(&Lm, &DelayPattern, &Tensor)>,
    measure: Option<usize>,
) -> Result<MagnetOut> {
    let total: usize = steps.iter().sum();
    let run = measure.unwrap_or(total).min(total);
    let t = Instant::now();
    let mut gens = (0..b)
        .map(|i| {
            let p = DecodeParams {
                frames,
                decoding_steps: steps.to_vec(),
                seed: i as u64,
                prompt: prefix.map(|p| p.to_vec()),
                ..Default::default()
            };
            MagnetGeneration::new(lm, cond, None, p)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let (mut forwards, mut rescores) = (0, 0);
    while forwards < run {
        let mut refs: Vec<&mut MagnetGeneration> = gens.iter_mut().collect();
        MagnetGeneration::step_batch(lm, &mut refs)?;
        forwards += 1;
        if let Some((ar, pattern, rcond)) = rescorer {
            for g in gens.iter_mut().filter(|g| g.awaiting_rescore()) {
                let probs = cadenza_magnet::rescore::teacher_forced_probs(
                    ar,
                    pattern,
                    rcond,
                    None,
                    g.frames(),
                    3.0,
                )?;
                let s = g.stage();
                g.rescore(&probs[s], 0.7)?;
                rescores += 1;
            }
        }
    }
    let scale = total as f64 / run as f64;
    // A full run rescores after every iteration but the last of each stage, per session.
    let rescore_forwards = if run < total && rescorer.is_some() {
        (total - steps.len()) * b
    } else {
        rescores
    };
    Ok(MagnetOut {
        secs: t.elapsed().as_secs_f64() * scale,
        forwards: total,
        rescore_forwards,
        extrapolated: run < total,
    })
}

fn main() -> Result<()> {
    let a = args()?;
    let dev = Device::Cpu;
    let size = match a.size.as_str() {
        "small" => Size {
            dim: 1024,
            layers: 24,
            heads: 16,
            card: 2048,
            t5: 768,
        },
        "tiny" => Size {
            dim: 256,
            layers: 4,
            heads: 4,
            card: 2048,
            t5: 768,
        },
        s => bail!("--size small|tiny, not {s}"),
    };
    let threads = candle_core::utils::get_num_threads();
    let fr = 50.0;
    let frames = (a.seconds * fr).round() as usize;
    let prefix_frames = (a.prefix * fr).round() as usize;
    let t = Instant::now();
    let yaml = xp_yaml(&size);
    let xp = MagnetXpCfg::from_yaml(&yaml)?;
    let mlm = MagnetLm::from_tensors(&xp, weights(&size, &dev)?, 50, &dev)?;
    let tcfg: TransformerLmCfg = xp.transformer_lm.clone();
    let ar = Lm::new_audiocraft(
        &tcfg,
        VarBuilder::from_tensors(weights(&size, &dev)?, DType::F32, &dev),
    )?;
    let pattern = DelayPattern::new(vec![0, 1, 2, 3]);
    eprintln!(
        "built {} LMs in {:.1} s ({threads} threads)",
        a.size,
        t.elapsed().as_secs_f64()
    );
    let t5 = Tensor::randn(0f32, 1.0, (1, 12, size.t5), &dev)?;
    let mask = Tensor::ones((1, 12), DType::U32, &dev)?;
    let mcond = mlm.condition(&t5, &mask)?;
    let acond = (Tensor::randn(0f32, 1.0, (1, 12, size.dim), &dev)? * 0.5)?;
    // Warm-up (first-touch allocations).
    run_ar(&ar, &acond, 1, 2, None)?;
    run_magnet(&mlm, &mcond, 1, 30, &[1, 1, 1, 1], None, None, None)?;
    let ar_steps = pattern.steps_for(frames);
    let prefix_steps = pattern.steps_for(prefix_frames);
    for &b in &a.batches {
        for sched in &a.schedules {
            let (secs, forwards, rescore, extrapolated) = match sched.as_str() {
                "ar" => {
                    let (s, f, e) = run_ar(&ar, &acond, b, ar_steps, a.measure_ar)?;
                    (s, f, 0, e)
                }
                "magnet" | "rescored" => {
                    let r = (sched == "rescored").then_some((&ar, &pattern, &acond));
                    let o =
                        run_magnet(&mlm, &mcond, b, frames, &a.steps, None, r, a.measure_magnet)?;
                    (o.secs, o.forwards, o.rescore_forwards, o.extrapolated)
                }
                "hybrid" => {
                    let (s1, f1, e1) = run_ar(&ar, &acond, b, prefix_steps, a.measure_ar)?;
                    // The prefix tokens do not change the cost: use a fixed prefix.
                    let prefix = vec![vec![7u32; prefix_frames]; 4];
                    let o = run_magnet(
                        &mlm,
                        &mcond,
                        b,
                        frames,
                        &a.steps,
                        Some(&prefix),
                        None,
                        a.measure_magnet,
                    )?;
                    (s1 + o.secs, f1 + o.forwards, 0, e1 || o.extrapolated)
                }
                s => bail!("unknown schedule {s}"),
            };
            println!(
                "{{\"size\": \"{}\", \"schedule\": \"{sched}\", \"batch\": {b}, \"seconds_audio\": {}, \
                 \"latency_s\": {secs:.3}, \"audio_s_per_s\": {:.3}, \"forwards\": {forwards}, \
                 \"rescore_forwards\": {rescore}, \"extrapolated\": {extrapolated}, \"threads\": {threads}}}",
                a.size,
                a.seconds,
                a.seconds * b as f64 / secs
            );
        }
    }
    Ok(())
}
