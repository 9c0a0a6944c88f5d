//! Times EnCodec encode and decode on a fixed model and input.
//!
//! ```text
//! cargo run -p cadenza-codecs --example encodec_bench -- [DIR] [N] [--profile] [--save F | --check F]
//! ```
//! `DIR` (default `/tmp/cadenza-bench-encodec24`) holds `config.json`, `model.safetensors` and
//! `input.safetensors` (key `input`, `(1, C, samples)`), as written by
//! `tools/bench/encodec_torch.py`. Prints one JSON line with the best of `N` (default 3) runs.
//! `--profile` (or `CADENZA_ENCODEC_PROFILE=1`) adds a per-layer-type breakdown of the best
//! runs on stderr. `--save F` writes codes and audio to `F`; `--check F` compares with them.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use cadenza_codecs::{Encodec, profile};
use candle_core::{DType, Device};

fn main() -> Result<()> {
    let mut dir = PathBuf::from("/tmp/cadenza-bench-encodec24");
    let mut n = 3usize;
    let mut prof = std::env::var("CADENZA_ENCODEC_PROFILE").is_ok_and(|v| v != "0");
    let (mut save, mut check) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--profile" => prof = true,
            "--save" => save = Some(args.next().context("--save FILE")?),
            "--check" => check = Some(args.next().context("--check FILE")?),
            _ => match a.parse::<usize>() {
                Ok(v) => n = v.max(1),
                Err(_) => dir = PathBuf::from(a),
            },
        }
    }
    let dev = Device::Cpu;
    let model = Encodec::load(&dir, &dev)?;
    let input = candle_core::safetensors::load(dir.join("input.safetensors"), &dev)?
        .remove("input")
        .context("input.safetensors has no `input`")?
        .to_dtype(DType::F32)?;
    let sr = model.config().sampling_rate as f64;
    let audio_s = input.dim(2)? as f64 / sr;

    // Warmup (also the run whose outputs are saved/checked).
    let enc = model.encode(&input, Some(24.0))?;
    let audio = model.decode(&enc.codes, &enc.scales, 0)?;

    profile::enable(prof);
    let (mut best_enc, mut best_dec) = (f64::INFINITY, f64::INFINITY);
    let (mut prof_enc, mut prof_dec) = (Vec::new(), Vec::new());
    for _ in 0..n {
        profile::take();
        let t = Instant::now();
        let e = model.encode(&input, Some(24.0))?;
        let dt = t.elapsed().as_secs_f64();
        let p = profile::take();
        if dt < best_enc {
            (best_enc, prof_enc) = (dt, p);
        }
        let t = Instant::now();
        let a = model.decode(&e.codes, &e.scales, 0)?;
        a.dims(); // keep the result alive until timed
        let dt = t.elapsed().as_secs_f64();
        let p = profile::take();
        if dt < best_dec {
            (best_dec, prof_dec) = (dt, p);
        }
    }
    println!(
        "{{\"impl\":\"cadenza\",\"encode_s\":{best_enc:.4},\"decode_s\":{best_dec:.4},\"audio_s\":{audio_s:.1},\"threads\":{}}}",
        candle_core::utils::get_num_threads()
    );
    if prof {
        for (what, p, total) in [
            ("encode", &prof_enc, best_enc),
            ("decode", &prof_dec, best_dec),
        ] {
            let parts: Vec<String> = p
                .iter()
                .filter(|(_, s)| *s > 0.0)
                .map(|(k, s)| format!("{k} {:.1} ms", s * 1e3))
                .collect();
            eprintln!("{what} {:.1} ms: {}", total * 1e3, parts.join(", "));
        }
    }

    if let Some(f) = save {
        let codes = enc.codes.to_dtype(DType::U32)?;
        candle_core::safetensors::save(
            &[
                ("codes".to_string(), codes),
                ("audio".to_string(), audio.clone()),
            ]
            .into_iter()
            .collect(),
            &f,
        )?;
        eprintln!("saved {f}");
    }
    if let Some(f) = check {
        let r = candle_core::safetensors::load(&f, &dev)?;
        let want = r["codes"].to_dtype(DType::U32)?;
        let same = enc
            .codes
            .to_dtype(DType::U32)?
            .eq(&want)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        // Decoder alone: decode the stored codes and compare with the stored audio.
        let audio = model.decode(&want, &enc.scales, 0)?;
        let d = (&audio - &r["audio"])?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let peak = r["audio"]
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        eprintln!(
            "check vs {f}: codes equal fraction {}, audio of its codes max abs diff {d:e} (peak {peak})",
            same.to_scalar::<f32>()?
        );
    }
    Ok(())
}
