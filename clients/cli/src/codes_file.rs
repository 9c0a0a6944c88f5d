//! The `.safetensors` file of codes that `cadenza codec encode` writes and `decode` reads:
//! an integer tensor `codes` of shape `[n_q, frames]` (for chunked models, chunks are
//! concatenated along frames, each padded to the chunk's frame count), a float tensor `scales`
//! `[n_chunks]` for normalising models, and string metadata (model, rate, length, bandwidth).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Codes plus what is needed to decode them exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct CodesFile {
    pub num_codebooks: usize,
    pub frames: usize,
    /// Row-major `[n_q, frames]`.
    pub codes: Vec<u32>,
    pub scales: Vec<f32>,
    pub model: String,
    pub sample_rate: u32,
    pub num_samples: u64,
    pub bandwidth_kbps: f32,
}

impl CodesFile {
    pub fn write(&self, path: &Path) -> Result<()> {
        let codes: Vec<u8> = self
            .codes
            .iter()
            .flat_map(|&c| (c as i64).to_le_bytes())
            .collect();
        let scales: Vec<u8> = self.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut tensors = vec![(
            "codes".to_string(),
            TensorView::new(Dtype::I64, vec![self.num_codebooks, self.frames], &codes)?,
        )];
        if !self.scales.is_empty() {
            tensors.push((
                "scales".to_string(),
                TensorView::new(Dtype::F32, vec![self.scales.len()], &scales)?,
            ));
        }
        let meta = HashMap::from([
            ("model".to_string(), self.model.clone()),
            ("sample_rate".to_string(), self.sample_rate.to_string()),
            ("num_samples".to_string(), self.num_samples.to_string()),
            (
                "bandwidth_kbps".to_string(),
                self.bandwidth_kbps.to_string(),
            ),
        ]);
        safetensors::serialize_to_file(tensors, Some(meta), path)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let codes_t = st
            .tensor("codes")
            .context("the file has no `codes` tensor")?;
        let shape = codes_t.shape().to_vec();
        let [q, f] = shape[..] else {
            bail!("`codes` must have shape [n_q, frames], got {shape:?}")
        };
        let data = codes_t.data();
        let codes: Vec<u32> = match codes_t.dtype() {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .map(|v| u32::try_from(v).map_err(|_| anyhow::anyhow!("code {v} out of range")))
                .collect::<Result<_>>()?,
            Dtype::I32 | Dtype::U32 => data
                .chunks_exact(4)
                .map(|b| {
                    let v = i64::from(i32::from_le_bytes(b.try_into().expect("4 bytes")));
                    u32::try_from(v).map_err(|_| anyhow::anyhow!("code {v} out of range"))
                })
                .collect::<Result<_>>()?,
            d => bail!("`codes` must be an integer tensor, got {d:?}"),
        };
        let scales = match st.tensor("scales") {
            Ok(t) if t.dtype() == Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Ok(t) => bail!("`scales` must be float32, got {:?}", t.dtype()),
            Err(_) => Vec::new(),
        };
        let get = |k: &str| meta.get(k).cloned().unwrap_or_default();
        Ok(Self {
            num_codebooks: q,
            frames: f,
            codes,
            scales,
            model: get("model"),
            sample_rate: get("sample_rate").parse().unwrap_or(0),
            num_samples: get("num_samples").parse().unwrap_or(0),
            bandwidth_kbps: get("bandwidth_kbps").parse().unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = CodesFile {
            num_codebooks: 2,
            frames: 3,
            codes: vec![1, 2, 3, 4, 5, 1023],
            scales: vec![0.5],
            model: "m".into(),
            sample_rate: 24000,
            num_samples: 900,
            bandwidth_kbps: 1.5,
        };
        let dir = std::env::temp_dir().join(format!("cadenza-codes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.safetensors");
        f.write(&p).unwrap();
        assert_eq!(CodesFile::read(&p).unwrap(), f);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
