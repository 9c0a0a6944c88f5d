//! Resampling keeps frequency, length and alignment; streaming equals whole-signal resampling;
//! `conform` converts channels and rate.

mod common;

use cadenza_audio::{AudioError, Pcm, StreamResampler, resample};
use common::{estimate_freq, interleave, rms, sine};

/// Largest difference between `y` and a sine of `freq` at `rate`, skipping `edge` samples at
/// each end.
fn max_error_vs_sine(y: &[f32], freq: f64, rate: u32, amp: f64, edge: usize) -> f64 {
    let reference = sine(freq, rate, y.len(), amp);
    y.iter()
        .zip(&reference)
        .skip(edge)
        .take(y.len() - 2 * edge)
        .map(|(a, b)| f64::from(a - b).abs())
        .fold(0.0, f64::max)
}

#[test]
fn downsample_44100_to_24000_keeps_frequency_and_length() {
    let x = sine(1000.0, 44_100, 44_100, 0.5);
    let y = resample(&x, 44_100, 24_000).unwrap();
    assert_eq!(y.len(), 24_000);
    let f = estimate_freq(&y, 24_000);
    assert!((f - 1000.0).abs() < 0.5, "{f}");
    assert!((rms(&y) - 0.5 / 2f64.sqrt()).abs() < 1e-3);
    // Time-aligned with the input: equal to a sine sampled at 24 kHz, away from the edges.
    let err = max_error_vs_sine(&y, 1000.0, 24_000, 0.5, 200);
    assert!(err < 1e-3, "max error {err}");
}

#[test]
fn odd_lengths_round_to_nearest() {
    for (n, from, to) in [
        (1000, 44_100, 24_000),
        (12_345, 44_100, 24_000),
        (777, 16_000, 44_100),
        (5, 48_000, 16_000),
    ] {
        let x = sine(200.0, from, n, 0.5);
        let y = resample(&x, from, to).unwrap();
        let want = (n as f64 * f64::from(to) / f64::from(from)).round() as usize;
        assert_eq!(y.len(), want, "{n} frames {from}->{to}");
    }
}

#[test]
fn upsample_16000_to_48000() {
    let x = sine(440.0, 16_000, 16_000, 0.7);
    let y = resample(&x, 16_000, 48_000).unwrap();
    assert_eq!(y.len(), 48_000);
    let err = max_error_vs_sine(&y, 440.0, 48_000, 0.7, 600);
    assert!(err < 1e-3, "max error {err}");
}

#[test]
fn removes_content_above_the_new_nyquist() {
    // 15 kHz cannot exist at 24 kHz; the anti-aliasing filter must remove it.
    let x = sine(15_000.0, 44_100, 44_100, 0.5);
    let y = resample(&x, 44_100, 24_000).unwrap();
    assert!(rms(&y) < 1e-3, "aliased energy {}", rms(&y));
}

/// Push `x` through a stream resampler in chunks whose sizes cycle through `sizes` (frames).
fn stream(x: &[f32], channels: u16, from: u32, to: u32, sizes: &[usize]) -> Vec<f32> {
    let mut r = StreamResampler::new(from, to, channels).unwrap();
    let ch = usize::from(channels);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut k = 0;
    while pos < x.len() {
        let n = (sizes[k % sizes.len()] * ch).min(x.len() - pos);
        out.extend(r.push(&x[pos..pos + n]).unwrap());
        pos += n;
        k += 1;
    }
    out.extend(r.finish().unwrap());
    out
}

#[test]
fn stream_resampler_matches_whole_signal_mono() {
    let x: Vec<f32> = sine(440.0, 44_100, 30_000, 0.4)
        .iter()
        .zip(sine(3000.0, 44_100, 30_000, 0.3))
        .map(|(a, b)| a + b)
        .collect();
    let whole = resample(&x, 44_100, 24_000).unwrap();
    for sizes in [
        &[1usize][..],
        &[7, 100, 0, 441, 4410][..],
        &[960][..],
        &[30_000][..],
        &[1023, 1025, 3][..],
    ] {
        let streamed = stream(&x, 1, 44_100, 24_000, sizes);
        assert_eq!(streamed.len(), whole.len(), "chunk sizes {sizes:?}");
        let max = whole
            .iter()
            .zip(&streamed)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 1e-3, "chunk sizes {sizes:?}: max difference {max}");
    }
}

#[test]
fn stream_resampler_matches_whole_signal_stereo() {
    let frames = 20_000;
    let left = sine(440.0, 24_000, frames, 0.5);
    let right = sine(1234.0, 24_000, frames, 0.25);
    let x = interleave(&[left.clone(), right.clone()]);
    for (from, to) in [(24_000, 44_100), (24_000, 16_000)] {
        let (left, right) = (
            sine(440.0, from, frames, 0.5),
            sine(1234.0, from, frames, 0.25),
        );
        let x = interleave(&[left.clone(), right.clone()]);
        let streamed = stream(&x, 2, from, to, &[333, 1, 2048, 17]);
        let pcm = Pcm::new(to, 2, streamed).unwrap();
        for (c, plane) in [left, right].iter().enumerate() {
            let whole = resample(plane, from, to).unwrap();
            let got = pcm.channel(c);
            assert_eq!(got.len(), whole.len());
            let max = whole
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max < 1e-3, "{from}->{to} channel {c}: {max}");
        }
    }
    // Identity rates pass through unchanged.
    assert_eq!(stream(&x, 2, 24_000, 24_000, &[100, 7]), x);
}

#[test]
fn stream_resampler_rejects_bad_chunks() {
    let mut r = StreamResampler::new(44_100, 24_000, 2).unwrap();
    assert!(matches!(
        r.push(&[0.0; 5]),
        Err(AudioError::Misaligned {
            samples: 5,
            channels: 2
        })
    ));
    assert!(matches!(
        r.push(&[0.0, f32::NAN]),
        Err(AudioError::NonFinite { index: 1 })
    ));
    // Still usable afterwards.
    assert!(r.push(&[0.0; 4]).is_ok());
    // round(2 * 24000 / 44100) = 1 frame of 2 samples.
    assert_eq!(r.finish().unwrap().len(), 2);
    assert!(matches!(
        StreamResampler::new(44_100, 10, 1),
        Err(AudioError::BadSampleRate { rate: 10, .. })
    ));
}

#[test]
fn conform_stereo_44100_to_mono_24000() {
    let frames = 44_100;
    let left = sine(500.0, 44_100, frames, 0.6);
    let right = sine(500.0, 44_100, frames, 0.2);
    let pcm = Pcm::new(44_100, 2, interleave(&[left, right])).unwrap();
    let out = pcm.conform(24_000, 1).unwrap();
    assert_eq!(out.channels, 1);
    assert_eq!(out.sample_rate, 24_000);
    assert_eq!(out.frames(), 24_000);
    // The average of the two channels is a 0.4 amplitude sine.
    let err = max_error_vs_sine(&out.samples, 500.0, 24_000, 0.4, 200);
    assert!(err < 1e-3, "{err}");
}

#[test]
fn conform_mono_16000_to_stereo_24000() {
    let pcm = Pcm::new(16_000, 1, sine(300.0, 16_000, 8000, 0.5)).unwrap();
    let out = pcm.conform(24_000, 2).unwrap();
    assert_eq!(
        (out.channels, out.sample_rate, out.frames()),
        (2, 24_000, 12_000)
    );
    assert_eq!(out.channel(0), out.channel(1));
    let err = max_error_vs_sine(&out.channel(0), 300.0, 24_000, 0.5, 200);
    assert!(err < 1e-3, "{err}");
}

#[test]
fn conform_same_format_is_identity_and_bad_combinations_fail() {
    let pcm = Pcm::new(24_000, 2, vec![0.1, 0.2, 0.3, 0.4]).unwrap();
    assert_eq!(pcm.conform(24_000, 2).unwrap(), pcm);
    let mono = pcm.conform(24_000, 1).unwrap();
    assert!((mono.samples[0] - 0.15).abs() < 1e-6 && (mono.samples[1] - 0.35).abs() < 1e-6);
    for to in [0, 3, 6] {
        assert!(matches!(
            pcm.conform(24_000, to),
            Err(AudioError::UnsupportedChannels { from: 2, .. })
        ));
    }
    let six = Pcm::new(48_000, 6, vec![0.0; 60]).unwrap();
    assert!(matches!(
        six.conform(24_000, 2),
        Err(AudioError::UnsupportedChannels { from: 6, to: 2 })
    ));
    // Six channels to mono is a plain average.
    assert_eq!(six.conform(24_000, 1).unwrap().frames(), 5);
}
