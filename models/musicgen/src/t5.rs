//! T5 encoder (the text conditioner of MusicGen), encoder only.
//!
//! Follows transformers `models/t5/modeling_t5.py`: RMS layer norm without mean or bias, no
//! scaling of attention scores, a bucketed relative position bias computed in the first block
//! and shared by all blocks, ReLU or gated-GELU feed-forward.

use candle_core::{D, DType, Device, Module, Result, Tensor, bail};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

/// The T5 fields MusicGen's `text_encoder` config carries.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

#[derive(Debug, Clone)]
struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.w)
    }
}

fn lin(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((o, i), "weight")?, None))
}

#[derive(Debug, Clone)]
enum Ff {
    Relu {
        wi: Linear,
        wo: Linear,
    },
    GatedGelu {
        wi0: Linear,
        wi1: Linear,
        wo: Linear,
    },
}

#[derive(Debug, Clone)]
struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_attn: RmsNorm,
    ff: Ff,
    norm_ff: RmsNorm,
}

/// The encoder stack plus the shared embedding.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    cfg: T5Config,
    embed: Embedding,
    rel_bias: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}

impl T5Encoder {
    /// Loads from `vb` at the T5 root (`shared`, `encoder.block.N…`).
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let embed_w = if vb.contains_tensor("shared.weight") {
            vb.pp("shared")
                .get((cfg.vocab_size, cfg.d_model), "weight")?
        } else {
            vb.pp("encoder.embed_tokens")
                .get((cfg.vocab_size, cfg.d_model), "weight")?
        };
        let inner = cfg.num_heads * cfg.d_kv;
        let enc = vb.pp("encoder");
        let rel_bias = Embedding::new(
            enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias")
                .get(
                    (cfg.relative_attention_num_buckets, cfg.num_heads),
                    "weight",
                )?,
            cfg.num_heads,
        );
        let norm = |vb: VarBuilder| -> Result<RmsNorm> {
            Ok(RmsNorm {
                w: vb.get(cfg.d_model, "weight")?,
                eps: cfg.layer_norm_epsilon,
            })
        };
        let mut blocks = Vec::new();
        for i in 0..cfg.num_layers {
            let b = enc.pp("block").pp(i).pp("layer");
            let sa = b.pp("0").pp("SelfAttention");
            let ffv = b.pp("1").pp("DenseReluDense");
            let ff = match cfg.feed_forward_proj.as_str() {
                "relu" => Ff::Relu {
                    wi: lin(cfg.d_model, cfg.d_ff, ffv.pp("wi"))?,
                    wo: lin(cfg.d_ff, cfg.d_model, ffv.pp("wo"))?,
                },
                "gated-gelu" => Ff::GatedGelu {
                    wi0: lin(cfg.d_model, cfg.d_ff, ffv.pp("wi_0"))?,
                    wi1: lin(cfg.d_model, cfg.d_ff, ffv.pp("wi_1"))?,
                    wo: lin(cfg.d_ff, cfg.d_model, ffv.pp("wo"))?,
                },
                other => {
                    bail!("t5: feed_forward_proj '{other}' is not supported (relu, gated-gelu)")
                }
            };
            blocks.push(Block {
                q: lin(cfg.d_model, inner, sa.pp("q"))?,
                k: lin(cfg.d_model, inner, sa.pp("k"))?,
                v: lin(cfg.d_model, inner, sa.pp("v"))?,
                o: lin(inner, cfg.d_model, sa.pp("o"))?,
                norm_attn: norm(b.pp("0").pp("layer_norm"))?,
                ff,
                norm_ff: norm(b.pp("1").pp("layer_norm"))?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, cfg.d_model),
            rel_bias,
            blocks,
            final_norm: norm(enc.pp("final_layer_norm"))?,
        })
    }

    /// The model width.
    pub fn hidden_size(&self) -> usize {
        self.cfg.d_model
    }

    /// transformers' `_relative_position_bucket` for a bidirectional encoder.
    fn bucket(&self, rel: i64) -> u32 {
        let nb = (self.cfg.relative_attention_num_buckets / 2) as i64;
        let mut ret = if rel > 0 { nb } else { 0 };
        let n = rel.abs();
        let max_exact = nb / 2;
        if n < max_exact {
            ret += n;
        } else {
            // Computed in float32 as the reference does.
            let v = ((n as f32 / max_exact as f32).ln()
                / (self.cfg.relative_attention_max_distance as f32 / max_exact as f32).ln()
                * (nb - max_exact) as f32) as i64;
            ret += (max_exact + v).min(nb - 1);
        }
        ret as u32
    }

    fn position_bias(&self, len: usize, dev: &Device) -> Result<Tensor> {
        let idx: Vec<u32> = (0..len)
            .flat_map(|q| (0..len).map(move |k| (q, k)))
            .map(|(q, k)| self.bucket(k as i64 - q as i64))
            .collect();
        let idx = Tensor::from_vec(idx, (len, len), dev)?;
        // (q, k, heads) → (1, heads, q, k)
        self.rel_bias
            .forward(&idx)?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// Encodes token ids (B, L) with a (B, L) 0/1 mask to hidden states (B, L, d_model).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let h = self.cfg.num_heads;
        let dk = self.cfg.d_kv;
        let mut x = self.embed.forward(ids)?;
        // Padding mask: finfo(f32).min on masked keys, as transformers does.
        let add = ((1.0 - mask.to_dtype(DType::F32)?)? * f32::MIN as f64)?.reshape((b, 1, 1, l))?;
        let bias = self.position_bias(l, dev)?.broadcast_add(&add)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, l, h, dk))?.transpose(1, 2)?.contiguous()
        };
        for blk in &self.blocks {
            let n = blk.norm_attn.forward(&x)?;
            let q = split(blk.q.forward(&n)?)?;
            let k = split(blk.k.forward(&n)?)?;
            let v = split(blk.v.forward(&n)?)?;
            let w = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
            let w = candle_nn::ops::softmax_last_dim(&w)?;
            let o = w.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h * dk))?;
            x = (x + blk.o.forward(&o)?)?;
            let n = blk.norm_ff.forward(&x)?;
            let f = match &blk.ff {
                Ff::Relu { wi, wo } => wo.forward(&wi.forward(&n)?.relu()?)?,
                Ff::GatedGelu { wi0, wi1, wo } => {
                    // "gated-gelu" is gelu_new (tanh approximation) in transformers.
                    wo.forward(&(wi0.forward(&n)?.gelu()? * wi1.forward(&n)?)?)?
                }
            };
            x = (x + f)?;
        }
        self.final_norm.forward(&x)
    }
}

/// Tokenizes prompts with a T5 tokenizer into `(ids, mask)`, each `(B, L)` u32: ids padded
/// right with 0 (T5's pad id) to the longest prompt, mask 1 on real tokens.
pub fn tokenize_padded(
    tok: &tokenizers::Tokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let encs = prompts
        .iter()
        .map(|p| {
            tok.encode(*p, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let l = encs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![0u32; prompts.len() * l];
    let mut mask = vec![0u32; prompts.len() * l];
    for (b, e) in encs.iter().enumerate() {
        for (i, &t) in e.iter().enumerate() {
            ids[b * l + i] = t;
            mask[b * l + i] = 1;
        }
    }
    Ok((
        Tensor::from_vec(ids, (prompts.len(), l), device)?,
        Tensor::from_vec(mask, (prompts.len(), l), device)?,
    ))
}
