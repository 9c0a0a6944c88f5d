//! Sample-rate conversion with rubato, whole-signal and streaming.
//!
//! Both [`resample`] and [`StreamResampler`] run the same machinery: input is buffered and fed
//! to rubato in fixed-size chunks, the resampler's start-up delay is dropped from the output,
//! and [`StreamResampler::finish`] pumps silence until exactly
//! `round(input_frames * to / from)` frames have come out. The chunking rubato sees therefore
//! does not depend on how the caller splits the input, and streaming output equals
//! whole-signal output.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{
    Async, Fft, FixedAsync, FixedSync, Indexing, Resampler, SincInterpolationParameters,
    WindowFunction,
};

use crate::{AudioError, first_non_finite};

/// Lowest sample rate, in Hz, accepted by the resamplers.
pub const MIN_RESAMPLE_RATE: u32 = 1000;
/// Highest sample rate, in Hz, accepted by the resamplers.
pub const MAX_RESAMPLE_RATE: u32 = 768_000;

/// Frames per chunk handed to rubato.
const CHUNK_FRAMES: usize = 1024;
/// Rates whose reduced ratio `from/g : to/g` has both terms at most this use the FFT resampler
/// (its block size is a multiple of those terms); other ratios use the sinc resampler.
const MAX_FFT_FACTOR: usize = 4096;
/// Safety net against a resampler that stops producing output while flushing.
const MAX_IDLE_FLUSHES: usize = 64;

/// Check that `rate` is in `MIN_RESAMPLE_RATE..=MAX_RESAMPLE_RATE`.
pub(crate) fn check_resample_rate(rate: u32) -> Result<(), AudioError> {
    if !(MIN_RESAMPLE_RATE..=MAX_RESAMPLE_RATE).contains(&rate) {
        return Err(AudioError::BadSampleRate {
            rate,
            min: MIN_RESAMPLE_RATE,
            max: MAX_RESAMPLE_RATE,
        });
    }
    Ok(())
}

/// Resample one channel with a high-quality band-limited resampler (rubato's FFT resampler,
/// or its sinc resampler for unusual rate pairs). Identity when the rates match.
///
/// The output has `round(samples.len() * to / from)` samples and is time-aligned with the
/// input (the resampler's delay is removed; for rate pairs whose reduced ratio has a term
/// above 4096, which no standard rates have, the sinc resampler's delay is removed to within
/// one output sample). Both rates must be within
/// [`MIN_RESAMPLE_RATE`]`..=`[`MAX_RESAMPLE_RATE`]; samples must be finite.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>, AudioError> {
    resample_interleaved(samples, 1, from, to)
}

/// Resample interleaved audio with `channels` channels.
pub(crate) fn resample_interleaved(
    samples: &[f32],
    channels: u16,
    from: u32,
    to: u32,
) -> Result<Vec<f32>, AudioError> {
    let mut resampler = StreamResampler::new(from, to, channels)?;
    let mut out = resampler.push(samples)?;
    out.extend(resampler.finish()?);
    Ok(out)
}

/// The rubato side of a [`StreamResampler`].
struct Engine {
    resampler: Box<dyn Resampler<f32>>,
    /// Interleaved input not yet handed to rubato.
    pending: Vec<f32>,
    /// Output buffer for one rubato call.
    scratch: Vec<f32>,
    /// Output frames still to drop (rubato's start-up delay).
    to_trim: usize,
}

impl Engine {
    fn new(from: u32, to: u32, channels: usize) -> Result<Self, AudioError> {
        let (from_us, to_us) = (from as usize, to as usize);
        let g = gcd(from_us, to_us);
        let resampler: Box<dyn Resampler<f32>> =
            if from_us / g <= MAX_FFT_FACTOR && to_us / g <= MAX_FFT_FACTOR {
                // One FFT block per chunk, of `blocks * from/g` input frames. An even `blocks`
                // makes both block sizes even, so rubato's reported delay (half the output
                // block) is exact and the output is aligned to the sample; with an odd block
                // size it would be off by half a sample.
                let min_in = from_us / g;
                let blocks = CHUNK_FRAMES.div_ceil(min_in).next_multiple_of(2);
                Box::new(
                    Fft::<f32>::new_custom(
                        from_us,
                        to_us,
                        blocks * min_in,
                        1,
                        channels,
                        WindowFunction::BlackmanHarris2,
                        FixedSync::Both,
                    )
                    .map_err(|e| AudioError::Resample(e.to_string()))?,
                )
            } else {
                let params = SincInterpolationParameters::new(256, WindowFunction::BlackmanHarris2);
                Box::new(
                    Async::<f32>::new_sinc(
                        f64::from(to) / f64::from(from),
                        1.0,
                        &params,
                        CHUNK_FRAMES,
                        channels,
                        FixedAsync::Input,
                    )
                    .map_err(|e| AudioError::Resample(e.to_string()))?,
                )
            };
        let scratch = vec![0.0; resampler.output_frames_max() * channels];
        let to_trim = resampler.output_delay();
        Ok(Engine {
            resampler,
            pending: Vec::new(),
            scratch,
            to_trim,
        })
    }

    /// Run one rubato call on `pending[offset..]` (in frames), reading at most `partial`
    /// frames when given (the rest is silence). Appends the trimmed output to `out` and
    /// returns `(frames consumed, frames appended)`.
    fn step(
        &mut self,
        channels: usize,
        offset: usize,
        partial: Option<usize>,
        out: &mut Vec<f32>,
    ) -> Result<(usize, usize), AudioError> {
        let err = |e: &dyn std::fmt::Display| AudioError::Resample(e.to_string());
        let in_frames = self.pending.len() / channels;
        let out_frames = self.scratch.len() / channels;
        let input =
            InterleavedSlice::new(&self.pending[..], channels, in_frames).map_err(|e| err(&e))?;
        let mut output = InterleavedSlice::new_mut(&mut self.scratch[..], channels, out_frames)
            .map_err(|e| err(&e))?;
        let indexing = Indexing {
            input_offset: offset,
            partial_len: partial,
            ..Indexing::default()
        };
        let (used, produced) = self
            .resampler
            .process_into_buffer(&input, &mut output, Some(&indexing))
            .map_err(|e| err(&e))?;
        let skip = self.to_trim.min(produced);
        self.to_trim -= skip;
        let produced_samples = self
            .scratch
            .get(skip * channels..produced * channels)
            .unwrap_or(&[]);
        out.extend_from_slice(produced_samples);
        Ok((used, produced - skip))
    }
}

/// Greatest common divisor (`gcd(0, n) == n`).
fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// Streaming resampler for chunked interleaved input, e.g. a gRPC stream at 44.1 kHz feeding a
/// 24 kHz model.
///
/// Push chunks of any size with [`push`](Self::push) and collect the output it returns;
/// [`finish`](Self::finish) flushes the tail. The concatenated output equals what
/// [`resample`] gives on the whole signal (per channel), `round(frames * to / from)` frames.
/// After `finish` the resampler is ready for a new stream.
pub struct StreamResampler {
    from: u32,
    to: u32,
    channels: usize,
    /// `None` when the rates are equal (pass-through).
    engine: Option<Engine>,
    /// Input frames pushed since the start of the stream.
    frames_in: u64,
    /// Output frames returned since the start of the stream.
    frames_out: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("channels", &self.channels)
            .field("frames_in", &self.frames_in)
            .field("frames_out", &self.frames_out)
            .finish_non_exhaustive()
    }
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz for `channels` interleaved channels.
    /// Rates must be within [`MIN_RESAMPLE_RATE`]`..=`[`MAX_RESAMPLE_RATE`]; `channels` must
    /// be at least 1.
    pub fn new(from: u32, to: u32, channels: u16) -> Result<Self, AudioError> {
        check_resample_rate(from)?;
        check_resample_rate(to)?;
        if channels == 0 {
            return Err(AudioError::BadChannels {
                channels: 0,
                max: usize::from(u16::MAX),
            });
        }
        let channels = usize::from(channels);
        let engine = if from == to {
            None
        } else {
            Some(Engine::new(from, to, channels)?)
        };
        Ok(StreamResampler {
            from,
            to,
            channels,
            engine,
            frames_in: 0,
            frames_out: 0,
        })
    }

    /// Feed interleaved samples (a whole number of frames, all finite) and get the output that
    /// is ready. Output lags input by up to about one internal chunk; the rest comes from
    /// later pushes or [`finish`](Self::finish). On [`AudioError::NonFinite`], `index` is
    /// relative to this chunk and nothing of the chunk is consumed.
    pub fn push(&mut self, interleaved: &[f32]) -> Result<Vec<f32>, AudioError> {
        let channels = self.channels;
        if !interleaved.len().is_multiple_of(channels) {
            return Err(AudioError::Misaligned {
                samples: interleaved.len(),
                channels,
            });
        }
        if let Some(index) = first_non_finite(interleaved) {
            return Err(AudioError::NonFinite { index });
        }
        let frames = (interleaved.len() / channels) as u64;
        self.frames_in = self.frames_in.saturating_add(frames);
        let Some(engine) = self.engine.as_mut() else {
            self.frames_out = self.frames_out.saturating_add(frames);
            return Ok(interleaved.to_vec());
        };
        engine.pending.extend_from_slice(interleaved);
        let mut out = Vec::new();
        let available = engine.pending.len() / channels;
        let mut offset = 0;
        let mut result = Ok(());
        while available - offset >= engine.resampler.input_frames_next() {
            match engine.step(channels, offset, None, &mut out) {
                Ok((used, produced)) => {
                    offset += used;
                    self.frames_out = self.frames_out.saturating_add(produced as u64);
                    if used == 0 {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Drop what rubato consumed, even after an error, so the state stays consistent.
        engine.pending.drain(..offset * channels);
        result.map(|()| out)
    }

    /// Flush: return the remaining output so that the whole stream has produced exactly
    /// `round(frames_in * to / from)` frames. The resampler is then reset for a new stream.
    pub fn finish(&mut self) -> Result<Vec<f32>, AudioError> {
        let result = self.flush();
        self.reset();
        result
    }

    fn flush(&mut self) -> Result<Vec<f32>, AudioError> {
        let channels = self.channels;
        let expected = expected_frames(self.frames_in, self.from, self.to);
        let Some(engine) = self.engine.as_mut() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut produced_total = self.frames_out;
        let left = engine.pending.len() / channels;
        if left > 0 {
            let (_, produced) = engine.step(channels, 0, Some(left), &mut out)?;
            produced_total += produced as u64;
        }
        engine.pending.clear();
        let mut idle = 0;
        while produced_total < expected {
            let (_, produced) = engine.step(channels, 0, Some(0), &mut out)?;
            produced_total += produced as u64;
            if produced == 0 {
                idle += 1;
                if idle > MAX_IDLE_FLUSHES {
                    return Err(AudioError::Resample(
                        "resampler stopped producing output while flushing".into(),
                    ));
                }
            }
        }
        // Keep only what brings the total to `expected`.
        let keep_frames = expected.saturating_sub(self.frames_out);
        let keep = usize::try_from(keep_frames)
            .unwrap_or(usize::MAX)
            .saturating_mul(channels);
        out.truncate(keep);
        Ok(out)
    }

    /// Forget the current stream.
    fn reset(&mut self) {
        self.frames_in = 0;
        self.frames_out = 0;
        if let Some(engine) = self.engine.as_mut() {
            engine.resampler.reset();
            engine.pending.clear();
            engine.to_trim = engine.resampler.output_delay();
        }
    }
}

/// `round(frames * to / from)` in exact integer arithmetic (halves round up).
fn expected_frames(frames: u64, from: u32, to: u32) -> u64 {
    let from = u128::from(from.max(1));
    let n = (u128::from(frames) * u128::from(to) * 2 + from) / (2 * from);
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_frames_rounds() {
        assert_eq!(expected_frames(44_100, 44_100, 24_000), 24_000);
        assert_eq!(expected_frames(1, 44_100, 24_000), 1); // 0.544 -> 1
        assert_eq!(expected_frames(3, 3000, 1000), 1);
        assert_eq!(expected_frames(0, 44_100, 24_000), 0);
    }

    #[test]
    fn identity_and_empty() {
        let x = vec![0.1, -0.2, 0.3];
        assert_eq!(resample(&x, 16_000, 16_000).unwrap(), x);
        assert!(resample(&[], 44_100, 24_000).unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(matches!(
            resample(&[0.0], 0, 16_000),
            Err(AudioError::BadSampleRate { rate: 0, .. })
        ));
        assert!(matches!(
            resample(&[0.0], 16_000, u32::MAX),
            Err(AudioError::BadSampleRate { .. })
        ));
        assert!(matches!(
            resample(&[0.0, f32::NAN], 16_000, 8000),
            Err(AudioError::NonFinite { index: 1 })
        ));
        assert!(matches!(
            StreamResampler::new(16_000, 8000, 0),
            Err(AudioError::BadChannels { channels: 0, .. })
        ));
        let mut s = StreamResampler::new(16_000, 8000, 2).unwrap();
        assert!(matches!(
            s.push(&[0.0; 3]),
            Err(AudioError::Misaligned {
                samples: 3,
                channels: 2
            })
        ));
    }

    #[test]
    fn short_inputs_have_exact_length() {
        for n in [1usize, 2, 7, 100, 1023, 1024, 1025, 5000] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin() * 0.5).collect();
            let y = resample(&x, 44_100, 24_000).unwrap();
            assert_eq!(
                y.len() as u64,
                expected_frames(n as u64, 44_100, 24_000),
                "n={n}"
            );
            let z = resample(&x, 16_000, 48_000).unwrap();
            assert_eq!(z.len(), 3 * n);
        }
    }

    #[test]
    fn sinc_path_for_odd_ratios() {
        // 44101 and 24000 are coprime: the reduced ratio is too large for the FFT resampler,
        // so the sinc resampler runs. Its delay is not a whole number of output frames, so
        // allow a constant sub-sample shift.
        let from = 44_101;
        let x: Vec<f32> = (0..from)
            .map(|i| (2.0 * std::f32::consts::PI * 500.0 * i as f32 / from as f32).sin() * 0.5)
            .collect();
        let y = resample(&x, from, 24_000).unwrap();
        assert_eq!(y.len(), 24_000);
        let max_err = |shift: f64| {
            y.iter()
                .enumerate()
                .skip(500)
                .take(23_000)
                .map(|(i, v)| {
                    let t = (i as f64 - shift) / 24_000.0;
                    let want = (2.0 * std::f64::consts::PI * 500.0 * t).sin() * 0.5;
                    (f64::from(*v) - want).abs()
                })
                .fold(0.0, f64::max)
        };
        let best = (-100..=100)
            .map(|k| max_err(f64::from(k) / 100.0))
            .fold(f64::INFINITY, f64::min);
        assert!(best < 2e-3, "best max error {best}");
    }

    #[test]
    fn stream_is_reusable_after_finish() {
        let x: Vec<f32> = (0..3000).map(|i| (i as f32 * 0.05).sin() * 0.3).collect();
        let mut s = StreamResampler::new(44_100, 24_000, 1).unwrap();
        let mut a = s.push(&x).unwrap();
        a.extend(s.finish().unwrap());
        let mut b = s.push(&x).unwrap();
        b.extend(s.finish().unwrap());
        assert_eq!(a, b);
    }
}
