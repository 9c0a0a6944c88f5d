//! Beam search over the parallel decoder's outputs with n-gram shallow fusion: FunASR's
//! `BeamSearchPara` (`funasr/models/paraformer/search.py`, used by `Paraformer.inference` when an
//! LM or CTC weight is set) with ESPnet's `NgramFullScorer` and `LengthBonus` as its scorers.
//!
//! The decoder has already scored every position (one log-softmax row per CIF token); the search
//! walks the positions left to right. At position `i` each running hypothesis extends by every
//! token with `hyp.score + am[i][tok] + ngram_weight · log10 P_ngram(tok | hyp) + penalty`; each
//! hypothesis proposes its best `beam_size`, and the best `beam_size` of all survive. A
//! hypothesis that picks `</s>` ends there; at the last position `</s>` is appended to all
//! (without a score, as the reference). End detection is ESPnet's `end_detect` (M = 3,
//! D_end = log(e^-10)), as with the reference's default `maxlenratio = 0`.
//!
//! With `ctc_weight > 0` and a checkpoint that has its CTC layer, ESPnet's `CTCPrefixScorer`
//! joins as a partial scorer (FunASR's `decoding_ctc_weight`): each hypothesis first keeps its
//! `int(1.5 · beam_size)` best tokens by the full scores (pre-beam), and those get
//! `ctc_weight · (log ψ(prefix + token) − log ψ(prefix))`, the CTC prefix probability of
//! Watanabe et al. 2017, Algorithm 2 (`CTCPrefixScore`).

use std::cmp::Ordering;
use std::sync::Arc;

use crate::ngram::NgramLm;

/// How the decoder's outputs become tokens.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Hypotheses kept per position (FunASR `beam_size`).
    pub beam_size: usize,
    /// The n-gram LM (FunASR/ESPnet `ngram_file`); beam search runs only when it is set and
    /// `ngram_weight > 0` (as `Paraformer.inference` runs it only with an LM or CTC weight).
    pub ngram: Option<Arc<NgramLm>>,
    /// Weight of the LM's log10 probabilities (`ngram_weight`).
    pub ngram_weight: f32,
    /// Score added per emitted token (`penalty`, ESPnet's length bonus).
    pub penalty: f32,
    /// Weight of the CTC prefix score (`decoding_ctc_weight`); needs the checkpoint's CTC layer.
    pub ctc_weight: f32,
    /// VTLN warp factors tried per utterance by whole-utterance recognition (`vtln_warps`;
    /// empty: the frontend as it is). See [`crate::Paraformer::recognize`].
    pub vtln_warps: Vec<f32>,
}

impl Default for DecodeOptions {
    /// Greedy: the argmax of every position (no LM).
    fn default() -> Self {
        DecodeOptions {
            beam_size: 1,
            ngram: None,
            ngram_weight: 0.0,
            penalty: 0.0,
            ctc_weight: 0.0,
            vtln_warps: Vec::new(),
        }
    }
}

impl DecodeOptions {
    /// True when decoding runs the beam search: an LM with a positive weight, or a positive
    /// CTC weight (`has_ctc`: the model has its CTC layer), as `Paraformer.inference` decides.
    pub fn uses_beam_search(&self, has_ctc: bool) -> bool {
        (self.ngram.is_some() && self.ngram_weight > 0.0) || (has_ctc && self.ctc_weight > 0.0)
    }
}

const LOGZERO: f32 = -1e10;

/// numpy's `logaddexp` in f32.
fn logaddexp(a: f32, b: f32) -> f32 {
    if a == b {
        return a + std::f32::consts::LN_2;
    }
    let m = a.max(b);
    m + (-(a - b).abs()).exp().ln_1p()
}

/// ESPnet's `CTCPrefixScore` over one utterance's CTC log-probabilities (`frames × vocab`).
struct CtcPrefix<'a> {
    x: &'a [f32],
    vocab: usize,
    frames: usize,
    blank: usize,
    eos: usize,
}

/// A hypothesis' CTC state: its prefix score and `r[t] = (log r_t^n, log r_t^b)`.
#[derive(Debug, Clone, PartialEq)]
struct CtcState {
    score: f32,
    r: Vec<[f32; 2]>,
}

impl CtcPrefix<'_> {
    fn lp(&self, t: usize, c: usize) -> f32 {
        self.x[t * self.vocab + c]
    }

    /// The state of `<sos>` alone: all-blank paths.
    fn initial(&self) -> CtcState {
        let mut r = vec![[LOGZERO, LOGZERO]; self.frames];
        if self.frames > 0 {
            r[0][1] = self.lp(0, self.blank);
            for t in 1..self.frames {
                r[t][1] = r[t - 1][1] + self.lp(t, self.blank);
            }
        }
        CtcState { score: 0.0, r }
    }

    /// Prefix scores and states of `prefix + c` for each `c` of `cs` (`prefix` without `<sos>`).
    fn extend(&self, prefix: &[u32], cs: &[usize], prev: &CtcState) -> Vec<CtcState> {
        let out_len = prefix.len();
        let t_n = self.frames;
        let r_sum: Vec<f32> = prev.r.iter().map(|r| logaddexp(r[0], r[1])).collect();
        let last = prefix.last().map(|&l| l as usize);
        cs.iter()
            .map(|&c| {
                let mut r = vec![[LOGZERO, LOGZERO]; t_n];
                if t_n == 0 {
                    return CtcState { score: LOGZERO, r };
                }
                if out_len == 0 {
                    r[0] = [self.lp(0, c), LOGZERO];
                } else if out_len - 1 < t_n {
                    r[out_len - 1] = [LOGZERO, LOGZERO];
                }
                // log phi: paths of the prefix that may be followed by c
                let phi = |t: usize| -> f32 {
                    if last == Some(c) {
                        prev.r[t][1]
                    } else {
                        r_sum[t]
                    }
                };
                let start = out_len.max(1);
                let mut log_psi = if start - 1 < t_n {
                    r[start - 1][0]
                } else {
                    LOGZERO
                };
                for t in start..t_n {
                    let xc = self.lp(t, c);
                    r[t][0] = logaddexp(r[t - 1][0], phi(t - 1)) + xc;
                    r[t][1] = logaddexp(r[t - 1][0], r[t - 1][1]) + self.lp(t, self.blank);
                    log_psi = logaddexp(log_psi, phi(t - 1) + xc);
                }
                if c == self.eos {
                    log_psi = r_sum[t_n - 1];
                }
                if c == self.blank {
                    log_psi = LOGZERO;
                }
                CtcState { score: log_psi, r }
            })
            .collect()
    }
}

/// One hypothesis: its tokens (without `<s>`; an ended one ends with `</s>`), its total score and,
/// with CTC scoring, its CTC prefix state.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyp {
    /// Token ids after `<s>` (an ended hypothesis ends with `</s>`).
    pub tokens: Vec<u32>,
    /// Weighted total score.
    pub score: f32,
    ctc: Option<CtcState>,
}

/// Run the search over `am` (`positions × vocab` log-probabilities, row-major) and, with
/// `opts.ctc_weight > 0`, the CTC log-probabilities `ctc` (`frames × vocab`). Returns the ended
/// hypotheses, best first (empty only when `am` is).
pub fn beam_search(
    am: &[f32],
    vocab: usize,
    eos: u32,
    opts: &DecodeOptions,
    ctc: Option<&[f32]>,
) -> Vec<Hyp> {
    let positions = am.len().checked_div(vocab).unwrap_or(0);
    let beam = opts.beam_size.max(1);
    let scorer = ctc.filter(|_| opts.ctc_weight > 0.0).map(|x| CtcPrefix {
        x,
        vocab,
        frames: x.len().checked_div(vocab).unwrap_or(0),
        blank: 0,
        eos: eos as usize,
    });
    // FunASR's pre-beam (`pre_beam_score_key = "full"`) runs only with a partial scorer (CTC)
    let pre_beam = (beam * 3 / 2).min(vocab);
    let do_pre_beam = scorer.is_some() && pre_beam < vocab;
    let mut running = vec![Hyp {
        tokens: Vec::new(),
        score: 0.0,
        ctc: scorer.as_ref().map(CtcPrefix::initial),
    }];
    let mut ended: Vec<Hyp> = Vec::new();
    let mut weighted = vec![0f32; vocab];
    let mut order: Vec<usize> = (0..vocab).collect();
    for i in 0..positions {
        let row = &am[i * vocab..(i + 1) * vocab];
        let mut best: Vec<Hyp> = Vec::with_capacity(2 * beam);
        for hyp in &running {
            // the reference's order of sums: am, then its full scorers in insertion order
            // (length_bonus, ngram), the partial scorer (ctc), then the hypothesis' score, in f32
            weighted.copy_from_slice(row);
            if opts.penalty != 0.0 {
                weighted.iter_mut().for_each(|w| *w += opts.penalty);
            }
            if let Some(lm) = opts.ngram.as_ref().filter(|_| opts.ngram_weight != 0.0) {
                let s = lm.scores(&lm.context(&hyp.tokens));
                for (w, l) in weighted.iter_mut().zip(&s) {
                    *w += opts.ngram_weight * l;
                }
            }
            // the partial scorer (CTC) scores every token, or the pre-beam's best (torch.topk:
            // descending); the others cannot be chosen
            let mut states: Vec<Option<CtcState>> = Vec::new();
            if let (Some(sc), Some(prev)) = (&scorer, &hyp.ctc) {
                let cands: Vec<usize> = if do_pre_beam {
                    top_k(&mut order, &weighted, pre_beam)
                } else {
                    (0..vocab).collect()
                };
                states = vec![None; vocab];
                for (&c, st) in cands.iter().zip(sc.extend(&hyp.tokens, &cands, prev)) {
                    weighted[c] += opts.ctc_weight * (st.score - prev.score);
                    states[c] = Some(st);
                }
                for (w, _) in weighted
                    .iter_mut()
                    .zip(&states)
                    .filter(|(_, st)| st.is_none())
                {
                    *w = f32::NEG_INFINITY;
                }
            }
            weighted.iter_mut().for_each(|w| *w += hyp.score);
            for j in top_k(&mut order, &weighted, beam.min(vocab)) {
                let mut tokens = hyp.tokens.clone();
                tokens.push(j as u32);
                best.push(Hyp {
                    tokens,
                    score: weighted[j],
                    ctc: states.get_mut(j).and_then(Option::take),
                });
            }
            // sort and prune (a stable sort, as Python's sorted)
            best.sort_by(|a, b| desc(a.score, b.score));
            best.truncate(beam);
        }
        // post_process: </s> everywhere at the last position; ended hypotheses move out
        if i + 1 == positions {
            for h in &mut best {
                h.tokens.push(eos);
            }
        }
        running = Vec::with_capacity(best.len());
        for h in best {
            if h.tokens.last() == Some(&eos) {
                ended.push(h);
            } else {
                running.push(h);
            }
        }
        if end_detect(&ended, i) || running.is_empty() {
            break;
        }
    }
    ended.sort_by(|a, b| desc(a.score, b.score));
    ended
}

/// The indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(order: &mut [usize], values: &[f32], k: usize) -> Vec<usize> {
    order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| desc(values[a], values[b]).then(a.cmp(&b)));
    order[..k].sort_by(|&a, &b| desc(values[a], values[b]).then(a.cmp(&b)));
    order[..k].to_vec()
}

fn desc(a: f32, b: f32) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

/// ESPnet `end_detect` (Watanabe et al. 2017, eq. 50): stop when, for each of the last M
/// lengths, the best ended hypothesis of that length is far below the best overall. Lengths
/// count `<s>` and `</s>`, as the reference's `yseq`.
fn end_detect(ended: &[Hyp], i: usize) -> bool {
    const M: usize = 3;
    let d_end = -10.0f32; // log(1 · e^-10)
    let Some(best) = ended.iter().map(|h| h.score).reduce(f32::max) else {
        return false;
    };
    let mut count = 0;
    for m in 0..M {
        let Some(len) = i.checked_sub(m) else {
            continue;
        };
        let same = ended
            .iter()
            .filter(|h| h.tokens.len() + 1 == len)
            .map(|h| h.score)
            .reduce(f32::max);
        if let Some(s) = same
            && s - best < d_end
        {
            count += 1;
        }
    }
    count == M
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &[f32]) -> Vec<f32> {
        let m = v.iter().cloned().fold(f32::MIN, f32::max);
        let z: f32 = v.iter().map(|x| (x - m).exp()).sum();
        v.iter().map(|x| x - m - z.ln()).collect()
    }

    #[test]
    fn without_lm_the_best_hypothesis_is_the_argmax_path() {
        let am: Vec<f32> = [row(&[0., 0., -9., 2., 1.]), row(&[0., 0., -9., 1., 3.])].concat();
        let opts = DecodeOptions {
            beam_size: 3,
            ..Default::default()
        };
        let hyps = beam_search(&am, 5, 2, &opts, None);
        assert_eq!(hyps[0].tokens, vec![3, 4, 2]);
        let want = am[3] + am[5 + 4];
        assert!((hyps[0].score - want).abs() < 1e-5);
        assert!(hyps.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(beam_search(&[], 5, 2, &opts, None).is_empty());
    }

    #[test]
    fn the_lm_can_overrule_a_close_acoustic_choice() {
        // tokens: <blank> <s> </s> a b ; the LM strongly prefers "b" after "a"
        let arpa = "\\data\\\nngram 1=4\nngram 2=2\n\n\\1-grams:\n-99\t<s>\t0\n-0.3\ta\t0\n\
            -0.3\tb\t0\n-2\t</s>\n\n\\2-grams:\n-0.01\ta b\n-3\ta a\n\n\\end\\\n";
        let toks: Vec<String> = ["<blank>", "<s>", "</s>", "a", "b"]
            .map(String::from)
            .to_vec();
        let lm = Arc::new(NgramLm::from_arpa(arpa, &toks).unwrap());
        let am: Vec<f32> = [
            row(&[-9., -9., -9., 3., 0.]),
            row(&[-9., -9., -9., 1.0, 0.8]),
        ]
        .concat();
        let greedy = beam_search(&am, 5, 2, &DecodeOptions::default(), None);
        assert_eq!(greedy[0].tokens, vec![3, 3, 2]);
        let opts = DecodeOptions {
            beam_size: 4,
            ngram: Some(lm),
            ngram_weight: 1.0,
            penalty: 0.0,
            ctc_weight: 0.0,
            vtln_warps: Vec::new(),
        };
        assert!(opts.uses_beam_search(false));
        let fused = beam_search(&am, 5, 2, &opts, None);
        assert_eq!(fused[0].tokens, vec![3, 4, 2]);
    }
}
