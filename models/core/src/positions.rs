//! Sinusoidal position embeddings as MusicGen checkpoints expect them: `[cos | sin]` halves with
//! frequencies `exp(-ln(max_period) * i / (half - 1))`. This is both transformers'
//! `MusicgenSinusoidalPositionalEmbedding.get_embedding` and audiocraft's
//! `create_sin_embedding` (`audiocraft/modules/transformer.py`), which agree.

use candle_core::{DType, Device, Result, Tensor};

/// `(len, dim)` embeddings for positions `start..start + len`.
pub fn sinusoidal(
    start: usize,
    len: usize,
    dim: usize,
    max_period: f64,
    dev: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut out = vec![0f32; len * dim];
    // The reference computes the frequencies in float32 from an int64 arange.
    let scale = (max_period.ln() / (half as f64 - 1.0)) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -scale).exp()).collect();
    for p in 0..len {
        let pos = (start + p) as f32;
        for (i, f) in freqs.iter().enumerate() {
            let a = pos * f;
            out[p * dim + i] = a.cos();
            out[p * dim + half + i] = a.sin();
        }
    }
    Tensor::from_vec(out, (len, dim), dev)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rows() -> Result<()> {
        let e = sinusoidal(0, 3, 8, 10000.0, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(&e[0][..4], &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(&e[0][4..], &[0.0, 0.0, 0.0, 0.0]);
        assert!((e[1][0] - 1f32.cos()).abs() < 1e-6);
        assert!((e[1][4] - 1f32.sin()).abs() < 1e-6);
        // Last frequency is 1/max_period.
        assert!((e[2][7] - (2.0f32 / 10000.0).sin()).abs() < 1e-6);
        let tail = sinusoidal(2, 1, 8, 10000.0, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(tail[0], e[2]);
        Ok(())
    }
}
