//! WAV output (hound) and raw little-endian sample bytes.

use std::io::{Seek, Write};
use std::path::Path;

use crate::{AudioError, Pcm, first_non_finite};

/// Sample format of an encoded WAV file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WavFormat {
    /// 16-bit signed integer PCM.
    I16,
    /// 32-bit IEEE float.
    F32,
}

/// Convert one sample to 16 bits: clamp to [-1, 1], scale by 32768, round, saturate to
/// `i16` (so 1.0 becomes 32767). NaN becomes 0.
fn sample_to_i16(s: f32) -> i16 {
    // `as` saturates and maps NaN to 0.
    (s.clamp(-1.0, 1.0) * 32768.0).round() as i16
}

/// Check that `pcm` can be written: at least one channel, a non-zero rate, whole frames,
/// finite samples.
fn check_encodable(pcm: &Pcm) -> Result<(), AudioError> {
    if pcm.channels == 0 {
        return Err(AudioError::BadChannels {
            channels: 0,
            max: usize::from(u16::MAX),
        });
    }
    if pcm.sample_rate == 0 {
        return Err(AudioError::BadSampleRate {
            rate: 0,
            min: 1,
            max: u32::MAX,
        });
    }
    if !pcm.samples.len().is_multiple_of(usize::from(pcm.channels)) {
        return Err(AudioError::Misaligned {
            samples: pcm.samples.len(),
            channels: usize::from(pcm.channels),
        });
    }
    if let Some(index) = first_non_finite(&pcm.samples) {
        return Err(AudioError::NonFinite { index });
    }
    Ok(())
}

fn hound_err(e: hound::Error) -> AudioError {
    match e {
        hound::Error::IoError(io) => AudioError::Io(io),
        other => AudioError::Wav(other.to_string()),
    }
}

fn write_to<W: Write + Seek>(writer: W, pcm: &Pcm, format: WavFormat) -> Result<(), AudioError> {
    check_encodable(pcm)?;
    let spec = hound::WavSpec {
        channels: pcm.channels,
        sample_rate: pcm.sample_rate,
        bits_per_sample: match format {
            WavFormat::I16 => 16,
            WavFormat::F32 => 32,
        },
        sample_format: match format {
            WavFormat::I16 => hound::SampleFormat::Int,
            WavFormat::F32 => hound::SampleFormat::Float,
        },
    };
    let mut w = hound::WavWriter::new(writer, spec).map_err(hound_err)?;
    match format {
        WavFormat::I16 => {
            for &s in &pcm.samples {
                w.write_sample(sample_to_i16(s)).map_err(hound_err)?;
            }
        }
        WavFormat::F32 => {
            for &s in &pcm.samples {
                w.write_sample(s).map_err(hound_err)?;
            }
        }
    }
    w.finalize().map_err(hound_err)
}

/// Encode a complete WAV file in memory (hound). [`WavFormat::I16`] clamps to [-1, 1] and
/// rounds (scale 32768, saturating at 32767). Fails on a `Pcm` with zero channels, a zero
/// rate, a partial frame or a non-finite sample.
pub fn encode_wav(pcm: &Pcm, format: WavFormat) -> Result<Vec<u8>, AudioError> {
    let mut bytes = Vec::new();
    write_to(std::io::Cursor::new(&mut bytes), pcm, format)?;
    Ok(bytes)
}

/// Write a WAV file to `path` (created or truncated); see [`encode_wav`].
pub fn write_wav(path: &Path, pcm: &Pcm, format: WavFormat) -> Result<(), AudioError> {
    check_encodable(pcm)?;
    let file = std::fs::File::create(path)?;
    let mut buffered = std::io::BufWriter::new(file);
    write_to(&mut buffered, pcm, format)?;
    buffered.flush()?;
    Ok(())
}

/// Samples as 16-bit signed little-endian bytes (clamped and rounded like
/// [`WavFormat::I16`]).
pub fn to_s16le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|&s| sample_to_i16(s).to_le_bytes())
        .collect()
}

/// Samples as 32-bit float little-endian bytes (unchanged values).
pub fn to_f32le(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i16_conversion_clamps_and_rounds() {
        assert_eq!(sample_to_i16(0.0), 0);
        assert_eq!(sample_to_i16(1.0), 32767);
        assert_eq!(sample_to_i16(2.0), 32767);
        assert_eq!(sample_to_i16(-1.0), -32768);
        assert_eq!(sample_to_i16(-3.0), -32768);
        assert_eq!(sample_to_i16(0.5), 16384);
        assert_eq!(sample_to_i16(1.4 / 32768.0), 1);
        assert_eq!(sample_to_i16(1.6 / 32768.0), 2);
        assert_eq!(sample_to_i16(f32::NAN), 0);
    }

    #[test]
    fn raw_bytes() {
        assert_eq!(to_s16le(&[0.5, -1.0]), vec![0x00, 0x40, 0x00, 0x80]);
        assert_eq!(to_f32le(&[1.0]), 1.0f32.to_le_bytes().to_vec());
        assert!(to_s16le(&[]).is_empty());
    }

    #[test]
    fn encode_rejects_bad_pcm() {
        let nan = Pcm {
            sample_rate: 16_000,
            channels: 1,
            samples: vec![0.0, f32::NAN],
        };
        assert!(matches!(
            encode_wav(&nan, WavFormat::F32),
            Err(AudioError::NonFinite { index: 1 })
        ));
        let zero = Pcm {
            sample_rate: 16_000,
            channels: 0,
            samples: vec![],
        };
        assert!(matches!(
            encode_wav(&zero, WavFormat::I16),
            Err(AudioError::BadChannels { .. })
        ));
        let ragged = Pcm {
            sample_rate: 16_000,
            channels: 2,
            samples: vec![0.0; 3],
        };
        assert!(matches!(
            encode_wav(&ragged, WavFormat::I16),
            Err(AudioError::Misaligned { .. })
        ));
    }
}
