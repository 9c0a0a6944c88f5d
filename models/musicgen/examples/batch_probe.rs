//! Time of one batched decode step for N sessions: `cargo run --release -p cadenza-musicgen
//! --example batch_probe -- MODEL_DIR [N...]` (a Hugging Face MusicGen directory).

use std::time::Instant;

use cadenza_musicgen::{GenerateParams, Generation, MusicGen};
use candle_core::{DType, Device};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("model dir");
    let ns: Vec<usize> = args.map(|a| a.parse().expect("N")).collect();
    let m = MusicGen::load_hf(std::path::Path::new(&dir), &Device::Cpu)?;
    let (ids, mask) = m.tokenize(&["happy rock"])?;
    let cond = m.condition(&ids, &mask)?;
    let mask = mask.to_dtype(DType::F32)?;
    for &n in if ns.is_empty() {
        &[1usize, 2, 4, 8, 16][..]
    } else {
        &ns[..]
    } {
        let mut gens = (0..n)
            .map(|i| {
                Generation::new(
                    &m,
                    &cond,
                    &mask,
                    GenerateParams {
                        frames: 200,
                        sampling: Default::default(),
                        guidance: 3.0,
                        seed: i as u64,
                        prompt: None,
                    },
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let steps = 100;
        let t = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut Generation> = gens.iter_mut().collect();
            Generation::step_batch(&m, &mut refs)?;
        }
        let per = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "N={n:>3}: {:.3} ms/step, {:.0} session-steps/s",
            per * 1e3,
            n as f64 / per
        );
    }
    Ok(())
}
