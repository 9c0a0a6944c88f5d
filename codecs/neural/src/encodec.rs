//! EnCodec, the neural audio codec of MusicGen and MAGNeT (24, 32 and 48 kHz configurations).
//!
//! Paper: Défossez et al., "High Fidelity Neural Audio Compression", arXiv 2210.13438.
//! Reference implementation followed here, layer by layer and formula by formula:
//! transformers `models/encodec/modeling_encodec.py` (5.24),
//! <https://github.com/huggingface/transformers/blob/main/src/transformers/models/encodec/modeling_encodec.py>.
//! Parity against it is tested in `codecs/neural/tests/parity.rs` on fixtures made by
//! `tools/fixtures/encodec.py`.
//!
//! Differences from candle-transformers' `encodec.rs`, which is *not* faithful: reflect padding
//! (with the reference's zero-pad trick for short inputs), transposed-conv trimming, dilation in
//! every conv, time-group-norm, normalisation and chunking (48 kHz), the bandwidth → number of
//! quantizers rule, and the final trim.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, IndexOp, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `pad_mode` of the checkpoint's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadMode {
    /// Reflect the signal at the edges (the public checkpoints).
    Reflect,
    /// Pad with zeros.
    Constant,
    /// Repeat the edge sample.
    Replicate,
}

/// `norm_type` of the checkpoint's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    /// Weight normalisation, folded into the weights at load time (24 and 32 kHz).
    WeightNorm,
    /// `GroupNorm(1, C)` after every conv (48 kHz).
    TimeGroupNorm,
}

/// Mirrors transformers' `EncodecConfig` (`config.json` of a Hugging Face EnCodec directory).
/// `Default` is `facebook/encodec_24khz`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub target_bandwidths: Vec<f32>,
    pub sampling_rate: u32,
    pub audio_channels: usize,
    pub normalize: bool,
    pub chunk_length_s: Option<f64>,
    pub overlap: Option<f64>,
    pub hidden_size: usize,
    pub num_filters: usize,
    pub num_residual_layers: usize,
    pub upsampling_ratios: Vec<usize>,
    pub norm_type: NormType,
    pub kernel_size: usize,
    pub last_kernel_size: usize,
    pub residual_kernel_size: usize,
    pub dilation_growth_rate: usize,
    pub use_causal_conv: bool,
    pub pad_mode: PadMode,
    pub compress: usize,
    pub num_lstm_layers: usize,
    pub trim_right_ratio: f64,
    pub codebook_size: usize,
    pub codebook_dim: Option<usize>,
    pub use_conv_shortcut: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            target_bandwidths: vec![1.5, 3.0, 6.0, 12.0, 24.0],
            sampling_rate: 24_000,
            audio_channels: 1,
            normalize: false,
            chunk_length_s: None,
            overlap: None,
            hidden_size: 128,
            num_filters: 32,
            num_residual_layers: 1,
            upsampling_ratios: vec![8, 5, 4, 2],
            norm_type: NormType::WeightNorm,
            kernel_size: 7,
            last_kernel_size: 7,
            residual_kernel_size: 3,
            dilation_growth_rate: 2,
            use_causal_conv: true,
            pad_mode: PadMode::Reflect,
            compress: 2,
            num_lstm_layers: 2,
            trim_right_ratio: 1.0,
            codebook_size: 1024,
            codebook_dim: None,
            use_conv_shortcut: true,
        }
    }
}

impl Config {
    /// Samples per token frame (product of the ratios).
    pub fn hop_length(&self) -> usize {
        self.upsampling_ratios.iter().product()
    }

    /// Token frames per second, rounded up as the reference does.
    pub fn frame_rate(&self) -> usize {
        (self.sampling_rate as usize).div_ceil(self.hop_length())
    }

    fn codebook_nbits(&self) -> usize {
        (self.codebook_size as f64).log2().ceil() as usize
    }

    /// Number of codebooks at the highest bandwidth.
    pub fn num_quantizers(&self) -> usize {
        let top = self.target_bandwidths.last().copied().unwrap_or(0.0) as f64;
        ((1000.0 * top) / (self.frame_rate() * self.codebook_nbits()) as f64).floor() as usize
    }

    /// Number of codebooks used at `bandwidth` kbps (`None`/0 = all).
    pub fn quantizers_for_bandwidth(&self, bandwidth: Option<f32>) -> usize {
        match bandwidth {
            Some(bw) if bw > 0.0 => {
                let per_q = (self.codebook_size as f64).log2() * self.frame_rate() as f64;
                ((bw as f64 * 1000.0 / per_q).floor() as usize).max(1)
            }
            _ => self.num_quantizers(),
        }
    }

    /// Samples per chunk for chunked (48 kHz) models.
    pub fn chunk_length(&self) -> Option<usize> {
        self.chunk_length_s.map(|s| (s * self.sampling_rate as f64) as usize)
    }

    /// Stride between chunks for chunked models.
    pub fn chunk_stride(&self) -> Option<usize> {
        match (self.chunk_length(), self.overlap) {
            (Some(len), Some(ov)) => Some((((1.0 - ov) * len as f64) as usize).max(1)),
            _ => None,
        }
    }

    fn codebook_dim(&self) -> usize {
        self.codebook_dim.unwrap_or(self.hidden_size)
    }

    /// Checks options this implementation does not support; called at load.
    pub fn validate(&self) -> Result<()> {
        if self.audio_channels == 0 || self.audio_channels > 2 {
            bail!("encodec: audio_channels must be 1 or 2, got {}", self.audio_channels)
        }
        if !self.codebook_size.is_power_of_two() {
            bail!("encodec: codebook_size must be a power of two, got {}", self.codebook_size)
        }
        if self.upsampling_ratios.is_empty() || self.upsampling_ratios.contains(&0) {
            bail!("encodec: bad upsampling_ratios {:?}", self.upsampling_ratios)
        }
        if self.target_bandwidths.is_empty() {
            bail!("encodec: target_bandwidths is empty")
        }
        if !self.use_causal_conv && self.trim_right_ratio != 1.0 {
            bail!("encodec: trim_right_ratio != 1.0 only makes sense for causal convolutions")
        }
        if self.compress == 0 || self.num_filters == 0 || self.hidden_size == 0 {
            bail!("encodec: compress, num_filters and hidden_size must be positive")
        }
        if self.chunk_length_s.is_some() != self.overlap.is_some() {
            bail!("encodec: chunk_length_s and overlap must be set together")
        }
        Ok(())
    }
}

/// Pads the last dimension as `_pad1d` in the reference: for reflect mode on an input not longer
/// than the pad, zeros are appended first so the reflection is defined.
fn pad1d(xs: &Tensor, left: usize, right: usize, mode: PadMode) -> Result<Tensor> {
    if left == 0 && right == 0 {
        return Ok(xs.clone());
    }
    match mode {
        PadMode::Constant => xs.pad_with_zeros(D::Minus1, left, right),
        PadMode::Replicate => xs.pad_with_same(D::Minus1, left, right),
        PadMode::Reflect => {
            let len = xs.dim(D::Minus1)?;
            let max_pad = left.max(right);
            let (xs, extra) = if len <= max_pad {
                let extra = max_pad - len + 1;
                (xs.pad_with_zeros(D::Minus1, 0, extra)?, extra)
            } else {
                (xs.clone(), 0)
            };
            let len = len + extra;
            let dev = xs.device();
            let mut parts = Vec::with_capacity(3);
            if left > 0 {
                let idx: Vec<u32> = (1..=left as u32).rev().collect();
                parts.push(xs.index_select(&Tensor::new(idx, dev)?, D::Minus1)?);
            }
            parts.push(xs.clone());
            if right > 0 {
                let idx: Vec<u32> = (0..right).map(|i| (len - 2 - i) as u32).collect();
                parts.push(xs.index_select(&Tensor::new(idx, dev)?, D::Minus1)?);
            }
            let padded = Tensor::cat(&parts, D::Minus1)?;
            let total = padded.dim(D::Minus1)?;
            padded.narrow(D::Minus1, 0, total - extra)
        }
    }
}

/// Loads a conv weight in whatever form the checkpoint stores it: weight norm (`weight_g` +
/// `weight_v`, folded here as `g * v / ||v||` with the norm over all dims but 0, PyTorch's
/// `weight_norm(dim=0)`), or a plain `weight`.
fn load_conv_weight(vb: &VarBuilder, shape: (usize, usize, usize)) -> Result<Tensor> {
    if vb.contains_tensor("weight_g") {
        let g = vb.get((shape.0, 1, 1), "weight_g")?;
        let v = vb.get(shape, "weight_v")?;
        let norm = v.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
        v.broadcast_mul(&g.broadcast_div(&norm)?)
    } else {
        vb.get(shape, "weight")
    }
}

/// `GroupNorm(1, C)` over (C, T) of each batch item (the reference's "time group norm").
#[derive(Debug, Clone)]
struct GroupNorm1 {
    weight: Tensor,
    bias: Tensor,
}

impl GroupNorm1 {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")? })
    }
}

impl Module for GroupNorm1 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, t) = xs.dims3()?;
        let flat = xs.reshape((b, c * t))?;
        let mean = flat.mean_keepdim(1)?;
        let centered = flat.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        let normed = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?.reshape((b, c, t))?;
        normed
            .broadcast_mul(&self.weight.reshape((1, c, 1))?)?
            .broadcast_add(&self.bias.reshape((1, c, 1))?)
    }
}

/// `EncodecConv1d`: a conv with the reference's asymmetric/causal padding and normalisation.
#[derive(Debug, Clone)]
pub(crate) struct Conv1d {
    weight: Tensor,
    bias: Tensor,
    norm: Option<GroupNorm1>,
    stride: usize,
    dilation: usize,
    kernel_eff: usize,
    causal: bool,
    pad_mode: PadMode,
}

impl Conv1d {
    fn new(
        cfg: &Config,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_vb = vb.pp("conv");
        let weight = load_conv_weight(&conv_vb, (c_out, c_in, k))?;
        let bias = conv_vb.get(c_out, "bias")?;
        let norm = match cfg.norm_type {
            NormType::WeightNorm => None,
            NormType::TimeGroupNorm => Some(GroupNorm1::new(c_out, vb.pp("norm"))?),
        };
        Ok(Self {
            weight,
            bias,
            norm,
            stride,
            dilation,
            kernel_eff: (k - 1) * dilation + 1,
            causal: cfg.use_causal_conv,
            pad_mode: cfg.pad_mode,
        })
    }

    fn padding_total(&self) -> usize {
        self.kernel_eff - self.stride
    }

    /// `_get_extra_padding_for_conv1d`: right padding so the last window is complete.
    fn extra_padding(&self, len: usize) -> usize {
        let (k, s, p) = (self.kernel_eff as f64, self.stride as f64, self.padding_total() as f64);
        let n_frames = ((len as f64 - k + p) / s + 1.0).ceil() - 1.0;
        let ideal = n_frames * s + k - p;
        (ideal - len as f64).max(0.0) as usize
    }
}

impl Module for Conv1d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let len = xs.dim(D::Minus1)?;
        let extra = self.extra_padding(len);
        let total = self.padding_total();
        let (left, right) = if self.causal {
            (total, extra)
        } else {
            let right = total / 2;
            (total - right, right + extra)
        };
        let xs = pad1d(xs, left, right, self.pad_mode)?;
        let ys = xs.conv1d(&self.weight, 0, self.stride, self.dilation, 1)?;
        let ys = ys.broadcast_add(&self.bias.reshape((1, (), 1))?)?;
        match &self.norm {
            Some(n) => n.forward(&ys),
            None => Ok(ys),
        }
    }
}

/// `EncodecConvTranspose1d`: transposed conv, then the reference's fixed un-padding.
#[derive(Debug, Clone)]
pub(crate) struct ConvTranspose1d {
    weight: Tensor,
    bias: Tensor,
    norm: Option<GroupNorm1>,
    stride: usize,
    pad_left: usize,
    pad_right: usize,
}

impl ConvTranspose1d {
    fn new(cfg: &Config, c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let conv_vb = vb.pp("conv");
        // ConvTranspose1d weights are (in, out, k); weight norm is over dim 0 there too.
        let weight = load_conv_weight(&conv_vb, (c_in, c_out, k))?;
        let bias = conv_vb.get(c_out, "bias")?;
        let norm = match cfg.norm_type {
            NormType::WeightNorm => None,
            NormType::TimeGroupNorm => Some(GroupNorm1::new(c_out, vb.pp("norm"))?),
        };
        let total = k - stride;
        let pad_right = if cfg.use_causal_conv {
            (total as f64 * cfg.trim_right_ratio).ceil() as usize
        } else {
            total / 2
        };
        Ok(Self { weight, bias, norm, stride, pad_left: total - pad_right, pad_right })
    }
}

impl Module for ConvTranspose1d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = xs.conv_transpose1d(&self.weight, 0, 0, self.stride, 1, 1)?;
        let ys = ys.broadcast_add(&self.bias.reshape((1, (), 1))?)?;
        let ys = match &self.norm {
            Some(n) => n.forward(&ys)?,
            None => ys,
        };
        let len = ys.dim(D::Minus1)?;
        ys.narrow(D::Minus1, self.pad_left, len - self.pad_left - self.pad_right)
    }
}

/// SEANet residual block: ELU → conv(k, dilation) → ELU → conv(1), plus a shortcut.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    convs: Vec<Conv1d>,
    shortcut: Option<Conv1d>,
}

impl ResnetBlock {
    fn new(cfg: &Config, dim: usize, dilations: [usize; 2], vb: VarBuilder) -> Result<Self> {
        let kernels = [cfg.residual_kernel_size, 1];
        let hidden = dim / cfg.compress;
        let mut convs = Vec::with_capacity(2);
        for (i, (k, d)) in kernels.iter().zip(dilations).enumerate() {
            let c_in = if i == 0 { dim } else { hidden };
            let c_out = if i == kernels.len() - 1 { dim } else { hidden };
            // Indices 0 and 2 of `block` are the parameter-free ELUs.
            convs.push(Conv1d::new(cfg, c_in, c_out, *k, 1, d, vb.pp("block").pp(2 * i + 1))?);
        }
        let shortcut = if cfg.use_conv_shortcut {
            Some(Conv1d::new(cfg, dim, dim, 1, 1, 1, vb.pp("shortcut"))?)
        } else {
            None
        };
        Ok(Self { convs, shortcut })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut ys = xs.clone();
        for conv in &self.convs {
            ys = conv.forward(&ys.elu(1.0)?)?;
        }
        let residual = match &self.shortcut {
            Some(s) => s.forward(xs)?,
            None => xs.clone(),
        };
        residual + ys
    }
}

/// Carried state of the LSTM: `(h, c)` per layer, each `(batch, hidden)`.
#[derive(Debug, Clone)]
pub(crate) struct LstmState {
    h: Vec<Tensor>,
    c: Vec<Tensor>,
}

/// `EncodecLSTM`: a stacked unidirectional LSTM on conv layout, with a skip connection.
/// Gate order is PyTorch's (i, f, g, o).
#[derive(Debug, Clone)]
pub(crate) struct Lstm {
    w_ih_t: Vec<Tensor>,
    w_hh_t: Vec<Tensor>,
    bias: Vec<Tensor>,
    hidden: usize,
}

impl Lstm {
    fn new(cfg: &Config, dim: usize, vb: VarBuilder) -> Result<Self> {
        let mut w_ih_t = Vec::new();
        let mut w_hh_t = Vec::new();
        let mut bias = Vec::new();
        for l in 0..cfg.num_lstm_layers {
            w_ih_t.push(vb.get((4 * dim, dim), &format!("weight_ih_l{l}"))?.t()?.contiguous()?);
            w_hh_t.push(vb.get((4 * dim, dim), &format!("weight_hh_l{l}"))?.t()?.contiguous()?);
            let b = (vb.get(4 * dim, &format!("bias_ih_l{l}"))? + vb.get(4 * dim, &format!("bias_hh_l{l}"))?)?;
            bias.push(b.reshape((1, 4 * dim))?);
        }
        Ok(Self { w_ih_t, w_hh_t, bias, hidden: dim })
    }

    pub(crate) fn zero_state(&self, batch: usize, dev: &Device) -> Result<LstmState> {
        let z = Tensor::zeros((batch, self.hidden), DType::F32, dev)?;
        Ok(LstmState { h: vec![z.clone(); self.w_ih_t.len()], c: vec![z; self.w_ih_t.len()] })
    }

    /// Runs `xs` (batch, C, T) from `state`, returning `lstm(xs) + xs` and updating `state`.
    pub(crate) fn forward_with_state(&self, xs: &Tensor, state: &mut LstmState) -> Result<Tensor> {
        let _t = crate::profile::scope(crate::profile::Kind::Lstm);
        let (b, c, t) = xs.dims3()?;
        if t == 0 {
            return Ok(xs.clone());
        }
        let h = self.hidden;
        // (T, B, C) time-major input for the first layer.
        let mut layer_in = xs.permute((2, 0, 1))?.contiguous()?;
        for l in 0..self.w_ih_t.len() {
            // The input projection of all time steps is one matmul; only h @ W_hh is sequential.
            let proj = layer_in
                .reshape((t * b, c))?
                .matmul(&self.w_ih_t[l])?
                .broadcast_add(&self.bias[l])?
                .reshape((t, b, 4 * h))?;
            let mut hs = state.h[l].clone();
            let mut cs = state.c[l].clone();
            let mut outs = Vec::with_capacity(t);
            for step in 0..t {
                let gates = (proj.i(step)? + hs.matmul(&self.w_hh_t[l])?)?;
                let i = candle_nn::ops::sigmoid(&gates.narrow(1, 0, h)?)?;
                let f = candle_nn::ops::sigmoid(&gates.narrow(1, h, h)?)?;
                let g = gates.narrow(1, 2 * h, h)?.tanh()?;
                let o = candle_nn::ops::sigmoid(&gates.narrow(1, 3 * h, h)?)?;
                cs = ((f * &cs)? + (i * g)?)?;
                hs = (o * cs.tanh()?)?;
                outs.push(hs.clone());
            }
            state.h[l] = hs;
            state.c[l] = cs;
            layer_in = Tensor::stack(&outs, 0)?;
        }
        let out = layer_in.permute((1, 2, 0))?;
        out + xs
    }
}

/// One layer of a SEANet stack.
#[derive(Debug, Clone)]
pub(crate) enum Layer {
    Conv(Conv1d),
    ConvTr(ConvTranspose1d),
    Res(ResnetBlock),
    Elu,
}

impl Module for Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _t = crate::profile::scope(match self {
            Layer::Conv(_) => crate::profile::Kind::Conv,
            Layer::ConvTr(_) => crate::profile::Kind::ConvTr,
            Layer::Res(_) => crate::profile::Kind::ResBlock,
            Layer::Elu => crate::profile::Kind::Elu,
        });
        match self {
            Layer::Conv(c) => c.forward(xs),
            Layer::ConvTr(c) => c.forward(xs),
            Layer::Res(r) => r.forward(xs),
            Layer::Elu => xs.elu(1.0),
        }
    }
}

pub(crate) fn run(layers: &[Layer], xs: &Tensor) -> Result<Tensor> {
    layers.iter().try_fold(xs.clone(), |acc, l| l.forward(&acc))
}

/// A SEANet encoder or decoder, split around its LSTM: `pre` → LSTM (+skip) → `post`.
/// The split is what lets streaming code carry the LSTM state while recomputing the
/// finite-receptive-field conv stacks on overlapping windows.
#[derive(Debug, Clone)]
pub(crate) struct Seanet {
    pub(crate) pre: Vec<Layer>,
    pub(crate) lstm: Lstm,
    pub(crate) post: Vec<Layer>,
}

impl Seanet {
    fn encoder(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let mut idx = 0usize;
        let mut next = || {
            idx += 1;
            idx - 1
        };
        let mut pre = vec![Layer::Conv(Conv1d::new(
            cfg,
            cfg.audio_channels,
            cfg.num_filters,
            cfg.kernel_size,
            1,
            1,
            vb.pp(next()),
        )?)];
        let mut scaling = 1;
        for &ratio in cfg.upsampling_ratios.iter().rev() {
            let dim = scaling * cfg.num_filters;
            for j in 0..cfg.num_residual_layers {
                let d = cfg.dilation_growth_rate.pow(j as u32);
                pre.push(Layer::Res(ResnetBlock::new(cfg, dim, [d, 1], vb.pp(next()))?));
            }
            next();
            pre.push(Layer::Elu);
            pre.push(Layer::Conv(Conv1d::new(cfg, dim, dim * 2, ratio * 2, ratio, 1, vb.pp(next()))?));
            scaling *= 2;
        }
        let dim = scaling * cfg.num_filters;
        let lstm = Lstm::new(cfg, dim, vb.pp(next()).pp("lstm"))?;
        next();
        let post = vec![
            Layer::Elu,
            Layer::Conv(Conv1d::new(cfg, dim, cfg.hidden_size, cfg.last_kernel_size, 1, 1, vb.pp(next()))?),
        ];
        Ok(Self { pre, lstm, post })
    }

    fn decoder(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let mut idx = 0usize;
        let mut next = || {
            idx += 1;
            idx - 1
        };
        let mut scaling = 1usize << cfg.upsampling_ratios.len();
        let dim = scaling * cfg.num_filters;
        let pre = vec![Layer::Conv(Conv1d::new(
            cfg,
            cfg.hidden_size,
            dim,
            cfg.kernel_size,
            1,
            1,
            vb.pp(next()),
        )?)];
        let lstm = Lstm::new(cfg, dim, vb.pp(next()).pp("lstm"))?;
        let mut post = Vec::new();
        for &ratio in &cfg.upsampling_ratios {
            let dim = scaling * cfg.num_filters;
            next();
            post.push(Layer::Elu);
            post.push(Layer::ConvTr(ConvTranspose1d::new(cfg, dim, dim / 2, ratio * 2, ratio, vb.pp(next()))?));
            for j in 0..cfg.num_residual_layers {
                let d = cfg.dilation_growth_rate.pow(j as u32);
                post.push(Layer::Res(ResnetBlock::new(cfg, dim / 2, [d, 1], vb.pp(next()))?));
            }
            scaling /= 2;
        }
        next();
        post.push(Layer::Elu);
        post.push(Layer::Conv(Conv1d::new(
            cfg,
            cfg.num_filters,
            cfg.audio_channels,
            cfg.last_kernel_size,
            1,
            1,
            vb.pp(next()),
        )?));
        Ok(Self { pre, lstm, post })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = run(&self.pre, xs)?;
        let mut state = self.lstm.zero_state(ys.dim(0)?, ys.device())?;
        let ys = self.lstm.forward_with_state(&ys, &mut state)?;
        run(&self.post, &ys)
    }
}

/// Residual vector quantizer (`quantizer.layers.N.codebook.embed`).
#[derive(Debug, Clone)]
pub(crate) struct Quantizer {
    /// Per codebook: (codebook_size, dim).
    embeds: Vec<Tensor>,
    /// Per codebook: transposed embeds (dim, codebook_size) and squared norms (1, codebook_size).
    embeds_t: Vec<Tensor>,
    embed_sq: Vec<Tensor>,
}

impl Quantizer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let mut embeds = Vec::new();
        let mut embeds_t = Vec::new();
        let mut embed_sq = Vec::new();
        for q in 0..cfg.num_quantizers() {
            let e = vb.pp("layers").pp(q).pp("codebook").get((cfg.codebook_size, cfg.codebook_dim()), "embed")?;
            let et = e.t()?.contiguous()?;
            embed_sq.push(et.sqr()?.sum_keepdim(0)?);
            embeds_t.push(et);
            embeds.push(e);
        }
        Ok(Self { embeds, embeds_t, embed_sq })
    }

    pub(crate) fn num_quantizers(&self) -> usize {
        self.embeds.len()
    }

    /// (B, D, T) embeddings → (B, n_q, T) u32 codes, nearest codeword on the residual.
    pub(crate) fn encode(&self, xs: &Tensor, n_q: usize) -> Result<Tensor> {
        let _t = crate::profile::scope(crate::profile::Kind::Quantizer);
        let (b, d, t) = xs.dims3()?;
        let mut residual = xs.transpose(1, 2)?.reshape((b * t, d))?;
        let mut all = Vec::with_capacity(n_q);
        for q in 0..n_q {
            // Same expression as the reference: -(|x|² - 2 x·e + |e|²), argmax.
            let xx = residual.sqr()?.sum_keepdim(1)?;
            let xe = residual.matmul(&self.embeds_t[q])?;
            let dist = xx.broadcast_sub(&(xe * 2.0)?)?.broadcast_add(&self.embed_sq[q])?.neg()?;
            let idx = dist.argmax(D::Minus1)?;
            let quantized = self.embeds[q].index_select(&idx, 0)?;
            residual = (residual - quantized)?;
            all.push(idx.reshape((b, t))?);
        }
        Tensor::stack(&all, 1)
    }

    /// (B, n_q, T) codes → (B, D, T) summed embeddings.
    pub(crate) fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let _t = crate::profile::scope(crate::profile::Kind::Quantizer);
        let (b, n_q, t) = codes.dims3()?;
        if n_q > self.embeds.len() {
            bail!("encodec: {n_q} codebooks given, the model has {}", self.embeds.len())
        }
        let mut acc: Option<Tensor> = None;
        for q in 0..n_q {
            let idx = codes.i((.., q, ..))?.flatten_all()?;
            let e = self.embeds[q].index_select(&idx, 0)?.reshape((b, t, ()))?;
            acc = Some(match acc {
                None => e,
                Some(a) => (a + e)?,
            });
        }
        match acc {
            Some(a) => a.transpose(1, 2)?.contiguous(),
            None => bail!("encodec: no codebooks to decode"),
        }
    }
}

/// Output of [`Encodec::encode`], mirroring the reference's `EncodecEncoderOutput`.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// u32 codes `(n_chunks, batch, n_q, frames)`; one chunk for non-chunked models.
    pub codes: Tensor,
    /// Per chunk, the `(batch,)` scale for normalising models; `None` otherwise.
    pub scales: Vec<Option<Tensor>>,
    /// Frames of padding added to the last chunk so chunks stack.
    pub last_frame_pad_length: usize,
}

/// An EnCodec model: encoder, residual VQ and decoder.
#[derive(Debug, Clone)]
pub struct Encodec {
    cfg: Config,
    pub(crate) encoder: Seanet,
    pub(crate) decoder: Seanet,
    pub(crate) quantizer: Quantizer,
    device: Device,
    num_parameters: usize,
}

impl Encodec {
    /// Builds the model from weights named as in a Hugging Face EnCodec checkpoint.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Seanet::encoder(cfg, vb.pp("encoder"))?,
            decoder: Seanet::decoder(cfg, vb.pp("decoder"))?,
            quantizer: Quantizer::new(cfg, vb.pp("quantizer"))?,
            device: vb.device().clone(),
            num_parameters: 0,
        })
    }

    /// Loads a Hugging Face EnCodec directory (`config.json` + `model.safetensors`), accepting
    /// both weight-norm key styles (`weight_g`/`weight_v` and
    /// `parametrizations.weight.original0/1`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.join("config.json").display())))?;
        let cfg = Self::parse_config(&cfg_text)?;
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        Self::from_tensors(&cfg, tensors, device)
    }

    /// Parses a transformers `config.json`.
    pub fn parse_config(json: &str) -> Result<Config> {
        serde_json::from_str(json).map_err(|e| candle_core::Error::Msg(format!("encodec config.json: {e}")))
    }

    /// Builds the model from a tensor map, normalising weight-norm key names.
    pub fn from_tensors(cfg: &Config, tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| {
                let k = k
                    .replace(".parametrizations.weight.original0", ".weight_g")
                    .replace(".parametrizations.weight.original1", ".weight_v");
                Ok((k, v.to_dtype(DType::F32)?))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        // Training-only buffers of the codebooks are not parameters of the codec.
        let num_parameters = tensors
            .iter()
            .filter(|(k, _)| !(k.ends_with("embed_avg") || k.ends_with("cluster_size") || k.ends_with("inited")))
            .map(|(_, v)| v.elem_count())
            .sum();
        let mut model = Self::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, device))?;
        model.num_parameters = num_parameters;
        Ok(model)
    }

    /// Number of weights in the checkpoint (0 when built from a bare `VarBuilder`).
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bandwidth check: `None` or one of `target_bandwidths`.
    pub fn check_bandwidth(&self, bandwidth: Option<f32>) -> Result<usize> {
        if let Some(bw) = bandwidth
            && !self.cfg.target_bandwidths.iter().any(|&b| (b - bw).abs() < 1e-6)
        {
            bail!("bandwidth {bw} kbps is not supported; choose one of {:?}", self.cfg.target_bandwidths)
        }
        Ok(self.cfg.quantizers_for_bandwidth(bandwidth).min(self.quantizer.num_quantizers()))
    }

    /// Encodes one chunk (`_encode_frame`): optional normalisation, encoder, RVQ. Returns
    /// `(batch, n_q, frames)` codes and the `(batch,)` scale of normalising models.
    pub fn encode_frame(&self, xs: &Tensor, n_q: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (xs, scale) = if self.cfg.normalize {
            let mono = xs.mean_keepdim(1)?;
            let scale = (mono.sqr()?.mean_keepdim(D::Minus1)?.sqrt()? + 1e-8)?;
            (xs.broadcast_div(&scale)?, Some(scale.flatten_all()?))
        } else {
            (xs.clone(), None)
        };
        let emb = self.encoder.forward(&xs)?;
        Ok((self.quantizer.encode(&emb, n_q)?, scale))
    }

    /// Encodes `(batch, channels, samples)` audio at the model's rate. `bandwidth` must be one of
    /// the config's; `None` = the smallest, as in the reference.
    pub fn encode(&self, xs: &Tensor, bandwidth: Option<f32>) -> Result<Encoded> {
        let bandwidth = Some(bandwidth.unwrap_or(self.cfg.target_bandwidths[0]));
        let n_q = self.check_bandwidth(bandwidth)?;
        let (_b, c, len) = xs.dims3()?;
        if c != self.cfg.audio_channels {
            bail!("encodec: expected {} channels, got {c}", self.cfg.audio_channels)
        }
        if len == 0 {
            bail!("encodec: empty input")
        }
        let (chunk, stride) = match (self.cfg.chunk_length(), self.cfg.chunk_stride()) {
            (Some(c), Some(s)) => (c, s),
            _ => (len, len),
        };
        let mut frames = Vec::new();
        let mut scales = Vec::new();
        let mut offset = 0;
        while offset < len {
            let n = chunk.min(len - offset);
            let (codes, scale) = self.encode_frame(&xs.narrow(2, offset, n)?, n_q)?;
            frames.push(codes);
            scales.push(scale);
            offset += stride;
        }
        let first_len = frames[0].dim(2)?;
        let last = frames.len() - 1;
        let pad = first_len - frames[last].dim(2)?;
        if pad > 0 {
            frames[last] = frames[last].pad_with_zeros(2, 0, pad)?;
        }
        Ok(Encoded { codes: Tensor::stack(&frames, 0)?, scales, last_frame_pad_length: pad })
    }

    /// Decodes one chunk of `(batch, n_q, frames)` codes (`_decode_frame`).
    pub fn decode_frame(&self, codes: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
        let emb = self.quantizer.decode(codes)?;
        let out = self.decoder.forward(&emb)?;
        match scale {
            Some(s) => out.broadcast_mul(&s.reshape(((), 1, 1))?),
            None => Ok(out),
        }
    }

    /// Decodes codes `(n_chunks, batch, n_q, frames)` to audio `(batch, channels, samples)`,
    /// as the reference's `decode` (chunks recombined by linear overlap-add). The output is not
    /// trimmed: trim it to the input length where known.
    pub fn decode(&self, codes: &Tensor, scales: &[Option<Tensor>], last_frame_pad_length: usize) -> Result<Tensor> {
        let n_chunks = codes.dim(0)?;
        if n_chunks == 0 {
            bail!("encodec: no chunks to decode")
        }
        let codes = codes.to_dtype(DType::U32)?;
        let frame_of = |i: usize| -> Result<Tensor> {
            let f = codes.i(i)?;
            if i == n_chunks - 1 && last_frame_pad_length > 0 {
                let t = f.dim(2)?;
                f.narrow(2, 0, t.saturating_sub(last_frame_pad_length))
            } else {
                Ok(f)
            }
        };
        match self.cfg.chunk_stride() {
            None => {
                if n_chunks != 1 {
                    bail!("encodec: expected one chunk, got {n_chunks}")
                }
                self.decode_frame(&frame_of(0)?, scales.first().and_then(|s| s.as_ref()))
            }
            Some(stride) => {
                let mut decoded = Vec::with_capacity(n_chunks);
                for i in 0..n_chunks {
                    decoded.push(self.decode_frame(&frame_of(i)?, scales.get(i).and_then(|s| s.as_ref()))?);
                }
                linear_overlap_add(&decoded, stride)
            }
        }
    }
}

/// `_linear_overlap_add`: triangular weights peaking mid-chunk, normalised by their sum.
pub fn linear_overlap_add(frames: &[Tensor], stride: usize) -> Result<Tensor> {
    let Some(first) = frames.first() else { bail!("encodec: nothing to overlap-add") };
    let dev = first.device();
    let frame_len = first.dim(D::Minus1)?;
    let last_len = frames[frames.len() - 1].dim(D::Minus1)?;
    let total = stride * (frames.len() - 1) + last_len;
    // torch.linspace(0, 1, L + 2)[1:-1]; weight = 0.5 - |t - 0.5|.
    let weight: Vec<f32> = (1..=frame_len)
        .map(|i| {
            let t = i as f32 / (frame_len + 1) as f32;
            0.5 - (t - 0.5).abs()
        })
        .collect();
    let (b, c, _) = first.dims3()?;
    let mut out = vec![0f32; b * c * total];
    let mut sum_w = vec![0f32; total];
    for (n, f) in frames.iter().enumerate() {
        let offset = n * stride;
        let len = f.dim(D::Minus1)?;
        let data = f.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for bc in 0..b * c {
            for j in 0..len {
                out[bc * total + offset + j] += weight[j] * data[bc * len + j];
            }
        }
        for j in 0..len {
            sum_w[offset + j] += weight[j];
        }
    }
    if sum_w.iter().any(|&w| w == 0.0) {
        bail!("encodec: overlap-add weights vanish; chunk stride larger than chunk")
    }
    for bc in 0..b * c {
        for j in 0..total {
            out[bc * total + j] /= sum_w[j];
        }
    }
    Tensor::from_vec(out, (b, c, total), dev)
}
