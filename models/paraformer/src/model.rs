//! The Paraformer network: SAN-M encoder, CIF predictor, parallel SAN-M decoder (batch 1, no
//! padding masks). Key names are those of FunASR's `model.pt` state dict; references are to
//! funasr 1.4.16.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm, Linear, VarBuilder, linear, linear_no_bias};

use crate::config::{Config, DecoderConfig, EncoderConfig, PredictorConfig};

/// FunASR `LayerNorm` (`models/transformer/layer_norm.py`) = torch LayerNorm with eps 1e-12.
fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(dim, 1e-12, vb)
}

/// Depthwise FSMN memory block (`fsmn_block`, Conv1d groups = channels, no bias) over a `[1, T,
/// C]` sequence zero-padded by `(left, right)` frames, plus the input (the `x += inputs` of
/// `MultiHeadedAttentionSANM.forward_fsmn` / `MultiHeadedAttentionSANMDecoder.forward`).
#[derive(Debug, Clone)]
struct Fsmn {
    /// `[K, C]`: tap k of every channel.
    taps: Tensor,
    left: usize,
    right: usize,
}

impl Fsmn {
    fn new(channels: usize, kernel: usize, shift: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((channels, 1, kernel), "fsmn_block.weight")?;
        let taps = w.squeeze(1)?.t()?.contiguous()?;
        // `left_padding = (k-1)/2 + sanm_shfit`, `right = k-1-left` (attention.py, __init__).
        let left = (kernel - 1) / 2 + shift;
        Ok(Fsmn {
            taps,
            left,
            right: kernel - 1 - left,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let padded = x.pad_with_zeros(1, self.left, self.right)?;
        self.conv_add(&padded, x)
    }

    /// `x + conv(padded)` where `padded` holds `T + K - 1` frames.
    fn conv_add(&self, padded: &Tensor, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(1)?;
        let mut acc = x.clone();
        for k in 0..self.taps.dim(0)? {
            let tap = self.taps.get(k)?;
            acc = (acc + padded.narrow(1, k, t)?.broadcast_mul(&tap)?)?;
        }
        Ok(acc)
    }

    /// The decoder's cached FSMN (`MultiHeadedAttentionSANMDecoder.forward` with a cache, as
    /// `ParaformerSANMDecoder.forward_chunk` calls it): the first chunk is zero-padded as offline
    /// and the padded input kept; later chunks use `cat(cache[1:], x)[-(K + T - 1):]` (so the
    /// previous chunk's right padding is part of the left context, as in the reference).
    fn forward_cached(&self, x: &Tensor, cache: &mut Option<Tensor>) -> Result<Tensor> {
        let t = x.dim(1)?;
        let k = self.taps.dim(0)?;
        let padded = match cache.take() {
            None => x.pad_with_zeros(1, self.left, self.right)?,
            Some(c) => {
                let c = c.narrow(1, 1, c.dim(1)? - 1)?;
                let cat = Tensor::cat(&[&c, x], 1)?;
                let n = cat.dim(1)?;
                let keep = (k + t - 1).min(n);
                cat.narrow(1, n - keep, keep)?.contiguous()?
            }
        };
        let out = self.conv_add(&padded, x)?;
        *cache = Some(padded);
        Ok(out)
    }
}

/// The last `n` frames of `[1, T, C]` (all of them when `T <= n`, as Python's `x[:, -n:]`).
fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = x.dim(1)?;
    let n = n.min(t);
    x.narrow(1, t - n, n)?.contiguous()
}

/// Chunk geometry of FunASR streaming (`chunk_size` = `[look-back, chunk, look-ahead]` in LFR
/// frames) and the attention look-back of encoder and decoder, in chunks (`-1` = unbounded; only
/// the encoder honours -1, as in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkConfig {
    /// `[left, chunk, right]` LFR frames; FunASR's default `[0, 10, 5]` (600 ms, 300 ms ahead).
    pub chunk_size: [usize; 3],
    /// `encoder_chunk_look_back` (chunks of cached keys/values per encoder layer).
    pub encoder_look_back: i64,
    /// `decoder_chunk_look_back` (chunks of cached cross-attention keys/values).
    pub decoder_look_back: i64,
}

impl Default for ChunkConfig {
    /// `[0, 10, 5]` with look-back 4 / 1, the settings of FunASR's streaming demo
    /// (`ParaformerStreaming.init_cache` itself defaults the look-backs to 0).
    fn default() -> Self {
        ChunkConfig {
            chunk_size: [0, 10, 5],
            encoder_look_back: 4,
            decoder_look_back: 1,
        }
    }
}

/// Scaled dot-product attention over heads: q `[1, Tq, H*dk]`, k/v `[1, Tk, H*dk]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, tq, d) = q.dims3()?;
    let tk = k.dim(1)?;
    let dk = d / heads;
    let split = |x: &Tensor, t: usize| x.reshape((t, heads, dk))?.transpose(0, 1)?.contiguous();
    // FunASR scales q before the product (`q_h * d_k ** -0.5`).
    let q = (split(q, tq)? * (dk as f64).powf(-0.5))?;
    let (k, v) = (split(k, tk)?, split(v, tk)?);
    let p = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
    p.matmul(&v)?.transpose(0, 1)?.reshape((1, tq, d))
}

/// `PositionwiseFeedForward`: `w_2(relu(w_1(x)))`.
#[derive(Debug, Clone)]
struct FeedForward {
    w_1: Linear,
    w_2: Linear,
}

impl FeedForward {
    fn new(d: usize, units: usize, vb: VarBuilder) -> Result<Self> {
        Ok(FeedForward {
            w_1: linear(d, units, vb.pp("w_1"))?,
            w_2: linear(units, d, vb.pp("w_2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.w_2.forward(&self.w_1.forward(x)?.relu()?)
    }
}

/// `EncoderLayerSANM` (pre-LN) with `MultiHeadedAttentionSANM`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    norm1: LayerNorm,
    norm2: LayerNorm,
    linear_q_k_v: Linear,
    linear_out: Linear,
    fsmn: Fsmn,
    ff: FeedForward,
    heads: usize,
    d: usize,
    residual_attn: bool,
}

impl EncoderLayer {
    fn new(in_size: usize, cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.output_size;
        let att = vb.pp("self_attn");
        Ok(EncoderLayer {
            norm1: layer_norm(in_size, vb.pp("norm1"))?,
            norm2: layer_norm(d, vb.pp("norm2"))?,
            linear_q_k_v: linear(in_size, 3 * d, att.pp("linear_q_k_v"))?,
            linear_out: linear(d, d, att.pp("linear_out"))?,
            fsmn: Fsmn::new(d, cfg.kernel_size, cfg.sanm_shfit, att.clone())?,
            ff: FeedForward::new(d, cfg.linear_units, vb.pp("feed_forward"))?,
            heads: cfg.attention_heads,
            d,
            // `encoders0` maps 560 -> d: no residual when in_size != size.
            residual_attn: in_size == d,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let qkv = self.linear_q_k_v.forward(&h)?;
        let q = qkv.narrow(D::Minus1, 0, self.d)?;
        let k = qkv.narrow(D::Minus1, self.d, self.d)?;
        let v = qkv.narrow(D::Minus1, 2 * self.d, self.d)?;
        let memory = self.fsmn.forward(&v)?;
        let att = (self
            .linear_out
            .forward(&attention(&q, &k, &v, self.heads)?)?
            + memory)?;
        let x = if self.residual_attn { (x + att)? } else { att };
        &x + self.ff.forward(&self.norm2.forward(&x)?)?
    }

    /// `EncoderLayerSANM.forward_chunk` (funasr `models/scama/encoder.py`) with
    /// `MultiHeadedAttentionSANM.forward_chunk` (`models/sanm/attention.py`): attention over the
    /// cached keys/values of earlier chunks (look-back > 0 or -1) plus this window; the FSMN
    /// memory is computed over this window alone with its zero padding (no FSMN state crosses
    /// chunks). The cache keeps the window minus its `chunk_size[2]` look-ahead frames, trimmed
    /// to `look_back * chunk_size[1]` frames.
    fn forward_chunk(
        &self,
        x: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        cc: &ChunkConfig,
    ) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let qkv = self.linear_q_k_v.forward(&h)?;
        let q = qkv.narrow(D::Minus1, 0, self.d)?;
        let k = qkv.narrow(D::Minus1, self.d, self.d)?.contiguous()?;
        let v = qkv.narrow(D::Minus1, 2 * self.d, self.d)?.contiguous()?;
        let lb = cc.encoder_look_back;
        let (k_all, v_all) = if lb > 0 || lb == -1 {
            let t = k.dim(1)?;
            // `k_h[:, :, :-chunk_size[2]]` (empty when chunk_size[2] == 0, as in Python).
            let stride = if cc.chunk_size[2] == 0 {
                0
            } else {
                t.saturating_sub(cc.chunk_size[2])
            };
            let (ks, vs) = (k.narrow(1, 0, stride)?, v.narrow(1, 0, stride)?);
            match cache.take() {
                Some((ck, cv)) => {
                    let k_all = Tensor::cat(&[&ck, &k], 1)?;
                    let v_all = Tensor::cat(&[&cv, &v], 1)?;
                    let mut nk = Tensor::cat(&[&ck, &ks], 1)?;
                    let mut nv = Tensor::cat(&[&cv, &vs], 1)?;
                    if lb != -1 {
                        let n = lb as usize * cc.chunk_size[1];
                        nk = last_frames(&nk, n)?;
                        nv = last_frames(&nv, n)?;
                    }
                    *cache = Some((nk, nv));
                    (k_all, v_all)
                }
                None => {
                    *cache = Some((ks.contiguous()?, vs.contiguous()?));
                    (k.clone(), v.clone())
                }
            }
        } else {
            (k.clone(), v.clone())
        };
        let memory = self.fsmn.forward(&v)?;
        let att = (self
            .linear_out
            .forward(&attention(&q, &k_all, &v_all, self.heads)?)?
            + memory)?;
        let x = if self.residual_attn { (x + att)? } else { att };
        &x + self.ff.forward(&self.norm2.forward(&x)?)?
    }
}

/// Sinusoidal positions of `SinusoidalPositionEncoder` (`models/transformer/embedding.py`):
/// positions 1..=T, `inv_timescale_i = exp(-i * ln(10000) / (dim/2 - 1))`, `[sin | cos]`.
pub(crate) fn sinusoidal_positions(t: usize, dim: usize, offset: usize) -> Vec<f32> {
    let half = dim / 2;
    let inc = (10000f32).ln() / (dim as f32 / 2.0 - 1.0);
    let inv: Vec<f32> = (0..half).map(|i| (i as f32 * -inc).exp()).collect();
    let mut out = vec![0f32; t * dim];
    for p in 0..t {
        let pos = (p + 1 + offset) as f32;
        for i in 0..half {
            let s = pos * inv[i];
            out[p * dim + i] = s.sin();
            out[p * dim + half + i] = s.cos();
        }
    }
    out
}

/// `SANMEncoder` with `input_layer: pe`.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    after_norm: LayerNorm,
    d: usize,
}

impl Encoder {
    fn new(input_size: usize, cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let mut layers = vec![EncoderLayer::new(
            input_size,
            cfg,
            vb.pp("encoders0").pp("0"),
        )?];
        for i in 0..cfg.num_blocks - 1 {
            layers.push(EncoderLayer::new(
                cfg.output_size,
                cfg,
                vb.pp("encoders").pp(i),
            )?);
        }
        Ok(Encoder {
            layers,
            after_norm: layer_norm(cfg.output_size, vb.pp("after_norm"))?,
            d: cfg.output_size,
        })
    }

    /// `[1, T, input_size]` features -> `[1, T, d]`.
    pub fn forward(&self, feats: &Tensor) -> Result<Tensor> {
        let (_, t, dim) = feats.dims3()?;
        // `xs_pad * output_size ** 0.5` then the PE of the *input* width (SANMEncoder.forward).
        let pe = Tensor::from_vec(sinusoidal_positions(t, dim, 0), (1, t, dim), feats.device())?;
        let mut x = ((feats * (self.d as f64).sqrt())? + pe)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        self.after_norm.forward(&x)
    }

    /// `SANMEncoderChunkOpt.forward_chunk` (funasr `models/scama/encoder.py`) for one chunk of
    /// `[1, n, input_size]` features, or `None` for the final "tail chunk" (no new audio: the
    /// window is the cached frames alone). New frames are scaled by `sqrt(d)` and get the
    /// streaming positions (`StreamSinusoidalPositionEncoder`: positions continue across chunks);
    /// the window is the last `chunk_size[0] + chunk_size[2]` embedded frames of the previous
    /// window (zeros at the start) followed by the new ones. Returns the window's output.
    pub fn forward_chunk(
        &self,
        feats: Option<&Tensor>,
        state: &mut EncoderChunkState,
        cc: &ChunkConfig,
    ) -> Result<Tensor> {
        let xs = match feats {
            None => state.feats.clone(),
            Some(feats) => {
                let (_, n, dim) = feats.dims3()?;
                let pe = Tensor::from_vec(
                    sinusoidal_positions(n, dim, state.start_idx),
                    (1, n, dim),
                    feats.device(),
                )?;
                state.start_idx += n;
                let x = ((feats * (self.d as f64).sqrt())? + pe)?;
                let xs = Tensor::cat(&[&state.feats, &x], 1)?;
                // `overlap_feats[:, -(c0 + c2):]` (the whole window when c0 + c2 == 0).
                let keep = cc.chunk_size[0] + cc.chunk_size[2];
                state.feats = if keep == 0 {
                    xs.clone()
                } else {
                    last_frames(&xs, keep)?
                };
                xs
            }
        };
        if state.layers.len() != self.layers.len() {
            state.layers = vec![None; self.layers.len()];
        }
        let mut x = xs;
        let keep_cache = cc.encoder_look_back > 0 || cc.encoder_look_back == -1;
        for (l, cache) in self.layers.iter().zip(state.layers.iter_mut()) {
            // Without look-back the reference passes no cache (cache["opt"] stays None).
            let mut tmp = None;
            let c = if keep_cache { cache } else { &mut tmp };
            x = l.forward_chunk(&x, c, cc)?;
        }
        self.after_norm.forward(&x)
    }
}

/// Encoder state carried across chunks (`cache["encoder"]` of `ParaformerStreaming.init_cache`:
/// `start_idx`, `feats`, `opt`).
#[derive(Debug, Clone)]
pub struct EncoderChunkState {
    start_idx: usize,
    feats: Tensor,
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl EncoderChunkState {
    /// Fresh state: `chunk_size[0] + chunk_size[2]` zero frames of width `input_size`.
    pub fn new(input_size: usize, cc: &ChunkConfig, device: &candle_core::Device) -> Result<Self> {
        Ok(EncoderChunkState {
            start_idx: 0,
            feats: Tensor::zeros(
                (1, cc.chunk_size[0] + cc.chunk_size[2], input_size),
                candle_core::DType::F32,
                device,
            )?,
            layers: Vec::new(),
        })
    }
}

/// `CifPredictorV2` weights: pad, Conv1d(k = l+r+1), ReLU, Linear(d, 1), sigmoid.
#[derive(Debug, Clone)]
pub struct Predictor {
    conv: Conv1d,
    out: Linear,
    cfg: PredictorConfig,
}

/// Result of the CIF predictor on one utterance.
#[derive(Debug, Clone)]
pub struct CifOutput {
    /// Per-frame weights, with the tail weight appended when `tail_threshold > 0`.
    pub alphas: Vec<f32>,
    /// `cif_v1` "fires": fractional part of the running sum, + 1 at firing frames.
    pub peaks: Vec<f32>,
    /// Number of tokens (`floor(Σα)` with a tail, `round(Σα)` without).
    pub token_num: usize,
    /// Acoustic embeddings `[1, token_num, d]` (zero rows where fewer frames fired).
    pub embeds: Tensor,
}

impl Predictor {
    fn new(cfg: &PredictorConfig, vb: VarBuilder) -> Result<Self> {
        let k = cfg.l_order + cfg.r_order + 1;
        Ok(Predictor {
            conv: candle_nn::conv1d(
                cfg.idim,
                cfg.idim,
                k,
                Conv1dConfig::default(),
                vb.pp("cif_conv1d"),
            )?,
            out: linear(cfg.idim, 1, vb.pp("cif_output"))?,
            cfg: cfg.clone(),
        })
    }

    /// Per-frame CIF weights of `[1, T, d]` encoder output (no tail).
    pub fn alphas(&self, enc: &Tensor) -> Result<Vec<f32>> {
        let ctx = enc
            .transpose(1, 2)?
            .pad_with_zeros(2, self.cfg.l_order, self.cfg.r_order)?;
        let h = self.conv.forward(&ctx)?.relu()?.transpose(1, 2)?;
        let a = candle_nn::ops::sigmoid(&self.out.forward(&h)?)?;
        let a = ((a * self.cfg.smooth_factor)? - self.cfg.noise_threshold)?.relu()?;
        a.flatten_all()?.to_vec1::<f32>()
    }

    /// `CifPredictorV2.forward` at inference (no target length; batch 1 so the mask is all ones).
    pub fn forward(&self, enc: &Tensor) -> Result<CifOutput> {
        let mut alphas = self.alphas(enc)?;
        let d = enc.dim(2)?;
        let mut rows: Vec<f32> = enc.flatten_all()?.to_vec1()?;
        let tail = self.cfg.tail_threshold > 0.0;
        let token_num = if tail {
            // tail_process_fn: one more frame of weight tail_threshold and zero hidden.
            alphas.push(self.cfg.tail_threshold as f32);
            rows.extend(std::iter::repeat_n(0f32, d));
            alphas.iter().sum::<f32>().floor() as usize
        } else {
            alphas.iter().sum::<f32>().round() as usize
        };
        let (peaks, frames) = cif(&alphas, &rows, d);
        let mut data = vec![0f32; token_num * d];
        for (dst, src) in data.chunks_exact_mut(d).zip(&frames) {
            dst.copy_from_slice(src);
        }
        let embeds = Tensor::from_vec(data, (1, token_num, d), enc.device())?;
        Ok(CifOutput {
            alphas,
            peaks,
            token_num,
            embeds,
        })
    }
}

/// CIF state carried across chunks (`cache["encoder"]["cif_hidden"]` / `["cif_alphas"]`): the
/// residual weight after the last firing and the normalised partial frame.
#[derive(Debug, Clone, Default)]
pub struct CifChunkState {
    /// Residual integrate (`cif_alphas`).
    pub alpha: f32,
    /// `frames / integrate` (or the zero frame), `cif_hidden`; empty = zeros.
    pub hidden: Vec<f32>,
}

/// Result of [`Predictor::forward_chunk`].
#[derive(Debug, Clone)]
pub struct CifChunkOutput {
    /// This window's weights after the chunk masks (before the carried/tail frames are added).
    pub alphas: Vec<f32>,
    /// Tokens fired in this chunk.
    pub token_num: usize,
    /// `[1, token_num, d]` acoustic embeddings (`None` when no token fired).
    pub embeds: Option<Tensor>,
}

impl Predictor {
    /// `CifPredictorV2.forward_chunk` (funasr `models/paraformer/cif_predictor.py`): weights of the
    /// window with the first `chunk_size[0]` frames and (unless final) everything after
    /// `chunk_size[0] + chunk_size[1]` zeroed; the carried residual frame is prepended and, when
    /// final, the tail frame (`tail_threshold`, zero hidden) appended; then the loop form of
    /// integrate-and-fire in float32 as the reference runs it. Updates `state`.
    pub fn forward_chunk(
        &self,
        enc: &Tensor,
        state: &mut CifChunkState,
        chunk_size: [usize; 3],
        is_final: bool,
    ) -> Result<CifChunkOutput> {
        let mut alphas = self.alphas(enc)?;
        let t = alphas.len();
        for a in alphas.iter_mut().take(chunk_size[0].min(t)) {
            *a = 0.0;
        }
        if !is_final {
            for a in alphas.iter_mut().skip(chunk_size[0] + chunk_size[1]) {
                *a = 0.0;
            }
        }
        let d = enc.dim(2)?;
        let rows: Vec<f32> = enc.flatten_all()?.to_vec1()?;
        let prev_hidden = if state.hidden.len() == d {
            state.hidden.clone()
        } else {
            vec![0f32; d]
        };
        let mut seq_a = Vec::with_capacity(t + 2);
        let mut seq_h: Vec<&[f32]> = Vec::with_capacity(t + 2);
        seq_a.push(state.alpha);
        seq_h.push(&prev_hidden);
        for (i, &a) in alphas.iter().enumerate() {
            seq_a.push(a);
            seq_h.push(&rows[i * d..(i + 1) * d]);
        }
        let zeros = vec![0f32; d];
        if is_final {
            seq_a.push(self.cfg.tail_threshold as f32);
            seq_h.push(&zeros);
        }
        let threshold = self.cfg.threshold as f32;
        let mut integrate = 0f32;
        let mut frame = vec![0f32; d];
        let mut fired: Vec<f32> = Vec::new();
        let mut token_num = 0;
        for (&a, h) in seq_a.iter().zip(&seq_h) {
            if a + integrate < threshold {
                integrate += a;
                for (f, &x) in frame.iter_mut().zip(h.iter()) {
                    *f += a * x;
                }
            } else {
                let w = threshold - integrate;
                for (f, &x) in frame.iter_mut().zip(h.iter()) {
                    *f += w * x;
                }
                fired.extend_from_slice(&frame);
                token_num += 1;
                integrate += a;
                integrate -= threshold;
                for (f, &x) in frame.iter_mut().zip(h.iter()) {
                    *f = integrate * x;
                }
            }
        }
        state.alpha = integrate;
        state.hidden = if integrate > 0.0 {
            frame.iter().map(|f| f / integrate).collect()
        } else {
            frame
        };
        let embeds = if token_num > 0 {
            Some(Tensor::from_vec(fired, (1, token_num, d), enc.device())?)
        } else {
            None
        };
        Ok(CifChunkOutput {
            alphas,
            token_num,
            embeds,
        })
    }
}

/// Integrate-and-fire as `cif_v1` / `cif_wo_hidden_v1` (`models/paraformer/cif_predictor.py`):
/// prefix sums of the weights in float64, rounded to float32 (the reference does this against
/// "cumsum precision degradation"); a token fires at each frame where `floor(prefix)` steps up.
/// Token `k`, firing at frame `f` after the previous firing at `prev`, is
/// `Σ_{prev < t <= f} α_t h_t - r_f h_f + r_prev h_prev` with `r = frac(prefix)` (the vectorised
/// form's cumulative-sum differences, here accumulated directly in f64). Returns the
/// "fires" array (`frac(prefix)`, + 1 where a token fires) and the token frames.
pub(crate) fn cif(alphas: &[f32], hidden: &[f32], d: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut prefix = Vec::with_capacity(alphas.len());
    let mut acc = 0f64;
    for &a in alphas {
        acc += a as f64;
        prefix.push(acc as f32);
    }
    let mut peaks = Vec::with_capacity(alphas.len());
    let mut frames = Vec::new();
    let mut cur = vec![0f64; d];
    let mut prev_floor = 0f32;
    for (t, &p) in prefix.iter().enumerate() {
        let fl = p.floor();
        let fire = fl - prev_floor > 0.0;
        prev_floor = fl;
        let rem = p - fl;
        peaks.push(if fire { 1.0 + rem } else { rem });
        let h = &hidden[t * d..(t + 1) * d];
        let a = alphas[t] as f64;
        if fire {
            let r = rem as f64;
            let mut frame = Vec::with_capacity(d);
            for (c, &x) in cur.iter_mut().zip(h) {
                frame.push((*c + (a - r) * x as f64) as f32);
                *c = r * x as f64;
            }
            frames.push(frame);
        } else {
            for (c, &x) in cur.iter_mut().zip(h) {
                *c += a * x as f64;
            }
        }
    }
    (peaks, frames)
}

/// `PositionwiseFeedForwardDecoderSANM`: `w_2(norm(relu(w_1(x))))`, `w_2` without bias.
#[derive(Debug, Clone)]
struct DecoderFeedForward {
    w_1: Linear,
    norm: LayerNorm,
    w_2: Linear,
}

impl DecoderFeedForward {
    fn new(d: usize, units: usize, vb: VarBuilder) -> Result<Self> {
        Ok(DecoderFeedForward {
            w_1: linear(d, units, vb.pp("w_1"))?,
            norm: layer_norm(units, vb.pp("norm"))?,
            w_2: linear_no_bias(units, d, vb.pp("w_2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.w_1.forward(x)?.relu()?;
        self.w_2.forward(&self.norm.forward(&h)?)
    }
}

/// `MultiHeadedAttentionCrossAtt`.
#[derive(Debug, Clone)]
struct CrossAttention {
    linear_q: Linear,
    linear_k_v: Linear,
    linear_out: Linear,
    heads: usize,
    d: usize,
}

impl CrossAttention {
    fn forward(&self, x: &Tensor, memory: &Tensor) -> Result<Tensor> {
        let q = self.linear_q.forward(x)?;
        let kv = self.linear_k_v.forward(memory)?;
        let k = kv.narrow(D::Minus1, 0, self.d)?;
        let v = kv.narrow(D::Minus1, self.d, self.d)?;
        self.linear_out.forward(&attention(&q, &k, &v, self.heads)?)
    }
}

/// `DecoderLayerSANM`: `decoders` (FSMN + cross-attention), `decoders2` (FSMN only) or
/// `decoders3` (feed-forward only, no residual).
#[derive(Debug, Clone)]
struct DecoderLayer {
    norm1: LayerNorm,
    ff: DecoderFeedForward,
    fsmn: Option<(LayerNorm, Fsmn)>,
    src: Option<(LayerNorm, CrossAttention)>,
}

impl DecoderLayer {
    fn new(
        d: usize,
        cfg: &DecoderConfig,
        fsmn_shift: Option<usize>,
        cross: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fsmn = match fsmn_shift {
            Some(shift) => Some((
                layer_norm(d, vb.pp("norm2"))?,
                Fsmn::new(d, cfg.kernel_size, shift, vb.pp("self_attn"))?,
            )),
            None => None,
        };
        let src = if cross {
            let a = vb.pp("src_attn");
            Some((
                layer_norm(d, vb.pp("norm3"))?,
                CrossAttention {
                    linear_q: linear(d, d, a.pp("linear_q"))?,
                    linear_k_v: linear(d, 2 * d, a.pp("linear_k_v"))?,
                    linear_out: linear(d, d, a.pp("linear_out"))?,
                    heads: cfg.attention_heads,
                    d,
                },
            ))
        } else {
            None
        };
        Ok(DecoderLayer {
            norm1: layer_norm(d, vb.pp("norm1"))?,
            ff: DecoderFeedForward::new(d, cfg.linear_units, vb.pp("feed_forward"))?,
            fsmn,
            src,
        })
    }

    fn forward(&self, x: &Tensor, memory: &Tensor) -> Result<Tensor> {
        // DecoderLayerSANM.forward: the FFN output replaces x (no residual around it); the FSMN
        // branch adds the *layer input* as residual.
        let t = self.ff.forward(&self.norm1.forward(x)?)?;
        let mut x = match &self.fsmn {
            Some((norm2, fsmn)) => (x + fsmn.forward(&norm2.forward(&t)?)?)?,
            None => t,
        };
        if let Some((norm3, att)) = &self.src {
            x = (&x + att.forward(&norm3.forward(&x)?, memory)?)?;
        }
        Ok(x)
    }

    /// `DecoderLayerSANM.forward_chunk` (funasr `models/paraformer/decoder.py`): cached FSMN,
    /// cross-attention over this chunk's encoder window plus (look-back > 0) the cached keys and
    /// values of the last `look_back * chunk_size[1]` memory frames
    /// (`MultiHeadedAttentionCrossAtt.forward_chunk`).
    fn forward_chunk(
        &self,
        x: &Tensor,
        memory: &Tensor,
        fsmn_cache: &mut Option<Tensor>,
        opt_cache: &mut Option<(Tensor, Tensor)>,
        cc: &ChunkConfig,
    ) -> Result<Tensor> {
        let t = self.ff.forward(&self.norm1.forward(x)?)?;
        let mut x = match &self.fsmn {
            Some((norm2, fsmn)) => (x + fsmn.forward_cached(&norm2.forward(&t)?, fsmn_cache)?)?,
            None => t,
        };
        if let Some((norm3, att)) = &self.src {
            let h = norm3.forward(&x)?;
            let q = att.linear_q.forward(&h)?;
            let kv = att.linear_k_v.forward(memory)?;
            let mut k = kv.narrow(D::Minus1, 0, att.d)?.contiguous()?;
            let mut v = kv.narrow(D::Minus1, att.d, att.d)?.contiguous()?;
            let lb = cc.decoder_look_back;
            if lb > 0 {
                let n = lb as usize * cc.chunk_size[1];
                if let Some((ck, cv)) = opt_cache.take() {
                    k = Tensor::cat(&[&ck, &k], 1)?;
                    v = Tensor::cat(&[&cv, &v], 1)?;
                }
                *opt_cache = Some((last_frames(&k, n)?, last_frames(&v, n)?));
            }
            let a = att.linear_out.forward(&attention(&q, &k, &v, att.heads)?)?;
            x = (&x + a)?;
        }
        Ok(x)
    }
}

/// `ParaformerSANMDecoder` (inference: acoustic embeddings in, token log-probabilities out).
#[derive(Debug, Clone)]
pub struct Decoder {
    layers: Vec<DecoderLayer>,
    after_norm: LayerNorm,
    output_layer: Linear,
}

impl Decoder {
    fn new(d: usize, vocab: usize, cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let shift = cfg.sanm_shfit.unwrap_or((cfg.kernel_size - 1) / 2);
        let mut layers = Vec::new();
        for i in 0..cfg.att_layer_num {
            layers.push(DecoderLayer::new(
                d,
                cfg,
                Some(shift),
                true,
                vb.pp("decoders").pp(i),
            )?);
        }
        // decoders2 always uses sanm_shfit = 0 (ParaformerSANMDecoder.__init__).
        for i in 0..cfg.num_blocks - cfg.att_layer_num {
            layers.push(DecoderLayer::new(
                d,
                cfg,
                Some(0),
                false,
                vb.pp("decoders2").pp(i),
            )?);
        }
        layers.push(DecoderLayer::new(
            d,
            cfg,
            None,
            false,
            vb.pp("decoders3").pp("0"),
        )?);
        Ok(Decoder {
            layers,
            after_norm: layer_norm(d, vb.pp("after_norm"))?,
            output_layer: linear(d, vocab, vb.pp("output_layer"))?,
        })
    }

    /// `[1, N, d]` acoustic embeddings + `[1, T, d]` encoder output -> `[1, N, vocab]`
    /// log-probabilities (`Paraformer.cal_decoder_with_predictor` applies log_softmax).
    pub fn forward(&self, embeds: &Tensor, memory: &Tensor) -> Result<Tensor> {
        let mut x = embeds.clone();
        for l in &self.layers {
            x = l.forward(&x, memory)?;
        }
        let logits = self.output_layer.forward(&self.after_norm.forward(&x)?)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)
    }

    /// `ParaformerSANMDecoder.forward_chunk` + log-softmax
    /// (`ParaformerStreaming.cal_decoder_with_predictor_chunk`). As in the reference, a
    /// `decoders2` stack is run only when it has more than one layer.
    pub fn forward_chunk(
        &self,
        embeds: &Tensor,
        memory: &Tensor,
        state: &mut DecoderChunkState,
        cc: &ChunkConfig,
    ) -> Result<Tensor> {
        let n = self.layers.len();
        if state.fsmn.len() != n {
            state.fsmn = vec![None; n];
            state.opt = vec![None; n];
        }
        let att_layers = self.layers.iter().filter(|l| l.src.is_some()).count();
        let second = self
            .layers
            .iter()
            .filter(|l| l.src.is_none() && l.fsmn.is_some())
            .count();
        let keep_opt = cc.decoder_look_back > 0 || cc.decoder_look_back == -1;
        let mut x = embeds.clone();
        for (i, l) in self.layers.iter().enumerate() {
            let is_second = l.src.is_none() && l.fsmn.is_some();
            if is_second && second <= 1 {
                continue;
            }
            let mut tmp = None;
            let opt = if keep_opt && i < att_layers {
                &mut state.opt[i]
            } else {
                &mut tmp
            };
            x = l.forward_chunk(&x, memory, &mut state.fsmn[i], opt, cc)?;
        }
        let logits = self.output_layer.forward(&self.after_norm.forward(&x)?)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)
    }
}

/// Decoder state carried across chunks (`cache["decoder"]`: `decode_fsmn`, `opt`).
#[derive(Debug, Clone, Default)]
pub struct DecoderChunkState {
    fsmn: Vec<Option<Tensor>>,
    opt: Vec<Option<(Tensor, Tensor)>>,
}

/// The three networks of a Paraformer.
#[derive(Debug, Clone)]
pub struct Network {
    /// SAN-M encoder.
    pub encoder: Encoder,
    /// CIF predictor.
    pub predictor: Predictor,
    /// Parallel decoder.
    pub decoder: Decoder,
    /// The CTC output layer (`ctc.ctc_lo`) of checkpoints trained with `ctc_weight > 0`, when
    /// the state dict carries it: used only by joint CTC scoring (`decoding_ctc_weight`).
    pub ctc: Option<Linear>,
}

impl Network {
    /// Build from a `VarBuilder` over the FunASR state dict.
    pub fn new(cfg: &Config, vocab: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.encoder_conf.output_size;
        Ok(Network {
            encoder: Encoder::new(cfg.input_size(), &cfg.encoder_conf, vb.pp("encoder"))?,
            predictor: Predictor::new(&cfg.predictor_conf, vb.pp("predictor"))?,
            decoder: Decoder::new(d, vocab, &cfg.decoder_conf, vb.pp("decoder"))?,
            ctc: if vb.contains_tensor("ctc.ctc_lo.weight") {
                Some(linear(d, vocab, vb.pp("ctc").pp("ctc_lo"))?)
            } else {
                None
            },
        })
    }

    /// CTC log-probabilities (`[T, vocab]`, row-major) of encoder output `[1, T, D]`, if the
    /// checkpoint has the CTC layer (FunASR `CTC.log_softmax`).
    pub fn ctc_log_probs(&self, enc: &Tensor) -> Result<Option<Vec<f32>>> {
        let Some(ctc) = &self.ctc else {
            return Ok(None);
        };
        let lp = candle_nn::ops::log_softmax(&ctc.forward(enc)?, D::Minus1)?;
        Ok(Some(lp.flatten_all()?.to_vec1()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop form of CIF (`cif` in cif_predictor.py) gives the same frames as the prefix-sum
    /// form implemented here.
    #[test]
    fn cif_matches_loop_form() {
        let alphas = [0.3f32, 0.5, 0.4, 0.9, 0.1, 0.2, 0.7, 0.45];
        let d = 2;
        let hidden: Vec<f32> = (0..alphas.len() * d)
            .map(|i| i as f32 * 0.1 - 0.3)
            .collect();
        let (peaks, frames) = cif(&alphas, &hidden, d);
        let mut integrate = 0f64;
        let mut cur = [0f64; 2];
        let mut want = Vec::new();
        for (t, &a) in alphas.iter().enumerate() {
            let a = a as f64;
            let h = &hidden[t * d..(t + 1) * d];
            if integrate + a < 1.0 {
                integrate += a;
                for c in 0..d {
                    cur[c] += a * h[c] as f64;
                }
            } else {
                let first = 1.0 - integrate;
                want.push([cur[0] + first * h[0] as f64, cur[1] + first * h[1] as f64]);
                integrate = a - first;
                cur = [integrate * h[0] as f64, integrate * h[1] as f64];
            }
        }
        assert_eq!(frames.len(), want.len());
        for (f, w) in frames.iter().zip(&want) {
            for c in 0..d {
                assert!((f[c] as f64 - w[c]).abs() < 1e-5);
            }
        }
        assert_eq!(peaks.iter().filter(|&&p| p >= 1.0).count(), want.len());
    }
}
