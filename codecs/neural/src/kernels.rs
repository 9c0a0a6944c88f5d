//! CPU kernels for EnCodec on *time-major* activations.
//!
//! candle's `conv1d` works on `(B, C, T)` with an im2col that gathers across channels and a
//! transposing copy of the result; for EnCodec's thin-channel, long-sequence layers that runs at
//! a few GFLOP/s. Here an activation of one batch item is a contiguous `(T, C)` matrix instead.
//! Then the im2col matrix of a conv with dilation 1 is a *view* of the padded input: row `t` is
//! the `K * C` consecutive floats starting at `t * stride * C` (candle's `unfold`), so a conv is
//! one gemm `(T_out, K*C_in) x (K*C_in, C_out)` with no copy but the padding, and its output is
//! time-major again. A transposed conv is the gemm `(T, C_in) x (C_in, K*C_out)` followed by an
//! overlap-add of rows. Biases ride in the gemm as an extra all-ones input column where the
//! input buffer is built here anyway; ELUs are fused into the copies that build conv inputs.
//!
//! Elementwise code is plain Rust over slices, written so that it auto-vectorises (the
//! exponential is a branch-free polynomial rather than `f32::exp`).

use candle_core::{Result, Storage, Tensor, bail};

use crate::encodec::PadMode;

/// Runs `f` on the f32 data of a CPU tensor, made contiguous first if needed.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else { bail!("kernels: tensor not contiguous") };
    match &*storage {
        Storage::Cpu(s) => Ok(f(&s.as_slice::<f32>()?[start..end])),
        _ => bail!("kernels: CPU tensors only"),
    }
}

/// Copies a tensor's f32 data out (contiguous order).
pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    with_f32(t, |s| s.to_vec())
}

// ---------------------------------------------------------------------------------------------
// Elementwise functions

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` to about 1 ulp (Cephes `expf`), branch-free so loops over it vectorise. Inputs are
/// clamped to [-87, 88] (results below 1.7e-38 are returned as e^-87, above as e^88).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.max(-87.0).min(88.0);
    // Round x / ln 2 to the nearest integer with the 1.5 * 2^23 trick: the integer also sits in
    // the low mantissa bits of `t`.
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let n_i = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n_i + 127) << 23) as u32)
}

/// ELU with alpha 1, as PyTorch computes it: `x` if positive, else `exp(x) - 1`.
#[inline(always)]
pub(crate) fn elu(x: f32) -> f32 {
    let e = exp(x.min(0.0)) - 1.0;
    if x > 0.0 { x } else { e }
}

#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub(crate) fn tanh(x: f32) -> f32 {
    // tanh x = 1 - 2 / (e^{2x} + 1): accurate to a few 1e-8 absolute, saturates cleanly.
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Applies ELU to a slice in place.
pub(crate) fn elu_inplace(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = elu(*x);
    }
}

// ---------------------------------------------------------------------------------------------
// Time-major activations

/// One activation: `(batch, time, channels)` contiguous (time-major per batch item).
#[derive(Debug, Clone)]
pub(crate) struct Tm {
    pub(crate) data: Tensor,
}

impl Tm {
    /// From a `(B, C, T)` tensor.
    pub(crate) fn from_bct(xs: &Tensor) -> Result<Self> {
        let (b, c, t) = xs.dims3()?;
        let data = if c == 1 { xs.reshape((b, t, c))? } else { xs.transpose(1, 2)?.contiguous()? };
        Ok(Self { data })
    }

    /// To a `(B, C, T)` tensor.
    pub(crate) fn to_bct(&self) -> Result<Tensor> {
        let (b, t, c) = self.data.dims3()?;
        if c == 1 { self.data.reshape((b, c, t)) } else { self.data.transpose(1, 2)?.contiguous() }
    }

    pub(crate) fn dims(&self) -> Result<(usize, usize, usize)> {
        self.data.dims3()
    }

    /// Batch item `i` as a `(T, C)` tensor.
    pub(crate) fn item(&self, i: usize) -> Result<Tensor> {
        self.data.get(i)
    }

    /// Stacks `(T, C)` items.
    pub(crate) fn from_items(items: Vec<Tensor>) -> Result<Self> {
        let data = if items.len() == 1 {
            let it = items.into_iter().next().unwrap_or_else(|| unreachable!());
            it.unsqueeze(0)?
        } else {
            Tensor::stack(&items, 0)?
        };
        Ok(Self { data })
    }
}

/// Source row of padded row `p` for an input of `len` rows padded by `left`/`right`, as the
/// reference's `_pad1d` (including its zero-extension when reflecting a too-short input).
/// `None` means a zero row.
pub(crate) fn pad_source(p: usize, len: usize, left: usize, right: usize, mode: PadMode) -> Option<usize> {
    if p >= left && p < left + len {
        return Some(p - left);
    }
    match mode {
        PadMode::Constant => None,
        PadMode::Replicate => Some(if p < left { 0 } else { len - 1 }),
        PadMode::Reflect => {
            // Reflect an input zero-extended to `ext` rows so that the reflection is defined.
            let ext = len.max(left.max(right) + 1);
            let src = if p < left {
                left - p
            } else if p < left + ext {
                return None;
            } else {
                ext - 2 - (p - left - ext)
            };
            (src < len).then_some(src)
        }
    }
}

/// Builds a padded conv input: `left + len + right` rows of width `width`, where columns
/// `0..c` hold `f(x)` of the (padded) input rows, column `c` is 1.0 if `ones` (the bias column),
/// and any other columns are left zero for the caller.
pub(crate) fn pad_rows(
    x: &[f32],
    c: usize,
    left: usize,
    right: usize,
    mode: PadMode,
    width: usize,
    ones: bool,
    f: impl Fn(f32) -> f32 + Sync,
) -> Vec<f32> {
    let len = x.len() / c;
    let rows = left + len + right;
    let mut out = vec![0f32; rows * width];
    let fill = |out: &mut [f32], row0: usize| {
        for (i, row) in out.chunks_exact_mut(width).enumerate() {
            if let Some(src) = pad_source(row0 + i, len, left, right, mode) {
                for (o, &v) in row[..c].iter_mut().zip(&x[src * c..src * c + c]) {
                    *o = f(v);
                }
            }
            if ones {
                row[c] = 1.0;
            }
        }
    };
    par_rows(&mut out, width, fill);
    out
}

/// Splits `out` (rows of `width`) in two halves run on two threads when it is large.
pub(crate) fn par_rows(out: &mut [f32], width: usize, f: impl Fn(&mut [f32], usize) + Sync) {
    let rows = out.len() / width.max(1);
    if rows * width < PAR_MIN || candle_core::utils::get_num_threads() < 2 {
        f(out, 0);
        return;
    }
    let half = rows / 2;
    let (a, b) = out.split_at_mut(half * width);
    std::thread::scope(|s| {
        s.spawn(|| f(b, half));
        f(a, 0);
    });
}

/// Work (elements) below which elementwise passes stay on one thread.
const PAR_MIN: usize = 1 << 16;

/// Largest number of floats one unfolded view may span (candle computes the unfolded length in
/// f32, exact below 2^23).
const UNFOLD_MAX: usize = 1 << 22;

/// Conv of a padded time-major input `xp` (`rows` × `width`, flat) with `wt`
/// (`k * width` × `c_out`, row `kk * width + ci`), stride `stride`, dilation `dilation`.
/// Returns `(t_out, c_out)`.
pub(crate) fn conv_padded(
    xp: Vec<f32>,
    width: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    wt: &Tensor,
) -> Result<Tensor> {
    let dev = wt.device();
    let rows = xp.len() / width;
    let span = (k - 1) * dilation + 1;
    if rows < span {
        bail!("conv: input of {rows} rows shorter than the kernel span {span}")
    }
    let t_out = (rows - span) / stride + 1;
    if dilation != 1 {
        // Explicit im2col: one contiguous row copy per (t, kk).
        let mut col = vec![0f32; t_out * k * width];
        for (t, dst) in col.chunks_exact_mut(k * width).enumerate() {
            for kk in 0..k {
                let src = (t * stride + kk * dilation) * width;
                dst[kk * width..(kk + 1) * width].copy_from_slice(&xp[src..src + width]);
            }
        }
        return Tensor::from_vec(col, (t_out, k * width), dev)?.matmul(wt);
    }
    let xp = Tensor::from_vec(xp, rows * width, dev)?;
    // Output rows per tile so that each unfolded view stays below UNFOLD_MAX floats.
    let per_tile = ((UNFOLD_MAX - k * width) / (stride * width)).max(1);
    let mut tiles = Vec::new();
    let mut t0 = 0;
    while t0 < t_out {
        let n = per_tile.min(t_out - t0);
        let part = xp.narrow(0, t0 * stride * width, ((n - 1) * stride + k) * width)?;
        let view = part.unfold(0, k * width, stride * width)?;
        if view.dims() != [n, k * width] {
            bail!("conv: unexpected unfolded shape {:?}", view.dims())
        }
        tiles.push(view.matmul(wt)?);
        t0 += n;
    }
    if tiles.len() == 1 { Ok(tiles.pop().unwrap_or_else(|| unreachable!())) } else { Tensor::cat(&tiles, 0) }
}

/// Rearranges a conv weight `(c_out, c_in, k)` into the gemm operand `(k * width, c_out)` for
/// inputs of row width `width` (≥ c_in; extra input columns get zero weights), with `bias` on
/// the row of input column `c_in` at tap 0 when given.
pub(crate) fn conv_weight_t(w: &Tensor, bias: Option<&Tensor>, width: usize) -> Result<Tensor> {
    let (c_out, c_in, k) = w.dims3()?;
    let wv = to_vec(w)?;
    let mut out = vec![0f32; k * width * c_out];
    for co in 0..c_out {
        for ci in 0..c_in {
            for kk in 0..k {
                out[(kk * width + ci) * c_out + co] = wv[(co * c_in + ci) * k + kk];
            }
        }
    }
    if let Some(b) = bias {
        if width <= c_in {
            bail!("conv_weight_t: no room for the bias column")
        }
        for (co, v) in to_vec(b)?.into_iter().enumerate() {
            out[c_in * c_out + co] = v;
        }
    }
    Tensor::from_vec(out, (k * width, c_out), w.device())
}

/// Rearranges a transposed-conv weight `(c_in, c_out, k)` into `(c_in, k * c_out)`, column
/// `kk * c_out + co`.
pub(crate) fn conv_tr_weight_t(w: &Tensor) -> Result<Tensor> {
    let (c_in, c_out, k) = w.dims3()?;
    let wv = to_vec(w)?;
    let mut out = vec![0f32; c_in * k * c_out];
    for ci in 0..c_in {
        for co in 0..c_out {
            for kk in 0..k {
                out[ci * k * c_out + kk * c_out + co] = wv[(ci * c_out + co) * k + kk];
            }
        }
    }
    Tensor::from_vec(out, (c_in, k * c_out), w.device())
}

/// Transposed conv of a time-major `(t, c_in)` input: `x · wt` then overlap-add of the
/// `(t, k, c_out)` columns at stride `stride`, keeping output rows `[trim_left, full - trim_right)`
/// of the full `(t - 1) * stride + k`, plus `bias`. Returns `(rows, c_out)`.
pub(crate) fn conv_tr(
    x: &Tensor,
    wt: &Tensor,
    bias: &[f32],
    k: usize,
    stride: usize,
    trim_left: usize,
    trim_right: usize,
) -> Result<Tensor> {
    let (t, _c_in) = x.dims2()?;
    let c_out = bias.len();
    let full = (t - 1) * stride + k;
    if trim_left + trim_right > full {
        bail!("conv_tr: trims {trim_left}+{trim_right} exceed the output length {full}")
    }
    let rows = full - trim_left - trim_right;
    let col = x.matmul(wt)?;
    let mut out = vec![0f32; rows * c_out];
    with_f32(&col, |col| {
        par_rows(&mut out, c_out, |out, row0| {
            for (i, o) in out.chunks_exact_mut(c_out).enumerate() {
                o.copy_from_slice(bias);
                // Full-output row r receives tap kk of input row (r - kk) / stride.
                let r = row0 + i + trim_left;
                let mut kk = r % stride;
                while kk < k && kk <= r {
                    let ti = (r - kk) / stride;
                    if ti < t {
                        let src = &col[(ti * k + kk) * c_out..(ti * k + kk + 1) * c_out];
                        for (o, &v) in o.iter_mut().zip(src) {
                            *o += v;
                        }
                    }
                    kk += stride;
                }
            }
        });
    })?;
    Tensor::from_vec(out, (rows, c_out), x.device())
}

/// `GroupNorm(1, C)` of one `(t, c)` item, in place: statistics over all elements (accumulated
/// in f64), then per-channel affine.
pub(crate) fn group_norm1(x: &mut [f32], weight: &[f32], bias: &[f32], eps: f64) {
    let c = weight.len();
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    let (mean, inv) = (mean as f32, inv as f32);
    for row in x.chunks_exact_mut(c) {
        for ((v, &w), &b) in row.iter_mut().zip(weight).zip(bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Small deterministic LCG so the tests need no RNG crate.
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn exp_and_activations_match_libm() {
        for i in -20000..=20000 {
            let x = i as f32 * 0.005;
            let e = x.exp();
            assert!((exp(x) - e).abs() <= 2.5e-7 * e, "exp({x}) = {} vs {e}", exp(x));
            let el = if x > 0.0 { x } else { x.exp() - 1.0 };
            assert!((elu(x) - el).abs() <= 2e-7 * el.abs().max(1.0), "elu({x})");
            assert!((sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs() <= 2e-7, "sigmoid({x})");
            assert!((tanh(x) - x.tanh()).abs() <= 3e-7, "tanh({x})");
        }
        assert_eq!(exp(-1000.0), (-87.0f32).exp().max(exp(-87.0)));
        assert!(elu(-1000.0) == -1.0);
        assert!(exp(1000.0).is_finite());
    }

    /// Reference conv on (C, T) layout with candle, zero padding `pad` on both sides.
    fn ref_conv(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize, stride: usize, dil: usize) -> Tensor {
        let y = x.unsqueeze(0).unwrap().conv1d(w, pad, stride, dil, 1).unwrap();
        y.broadcast_add(&b.reshape((1, (), 1)).unwrap()).unwrap().squeeze(0).unwrap()
    }

    #[test]
    fn conv_matches_candle() -> Result<()> {
        for &(c_in, c_out, k, stride, dil, len, pad) in &[
            (1, 8, 7, 1, 1, 300, 3),
            (5, 3, 3, 1, 1, 50, 1),
            (4, 6, 3, 1, 2, 41, 2),
            (6, 4, 4, 2, 1, 60, 1),
            (3, 5, 8, 4, 1, 97, 0),
            (7, 2, 1, 1, 1, 33, 0),
            (3, 3, 3, 3, 3, 40, 3),
        ] {
            let x = rand(&[c_in, len], 1);
            let w = rand(&[c_out, c_in, k], 2);
            let b = rand(&[c_out], 3);
            let want = ref_conv(&x, &w, &b, pad, stride, dil);
            let xt = to_vec(&x.t()?)?;
            for with_ones in [false, true] {
                let width = c_in + with_ones as usize + 1; // one spare zero column too
                let xp = pad_rows(&xt, c_in, pad, pad, PadMode::Constant, width, with_ones, |v| v);
                let wt = conv_weight_t(&w, with_ones.then_some(&b), width)?;
                let mut got = conv_padded(xp, width, k, stride, dil, &wt)?;
                if !with_ones {
                    got = got.broadcast_add(&b.unsqueeze(0)?)?;
                }
                let d = max_diff(&got.t()?, &want);
                assert!(d < 1e-5, "conv {c_in}->{c_out} k{k} s{stride} d{dil}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn conv_tiles_long_inputs() -> Result<()> {
        // Long enough that the unfolded view is split into several gemms.
        let (c_in, c_out, k, len) = (9, 4, 3, (UNFOLD_MAX / 9) * 2 + 17);
        let x = rand(&[c_in, len], 4);
        let w = rand(&[c_out, c_in, k], 5);
        let b = Tensor::zeros(c_out, candle_core::DType::F32, &Device::Cpu)?;
        let want = ref_conv(&x, &w, &b, 0, 1, 1);
        let xp = pad_rows(&to_vec(&x.t()?)?, c_in, 0, 0, PadMode::Constant, c_in, false, |v| v);
        let got = conv_padded(xp, c_in, k, 1, 1, &conv_weight_t(&w, None, c_in)?)?;
        assert!(max_diff(&got.t()?, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn conv_tr_matches_candle() -> Result<()> {
        for &(c_in, c_out, k, stride, tl, tr, len) in
            &[(4, 3, 4, 2, 0, 2, 20), (6, 2, 16, 8, 3, 5, 9), (3, 5, 10, 5, 0, 0, 1), (2, 2, 3, 1, 1, 1, 12), (3, 2, 2, 3, 0, 0, 7)]
        {
            let x = rand(&[c_in, len], 6);
            let w = rand(&[c_in, c_out, k], 7);
            let b = rand(&[c_out], 8);
            let full = x.unsqueeze(0)?.conv_transpose1d(&w, 0, 0, stride, 1, 1)?;
            let full = full.broadcast_add(&b.reshape((1, (), 1))?)?.squeeze(0)?;
            let n = full.dim(D::Minus1)?;
            let want = full.narrow(D::Minus1, tl, n - tl - tr)?;
            let got = conv_tr(&x.t()?.contiguous()?, &conv_tr_weight_t(&w)?, &to_vec(&b)?, k, stride, tl, tr)?;
            let d = max_diff(&got.t()?, &want);
            assert!(d < 1e-5, "convtr {c_in}->{c_out} k{k} s{stride}: {d}");
        }
        Ok(())
    }

    #[test]
    fn pad_modes_match_reference_rules() {
        let x: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0];
        let rows = |left, right, mode| pad_rows(&x, 1, left, right, mode, 1, false, |v| v);
        assert_eq!(rows(2, 3, PadMode::Reflect), vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]);
        assert_eq!(rows(1, 2, PadMode::Replicate), vec![1.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0]);
        assert_eq!(rows(1, 1, PadMode::Constant), vec![0.0, 1.0, 2.0, 3.0, 4.0, 0.0]);
        // Reflect with a pad not shorter than the input: zero-extend first (torch's _pad1d).
        // [1,2,3,4] + 3 zeros, reflect left 6: ext = [1,2,3,4,0,0,0] → 0,0,0,4,3,2 | 1..4.
        assert_eq!(
            rows(6, 0, PadMode::Reflect),
            vec![0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(rows(0, 5, PadMode::Reflect), vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 4.0, 3.0]);
    }

    #[test]
    fn group_norm_matches_formula() {
        let mut x: Vec<f32> = (0..12).map(|i| (i * i) as f32 * 0.1).collect();
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        let want: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| (v - mean) / (var + 1e-5).sqrt() * [1.0, 2.0, 0.5][i % 3] + [0.0, 1.0, -1.0][i % 3])
            .collect();
        group_norm1(&mut x, &[1.0, 2.0, 0.5], &[0.0, 1.0, -1.0], 1e-5);
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
