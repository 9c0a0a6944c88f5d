//! Token sampling: greedy, temperature, top-k, top-p, a seeded RNG, and classifier-free guidance.

/// SplitMix64: small, fast, seeded; the same seed gives the same tokens on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sampling parameters, validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature (> 0). Ignored when greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set with cumulative probability ≥ p (0 or 1 = off).
    pub top_p: f32,
    /// Take the argmax.
    pub greedy: bool,
}

impl Default for SamplingParams {
    /// MusicGen's defaults: top-k 250, temperature 1.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 250,
            top_p: 0.0,
            greedy: false,
        }
    }
}

impl SamplingParams {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.temperature.is_finite() || self.temperature <= 0.0 || self.temperature > 100.0 {
            return Err((
                "temperature",
                format!("{} is outside (0, 100]", self.temperature),
            ));
        }
        if !self.top_p.is_finite() || !(0.0..=1.0).contains(&self.top_p) {
            return Err(("top_p", format!("{} is outside [0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// `uncond + scale * (cond - uncond)`, elementwise (transformers'
/// `ClassifierFreeGuidanceLogitsProcessor`; audiocraft `LMModel._sample_next_token`).
pub fn cfg_combine(cond: &[f32], uncond: &[f32], scale: f32, out: &mut [f32]) {
    for ((o, c), u) in out.iter_mut().zip(cond).zip(uncond) {
        *o = u + scale * (c - u);
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Draws one token from `logits` with `params`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> usize {
    if params.greedy || params.top_k == 1 {
        return argmax(logits);
    }
    let t = params.temperature;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let desc = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if params.top_k > 0 && params.top_k < idx.len() {
        // Partition out the k best first (linear), then sort only those.
        idx.select_nth_unstable_by(params.top_k - 1, desc);
        idx.truncate(params.top_k);
    }
    idx.sort_unstable_by(desc);
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / t) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p > 0.0 && params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut r = rng.next_f64();
    for (i, p) in probs.iter().enumerate() {
        if r < *p {
            return idx[i];
        }
        r -= p;
    }
    idx[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_k_one_are_argmax() {
        let l = [0.1, 3.0, 2.0, 3.0];
        let mut rng = Rng::new(1);
        assert_eq!(
            sample(
                &l,
                &SamplingParams {
                    greedy: true,
                    ..Default::default()
                },
                &mut rng
            ),
            1
        );
        assert_eq!(
            sample(
                &l,
                &SamplingParams {
                    top_k: 1,
                    ..Default::default()
                },
                &mut rng
            ),
            1
        );
    }

    #[test]
    fn top_k_restricts_and_seed_reproduces() {
        let l: Vec<f32> = (0..100).map(|i| (i % 7) as f32).collect();
        let p = SamplingParams {
            top_k: 3,
            ..Default::default()
        };
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..200 {
            let x = sample(&l, &p, &mut a);
            assert_eq!(l[x], 6.0);
            assert_eq!(x, sample(&l, &p, &mut b));
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let l = [10.0, 9.9, -10.0, -10.0];
        let p = SamplingParams {
            top_k: 0,
            top_p: 0.9,
            ..Default::default()
        };
        let mut rng = Rng::new(3);
        for _ in 0..100 {
            assert!(sample(&l, &p, &mut rng) < 2);
        }
    }

    #[test]
    fn cfg_matches_formula() {
        let mut out = [0.0; 2];
        cfg_combine(&[1.0, 2.0], &[0.0, 4.0], 3.0, &mut out);
        assert_eq!(out, [3.0, -2.0]);
    }

    #[test]
    fn validation_names_fields() {
        let p = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().0, "temperature");
        let p = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        assert_eq!(p.validate().unwrap_err().0, "top_p");
    }
}
