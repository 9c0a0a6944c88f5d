//! Rescoring inputs (paper arXiv 2401.04577 §3.3): the probabilities an autoregressive
//! MusicGen LM gives a complete token sequence, computed teacher-forced in one forward pass
//! through the delay pattern, for [`crate::MagnetGeneration::rescore`].

use cadenza_musicgen::Lm;
use cadenza_nn::patterns::DelayPattern;
use cadenza_nn::sampling::cfg_combine;
use cadenza_nn::transformer::CrossKv;
use candle_core::{Result, Tensor, bail};

/// `probs[q][t]`: the MusicGen `lm`'s probability (softmax of its logits, CFG-combined with
/// `guidance` when > 1) of token `frames[q][t]` given all earlier frames in the delay
/// `pattern`, for conditioning `cond` (1, L, D) of that model (e.g. `MusicGen::condition`) and
/// its optional cross-attention mask (1, L) (`None` for audiocraft checkpoints). The whole
/// sequence (`T + max_delay` steps, starting from the special token) runs in one causal forward
/// pass: the input at step `s` of codebook `q` is frame `s - 1 - delay[q]`, and the output at step
/// `s` predicts frame `s - delay[q]`, as in `cadenza_musicgen::Generation::step`.
///
/// A code equal to the card (MAGNeT's mask id: codebooks of later stages are still undecided
/// while an earlier stage is rescored) is fed as the rescorer's special token (the embedding it
/// sees before a codebook starts in the delay pattern) and gets probability 0 (not scored).
pub fn teacher_forced_probs(
    lm: &Lm,
    pattern: &DelayPattern,
    cond: &Tensor,
    cross_mask: Option<&Tensor>,
    frames: &[Vec<u32>],
    guidance: f32,
) -> Result<Vec<Vec<f32>>> {
    let cross = rescorer_cross(lm, cond, cross_mask, guidance)?;
    let mut out = teacher_forced_probs_batch(
        lm,
        pattern,
        &[RescoreInput {
            cross: &cross,
            frames,
        }],
        guidance,
    )?;
    Ok(out.remove(0))
}

/// The rescorer's per-layer cross-attention K/V for one session's conditioning `cond`
/// (1, L, D) and optional mask (1, L): two rows (conditional, then the zeroed unconditional
/// one) when `guidance > 1`, else one. Computed once per session and reused by every pass.
pub fn rescorer_cross(
    lm: &Lm,
    cond: &Tensor,
    cross_mask: Option<&Tensor>,
    guidance: f32,
) -> Result<Vec<CrossKv>> {
    if guidance > 1.0 {
        let c = Tensor::cat(&[cond, &cond.zeros_like()?], 0)?;
        let m = cross_mask
            .map(|m| Tensor::cat(&[m, &m.zeros_like()?], 0))
            .transpose()?;
        lm.cross(&c, m.as_ref())
    } else {
        lm.cross(cond, cross_mask)
    }
}

/// One session's input to [`teacher_forced_probs_batch`].
pub struct RescoreInput<'a> {
    /// [`rescorer_cross`] of the session's conditioning (same `guidance`).
    pub cross: &'a [CrossKv],
    /// The session's current frames (`K` rows of equal length; the card = undecided).
    pub frames: &'a [Vec<u32>],
}

/// [`teacher_forced_probs`] for several sessions in one forward pass of the rescorer: every
/// session's rows are stacked (conditioning padded and masked by [`CrossKv::concat`], so each
/// row attends to exactly its own text), and shorter sequences are padded at the end with the
/// special token. The attention is causal, so padding after a session's last step does not
/// change any of its outputs. `out[s][q][t]` is session `s`'s probability of its token
/// `frames[q][t]`.
pub fn teacher_forced_probs_batch(
    lm: &Lm,
    pattern: &DelayPattern,
    inputs: &[RescoreInput<'_>],
    guidance: f32,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let k = lm.num_codebooks();
    let card = lm.card();
    if pattern.num_codebooks() != k {
        bail!(
            "rescore: the pattern has {} codebooks, the rescorer {k}",
            pattern.num_codebooks()
        )
    }
    let cfg = guidance > 1.0;
    let rows = if cfg { 2 } else { 1 };
    let mut steps = Vec::with_capacity(inputs.len());
    for inp in inputs {
        let frames = inp.frames;
        if frames.len() != k {
            bail!(
                "rescore: {} codebooks given, the rescorer has {k}",
                frames.len()
            )
        }
        let t = frames[0].len();
        if frames.iter().any(|f| f.len() != t)
            || frames.iter().flatten().any(|&c| c as usize > card)
        {
            bail!(
                "rescore: frames must be {k} rows of equal length with codes up to {card} (unknown)"
            )
        }
        if inp.cross.len() != lm.num_layers() || inp.cross.iter().any(|c| c.rows() != rows) {
            bail!("rescore: the conditioning needs {rows} rows per layer (guidance {guidance})")
        }
        steps.push(if t == 0 { 0 } else { pattern.steps_for(t) });
    }
    let live: Vec<usize> = (0..inputs.len()).filter(|&i| steps[i] > 0).collect();
    let mut out: Vec<Vec<Vec<f32>>> = inputs
        .iter()
        .map(|i| vec![vec![0f32; i.frames[0].len()]; k])
        .collect();
    let Some(max_steps) = live.iter().map(|&i| steps[i]).max() else {
        return Ok(out);
    };
    let dev = inputs[live[0]].cross[0].device().clone();
    let mut input: Vec<u32> = Vec::with_capacity(live.len() * rows * k * max_steps);
    for &i in &live {
        let frames = inputs[i].frames;
        let col: Vec<u32> = (0..k)
            .flat_map(|q| {
                (0..max_steps).map(move |s| {
                    pattern
                        .input_frame_at(q, s)
                        .and_then(|f| frames[q].get(f).copied())
                        .unwrap_or(card as u32)
                })
            })
            .collect();
        for _ in 0..rows {
            input.extend_from_slice(&col);
        }
    }
    let n = live.len() * rows;
    let input = Tensor::from_vec(input, (n, k, max_steps), &dev)?;
    let cross = (0..lm.num_layers())
        .map(|l| {
            let parts: Vec<&CrossKv> = live.iter().map(|&i| &inputs[i].cross[l]).collect();
            CrossKv::concat(&parts)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut caches = lm.caches(n, max_steps, &dev)?;
    let logits = lm.forward(&input, &mut caches, &cross)?; // (n, K, S, card)
    let mut row = vec![0f32; card];
    for (j, &i) in live.iter().enumerate() {
        let frames = inputs[i].frames;
        let t = frames[0].len();
        let cond_l = logits.get(j * rows)?.to_vec3::<f32>()?;
        let uncond_l = if cfg {
            Some(logits.get(j * rows + 1)?.to_vec3::<f32>()?)
        } else {
            None
        };
        for q in 0..k {
            for s in 0..steps[i] {
                let Some(f) = pattern.frame_at(q, s, t) else {
                    continue;
                };
                match &uncond_l {
                    Some(u) => cfg_combine(&cond_l[q][s], &u[q][s], guidance, &mut row),
                    None => row.copy_from_slice(&cond_l[q][s]),
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
                let code = frames[q][f] as usize;
                if code < card {
                    out[i][q][f] = (row[code] - max).exp() / sum;
                }
            }
        }
    }
    Ok(out)
}
