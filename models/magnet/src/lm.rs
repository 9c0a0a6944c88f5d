//! The MAGNeT LM (audiocraft 1.3.0 `models/lm_magnet.py::MagnetLMModel`): MusicGen's audiocraft
//! `LMModel` weights and keys (`emb.K`, `transformer.layers.N`, `out_norm`, `linears.K`, the
//! text conditioner's `output_proj`), run non-causally over the whole sequence, with a
//! restricted self-attention band for codebooks (stages) above the first.

use std::collections::HashMap;
use std::path::Path;

use cadenza_nn::positions::sinusoidal;
use cadenza_nn::transformer::{CrossKv, DecoderLayer, KeyStyle, KvCache, LayerConfig, lin};
use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::config::MagnetXpCfg;

/// The stage-independent facts of a loaded MAGNeT LM.
#[derive(Debug, Clone, PartialEq)]
pub struct MagnetLmConfig {
    /// Masking span length (frames).
    pub span_len: usize,
    /// Frames attended on each side by stages > 0 (`None`: unrestricted).
    pub subcodes_context: Option<usize>,
    /// The longest sequence the reference can run with a restricted context: its stage masks
    /// are built for `frame_rate * segment_duration` frames (`MagnetLMModel._build_attn_masks`),
    /// and a longer sequence fails there. MAGNeT generates exactly this many frames (`MAGNeT.duration`).
    pub max_frames: usize,
}

/// A MAGNeT LM with its text-conditioning projection. Weights are shared (cheap to clone);
/// per-session state lives in [`crate::MagnetGeneration`].
#[derive(Debug, Clone)]
pub struct MagnetLm {
    embeds: Vec<Embedding>,
    layers: Vec<DecoderLayer>,
    norm: LayerNorm,
    heads: Vec<Linear>,
    cond_proj: Linear,
    dim: usize,
    n_heads: usize,
    card: usize,
    device: Device,
    /// Span length, attention context and sequence limit.
    pub config: MagnetLmConfig,
}

impl MagnetLm {
    /// Loads an audiocraft MAGNeT `state_dict.bin`. `frame_rate` is the codec's token rate
    /// (50 for EnCodec 32 kHz), which audiocraft takes from the compression model.
    pub fn load_audiocraft(path: &Path, frame_rate: usize, device: &Device) -> Result<Self> {
        let (yaml, tensors) = cadenza_musicgen::audiocraft::read_checkpoint_raw(path, device)?;
        let cfg = MagnetXpCfg::from_yaml(&yaml)?;
        Self::from_tensors(&cfg, tensors, frame_rate, device)
    }

    /// Builds the LM from an `xp.cfg` and the `best_state` tensors.
    pub fn from_tensors(
        cfg: &MagnetXpCfg,
        tensors: HashMap<String, Tensor>,
        frame_rate: usize,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let t = &cfg.transformer_lm;
        let lc = LayerConfig {
            dim: t.dim,
            heads: t.num_heads,
            ffn_dim: t.dim * t.hidden_scale,
            bias_attn: t.bias_attn,
            bias_ff: t.bias_ff,
            norm_eps: 1e-5,
            cross_attention: true,
            style: KeyStyle::Audiocraft,
        };
        let (d, v) = (t.dim, t.card);
        let embeds = (0..t.n_q)
            .map(|i| {
                Ok(Embedding::new(
                    vb.pp("emb").pp(i).get((v + 1, d), "weight")?,
                    d,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let layers = (0..t.num_layers)
            .map(|i| DecoderLayer::new(&lc, vb.pp("transformer.layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(
            vb.get(d, "out_norm.weight")?,
            vb.get(d, "out_norm.bias")?,
            1e-5,
        );
        let heads = (0..t.n_q)
            .map(|i| {
                Ok(Linear::new(
                    vb.pp("linears").pp(i).get((v, d), "weight")?,
                    None,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        // T5Conditioner.output_proj: its input width is the T5 width, read from the weight.
        let p = vb.pp("condition_provider.conditioners.description.output_proj");
        let w = p.get_unchecked("weight")?;
        let (o, i) = w.dims2()?;
        if o != d {
            bail!("magnet: conditioner output_proj is {o}x{i}, the LM width is {d}")
        }
        let cond_proj = Linear::new(w, Some(p.get(o, "bias")?));
        let max_frames = (frame_rate as f64 * cfg.segment_duration) as usize;
        Ok(Self {
            embeds,
            layers,
            norm,
            heads,
            cond_proj,
            dim: d,
            n_heads: t.num_heads,
            card: v,
            device: device.clone(),
            config: MagnetLmConfig {
                span_len: cfg.span_len,
                subcodes_context: cfg.subcodes_context,
                max_frames,
            },
        })
    }

    /// Codebooks (= decoding stages).
    pub fn num_codebooks(&self) -> usize {
        self.embeds.len()
    }

    /// Tokens per codebook; the mask token is `card` (`LMModel.special_token_id`).
    pub fn card(&self) -> usize {
        self.card
    }

    /// The mask token id (`MagnetLMModel` uses `special_token_id` = `card`).
    pub fn mask_id(&self) -> u32 {
        self.card as u32
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Model width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Width of the text-encoder states the conditioner projection expects.
    pub fn text_dim(&self) -> usize {
        self.cond_proj.weight().dim(1).unwrap_or(0)
    }

    /// The conditioning audiocraft's `T5Conditioner.forward` makes from T5 states (B, L, E) and
    /// their (B, L) mask: `output_proj(states) * mask`.
    pub fn condition(&self, t5_states: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.cond_proj
            .forward(t5_states)?
            .broadcast_mul(&mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?)
    }

    /// Cross-attention K/V for every layer from conditioning (B, L, D). audiocraft's fuser
    /// attends to every position (padding is zeroed, not masked): pass `None` for its semantics.
    pub fn cross(&self, cond: &Tensor, mask: Option<&Tensor>) -> Result<Vec<CrossKv>> {
        self.layers
            .iter()
            .map(|l| {
                l.cross_kv(cond, mask)?
                    .ok_or_else(|| candle_core::Error::Msg("no cross-attention".into()))
            })
            .collect()
    }

    /// The additive self-attention mask of `stage` for `t` frames: `None` for stage 0 or an
    /// unrestricted context, else 0 where |q - k| <= subcodes_context and -inf elsewhere
    /// (`MagnetLMModel.restricted_context_attn_mask` / `_stage_attn_mask`; the xformers branch of
    /// `StreamingMultiheadAttention.forward` cuts the align-8 padded mask to the sequence, so the
    /// band applies to the actual length).
    pub fn stage_mask(&self, stage: usize, t: usize, dev: &Device) -> Result<Option<Tensor>> {
        let Some(ctx) = self.config.subcodes_context.filter(|_| stage > 0) else {
            return Ok(None);
        };
        let m: Vec<f32> = (0..t)
            .flat_map(|q| {
                (0..t).map(move |k| {
                    if q.abs_diff(k) <= ctx {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        Ok(Some(Tensor::from_vec(m, (t, t), dev)?))
    }

    /// The final hidden states (B, T, D) for tokens (B, K, T) (`card` = mask) at `stage`.
    fn hidden(&self, tokens: &Tensor, cross: &[CrossKv], stage: usize) -> Result<Tensor> {
        let (b, k, t) = tokens.dims3()?;
        if k != self.embeds.len() {
            bail!(
                "magnet: {k} codebooks given, the model has {}",
                self.embeds.len()
            )
        }
        if stage >= k {
            bail!("magnet: stage {stage} of {k} codebooks")
        }
        if cross.len() != self.layers.len() {
            bail!(
                "magnet: cross-attention K/V for {} layers, the model has {}",
                cross.len(),
                self.layers.len()
            )
        }
        let dev = tokens.device();
        // LMModel.forward: the embeddings of all codebooks are summed.
        let mut x = self.embeds[0].forward(&tokens.i((.., 0, ..))?)?;
        for (i, e) in self.embeds.iter().enumerate().skip(1) {
            x = (x + e.forward(&tokens.i((.., i, ..))?)?)?;
        }
        let pos = sinusoidal(0, t, self.dim, 10000.0, dev)?;
        x = x.broadcast_add(&pos.unsqueeze(0)?)?;
        let mask = self.stage_mask(stage, t, dev)?;
        let hd = self.dim / self.n_heads;
        for (layer, kv) in self.layers.iter().zip(cross) {
            // Non-causal: every forward sees the whole sequence, so a fresh cache per call.
            let mut cache = KvCache::new(b, self.n_heads, hd, t, dev)?;
            x = layer.forward(&x, &mut cache, Some(kv), mask.as_ref())?;
        }
        self.norm.forward(&x)
    }

    /// Logits (B, K, T, card) of every codebook, as `LMModel.forward(sequence, stage=stage)`.
    pub fn forward(&self, tokens: &Tensor, cross: &[CrossKv], stage: usize) -> Result<Tensor> {
        let x = self.hidden(tokens, cross, stage)?;
        let logits = self
            .heads
            .iter()
            .map(|h| lin(h, &x))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&logits, 1)
    }

    /// Logits (B, T, card) of codebook `stage` only: the only ones MAGNeT decoding reads
    /// (`logits[:, stage]` in `_generate_stage`), without computing the other heads.
    pub fn forward_stage(
        &self,
        tokens: &Tensor,
        cross: &[CrossKv],
        stage: usize,
    ) -> Result<Tensor> {
        let x = self.hidden(tokens, cross, stage)?;
        lin(&self.heads[stage], &x)
    }
}
