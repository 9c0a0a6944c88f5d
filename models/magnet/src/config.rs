//! The MAGNeT fields of an audiocraft `xp.cfg` (`facebook/magnet-*` `state_dict.bin`).
//!
//! audiocraft 1.3.0 `models/loaders.py::load_lm_model_magnet` builds the LM from this config
//! with three fields filled in from elsewhere: `compression_model_framerate` (from the codec),
//! `segment_duration` (= `dataset.segment_duration`) and `span_len` (= `masking.span_len`);
//! `subcodes_context` and `causal` come from `transformer_lm` (`MagnetLMModel.__init__`).
//! The `generate.lm` section is only read by audiocraft's training solver: the `MAGNeT` API uses
//! `MAGNeT.set_generation_params` defaults (see [`crate::DecodeParams::default`]).

use cadenza_musicgen::audiocraft::TransformerLmCfg;
use candle_core::{Result, bail};
use serde::Deserialize;

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

#[derive(Debug, Clone, Deserialize)]
struct MagnetLmExtra {
    causal: Option<bool>,
    /// `MagnetLMModel.__init__` default.
    #[serde(default = "five")]
    subcodes_context: i64,
}

fn five() -> i64 {
    5
}

#[derive(Debug, Clone, Deserialize)]
struct PatternCfg {
    modeling: String,
}

#[derive(Debug, Clone, Deserialize)]
struct MaskingCfg {
    span_len: usize,
}

#[derive(Debug, Clone, Deserialize)]
struct DatasetCfg {
    segment_duration: f64,
}

#[derive(Debug, Clone, Deserialize)]
struct FuserCfg {
    #[serde(default)]
    cross: Vec<String>,
    #[serde(default)]
    sum: Vec<String>,
    #[serde(default)]
    prepend: Vec<String>,
}

/// The MAGNeT-only keys of the `transformer_lm` section, read in a second pass.
#[derive(Debug, Clone, Deserialize)]
struct ExtraXpCfg {
    transformer_lm: MagnetLmExtra,
}

#[derive(Debug, Clone, Deserialize)]
struct RawXpCfg {
    lm_model: String,
    transformer_lm: TransformerLmCfg,
    codebooks_pattern: PatternCfg,
    masking: MaskingCfg,
    dataset: DatasetCfg,
    fuser: Option<FuserCfg>,
}

/// What a MAGNeT checkpoint's `xp.cfg` defines, validated.
#[derive(Debug, Clone)]
pub struct MagnetXpCfg {
    /// The transformer (same section and keys as MusicGen's).
    pub transformer_lm: TransformerLmCfg,
    /// Frames attended on each side by codebooks > 0 (`None`: unrestricted, audiocraft's -1).
    pub subcodes_context: Option<usize>,
    /// Masking span length (`masking.span_len`).
    pub span_len: usize,
    /// Training segment length in seconds; the stage masks are built for
    /// `frame_rate * segment_duration` frames, the longest sequence the model runs.
    pub segment_duration: f64,
}

impl MagnetXpCfg {
    /// Parses and validates the YAML text of `xp.cfg`; the error names the first unsupported
    /// option.
    pub fn from_yaml(yaml: &str) -> Result<Self> {
        let raw: RawXpCfg =
            serde_yaml::from_str(yaml).map_err(|e| msg(format!("magnet xp.cfg: {e}")))?;
        let extra: ExtraXpCfg =
            serde_yaml::from_str(yaml).map_err(|e| msg(format!("magnet xp.cfg: {e}")))?;
        if raw.lm_model != "transformer_lm_magnet" {
            bail!(
                "magnet: xp.cfg lm_model is '{}', not 'transformer_lm_magnet' (a MusicGen checkpoint?)",
                raw.lm_model
            )
        }
        raw.transformer_lm.validate()?;
        match extra.transformer_lm.causal {
            Some(false) => {}
            Some(true) => bail!("magnet: transformer_lm.causal = true is not supported"),
            // MagnetLMModel.__init__ reads kwargs['causal'] and fails without it.
            None => bail!("magnet: xp.cfg has no transformer_lm.causal"),
        }
        if raw.codebooks_pattern.modeling != "parallel" {
            bail!(
                "magnet: codebooks pattern '{}' is not supported (MAGNeT uses 'parallel')",
                raw.codebooks_pattern.modeling
            )
        }
        if raw.masking.span_len == 0 {
            bail!("magnet: masking.span_len must be at least 1")
        }
        let fuser_ok = raw.fuser.as_ref().is_some_and(|f| {
            f.cross.iter().any(|c| c == "description") && f.sum.is_empty() && f.prepend.is_empty()
        });
        if !fuser_ok {
            bail!(
                "magnet: only text ('description') conditioning by cross-attention is supported (no 'sum' / 'prepend' fusers)"
            )
        }
        let subcodes_context = match extra.transformer_lm.subcodes_context {
            -1 => None,
            c if c >= 0 => Some(c as usize),
            c => bail!("magnet: subcodes_context {c} is not supported"),
        };
        Ok(Self {
            transformer_lm: raw.transformer_lm,
            subcodes_context,
            span_len: raw.masking.span_len,
            segment_duration: raw.dataset.segment_duration,
        })
    }
}
