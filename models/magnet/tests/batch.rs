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

/// Batched rescoring passes ([`cadenza_magnet::rescore::teacher_forced_probs_batch`]) give each
/// session the probabilities of its pass alone: conditionings of different lengths (padded and
/// masked), sequences of different lengths (padded after the end), undecided (masked) codes, with
/// and without CFG.
#[test]
fn rescore_batch_equals_solo_passes() -> Result<()> {
    use cadenza_magnet::rescore::{
        RescoreInput, rescorer_cross, teacher_forced_probs, teacher_forced_probs_batch,
    };
    let mg_dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/musicgen/hf-tiny");
    let dev = Device::Cpu;
    let hf = cadenza_musicgen::MusicGen::load_hf(&mg_dir, &dev)?;
    let (lm, pattern) = (&hf.lm, &hf.pattern);
    let card = lm.card() as u32;
    let (ids, mask) =
        hf.tokenize(&["calm piano", "a fast rock song with drums and bass guitar"])?;
    let cond = hf.condition(&ids, &mask)?;
    let mask = mask.to_dtype(candle_core::DType::F32)?;
    let frames = |t: usize, seed: u32| -> Vec<Vec<u32>> {
        (0..lm.num_codebooks() as u32)
            .map(|q| {
                (0..t as u32)
                    // every 7th code of the upper codebooks undecided (MAGNeT's mask id)
                    .map(|f| {
                        if q > 1 && f % 7 == 3 {
                            card
                        } else {
                            (f * 13 + q * 5 + seed) % card
                        }
                    })
                    .collect()
            })
            .collect()
    };
    let seqs = [frames(9, 1), frames(17, 2), frames(4, 3)];
    for guidance in [1.0f32, 3.0] {
        let mut crosses = Vec::new();
        let mut solo = Vec::new();
        for (i, f) in seqs.iter().enumerate() {
            let row = i % 2;
            let c = cond.narrow(0, row, 1)?;
            let m = mask.narrow(0, row, 1)?;
            crosses.push(rescorer_cross(lm, &c, Some(&m), guidance)?);
            solo.push(teacher_forced_probs(
                lm,
                pattern,
                &c,
                Some(&m),
                f,
                guidance,
            )?);
        }
        let inputs: Vec<RescoreInput> = crosses
            .iter()
            .zip(&seqs)
            .map(|(cross, frames)| RescoreInput { cross, frames })
            .collect();
        let batch = teacher_forced_probs_batch(lm, pattern, &inputs, guidance)?;
        assert_eq!(batch.len(), 3);
        for (b, s) in batch.iter().zip(&solo) {
            assert_eq!(b.len(), s.len());
            for (rb, rs) in b.iter().zip(s) {
                assert_eq!(rb.len(), rs.len());
                for (x, y) in rb.iter().zip(rs) {
                    assert!((x - y).abs() <= 1e-5, "guidance {guidance}: {x} vs {y}");
                }
            }
        }
        // masked codes are not scored; decided ones are
        assert_eq!(batch[1][2][3], 0.0);
        assert!(batch[1][0][3] > 0.0);
    }
    Ok(())
}
