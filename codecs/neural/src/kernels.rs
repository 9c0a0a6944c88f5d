//! CPU kernels for EnCodec on *time-major* activations.
//!
//! candle's `conv1d` works on `(B, C, T)` with an im2col that gathers across channels and a
//! transposing copy of the result; for EnCodec's thin-channel, long-sequence layers that runs at
//! a few GFLOP/s. Here an activation of one batch item is a contiguous `(T, C)` matrix instead.
//! Then the im2col matrix of a conv with dilation 1 is a *view* of the padded input: row `t` is
//! the `K * C` consecutive floats starting at `t * stride * C` (candle's `unfold`), so a conv is
//! one gemm `(T_out, K*C_in) x (K*C_in, C_out)` with no copy but the padding, and its output is
//! time-major again. A transposed conv with `K = m * stride` is a stride-1 conv with `m` taps and
//! `stride * C_out` output channels (see [`conv_tr_as_conv_weight`]), so it needs no
//! overlap-add. Biases ride in the gemm as an extra all-ones input column; ELUs are fused into
//! the copies that build conv inputs. Convs run tile by tile over time ([`ConvSpec`]) so that
//! inputs, packed operands and outputs of a tile stay in cache, and residual blocks fuse their
//! last 1x1 conv with the shortcut in one gemm over `[x | elu(h) | 1]`.
//!
//! Elementwise code is plain Rust over slices, written so that it auto-vectorises (the
//! exponential is a branch-free polynomial rather than `f32::exp`). The crate is built for
//! baseline x86-64 (SSE2), so hot loops run through [`simd`], which compiles them a second time
//! with AVX2 enabled and picks that copy at run time when the CPU has it. Only the vector width
//! changes: no FMA contraction, same operation order, so results are bit-identical.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use candle_core::{Result, Storage, Tensor, bail};

use crate::encodec::PadMode;

/// Runs `f` on the f32 data of a CPU tensor, made contiguous first if needed.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("kernels: tensor not contiguous")
    };
    match &*storage {
        Storage::Cpu(s) => Ok(f(&s.as_slice::<f32>()?[start..end])),
        _ => bail!("kernels: CPU tensors only"),
    }
}

/// A loop to compile for several instruction sets (see [`simd`]). `run` must be
/// `#[inline(always)]` and call only `#[inline(always)]` code: only what is inlined into the
/// dispatcher gets the wider instructions. (Closures are not enough: rustc does not inline them
/// across codegen units.)
pub(crate) trait Kernel {
    type Output;
    fn run(self) -> Self::Output;
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Dispatch<K>(K);

impl<K: Kernel> pulp::NullaryFnOnce for Dispatch<K> {
    type Output = K::Output;

    #[inline(always)]
    fn call(self) -> K::Output {
        self.0.run()
    }
}

/// Runs `k` compiled with AVX2 (and the rest of x86-64-v3) enabled when the CPU supports it,
/// else as compiled for the baseline.
#[inline(always)]
pub(crate) fn simd<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        return v3.vectorize(Dispatch(k));
    }
    k.run()
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
    // Plain selects (not f32::max/min, whose NaN rules block vectorisation).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
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
        + 0.5;
    let y = p * r * r + r + 1.0;
    // Wrapping ops: dev builds keep overflow checks, whose branches would block vectorisation.
    y * f32::from_bits((n_i.wrapping_add(127) as u32).wrapping_shl(23))
}

/// ELU with alpha 1, as PyTorch computes it: `x` if positive, else `exp(x) - 1`.
#[inline(always)]
pub(crate) fn elu(x: f32) -> f32 {
    let e = exp(if x < 0.0 { x } else { 0.0 }) - 1.0;
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
    par_rows(xs, 1, |xs, _| simd(EluSlice(xs)));
}

struct EluSlice<'a>(&'a mut [f32]);

impl Kernel for EluSlice<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for x in self.0.iter_mut() {
            *x = elu(*x);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Time-major activations

/// One activation: `(batch, time, channels)` contiguous f32 (time-major per batch item), in a
/// plain `Vec` so that buffers can be recycled (see [`pool_get`]).
#[derive(Debug)]
pub(crate) struct Tm {
    pub(crate) data: Vec<f32>,
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) c: usize,
}

impl Tm {
    pub(crate) fn new(data: Vec<f32>, b: usize, t: usize, c: usize) -> Result<Self> {
        if data.len() != b * t * c {
            bail!(
                "kernels: {} floats for a ({b}, {t}, {c}) activation",
                data.len()
            )
        }
        Ok(Self { data, b, t, c })
    }

    /// From a `(B, C, T)` tensor.
    pub(crate) fn from_bct(xs: &Tensor) -> Result<Self> {
        let (b, c, t) = xs.dims3()?;
        let data = if c == 1 {
            to_vec(xs)?
        } else {
            to_vec(&xs.transpose(1, 2)?)?
        };
        Self::new(data, b, t, c)
    }

    /// To a `(B, C, T)` tensor.
    pub(crate) fn to_bct(&self, dev: &candle_core::Device) -> Result<Tensor> {
        let (b, t, c) = self.dims();
        if c == 1 {
            Tensor::from_slice(&self.data, (b, c, t), dev)
        } else {
            Tensor::from_slice(&self.data, (b, t, c), dev)?
                .transpose(1, 2)?
                .contiguous()
        }
    }

    pub(crate) fn dims(&self) -> (usize, usize, usize) {
        (self.b, self.t, self.c)
    }

    /// Batch item `i` as a `(T, C)` slice.
    pub(crate) fn item(&self, i: usize) -> &[f32] {
        &self.data[i * self.t * self.c..(i + 1) * self.t * self.c]
    }

    /// Hands the buffer back to the pool.
    pub(crate) fn recycle(self) {
        pool_put(self.data);
    }
}

// ---------------------------------------------------------------------------------------------
// Buffer pool
//
// Writing to freshly mapped memory costs about as much as the conv that fills it (page faults:
// ~15 ms for 30 MB here), and the allocator returns large blocks to the OS. Activation buffers
// are therefore recycled through this small pool.

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
/// Most floats kept in the pool (256 MiB).
const POOL_MAX_FLOATS: usize = 1 << 26;

/// An empty vector with room for `n` floats, reusing a pooled buffer when one fits.
pub(crate) fn pool_get(n: usize) -> Vec<f32> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    // Smallest buffer that fits.
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= n)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i);
    match best {
        Some(i) => {
            let mut v = pool.swap_remove(i);
            v.clear();
            v
        }
        None => Vec::with_capacity(n),
    }
}

/// Returns a buffer to the pool (dropping the smallest ones beyond the pool's budget).
pub(crate) fn pool_put(v: Vec<f32>) {
    if v.capacity() < 1 << 16 {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    pool.sort_by_key(|v| std::cmp::Reverse(v.capacity()));
    let mut total = 0;
    pool.retain(|v| {
        total += v.capacity();
        total <= POOL_MAX_FLOATS
    });
}

/// Source row of padded row `p` for an input of `len` rows padded by `left`/`right`, as the
/// reference's `_pad1d` (including its zero-extension when reflecting a too-short input).
/// `None` means a zero row.
pub(crate) fn pad_source(
    p: usize,
    len: usize,
    left: usize,
    right: usize,
    mode: PadMode,
) -> Option<usize> {
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

/// Builds rows `p0 .. p0 + n` of a padded conv input (`left + len + right` rows in all) with
/// row width `width`: columns `0..c` hold `f(x)` of the padded input row, column `c` is 1.0 if
/// `ones` (the bias column), any other columns are zero.
pub(crate) fn pad_rows_range(
    x: &[f32],
    c: usize,
    left: usize,
    right: usize,
    mode: PadMode,
    p0: usize,
    n: usize,
    width: usize,
    ones: bool,
    f: impl Fn(f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; n * width];
    let rows = PadRows {
        x,
        c,
        left,
        right,
        mode,
        width,
        ones,
    };
    par_rows(&mut out, width, |out, row0| {
        simd(PadFill {
            rows: &rows,
            out,
            p0: p0 + row0,
            f: &f,
        })
    });
    out
}

struct PadFill<'a, F> {
    rows: &'a PadRows<'a>,
    out: &'a mut [f32],
    p0: usize,
    f: &'a F,
}

impl<F: Fn(f32) -> f32> Kernel for PadFill<'_, F> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        self.rows.fill(self.out, self.p0, self.f)
    }
}

/// What [`pad_rows_range`] builds.
struct PadRows<'a> {
    x: &'a [f32],
    c: usize,
    left: usize,
    right: usize,
    mode: PadMode,
    width: usize,
    ones: bool,
}

impl PadRows<'_> {
    /// Fills `out` (zeroed) with padded rows `p0..`.
    #[inline(always)]
    fn fill(&self, out: &mut [f32], p0: usize, f: &impl Fn(f32) -> f32) {
        let (c, width) = (self.c, self.width);
        let len = self.x.len() / c;
        for (i, row) in out.chunks_exact_mut(width).enumerate() {
            if let Some(src) = pad_source(p0 + i, len, self.left, self.right, self.mode) {
                for (o, &v) in row[..c].iter_mut().zip(&self.x[src * c..src * c + c]) {
                    *o = f(v);
                }
            }
            if self.ones {
                row[c] = 1.0;
            }
        }
    }
}

/// [`pad_rows_range`] over all rows.
#[cfg(test)]
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
    let rows = left + x.len() / c + right;
    pad_rows_range(x, c, left, right, mode, 0, rows, width, ones, f)
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

/// Input floats per tile of a tiled conv (8 MiB): small enough that a tile's input and output
/// stay in L2/L3 and that its buffers are recycled by the allocator (below glibc's 32 MiB mmap
/// threshold), large enough for efficient gemms (measured: 2^21 beats 2^18..2^20 and 2^22 by
/// 10-40 ms per encode on the 24 kHz model).
const TILE_FLOATS: usize = 1 << 21;

/// One conv on a time-major input, tiled over output rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec<'a> {
    pub(crate) c_in: usize,
    pub(crate) k: usize,
    pub(crate) stride: usize,
    pub(crate) dilation: usize,
    pub(crate) left: usize,
    pub(crate) right: usize,
    pub(crate) mode: PadMode,
    /// `(k * (c_in + 1), n_out)` with the bias on the ones column (see [`conv_weight_t`]).
    pub(crate) wt: &'a Tensor,
    /// Apply an ELU to the input first.
    pub(crate) pre_elu: bool,
}

impl ConvSpec<'_> {
    fn span(&self) -> usize {
        (self.k - 1) * self.dilation + 1
    }

    /// Output rows for an input of `len` rows.
    pub(crate) fn t_out(&self, len: usize) -> Result<usize> {
        let rows = self.left + len + self.right;
        if rows < self.span() {
            bail!(
                "conv: padded input of {rows} rows shorter than the kernel span {}",
                self.span()
            )
        }
        Ok((rows - self.span()) / self.stride + 1)
    }

    /// Output rows per tile.
    pub(crate) fn tile_rows(&self) -> usize {
        (TILE_FLOATS / (self.stride * (self.c_in + 1))).max(64)
    }

    /// Output rows `t0 .. t0 + n` as a `(n, n_out)` tensor.
    pub(crate) fn tile(&self, x: &[f32], t0: usize, n: usize) -> Result<Tensor> {
        let w = self.c_in + 1;
        let rows = (n - 1) * self.stride + self.span();
        let prof = crate::profile::scope(crate::profile::Kind::ConvInput);
        let buf = if self.pre_elu {
            pad_rows_range(
                x,
                self.c_in,
                self.left,
                self.right,
                self.mode,
                t0 * self.stride,
                rows,
                w,
                true,
                elu,
            )
        } else {
            pad_rows_range(
                x,
                self.c_in,
                self.left,
                self.right,
                self.mode,
                t0 * self.stride,
                rows,
                w,
                true,
                |v| v,
            )
        };
        drop(prof);
        let _t = crate::profile::scope(crate::profile::Kind::ConvGemm);
        if self.wt.dim(1)? == 1 && self.dilation == 1 {
            // One output channel: a gemm would be a badly-shaped gemv; do windowed dots.
            let wcol = to_vec(self.wt)?;
            let sw = self.stride * w;
            let mut out = vec![0f32; n];
            par_rows(&mut out, 1, |o, t0| {
                simd(WindowDots {
                    out: o,
                    x: &buf[t0 * sw..],
                    step: sw,
                    w: &wcol,
                })
            });
            return Tensor::from_vec(out, (n, 1), self.wt.device());
        }
        conv_padded(buf, w, self.k, self.stride, self.dilation, self.wt)
    }

    /// The whole conv of `x` (`len` rows of `c_in`), `(t_out, n_out)` row-major, of which the
    /// first `skip` and the last `drop` floats are left out; appended to `out`.
    pub(crate) fn run_into(
        &self,
        x: &[f32],
        skip: usize,
        drop: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let t_out = self.t_out(x.len() / self.c_in)?;
        let n_out = self.wt.dim(1)?;
        let total = t_out * n_out;
        if skip + drop > total {
            bail!("conv: cannot trim {skip}+{drop} of {total} outputs")
        }
        let tile = self.tile_rows();
        let mut t0 = 0;
        while t0 < t_out {
            let n = tile.min(t_out - t0);
            // This tile's floats are [t0 * n_out, (t0 + n) * n_out); keep those in [skip, total - drop).
            let (lo, hi) = (t0 * n_out, (t0 + n) * n_out);
            let (a, b) = (lo.max(skip), hi.min(total - drop));
            if a < b {
                with_f32(&self.tile(x, t0, n)?, |y| {
                    out.extend_from_slice(&y[a - lo..b - lo])
                })?;
            }
            t0 += n;
        }
        Ok(())
    }

    /// The whole conv of `x`: `(t_out, n_out)` row-major.
    #[cfg(test)]
    pub(crate) fn run(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.run_into(x, 0, 0, &mut out)?;
        Ok(out)
    }
}

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
    // Output rows per gemm so that each unfolded view stays below UNFOLD_MAX floats.
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
    if tiles.len() == 1 {
        Ok(tiles.pop().unwrap_or_else(|| unreachable!()))
    } else {
        Tensor::cat(&tiles, 0)
    }
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

/// A transposed conv as a plain conv. With `m = ceil(k / stride)`, output block `t` (the
/// `stride` output rows `t * stride ..`) of a transposed conv is
/// `sum_j x[t - j] · W[:, :, j * stride .. (j + 1) * stride]`: a stride-1 conv with `m` taps and
/// `stride * c_out` output channels over the input zero-padded by `m - 1` rows on both sides,
/// whose `(rows, stride * c_out)` output read as `(rows * stride, c_out)` is the full transposed
/// conv output (plus `m * stride - k` trailing rows). No overlap-add is needed.
///
/// Returns the gemm operand `(m * (c_in + 1), stride * c_out)` for [`ConvSpec`] (bias on the
/// ones column of tap 0) and `m`.
pub(crate) fn conv_tr_as_conv_weight(
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
) -> Result<(Tensor, usize)> {
    let (c_in, c_out, k) = w.dims3()?;
    let m = k.div_ceil(stride);
    let wv = to_vec(w)?;
    let bv = to_vec(bias)?;
    let (width, n_out) = (c_in + 1, stride * c_out);
    let mut out = vec![0f32; m * width * n_out];
    for tap in 0..m {
        for ci in 0..c_in {
            for j in 0..stride {
                let kk = (m - 1 - tap) * stride + j;
                if kk >= k {
                    continue;
                }
                for co in 0..c_out {
                    out[(tap * width + ci) * n_out + j * c_out + co] =
                        wv[(ci * c_out + co) * k + kk];
                }
            }
        }
    }
    for j in 0..stride {
        out[c_in * n_out + j * c_out..c_in * n_out + (j + 1) * c_out].copy_from_slice(&bv);
    }
    Ok((Tensor::from_vec(out, (m * width, n_out), w.device())?, m))
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

/// Index of the first maximum of `xs` (NaN-free input), vectorised: lane-wise maxima first,
/// then the first position holding the maximum.
#[inline(always)]
pub(crate) fn argmax(xs: &[f32]) -> usize {
    let n = xs.len() / 8 * 8;
    let mut acc = [f32::NEG_INFINITY; 8];
    for c in xs[..n].chunks_exact(8) {
        for j in 0..8 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(&xs[n..]) {
        if v > m {
            m = v;
        }
    }
    xs.iter().position(|&v| v == m).unwrap_or(0)
}

/// `out[i] = dot(x[i * step ..][..w.len()], w)`.
struct WindowDots<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    step: usize,
    w: &'a [f32],
}

impl Kernel for WindowDots<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (i, o) in self.out.iter_mut().enumerate() {
            let s = i * self.step;
            *o = dot(&self.x[s..s + self.w.len()], self.w);
        }
    }
}

/// Dot product with 16 independent accumulators (auto-vectorised).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len()) / 16 * 16;
    let mut acc = [0f32; 16];
    for (x, y) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// A barrier for two threads that spins briefly, then yields: the LSTM syncs once per time
/// step (~10 µs of work), far too often for a sleeping barrier.
struct SpinBarrier {
    count: AtomicUsize,
    generation: AtomicUsize,
    n: usize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            n,
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            let mut spins = 0u32;
            while self.generation.load(Ordering::Acquire) == generation {
                if spins < 2_000 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// One LSTM time step for the hidden units `units` (a range of `0..h`): gates from `proj`
/// (`4h`) plus `w_rows · h_prev` (`w_rows`: the `4 * units.len()` rows of `W_hh` for these
/// units, gate-major), then the cell update. Writes the new `h` of these units to `h_new`.
struct LstmUnits<'a> {
    proj: &'a [f32],
    w_rows: &'a [f32],
    h_prev: &'a [f32],
    c: &'a mut [f32],
    h_new: &'a mut [f32],
    u0: usize,
}

impl Kernel for LstmUnits<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let Self {
            proj,
            w_rows,
            h_prev,
            c,
            h_new,
            u0,
        } = self;
        lstm_units(proj, w_rows, h_prev, c, h_new, u0)
    }
}

#[inline(always)]
fn lstm_units(
    proj: &[f32],
    w_rows: &[f32],
    h_prev: &[f32],
    c: &mut [f32],
    h_new: &mut [f32],
    u0: usize,
) {
    let (h, n) = (h_prev.len(), c.len());
    let row = |g: usize, u: usize| &w_rows[(g * n + u) * h..(g * n + u + 1) * h];
    for u in 0..n {
        let d = dot4([row(0, u), row(1, u), row(2, u), row(3, u)], h_prev);
        let gate = |g: usize| proj[g * h + u0 + u] + d[g];
        let i = sigmoid(gate(0));
        let f = sigmoid(gate(1));
        let g = tanh(gate(2));
        let o = sigmoid(gate(3));
        c[u] = f * c[u] + i * g;
        h_new[u] = o * tanh(c[u]);
    }
}

/// Four [`dot`]s with the same `b`, sharing its loads; each result is bit-identical to `dot`.
#[inline(always)]
fn dot4(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    let len = a.iter().map(|r| r.len()).fold(b.len(), usize::min);
    let n = len / 16 * 16;
    let (mut s0, mut s1, mut s2, mut s3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    for ((((y, x0), x1), x2), x3) in b[..n]
        .chunks_exact(16)
        .zip(a[0][..n].chunks_exact(16))
        .zip(a[1][..n].chunks_exact(16))
        .zip(a[2][..n].chunks_exact(16))
        .zip(a[3][..n].chunks_exact(16))
    {
        for j in 0..16 {
            s0[j] += x0[j] * y[j];
            s1[j] += x1[j] * y[j];
            s2[j] += x2[j] * y[j];
            s3[j] += x3[j] * y[j];
        }
    }
    let fin = |acc: &[f32; 16], a: &[f32]| {
        let tail: f32 = a[n..len].iter().zip(&b[n..len]).map(|(x, y)| x * y).sum();
        acc.iter().sum::<f32>() + tail
    };
    [
        fin(&s0, a[0]),
        fin(&s1, a[1]),
        fin(&s2, a[2]),
        fin(&s3, a[3]),
    ]
}

/// Rows of `W_hh` (`(4h, h)`, gate-major) for units `u0..u1`, gate-major.
pub(crate) fn lstm_rows(w_hh: &[f32], h: usize, u0: usize, u1: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(4 * (u1 - u0) * h);
    for g in 0..4 {
        out.extend_from_slice(&w_hh[(g * h + u0) * h..(g * h + u1) * h]);
    }
    out
}

/// LSTM recurrence over one sequence. `proj`: `(t, 4h)` input projections plus biases, gate
/// order (i, f, g, o); `halves`: the `W_hh` rows of units `0..h/2` and `h/2..h` (see
/// [`lstm_rows`]). Updates `hs` and `cs` (`h` each) and writes every step's `h` to `out`
/// (`(t, h)`). With two threads, each computes half of the units (its half of `W_hh` stays in
/// its core's cache) and they swap `h` through atomics once per step.
pub(crate) fn lstm_recurrence(
    proj: &[f32],
    halves: &[Vec<f32>; 2],
    hs: &mut [f32],
    cs: &mut [f32],
    out: &mut [f32],
) {
    let h = hs.len();
    let mid = h / 2;
    let steps = out.len() / h.max(1);
    if steps == 0 {
        return;
    }
    if candle_core::utils::get_num_threads() < 2 || steps < 16 {
        let mut h_new = vec![0f32; h];
        for (p, o) in proj.chunks_exact(4 * h).zip(out.chunks_exact_mut(h)) {
            let (c0, c1) = cs.split_at_mut(mid);
            let (n0, n1) = h_new.split_at_mut(mid);
            simd(LstmUnits {
                proj: p,
                w_rows: &halves[0],
                h_prev: hs,
                c: c0,
                h_new: n0,
                u0: 0,
            });
            simd(LstmUnits {
                proj: p,
                w_rows: &halves[1],
                h_prev: hs,
                c: c1,
                h_new: n1,
                u0: mid,
            });
            hs.copy_from_slice(&h_new);
            o.copy_from_slice(hs);
        }
        return;
    }
    // h of the current step, shared as f32 bits.
    let shared: Vec<AtomicU32> = hs.iter().map(|v| AtomicU32::new(v.to_bits())).collect();
    let barrier = SpinBarrier::new(2);
    let (c0, c1) = cs.split_at_mut(mid);
    let worker = |half: usize, c: &mut [f32], mut out: Option<&mut [f32]>| {
        let (u0, u1) = if half == 0 { (0, mid) } else { (mid, h) };
        let mut h_prev = vec![0f32; h];
        let mut h_new = vec![0f32; u1 - u0];
        for step in 0..steps {
            for (d, s) in h_prev.iter_mut().zip(&shared) {
                *d = f32::from_bits(s.load(Ordering::Relaxed));
            }
            if let Some(out) = out.as_deref_mut()
                && step > 0
            {
                out[(step - 1) * h..step * h].copy_from_slice(&h_prev);
            }
            // Everyone has read h(step - 1) before anyone overwrites it.
            barrier.wait();
            simd(LstmUnits {
                proj: &proj[step * 4 * h..(step + 1) * 4 * h],
                w_rows: &halves[half],
                h_prev: &h_prev,
                c,
                h_new: &mut h_new,
                u0,
            });
            for (s, v) in shared[u0..u1].iter().zip(&h_new) {
                s.store(v.to_bits(), Ordering::Relaxed);
            }
            barrier.wait();
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| worker(1, c1, None));
        worker(0, c0, Some(out));
    });
    for (d, s) in hs.iter_mut().zip(&shared) {
        *d = f32::from_bits(s.load(Ordering::Relaxed));
    }
    out[(steps - 1) * h..].copy_from_slice(hs);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        // Small deterministic LCG so the tests need no RNG crate.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn exp_and_activations_match_libm() {
        for i in -20000..=20000 {
            let x = i as f32 * 0.005;
            let e = x.exp();
            if (-87.0..=88.0).contains(&x) {
                assert!(
                    (exp(x) - e).abs() <= 2.5e-7 * e,
                    "exp({x}) = {} vs {e}",
                    exp(x)
                );
            }
            let el = if x > 0.0 { x } else { x.exp() - 1.0 };
            assert!((elu(x) - el).abs() <= 2e-7 * el.abs().max(1.0), "elu({x})");
            assert!(
                (sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs() <= 2e-7,
                "sigmoid({x})"
            );
            assert!((tanh(x) - x.tanh()).abs() <= 3e-7, "tanh({x})");
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(elu(-1000.0) == -1.0);
        assert!(exp(1000.0).is_finite());
    }

    /// Reference conv on (C, T) layout with candle, zero padding `pad` on both sides.
    fn ref_conv(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        pad: usize,
        stride: usize,
        dil: usize,
    ) -> Tensor {
        let y = x
            .unsqueeze(0)
            .unwrap()
            .conv1d(w, pad, stride, dil, 1)
            .unwrap();
        y.broadcast_add(&b.reshape((1, (), 1)).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
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
                let xp = pad_rows(
                    &xt,
                    c_in,
                    pad,
                    pad,
                    PadMode::Constant,
                    width,
                    with_ones,
                    |v| v,
                );
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
        let xp = pad_rows(
            &to_vec(&x.t()?)?,
            c_in,
            0,
            0,
            PadMode::Constant,
            c_in,
            false,
            |v| v,
        );
        let got = conv_padded(xp, c_in, k, 1, 1, &conv_weight_t(&w, None, c_in)?)?;
        assert!(max_diff(&got.t()?, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn conv_tr_matches_candle() -> Result<()> {
        for &(c_in, c_out, k, stride, tl, tr, len) in &[
            (4, 3, 4, 2, 0, 2, 20),
            (6, 2, 16, 8, 3, 5, 9),
            (3, 5, 10, 5, 0, 0, 1),
            (2, 2, 3, 1, 1, 1, 12),
            (3, 2, 2, 3, 0, 0, 7),
            (3, 4, 7, 3, 2, 2, 11),
        ] {
            let x = rand(&[c_in, len], 6);
            let w = rand(&[c_in, c_out, k], 7);
            let b = rand(&[c_out], 8);
            let (wt, m) = conv_tr_as_conv_weight(&w, &b, stride)?;
            for pre_elu in [false, true] {
                let xi = if pre_elu { x.elu(1.0)? } else { x.clone() };
                let full = xi.unsqueeze(0)?.conv_transpose1d(&w, 0, 0, stride, 1, 1)?;
                let full = full.broadcast_add(&b.reshape((1, (), 1))?)?.squeeze(0)?;
                let n = full.dim(D::Minus1)?;
                let want = full.narrow(D::Minus1, tl, n - tl - tr)?;
                let spec = ConvSpec {
                    c_in,
                    k: m,
                    stride: 1,
                    dilation: 1,
                    left: m - 1,
                    right: m - 1,
                    mode: PadMode::Constant,
                    wt: &wt,
                    pre_elu,
                };
                let got = spec.run(&to_vec(&x.t()?)?)?;
                let got = Tensor::from_vec(got.clone(), (got.len() / c_out, c_out), &Device::Cpu)?;
                let got = got.narrow(0, tl, n - tl - tr)?;
                let d = max_diff(&got.t()?, &want);
                assert!(
                    d < 1e-5,
                    "convtr {c_in}->{c_out} k{k} s{stride} elu {pre_elu}: {d}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn tiled_conv_matches_candle() -> Result<()> {
        // Long enough for several tiles; reflect padding at both ends; with and without ELU.
        for &(c_in, c_out, k, stride, dil, len) in &[
            (3, 4, 7, 1, 1, 100_000),
            (5, 6, 4, 2, 1, 70_001),
            (4, 1, 7, 1, 1, 50_000),
            (2, 3, 3, 1, 2, 40_000),
        ] {
            let x = rand(&[c_in, len], 9);
            let w = rand(&[c_out, c_in, k], 10);
            let b = rand(&[c_out], 11);
            let span = (k - 1) * dil + 1;
            let (left, right) = (span - stride, 3);
            for pre_elu in [false, true] {
                let xi = if pre_elu { x.elu(1.0)? } else { x.clone() };
                // Reference: reflect-pad with candle index ops, then candle's conv1d.
                let idx: Vec<u32> = (0..left + len + right)
                    .map(|p| pad_source(p, len, left, right, PadMode::Reflect).unwrap_or(0) as u32)
                    .collect();
                let xp = xi.index_select(&Tensor::new(idx, &Device::Cpu)?, 1)?;
                let want = ref_conv(&xp, &w, &b, 0, stride, dil);
                let wt = conv_weight_t(&w, Some(&b), c_in + 1)?;
                let spec = ConvSpec {
                    c_in,
                    k,
                    stride,
                    dilation: dil,
                    left,
                    right,
                    mode: PadMode::Reflect,
                    wt: &wt,
                    pre_elu,
                };
                let got = spec.run(&to_vec(&x.t()?)?)?;
                let got = Tensor::from_vec(got, (want.dim(1)?, c_out), &Device::Cpu)?;
                let d = max_diff(&got.t()?, &want);
                assert!(
                    d < 1e-5,
                    "tiled conv {c_in}->{c_out} k{k} s{stride} d{dil} elu {pre_elu}: {d}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn pad_modes_match_reference_rules() {
        let x: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0];
        let rows = |left, right, mode| pad_rows(&x, 1, left, right, mode, 1, false, |v| v);
        assert_eq!(
            rows(2, 3, PadMode::Reflect),
            vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]
        );
        assert_eq!(
            rows(1, 2, PadMode::Replicate),
            vec![1.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
        );
        assert_eq!(
            rows(1, 1, PadMode::Constant),
            vec![0.0, 1.0, 2.0, 3.0, 4.0, 0.0]
        );
        // Reflect with a pad not shorter than the input: zero-extend first (torch's _pad1d).
        // [1,2,3,4] + 3 zeros, reflect left 6: ext = [1,2,3,4,0,0,0] → 0,0,0,4,3,2 | 1..4.
        assert_eq!(
            rows(6, 0, PadMode::Reflect),
            vec![0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(
            rows(0, 5, PadMode::Reflect),
            vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 4.0, 3.0]
        );
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
            .map(|(i, v)| {
                (v - mean) / (var + 1e-5).sqrt() * [1.0, 2.0, 0.5][i % 3] + [0.0, 1.0, -1.0][i % 3]
            })
            .collect();
        group_norm1(&mut x, &[1.0, 2.0, 0.5], &[0.0, 1.0, -1.0], 1e-5);
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
