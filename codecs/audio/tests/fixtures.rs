//! Decoding the committed FLAC, MP3 and OGG/Vorbis fixtures (made by `tests/data/make.sh`):
//! a stereo tone, 440 Hz left and 880 Hz right, amplitude 0.5 (FLAC: 1 s at 22.05 kHz;
//! OGG/Vorbis: 3 s at 22.05 kHz; MP3: 0.5 s at 44.1 kHz).

mod common;

use cadenza_audio::{AudioError, Limits, decode, decode_file, decode_with_hint};
use common::{estimate_freq, fixture, rms};

/// Check a decoded fixture: rate, both channels with their own tone, duration.
fn check_tone(name: &str, rate: u32, seconds: f64, duration_tolerance: f64) {
    let pcm =
        decode_file(&fixture(name), &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(pcm.sample_rate, rate, "{name}");
    assert_eq!(pcm.channels, 2, "{name}: both channels must be decoded");
    assert!(
        (pcm.duration_secs() - seconds).abs() <= duration_tolerance,
        "{name}: duration {} s, expected {seconds} s",
        pcm.duration_secs()
    );
    let (left, right) = (pcm.channel(0), pcm.channel(1));
    let (fl, fr) = (estimate_freq(&left, rate), estimate_freq(&right, rate));
    assert!(
        (fl - 440.0).abs() < 440.0 * 0.01,
        "{name}: left tone at {fl} Hz"
    );
    assert!(
        (fr - 880.0).abs() < 880.0 * 0.01,
        "{name}: right tone at {fr} Hz"
    );
    // A 0.5 amplitude sine has an RMS of 0.354.
    for (ch, x) in [("left", &left), ("right", &right)] {
        let r = rms(x);
        assert!((r - 0.3536).abs() < 0.05, "{name}: {ch} rms {r}");
    }
    assert!(pcm.samples.iter().all(|s| s.is_finite() && s.abs() <= 1.0));
}

#[test]
fn flac_fixture() {
    check_tone("tone.flac", 22_050, 1.0, 1e-9);
}

#[test]
fn ogg_vorbis_fixture() {
    check_tone("tone.ogg", 22_050, 3.0, 0.01);
}

#[test]
fn mp3_fixture() {
    check_tone("tone.mp3", 44_100, 0.5, 0.06);
}

#[test]
fn memory_decode_matches_file_decode() {
    for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let from_file = decode_file(&fixture(name), &Limits::default()).unwrap();
        let from_memory = decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(from_file, from_memory, "{name}");
        // A wrong hint does no harm.
        let wrong = decode_with_hint(&bytes, Some("wav"), &Limits::default()).unwrap();
        assert_eq!(wrong, from_memory, "{name}");
    }
}

#[test]
fn fixtures_longer_than_the_limit_are_rejected() {
    let limits = Limits {
        max_seconds: 0.25,
        ..Limits::default()
    };
    for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
        let err = decode_file(&fixture(name), &limits).unwrap_err();
        match err {
            AudioError::TooLong {
                seconds,
                max_seconds,
            } => {
                assert_eq!(max_seconds, 0.25);
                // Decoding stopped soon after the limit, not at the end of the file.
                assert!(
                    seconds > 0.25 && seconds < 0.45,
                    "{name}: stopped at {seconds}"
                );
            }
            other => panic!("{name}: expected TooLong, got {other:?}"),
        }
    }
}

#[test]
fn fixtures_with_too_many_channels_for_the_limits_are_rejected() {
    let limits = Limits {
        max_channels: 1,
        ..Limits::default()
    };
    for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
        let err = decode_file(&fixture(name), &limits).unwrap_err();
        assert!(
            matches!(
                err,
                AudioError::BadChannels {
                    channels: 2,
                    max: 1
                }
            ),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn fixtures_outside_the_rate_limits_are_rejected() {
    let limits = Limits {
        max_sample_rate: 16_000,
        ..Limits::default()
    };
    for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
        let err = decode_file(&fixture(name), &limits).unwrap_err();
        assert!(
            matches!(err, AudioError::BadSampleRate { max: 16_000, .. }),
            "{name}: {err:?}"
        );
    }
}

/// Cut and corrupted versions of every fixture must give a result or an error, never a panic.
#[test]
fn damaged_fixtures_never_panic() {
    for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let step = (bytes.len() / 40).max(1);
        for cut in (0..bytes.len()).step_by(step) {
            let r = decode(&bytes[..cut], &Limits::default());
            if let Ok(pcm) = r {
                assert!(pcm.frames() > 0);
                assert_eq!(pcm.channels, 2);
            }
        }
        for (i, at) in (bytes.len() / 10..bytes.len()).step_by(step).enumerate() {
            let mut damaged = bytes.clone();
            let junk = common::garbage(64, i as u64 + 1);
            let end = (at + junk.len()).min(damaged.len());
            damaged[at..end].copy_from_slice(&junk[..end - at]);
            let _ = decode(&damaged, &Limits::default());
        }
    }
}

#[test]
fn mid_file_damage_keeps_the_rest() {
    // Damage a stretch in the middle of the MP3: the frames around it still decode.
    let bytes = std::fs::read(fixture("tone.mp3")).unwrap();
    let mut damaged = bytes.clone();
    let mid = bytes.len() / 2;
    for b in &mut damaged[mid..mid + 200] {
        *b = 0xAA;
    }
    let pcm = decode(&damaged, &Limits::default()).unwrap();
    assert_eq!(pcm.channels, 2);
    assert!(pcm.duration_secs() > 0.3, "{}", pcm.duration_secs());
}

#[test]
fn truncated_fixtures_keep_what_decoded() {
    for name in ["tone.flac", "tone.ogg", "tone.mp3"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let full = decode(&bytes, &Limits::default()).unwrap();
        let cut = decode(&bytes[..bytes.len() * 9 / 10], &Limits::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cut.channels, 2, "{name}");
        assert!(
            cut.frames() > full.frames() / 2 && cut.frames() < full.frames(),
            "{name}: {} of {} frames",
            cut.frames(),
            full.frames()
        );
    }
}
