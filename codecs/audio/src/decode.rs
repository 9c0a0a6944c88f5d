//! Decoding untrusted audio: containers and codecs via symphonia, and raw PCM.

use std::io::{Cursor, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::{AudioError, Limits, Pcm, first_non_finite};

/// Sample encoding of headerless PCM bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEncoding {
    /// 16-bit signed integer, little-endian; scaled by 1/32768.
    S16Le,
    /// 32-bit IEEE float, little-endian.
    F32Le,
}

impl RawEncoding {
    /// Bytes per sample.
    pub fn bytes_per_sample(self) -> usize {
        match self {
            RawEncoding::S16Le => 2,
            RawEncoding::F32Le => 4,
        }
    }
}

/// Decode a complete file (WAV, FLAC, MP3, OGG/Vorbis, AIFF, CAF, MP4/AAC, MKV, … anything
/// symphonia's "all" features read) from memory into interleaved `f32`, keeping all channels.
///
/// Untrusted input is safe: size, declared and actual channel count and sample rate, and
/// duration are checked against `limits` (decoding stops with [`AudioError::TooLong`] as soon
/// as more than `max_seconds` has been decoded), every sample must be finite, and bad data is
/// an error, never a panic. Packets that fail to decode in the middle of a stream are skipped;
/// a stream that ends early keeps what was decoded.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Pcm, AudioError> {
    decode_with_hint(bytes, None, limits)
}

/// Like [`decode`], with a file extension (e.g. `"mp3"`, no dot) as a hint for format
/// detection. The content still decides; a wrong hint does no harm.
pub fn decode_with_hint(
    bytes: &[u8],
    extension: Option<&str>,
    limits: &Limits,
) -> Result<Pcm, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    limits.check_bytes(bytes.len())?;
    check_wav_header(bytes, limits)?;
    // symphonia is written not to panic on bad data; if it ever does, report the input as
    // malformed instead of taking the caller down.
    catch_unwind(AssertUnwindSafe(|| {
        decode_symphonia(bytes, extension, limits)
    }))
    .unwrap_or_else(|_| {
        Err(AudioError::Malformed(
            "the decoder failed on this input".into(),
        ))
    })
}

/// Read and decode a file; its extension is used as a format hint. The file size is checked
/// against `limits.max_bytes` before it is read.
pub fn decode_file(path: &Path, limits: &Limits) -> Result<Pcm, AudioError> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    limits.check_bytes(usize::try_from(len).unwrap_or(usize::MAX))?;
    let cap = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(limits.max_bytes);
    let mut bytes = Vec::with_capacity(cap);
    // Read at most one byte past the limit, in case the file grew since `metadata`.
    let max = u64::try_from(limits.max_bytes).unwrap_or(u64::MAX);
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    let extension = path.extension().and_then(|e| e.to_str());
    decode_with_hint(&bytes, extension, limits)
}

/// Decode raw interleaved PCM bytes (no header) with the given encoding, rate and channels,
/// under `limits`.
pub fn decode_raw(
    bytes: &[u8],
    encoding: RawEncoding,
    sample_rate: u32,
    channels: u16,
    limits: &Limits,
) -> Result<Pcm, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    limits.check_bytes(bytes.len())?;
    limits.check_channels(usize::from(channels))?;
    limits.check_sample_rate(sample_rate)?;
    let frame_bytes = usize::from(channels) * encoding.bytes_per_sample();
    if !bytes.len().is_multiple_of(frame_bytes) {
        return Err(AudioError::BadRawLength {
            bytes: bytes.len(),
            frame_bytes,
        });
    }
    limits.check_frames((bytes.len() / frame_bytes) as u64, sample_rate)?;
    let samples: Vec<f32> = match encoding {
        RawEncoding::S16Le => bytes
            .as_chunks::<2>()
            .0
            .iter()
            .map(|b| f32::from(i16::from_le_bytes(*b)) / 32768.0)
            .collect(),
        RawEncoding::F32Le => bytes
            .as_chunks::<4>()
            .0
            .iter()
            .map(|b| f32::from_le_bytes(*b))
            .collect(),
    };
    Pcm::new_with_limits(sample_rate, channels, samples, limits)
}

/// Most RIFF chunks examined before the `fmt ` chunk.
const MAX_RIFF_CHUNKS: usize = 64;

/// For a RIFF/RF64 WAVE file, check the channel count and sample rate declared in its `fmt `
/// chunk against `limits` before any decoding, so a hostile header gets a precise error.
/// Anything that does not look like WAVE is left to symphonia.
fn check_wav_header(bytes: &[u8], limits: &Limits) -> Result<(), AudioError> {
    let is_riff = matches!(bytes.get(..4), Some(b"RIFF" | b"RF64"));
    if !is_riff || bytes.get(8..12) != Some(b"WAVE") {
        return Ok(());
    }
    let mut pos: usize = 12;
    for _ in 0..MAX_RIFF_CHUNKS {
        let Some(header) = bytes.get(pos..pos.saturating_add(8)) else {
            return Ok(());
        };
        let (id, size) = header.split_at(4);
        let size = u32::from_le_bytes(size.try_into().unwrap_or([0; 4]));
        let body = pos.saturating_add(8);
        if id == b"fmt " {
            // format tag (2), channels (2), sample rate (4)
            let Some(fmt) = bytes.get(body..body.saturating_add(8)) else {
                return Ok(());
            };
            let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
            let rate = u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]);
            limits.check_channels(usize::from(channels))?;
            limits.check_sample_rate(rate)?;
            return Ok(());
        }
        if id == b"data" {
            return Ok(());
        }
        // Chunks are padded to an even size.
        let padded = (size as usize).saturating_add((size & 1) as usize);
        pos = body.saturating_add(padded);
    }
    Ok(())
}

/// Map a symphonia error to ours.
fn map_symphonia(err: SymphoniaError) -> AudioError {
    match err {
        SymphoniaError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            AudioError::Truncated(format!("unexpected end of data: {e}"))
        }
        SymphoniaError::IoError(e) => AudioError::Malformed(e.to_string()),
        SymphoniaError::DecodeError(msg) => AudioError::Malformed(msg.to_string()),
        SymphoniaError::Unsupported(msg) => AudioError::UnsupportedFormat(msg.to_string()),
        SymphoniaError::LimitError(msg) => {
            AudioError::Malformed(format!("decoder limit reached: {msg}"))
        }
        // Seek errors, reset requests and any future variants.
        other => AudioError::Malformed(other.to_string()),
    }
}

/// Probe `bytes` for a container format.
fn open_format<'a>(
    bytes: &'a [u8],
    extension: Option<&str>,
) -> Result<Box<dyn FormatReader + 'a>, SymphoniaError> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    symphonia::default::get_probe().probe(
        &hint,
        mss,
        FormatOptions::default(),
        MetadataOptions::default(),
    )
}

fn decode_symphonia(
    bytes: &[u8],
    extension: Option<&str>,
    limits: &Limits,
) -> Result<Pcm, AudioError> {
    let mut format = open_format(bytes, extension).map_err(map_symphonia)?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| AudioError::UnsupportedFormat("the file has no audio track".into()))?;
    let track_id = track.id;
    let declared_frames = track.num_frames.unwrap_or(0);
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| {
            AudioError::UnsupportedFormat("the audio track has no codec parameters".into())
        })?
        .clone();
    // Check what the header declares before decoding anything.
    if let Some(rate) = params.sample_rate {
        limits.check_sample_rate(rate)?;
    }
    if let Some(channels) = &params.channels {
        limits.check_channels(channels.count())?;
    }
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(map_symphonia)?;

    let mut samples: Vec<f32> = Vec::new();
    let mut scratch: Vec<f32> = Vec::new();
    // (sample rate, channels) of the first decoded buffer.
    let mut layout: Option<(u32, usize)> = None;
    let mut frames: u64 = 0;
    let mut last_decode_error: Option<&'static str> = None;

    loop {
        let packet = match format.next_packet() {
            Ok(Some(packet)) => packet,
            Ok(None) | Err(SymphoniaError::ResetRequired) => break,
            // The container broke off (e.g. a truncated file): keep what was decoded.
            Err(_) if frames > 0 => break,
            Err(e) => return Err(map_symphonia(e)),
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(buf) => buf,
            // Invalid data in this packet: skip it (symphonia's recommended practice).
            Err(SymphoniaError::DecodeError(msg)) => {
                last_decode_error = Some(msg);
                continue;
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(_) if frames > 0 => break,
            Err(e) => return Err(map_symphonia(e)),
        };
        let buf_frames = buf.frames();
        if buf_frames == 0 {
            continue;
        }
        let rate = buf.spec().rate();
        let channels = buf.num_planes();
        match layout {
            None => {
                limits.check_sample_rate(rate)?;
                limits.check_channels(channels)?;
                layout = Some((rate, channels));
            }
            Some(l) if l != (rate, channels) => {
                return Err(AudioError::Malformed(format!(
                    "the stream changed from {} Hz, {} channel(s) to {rate} Hz, {channels} \
                     channel(s) mid-stream",
                    l.0, l.1
                )));
            }
            Some(_) => {}
        }
        frames = frames.saturating_add(buf_frames as u64);
        limits.check_frames(frames, rate)?;
        buf.copy_to_vec_interleaved(&mut scratch);
        if let Some(i) = first_non_finite(&scratch) {
            return Err(AudioError::NonFinite {
                index: samples.len().saturating_add(i),
            });
        }
        samples.extend_from_slice(&scratch);
    }

    let Some((rate, channels)) = layout else {
        return Err(match last_decode_error {
            Some(msg) => AudioError::Truncated(format!("no packet could be decoded: {msg}")),
            None if declared_frames > 0 => AudioError::Truncated(format!(
                "the header declares {declared_frames} frames but the data ends before the first one"
            )),
            None => AudioError::Empty,
        });
    };
    let channels = u16::try_from(channels).map_err(|_| AudioError::BadChannels {
        channels,
        max: usize::from(limits.max_channels),
    })?;
    Pcm::new_with_limits(rate, channels, samples, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_s16_and_f32() {
        let limits = Limits::default();
        let bytes = [0x00, 0x40, 0x00, 0x80, 0xff, 0x7f, 0x00, 0x00];
        let pcm = decode_raw(&bytes, RawEncoding::S16Le, 16_000, 2, &limits).unwrap();
        assert_eq!(pcm.channels, 2);
        assert_eq!(pcm.samples, vec![0.5, -1.0, 32767.0 / 32768.0, 0.0]);
        let f: Vec<u8> = [0.25f32, -0.75]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let pcm = decode_raw(&f, RawEncoding::F32Le, 16_000, 1, &limits).unwrap();
        assert_eq!(pcm.samples, vec![0.25, -0.75]);
    }

    #[test]
    fn raw_rejects_bad_input() {
        let limits = Limits::default();
        assert!(matches!(
            decode_raw(&[], RawEncoding::S16Le, 16_000, 1, &limits),
            Err(AudioError::Empty)
        ));
        assert!(matches!(
            decode_raw(&[0; 6], RawEncoding::S16Le, 16_000, 2, &limits),
            Err(AudioError::BadRawLength {
                bytes: 6,
                frame_bytes: 4
            })
        ));
        assert!(matches!(
            decode_raw(&[0; 6], RawEncoding::F32Le, 16_000, 1, &limits),
            Err(AudioError::BadRawLength {
                bytes: 6,
                frame_bytes: 4
            })
        ));
        assert!(matches!(
            decode_raw(&[0; 4], RawEncoding::S16Le, 16_000, 0, &limits),
            Err(AudioError::BadChannels { channels: 0, .. })
        ));
        assert!(matches!(
            decode_raw(&[0; 4], RawEncoding::S16Le, 1_000_000_000, 1, &limits),
            Err(AudioError::BadSampleRate { .. })
        ));
        let nan = f32::NAN.to_le_bytes();
        assert!(matches!(
            decode_raw(&nan, RawEncoding::F32Le, 16_000, 1, &limits),
            Err(AudioError::NonFinite { index: 0 })
        ));
        let small = Limits {
            max_seconds: 1.0,
            max_bytes: 100_000,
            ..Limits::default()
        };
        let e = decode_raw(&[0; 2 * 8001], RawEncoding::S16Le, 8000, 1, &small).unwrap_err();
        assert!(matches!(e, AudioError::TooLong { .. }) && e.is_limit());
        let e = decode_raw(&[0; 100_002], RawEncoding::S16Le, 8000, 1, &small).unwrap_err();
        assert!(matches!(
            e,
            AudioError::TooLarge {
                bytes: 100_002,
                max_bytes: 100_000
            }
        ));
        assert!(e.is_limit());
    }

    #[test]
    fn wav_header_sniffer_ignores_other_data() {
        let limits = Limits::default();
        assert!(check_wav_header(b"RIFF", &limits).is_ok());
        assert!(check_wav_header(b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0", &limits).is_ok());
        assert!(check_wav_header(b"fLaC whatever", &limits).is_ok());
        // A chunk size near u32::MAX must not overflow.
        assert!(check_wav_header(b"RIFF\0\0\0\0WAVELIST\xff\xff\xff\xff", &limits).is_ok());
    }
}

#[cfg(test)]
mod symphonia_alone {
    use super::*;

    /// A canonical WAV header (format tag, channels, rate, bits) followed by `data`.
    fn wav(tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
        let align = u32::from(channels) * u32::from(bits) / 8;
        let mut b = b"RIFF".to_vec();
        b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(b"WAVEfmt \x10\0\0\0");
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&rate.wrapping_mul(align).to_le_bytes());
        b.extend_from_slice(&(align as u16).to_le_bytes());
        b.extend_from_slice(&bits.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    /// Without the header pre-check, hostile WAV headers still give errors, not panics.
    #[test]
    fn hostile_headers_without_the_precheck() {
        let limits = Limits::default();
        for bytes in [
            wav(1, 0, 16_000, 16, &[0; 64]),
            wav(1, 5000, 16_000, 16, &[0; 20_000]),
            wav(1, 1, 1_000_000_000, 16, &[0; 64]),
            wav(1, 1, 0, 16, &[0; 64]),
            wav(1, 1, 16_000, 0, &[0; 64]),
            wav(3, 1, 16_000, 13, &[0; 64]),
        ] {
            let r = decode_symphonia(&bytes, None, &limits);
            assert!(r.is_err(), "{r:?}");
        }
    }
}
