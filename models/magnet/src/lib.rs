//! MAGNeT: a masked, non-autoregressive transformer over EnCodec tokens that decodes all
//! frames of one codebook at a time in a few parallel iterations, conditioned on text (T5 +
//! cross-attention) with annealed classifier-free guidance.
//!
//! Paper: Ziv et al., "Masked Audio Generation using a Single Non-Autoregressive Transformer",
//! arXiv 2401.04577 (ICLR 2024). Reference followed: audiocraft 1.3.0 `models/lm_magnet.py`
//! (`MagnetLMModel`), `models/magnet.py` (defaults), `models/loaders.py`
//! (`load_lm_model_magnet`), `modules/transformer.py` (attention masks)
//! <https://github.com/facebookresearch/audiocraft/blob/main/audiocraft/models/lm_magnet.py>.
//! Parity with it is tested in `tests/parity.rs` against `tools/fixtures/magnet.py` fixtures.
//!
//! - [`MagnetLm`]: the LM (same weights and keys as audiocraft MusicGen checkpoints), loaded from
//!   a `facebook/magnet-*` `state_dict.bin`;
//! - [`MagnetGeneration`]: one session's decoding state, advanced one iteration (one forward
//!   pass) at a time by [`MagnetGeneration::step`], with a rescoring hook
//!   ([`MagnetGeneration::rescore`], inputs from [`rescore::teacher_forced_probs`]) and hybrid
//!   AR-prefix start ([`MagnetGeneration::from_ar_prefix`]);
//! - [`Magnet`]: LM + T5 text encoder + tokenizer + EnCodec, as `MAGNeT.get_pretrained` loads them.

pub mod config;
pub mod decode;
pub mod lm;
pub mod rescore;

use std::path::Path;
use std::sync::Arc;

use cadenza_codecs::Encodec;
use cadenza_musicgen::{T5Config, T5Encoder};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::MagnetXpCfg;
pub use decode::{DecodeParams, MagnetGeneration, SpanArrangement, SpanScoring, StepInfo};
pub use lm::{MagnetLm, MagnetLmConfig};

fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

/// A loaded MAGNeT: text encoder (+ tokenizer), LM and codec.
#[derive(Debug, Clone)]
pub struct Magnet {
    /// T5 encoder of the text conditioner.
    pub t5: T5Encoder,
    /// Its tokenizer.
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// The LM (with the conditioner's output projection).
    pub lm: MagnetLm,
    /// The codec (EnCodec 32 kHz for the public checkpoints).
    pub codec: Encodec,
    device: Device,
}

impl Magnet {
    /// Loads an audiocraft MAGNeT: the LM checkpoint (`state_dict.bin`), a Hugging Face T5
    /// directory (`config.json`, `model.safetensors`, `tokenizer.json`; `t5-base`) and a Hugging
    /// Face EnCodec directory (`facebook/encodec_32khz`).
    pub fn load_audiocraft(
        checkpoint: &Path,
        t5_dir: &Path,
        codec_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let (t5, tokenizer) = Self::load_t5(t5_dir, device)?;
        let codec = Encodec::load(codec_dir, device)?;
        Self::from_parts(checkpoint, t5, Some(tokenizer), codec, device)
    }

    /// Loads a Hugging Face T5 encoder directory (`config.json`, `model.safetensors`,
    /// `tokenizer.json`).
    pub fn load_t5(
        t5_dir: &Path,
        device: &Device,
    ) -> Result<(T5Encoder, Arc<tokenizers::Tokenizer>)> {
        let read = |name: &str| {
            let p = t5_dir.join(name);
            std::fs::read(&p).map_err(|e| msg(format!("{}: {e}", p.display())))
        };
        let config = read("config.json")?;
        let config =
            std::str::from_utf8(&config).map_err(|e| msg(format!("t5 config.json: {e}")))?;
        Self::t5_from_bytes(
            config,
            &read("model.safetensors")?,
            &read("tokenizer.json")?,
            device,
        )
    }

    /// The files of a T5 directory, already in memory (an embedded model's).
    pub fn t5_from_bytes(
        config_json: &str,
        safetensors: &[u8],
        tokenizer_json: &[u8],
        device: &Device,
    ) -> Result<(T5Encoder, Arc<tokenizers::Tokenizer>)> {
        let t5_cfg: T5Config =
            serde_json::from_str(config_json).map_err(|e| msg(format!("t5 config.json: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(safetensors, device)?
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let t5 = T5Encoder::new(
            &t5_cfg,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| msg(format!("tokenizer.json: {e}")))?;
        Ok((t5, Arc::new(tokenizer)))
    }

    /// Builds MAGNeT from its LM checkpoint and an already loaded T5 and codec (the codec's
    /// frame rate sizes the LM's attention masks, as in `load_lm_model_magnet`).
    pub fn from_parts(
        checkpoint: &Path,
        t5: T5Encoder,
        tokenizer: Option<Arc<tokenizers::Tokenizer>>,
        codec: Encodec,
        device: &Device,
    ) -> Result<Self> {
        let c = codec.config();
        let frame_rate = (c.sampling_rate as f64 / c.hop_length() as f64).round() as usize;
        let lm = MagnetLm::load_audiocraft(checkpoint, frame_rate, device)?;
        Self::from_lm(lm, t5, tokenizer, codec, device)
    }

    /// Builds MAGNeT from a loaded LM (e.g. [`MagnetLm::from_tensors`], built for the codec's
    /// frame rate), T5 and codec; checks that they fit together.
    pub fn from_lm(
        lm: MagnetLm,
        t5: T5Encoder,
        tokenizer: Option<Arc<tokenizers::Tokenizer>>,
        codec: Encodec,
        device: &Device,
    ) -> Result<Self> {
        let c = codec.config();
        if lm.text_dim() != t5.hidden_size() {
            return Err(msg(format!(
                "magnet: the conditioner expects {}-wide text states, the T5 gives {}",
                lm.text_dim(),
                t5.hidden_size()
            )));
        }
        if c.num_quantizers() < lm.num_codebooks() {
            return Err(msg(format!(
                "magnet: the codec has {} codebooks, the LM needs {}",
                c.num_quantizers(),
                lm.num_codebooks()
            )));
        }
        Ok(Self {
            t5,
            tokenizer,
            lm,
            codec,
            device: device.clone(),
        })
    }

    /// Tokenizes prompts (padded right with 0) into (ids, mask), each (B, L).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| msg("this T5 directory has no tokenizer.json"))?;
        cadenza_musicgen::t5::tokenize_padded(tok, prompts, &self.device)
    }

    /// LM conditioning (B, L, D) for token ids and mask: T5 states through the conditioner
    /// projection, zeroed on padding (`T5Conditioner.forward`).
    pub fn condition(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.t5.forward(ids, mask)?;
        self.lm.condition(&h, mask)
    }

    /// Token frames per second of the codec.
    pub fn frame_rate(&self) -> f64 {
        let c = self.codec.config();
        c.sampling_rate as f64 / c.hop_length() as f64
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }
}
