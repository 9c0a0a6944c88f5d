//! Every kind of bad input gives the right error, never a panic.

mod common;

use cadenza_audio::{
    AudioError, Limits, Pcm, RawEncoding, WavFormat, decode, decode_file, decode_raw, encode_wav,
};
use common::{garbage, wav_bytes};

fn limits() -> Limits {
    Limits::default()
}

/// One second of 16-bit stereo silence-ish at 16 kHz.
fn valid_wav() -> Vec<u8> {
    let samples: Vec<f32> = (0..32_000)
        .map(|i| ((i % 100) as f32 - 50.0) / 100.0)
        .collect();
    encode_wav(&Pcm::new(16_000, 2, samples).unwrap(), WavFormat::I16).unwrap()
}

#[test]
fn zero_bytes() {
    let err = decode(&[], &limits()).unwrap_err();
    assert!(matches!(err, AudioError::Empty), "{err:?}");
    assert!(!err.is_limit());
    assert!(err.to_string().contains("empty"));
}

#[test]
fn random_garbage() {
    for seed in 1..20 {
        for len in [1, 3, 16, 100, 4096] {
            let err = decode(&garbage(len, seed), &limits()).unwrap_err();
            assert!(
                matches!(
                    err,
                    AudioError::UnsupportedFormat(_)
                        | AudioError::Malformed(_)
                        | AudioError::Truncated(_)
                ),
                "seed {seed}, len {len}: {err:?}"
            );
            assert!(!err.is_limit());
        }
    }
    let err = decode(b"this is not audio at all, just some text", &limits()).unwrap_err();
    assert!(matches!(err, AudioError::UnsupportedFormat(_)), "{err:?}");
    assert!(err.to_string().starts_with("unsupported audio format"));
}

#[test]
fn garbage_after_a_wav_signature() {
    for seed in 1..20 {
        let mut bytes = b"RIFF\x00\x10\x00\x00WAVE".to_vec();
        bytes.extend(garbage(200, seed));
        assert!(decode(&bytes, &limits()).is_err());
    }
}

#[test]
fn truncated_wav_header() {
    let wav = valid_wav();
    for cut in [4, 12, 20, 30, 40, 43] {
        let err = decode(&wav[..cut], &limits()).unwrap_err();
        assert!(
            matches!(
                err,
                AudioError::Truncated(_)
                    | AudioError::Malformed(_)
                    | AudioError::UnsupportedFormat(_)
            ),
            "cut at {cut}: {err:?}"
        );
    }
    // Header complete, no data.
    let err = decode(&wav[..44], &limits()).unwrap_err();
    assert!(
        matches!(err, AudioError::Truncated(_) | AudioError::Empty),
        "{err:?}"
    );
    // Header complete, data cut: what is there is kept.
    let pcm = decode(&wav[..44 + 4 * 1000 + 2], &limits()).unwrap();
    assert_eq!(pcm.channels, 2);
    assert!(
        pcm.frames() <= 1001 && pcm.frames() >= 900,
        "{}",
        pcm.frames()
    );
}

#[test]
fn wav_header_with_zero_channels() {
    let err = decode(&wav_bytes(1, 0, 16_000, 16, &[0; 64]), &limits()).unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::BadChannels {
                channels: 0,
                max: 8
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("channel count 0"));
}

#[test]
fn wav_header_with_5000_channels() {
    let err = decode(&wav_bytes(1, 5000, 16_000, 16, &[0; 20_000]), &limits()).unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::BadChannels {
                channels: 5000,
                max: 8
            }
        ),
        "{err:?}"
    );
}

#[test]
fn wav_header_with_a_billion_hz() {
    let err = decode(&wav_bytes(1, 1, 1_000_000_000, 16, &[0; 64]), &limits()).unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::BadSampleRate {
                rate: 1_000_000_000,
                min: 4000,
                max: 192_000
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("1000000000 Hz"));
    // And a rate of zero.
    let err = decode(&wav_bytes(1, 1, 0, 16, &[0; 64]), &limits()).unwrap_err();
    assert!(
        matches!(err, AudioError::BadSampleRate { rate: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn float_wav_with_nan() {
    let mut data = Vec::new();
    for v in [0.0f32, 0.5, f32::NAN, 0.25] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let err = decode(&wav_bytes(3, 1, 16_000, 32, &data), &limits()).unwrap_err();
    assert!(matches!(err, AudioError::NonFinite { index: 2 }), "{err:?}");
    let mut data = Vec::new();
    for v in [0.0f32, f32::INFINITY] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let err = decode(&wav_bytes(3, 1, 16_000, 32, &data), &limits()).unwrap_err();
    assert!(matches!(err, AudioError::NonFinite { index: 1 }), "{err:?}");
}

#[test]
fn float_wav_that_is_valid_decodes() {
    let mut data = Vec::new();
    for v in [0.0f32, 0.5, -0.25, 1.0] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let pcm = decode(&wav_bytes(3, 2, 16_000, 32, &data), &limits()).unwrap();
    assert_eq!(pcm.channels, 2);
    assert_eq!(pcm.samples, vec![0.0, 0.5, -0.25, 1.0]);
}

#[test]
fn longer_than_the_limit() {
    let short = Limits {
        max_seconds: 0.5,
        ..Limits::default()
    };
    let err = decode(&valid_wav(), &short).unwrap_err();
    match &err {
        AudioError::TooLong {
            seconds,
            max_seconds,
        } => {
            assert_eq!(*max_seconds, 0.5);
            assert!(*seconds > 0.5 && *seconds < 0.75, "{seconds}");
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
    assert!(err.is_limit());
    // Exactly at the limit is fine.
    let exact = Limits {
        max_seconds: 1.0,
        ..Limits::default()
    };
    assert_eq!(decode(&valid_wav(), &exact).unwrap().frames(), 16_000);
}

#[test]
fn larger_than_the_limit() {
    let small = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let wav = valid_wav();
    let err = decode(&wav, &small).unwrap_err();
    assert!(
        matches!(err, AudioError::TooLarge { bytes, max_bytes: 1000 } if bytes == wav.len()),
        "{err:?}"
    );
    assert!(err.is_limit());
    let path = std::env::temp_dir().join(format!("cadenza-audio-large-{}.wav", std::process::id()));
    std::fs::write(&path, &wav).unwrap();
    let err = decode_file(&path, &small).unwrap_err();
    std::fs::remove_file(&path).ok();
    assert!(matches!(err, AudioError::TooLarge { .. }), "{err:?}");
}

#[test]
fn too_many_channels_for_custom_limits() {
    let mono_only = Limits {
        max_channels: 1,
        ..Limits::default()
    };
    let err = decode(&valid_wav(), &mono_only).unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::BadChannels {
                channels: 2,
                max: 1
            }
        ),
        "{err:?}"
    );
}

#[test]
fn missing_file() {
    let err = decode_file(
        std::path::Path::new("/nonexistent/cadenza/audio.wav"),
        &limits(),
    )
    .unwrap_err();
    assert!(matches!(err, AudioError::Io(_)), "{err:?}");
    assert!(!err.is_limit());
}

#[test]
fn raw_length_not_a_multiple_of_the_frame() {
    let err = decode_raw(&[0; 7], RawEncoding::S16Le, 16_000, 2, &limits()).unwrap_err();
    assert!(
        matches!(
            err,
            AudioError::BadRawLength {
                bytes: 7,
                frame_bytes: 4
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("not a multiple of the frame size 4")
    );
    let err = decode_raw(&[0; 12], RawEncoding::F32Le, 16_000, 2, &limits()).unwrap_err();
    assert!(matches!(
        err,
        AudioError::BadRawLength {
            bytes: 12,
            frame_bytes: 8
        }
    ));
    let err = decode_raw(&[], RawEncoding::F32Le, 16_000, 2, &limits()).unwrap_err();
    assert!(matches!(err, AudioError::Empty));
}

#[test]
fn only_limit_errors_are_limits() {
    let limit = [
        AudioError::TooLong {
            seconds: 2.0,
            max_seconds: 1.0,
        },
        AudioError::TooLarge {
            bytes: 2,
            max_bytes: 1,
        },
    ];
    assert!(limit.iter().all(AudioError::is_limit));
    let not_limit = [
        AudioError::Empty,
        AudioError::Truncated("x".into()),
        AudioError::Malformed("x".into()),
        AudioError::UnsupportedFormat("x".into()),
        AudioError::NonFinite { index: 0 },
        AudioError::BadChannels {
            channels: 0,
            max: 8,
        },
        AudioError::BadSampleRate {
            rate: 0,
            min: 1,
            max: 2,
        },
        AudioError::UnsupportedChannels { from: 6, to: 2 },
        AudioError::BadRawLength {
            bytes: 3,
            frame_bytes: 2,
        },
        AudioError::Resample("x".into()),
        AudioError::Io(std::io::Error::other("x")),
        AudioError::Wav("x".into()),
    ];
    for e in &not_limit {
        assert!(!e.is_limit(), "{e:?}");
        assert!(!e.to_string().is_empty());
    }
}
