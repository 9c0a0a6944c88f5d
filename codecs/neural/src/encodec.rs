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

use candle_core::{D, DType, Device, IndexOp, Result, Tensor, bail};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::kernels::{self, Tm};

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
        self.chunk_length_s
            .map(|s| (s * self.sampling_rate as f64) as usize)
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
            bail!(
                "encodec: audio_channels must be 1 or 2, got {}",
                self.audio_channels
            )
        }
        if !self.codebook_size.is_power_of_two() {
            bail!(
                "encodec: codebook_size must be a power of two, got {}",
                self.codebook_size
            )
        }
        if self.upsampling_ratios.is_empty() || self.upsampling_ratios.contains(&0) {
            bail!(
                "encodec: bad upsampling_ratios {:?}",
                self.upsampling_ratios
            )
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

/// Loads a conv weight in whatever form the checkpoint stores it: weight norm (`weight_g` +
/// `weight_v`, folded here as `g * v / ||v||` with the norm over all dims but 0, PyTorch's
/// `weight_norm(dim=0)`), or a plain `weight`.
fn load_conv_weight(vb: &VarBuilder, shape: (usize, usize, usize)) -> Result<Tensor> {
    let (g, v) = if vb.contains_tensor("weight_g") {
        (
            vb.get((shape.0, 1, 1), "weight_g")?,
            vb.get(shape, "weight_v")?,
        )
    } else if vb.contains_tensor("parametrizations.weight.original0") {
        // torch.nn.utils.parametrizations.weight_norm names (recent transformers).
        let p = vb.pp("parametrizations.weight");
        (
            p.get((shape.0, 1, 1), "original0")?,
            p.get(shape, "original1")?,
        )
    } else {
        return vb.get(shape, "weight");
    };
    let norm = v.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
    v.broadcast_mul(&g.broadcast_div(&norm)?)
}

/// An `EncodecConv1d`/`EncodecConvTranspose1d` module's parameters: `conv.{weight…, bias}` and,
/// for time-group-norm models, `norm.{weight, bias}`.
fn load_conv(
    cfg: &Config,
    vb: &VarBuilder,
    shape: (usize, usize, usize),
    c_out: usize,
) -> Result<(Tensor, Tensor, Option<GroupNorm1>)> {
    let conv_vb = vb.pp("conv");
    let weight = load_conv_weight(&conv_vb, shape)?;
    let bias = conv_vb.get(c_out, "bias")?;
    let norm = match cfg.norm_type {
        NormType::WeightNorm => None,
        NormType::TimeGroupNorm => Some(GroupNorm1::new(c_out, vb.pp("norm"))?),
    };
    Ok((weight, bias, norm))
}

/// `GroupNorm(1, C)` over (C, T) of each batch item (the reference's "time group norm").
#[derive(Debug, Clone)]
struct GroupNorm1 {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl GroupNorm1 {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: kernels::to_vec(&vb.get(channels, "weight")?)?,
            bias: kernels::to_vec(&vb.get(channels, "bias")?)?,
        })
    }

    /// Normalises one time-major `(T, C)` item in place.
    fn apply(&self, xs: &mut [f32]) {
        kernels::group_norm1(xs, &self.weight, &self.bias, 1e-5);
    }
}

/// `EncodecConv1d`: a conv with the reference's asymmetric/causal padding and normalisation.
/// Runs on time-major activations (see [`kernels`]); the bias is folded into the gemm operand.
#[derive(Debug, Clone)]
pub(crate) struct Conv1d {
    /// `(k * (c_in + 1), c_out)`: the weight as a gemm operand for inputs with a ones column.
    wt: Tensor,
    norm: Option<GroupNorm1>,
    c_in: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    kernel_eff: usize,
    causal: bool,
    pad_mode: PadMode,
    /// Raw weight `(c_out, c_in, k)` and bias, for the fused residual block.
    weight: Tensor,
    bias: Tensor,
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
        let (weight, bias, norm) = load_conv(cfg, &vb, (c_out, c_in, k), c_out)?;
        Ok(Self {
            wt: kernels::conv_weight_t(&weight, Some(&bias), c_in + 1)?,
            norm,
            c_in,
            k,
            stride,
            dilation,
            kernel_eff: (k - 1) * dilation + 1,
            causal: cfg.use_causal_conv,
            pad_mode: cfg.pad_mode,
            weight,
            bias,
        })
    }

    fn padding_total(&self) -> usize {
        self.kernel_eff - self.stride
    }

    /// `_get_extra_padding_for_conv1d`: right padding so the last window is complete.
    fn extra_padding(&self, len: usize) -> usize {
        let (k, s, p) = (
            self.kernel_eff as f64,
            self.stride as f64,
            self.padding_total() as f64,
        );
        let n_frames = ((len as f64 - k + p) / s + 1.0).ceil() - 1.0;
        let ideal = n_frames * s + k - p;
        (ideal - len as f64).max(0.0) as usize
    }

    /// (left, right) padding for an input of `len` frames.
    fn padding(&self, len: usize) -> (usize, usize) {
        let extra = self.extra_padding(len);
        let total = self.padding_total();
        if self.causal {
            (total, extra)
        } else {
            let right = total / 2;
            (total - right, right + extra)
        }
    }

    /// The conv of an input of `len` frames (after an ELU when `pre_elu`).
    fn spec(&self, len: usize, pre_elu: bool) -> kernels::ConvSpec<'_> {
        let (left, right) = self.padding(len);
        kernels::ConvSpec {
            c_in: self.c_in,
            k: self.k,
            stride: self.stride,
            dilation: self.dilation,
            left,
            right,
            mode: self.pad_mode,
            wt: &self.wt,
            pre_elu,
        }
    }

    fn forward_tm(&self, xs: &Tm, pre_elu: bool) -> Result<Tm> {
        let (b, len, _) = xs.dims();
        let spec = self.spec(len, pre_elu);
        let (t_out, c_out) = (spec.t_out(len)?, self.wt.dim(1)?);
        let mut out = kernels::pool_get(b * t_out * c_out);
        for i in 0..b {
            spec.run_into(xs.item(i), 0, 0, &mut out)?;
            if let Some(n) = &self.norm {
                n.apply(&mut out[i * t_out * c_out..]);
            }
        }
        Tm::new(out, b, t_out, c_out)
    }
}

/// `EncodecConvTranspose1d`: transposed conv, then the reference's fixed un-padding.
/// Computed as a plain conv with `stride * c_out` channels (see
/// [`kernels::conv_tr_as_conv_weight`]).
#[derive(Debug, Clone)]
pub(crate) struct ConvTranspose1d {
    /// `(taps * (c_in + 1), stride * c_out)` gemm operand, bias included.
    wt: Tensor,
    taps: usize,
    norm: Option<GroupNorm1>,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad_left: usize,
    pad_right: usize,
}

impl ConvTranspose1d {
    fn new(
        cfg: &Config,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // ConvTranspose1d weights are (in, out, k); weight norm is over dim 0 there too.
        let (weight, bias, norm) = load_conv(cfg, &vb, (c_in, c_out, k), c_out)?;
        let total = k - stride;
        let pad_right = if cfg.use_causal_conv {
            (total as f64 * cfg.trim_right_ratio).ceil() as usize
        } else {
            total / 2
        };
        let (wt, taps) = kernels::conv_tr_as_conv_weight(&weight, &bias, stride)?;
        Ok(Self {
            wt,
            taps,
            norm,
            c_in,
            c_out,
            k,
            stride,
            pad_left: total - pad_right,
            pad_right,
        })
    }

    fn forward_tm(&self, xs: &Tm, pre_elu: bool) -> Result<Tm> {
        let (b, len, _) = xs.dims();
        let spec = kernels::ConvSpec {
            c_in: self.c_in,
            k: self.taps,
            stride: 1,
            dilation: 1,
            left: self.taps - 1,
            right: self.taps - 1,
            mode: PadMode::Constant,
            wt: &self.wt,
            pre_elu,
        };
        // The conv gives `(len + taps - 1) * stride` rows; the transposed conv has `full`.
        let rows = (len + self.taps - 1) * self.stride;
        let full = (len - 1) * self.stride + self.k;
        let keep = full - self.pad_left - self.pad_right;
        let c = self.c_out;
        let mut out = kernels::pool_get(b * keep * c);
        for i in 0..b {
            match &self.norm {
                None => spec.run_into(
                    xs.item(i),
                    self.pad_left * c,
                    (rows - full + self.pad_right) * c,
                    &mut out,
                )?,
                Some(n) => {
                    // The reference normalises the untrimmed output, then trims.
                    let mut ys = Vec::with_capacity(full * c);
                    spec.run_into(xs.item(i), 0, (rows - full) * c, &mut ys)?;
                    n.apply(&mut ys);
                    out.extend_from_slice(&ys[self.pad_left * c..(full - self.pad_right) * c]);
                }
            }
        }
        Tm::new(out, b, keep, c)
    }
}

/// SEANet residual block: ELU → conv(k, dilation) → ELU → conv(1), plus a shortcut.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock {
    convs: Vec<Conv1d>,
    shortcut: Option<Conv1d>,
    /// Without normalisation, the last 1x1 conv and the shortcut are one gemm over the
    /// concatenated input `[x | elu(h) | 1]`: operand `(dim + hidden + 1, dim)`.
    fused_tail: Option<Tensor>,
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
            convs.push(Conv1d::new(
                cfg,
                c_in,
                c_out,
                *k,
                1,
                d,
                vb.pp("block").pp(2 * i + 1),
            )?);
        }
        let shortcut = if cfg.use_conv_shortcut {
            Some(Conv1d::new(cfg, dim, dim, 1, 1, 1, vb.pp("shortcut"))?)
        } else {
            None
        };
        let fused_tail = if cfg.norm_type == NormType::WeightNorm {
            Some(Self::fused_operand(
                &convs[1],
                shortcut.as_ref(),
                dim,
                hidden,
            )?)
        } else {
            None
        };
        Ok(Self {
            convs,
            shortcut,
            fused_tail,
        })
    }

    /// Stacks `[shortcut^T (or identity); conv2^T; b_shortcut + b_conv2]`.
    fn fused_operand(
        conv2: &Conv1d,
        shortcut: Option<&Conv1d>,
        dim: usize,
        hidden: usize,
    ) -> Result<Tensor> {
        let dev = conv2.weight.device();
        let w2 = kernels::to_vec(&conv2.weight)?; // (dim, hidden, 1)
        let mut bias = kernels::to_vec(&conv2.bias)?;
        let mut out = vec![0f32; (dim + hidden + 1) * dim];
        match shortcut {
            Some(s) => {
                let ws = kernels::to_vec(&s.weight)?; // (dim, dim, 1)
                for co in 0..dim {
                    for ci in 0..dim {
                        out[ci * dim + co] = ws[co * dim + ci];
                    }
                }
                for (b, v) in bias.iter_mut().zip(kernels::to_vec(&s.bias)?) {
                    *b += v;
                }
            }
            None => {
                for c in 0..dim {
                    out[c * dim + c] = 1.0;
                }
            }
        }
        for co in 0..dim {
            for ci in 0..hidden {
                out[(dim + ci) * dim + co] = w2[co * hidden + ci];
            }
        }
        out[(dim + hidden) * dim..].copy_from_slice(&bias);
        Tensor::from_vec(out, (dim + hidden + 1, dim), dev)
    }

    fn forward_tm(&self, xs: &Tm) -> Result<Tm> {
        let Some(tail) = &self.fused_tail else {
            let mut ys = self.convs[0].forward_tm(xs, true)?;
            for conv in &self.convs[1..] {
                let next = conv.forward_tm(&ys, true)?;
                std::mem::replace(&mut ys, next).recycle();
            }
            match &self.shortcut {
                Some(s) => {
                    let r = s.forward_tm(xs, false)?;
                    for (y, r) in ys.data.iter_mut().zip(&r.data) {
                        *y += r;
                    }
                    r.recycle();
                }
                None => {
                    for (y, x) in ys.data.iter_mut().zip(&xs.data) {
                        *y += x;
                    }
                }
            }
            return Ok(ys);
        };
        let (b, len, dim) = xs.dims();
        let conv1 = &self.convs[0];
        let spec = conv1.spec(len, true);
        if spec.t_out(len)? != len {
            bail!("encodec: residual conv changes the length")
        }
        let hidden = conv1.wt.dim(1)?;
        let width = dim + hidden + 1;
        let mut out = kernels::pool_get(b * len * dim);
        for i in 0..b {
            let x = xs.item(i);
            // Tiled: conv1 on a tile, then [x | elu(h) | 1] · tail, all in cache.
            let tile = spec.tile_rows();
            let mut t0 = 0;
            while t0 < len {
                let n = tile.min(len - t0);
                let h = spec.tile(x, t0, n)?;
                let prof = crate::profile::scope(crate::profile::Kind::ConvInput);
                let mut cat = vec![0f32; n * width];
                kernels::with_f32(&h, |h| {
                    kernels::par_rows(&mut cat, width, |out, row0| {
                        let (x, h) = (&x[(t0 + row0) * dim..], &h[row0 * hidden..]);
                        kernels::simd(ConcatXEluH {
                            out,
                            x,
                            h,
                            dim,
                            hidden,
                        })
                    })
                })?;
                drop(prof);
                let prof = crate::profile::scope(crate::profile::Kind::ConvGemm);
                let y = Tensor::from_vec(cat, (n, width), h.device())?.matmul(tail)?;
                drop(prof);
                kernels::with_f32(&y, |y| out.extend_from_slice(y))?;
                t0 += n;
            }
        }
        Tm::new(out, b, len, dim)
    }
}

/// Rows `[x | elu(h) | 1]` (widths `dim`, `hidden`, 1) into `out`.
struct ConcatXEluH<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    h: &'a [f32],
    dim: usize,
    hidden: usize,
}

impl kernels::Kernel for ConcatXEluH<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            out,
            x,
            h,
            dim,
            hidden,
        } = self;
        concat_x_elu_h(out, x, h, dim, hidden)
    }
}

#[inline(always)]
fn concat_x_elu_h(out: &mut [f32], x: &[f32], h: &[f32], dim: usize, hidden: usize) {
    let width = dim + hidden + 1;
    for ((row, x), h) in out
        .chunks_exact_mut(width)
        .zip(x.chunks_exact(dim))
        .zip(h.chunks_exact(hidden))
    {
        row[..dim].copy_from_slice(x);
        for (o, &v) in row[dim..dim + hidden].iter_mut().zip(h) {
            *o = kernels::elu(v);
        }
        row[dim + hidden] = 1.0;
    }
}

/// Nearest codeword per row of `residual` (`d` wide) given `xe = residual · E^T` (`n` wide):
/// writes the index to `best` and subtracts the codeword from the row.
struct AssignCodes<'a> {
    residual: &'a mut [f32],
    xe: &'a [f32],
    best: &'a mut [u32],
    embed: &'a [f32],
    esq: &'a [f32],
    dist: &'a mut [f32],
}

impl kernels::Kernel for AssignCodes<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            residual,
            xe,
            best,
            embed,
            esq,
            dist,
        } = self;
        assign_codes(residual, xe, best, embed, esq, dist)
    }
}

#[inline(always)]
fn assign_codes(
    residual: &mut [f32],
    xe: &[f32],
    best: &mut [u32],
    embed: &[f32],
    esq: &[f32],
    dist: &mut [f32],
) {
    let d = embed.len() / esq.len();
    for ((r, xe), best) in residual
        .chunks_exact_mut(d)
        .zip(xe.chunks_exact(esq.len()))
        .zip(best)
    {
        // Same expression as the reference: argmax of -(|x|² - 2 x·e + |e|²).
        let xx: f32 = r.iter().map(|v| v * v).sum();
        for ((d, &xe), &es) in dist.iter_mut().zip(xe).zip(esq) {
            *d = -((xx - xe * 2.0) + es);
        }
        let j = kernels::argmax(dist);
        for (r, e) in r.iter_mut().zip(&embed[j * d..(j + 1) * d]) {
            *r -= e;
        }
        *best = j as u32;
    }
}

/// Carried state of the LSTM: `(h, c)` per layer, each `batch * hidden` floats.
#[derive(Debug, Clone)]
pub(crate) struct LstmState {
    h: Vec<Vec<f32>>,
    c: Vec<Vec<f32>>,
}

/// `EncodecLSTM`: a stacked unidirectional LSTM on conv layout, with a skip connection.
/// Gate order is PyTorch's (i, f, g, o).
#[derive(Debug, Clone)]
pub(crate) struct Lstm {
    w_ih_t: Vec<Tensor>,
    /// Per layer, the rows of the recurrent weights `(4 * hidden, hidden)` for the first and
    /// the second half of the hidden units (see [`kernels::lstm_recurrence`]).
    w_hh: Vec<[Vec<f32>; 2]>,
    bias: Vec<Tensor>,
    hidden: usize,
}

impl Lstm {
    fn new(cfg: &Config, dim: usize, vb: VarBuilder) -> Result<Self> {
        let mut w_ih_t = Vec::new();
        let mut w_hh = Vec::new();
        let mut bias = Vec::new();
        for l in 0..cfg.num_lstm_layers {
            w_ih_t.push(
                vb.get((4 * dim, dim), &format!("weight_ih_l{l}"))?
                    .t()?
                    .contiguous()?,
            );
            let w = kernels::to_vec(&vb.get((4 * dim, dim), &format!("weight_hh_l{l}"))?)?;
            w_hh.push([
                kernels::lstm_rows(&w, dim, 0, dim / 2),
                kernels::lstm_rows(&w, dim, dim / 2, dim),
            ]);
            let b = (vb.get(4 * dim, &format!("bias_ih_l{l}"))?
                + vb.get(4 * dim, &format!("bias_hh_l{l}"))?)?;
            bias.push(b.reshape((1, 4 * dim))?);
        }
        Ok(Self {
            w_ih_t,
            w_hh,
            bias,
            hidden: dim,
        })
    }

    pub(crate) fn zero_state(&self, batch: usize, _dev: &Device) -> Result<LstmState> {
        let z = vec![0f32; batch * self.hidden];
        Ok(LstmState {
            h: vec![z.clone(); self.w_hh.len()],
            c: vec![z; self.w_hh.len()],
        })
    }

    /// Runs `xs` (batch, C, T) from `state`, returning `lstm(xs) + xs` and updating `state`.
    pub(crate) fn forward_with_state(&self, xs: &Tensor, state: &mut LstmState) -> Result<Tensor> {
        if xs.dim(2)? == 0 {
            return Ok(xs.clone());
        }
        self.forward_tm(&Tm::from_bct(xs)?, state, xs.device())?
            .to_bct(xs.device())
    }

    /// Time-major version of [`Lstm::forward_with_state`].
    pub(crate) fn forward_tm(&self, xs: &Tm, state: &mut LstmState, dev: &Device) -> Result<Tm> {
        let _t = crate::profile::scope(crate::profile::Kind::Lstm);
        let (b, t, c) = xs.dims();
        let h = self.hidden;
        if c != h {
            bail!("encodec: LSTM of width {h} given {c} channels")
        }
        let mut layer_in = Tensor::from_slice(&xs.data, (b * t, c), dev)?;
        let mut out = Vec::new();
        for l in 0..self.w_ih_t.len() {
            // The input projection of all time steps is one matmul; only W_hh h is sequential.
            let proj = layer_in
                .matmul(&self.w_ih_t[l])?
                .broadcast_add(&self.bias[l])?;
            let proj = kernels::to_vec(&proj)?; // (b, t, 4h)
            out = vec![0f32; b * t * h];
            let _t = crate::profile::scope(crate::profile::Kind::LstmStep);
            for bi in 0..b {
                let hs = &mut state.h[l][bi * h..(bi + 1) * h];
                let cs = &mut state.c[l][bi * h..(bi + 1) * h];
                kernels::lstm_recurrence(
                    &proj[bi * t * 4 * h..(bi + 1) * t * 4 * h],
                    &self.w_hh[l],
                    hs,
                    cs,
                    &mut out[bi * t * h..(bi + 1) * t * h],
                );
            }
            if l + 1 < self.w_ih_t.len() {
                layer_in = Tensor::from_slice(&out, (b * t, h), dev)?;
            }
        }
        for (o, x) in out.iter_mut().zip(&xs.data) {
            *o += x;
        }
        Tm::new(out, b, t, c)
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

/// Runs a stack on a `(B, C, T)` tensor.
pub(crate) fn run(layers: &[Layer], xs: &Tensor) -> Result<Tensor> {
    let xs = {
        let _t = crate::profile::scope(crate::profile::Kind::Layout);
        Tm::from_bct(xs)?
    };
    let ys = run_tm(layers, xs)?;
    let _t = crate::profile::scope(crate::profile::Kind::Layout);
    let out = ys.to_bct(&Device::Cpu)?;
    ys.recycle();
    Ok(out)
}

/// Runs a stack on time-major activations, fusing each ELU into the conv that follows it.
/// Consumes the input (its buffer is recycled).
pub(crate) fn run_tm(layers: &[Layer], xs: Tm) -> Result<Tm> {
    use crate::profile::{Kind, scope};
    let mut xs = xs;
    let mut pending_elu = false;
    for layer in layers {
        let next = match layer {
            Layer::Elu => {
                if pending_elu {
                    elu_tm(&mut xs);
                }
                pending_elu = true;
                continue;
            }
            Layer::Conv(c) => {
                let _t = scope(Kind::Conv);
                c.forward_tm(&xs, pending_elu)?
            }
            Layer::ConvTr(c) => {
                let _t = scope(Kind::ConvTr);
                c.forward_tm(&xs, pending_elu)?
            }
            Layer::Res(r) => {
                if pending_elu {
                    elu_tm(&mut xs);
                }
                let _t = scope(Kind::ResBlock);
                r.forward_tm(&xs)?
            }
        };
        std::mem::replace(&mut xs, next).recycle();
        pending_elu = false;
    }
    if pending_elu {
        elu_tm(&mut xs);
    }
    Ok(xs)
}

fn elu_tm(xs: &mut Tm) {
    let _t = crate::profile::scope(crate::profile::Kind::Elu);
    kernels::elu_inplace(&mut xs.data);
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
                pre.push(Layer::Res(ResnetBlock::new(
                    cfg,
                    dim,
                    [d, 1],
                    vb.pp(next()),
                )?));
            }
            next();
            pre.push(Layer::Elu);
            pre.push(Layer::Conv(Conv1d::new(
                cfg,
                dim,
                dim * 2,
                ratio * 2,
                ratio,
                1,
                vb.pp(next()),
            )?));
            scaling *= 2;
        }
        let dim = scaling * cfg.num_filters;
        let lstm = Lstm::new(cfg, dim, vb.pp(next()).pp("lstm"))?;
        next();
        let post = vec![
            Layer::Elu,
            Layer::Conv(Conv1d::new(
                cfg,
                dim,
                cfg.hidden_size,
                cfg.last_kernel_size,
                1,
                1,
                vb.pp(next()),
            )?),
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
            post.push(Layer::ConvTr(ConvTranspose1d::new(
                cfg,
                dim,
                dim / 2,
                ratio * 2,
                ratio,
                vb.pp(next()),
            )?));
            for j in 0..cfg.num_residual_layers {
                let d = cfg.dilation_growth_rate.pow(j as u32);
                post.push(Layer::Res(ResnetBlock::new(
                    cfg,
                    dim / 2,
                    [d, 1],
                    vb.pp(next()),
                )?));
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

    fn forward_tm(&self, xs: Tm, dev: &Device) -> Result<Tm> {
        let ys = run_tm(&self.pre, xs)?;
        let mut state = self.lstm.zero_state(ys.b, dev)?;
        let zs = self.lstm.forward_tm(&ys, &mut state, dev)?;
        ys.recycle();
        run_tm(&self.post, zs)
    }
}

/// Residual vector quantizer (`quantizer.layers.N.codebook.embed`).
#[derive(Debug, Clone)]
pub(crate) struct Quantizer {
    /// Per codebook: (codebook_size, dim) row-major.
    embeds: Vec<Vec<f32>>,
    /// Per codebook: transposed embeds (dim, codebook_size) and squared norms (codebook_size).
    embeds_t: Vec<Tensor>,
    embed_sq: Vec<Vec<f32>>,
    dim: usize,
}

impl Quantizer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let mut embeds = Vec::new();
        let mut embeds_t = Vec::new();
        let mut embed_sq = Vec::new();
        for q in 0..cfg.num_quantizers() {
            let e = vb
                .pp("layers")
                .pp(q)
                .pp("codebook")
                .get((cfg.codebook_size, cfg.codebook_dim()), "embed")?;
            let et = e.t()?.contiguous()?;
            embed_sq.push(kernels::to_vec(&et.sqr()?.sum_keepdim(0)?)?);
            embeds_t.push(et);
            embeds.push(kernels::to_vec(&e)?);
        }
        Ok(Self {
            embeds,
            embeds_t,
            embed_sq,
            dim: cfg.codebook_dim(),
        })
    }

    pub(crate) fn num_quantizers(&self) -> usize {
        self.embeds.len()
    }

    /// (B, D, T) embeddings → (B, n_q, T) u32 codes, nearest codeword on the residual.
    pub(crate) fn encode(&self, xs: &Tensor, n_q: usize) -> Result<Tensor> {
        self.encode_tm(&Tm::from_bct(xs)?, n_q, xs.device())
    }

    /// Time-major `(B, T, D)` embeddings → (B, n_q, T) u32 codes.
    pub(crate) fn encode_tm(&self, xs: &Tm, n_q: usize, dev: &Device) -> Result<Tensor> {
        let _t = crate::profile::scope(crate::profile::Kind::Quantizer);
        let (b, t, d) = xs.dims();
        let mut residual = xs.data.clone();
        let mut codes = vec![0u32; b * n_q * t];
        for q in 0..n_q {
            let xe = Tensor::from_slice(&residual, (b * t, d), dev)?.matmul(&self.embeds_t[q])?;
            let (embed, esq) = (&self.embeds[q], &self.embed_sq[q]);
            let n = esq.len();
            // Nearest codeword per row, rows split over two threads.
            let assign = |residual: &mut [f32], xe: &[f32], best: &mut [u32]| {
                let mut dist = vec![0f32; n];
                kernels::simd(AssignCodes {
                    residual,
                    xe,
                    best,
                    embed,
                    esq,
                    dist: &mut dist,
                })
            };
            let mut best = vec![0u32; b * t];
            kernels::with_f32(&xe, |xe| {
                let rows = b * t;
                if rows < 64 || candle_core::utils::get_num_threads() < 2 {
                    assign(&mut residual, xe, &mut best);
                } else {
                    let half = rows / 2;
                    let (r0, r1) = residual.split_at_mut(half * d);
                    let (x0, x1) = xe.split_at(half * n);
                    let (b0, b1) = best.split_at_mut(half);
                    std::thread::scope(|s| {
                        s.spawn(|| assign(r1, x1, b1));
                        assign(r0, x0, b0);
                    });
                }
            })?;
            for (row, &j) in best.iter().enumerate() {
                codes[((row / t) * n_q + q) * t + row % t] = j;
            }
        }
        Tensor::from_vec(codes, (b, n_q, t), dev)
    }

    /// (B, n_q, T) codes → (B, D, T) summed embeddings.
    pub(crate) fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        self.decode_tm(codes)?.to_bct(codes.device())
    }

    /// (B, n_q, T) codes → time-major `(B, T, D)` summed embeddings.
    pub(crate) fn decode_tm(&self, codes: &Tensor) -> Result<Tm> {
        let _t = crate::profile::scope(crate::profile::Kind::Quantizer);
        let (b, n_q, t) = codes.dims3()?;
        if n_q > self.embeds.len() {
            bail!(
                "encodec: {n_q} codebooks given, the model has {}",
                self.embeds.len()
            )
        }
        if n_q == 0 {
            bail!("encodec: no codebooks to decode")
        }
        let d = self.dim;
        let size = self.embed_sq[0].len();
        let idx = codes
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let mut out = vec![0f32; b * t * d];
        for bi in 0..b {
            for q in 0..n_q {
                for ti in 0..t {
                    let code = idx[(bi * n_q + q) * t + ti] as usize;
                    if code >= size {
                        bail!("encodec: code {code} out of range for codebook size {size}")
                    }
                    let dst = &mut out[(bi * t + ti) * d..(bi * t + ti + 1) * d];
                    for (o, e) in dst
                        .iter_mut()
                        .zip(&self.embeds[q][code * d..(code + 1) * d])
                    {
                        *o += e;
                    }
                }
            }
        }
        Tm::new(out, b, t, d)
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
        let cfg_text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| {
            candle_core::Error::Msg(format!("{}: {e}", dir.join("config.json").display()))
        })?;
        let cfg = Self::parse_config(&cfg_text)?;
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
        Self::from_tensors(&cfg, tensors, device)
    }

    /// Parses a transformers `config.json`.
    pub fn parse_config(json: &str) -> Result<Config> {
        serde_json::from_str(json)
            .map_err(|e| candle_core::Error::Msg(format!("encodec config.json: {e}")))
    }

    /// Builds the model from a tensor map, normalising weight-norm key names.
    pub fn from_tensors(
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
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
            .filter(|(k, _)| {
                !(k.ends_with("embed_avg") || k.ends_with("cluster_size") || k.ends_with("inited"))
            })
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

    /// Whether the first `n_q` codebooks of `self` and `other` hold the same entries, to float16
    /// precision (a codec shipped in float16 and the same codec in float32 agree; two codecs
    /// trained apart do not): with equal codebooks, a code means the same latent vector in both.
    /// False if either has fewer than `n_q` codebooks or their shapes differ.
    pub fn same_codebooks(&self, other: &Encodec, n_q: usize) -> bool {
        let (a, b) = (&self.quantizer.embeds, &other.quantizer.embeds);
        n_q <= a.len()
            && n_q <= b.len()
            && a.iter().zip(b).take(n_q).all(|(x, y)| {
                x.len() == y.len()
                    // float16 keeps 11 significant bits: relative rounding error <= 2^-11
                    && x.iter().zip(y).all(|(u, v)| (u - v).abs() <= 1e-3 * u.abs().max(v.abs()) + 1e-6)
            })
    }

    /// Bandwidth check: `None` or one of `target_bandwidths`.
    pub fn check_bandwidth(&self, bandwidth: Option<f32>) -> Result<usize> {
        if let Some(bw) = bandwidth
            && !self
                .cfg
                .target_bandwidths
                .iter()
                .any(|&b| (b - bw).abs() < 1e-6)
        {
            bail!(
                "bandwidth {bw} kbps is not supported; choose one of {:?}",
                self.cfg.target_bandwidths
            )
        }
        Ok(self
            .cfg
            .quantizers_for_bandwidth(bandwidth)
            .min(self.quantizer.num_quantizers()))
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
        let xs = {
            let _t = crate::profile::scope(crate::profile::Kind::Layout);
            Tm::from_bct(&xs)?
        };
        let emb = self.encoder.forward_tm(xs, &self.device)?;
        let codes = self.quantizer.encode_tm(&emb, n_q, &self.device)?;
        emb.recycle();
        Ok((codes, scale))
    }

    /// Encodes `(batch, channels, samples)` audio at the model's rate. `bandwidth` must be one of
    /// the config's; `None` = the smallest, as in the reference.
    pub fn encode(&self, xs: &Tensor, bandwidth: Option<f32>) -> Result<Encoded> {
        let bandwidth = Some(bandwidth.unwrap_or(self.cfg.target_bandwidths[0]));
        let n_q = self.check_bandwidth(bandwidth)?;
        let (_b, c, len) = xs.dims3()?;
        if c != self.cfg.audio_channels {
            bail!(
                "encodec: expected {} channels, got {c}",
                self.cfg.audio_channels
            )
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
        Ok(Encoded {
            codes: Tensor::stack(&frames, 0)?,
            scales,
            last_frame_pad_length: pad,
        })
    }

    /// Decodes one chunk of `(batch, n_q, frames)` codes (`_decode_frame`).
    pub fn decode_frame(&self, codes: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
        let emb = self.quantizer.decode_tm(codes)?;
        let out = self.decoder.forward_tm(emb, &self.device)?;
        let out = {
            let _t = crate::profile::scope(crate::profile::Kind::Layout);
            let t = out.to_bct(&self.device)?;
            out.recycle();
            t
        };
        match scale {
            Some(s) => out.broadcast_mul(&s.reshape(((), 1, 1))?),
            None => Ok(out),
        }
    }

    /// Decodes codes `(n_chunks, batch, n_q, frames)` to audio `(batch, channels, samples)`,
    /// as the reference's `decode` (chunks recombined by linear overlap-add). The output is not
    /// trimmed: trim it to the input length where known.
    pub fn decode(
        &self,
        codes: &Tensor,
        scales: &[Option<Tensor>],
        last_frame_pad_length: usize,
    ) -> Result<Tensor> {
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
                    decoded.push(
                        self.decode_frame(&frame_of(i)?, scales.get(i).and_then(|s| s.as_ref()))?,
                    );
                }
                linear_overlap_add(&decoded, stride)
            }
        }
    }
}

/// `_linear_overlap_add`: triangular weights peaking mid-chunk, normalised by their sum.
pub fn linear_overlap_add(frames: &[Tensor], stride: usize) -> Result<Tensor> {
    let Some(first) = frames.first() else {
        bail!("encodec: nothing to overlap-add")
    };
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
    if sum_w.contains(&0.0) {
        bail!("encodec: overlap-add weights vanish; chunk stride larger than chunk")
    }
    for bc in 0..b * c {
        for j in 0..total {
            out[bc * total + j] /= sum_w[j];
        }
    }
    Tensor::from_vec(out, (b, c, total), dev)
}
