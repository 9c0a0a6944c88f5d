//! Pre-norm transformer decoder layers for codec-token LMs: causal self-attention with a
//! preallocated KV cache and fused QKV projection, cross-attention whose K/V are computed once
//! per session, and a two-layer feed-forward block.
//!
//! Two checkpoint layouts load into the same structs (the loader is the key map):
//! - Hugging Face `MusicgenDecoderLayer`: `self_attn.{q,k,v,out}_proj`, `self_attn_layer_norm`,
//!   `encoder_attn.{q,k,v,out}_proj`, `encoder_attn_layer_norm`, `fc1`, `fc2`,
//!   `final_layer_norm` (transformers `models/musicgen/modeling_musicgen.py`);
//! - audiocraft `StreamingTransformerLayer`: `self_attn.in_proj_weight`, `self_attn.out_proj`,
//!   `norm1`, `cross_attention.in_proj_weight`, `cross_attention.out_proj`, `norm_cross`,
//!   `linear1`, `linear2`, `norm2` (`audiocraft/modules/transformer.py`).

use std::sync::Mutex;

use candle_core::{D, DType, Device, Module, Result, Tensor, bail};
use candle_nn::{LayerNorm, Linear, VarBuilder};

/// Which checkpoint layout to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// transformers' MusicGen names.
    HuggingFace,
    /// audiocraft's names.
    Audiocraft,
}

/// Shape and options of a decoder layer.
#[derive(Debug, Clone)]
pub struct LayerConfig {
    /// Model width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub ffn_dim: usize,
    /// Bias in attention projections.
    pub bias_attn: bool,
    /// Bias in feed-forward projections.
    pub bias_ff: bool,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
    /// Whether the layer has cross-attention.
    pub cross_attention: bool,
    /// Checkpoint layout.
    pub style: KeyStyle,
}

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((o, i), "weight")?;
    let b = if bias { Some(vb.get(o, "bias")?) } else { None };
    Ok(Linear::new(w, b))
}

/// Rows (product of the leading dims of `x`) up to which [`linear_fwd`] computes `x @ W^T` as
/// `(W @ x^T)^T`. Decode steps have one row per batch row, and candle's CPU gemm (crate `gemm`)
/// reads the `(out, in)` weight of `x @ W^T` slowly at such shapes: one row takes its
/// single-threaded GEMV path (~7 GB/s), a few rows its small-m GEMM (2-6 GB/s). With `W` as
/// the left operand and at least 2 columns, it streams the weight at 14-19 GB/s on 2 cores
/// (2..64 rows, musicgen-small shapes; `models/musicgen/examples/matmul_probe.rs`).
const SMALL_ROWS: usize = 64;

/// `x @ W^T (+ b)` for `x` (..., in) and `W` (out, in): [`Linear::forward`], computed as
/// `(W @ x^T)^T` when `x` has at most [`SMALL_ROWS`] rows.
fn linear_fwd(w: &Tensor, b: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("linear: scalar input")
    };
    let m: usize = lead.iter().product();
    if m == 0 || m > SMALL_ROWS {
        let y = Linear::new(w.clone(), None).forward(x)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let x2 = x.reshape((m, k))?;
    let y = if m <= DOT_ROWS && w.elem_count() >= DOT_MIN_WEIGHTS {
        dot_blocks(w, &x2)?.t()?
    } else {
        w.matmul(&x2.t()?)?.t()? // (m, out), column-major
    };
    // The bias add (or the copy) also makes the result row-major.
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y.contiguous()?,
    };
    let mut shape = lead.to_vec();
    shape.push(w.dim(0)?);
    y.reshape(shape)
}

/// Up to this many rows, [`linear_fwd`] uses [`dot_blocks`].
const DOT_ROWS: usize = 2;

/// ... but only for weights of at least this many elements (4 MB of f32). On small weights the
/// blocks are too short to pay for the thread pool's barrier, which also costs a scheduler
/// time slice per step when other processes keep the cores busy (a tiny model stepped 10x
/// slower alone than in a batch of two on a loaded machine).
const DOT_MIN_WEIGHTS: usize = 1 << 20;

/// `W @ x^T` (out, n) for `x` (n, in) with n <= 2, as one gemm call per block of W rows small
/// enough (rows * n <= 256) for gemm's dot-product ("horizontal") kernel, which streams the
/// row-major weight directly; the blocks are spread over candle's CPU thread pool. 20-25 GB/s
/// of weight reads on 2 cores where gemm's own threading of `W @ x^T` gets 14-19 GB/s
/// (`models/musicgen/examples/matmul_probe.rs`).
fn dot_blocks(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (o, _) = w.dims2()?;
    let n = x.dim(0)?;
    let rows = (256 / n.max(1)).max(1);
    let blocks = o.div_ceil(rows);
    let xt = x.t()?;
    let out: Vec<Mutex<Option<Result<Tensor>>>> = (0..blocks).map(|_| Mutex::new(None)).collect();
    candle_core::utils::barrier_pool().execute_chunked(blocks, |range| {
        for i in range {
            let lo = i * rows;
            let y = w
                .narrow(0, lo, rows.min(o - lo))
                .and_then(|wb| wb.matmul(&xt));
            *out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(y);
        }
    });
    let ys = out
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(candle_core::Error::Msg("linear: block not run".into())))
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&ys, 0)
}

/// `l.forward(x)`, through the fast paths for decode-step shapes (see [`SMALL_ROWS`]).
pub fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    linear_fwd(l.weight(), l.bias(), x)
}

fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(dim, "weight")?,
        vb.get(dim, "bias")?,
        eps,
    ))
}

/// Q, K and V projections fused into one matrix (`[3 * dim, dim]`).
fn fused_qkv(cfg: &LayerConfig, vb: &VarBuilder) -> Result<Linear> {
    let d = cfg.dim;
    match cfg.style {
        KeyStyle::HuggingFace => {
            let names = ["q_proj", "k_proj", "v_proj"];
            let ws = names
                .iter()
                .map(|n| vb.pp(n).get((d, d), "weight"))
                .collect::<Result<Vec<_>>>()?;
            let w = Tensor::cat(&ws, 0)?;
            let b = if cfg.bias_attn {
                let bs = names
                    .iter()
                    .map(|n| vb.pp(n).get(d, "bias"))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&bs, 0)?)
            } else {
                None
            };
            Ok(Linear::new(w, b))
        }
        KeyStyle::Audiocraft => {
            let w = vb.get((3 * d, d), "in_proj_weight")?;
            let b = if cfg.bias_attn {
                Some(vb.get(3 * d, "in_proj_bias")?)
            } else {
                None
            };
            Ok(Linear::new(w, b))
        }
    }
}

/// Multi-head attention with fused projections.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &LayerConfig, vb: VarBuilder) -> Result<Self> {
        let out_name = "out_proj";
        Ok(Self {
            qkv: fused_qkv(cfg, &vb)?,
            out: linear(cfg.dim, cfg.dim, cfg.bias_attn, vb.pp(out_name))?,
            heads: cfg.heads,
            head_dim: cfg.dim / cfg.heads,
        })
    }

    /// (B, T, D) → (B, H, T, Dh)
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        lin(&self.out, &self.attend_heads(q, k, v, mask)?)
    }

    /// Attention before the output projection: (B, T, D).
    fn attend_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut w = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let w = candle_nn::ops::softmax_last_dim(&w)?;
        let o = w.matmul(v)?; // (B, H, T, Dh)
        let (b, h, t, dh) = o.dims4()?;
        o.transpose(1, 2)?.reshape((b, t, h * dh))
    }
}

/// One session's part of a batched decode step ([`DecoderLayer::forward_step_batch`]): its
/// self-attention cache (whose batch size is the session's row count) and its conditioning.
#[derive(Debug)]
pub struct Segment<'a> {
    /// The session's cache for this layer.
    pub cache: &'a mut KvCache,
    /// The session's cross-attention K/V for this layer.
    pub cross: Option<&'a CrossKv>,
}

/// Self-attention KV cache, preallocated to the session's maximum length.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// A cache for `batch` rows of up to `max_len` positions.
    pub fn new(
        batch: usize,
        heads: usize,
        head_dim: usize,
        max_len: usize,
        dev: &Device,
    ) -> Result<Self> {
        // Two allocations: `slice_set` writes in place, so K and V must not share storage.
        let shape = (batch, heads, max_len, head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, DType::F32, dev)?,
            v: Tensor::zeros(shape, DType::F32, dev)?,
            len: 0,
        })
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Rows (batch size) the cache holds.
    pub fn rows(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }

    /// Forgets positions from `len` on (to undo a step that did not complete).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let max = self.k.dim(2)?;
        if self.len + t > max {
            bail!("KV cache full: {} + {t} > {max} positions", self.len)
        }
        self.k.slice_set(k, 2, self.len)?;
        self.v.slice_set(v, 2, self.len)?;
        self.len += t;
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

/// Cross-attention keys and values of the conditioning, computed once per session.
#[derive(Debug, Clone)]
pub struct CrossKv {
    k: Tensor,
    v: Tensor,
    /// Additive mask (B, 1, 1, L): 0 for real tokens, a large negative for padding.
    mask: Option<Tensor>,
}

impl CrossKv {
    /// Conditioning rows (the batch size of K and V).
    pub fn rows(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }

    /// The device holding the K/V.
    pub fn device(&self) -> &candle_core::Device {
        self.k.device()
    }

    /// The rows of several sessions' conditioning stacked into one batch, for a forward pass
    /// over all their rows. Shorter conditionings are padded to the longest with zero K/V and
    /// an additive mask of -1e9 there, so each row attends to exactly its own positions (the
    /// softmax weight of a padded position is exactly 0 in f32); when all lengths are equal and
    /// no part has a mask, no mask is added (the same arithmetic as one session alone).
    pub fn concat(parts: &[&CrossKv]) -> Result<CrossKv> {
        let Some(first) = parts.first() else {
            bail!("CrossKv::concat: nothing to concatenate")
        };
        if parts.len() == 1 {
            return Ok((*first).clone());
        }
        let max_l = parts
            .iter()
            .map(|p| p.k.dim(2))
            .collect::<Result<Vec<_>>>()?;
        let l = max_l.iter().copied().max().unwrap_or(0);
        let need_mask = parts.iter().any(|p| p.mask.is_some()) || max_l.iter().any(|&x| x != l);
        let (mut ks, mut vs, mut ms) = (Vec::new(), Vec::new(), Vec::new());
        for (p, &pl) in parts.iter().zip(&max_l) {
            let (k, v) = if pl < l {
                (
                    p.k.pad_with_zeros(2, 0, l - pl)?,
                    p.v.pad_with_zeros(2, 0, l - pl)?,
                )
            } else {
                (p.k.clone(), p.v.clone())
            };
            ks.push(k);
            vs.push(v);
            if need_mask {
                let b = p.rows();
                let own = match &p.mask {
                    Some(m) => m.clone(),
                    None => Tensor::zeros((b, 1, 1, pl), DType::F32, p.k.device())?,
                };
                let m = if pl < l {
                    let pad = (Tensor::ones((b, 1, 1, l - pl), DType::F32, p.k.device())? * -1e9)?;
                    Tensor::cat(&[&own, &pad], 3)?
                } else {
                    own
                };
                ms.push(m);
            }
        }
        Ok(CrossKv {
            k: Tensor::cat(&ks, 0)?,
            v: Tensor::cat(&vs, 0)?,
            mask: if need_mask {
                Some(Tensor::cat(&ms, 0)?)
            } else {
                None
            },
        })
    }
}

/// One pre-norm decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    norm_self: LayerNorm,
    self_attn: Attention,
    cross: Option<(LayerNorm, Attention)>,
    norm_ff: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl DecoderLayer {
    /// Loads one layer in `cfg.style` names.
    pub fn new(cfg: &LayerConfig, vb: VarBuilder) -> Result<Self> {
        let (n_self, sa, n_cross, ca, n_ff, l1, l2) = match cfg.style {
            KeyStyle::HuggingFace => (
                "self_attn_layer_norm",
                "self_attn",
                "encoder_attn_layer_norm",
                "encoder_attn",
                "final_layer_norm",
                "fc1",
                "fc2",
            ),
            KeyStyle::Audiocraft => (
                "norm1",
                "self_attn",
                "norm_cross",
                "cross_attention",
                "norm2",
                "linear1",
                "linear2",
            ),
        };
        let cross = if cfg.cross_attention {
            Some((
                layer_norm(cfg.dim, cfg.norm_eps, vb.pp(n_cross))?,
                Attention::new(cfg, vb.pp(ca))?,
            ))
        } else {
            None
        };
        Ok(Self {
            norm_self: layer_norm(cfg.dim, cfg.norm_eps, vb.pp(n_self))?,
            self_attn: Attention::new(cfg, vb.pp(sa))?,
            cross,
            norm_ff: layer_norm(cfg.dim, cfg.norm_eps, vb.pp(n_ff))?,
            fc1: linear(cfg.dim, cfg.ffn_dim, cfg.bias_ff, vb.pp(l1))?,
            fc2: linear(cfg.ffn_dim, cfg.dim, cfg.bias_ff, vb.pp(l2))?,
        })
    }

    /// Precomputes the cross-attention K/V of `cond` (B, L, D) with an optional (B, L) mask of
    /// 1 (keep) / 0 (padding).
    pub fn cross_kv(&self, cond: &Tensor, mask: Option<&Tensor>) -> Result<Option<CrossKv>> {
        let Some((_, attn)) = &self.cross else {
            return Ok(None);
        };
        let d = cond.dim(D::Minus1)?;
        // K and V rows of the fused projection.
        let kv_w = attn.qkv.weight().narrow(0, d, 2 * d)?;
        let kv_b = attn.qkv.bias().map(|b| b.narrow(0, d, 2 * d)).transpose()?;
        let kv = linear_fwd(&kv_w, kv_b.as_ref(), cond)?;
        let k = attn.split(&kv.narrow(D::Minus1, 0, d)?)?;
        let v = attn.split(&kv.narrow(D::Minus1, d, d)?)?;
        let mask = match mask {
            Some(m) => {
                let (b, l) = m.dims2()?;
                // (1 - m) * -1e9: fully masked rows (the unconditional CFG branch) stay finite.
                let add = ((m.to_dtype(DType::F32)? - 1.0)? * 1e9)?;
                Some(add.reshape((b, 1, 1, l))?)
            }
            None => None,
        };
        Ok(Some(CrossKv { k, v, mask }))
    }

    /// Runs `x` (B, T, D) at positions `cache.len()..`; `self_mask` is the causal mask for T > 1.
    pub fn forward(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        cross: Option<&CrossKv>,
        self_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let h = self.norm_self.forward(x)?;
        let qkv = lin(&self.self_attn.qkv, &h)?;
        let q = self.self_attn.split(&qkv.narrow(D::Minus1, 0, d)?)?;
        let k = self.self_attn.split(&qkv.narrow(D::Minus1, d, d)?)?;
        let v = self.self_attn.split(&qkv.narrow(D::Minus1, 2 * d, d)?)?;
        let (k, v) = cache.append(&k, &v)?;
        let x = (x + self.self_attn.attend(&q, &k, &v, self_mask)?)?;
        let x = match (&self.cross, cross) {
            (Some((norm, attn)), Some(kv)) => {
                let h = norm.forward(&x)?;
                let wq = attn.qkv.weight().narrow(0, 0, d)?;
                let bq = attn.qkv.bias().map(|b| b.narrow(0, 0, d)).transpose()?;
                let q = linear_fwd(&wq, bq.as_ref(), &h)?;
                let q = attn.split(&q)?;
                (&x + attn.attend(&q, &kv.k, &kv.v, kv.mask.as_ref())?)?
            }
            (Some(_), None) => bail!("this layer needs cross-attention conditioning"),
            _ => x,
        };
        let h = self.norm_ff.forward(&x)?;
        let h = lin(&self.fc2, &lin(&self.fc1, &h)?.gelu_erf()?)?;
        x + h
    }
}

impl DecoderLayer {
    /// One decode step (T = 1) for several sessions at once. `x` (N, 1, D) holds every
    /// session's rows back to back, in the order of `segs` (each takes `cache.rows()` rows).
    /// The projections and the feed-forward block run once over all N rows (the weights are
    /// read once per step, which is what a decode step's time is spent on); attention runs per
    /// session against its own cache and conditioning, so sessions of different lengths and
    /// prompts share a step (continuous batching).
    pub fn forward_step_batch(&self, x: &Tensor, segs: &mut [Segment<'_>]) -> Result<Tensor> {
        let (n, t, d) = x.dims3()?;
        if t != 1 {
            bail!("batched decode steps take one position per row, got {t}")
        }
        let total: usize = segs.iter().map(|s| s.cache.rows()).sum();
        if total != n {
            bail!("batched step: {n} rows given, the sessions have {total}")
        }
        let (heads, hd) = (self.self_attn.heads, self.self_attn.head_dim);
        let scale = (hd as f64).powf(-0.5);
        let h = self.norm_self.forward(x)?;
        // One projection and one head split for every row: (N, 3, H, 1, Dh).
        let qkv = lin(&self.self_attn.qkv, &h)?
            .reshape((n, 3, heads, 1, hd))?
            .contiguous()?;
        let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.contiguous(); // (N, H, 1, Dh)
        let (q_all, k_all, v_all) = (part(0)?, part(1)?, part(2)?);
        // Attention per session, against its own cache (sessions differ in length).
        let mut outs = Vec::with_capacity(segs.len());
        let mut off = 0;
        for seg in segs.iter_mut() {
            let r = seg.cache.rows();
            let (k, v) = seg
                .cache
                .append(&k_all.narrow(0, off, r)?, &v_all.narrow(0, off, r)?)?;
            let q = q_all.narrow(0, off, r)?;
            let w = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
            outs.push(w.matmul(&v)?); // (r, H, 1, Dh)
            off += r;
        }
        // With one position, (N, H, 1, Dh) is (N, 1, H * Dh) in memory order.
        let a = Tensor::cat(&outs, 0)?.reshape((n, 1, d))?;
        let x = (x + lin(&self.self_attn.out, &a)?)?;
        let x = match &self.cross {
            Some((norm, attn)) => {
                let h = norm.forward(&x)?;
                let wq = attn.qkv.weight().narrow(0, 0, d)?;
                let bq = attn.qkv.bias().map(|b| b.narrow(0, 0, d)).transpose()?;
                let q = linear_fwd(&wq, bq.as_ref(), &h)?
                    .reshape((n, heads, 1, hd))?
                    .contiguous()?;
                // Every session's conditioning in one attention: K/V padded to the longest,
                // the padding masked out.
                let kvs = segs
                    .iter()
                    .map(|s| {
                        s.cross.ok_or_else(|| {
                            candle_core::Error::Msg(
                                "this layer needs cross-attention conditioning".into(),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let kv = CrossKv::concat(&kvs)?;
                let mut w = (q.matmul(&kv.k.t()?)? * scale)?;
                if let Some(m) = &kv.mask {
                    w = w.broadcast_add(m)?;
                }
                let w = candle_nn::ops::softmax_last_dim(&w)?;
                let o = w.matmul(&kv.v)?.reshape((n, 1, d))?;
                (&x + lin(&attn.out, &o)?)?
            }
            None => x,
        };
        let h = self.norm_ff.forward(&x)?;
        let h = lin(&self.fc2, &lin(&self.fc1, &h)?.gelu_erf()?)?;
        x + h
    }
}

impl CrossKv {
    /// Positions of the conditioning.
    pub fn len(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// True when there is no conditioning.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Causal additive mask for `t` new positions after `past` cached ones: (t, past + t).
pub fn causal_mask(t: usize, past: usize, dev: &Device) -> Result<Tensor> {
    let total = past + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, total), dev)
}
