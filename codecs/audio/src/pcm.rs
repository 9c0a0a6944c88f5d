//! The in-memory audio type and the operations on it that need no codec.

use crate::resample::{check_resample_rate, resample_interleaved};
use crate::{AudioError, Limits, first_non_finite};

/// Interleaved PCM samples in [-1, 1] (f32).
///
/// Sample `i` of frame `f` is `samples[f * channels + i]`. The fields are public, so a `Pcm`
/// built by hand may be inconsistent (zero channels, a partial last frame); every method then
/// treats the audio as the whole frames it contains and never panics. [`Pcm::new`] validates.
#[derive(Debug, Clone, PartialEq)]
pub struct Pcm {
    /// Frames per second, in Hz.
    pub sample_rate: u32,
    /// Number of interleaved channels.
    pub channels: u16,
    /// Interleaved samples, `frames * channels` of them.
    pub samples: Vec<f32>,
}

impl Pcm {
    /// Build a `Pcm`, validating it against [`Limits::default`]: `channels` in
    /// `1..=max_channels`, `sample_rate` in range, `samples.len()` a multiple of `channels`, and
    /// every sample finite. Empty audio (zero frames) is allowed.
    pub fn new(sample_rate: u32, channels: u16, samples: Vec<f32>) -> Result<Pcm, AudioError> {
        Self::new_with_limits(sample_rate, channels, samples, &Limits::default())
    }

    /// Like [`Pcm::new`], but validates channels and sample rate against `limits` (duration
    /// and byte limits are not applied).
    pub fn new_with_limits(
        sample_rate: u32,
        channels: u16,
        samples: Vec<f32>,
        limits: &Limits,
    ) -> Result<Pcm, AudioError> {
        limits.check_channels(usize::from(channels))?;
        limits.check_sample_rate(sample_rate)?;
        if !samples.len().is_multiple_of(usize::from(channels)) {
            return Err(AudioError::Misaligned {
                samples: samples.len(),
                channels: usize::from(channels),
            });
        }
        if let Some(index) = first_non_finite(&samples) {
            return Err(AudioError::NonFinite { index });
        }
        Ok(Pcm {
            sample_rate,
            channels,
            samples,
        })
    }

    /// Number of frames (samples per channel).
    pub fn frames(&self) -> usize {
        match usize::from(self.channels) {
            0 => 0,
            c => self.samples.len() / c,
        }
    }

    /// Duration in seconds (0 when the sample rate is 0).
    pub fn duration_secs(&self) -> f64 {
        if self.sample_rate == 0 {
            return 0.0;
        }
        self.frames() as f64 / f64::from(self.sample_rate)
    }

    /// The whole frames of `samples`.
    fn whole_frames(&self) -> &[f32] {
        let len = self.frames() * usize::from(self.channels);
        self.samples.get(..len).unwrap_or(&[])
    }

    /// Mono signal: the average of all channels in each frame.
    pub fn to_mono(&self) -> Vec<f32> {
        let channels = usize::from(self.channels);
        match channels {
            0 => Vec::new(),
            1 => self.whole_frames().to_vec(),
            _ => {
                let scale = 1.0 / channels as f32;
                self.whole_frames()
                    .chunks_exact(channels)
                    .map(|frame| frame.iter().sum::<f32>() * scale)
                    .collect()
            }
        }
    }

    /// The samples of channel `c` (0-based); empty when `c` is not a channel.
    pub fn channel(&self, c: usize) -> Vec<f32> {
        let channels = usize::from(self.channels);
        if c >= channels {
            return Vec::new();
        }
        self.whole_frames()
            .chunks_exact(channels)
            .filter_map(|frame| frame.get(c).copied())
            .collect()
    }

    /// Build a `Pcm` from one vector per channel; validated like [`Pcm::new`]. All channels must
    /// have the same length.
    pub fn from_planar(sample_rate: u32, planar: &[Vec<f32>]) -> Result<Pcm, AudioError> {
        let limits = Limits::default();
        limits.check_channels(planar.len())?;
        let channels = u16::try_from(planar.len()).map_err(|_| AudioError::BadChannels {
            channels: planar.len(),
            max: usize::from(limits.max_channels),
        })?;
        let frames = planar.first().map_or(0, Vec::len);
        for (channel, plane) in planar.iter().enumerate() {
            if plane.len() != frames {
                return Err(AudioError::RaggedPlanar {
                    channel,
                    len: plane.len(),
                    expected: frames,
                });
            }
        }
        let mut samples = Vec::with_capacity(frames.saturating_mul(planar.len()));
        for f in 0..frames {
            for plane in planar {
                samples.extend(plane.get(f).copied());
            }
        }
        Pcm::new(sample_rate, channels, samples)
    }

    /// One vector per channel.
    pub fn to_planar(&self) -> Vec<Vec<f32>> {
        (0..usize::from(self.channels))
            .map(|c| self.channel(c))
            .collect()
    }

    /// Convert to what a model needs: `channels` 1 averages all channels; 2 from mono
    /// duplicates the channel; the same count is kept; any other combination is
    /// [`AudioError::UnsupportedChannels`]. Then resample to `sample_rate` (see [`resample`];
    /// the output has `round(frames * sample_rate / self.sample_rate)` frames).
    ///
    /// [`resample`]: crate::resample
    pub fn conform(&self, sample_rate: u32, channels: u16) -> Result<Pcm, AudioError> {
        if self.channels == 0 {
            return Err(AudioError::BadChannels {
                channels: 0,
                max: usize::from(Limits::default().max_channels),
            });
        }
        check_resample_rate(self.sample_rate)?;
        check_resample_rate(sample_rate)?;
        let mixed = match (self.channels, channels) {
            (from, to) if from == to => self.whole_frames().to_vec(),
            (_, 1) => self.to_mono(),
            (1, 2) => self.whole_frames().iter().flat_map(|&s| [s, s]).collect(),
            (from, to) => return Err(AudioError::UnsupportedChannels { from, to }),
        };
        let samples = if self.sample_rate == sample_rate {
            mixed
        } else {
            resample_interleaved(&mixed, channels, self.sample_rate, sample_rate)?
        };
        Ok(Pcm {
            sample_rate,
            channels,
            samples,
        })
    }
}

/// Split interleaved PCM into chunks of `frames_per_chunk` frames (the last one may be
/// shorter), for streaming. A `frames_per_chunk` of 0 is treated as 1. Empty audio gives no
/// chunks.
pub fn chunks(pcm: &Pcm, frames_per_chunk: usize) -> impl Iterator<Item = Pcm> + '_ {
    let step = frames_per_chunk
        .max(1)
        .saturating_mul(usize::from(pcm.channels).max(1));
    pcm.whole_frames().chunks(step).map(move |s| Pcm {
        sample_rate: pcm.sample_rate,
        channels: pcm.channels,
        samples: s.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stereo() -> Pcm {
        Pcm::new(16_000, 2, vec![0.1, 0.3, -0.2, 0.4, 0.5, -0.5]).unwrap()
    }

    #[test]
    fn new_validates() {
        assert!(matches!(
            Pcm::new(16_000, 0, vec![]),
            Err(AudioError::BadChannels { channels: 0, .. })
        ));
        assert!(matches!(
            Pcm::new(16_000, 9, vec![]),
            Err(AudioError::BadChannels {
                channels: 9,
                max: 8
            })
        ));
        assert!(matches!(
            Pcm::new(100, 1, vec![]),
            Err(AudioError::BadSampleRate { rate: 100, .. })
        ));
        assert!(matches!(
            Pcm::new(16_000, 2, vec![0.0; 3]),
            Err(AudioError::Misaligned {
                samples: 3,
                channels: 2
            })
        ));
        assert!(matches!(
            Pcm::new(16_000, 1, vec![0.0, f32::INFINITY]),
            Err(AudioError::NonFinite { index: 1 })
        ));
        assert!(Pcm::new(16_000, 1, vec![]).is_ok());
    }

    #[test]
    fn accessors() {
        let p = stereo();
        assert_eq!(p.frames(), 3);
        assert!((p.duration_secs() - 3.0 / 16_000.0).abs() < 1e-12);
        assert_eq!(p.channel(0), vec![0.1, -0.2, 0.5]);
        assert_eq!(p.channel(1), vec![0.3, 0.4, -0.5]);
        assert!(p.channel(2).is_empty());
        let mono = p.to_mono();
        assert_eq!(mono.len(), 3);
        assert!((mono[0] - 0.2).abs() < 1e-6 && (mono[1] - 0.1).abs() < 1e-6);
        assert!(mono[2].abs() < 1e-6);
        let planar = p.to_planar();
        assert_eq!(Pcm::from_planar(16_000, &planar).unwrap(), p);
    }

    #[test]
    fn from_planar_rejects_ragged_and_empty() {
        assert!(matches!(
            Pcm::from_planar(16_000, &[vec![0.0; 3], vec![0.0; 2]]),
            Err(AudioError::RaggedPlanar {
                channel: 1,
                len: 2,
                expected: 3
            })
        ));
        assert!(matches!(
            Pcm::from_planar(16_000, &[]),
            Err(AudioError::BadChannels { channels: 0, .. })
        ));
    }

    #[test]
    fn inconsistent_hand_built_pcm_does_not_panic() {
        let p = Pcm {
            sample_rate: 0,
            channels: 0,
            samples: vec![1.0, 2.0, 3.0],
        };
        assert_eq!(p.frames(), 0);
        assert_eq!(p.duration_secs(), 0.0);
        assert!(p.to_mono().is_empty());
        assert!(p.to_planar().is_empty());
        assert_eq!(chunks(&p, 0).count(), 0);
        assert!(p.conform(16_000, 1).is_err());
        let q = Pcm {
            sample_rate: 8000,
            channels: 2,
            samples: vec![1.0, 2.0, 3.0],
        };
        assert_eq!(q.frames(), 1);
        assert_eq!(q.channel(1), vec![2.0]);
        assert_eq!(chunks(&q, 1).map(|c| c.samples.len()).sum::<usize>(), 2);
    }

    #[test]
    fn conform_channels() {
        let p = stereo();
        let mono = p.conform(16_000, 1).unwrap();
        assert_eq!(mono.channels, 1);
        assert_eq!(mono.samples, p.to_mono());
        let same = p.conform(16_000, 2).unwrap();
        assert_eq!(same, p);
        let m = Pcm::new(16_000, 1, vec![0.1, 0.2]).unwrap();
        let st = m.conform(16_000, 2).unwrap();
        assert_eq!(st.channels, 2);
        assert_eq!(st.samples, vec![0.1, 0.1, 0.2, 0.2]);
        assert!(matches!(
            p.conform(16_000, 3),
            Err(AudioError::UnsupportedChannels { from: 2, to: 3 })
        ));
        assert!(matches!(
            Pcm::new(16_000, 6, vec![0.0; 12])
                .unwrap()
                .conform(16_000, 2),
            Err(AudioError::UnsupportedChannels { from: 6, to: 2 })
        ));
        assert!(matches!(
            p.conform(16_000, 0),
            Err(AudioError::UnsupportedChannels { from: 2, to: 0 })
        ));
        assert!(matches!(
            p.conform(0, 1),
            Err(AudioError::BadSampleRate { rate: 0, .. })
        ));
    }

    #[test]
    fn chunks_cover_all_frames() {
        let samples: Vec<f32> = (0..2 * 1001).map(|i| i as f32 / 4096.0).collect();
        let p = Pcm::new(16_000, 2, samples).unwrap();
        let parts: Vec<Pcm> = chunks(&p, 100).collect();
        assert_eq!(parts.len(), 11);
        assert!(parts[..10].iter().all(|c| c.frames() == 100));
        assert_eq!(parts[10].frames(), 1);
        assert!(
            parts
                .iter()
                .all(|c| c.channels == 2 && c.sample_rate == 16_000)
        );
        let joined: Vec<f32> = parts.iter().flat_map(|c| c.samples.clone()).collect();
        assert_eq!(joined, p.samples);
        assert_eq!(chunks(&p, 5000).count(), 1);
        assert_eq!(chunks(&Pcm::new(16_000, 1, vec![]).unwrap(), 10).count(), 0);
    }
}
