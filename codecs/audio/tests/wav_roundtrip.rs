//! WAV written by `encode_wav` / `write_wav` decodes back to the same audio, all channels kept.

mod common;

use cadenza_audio::{
    Limits, Pcm, RawEncoding, WavFormat, decode, decode_file, decode_raw, encode_wav, to_f32le,
    to_s16le, write_wav,
};
use common::{estimate_freq, interleave, sine};

/// Stereo with different content per channel: 300 Hz left, 1 kHz right, plus a ramp.
fn stereo(rate: u32, frames: usize) -> Pcm {
    let left = sine(300.0, rate, frames, 0.8);
    let right: Vec<f32> = sine(1000.0, rate, frames, 0.3)
        .iter()
        .enumerate()
        .map(|(i, s)| s + 0.2 * (i as f32 / frames as f32))
        .collect();
    Pcm::new(rate, 2, interleave(&[left, right])).unwrap()
}

#[test]
fn f32_round_trip_is_exact() {
    for pcm in [
        stereo(16_000, 4000),
        Pcm::new(24_000, 1, sine(440.0, 24_000, 2400, 1.0)).unwrap(),
        Pcm::new(
            48_000,
            6,
            (0..6 * 480).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect(),
        )
        .unwrap(),
    ] {
        let bytes = encode_wav(&pcm, WavFormat::F32).unwrap();
        let back = decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, pcm);
    }
}

#[test]
fn i16_round_trip_within_one_step() {
    let pcm = stereo(22_050, 5000);
    let bytes = encode_wav(&pcm, WavFormat::I16).unwrap();
    assert_eq!(bytes.len(), 44 + 2 * 2 * 5000);
    let back = decode(&bytes, &Limits::default()).unwrap();
    assert_eq!(back.sample_rate, 22_050);
    assert_eq!(back.channels, 2, "channels must not be lost");
    assert_eq!(back.frames(), 5000);
    for (a, b) in pcm.samples.iter().zip(&back.samples) {
        assert!((a - b).abs() <= 0.5 / 32768.0 + 1e-7, "{a} vs {b}");
    }
    // Each channel keeps its own tone.
    assert!((estimate_freq(&back.channel(0), 22_050) - 300.0).abs() < 1.0);
    assert!((estimate_freq(&back.channel(1), 22_050) - 1000.0).abs() < 3.0);
}

#[test]
fn i16_clamps_out_of_range_samples() {
    let pcm = Pcm {
        sample_rate: 16_000,
        channels: 1,
        samples: vec![1.5, -2.0, 1.0, -1.0, 0.0],
    };
    let back = decode(
        &encode_wav(&pcm, WavFormat::I16).unwrap(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(
        back.samples,
        vec![32767.0 / 32768.0, -1.0, 32767.0 / 32768.0, -1.0, 0.0]
    );
}

#[test]
fn write_wav_and_decode_file() {
    let pcm = stereo(16_000, 1600);
    let dir = std::env::temp_dir();
    for (format, ext) in [(WavFormat::F32, "f32"), (WavFormat::I16, "i16")] {
        let path = dir.join(format!("cadenza-audio-{}-{ext}.wav", std::process::id()));
        write_wav(&path, &pcm, format).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk, encode_wav(&pcm, format).unwrap());
        let back = decode_file(&path, &Limits::default()).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(back.channels, 2);
        assert_eq!(back.frames(), 1600);
    }
}

#[test]
fn raw_bytes_round_trip() {
    let pcm = stereo(16_000, 800);
    let back = decode_raw(
        &to_f32le(&pcm.samples),
        RawEncoding::F32Le,
        16_000,
        2,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(back, pcm);
    let back = decode_raw(
        &to_s16le(&pcm.samples),
        RawEncoding::S16Le,
        16_000,
        2,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(back.channels, 2);
    for (a, b) in pcm.samples.iter().zip(&back.samples) {
        assert!((a - b).abs() <= 0.5 / 32768.0 + 1e-7);
    }
    // Raw s16 and the WAV data chunk hold the same bytes.
    let wav = encode_wav(&pcm, WavFormat::I16).unwrap();
    assert_eq!(&wav[44..], &to_s16le(&pcm.samples)[..]);
}

#[test]
fn empty_pcm_encodes_but_decodes_as_empty() {
    let pcm = Pcm::new(16_000, 1, vec![]).unwrap();
    let bytes = encode_wav(&pcm, WavFormat::I16).unwrap();
    assert_eq!(bytes.len(), 44);
    assert!(decode(&bytes, &Limits::default()).is_err());
}

#[test]
fn every_pcm_sample_format_converts_to_f32() {
    use common::wav_bytes;
    let limits = Limits::default();
    // 8-bit unsigned: 128 is silence.
    let pcm = decode(&wav_bytes(1, 1, 8000, 8, &[128, 192, 0]), &limits).unwrap();
    assert_eq!(pcm.samples, vec![0.0, 0.5, -1.0]);
    // 24-bit signed.
    let data = [0x00, 0x00, 0x40, 0x00, 0x00, 0xC0];
    let pcm = decode(&wav_bytes(1, 1, 8000, 24, &data), &limits).unwrap();
    assert_eq!(pcm.samples, vec![0.5, -0.5]);
    // 32-bit signed.
    let data: Vec<u8> = [0x4000_0000i32, -0x8000_0000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let pcm = decode(&wav_bytes(1, 2, 8000, 32, &data), &limits).unwrap();
    assert_eq!(pcm.samples, vec![0.5, -1.0]);
    // 64-bit float.
    let data: Vec<u8> = [0.25f64, -0.125]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let pcm = decode(&wav_bytes(3, 1, 8000, 64, &data), &limits).unwrap();
    assert_eq!(pcm.samples, vec![0.25, -0.125]);
    // A 64-bit float too large for f32 becomes infinite: rejected.
    let data = 1e300f64.to_le_bytes();
    let err = decode(&wav_bytes(3, 1, 8000, 64, &data), &limits).unwrap_err();
    assert!(
        matches!(err, cadenza_audio::AudioError::NonFinite { index: 0 }),
        "{err:?}"
    );
}
