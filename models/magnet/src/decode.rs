//! MAGNeT's iterative decoding as a step-wise state machine, following audiocraft 1.3.0
//! `models/lm_magnet.py` (`MagnetLMModel._generate_magnet`, `_generate_stage`,
//! `_least_probable_span_masking`, `_construct_spans_mask`) operation by operation, including its
//! float32 arithmetic where it decides integers (mask counts) and its tie-free orderings.
//! Paper: Ziv et al., "Masked Audio Generation using a Single Non-Autoregressive Transformer",
//! arXiv 2401.04577, §3.2 (inference) and §3.3 (rescoring).
//!
//! One [`MagnetGeneration::step`] is one decoding iteration: re-mask the least confident spans of
//! the current stage, one forward pass of the (cond, uncond) rows, CFG with annealed coefficient,
//! temperature-annealed softmax, sample (or argmax) the masked positions, score them. For
//! batching across sessions a worker can split the step into [`MagnetGeneration::prepare`] (the
//! input tokens), its own forward pass ([`MagnetLm::forward_stage`]) and
//! [`MagnetGeneration::finish`].

use cadenza_nn::sampling::{Rng, argmax};
use cadenza_nn::transformer::CrossKv;
use candle_core::{Result, Tensor, bail};

use crate::MagnetLm;

/// audiocraft's `DONT_REMASK_ME_SCORE`: the score of spans that must not be re-masked.
const DONT_REMASK_ME_SCORE: f32 = -1e4;

/// How masking spans are laid out (`span_arrangement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanArrangement {
    /// Non-overlapping spans of `span_len` frames ('nonoverlap', the default); the sequence is
    /// trimmed to a multiple of `span_len`.
    NonOverlap,
    /// Overlapping spans at every frame ('stride1'), chosen by `_least_probable_span_masking`.
    Stride1,
}

/// How a non-overlapping span's score is computed from its tokens' probabilities
/// (`span_scoring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanScoring {
    /// `1 - max p` ('max', the default).
    Max,
    /// `sum -log p` ('prod').
    Prod,
}

/// Decoding settings. `Default` = the `MAGNeT.set_generation_params` defaults of audiocraft
/// 1.3.0 `models/magnet.py` (with `_generate_magnet`'s `anneal_temp=True`, `span_scoring='max'`).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeParams {
    /// Total frames of the sequence, prompt included (`max_gen_len`); trimmed to a multiple of
    /// `span_len` with non-overlapping spans.
    pub frames: usize,
    /// Iterations per stage (codebook); one entry per codebook.
    pub decoding_steps: Vec<usize>,
    /// Initial softmax temperature.
    pub temperature: f32,
    /// Linearly decay the temperature to 0 within each stage.
    pub anneal_temp: bool,
    /// Top-k sampling (0 = off); used when `top_p` is 0.
    pub top_k: usize,
    /// Top-p sampling (0 = off); takes precedence over `top_k`.
    pub top_p: f32,
    /// Argmax instead of sampling (`use_sampling=False`).
    pub greedy: bool,
    /// CFG coefficient when everything is masked.
    pub max_cfg_coef: f32,
    /// CFG coefficient when nothing is masked.
    pub min_cfg_coef: f32,
    /// Run the unconditional row (classifier-free guidance). audiocraft always does when
    /// conditions are given (and has a bug path without).
    pub cfg: bool,
    /// Span layout.
    pub span_arrangement: SpanArrangement,
    /// Span scoring (non-overlapping spans only; token scores are always `-log p`).
    pub span_scoring: SpanScoring,
    /// RNG seed for sampling.
    pub seed: u64,
    /// Codes `[K][P]` to continue from (never re-masked); `P < frames`.
    pub prompt: Option<Vec<Vec<u32>>>,
}

impl Default for DecodeParams {
    fn default() -> Self {
        Self {
            frames: 500,
            decoding_steps: vec![20, 10, 10, 10],
            temperature: 3.0,
            anneal_temp: true,
            top_k: 0,
            top_p: 0.9,
            greedy: false,
            max_cfg_coef: 10.0,
            min_cfg_coef: 1.0,
            cfg: true,
            span_arrangement: SpanArrangement::NonOverlap,
            span_scoring: SpanScoring::Max,
            seed: 0,
            prompt: None,
        }
    }
}

/// What one decoding iteration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepInfo {
    /// Stage (codebook) of the iteration.
    pub stage: usize,
    /// Iteration within the stage.
    pub iteration: usize,
    /// Iterations of that stage.
    pub stage_iterations: usize,
    /// Positions that were masked and got a token.
    pub filled: usize,
    /// Whether the whole sequence is decided.
    pub done: bool,
}

/// Which masking code path `_generate_stage` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Masking {
    /// `chunk_masking`: non-overlapping spans, span-wise scores.
    Chunks,
    /// `run_lps_masking`: overlapping spans over token scores.
    Lps,
    /// `span_len == 1`: token-wise top-k.
    Tokens,
}

/// The result of the last iteration, turned into re-masking scores by the next one (so that
/// [`MagnetGeneration::rescore`] can combine a rescorer's probabilities in between).
#[derive(Debug, Clone)]
struct Pending {
    /// Probability (under MAGNeT) of the sampled token at every position.
    probs: Vec<f32>,
    /// Positions that were masked in that iteration (and got the sampled token).
    filled: Vec<bool>,
}

/// One session of MAGNeT decoding (B = 1; two forward rows with CFG). Cloning is cheap (the
/// conditioning K/V are shared tensors): a worker can snapshot a session before a batched step
/// and restore it if the step fails half-way.
#[derive(Debug, Clone)]
pub struct MagnetGeneration {
    frames: Vec<Vec<u32>>,
    prompt: Vec<Vec<u32>>,
    cross: Vec<CrossKv>,
    params: DecodeParams,
    masking: Masking,
    span_len: usize,
    mask_id: u32,
    card: usize,
    stage: usize,
    iteration: usize,
    iterations_done: usize,
    /// Span (chunk) or token scores of the current stage.
    scores: Vec<f32>,
    /// Chunks masked by the current iteration (chunk path).
    chunks_mask: Vec<bool>,
    /// Mask probability of the current iteration (between `prepare` and `finish`).
    mask_p: Option<f32>,
    pending: Option<Pending>,
    rng: Rng,
    /// Guided logits of the stage from the last iteration, `[T][card]` (parity checks).
    pub last_logits: Vec<Vec<f32>>,
}

/// `torch.linspace(0, 1, n)[i]` in float32 (ATen's CPU kernel: `start + step * i` in the
/// first half, `end - step * (n - 1 - i)` in the second).
fn linspace01(n: usize, i: usize) -> f32 {
    if n <= 1 {
        return 0.0;
    }
    let step = 1.0f32 / (n - 1) as f32;
    if i < n / 2 {
        step * i as f32
    } else {
        1.0 - step * (n - 1 - i) as f32
    }
}

/// Python's `round` (half to even) of `(a + b) / 2` for non-negative integers.
fn round_half(a: usize, b: usize) -> usize {
    let s = a + b;
    if s.is_multiple_of(2) {
        s / 2
    } else {
        let lo = s / 2;
        if lo.is_multiple_of(2) { lo } else { lo + 1 }
    }
}

/// Indices of `v` sorted by decreasing value, ties by increasing index.
fn sorted_desc(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx
}

/// `_construct_spans_mask`: spans of `len` starting at `starts`, over `t` frames.
fn spans_mask(starts: &[usize], len: usize, t: usize) -> Vec<bool> {
    let mut m = vec![false; t];
    for &s in starts {
        for p in s..(s + len).min(t) {
            m[p] = true;
        }
    }
    m
}

/// `_least_probable_span_masking`: the `u` overlapping spans of highest total score whose union
/// has about `target` frames, `u` found by audiocraft's binary search (returned as it returns
/// it: the last mask it built).
fn least_probable_spans(scores: &[f32], target: usize, len: usize) -> Vec<bool> {
    let t = scores.len();
    let n_spans = (t + 1).saturating_sub(len);
    let span_scores: Vec<f32> = (0..n_spans)
        .map(|s| scores[s..s + len].iter().fold(0.0f32, |a, &x| a + x))
        .collect();
    let order = sorted_desc(&span_scores);
    let prefix = |m: usize| &order[..m.min(order.len())];
    let target = target.max(len);
    let (mut lo, mut hi) = (target / len, target + 1 - len);
    let mut mid = round_half(lo, hi);
    if mid == lo || mid == hi {
        return spans_mask(prefix(mid), len, t);
    }
    let mut mask = Vec::new();
    while mid > lo && mid < hi {
        mask = spans_mask(prefix(mid), len, t);
        let n = mask.iter().filter(|&&b| b).count();
        if n > target {
            hi = mid;
        } else {
            lo = mid;
        }
        mid = round_half(lo, hi);
    }
    mask
}

/// Top-`k` indices by decreasing score (ties by index; fixtures are checked tie-free).
fn topk(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx = sorted_desc(scores);
    idx.truncate(k);
    idx
}

/// `utils.sample_top_p` / `sample_top_k` / `multinomial` on one probability row.
fn sample_probs(probs: &[f32], top_k: usize, top_p: f32, rng: &mut Rng) -> usize {
    let mut w: Vec<(usize, f64)> = probs.iter().map(|&p| p as f64).enumerate().collect();
    if top_p > 0.0 {
        w.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut cum = 0.0;
        for e in w.iter_mut() {
            cum += e.1;
            // mask = probs_sum - probs_sort > p
            if cum - e.1 > top_p as f64 {
                e.1 = 0.0;
            }
        }
    } else if top_k > 0 {
        let mut sorted: Vec<f64> = w.iter().map(|e| e.1).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let min = sorted[top_k.min(sorted.len()) - 1];
        w.iter_mut().filter(|e| e.1 < min).for_each(|e| e.1 = 0.0);
    }
    let total: f64 = w.iter().map(|e| e.1).sum();
    let mut r = rng.next_f64() * total;
    let mut last = w[0].0;
    for &(i, p) in &w {
        if p > 0.0 {
            last = i;
            if r < p {
                return i;
            }
            r -= p;
        }
    }
    last
}

impl MagnetGeneration {
    /// Starts a session from conditioning `cond` (1, L, D) (see [`MagnetLm::condition`]);
    /// `cross_mask` (1, L) masks padded text positions in cross-attention (audiocraft does not:
    /// pass `None` for parity with its checkpoints). The unconditional row is zero conditioning,
    /// which is what audiocraft's null condition (`ClassifierFreeGuidanceDropout(p=1)`) makes.
    pub fn new(
        model: &MagnetLm,
        cond: &Tensor,
        cross_mask: Option<&Tensor>,
        params: DecodeParams,
    ) -> Result<Self> {
        let k = model.num_codebooks();
        let card = model.card();
        let span_len = model.config.span_len;
        if params.decoding_steps.len() != k || params.decoding_steps.contains(&0) {
            bail!("magnet: decoding_steps needs {k} positive entries (one per codebook)")
        }
        // Only the restricted stage masks have a fixed size in the reference.
        if model.config.subcodes_context.is_some() && params.frames > model.config.max_frames {
            bail!(
                "magnet: {} frames requested, the model runs at most {} (frame rate x segment_duration)",
                params.frames,
                model.config.max_frames
            )
        }
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            bail!("magnet: temperature must be finite and non-negative")
        }
        if !(0.0..=1.0).contains(&params.top_p) {
            bail!("magnet: top_p must be in [0, 1]")
        }
        let prompt = params.prompt.clone().unwrap_or_else(|| vec![Vec::new(); k]);
        let p = prompt.first().map_or(0, Vec::len);
        if prompt.len() != k || prompt.iter().any(|r| r.len() != p) {
            bail!("magnet: the prompt must have {k} codebooks of equal length")
        }
        if prompt.iter().flatten().any(|&c| c as usize >= card) {
            bail!("magnet: prompt codes must be below {card}")
        }
        if p >= params.frames {
            bail!(
                "magnet: the prompt ({p} frames) must be shorter than the sequence ({})",
                params.frames
            )
        }
        let masking = match (span_len > 1, params.span_arrangement) {
            (true, SpanArrangement::NonOverlap) => Masking::Chunks,
            (true, SpanArrangement::Stride1) => Masking::Lps,
            (false, _) => Masking::Tokens,
        };
        // `_generate_stage`: with chunk masking, T is trimmed to a multiple of span_len.
        let t = if masking == Masking::Chunks {
            params.frames / span_len * span_len
        } else {
            params.frames
        };
        if p >= t {
            bail!("magnet: the prompt ({p} frames) leaves nothing to generate in {t} frames")
        }
        let mask_id = model.mask_id();
        let frames = prompt
            .iter()
            .map(|r| {
                let mut f = r.clone();
                f.resize(t, mask_id);
                f
            })
            .collect();
        let cond = if params.cfg {
            Tensor::cat(&[cond, &cond.zeros_like()?], 0)?
        } else {
            cond.clone()
        };
        let cross_mask = match (cross_mask, params.cfg) {
            (Some(m), true) => Some(Tensor::cat(&[m, &m.zeros_like()?], 0)?),
            (m, _) => m.cloned(),
        };
        let cross = model.cross(&cond, cross_mask.as_ref())?;
        let rng = Rng::new(params.seed);
        let mut g = Self {
            frames,
            prompt,
            cross,
            params,
            masking,
            span_len,
            mask_id,
            card,
            stage: 0,
            iteration: 0,
            iterations_done: 0,
            scores: Vec::new(),
            chunks_mask: Vec::new(),
            mask_p: None,
            pending: None,
            rng,
            last_logits: Vec::new(),
        };
        g.start_stage();
        Ok(g)
    }

    /// Starts a session that continues an autoregressively generated prefix (hybrid decoding):
    /// `prefix` `[K][P]` becomes the prompt, never re-masked. audiocraft 1.3.0 has no hybrid
    /// code; the paper (arXiv 2401.04577 §3.4) decodes the first seconds autoregressively and
    /// the rest with MAGNeT given that prefix, which is MAGNeT's prompt (continuation) path.
    pub fn from_ar_prefix(
        model: &MagnetLm,
        cond: &Tensor,
        cross_mask: Option<&Tensor>,
        prefix: &[Vec<u32>],
        params: DecodeParams,
    ) -> Result<Self> {
        let params = DecodeParams {
            prompt: Some(prefix.to_vec()),
            ..params
        };
        Self::new(model, cond, cross_mask, params)
    }

    fn prompt_len(&self) -> usize {
        self.prompt.first().map_or(0, Vec::len)
    }

    fn seq_len(&self) -> usize {
        self.frames[0].len()
    }

    /// Resets the per-stage state (`_generate_stage` prologue).
    fn start_stage(&mut self) {
        let (t, p, l) = (self.seq_len(), self.prompt_len(), self.span_len);
        let s = self.stage;
        if s >= self.frames.len() {
            return;
        }
        // stage_gen_seq starts fully masked; the prompt is restored at every iteration.
        self.frames[s][p..].fill(self.mask_id);
        self.scores = match self.masking {
            Masking::Chunks => {
                let mut sc = vec![0.0; t / l];
                sc[..p / l].fill(DONT_REMASK_ME_SCORE);
                sc
            }
            _ => {
                let mut sc = vec![0.0; t];
                sc[..p].fill(DONT_REMASK_ME_SCORE);
                sc
            }
        };
        self.chunks_mask = Vec::new();
        self.pending = None;
        self.iteration = 0;
    }

    /// Iterations of the current stage.
    fn stage_iterations(&self) -> usize {
        self.params
            .decoding_steps
            .get(self.stage)
            .copied()
            .unwrap_or(0)
    }

    /// True when every stage is decoded.
    pub fn is_done(&self) -> bool {
        self.stage >= self.frames.len()
    }

    /// The stage (codebook) the next iteration decodes.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// The iteration within the stage the next step runs.
    pub fn iteration(&self) -> usize {
        self.iteration
    }

    /// Iterations done over all stages.
    pub fn iterations_done(&self) -> usize {
        self.iterations_done
    }

    /// Iterations in all (`sum(decoding_steps)`).
    pub fn total_iterations(&self) -> usize {
        self.params.decoding_steps.iter().sum()
    }

    /// Frames of prompt (or AR prefix).
    pub fn prompt_frames(&self) -> usize {
        self.prompt_len()
    }

    /// The current tokens `[K][T]` (the mask id where undecided). After the last step: the
    /// result (`T` trimmed to a multiple of `span_len` with non-overlapping spans).
    pub fn frames(&self) -> &[Vec<u32>] {
        &self.frames
    }

    /// Cross-attention K/V of the session's (cond, uncond) rows.
    pub fn cross(&self) -> &[CrossKv] {
        &self.cross
    }

    /// Forward rows per step (2 with CFG).
    pub fn rows(&self) -> usize {
        if self.params.cfg { 2 } else { 1 }
    }

    /// True between a step and the next one when a rescorer may adjust the re-masking scores
    /// with [`MagnetGeneration::rescore`] (not after the last iteration of a stage, whose
    /// scores audiocraft never uses).
    pub fn awaiting_rescore(&self) -> bool {
        self.pending.is_some()
    }

    /// Model rescoring (paper §3.3): replaces MAGNeT's probability `p` of each token placed by
    /// the last iteration by `magnet_weight * p + (1 - magnet_weight) * p_rescorer` before
    /// the next iteration scores spans for re-masking. `rescorer_probs[t]` is the rescorer's
    /// probability of the token now at frame `t` of the current stage (see
    /// [`crate::rescore::teacher_forced_probs`]). The paper describes a weighted mix of the two
    /// models' probabilities; the exact form and weight (0.7 for MAGNeT is recalled, not
    /// checked against the paper text) are unverified, hence the explicit parameter.
    pub fn rescore(&mut self, rescorer_probs: &[f32], magnet_weight: f32) -> Result<()> {
        let t = self.seq_len();
        let Some(p) = self.pending.as_mut() else {
            bail!("magnet: nothing to rescore (no iteration pending)")
        };
        if rescorer_probs.len() != t {
            bail!(
                "magnet: {} rescorer probabilities for {t} frames",
                rescorer_probs.len()
            )
        }
        if !(0.0..=1.0).contains(&magnet_weight) {
            bail!("magnet: rescoring weight must be in [0, 1]")
        }
        for (pm, &pr) in p.probs.iter_mut().zip(rescorer_probs) {
            *pm = magnet_weight * *pm + (1.0 - magnet_weight) * pr;
        }
        Ok(())
    }

    /// Turns the pending iteration's probabilities into re-masking scores (the end of the loop
    /// body of `_generate_stage`).
    fn flush_scores(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let l = self.span_len;
        self.scores = match self.masking {
            Masking::Chunks => p
                .probs
                .chunks(l)
                .zip(&self.chunks_mask)
                .map(|(c, &m)| {
                    if !m {
                        return DONT_REMASK_ME_SCORE;
                    }
                    match self.params.span_scoring {
                        SpanScoring::Max => {
                            1.0 - c.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x))
                        }
                        SpanScoring::Prod => c.iter().fold(0.0f32, |a, &x| a + -x.ln()),
                    }
                })
                .collect(),
            _ => p
                .probs
                .iter()
                .zip(&p.filled)
                .map(|(&x, &f)| if f { -x.ln() } else { DONT_REMASK_ME_SCORE })
                .collect(),
        };
    }

    /// First half of an iteration: re-masks the least confident spans of the current stage
    /// and returns the forward input (rows, K, T) (u32; the mask id where masked).
    pub fn prepare(&mut self, model: &MagnetLm) -> Result<Tensor> {
        if self.is_done() {
            bail!("magnet: generation already finished")
        }
        if self.mask_p.is_some() {
            bail!("magnet: prepare called twice without finish")
        }
        self.flush_scores();
        let n = self.stage_iterations();
        let i = self.iteration;
        let (t, p, l, s) = (self.seq_len(), self.prompt_len(), self.span_len, self.stage);
        // mask_p = cos(timestep * pi * 0.5) on a float32 tensor.
        let mask_p = (linspace01(n, i) * std::f32::consts::PI * 0.5).cos();
        let to_gen = match self.masking {
            Masking::Chunks => t / l - p / l,
            _ => t - p,
        };
        let num_masked = ((mask_p * to_gen as f32) as i64).max(1) as usize;
        let seq = &mut self.frames[s];
        match self.masking {
            Masking::Lps => {
                let m = least_probable_spans(&self.scores, num_masked, l);
                for (x, &b) in seq.iter_mut().zip(&m) {
                    if b {
                        *x = self.mask_id;
                    }
                }
            }
            Masking::Chunks => {
                let mut cm = vec![false; self.scores.len()];
                for c in topk(&self.scores, num_masked) {
                    cm[c] = true;
                }
                for (x, &b) in seq.chunks_mut(l).zip(&cm) {
                    if b {
                        x.fill(self.mask_id);
                    }
                }
                self.chunks_mask = cm;
            }
            Masking::Tokens => {
                for c in topk(&self.scores, num_masked) {
                    seq[c] = self.mask_id;
                }
            }
        }
        seq[..p].copy_from_slice(&self.prompt[s]);
        self.mask_p = Some(mask_p);
        let rows = self.rows();
        let k = self.frames.len();
        let flat: Vec<u32> = (0..rows)
            .flat_map(|_| self.frames.iter().flatten().copied())
            .collect();
        Tensor::from_vec(flat, (rows, k, t), model.device())
    }

    /// Second half of an iteration, given the stage logits (rows, T, card) of the input
    /// returned by [`MagnetGeneration::prepare`].
    pub fn finish(&mut self, stage_logits: &Tensor) -> Result<StepInfo> {
        let Some(mask_p) = self.mask_p.take() else {
            bail!("magnet: finish called without prepare")
        };
        let logits = stage_logits.to_vec3::<f32>()?;
        let (t, card) = (self.seq_len(), self.card);
        if logits.len() != self.rows() || logits[0].len() != t || logits[0][0].len() != card {
            bail!(
                "magnet: stage logits must be ({}, {t}, {card})",
                self.rows()
            )
        }
        let n = self.stage_iterations();
        let steps_left = n - 1 - self.iteration;
        // CFG with annealing: coef = mask_p * max + (1 - mask_p) * min (Python floats).
        let mp = mask_p as f64;
        let coef = (mp * self.params.max_cfg_coef as f64
            + (1.0 - mp) * self.params.min_cfg_coef as f64) as f32;
        let temp = if self.params.anneal_temp {
            self.params.temperature as f64 * (steps_left as f64 / n as f64)
        } else {
            self.params.temperature as f64
        };
        let temp = temp.max(1e-2) as f32;
        let s = self.stage;
        let mut probs_of_sampled = vec![0f32; t];
        let mut filled = vec![false; t];
        let mut guided_all = Vec::with_capacity(t);
        let mut n_filled = 0;
        for pos in 0..t {
            let guided: Vec<f32> = if self.params.cfg {
                logits[0][pos]
                    .iter()
                    .zip(&logits[1][pos])
                    .map(|(&c, &u)| u + (c - u) * coef)
                    .collect()
            } else {
                logits[0][pos].clone()
            };
            // softmax(logits / t) in float32.
            let scaled: Vec<f32> = guided.iter().map(|&x| x / temp).collect();
            let max = scaled.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let exps: Vec<f32> = scaled.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let probs: Vec<f32> = exps.iter().map(|&e| e / sum).collect();
            let tok = if self.params.greedy {
                argmax(&guided)
            } else {
                sample_probs(&probs, self.params.top_k, self.params.top_p, &mut self.rng)
            };
            probs_of_sampled[pos] = probs[tok];
            if self.frames[s][pos] == self.mask_id {
                self.frames[s][pos] = tok as u32;
                filled[pos] = true;
                n_filled += 1;
            }
            guided_all.push(guided);
        }
        self.last_logits = guided_all;
        let info = StepInfo {
            stage: s,
            iteration: self.iteration,
            stage_iterations: n,
            filled: n_filled,
            done: false,
        };
        self.iterations_done += 1;
        self.iteration += 1;
        if self.iteration >= n {
            self.stage += 1;
            self.start_stage();
        } else {
            self.pending = Some(Pending {
                probs: probs_of_sampled,
                filled,
            });
        }
        Ok(StepInfo {
            done: self.is_done(),
            ..info
        })
    }

    /// One decoding iteration: [`prepare`](Self::prepare), one forward pass of the session's
    /// rows, [`finish`](Self::finish).
    pub fn step(&mut self, model: &MagnetLm) -> Result<StepInfo> {
        let input = self.prepare(model)?;
        let logits = model.forward_stage(&input, &self.cross, self.stage)?;
        self.finish(&logits)
    }

    /// One decoding iteration for several sessions in one forward pass: their inputs are
    /// stacked (every session's rows back to back), their conditionings concatenated with
    /// padding masked out ([`CrossKv::concat`]), and each session finishes on its own rows, so
    /// the tokens are those of stepping each alone (up to float rounding in the matmuls).
    /// All sessions must be at the same stage with the same sequence length (the stage's
    /// attention mask and the input shape are shared). If an error occurs, sessions may be left
    /// half-stepped: keep a clone to restore.
    pub fn step_batch(
        model: &MagnetLm,
        gens: &mut [&mut MagnetGeneration],
    ) -> Result<Vec<StepInfo>> {
        let Some(first) = gens.first() else {
            return Ok(Vec::new());
        };
        let (stage, t) = (first.stage, first.seq_len());
        if gens
            .iter()
            .any(|g| g.is_done() || g.stage != stage || g.seq_len() != t)
        {
            bail!(
                "magnet: a batched iteration needs unfinished sessions at the same stage and length"
            )
        }
        if gens.len() == 1 {
            return Ok(vec![gens[0].step(model)?]);
        }
        let inputs = gens
            .iter_mut()
            .map(|g| g.prepare(model))
            .collect::<Result<Vec<_>>>()?;
        let input = Tensor::cat(&inputs, 0)?;
        let cross = (0..first_layers(gens))
            .map(|l| CrossKv::concat(&gens.iter().map(|g| &g.cross[l]).collect::<Vec<_>>()))
            .collect::<Result<Vec<_>>>()?;
        let logits = model.forward_stage(&input, &cross, stage)?;
        let mut row = 0;
        let mut out = Vec::with_capacity(gens.len());
        for g in gens.iter_mut() {
            let r = g.rows();
            out.push(g.finish(&logits.narrow(0, row, r)?)?);
            row += r;
        }
        Ok(out)
    }
}

fn first_layers(gens: &[&mut MagnetGeneration]) -> usize {
    gens.first().map_or(0, |g| g.cross.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch() {
        // torch.linspace(0, 1, 7) in float32.
        let want = [0.0, 0.16666667, 0.33333334, 0.5, 0.6666666, 0.8333333, 1.0];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(linspace01(7, i), *w as f32, "index {i}");
        }
        assert_eq!(linspace01(1, 0), 0.0);
    }

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!(round_half(1, 2), 2); // round(1.5) = 2
        assert_eq!(round_half(2, 3), 2); // round(2.5) = 2
        assert_eq!(round_half(3, 4), 4); // round(3.5) = 4
        assert_eq!(round_half(2, 4), 3);
    }

    #[test]
    fn spans_and_lps() {
        assert_eq!(
            spans_mask(&[0, 4], 3, 8),
            vec![true, true, true, false, true, true, true, false]
        );
        // Highest token scores at 5..8: spans starting there come first.
        let mut s = vec![0.1f32; 12];
        s[5] = 3.0;
        s[6] = 3.0;
        s[7] = 3.0;
        let m = least_probable_spans(&s, 3, 3);
        assert_eq!(m.iter().filter(|&&b| b).count(), 3);
        assert!(m[5] && m[6] && m[7]);
    }

    #[test]
    fn top_p_sampling_stays_in_nucleus() {
        let probs = [0.6f32, 0.35, 0.04, 0.01];
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            assert!(sample_probs(&probs, 0, 0.9, &mut rng) < 2);
        }
        for _ in 0..200 {
            assert_eq!(sample_probs(&probs, 1, 0.0, &mut rng), 0);
        }
    }
}
