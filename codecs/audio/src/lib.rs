//! Audio I/O for Cadenza.
//!
//! * [`decode`] / [`decode_file`] read any container and codec that symphonia supports
//!   (WAV, FLAC, MP3, OGG/Vorbis, …) into interleaved `f32` [`Pcm`], under [`Limits`] that make
//!   untrusted input safe to accept; [`decode_raw`] reads headerless PCM.
//! * [`resample`] and [`StreamResampler`] change the sample rate with rubato; [`Pcm::conform`]
//!   downmixes/upmixes and resamples to what a model expects.
//! * [`encode_wav`] / [`write_wav`] write WAV files with hound; [`to_s16le`] / [`to_f32le`] give
//!   raw bytes; [`chunks`] splits audio for streaming.
//! * [`fbank`]: Kaldi-compatible log-mel fbank, LFR stacking and CMVN ([`Frontend`], batch and
//!   streaming), the speech frontend of FunASR models.
//!
//! No function of this crate panics on bad input: every problem is an [`AudioError`].

mod decode;
mod error;
pub mod fbank;
mod pcm;
mod resample;
mod wav;

pub use decode::{RawEncoding, decode, decode_file, decode_raw, decode_with_hint};
pub use error::AudioError;
pub use fbank::{
    Cmvn, DitherRng, Fbank, FbankError, FbankOptions, Features, Frontend, FrontendConfig,
    StreamingFrontend, WindowType,
};
pub use pcm::{Pcm, chunks};
pub use resample::{MAX_RESAMPLE_RATE, MIN_RESAMPLE_RATE, StreamResampler, resample};
pub use wav::{WavFormat, encode_wav, to_f32le, to_s16le, write_wav};

/// Limits applied while decoding untrusted input.
///
/// The defaults (600 s, 8 channels, 4000..=192000 Hz, 256 MiB) suit a speech/music service.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest accepted audio, in seconds. Decoding stops with [`AudioError::TooLong`] as soon
    /// as more than this has been decoded.
    pub max_seconds: f64,
    /// Largest accepted channel count.
    pub max_channels: u16,
    /// Smallest accepted sample rate in Hz.
    pub min_sample_rate: u32,
    /// Largest accepted sample rate in Hz.
    pub max_sample_rate: u32,
    /// Largest accepted encoded input, in bytes.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_seconds: 600.0,
            max_channels: 8,
            min_sample_rate: 4000,
            max_sample_rate: 192_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Check a channel count against these limits.
    pub fn check_channels(&self, channels: usize) -> Result<(), AudioError> {
        if channels == 0 || channels > usize::from(self.max_channels) {
            return Err(AudioError::BadChannels {
                channels,
                max: usize::from(self.max_channels),
            });
        }
        Ok(())
    }

    /// Check a sample rate against these limits.
    pub fn check_sample_rate(&self, rate: u32) -> Result<(), AudioError> {
        if rate == 0 || rate < self.min_sample_rate || rate > self.max_sample_rate {
            return Err(AudioError::BadSampleRate {
                rate,
                min: self.min_sample_rate,
                max: self.max_sample_rate,
            });
        }
        Ok(())
    }

    /// Check a duration, given as frames at a sample rate, against `max_seconds`.
    /// A NaN `max_seconds` rejects everything; a rate of 0 is treated as "no audio".
    pub fn check_frames(&self, frames: u64, rate: u32) -> Result<(), AudioError> {
        if rate == 0 {
            return Ok(());
        }
        let seconds = frames as f64 / f64::from(rate);
        // Written so that a NaN limit fails closed.
        if self.max_seconds.is_nan() || seconds > self.max_seconds {
            return Err(AudioError::TooLong {
                seconds,
                max_seconds: self.max_seconds,
            });
        }
        Ok(())
    }

    /// Check an encoded input size against `max_bytes`.
    pub fn check_bytes(&self, bytes: usize) -> Result<(), AudioError> {
        if bytes > self.max_bytes {
            return Err(AudioError::TooLarge {
                bytes,
                max_bytes: self.max_bytes,
            });
        }
        Ok(())
    }
}

/// Index of the first sample that is NaN or infinite, if any.
pub(crate) fn first_non_finite(samples: &[f32]) -> Option<usize> {
    samples.iter().position(|s| !s.is_finite())
}
