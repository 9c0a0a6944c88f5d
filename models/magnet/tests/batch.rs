//! Batched decoding iterations ([`MagnetGeneration::step_batch`]) give the tokens of stepping
//! each session alone, for sessions with conditionings of different lengths (padded and masked
//! in the batch) and with and without a prompt.

use std::path::PathBuf;

use anyhow::Result;
use cadenza_magnet::{DecodeParams, MagnetGeneration, MagnetLm};
use candle_core::{Device, Tensor};

#[test]
fn step_batch_equals_solo_steps() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/magnet/tiny");
    let dev = Device::Cpu;
    let lm = MagnetLm::load_audiocraft(&dir.join("state_dict.bin"), 25, &dev)?;
    let d = lm.dim();
    let conds = [
        Tensor::randn(0f32, 1.0, (1, 2, d), &dev)?,
        Tensor::randn(0f32, 1.0, (1, 5, d), &dev)?,
        Tensor::randn(0f32, 1.0, (1, 3, d), &dev)?,
    ];
    let params = |i: usize| DecodeParams {
        frames: 21,
        decoding_steps: vec![4, 3, 2, 2],
        greedy: true,
        // One session continues a prompt (never re-masked).
        prompt: (i == 2).then(|| vec![vec![1, 2, 3, 4, 5]; 4]),
        ..Default::default()
    };
    let mut solo = Vec::new();
    for (i, c) in conds.iter().enumerate() {
        let mut g = MagnetGeneration::new(&lm, c, None, params(i))?;
        while !g.is_done() {
            g.step(&lm)?;
        }
        solo.push(g.frames().to_vec());
    }
    let mut gens = conds
        .iter()
        .enumerate()
        .map(|(i, c)| MagnetGeneration::new(&lm, c, None, params(i)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    while !gens[0].is_done() {
        let mut refs: Vec<&mut MagnetGeneration> = gens.iter_mut().collect();
        let infos = MagnetGeneration::step_batch(&lm, &mut refs)?;
        assert_eq!(infos.len(), 3);
    }
    for (g, s) in gens.iter().zip(&solo) {
        assert_eq!(g.frames(), &s[..]);
    }
    // Sessions at different stages cannot share a forward pass.
    let mut a = MagnetGeneration::new(&lm, &conds[0], None, params(0))?;
    let mut b = MagnetGeneration::new(&lm, &conds[1], None, params(1))?;
    for _ in 0..4 {
        a.step(&lm)?;
    }
    assert!(MagnetGeneration::step_batch(&lm, &mut [&mut a, &mut b]).is_err());
    Ok(())
}
