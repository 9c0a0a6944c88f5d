//! Parity of the fbank / LFR / CMVN frontend with torchaudio's Kaldi fbank and FunASR's
//! `WavFrontend` (fixtures from `tools/fixtures/paraformer.py`).

use std::path::PathBuf;

use cadenza_audio::{Cmvn, Frontend, FrontendConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/paraformer")
        .join(name)
}

fn tensor(st: &safetensors::SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fbank_lfr_cmvn_match_funasr() {
    for name in ["tiny", "tiny-d2"] {
        let dir = fixture(name);
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, wave) = tensor(&st, "wave");
        let (fshape, fbank_ref) = tensor(&st, "fbank");
        let (shape, feats_ref) = tensor(&st, "feats");

        let cmvn = Cmvn::from_file(dir.join("am.mvn")).unwrap();
        let fe = Frontend::new(FrontendConfig::default(), Some(cmvn)).unwrap();
        let mut rng = cadenza_audio::DitherRng::new(0);
        let fbank = fe.fbank().compute(&wave, &mut rng);
        assert_eq!(fbank.len(), fshape[0] * fshape[1]);
        let d_fbank = max_diff(&fbank, &fbank_ref);

        let feats = fe.features(&wave);
        assert_eq!([feats.frames(), feats.dim], [shape[0], shape[1]]);
        let d_feats = max_diff(&feats.data, &feats_ref);
        println!("{name}: fbank max |diff| {d_fbank:.2e}, LFR+CMVN feats max |diff| {d_feats:.2e}");
        assert!(d_fbank < 1e-3, "{name}: fbank diff {d_fbank}");
        assert!(d_feats < 1e-3, "{name}: feats diff {d_feats}");

        // Streaming in 600 ms-ish odd chunks gives the same frames.
        let mut s = fe.stream();
        let mut got = cadenza_audio::Features::default();
        for c in wave.chunks(9601) {
            got.extend(&s.push(c));
        }
        got.extend(&s.finish());
        assert_eq!(got, feats);
    }
}

/// VTLN-warped mel banks (Kaldi `--vtln-warp`, torchaudio's `get_mel_banks` with a warp factor)
/// match torchaudio on the same wave (fixtures from `tools/fixtures/fbank_vtln.py`), and differ
/// from the unwarped fbank (so the warp is really applied).
#[test]
fn vtln_warped_fbank_matches_torchaudio() {
    let dir = fixture("tiny");
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, wave) = tensor(&st, "wave");
    let (_, plain) = tensor(&st, "fbank");
    let bytes = std::fs::read(dir.join("fbank_vtln.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (warp, name) in [(0.88f32, "fbank_vtln088"), (1.12, "fbank_vtln112")] {
        let (shape, want) = tensor(&st, name);
        let fb = cadenza_audio::Fbank::new(cadenza_audio::FbankOptions {
            vtln_warp: warp,
            ..Default::default()
        })
        .unwrap();
        let got = fb.compute(&wave, &mut cadenza_audio::DitherRng::new(0));
        assert_eq!(got.len(), shape[0] * shape[1]);
        let d = max_diff(&got, &want);
        let moved = max_diff(&got, &plain);
        println!("warp {warp}: max |diff| {d:.2e} (vs unwarped {moved:.2})");
        assert!(d < 1e-3, "warp {warp}: diff {d}");
        assert!(
            moved > 0.5,
            "warp {warp}: the warp changed nothing ({moved})"
        );
    }
}

#[test]
fn vtln_warp_outside_the_mel_range_is_refused() {
    for warp in [0.0f32, -1.0, f32::NAN, 100.0] {
        let r = cadenza_audio::Fbank::new(cadenza_audio::FbankOptions {
            vtln_warp: warp,
            ..Default::default()
        });
        assert!(r.is_err(), "warp {warp} accepted");
    }
}
