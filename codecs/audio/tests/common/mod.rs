//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::f64::consts::PI;
use std::path::PathBuf;

/// Path of a committed fixture in `tests/data`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join(name)
}

/// A sine of `freq` Hz, `amp` amplitude, `frames` samples at `rate`.
pub fn sine(freq: f64, rate: u32, frames: usize, amp: f64) -> Vec<f32> {
    (0..frames)
        .map(|i| (amp * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin()) as f32)
        .collect()
}

/// Interleave equal-length channels.
pub fn interleave(channels: &[Vec<f32>]) -> Vec<f32> {
    let frames = channels[0].len();
    let mut out = Vec::with_capacity(frames * channels.len());
    for f in 0..frames {
        for c in channels {
            out.push(c[f]);
        }
    }
    out
}

/// Estimate the frequency of a tone from its rising zero crossings, using the middle 80% of
/// the signal (codec start-up and tails are ignored).
pub fn estimate_freq(x: &[f32], rate: u32) -> f64 {
    let start = x.len() / 10;
    let end = x.len() - x.len() / 10;
    let mut crossings = Vec::new();
    for i in start + 1..end {
        let (a, b) = (f64::from(x[i - 1]), f64::from(x[i]));
        if a < 0.0 && b >= 0.0 {
            // Linear interpolation of the crossing time.
            crossings.push((i - 1) as f64 + a / (a - b));
        }
    }
    assert!(crossings.len() >= 2, "no tone found");
    let periods = (crossings.len() - 1) as f64;
    let span = crossings[crossings.len() - 1] - crossings[0];
    periods * f64::from(rate) / span
}

/// Root mean square of the middle 80%.
pub fn rms(x: &[f32]) -> f64 {
    let mid = &x[x.len() / 10..x.len() - x.len() / 10];
    (mid.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / mid.len() as f64).sqrt()
}

/// A canonical 44-byte WAV header (PCM or IEEE float) followed by `data`.
pub fn wav_bytes(format_tag: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block_align = u32::from(channels) * u32::from(bits) / 8;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    b.extend_from_slice(b"WAVE");
    b.extend_from_slice(b"fmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&format_tag.to_le_bytes());
    b.extend_from_slice(&channels.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate.wrapping_mul(block_align)).to_le_bytes());
    b.extend_from_slice(&(block_align as u16).to_le_bytes());
    b.extend_from_slice(&bits.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}
