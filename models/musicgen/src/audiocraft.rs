//! The audiocraft checkpoint format of MusicGen (`facebook/musicgen-*` `state_dict.bin`): a torch
//! zip whose pickle holds `best_state` (the `LMModel` state dict) and `xp.cfg` (the training
//! config as a YAML string). The text conditioner's T5 comes from a Hugging Face T5 directory
//! and the codec from a Hugging Face EnCodec directory, as audiocraft itself loads them
//! (`audiocraft/models/loaders.py`, `audiocraft/models/encodec.py`).
//!
//! Key map (audiocraft `LMModel`): `emb.K` (card + 1 rows), `transformer.layers.N.*` (see
//! `cadenza_nn::transformer::KeyStyle::Audiocraft`), `out_norm`, `linears.K`, and the
//! conditioner projection `condition_provider.conditioners.description.output_proj`.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Result, Tensor, bail};
use serde::Deserialize;

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// `transformer_lm` section of `xp.cfg` (the fields this implementation uses or rejects).
#[derive(Debug, Clone, Deserialize)]
pub struct TransformerLmCfg {
    pub dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    #[serde(default = "four")]
    pub hidden_scale: usize,
    pub n_q: usize,
    pub card: usize,
    #[serde(default = "gelu")]
    pub activation: String,
    #[serde(default = "yes")]
    pub norm_first: bool,
    #[serde(default)]
    pub bias_ff: bool,
    #[serde(default)]
    pub bias_attn: bool,
    #[serde(default)]
    pub bias_proj: bool,
    #[serde(default = "layer_norm")]
    pub norm: String,
    #[serde(default = "sin")]
    pub positional_embedding: String,
    #[serde(default)]
    pub layer_scale: Option<f64>,
    #[serde(default)]
    pub qk_layer_norm: bool,
    #[serde(default)]
    pub xpos: bool,
    #[serde(default = "one")]
    pub kv_repeat: usize,
}

impl TransformerLmCfg {
    /// Checks the transformer options this implementation does not support, naming the first.
    pub fn validate(&self) -> Result<()> {
        let t = self;
        let unsupported = [
            (
                t.activation != "gelu",
                format!("activation '{}'", t.activation),
            ),
            (!t.norm_first, "norm_first = false".into()),
            (t.norm != "layer_norm", format!("norm '{}'", t.norm)),
            (
                t.positional_embedding != "sin",
                format!("positional_embedding '{}'", t.positional_embedding),
            ),
            (t.layer_scale.is_some(), "layer_scale".into()),
            (t.qk_layer_norm, "qk_layer_norm".into()),
            (t.xpos, "xpos".into()),
            (t.kv_repeat != 1, "kv_repeat".into()),
            (t.bias_proj, "bias_proj".into()),
        ];
        for (bad, what) in unsupported {
            if bad {
                bail!("audiocraft checkpoint: {what} is not supported")
            }
        }
        Ok(())
    }
}

fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn gelu() -> String {
    "gelu".into()
}
fn layer_norm() -> String {
    "layer_norm".into()
}
fn sin() -> String {
    "sin".into()
}

#[derive(Debug, Clone, Deserialize)]
struct DelayCfg {
    delays: Vec<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct PatternCfg {
    modeling: String,
    delay: Option<DelayCfg>,
}

#[derive(Debug, Clone, Deserialize)]
struct CfgCoef {
    inference_coef: f32,
}

#[derive(Debug, Clone, Deserialize)]
struct FuserCfg {
    #[serde(default)]
    cross: Vec<String>,
}

/// The parts of audiocraft's `xp.cfg` that define the LM.
#[derive(Debug, Clone, Deserialize)]
pub struct XpCfg {
    pub transformer_lm: TransformerLmCfg,
    codebooks_pattern: PatternCfg,
    classifier_free_guidance: Option<CfgCoef>,
    fuser: Option<FuserCfg>,
    #[serde(default)]
    pub compression_model_checkpoint: Option<String>,
}

impl XpCfg {
    /// Checks every option this implementation does not support, naming it.
    pub fn validate(&self) -> Result<()> {
        self.transformer_lm.validate()?;
        if self.codebooks_pattern.modeling != "delay" {
            bail!(
                "audiocraft checkpoint: codebooks pattern '{}' is not supported",
                self.codebooks_pattern.modeling
            )
        }
        if !self
            .fuser
            .as_ref()
            .is_some_and(|f| f.cross.iter().any(|c| c == "description"))
        {
            bail!(
                "audiocraft checkpoint: only text ('description') conditioning by cross-attention is supported"
            )
        }
        Ok(())
    }
    /// The delays of the codebook pattern.
    pub fn delays(&self) -> Vec<usize> {
        self.codebooks_pattern
            .delay
            .as_ref()
            .map(|d| d.delays.clone())
            .unwrap_or_else(|| (0..self.transformer_lm.n_q).collect())
    }

    /// The CFG coefficient used at inference.
    pub fn cfg_coef(&self) -> f32 {
        self.classifier_free_guidance
            .as_ref()
            .map_or(3.0, |c| c.inference_coef)
    }
}

/// Reads `best_state` tensors and the `xp.cfg` YAML of an audiocraft checkpoint.
pub fn read_checkpoint(path: &Path, device: &Device) -> Result<(XpCfg, HashMap<String, Tensor>)> {
    let (yaml, tensors) = read_checkpoint_raw(path, device)?;
    let cfg: XpCfg =
        serde_yaml::from_str(&yaml).map_err(|e| msg(format!("audiocraft xp.cfg: {e}")))?;
    cfg.validate()?;
    Ok((cfg, tensors))
}

/// Reads the `xp.cfg` YAML text and the `best_state` tensors (as f32 on `device`) of any
/// audiocraft LM checkpoint (MusicGen, MAGNeT, ...), without interpreting the config.
pub fn read_checkpoint_raw(
    path: &Path,
    device: &Device,
) -> Result<(String, HashMap<String, Tensor>)> {
    let file = std::fs::File::open(path).map_err(|e| msg(format!("{}: {e}", path.display())))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| msg(format!("{}: not a torch checkpoint: {e}", path.display())))?;
    let pkl = zip
        .file_names()
        .filter_map(|f| f.ok().map(|f| f.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| msg("checkpoint has no data.pkl"))?;
    let mut bytes = Vec::new();
    zip.by_name(&pkl)
        .map_err(|e| msg(e.to_string()))?
        .read_to_end(&mut bytes)?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut std::io::BufReader::new(&bytes[..]))?;
    let entries = match stack.finalize()? {
        Object::Dict(kv) => kv,
        _ => bail!("audiocraft checkpoint: the pickle is not a dict"),
    };
    let yaml = entries
        .into_iter()
        .find(|(k, _)| *k == Object::Unicode("xp.cfg".into()))
        .map(|(_, v)| v)
        .ok_or_else(|| msg("audiocraft checkpoint: no 'xp.cfg' entry"))?;
    let yaml = match yaml {
        Object::Unicode(s) => s,
        _ => bail!("audiocraft checkpoint: 'xp.cfg' is not a YAML string"),
    };
    let tensors = candle_core::pickle::read_all_with_key(path, Some("best_state"))?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(device)?.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok((yaml, tensors))
}
