//! Codebook interleaving patterns: how `K` parallel codebook streams are laid out over LM steps.
//!
//! **Delay** (MusicGen; audiocraft `DelayedPatternProvider`, transformers
//! `build_delay_pattern_mask`): codebook `k` runs `delays[k]` steps behind. The LM input at step
//! `s` for codebook `k` is the token of frame `s - 1 - delays[k]`, or the special token (the
//! codebook size, used as BOS and padding) where that frame does not exist; the output at step
//! `s` predicts frame `s - delays[k]`. **Parallel** (MAGNeT) is the delay pattern with all delays
//! zero. Generating `T` frames takes `T + max(delays)` steps, and frame `t` is complete (usable by
//! the codec) after step `t + max(delays)`.

/// A delay pattern (all zeros = parallel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayPattern {
    delays: Vec<usize>,
}

impl DelayPattern {
    /// MusicGen's pattern for `k` codebooks: delays `0, 1, …, k-1`.
    pub fn musicgen(k: usize) -> Self {
        Self {
            delays: (0..k).collect(),
        }
    }

    /// All codebooks at once.
    pub fn parallel(k: usize) -> Self {
        Self { delays: vec![0; k] }
    }

    /// Explicit delays (audiocraft's `delays` config).
    pub fn new(delays: Vec<usize>) -> Self {
        Self { delays }
    }

    /// Number of codebooks.
    pub fn num_codebooks(&self) -> usize {
        self.delays.len()
    }

    /// The largest delay.
    pub fn max_delay(&self) -> usize {
        self.delays.iter().copied().max().unwrap_or(0)
    }

    /// LM steps needed for `frames` frames.
    pub fn steps_for(&self, frames: usize) -> usize {
        frames + self.max_delay()
    }

    /// Frame predicted for codebook `k` at step `s`, if any (of `frames`).
    pub fn frame_at(&self, k: usize, step: usize, frames: usize) -> Option<usize> {
        step.checked_sub(self.delays[k]).filter(|&t| t < frames)
    }

    /// Frame whose token is the input of codebook `k` at step `s`, if any.
    pub fn input_frame_at(&self, k: usize, step: usize) -> Option<usize> {
        step.checked_sub(1 + self.delays[k])
    }

    /// The frames that became complete with step `s` (at most one).
    pub fn completed_by(&self, step: usize, frames: usize) -> Option<usize> {
        step.checked_sub(self.max_delay()).filter(|&t| t < frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn musicgen_layout_matches_the_reference_mask() {
        // transformers' docstring example: 4 codebooks, max_length 8 = 1 BOS + 4 frames + 3 pads;
        // row k has k+1 leading and 3-k trailing pads.
        let p = DelayPattern::musicgen(4);
        let frames = 4;
        assert_eq!(p.steps_for(frames), 7);
        for k in 0..4 {
            let row: Vec<Option<usize>> = (0..7).map(|s| p.frame_at(k, s, frames)).collect();
            let valid = row.iter().filter(|f| f.is_some()).count();
            assert_eq!(valid, frames);
            assert_eq!(row.iter().position(Option::is_some), Some(k));
        }
        assert_eq!(p.completed_by(2, frames), None);
        assert_eq!(p.completed_by(3, frames), Some(0));
        assert_eq!(p.completed_by(6, frames), Some(3));
        assert_eq!(p.input_frame_at(0, 0), None);
        assert_eq!(p.input_frame_at(0, 1), Some(0));
        assert_eq!(p.input_frame_at(3, 4), Some(0));
    }

    #[test]
    fn parallel_has_no_delay() {
        let p = DelayPattern::parallel(4);
        assert_eq!(p.steps_for(10), 10);
        assert_eq!(p.completed_by(0, 10), Some(0));
    }
}
