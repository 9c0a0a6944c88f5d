//! MusicGen: a transformer LM over EnCodec tokens with the delay codebook pattern, conditioned on
//! text through a T5 encoder and cross-attention, sampled with classifier-free guidance.
//!
//! Paper: Copet et al., "Simple and Controllable Music Generation", arXiv 2306.05284.
//! Reference followed here: transformers `models/musicgen/modeling_musicgen.py` (5.24)
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/musicgen/modeling_musicgen.py>;
//! the audiocraft `LMModel` uses the same computation with other key names.
//! Parity is tested against `tools/fixtures/musicgen.py` fixtures in `tests/parity.rs`.
//!
//! A [`MusicGen`] holds the shared weights; a [`Generation`] is one session's state (KV caches,
//! cross-attention K/V, RNG, the token grid) advanced one step at a time by [`Generation::step`],
//! so a worker can interleave and cancel sessions between steps.

pub mod audiocraft;
pub mod t5;

use std::path::Path;

use cadenza_codecs::Encodec;
use cadenza_nn::patterns::DelayPattern;
use cadenza_nn::positions::sinusoidal;
use cadenza_nn::sampling::{Rng, SamplingParams, cfg_combine, sample};
use cadenza_nn::transformer::{
    CrossKv, DecoderLayer, KeyStyle, KvCache, LayerConfig, Segment, causal_mask,
};
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

pub use t5::{T5Config, T5Encoder};

/// transformers' `MusicgenDecoderConfig` fields used here.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub num_codebooks: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub ffn_dim: usize,
    #[serde(default = "default_act")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "one")]
    pub audio_channels: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
}

fn default_act() -> String {
    "gelu".into()
}
fn one() -> usize {
    1
}
fn default_max_pos() -> usize {
    2048
}

/// transformers' `MusicgenConfig` (`config.json` of a `MusicgenForConditionalGeneration`).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub text_encoder: T5Config,
    pub audio_encoder: cadenza_codecs::EncodecConfig,
    pub decoder: DecoderConfig,
}

/// Default generation settings (`generation_config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationDefaults {
    #[serde(default = "default_guidance")]
    pub guidance_scale: f32,
    #[serde(default = "default_max_len")]
    pub max_length: usize,
}

fn default_guidance() -> f32 {
    3.0
}
fn default_max_len() -> usize {
    1500
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            guidance_scale: default_guidance(),
            max_length: default_max_len(),
        }
    }
}

/// Where one checkpoint layout keeps the LM's parts.
struct LmKeys<'a> {
    embeds: VarBuilder<'a>,
    layers: VarBuilder<'a>,
    norm: VarBuilder<'a>,
    heads: VarBuilder<'a>,
}

/// The LM: per-codebook embeddings (vocab + 1 rows: the extra one is the BOS/pad token),
/// sinusoidal positions, pre-norm layers with cross-attention, a final norm, per-codebook heads.
#[derive(Debug, Clone)]
pub struct Lm {
    embeds: Vec<Embedding>,
    layers: Vec<DecoderLayer>,
    norm: LayerNorm,
    heads: Vec<Linear>,
    dim: usize,
    n_heads: usize,
    card: usize,
}

impl Lm {
    /// Loads the Hugging Face layout (`model.decoder.*`, `lm_heads.*`) from `vb` at the
    /// `MusicgenForCausalLM` root.
    pub fn new_hf(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.activation_function != "gelu" {
            bail!(
                "musicgen: activation '{}' is not supported (gelu)",
                cfg.activation_function
            )
        }
        if cfg.audio_channels != 1 {
            bail!("musicgen: stereo checkpoints (audio_channels = 2) are not supported yet")
        }
        let dec = vb.pp("model.decoder");
        let (d, k, v) = (cfg.hidden_size, cfg.num_codebooks, cfg.vocab_size);
        let lc = LayerConfig {
            dim: d,
            heads: cfg.num_attention_heads,
            ffn_dim: cfg.ffn_dim,
            bias_attn: false,
            bias_ff: false,
            norm_eps: 1e-5,
            cross_attention: true,
            style: KeyStyle::HuggingFace,
        };
        // transformers 5.24 computes `embed_scale` from `scale_embedding` but never applies it
        // (modeling_musicgen.py, MusicgenDecoder.__init__/forward); neither do we.
        let keys = LmKeys {
            embeds: dec.pp("embed_tokens"),
            layers: dec.pp("layers"),
            norm: dec.pp("layer_norm"),
            heads: vb.pp("lm_heads"),
        };
        Self::build(keys, &lc, k, v, cfg.num_hidden_layers)
    }

    /// The layers every layout has, read under that layout's key prefixes.
    fn build(
        keys: LmKeys,
        lc: &LayerConfig,
        k: usize,
        v: usize,
        num_layers: usize,
    ) -> Result<Self> {
        let d = lc.dim;
        let embeds = (0..k)
            .map(|i| {
                Ok(Embedding::new(
                    keys.embeds.pp(i).get((v + 1, d), "weight")?,
                    d,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..num_layers)
            .map(|i| DecoderLayer::new(lc, keys.layers.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(
            keys.norm.get(d, "weight")?,
            keys.norm.get(d, "bias")?,
            lc.norm_eps,
        );
        let heads = (0..k)
            .map(|i| Ok(Linear::new(keys.heads.pp(i).get((v, d), "weight")?, None)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeds,
            layers,
            norm,
            heads,
            dim: d,
            n_heads: lc.heads,
            card: v,
        })
    }

    /// Loads audiocraft's `LMModel` layout (`emb.K`, `transformer.layers.N`, `out_norm`,
    /// `linears.K`) from the root of `best_state`.
    pub fn new_audiocraft(cfg: &audiocraft::TransformerLmCfg, vb: VarBuilder) -> Result<Self> {
        let lc = LayerConfig {
            dim: cfg.dim,
            heads: cfg.num_heads,
            ffn_dim: cfg.dim * cfg.hidden_scale,
            bias_attn: cfg.bias_attn,
            bias_ff: cfg.bias_ff,
            norm_eps: 1e-5,
            cross_attention: true,
            style: KeyStyle::Audiocraft,
        };
        let keys = LmKeys {
            embeds: vb.pp("emb"),
            layers: vb.pp("transformer.layers"),
            norm: vb.pp("out_norm"),
            heads: vb.pp("linears"),
        };
        Self::build(keys, &lc, cfg.n_q, cfg.card, cfg.num_layers)
    }

    /// Codebooks.
    pub fn num_codebooks(&self) -> usize {
        self.embeds.len()
    }

    /// Tokens per codebook (the special BOS/pad token is `card`).
    pub fn card(&self) -> usize {
        self.card
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Fresh caches for `batch` rows and `max_len` positions.
    pub fn caches(&self, batch: usize, max_len: usize, dev: &Device) -> Result<Vec<KvCache>> {
        let hd = self.dim / self.n_heads;
        (0..self.layers.len())
            .map(|_| KvCache::new(batch, self.n_heads, hd, max_len, dev))
            .collect()
    }

    /// Cross-attention K/V for every layer from conditioning (B, L, D) and its (B, L) mask.
    /// (`None`: attend to every position, as audiocraft does).
    pub fn cross(&self, cond: &Tensor, mask: Option<&Tensor>) -> Result<Vec<CrossKv>> {
        self.layers
            .iter()
            .map(|l| {
                l.cross_kv(cond, mask)?
                    .ok_or_else(|| candle_core::Error::Msg("no cross-attention".into()))
            })
            .collect()
    }

    /// Logits (B, K, T, card) for tokens (B, K, T) at positions `caches[0].len()..`.
    pub fn forward(
        &self,
        tokens: &Tensor,
        caches: &mut [KvCache],
        cross: &[CrossKv],
    ) -> Result<Tensor> {
        let (_, k, t) = tokens.dims3()?;
        if k != self.embeds.len() {
            bail!(
                "musicgen: {k} codebooks given, the model has {}",
                self.embeds.len()
            )
        }
        let past = caches.first().map_or(0, KvCache::len);
        let dev = tokens.device();
        let mut x = self.embeds[0].forward(&tokens.i((.., 0, ..))?)?;
        for (i, e) in self.embeds.iter().enumerate().skip(1) {
            x = (x + e.forward(&tokens.i((.., i, ..))?)?)?;
        }
        let pos = sinusoidal(past, t, self.dim, 10000.0, dev)?;
        x = x.broadcast_add(&pos.unsqueeze(0)?)?;
        let mask = if t > 1 {
            Some(causal_mask(t, past, dev)?)
        } else {
            None
        };
        for ((layer, cache), kv) in self.layers.iter().zip(caches.iter_mut()).zip(cross) {
            x = layer.forward(&x, cache, Some(kv), mask.as_ref())?;
        }
        let x = self.norm.forward(&x)?;
        let logits = self
            .heads
            .iter()
            .map(|h| cadenza_nn::transformer::lin(h, &x))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&logits, 1)
    }
}

impl Lm {
    /// One decode step for several sessions at once ([`DecoderLayer::forward_step_batch`]):
    /// `tokens[s]` is session `s`'s input column (`rows × K` ids, row-major) and `caches[s]` /
    /// `cross[s]` its per-layer state. Returns logits (N, K, card) for the N rows together.
    pub fn forward_step_batch(
        &self,
        tokens: &[Vec<u32>],
        caches: &mut [&mut [KvCache]],
        cross: &[&[CrossKv]],
        dev: &Device,
    ) -> Result<Tensor> {
        let k = self.embeds.len();
        if tokens.len() != caches.len() || tokens.len() != cross.len() {
            bail!("musicgen: batched step needs tokens, caches and conditioning per session")
        }
        let mut rows = 0;
        let mut pos = Vec::with_capacity(tokens.len());
        for (t, c) in tokens.iter().zip(caches.iter()) {
            let Some(first) = c.first() else {
                bail!("musicgen: a session has no caches")
            };
            if c.len() != self.layers.len() || t.len() != first.rows() * k {
                bail!("musicgen: batched step: a session's input does not match its caches")
            }
            let p = sinusoidal(first.len(), 1, self.dim, 10000.0, dev)?;
            pos.push(p.broadcast_as((first.rows(), self.dim))?);
            rows += first.rows();
        }
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (rows, k), dev)?;
        let mut x = self.embeds[0].forward(&ids.i((.., 0))?)?;
        for (i, e) in self.embeds.iter().enumerate().skip(1) {
            x = (x + e.forward(&ids.i((.., i))?)?)?;
        }
        let x = (x + Tensor::cat(&pos, 0)?)?;
        let mut x = x.unsqueeze(1)?; // (N, 1, D)
        for (li, layer) in self.layers.iter().enumerate() {
            let mut segs: Vec<Segment<'_>> = caches
                .iter_mut()
                .zip(cross)
                .map(|(c, kv)| Segment {
                    cache: &mut c[li],
                    cross: kv.get(li),
                })
                .collect();
            x = layer.forward_step_batch(&x, &mut segs)?;
        }
        let x = self.norm.forward(&x.squeeze(1)?)?;
        let logits = self
            .heads
            .iter()
            .map(|h| cadenza_nn::transformer::lin(h, &x))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&logits, 1)
    }
}

/// A loaded MusicGen: text encoder (+ tokenizer), LM and codec.
#[derive(Debug, Clone)]
pub struct MusicGen {
    pub t5: T5Encoder,
    pub tokenizer: Option<std::sync::Arc<tokenizers::Tokenizer>>,
    pub enc_to_dec_proj: Option<Linear>,
    pub lm: Lm,
    pub codec: Encodec,
    pub pattern: DelayPattern,
    pub defaults: GenerationDefaults,
    /// Whether cross-attention skips padded text positions (transformers does; audiocraft's
    /// `ConditionFuser` does not, it only zeroes them).
    pub mask_cross_attention: bool,
    /// Weights in the checkpoint.
    pub num_parameters: usize,
    device: Device,
}

/// Tensors of a safetensors file (read into memory; no mmap, so no `unsafe`).
fn unsafe_free_safetensors(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// Loading and generation errors surface as candle errors with a message.
fn msg(s: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(s.into())
}

impl MusicGen {
    /// Loads a Hugging Face `MusicgenForConditionalGeneration` directory: `config.json`,
    /// `model.safetensors`, optional `generation_config.json` and `tokenizer.json`.
    pub fn load_hf(dir: &Path, device: &Device) -> Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map_err(|e| msg(format!("{}: {e}", dir.join(f).display())))
        };
        let tokenizer = std::fs::read(dir.join("tokenizer.json")).ok();
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        Self::from_parts(
            &read("config.json")?,
            read("generation_config.json").ok().as_deref(),
            tokenizer.as_deref(),
            tensors,
            device,
        )
    }

    /// Builds the model from the files of a Hugging Face directory, already read.
    pub fn from_parts(
        config_json: &str,
        generation_config_json: Option<&str>,
        tokenizer_json: Option<&[u8]>,
        mut tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let cfg: Config = serde_json::from_str(config_json)
            .map_err(|e| msg(format!("musicgen config.json: {e}")))?;
        let defaults = match generation_config_json {
            Some(t) => {
                serde_json::from_str(t).map_err(|e| msg(format!("generation_config.json: {e}")))?
            }
            None => GenerationDefaults::default(),
        };
        let tokenizer = match tokenizer_json {
            Some(b) => Some(std::sync::Arc::new(
                tokenizers::Tokenizer::from_bytes(b)
                    .map_err(|e| msg(format!("tokenizer.json: {e}")))?,
            )),
            None => None,
        };
        for v in tensors.values_mut() {
            if v.dtype() != DType::F32 {
                *v = v.to_dtype(DType::F32)?;
            }
        }
        let num_parameters = tensors
            .iter()
            .filter(|(k, _)| {
                !(k.ends_with("embed_avg") || k.ends_with("cluster_size") || k.ends_with("inited"))
            })
            .map(|(_, v)| v.elem_count())
            .sum();
        let codec_tensors = tensors
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("audio_encoder.")
                    .map(|s| (s.to_string(), v.clone()))
            })
            .collect();
        let codec = Encodec::from_tensors(&cfg.audio_encoder, codec_tensors, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let t5 = T5Encoder::new(&cfg.text_encoder, vb.pp("text_encoder"))?;
        let lm = Lm::new_hf(&cfg.decoder, vb.pp("decoder"))?;
        let enc_to_dec_proj = if vb.contains_tensor("enc_to_dec_proj.weight") {
            let p = vb.pp("enc_to_dec_proj");
            let (o, i) = (cfg.decoder.hidden_size, cfg.text_encoder.d_model);
            Some(Linear::new(
                p.get((o, i), "weight")?,
                Some(p.get(o, "bias")?),
            ))
        } else {
            None
        };
        if codec.config().num_quantizers() < cfg.decoder.num_codebooks {
            bail!(
                "musicgen: the codec has {} codebooks, the LM needs {}",
                codec.config().num_quantizers(),
                cfg.decoder.num_codebooks
            )
        }
        Ok(Self {
            t5,
            tokenizer,
            enc_to_dec_proj,
            pattern: DelayPattern::musicgen(cfg.decoder.num_codebooks),
            lm,
            codec,
            defaults,
            mask_cross_attention: true,
            num_parameters,
            device: device.clone(),
        })
    }

    /// Loads an audiocraft MusicGen: the LM checkpoint (`state_dict.bin`), a Hugging Face T5
    /// directory (`config.json`, `model.safetensors`, `tokenizer.json`, e.g. `t5-base`) and a
    /// Hugging Face EnCodec directory (e.g. `facebook/encodec_32khz`).
    pub fn load_audiocraft(
        checkpoint: &Path,
        t5_dir: &Path,
        codec_dir: &Path,
        device: &Device,
    ) -> Result<Self> {
        let read = |p: std::path::PathBuf| {
            std::fs::read_to_string(&p).map_err(|e| msg(format!("{}: {e}", p.display())))
        };
        let t5_cfg: T5Config = serde_json::from_str(&read(t5_dir.join("config.json"))?)
            .map_err(|e| msg(format!("t5 config.json: {e}")))?;
        let t5_vb = unsafe_free_safetensors(&t5_dir.join("model.safetensors"), device)?;
        let t5 = T5Encoder::new(&t5_cfg, t5_vb)?;
        let tok = std::fs::read(t5_dir.join("tokenizer.json"))
            .map_err(|e| msg(format!("{}: {e}", t5_dir.join("tokenizer.json").display())))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&tok)
            .map_err(|e| msg(format!("tokenizer.json: {e}")))?;
        let codec = Encodec::load(codec_dir, device)?;
        Self::from_audiocraft_parts(
            checkpoint,
            t5,
            Some(std::sync::Arc::new(tokenizer)),
            codec,
            device,
        )
    }

    /// Builds an audiocraft MusicGen from its LM checkpoint and an already loaded T5 and codec.
    pub fn from_audiocraft_parts(
        checkpoint: &Path,
        t5: T5Encoder,
        tokenizer: Option<std::sync::Arc<tokenizers::Tokenizer>>,
        codec: Encodec,
        device: &Device,
    ) -> Result<Self> {
        let (xp, tensors) = audiocraft::read_checkpoint(checkpoint, device)?;
        let num_parameters = tensors.values().map(Tensor::elem_count).sum();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let lm = Lm::new_audiocraft(&xp.transformer_lm, vb.clone())?;
        let p = vb.pp("condition_provider.conditioners.description.output_proj");
        let (o, i) = (xp.transformer_lm.dim, t5.hidden_size());
        let proj = Linear::new(p.get((o, i), "weight")?, Some(p.get(o, "bias")?));
        if codec.config().num_quantizers() < lm.num_codebooks() {
            bail!(
                "musicgen: the codec has {} codebooks, the LM needs {}",
                codec.config().num_quantizers(),
                lm.num_codebooks()
            )
        }
        let delays = xp.delays();
        if delays.len() != lm.num_codebooks() {
            bail!(
                "audiocraft checkpoint: {} delays for {} codebooks",
                delays.len(),
                lm.num_codebooks()
            )
        }
        Ok(Self {
            t5,
            tokenizer,
            enc_to_dec_proj: Some(proj),
            pattern: DelayPattern::new(delays),
            lm,
            codec,
            defaults: GenerationDefaults {
                guidance_scale: xp.cfg_coef(),
                ..GenerationDefaults::default()
            },
            mask_cross_attention: false,
            num_parameters,
            device: device.clone(),
        })
    }

    /// Token frames per second.
    pub fn frame_rate(&self) -> f64 {
        self.codec.config().sampling_rate as f64 / self.codec.config().hop_length() as f64
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenizes prompts (padded right with 0) into (ids, mask), each (B, L).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| msg("this model directory has no tokenizer.json"))?;
        t5::tokenize_padded(tok, prompts, &self.device)
    }

    /// Conditioning for the LM: T5 states, projected, multiplied by the mask (as the reference
    /// does before cross-attention).
    pub fn condition(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.t5.forward(ids, mask)?;
        let h = match &self.enc_to_dec_proj {
            Some(p) => p.forward(&h)?,
            None => h,
        };
        h.broadcast_mul(&mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?)
    }
}

/// What a generation request asks for.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Frames to generate (after any prompt).
    pub frames: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// CFG coefficient; 1 (or less) disables CFG.
    pub guidance: f32,
    /// RNG seed.
    pub seed: u64,
    /// Codes `[K][T0]` to continue from (their frames are forced, not sampled).
    pub prompt: Option<Vec<Vec<u32>>>,
}

/// One session of MusicGen generation.
#[derive(Debug)]
pub struct Generation {
    caches: Vec<KvCache>,
    cross: Vec<CrossKv>,
    /// Per codebook, the frames decided so far (prompt + generated).
    frames: Vec<Vec<u32>>,
    total_frames: usize,
    prompt_frames: usize,
    step: usize,
    cfg: bool,
    params: GenerateParams,
    rng: Rng,
    /// Guided logits of the last step, `[K][card]` (for parity checks).
    pub last_logits: Vec<Vec<f32>>,
}

/// What one step produced.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// A frame (one code per codebook) that became complete with this step.
    pub completed: Option<Vec<u32>>,
}

impl Generation {
    /// Starts a session for one prompt's conditioning `cond` (1, L, D) with mask (1, L).
    pub fn new(
        model: &MusicGen,
        cond: &Tensor,
        mask: &Tensor,
        params: GenerateParams,
    ) -> Result<Self> {
        let k = model.lm.num_codebooks();
        let prompt_frames = params
            .prompt
            .as_ref()
            .map_or(0, |p| p.first().map_or(0, Vec::len));
        if let Some(p) = &params.prompt {
            if p.len() != k || p.iter().any(|r| r.len() != prompt_frames) {
                bail!("musicgen: the prompt must have {k} codebooks of equal length")
            }
            if p.iter().flatten().any(|&c| c as usize >= model.lm.card()) {
                bail!("musicgen: prompt codes must be below {}", model.lm.card())
            }
        }
        let total_frames = prompt_frames + params.frames;
        let cfg = params.guidance > 1.0;
        let (cond, mask) = if cfg {
            // The unconditional branch: zero conditioning with a zero mask (transformers
            // `_prepare_text_encoder_kwargs_for_generation`).
            (
                Tensor::cat(&[cond, &cond.zeros_like()?], 0)?,
                Tensor::cat(&[mask, &mask.zeros_like()?], 0)?,
            )
        } else {
            (cond.clone(), mask.clone())
        };
        let rows = if cfg { 2 } else { 1 };
        let steps = model.pattern.steps_for(total_frames);
        Ok(Self {
            caches: model.lm.caches(rows, steps + 1, model.device())?,
            cross: model
                .lm
                .cross(&cond, model.mask_cross_attention.then_some(&mask))?,
            frames: vec![Vec::with_capacity(total_frames); k],
            total_frames,
            prompt_frames,
            step: 0,
            cfg,
            rng: Rng::new(params.seed),
            params,
            last_logits: Vec::new(),
        })
    }

    /// Steps in all.
    pub fn total_steps(&self, model: &MusicGen) -> usize {
        model.pattern.steps_for(self.total_frames)
    }

    /// Steps done.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// True when every frame is decided.
    pub fn is_done(&self, model: &MusicGen) -> bool {
        self.step >= self.total_steps(model)
    }

    /// Frames of prompt (not generated).
    pub fn prompt_frames(&self) -> usize {
        self.prompt_frames
    }

    /// The frames decided so far, per codebook.
    pub fn frames(&self) -> &[Vec<u32>] {
        &self.frames
    }

    /// Runs one LM step: feeds the input column of the delay pattern, samples every codebook
    /// whose frame this step predicts, and reports the frame completed by this step.
    pub fn step(&mut self, model: &MusicGen) -> Result<StepOutput> {
        let mut out = Self::step_batch(model, &mut [self])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Runs one LM step for several sessions of the same model in one forward pass
    /// ([`Lm::forward_step_batch`]); each session keeps its own caches, conditioning, RNG and
    /// length. The result is the same as stepping each alone (up to float rounding). If the
    /// forward pass fails, every session is left as it was before the call.
    pub fn step_batch(model: &MusicGen, gens: &mut [&mut Generation]) -> Result<Vec<StepOutput>> {
        if gens.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(g) = gens.iter().find(|g| g.is_done(model)) {
            bail!(
                "musicgen: generation already finished ({} steps)",
                g.total_steps(model)
            )
        }
        let k = model.lm.num_codebooks();
        let card = model.lm.card() as u32;
        let inputs: Vec<Vec<u32>> = gens
            .iter()
            .map(|g| {
                let s = g.step;
                let col: Vec<u32> = (0..k)
                    .map(|q| {
                        model
                            .pattern
                            .input_frame_at(q, s)
                            .and_then(|t| g.frames[q].get(t).copied())
                            .unwrap_or(card)
                    })
                    .collect();
                let rows = if g.cfg { 2 } else { 1 };
                (0..rows).flat_map(|_| col.iter().copied()).collect()
            })
            .collect();
        let logits = {
            let (mut caches, cross): (Vec<&mut [KvCache]>, Vec<&[CrossKv]>) = gens
                .iter_mut()
                .map(|g| (g.caches.as_mut_slice(), g.cross.as_slice()))
                .unzip();
            model
                .lm
                .forward_step_batch(&inputs, &mut caches, &cross, model.device())
        };
        let logits = match logits.and_then(|l| l.to_vec3::<f32>()) {
            Ok(l) => l, // (N, K, card)
            Err(e) => {
                for g in gens.iter_mut() {
                    g.rollback();
                }
                return Err(e);
            }
        };
        let mut row = 0;
        let mut outs = Vec::with_capacity(gens.len());
        for g in gens.iter_mut() {
            let rows = if g.cfg { 2 } else { 1 };
            outs.push(g.consume(model, &logits[row..row + rows]));
            row += rows;
        }
        Ok(outs)
    }

    /// Undoes a forward pass whose step did not complete (caches back to `steps_done`).
    pub fn rollback(&mut self) {
        for c in &mut self.caches {
            c.truncate(self.step);
        }
    }

    /// Samples this step's tokens from the session's logits rows `[rows][K][card]`.
    fn consume(&mut self, model: &MusicGen, logits: &[Vec<Vec<f32>>]) -> StepOutput {
        let k = model.lm.num_codebooks();
        let card = model.lm.card();
        let s = self.step;
        let mut guided = Vec::with_capacity(k);
        for q in 0..k {
            let row = if self.cfg {
                let mut out = vec![0f32; card];
                cfg_combine(&logits[0][q], &logits[1][q], self.params.guidance, &mut out);
                out
            } else {
                logits[0][q].clone()
            };
            if let Some(t) = model.pattern.frame_at(q, s, self.total_frames) {
                let tok = if t < self.prompt_frames {
                    self.params.prompt.as_ref().map_or(0, |p| p[q][t])
                } else {
                    sample(&row, &self.params.sampling, &mut self.rng) as u32
                };
                debug_assert_eq!(self.frames[q].len(), t);
                self.frames[q].push(tok);
            }
            guided.push(row);
        }
        self.last_logits = guided;
        self.step += 1;
        let completed = model
            .pattern
            .completed_by(s, self.total_frames)
            .map(|t| (0..k).map(|q| self.frames[q][t]).collect());
        StepOutput { completed }
    }
}
