//! Rescoring inputs (paper arXiv 2401.04577 §3.3): the probabilities an autoregressive
//! MusicGen LM gives a complete token sequence, computed teacher-forced in one forward pass
//! through the delay pattern, for [`crate::MagnetGeneration::rescore`].

use cadenza_musicgen::Lm;
use cadenza_nn::patterns::DelayPattern;
use cadenza_nn::sampling::cfg_combine;
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
    let k = lm.num_codebooks();
    let card = lm.card();
    if frames.len() != k || pattern.num_codebooks() != k {
        bail!(
            "rescore: {} codebooks given, the rescorer has {k}",
            frames.len()
        )
    }
    let t = frames[0].len();
    if frames.iter().any(|f| f.len() != t) || frames.iter().flatten().any(|&c| c as usize > card) {
        bail!("rescore: frames must be {k} rows of equal length with codes up to {card} (unknown)")
    }
    if t == 0 {
        return Ok(vec![Vec::new(); k]);
    }
    let steps = pattern.steps_for(t);
    let cfg = guidance > 1.0;
    let rows = if cfg { 2 } else { 1 };
    let dev = cond.device();
    let col: Vec<u32> = (0..k)
        .flat_map(|q| {
            (0..steps).map(move |s| {
                pattern
                    .input_frame_at(q, s)
                    .and_then(|f| frames[q].get(f).copied())
                    .unwrap_or(card as u32)
            })
        })
        .collect();
    let input: Vec<u32> = (0..rows).flat_map(|_| col.iter().copied()).collect();
    let input = Tensor::from_vec(input, (rows, k, steps), dev)?;
    let (cond, mask) = if cfg {
        (
            Tensor::cat(&[cond, &cond.zeros_like()?], 0)?,
            cross_mask
                .map(|m| Tensor::cat(&[m, &m.zeros_like()?], 0))
                .transpose()?,
        )
    } else {
        (cond.clone(), cross_mask.cloned())
    };
    let cross = lm.cross(&cond, mask.as_ref())?;
    let mut caches = lm.caches(rows, steps, dev)?;
    let logits = lm.forward(&input, &mut caches, &cross)?; // (rows, K, S, card)
    let logits: Vec<Vec<Vec<Vec<f32>>>> = (0..rows)
        .map(|r| logits.get(r)?.to_vec3::<f32>())
        .collect::<Result<_>>()?;
    let mut out = vec![vec![0f32; t]; k];
    let mut row = vec![0f32; card];
    for q in 0..k {
        for s in 0..steps {
            let Some(f) = pattern.frame_at(q, s, t) else {
                continue;
            };
            if cfg {
                cfg_combine(&logits[0][q][s], &logits[1][q][s], guidance, &mut row);
            } else {
                row.copy_from_slice(&logits[0][q][s]);
            }
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
            let code = frames[q][f] as usize;
            if code < card {
                out[q][f] = (row[code] - max).exp() / sum;
            }
        }
    }
    Ok(out)
}
