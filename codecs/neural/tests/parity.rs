//! Parity with transformers' `EncodecModel` on the random-weight fixtures written by
//! `tools/fixtures/encodec.py`: codes must match exactly, audio within 1e-4; streaming decode and
//! encode must equal the whole-sequence results.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use cadenza_codecs::{Encodec, StreamDecoder, StreamEncoder};
use candle_core::{DType, Device, IndexOp, Tensor};

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/encodec")
        .join(name)
}

fn load(name: &str, io: &str) -> Result<(Encodec, HashMap<String, Tensor>)> {
    let dir = fixture_dir(name);
    let model = Encodec::load(&dir, &Device::Cpu).with_context(|| format!("loading {name}"))?;
    let io = candle_core::safetensors::load(dir.join(io), &Device::Cpu)?;
    Ok((model, io))
}

fn bandwidths(io: &HashMap<String, Tensor>) -> Vec<String> {
    let mut bws: Vec<String> = io
        .keys()
        .filter_map(|k| k.strip_prefix("codes.").map(str::to_string))
        .collect();
    bws.sort();
    bws
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn scales_of(
    io: &HashMap<String, Tensor>,
    bw: &str,
    normalize: bool,
) -> Result<Vec<Option<Tensor>>> {
    let s = &io[&format!("scales.{bw}")];
    let n = s.dim(0)?;
    (0..n)
        .map(|i| {
            if normalize {
                Ok(Some(s.narrow(0, i, 1)?))
            } else {
                Ok(None)
            }
        })
        .collect()
}

fn check_fixture(name: &str, io_file: &str) -> Result<()> {
    let (model, io) = load(name, io_file)?;
    let input = &io["input"];
    let normalize = model.config().normalize;
    let bws = bandwidths(&io);
    assert!(!bws.is_empty());
    for bw in &bws {
        let bw_f: f32 = bw.parse()?;
        let want = io[&format!("codes.{bw}")].to_dtype(DType::U32)?;
        let got = model.encode(input, Some(bw_f))?;
        assert_eq!(got.codes.dims(), want.dims(), "{name} bw {bw}: code shape");
        let same = got
            .codes
            .eq(&want)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert_eq!(
            same, 1.0,
            "{name} bw {bw}: codes differ (fraction equal {same})"
        );
        let pad = io[&format!("last_frame_pad_length.{bw}")].to_vec1::<i64>()?[0] as usize;
        assert_eq!(
            got.last_frame_pad_length, pad,
            "{name} bw {bw}: last_frame_pad_length"
        );
        if normalize {
            let want_s = io[&format!("scales.{bw}")].to_vec1::<f32>()?;
            for (i, s) in got.scales.iter().enumerate() {
                let s = s.as_ref().context("scale")?.to_vec1::<f32>()?[0];
                assert!(
                    (s - want_s[i]).abs() <= 1e-5 * want_s[i].abs().max(1.0),
                    "{name} scale {i}"
                );
            }
        }

        // decode(codes, scales) as recorded (no last_frame_pad_length passed).
        let scales = scales_of(&io, bw, normalize)?;
        let audio = model.decode(&want, &scales, 0)?;
        let d = max_abs_diff(&audio, &io[&format!("decoded.{bw}")])?;
        assert!(d <= 1e-4, "{name} bw {bw}: decode max abs diff {d}");

        // forward = decode with the pad removed, trimmed to the input length.
        let audio = model.decode(&want, &scales, pad)?;
        let n = input.dim(2)?;
        let audio = audio.narrow(2, 0, n.min(audio.dim(2)?))?;
        let d = max_abs_diff(&audio, &io[&format!("forward.{bw}")])?;
        assert!(d <= 1e-4, "{name} bw {bw}: forward max abs diff {d}");
    }
    Ok(())
}

#[test]
fn causal24_matches_reference() -> Result<()> {
    check_fixture("causal24", "io.safetensors")
}

#[test]
fn causal24_short_input_matches_reference() -> Result<()> {
    check_fixture("causal24", "io_short.safetensors")
}

#[test]
fn noncausal32_legacy_keys_matches_reference() -> Result<()> {
    check_fixture("noncausal32", "io.safetensors")
}

#[test]
fn norm48_chunked_matches_reference() -> Result<()> {
    check_fixture("norm48", "io.safetensors")
}

/// Streaming decode in uneven chunks equals the whole-sequence decode.
fn check_stream_decode(name: &str) -> Result<()> {
    let (model, io) = load(name, "io.safetensors")?;
    let bw = bandwidths(&io).pop().context("no bandwidth")?;
    let codes = io[&format!("codes.{bw}")].to_dtype(DType::U32)?.i((0, 0))?; // (n_q, T)
    let full = model
        .decode(&codes.unsqueeze(0)?.unsqueeze(0)?, &[None], 0)?
        .i(0)?;
    let frames = codes.dim(1)?;
    for chunking in [vec![1usize], vec![3, 7, 1, 12], vec![25]] {
        let mut dec = StreamDecoder::new(&model)?;
        let mut parts = Vec::new();
        let (mut pos, mut i) = (0, 0);
        while pos < frames {
            let n = chunking[i % chunking.len()].min(frames - pos);
            parts.push(dec.push(&model, &codes.narrow(1, pos, n)?)?);
            pos += n;
            i += 1;
        }
        parts.push(dec.finish(&model)?);
        let streamed = Tensor::cat(&parts, 1)?;
        let d = max_abs_diff(&streamed, &full)?;
        assert!(
            d <= 1e-4,
            "{name} chunking {chunking:?}: stream decode max abs diff {d}"
        );
        if model.config().use_causal_conv {
            // A causal model has no look-ahead once started: after pushing frame t, audio up to
            // t is out (the first window waits for 8 frames, see `streaming.rs`).
            let mut dec = StreamDecoder::new(&model)?;
            let out = dec.push(&model, &codes.narrow(1, 0, 10)?)?;
            assert_eq!(out.dim(1)?, 10 * model.config().hop_length());
            let out = dec.push(&model, &codes.narrow(1, 10, 1)?)?;
            assert_eq!(out.dim(1)?, model.config().hop_length());
        }
    }
    Ok(())
}

#[test]
fn causal24_stream_decode_equals_decode() -> Result<()> {
    check_stream_decode("causal24")
}

#[test]
fn noncausal32_stream_decode_equals_decode() -> Result<()> {
    check_stream_decode("noncausal32")
}

/// Streaming encode in uneven chunks gives exactly the whole-sequence codes.
fn check_stream_encode(name: &str) -> Result<()> {
    let (model, io) = load(name, "io.safetensors")?;
    for bw in bandwidths(&io) {
        let want = io[&format!("codes.{bw}")].to_dtype(DType::U32)?.i((0, 0))?;
        let input = io["input"].i(0)?; // (C, T)
        let len = input.dim(1)?;
        for chunk in [997usize, 4800, 16000] {
            let mut enc = StreamEncoder::new(&model, Some(bw.parse()?))?;
            let mut parts = Vec::new();
            let mut pos = 0;
            while pos < len {
                let n = chunk.min(len - pos);
                parts.push(enc.push(&model, &input.narrow(1, pos, n)?)?);
                pos += n;
            }
            parts.push(enc.finish(&model)?);
            let got = Tensor::cat(&parts, 1)?;
            assert_eq!(got.dims(), want.dims(), "{name} chunk {chunk}");
            let same = got
                .eq(&want)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?;
            assert_eq!(
                same, 1.0,
                "{name} bw {bw} chunk {chunk}: streamed codes differ ({same})"
            );
        }
    }
    Ok(())
}

#[test]
fn causal24_stream_encode_equals_encode() -> Result<()> {
    check_stream_encode("causal24")
}

#[test]
fn noncausal32_stream_encode_equals_encode() -> Result<()> {
    check_stream_encode("noncausal32")
}

#[test]
fn bad_bandwidth_and_channels_are_errors() -> Result<()> {
    let (model, io) = load("causal24", "io.safetensors")?;
    let err = model
        .encode(&io["input"], Some(7.0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not supported"), "{err}");
    let stereo = Tensor::zeros((1, 2, 1000), DType::F32, &Device::Cpu)?;
    assert!(model.encode(&stereo, None).is_err());
    let bad_codes = Tensor::zeros((1, 1, 40, 5), DType::U32, &Device::Cpu)?;
    assert!(model.decode(&bad_codes, &[None], 0).is_err());
    Ok(())
}
