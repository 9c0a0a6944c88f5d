//! Kaldi-compatible log-mel filterbank features, low-frame-rate (LFR) stacking and CMVN: the
//! speech frontend of FunASR models (Paraformer, SenseVoice).
//!
//! The pipeline mirrors FunASR's `WavFrontend` (funasr 1.4.16, `funasr/frontends/wav_frontend.py`,
//! `WavFrontend.forward`):
//!
//! 1. samples in [-1, 1] are scaled by 32768 (`upsacle_samples`, default true);
//! 2. `torchaudio.compliance.kaldi.fbank(num_mel_bins=80, frame_length=25, frame_shift=10,
//!    dither, energy_floor=0, window_type="hamming", snip_edges=True)` — per frame: optional
//!    dither, DC removal, pre-emphasis 0.97 (first sample against itself), window, zero-pad to
//!    512, power spectrum, triangular mel banks on 20 Hz .. Nyquist, `log(max(e, f32::EPSILON))`;
//! 3. LFR (`apply_lfr`): output frame `i` stacks the fbank rows `6i-3 .. 6i+3`, indices clamped
//!    to `[0, T-1]` (FunASR left-pads `(m-1)/2` copies of row 0 and right-pads with the last
//!    row); `ceil(T / n)` output frames. Checked equal to FunASR's `apply_lfr` for T = 1..299;
//! 4. CMVN from `am.mvn` (`load_cmvn`/`apply_cmvn`): `(x + add_shift) * rescale`.
//!
//! [`StreamingFrontend`] produces exactly the frames of [`Frontend::features`] on the whole
//! signal, however the samples are split: an LFR frame is emitted as soon as the fbank rows it
//! stacks exist, and [`StreamingFrontend::finish`] emits the tail frames (those clamped at the
//! end). FunASR's `WavFrontendOnline` emits the same frames, with a different split between
//! chunks. One difference from FunASR's offline path: for inputs shorter than one frame (400
//! samples) FunASR shortens the frame length (`frame_length=min(25, len/fs*1000)`); here such
//! inputs give no frames.

use std::path::Path;
use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex, num_complex::Complex};

/// Errors of the fbank frontend: bad options or an unreadable CMVN file.
#[derive(Debug, thiserror::Error)]
pub enum FbankError {
    /// An option that this implementation does not support, or an invalid value.
    #[error("unsupported fbank option: {0}")]
    Unsupported(String),
    /// The CMVN (`am.mvn`) file is malformed.
    #[error("malformed CMVN file: {0}")]
    BadCmvn(String),
    /// The CMVN file could not be read.
    #[error("cannot read CMVN file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Analysis window (`window_type` of Kaldi / torchaudio).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowType {
    /// `0.54 - 0.46 cos(2πn/(N-1))` (FunASR's choice).
    Hamming,
    /// `0.5 - 0.5 cos(2πn/(N-1))`.
    Hanning,
    /// Hanning raised to the power 0.85 (Kaldi's default).
    Povey,
    /// All ones.
    Rectangular,
}

impl WindowType {
    /// Parse a Kaldi/torchaudio window name.
    pub fn parse(name: &str) -> Result<Self, FbankError> {
        Ok(match name {
            "hamming" => WindowType::Hamming,
            "hanning" => WindowType::Hanning,
            "povey" => WindowType::Povey,
            "rectangular" => WindowType::Rectangular,
            other => return Err(FbankError::Unsupported(format!("window type {other:?}"))),
        })
    }
}

/// Options of the Kaldi fbank computation. `Default` = FunASR `WavFrontend` with dither 0.
#[derive(Debug, Clone)]
pub struct FbankOptions {
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Number of mel bins.
    pub num_mel_bins: usize,
    /// Frame length in milliseconds.
    pub frame_length_ms: f32,
    /// Frame shift in milliseconds.
    pub frame_shift_ms: f32,
    /// Gaussian dither amplitude (in the scaled sample domain); 0 = deterministic.
    pub dither: f32,
    /// Seed of the dither noise.
    pub dither_seed: u64,
    /// Pre-emphasis coefficient.
    pub preemphasis: f32,
    /// Subtract each frame's mean before pre-emphasis.
    pub remove_dc_offset: bool,
    /// Analysis window.
    pub window: WindowType,
    /// Lowest mel-bank frequency in Hz.
    pub low_freq: f32,
    /// Highest mel-bank frequency in Hz; `<= 0` means Nyquist + this value (Kaldi convention).
    pub high_freq: f32,
    /// Factor applied to the input samples (FunASR: 32768, i.e. 16-bit integer range).
    pub input_scale: f32,
    /// VTLN warp factor of the mel banks (Kaldi's `--vtln-warp`); 1 = no warp.
    pub vtln_warp: f32,
    /// Lower inflection cutoff of the VTLN warp in Hz (Kaldi's `--vtln-low`, default 100).
    pub vtln_low: f32,
    /// Upper inflection cutoff in Hz; `< 0` means Nyquist + this value (Kaldi's `--vtln-high`,
    /// default -500).
    pub vtln_high: f32,
}

impl Default for FbankOptions {
    fn default() -> Self {
        FbankOptions {
            sample_rate: 16_000,
            num_mel_bins: 80,
            frame_length_ms: 25.0,
            frame_shift_ms: 10.0,
            dither: 0.0,
            dither_seed: 0,
            preemphasis: 0.97,
            remove_dc_offset: true,
            window: WindowType::Hamming,
            low_freq: 20.0,
            high_freq: 0.0,
            input_scale: 32768.0,
            vtln_warp: 1.0,
            vtln_low: 100.0,
            vtln_high: -500.0,
        }
    }
}

/// Kaldi fbank extractor (snip_edges = true, power spectrum, log mel energies).
#[derive(Clone)]
pub struct Fbank {
    opts: FbankOptions,
    frame_len: usize,
    frame_shift: usize,
    padded: usize,
    window: Vec<f32>,
    /// Per mel bin: first FFT bin and its weights.
    banks: Vec<(usize, Vec<f32>)>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for Fbank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fbank").field("opts", &self.opts).finish()
    }
}

fn mel(f: f64) -> f64 {
    1127.0 * (1.0 + f / 700.0).ln()
}

fn inverse_mel(m: f64) -> f64 {
    700.0 * ((m / 1127.0).exp() - 1.0)
}

/// Kaldi's VTLN warp of a frequency (`VtlnWarpFreq`, torchaudio's `vtln_warp_freq`): piecewise
/// linear through (low, low) and (high, high), `f / warp` between the inflection points
/// `l = vtln_low * max(1, warp)` and `h = vtln_high * min(1, warp)`; identity outside
/// `[low, high]`.
fn vtln_warp_freq(vtln_low: f64, vtln_high: f64, low: f64, high: f64, warp: f64, f: f64) -> f64 {
    if f < low || f > high {
        return f;
    }
    let l = vtln_low * warp.max(1.0);
    let h = vtln_high * warp.min(1.0);
    let scale = 1.0 / warp;
    if f < l {
        low + (scale * l - low) / (l - low) * (f - low)
    } else if f < h {
        scale * f
    } else {
        high + (high - scale * h) / (high - h) * (f - high)
    }
}

impl Fbank {
    /// Build the extractor (window, mel banks, FFT plan).
    pub fn new(opts: FbankOptions) -> Result<Self, FbankError> {
        let sr = opts.sample_rate as f64;
        let frame_len = (sr * opts.frame_length_ms as f64 / 1000.0) as usize;
        let frame_shift = (sr * opts.frame_shift_ms as f64 / 1000.0) as usize;
        if frame_len == 0 || frame_shift == 0 || opts.num_mel_bins < 3 {
            return Err(FbankError::Unsupported(format!(
                "frame length {} ms / shift {} ms / {} mel bins at {} Hz",
                opts.frame_length_ms, opts.frame_shift_ms, opts.num_mel_bins, opts.sample_rate
            )));
        }
        let padded = frame_len.next_power_of_two();
        let n = frame_len as f64;
        let window: Vec<f32> = (0..frame_len)
            .map(|i| {
                let c = (2.0 * std::f64::consts::PI * i as f64 / (n - 1.0)).cos();
                (match opts.window {
                    WindowType::Hamming => 0.54 - 0.46 * c,
                    WindowType::Hanning => 0.5 - 0.5 * c,
                    WindowType::Povey => (0.5 - 0.5 * c).powf(0.85),
                    WindowType::Rectangular => 1.0,
                }) as f32
            })
            .collect();
        // torchaudio.compliance.kaldi.get_mel_banks: triangles equally spaced on the mel scale
        // over [low_freq, high_freq], their corners moved by the VTLN warp when there is one,
        // evaluated at the FFT bin centres 0..padded/2 (the Nyquist bin gets weight 0).
        let nyquist = sr / 2.0;
        let high = if opts.high_freq <= 0.0 {
            nyquist + opts.high_freq as f64
        } else {
            opts.high_freq as f64
        };
        let low = opts.low_freq as f64;
        if !(0.0 <= low && low < high && high <= nyquist) {
            return Err(FbankError::Unsupported(format!(
                "mel range {low} .. {high} Hz at {sr} Hz"
            )));
        }
        let warp = opts.vtln_warp as f64;
        let vtln_low = opts.vtln_low as f64;
        let vtln_high = if opts.vtln_high < 0.0 {
            nyquist + opts.vtln_high as f64
        } else {
            opts.vtln_high as f64
        };
        if !(warp.is_finite() && warp > 0.0) {
            return Err(FbankError::Unsupported(format!("VTLN warp factor {warp}")));
        }
        // Kaldi's checks (MelBanks, VtlnWarpFreq): the cutoffs and the inflection points must
        // lie inside the mel range; and the lower inflection point below the upper one, or the
        // warp is not a monotonic piecewise-linear map (a factor far from 1).
        let (l, h) = (vtln_low * warp.max(1.0), vtln_high * warp.min(1.0));
        if warp != 1.0
            && !(low < vtln_low
                && vtln_low < high
                && 0.0 < vtln_high
                && vtln_high < high
                && vtln_low < vtln_high
                && low < l
                && l < h
                && h < high)
        {
            return Err(FbankError::Unsupported(format!(
                "VTLN cutoffs {vtln_low} .. {vtln_high} Hz with warp {warp} vs mel range {low} .. {high} Hz"
            )));
        }
        let warp_mel = |m: f64| {
            mel(vtln_warp_freq(
                vtln_low,
                vtln_high,
                low,
                high,
                warp,
                inverse_mel(m),
            ))
        };
        let (mel_low, mel_high) = (mel(low), mel(high));
        let delta = (mel_high - mel_low) / (opts.num_mel_bins as f64 + 1.0);
        let bin_width = sr / padded as f64;
        let banks = (0..opts.num_mel_bins)
            .map(|b| {
                let mut left = mel_low + b as f64 * delta;
                let mut center = left + delta;
                let mut right = center + delta;
                if warp != 1.0 {
                    (left, center, right) = (warp_mel(left), warp_mel(center), warp_mel(right));
                }
                let w: Vec<f32> = (0..padded / 2)
                    .map(|i| {
                        let m = mel(bin_width * i as f64);
                        let up = (m - left) / (center - left);
                        let down = (right - m) / (right - center);
                        if warp == 1.0 {
                            up.min(down).max(0.0) as f32
                        } else if left < m && m <= center {
                            // torchaudio's get_mel_banks with a warp: the two slopes by region
                            up as f32
                        } else if center < m && m < right {
                            down as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let start = w.iter().position(|&x| x > 0.0).unwrap_or(0);
                let end = w.iter().rposition(|&x| x > 0.0).map_or(start, |e| e + 1);
                (start, w[start..end].to_vec())
            })
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(padded);
        Ok(Fbank {
            opts,
            frame_len,
            frame_shift,
            padded,
            window,
            banks,
            fft,
        })
    }

    /// The options.
    pub fn options(&self) -> &FbankOptions {
        &self.opts
    }

    /// Samples per frame (400 at 16 kHz / 25 ms).
    pub fn frame_len(&self) -> usize {
        self.frame_len
    }

    /// Samples between frame starts (160 at 16 kHz / 10 ms).
    pub fn frame_shift(&self) -> usize {
        self.frame_shift
    }

    /// Number of output rows (mel bins).
    pub fn num_bins(&self) -> usize {
        self.opts.num_mel_bins
    }

    /// Number of frames of `n` samples with snip_edges: `1 + (n - len) / shift`, 0 if `n < len`.
    pub fn num_frames(&self, n: usize) -> usize {
        if n < self.frame_len {
            0
        } else {
            1 + (n - self.frame_len) / self.frame_shift
        }
    }

    /// Log-mel energies of one frame of `frame_len()` unscaled samples, written to `out`
    /// (`num_bins()` values). `rng` supplies dither noise when dither is non-zero.
    pub fn compute_frame(&self, samples: &[f32], rng: &mut DitherRng, out: &mut [f32]) {
        debug_assert_eq!(samples.len(), self.frame_len);
        let scale = self.opts.input_scale;
        let mut buf = vec![0f32; self.padded];
        for (b, &s) in buf.iter_mut().zip(samples) {
            *b = s * scale;
        }
        let frame = &mut buf[..self.frame_len];
        if self.opts.dither != 0.0 {
            for x in frame.iter_mut() {
                *x += rng.gauss() * self.opts.dither;
            }
        }
        if self.opts.remove_dc_offset {
            let mean = frame.iter().map(|&x| x as f64).sum::<f64>() / self.frame_len as f64;
            for x in frame.iter_mut() {
                *x -= mean as f32;
            }
        }
        let p = self.opts.preemphasis;
        if p != 0.0 {
            for i in (1..self.frame_len).rev() {
                frame[i] -= p * frame[i - 1];
            }
            frame[0] -= p * frame[0];
        }
        for (x, w) in frame.iter_mut().zip(&self.window) {
            *x *= w;
        }
        let mut spec = vec![Complex::new(0f32, 0f32); self.padded / 2 + 1];
        // Lengths match the plan by construction.
        self.fft
            .process(&mut buf, &mut spec)
            .expect("fft buffer sizes match the plan");
        let power: Vec<f32> = spec.iter().map(|c| c.norm_sqr()).collect();
        for (o, (start, w)) in out.iter_mut().zip(&self.banks) {
            let e: f32 = w.iter().zip(&power[*start..]).map(|(a, b)| a * b).sum();
            *o = e.max(f32::EPSILON).ln();
        }
    }

    /// Fbank rows of a whole signal, row-major `[num_frames(len), num_bins()]`.
    pub fn compute(&self, samples: &[f32], rng: &mut DitherRng) -> Vec<f32> {
        let t = self.num_frames(samples.len());
        let d = self.num_bins();
        let mut out = vec![0f32; t * d];
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let s = i * self.frame_shift;
            self.compute_frame(&samples[s..s + self.frame_len], rng, row);
        }
        out
    }
}

/// Deterministic Gaussian noise for dithering (xorshift64* + Box–Muller). Not torch's RNG: with
/// dither on, features differ from FunASR's by the noise (as FunASR's differ run to run).
#[derive(Debug, Clone)]
pub struct DitherRng {
    state: u64,
    spare: Option<f32>,
}

impl DitherRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        DitherRng {
            state: seed ^ 0x9E37_79B9_7F4A_7C15 | 1,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let x = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// One standard normal sample.
    pub fn gauss(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * v;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }
}

/// Global CMVN as stored in FunASR's `am.mvn`: `y = (x + shift) * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cmvn {
    /// `<AddShift>` vector (negated means).
    pub shift: Vec<f32>,
    /// `<Rescale>` vector (inverse standard deviations).
    pub scale: Vec<f32>,
}

impl Cmvn {
    /// Parse the Kaldi nnet text format: the line after `<AddShift>` / `<Rescale>` must start
    /// with `<LearnRateCoef>`; its fields after `<LearnRateCoef> 0 [` up to the closing `]` are
    /// the vector (FunASR `load_cmvn` takes fields `[3:-1]` of that line).
    pub fn parse(text: &str) -> Result<Self, FbankError> {
        let lines: Vec<&str> = text.lines().collect();
        let mut shift = None;
        let mut scale = None;
        for (i, line) in lines.iter().enumerate() {
            let first = line.split_whitespace().next();
            let slot = match first {
                Some("<AddShift>") => &mut shift,
                Some("<Rescale>") => &mut scale,
                _ => continue,
            };
            let next: Vec<&str> = lines
                .get(i + 1)
                .map(|l| l.split_whitespace().collect())
                .unwrap_or_default();
            if next.first() != Some(&"<LearnRateCoef>") || next.len() < 4 {
                return Err(FbankError::BadCmvn(format!(
                    "{} is not followed by a <LearnRateCoef> line",
                    first.unwrap_or_default()
                )));
            }
            let v = next[3..next.len() - 1]
                .iter()
                .map(|s| s.parse::<f32>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| FbankError::BadCmvn(format!("bad number: {e}")))?;
            *slot = Some(v);
        }
        let (Some(shift), Some(scale)) = (shift, scale) else {
            return Err(FbankError::BadCmvn(
                "missing <AddShift> or <Rescale>".into(),
            ));
        };
        if shift.len() != scale.len() || shift.is_empty() {
            return Err(FbankError::BadCmvn(format!(
                "<AddShift> has {} values, <Rescale> {}",
                shift.len(),
                scale.len()
            )));
        }
        Ok(Cmvn { shift, scale })
    }

    /// Read and parse a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, FbankError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| FbankError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Dimension of the vectors.
    pub fn dim(&self) -> usize {
        self.shift.len()
    }

    /// Normalise one feature row in place (its first `dim()` values, as FunASR slices `[:dim]`).
    pub fn apply(&self, row: &mut [f32]) {
        for ((x, s), c) in row.iter_mut().zip(&self.shift).zip(&self.scale) {
            *x = (*x + s) * c;
        }
    }
}

/// Frontend configuration: fbank options plus LFR stacking (`lfr_m` frames every `lfr_n`).
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// Fbank options.
    pub fbank: FbankOptions,
    /// Frames stacked per LFR frame (7 for Paraformer).
    pub lfr_m: usize,
    /// LFR stride in fbank frames (6 for Paraformer).
    pub lfr_n: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            fbank: FbankOptions::default(),
            lfr_m: 7,
            lfr_n: 6,
        }
    }
}

/// Features: row-major `[frames, dim]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features {
    /// The values, `frames() * dim` of them.
    pub data: Vec<f32>,
    /// Values per frame.
    pub dim: usize,
}

impl Features {
    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Append the frames of `other` (same dim).
    pub fn extend(&mut self, other: &Features) {
        debug_assert!(self.dim == other.dim || self.data.is_empty());
        self.dim = other.dim;
        self.data.extend_from_slice(&other.data);
    }
}

/// Fbank → LFR → CMVN, FunASR `WavFrontend`. Cheap to clone (the FFT plan is shared).
#[derive(Debug, Clone)]
pub struct Frontend {
    fbank: Fbank,
    lfr_m: usize,
    lfr_n: usize,
    cmvn: Option<Cmvn>,
}

impl Frontend {
    /// Build a frontend; `cmvn` must match the LFR output dimension.
    pub fn new(cfg: FrontendConfig, cmvn: Option<Cmvn>) -> Result<Self, FbankError> {
        if cfg.lfr_m == 0 || cfg.lfr_n == 0 {
            return Err(FbankError::Unsupported(
                "lfr_m and lfr_n must be >= 1".into(),
            ));
        }
        let fbank = Fbank::new(cfg.fbank)?;
        let dim = fbank.num_bins() * cfg.lfr_m;
        if let Some(c) = &cmvn
            && c.dim() < dim
        {
            return Err(FbankError::BadCmvn(format!(
                "CMVN has {} values, features have {dim}",
                c.dim()
            )));
        }
        Ok(Frontend {
            fbank,
            lfr_m: cfg.lfr_m,
            lfr_n: cfg.lfr_n,
            cmvn,
        })
    }

    /// This frontend with its mel banks warped by `warp` (Kaldi VTLN; 1 = unchanged): the same
    /// framing, LFR and CMVN.
    pub fn with_vtln_warp(&self, warp: f32) -> Result<Self, FbankError> {
        Ok(Frontend {
            fbank: Fbank::new(FbankOptions {
                vtln_warp: warp,
                ..self.fbank.opts.clone()
            })?,
            lfr_m: self.lfr_m,
            lfr_n: self.lfr_n,
            cmvn: self.cmvn.clone(),
        })
    }

    /// The fbank extractor.
    pub fn fbank(&self) -> &Fbank {
        &self.fbank
    }

    /// Output dimension (`num_mel_bins * lfr_m`).
    pub fn dim(&self) -> usize {
        self.fbank.num_bins() * self.lfr_m
    }

    /// Output frames for `n` fbank rows: `ceil(n / lfr_n)`.
    pub fn num_lfr_frames(&self, fbank_rows: usize) -> usize {
        fbank_rows.div_ceil(self.lfr_n)
    }

    /// Features of a whole utterance (mono samples in [-1, 1] at the configured rate).
    pub fn features(&self, samples: &[f32]) -> Features {
        let mut rng = DitherRng::new(self.fbank.opts.dither_seed);
        let rows = self.fbank.compute(samples, &mut rng);
        let d = self.fbank.num_bins();
        let t = rows.len() / d;
        let mut out = Features {
            data: Vec::with_capacity(self.num_lfr_frames(t) * self.dim()),
            dim: self.dim(),
        };
        for i in 0..self.num_lfr_frames(t) {
            self.push_lfr_frame(&rows, 0, t, i, &mut out.data);
        }
        out
    }

    /// Append LFR frame `i` (+ CMVN) built from fbank `rows` holding rows `first..` of an
    /// utterance of `t` rows (rows past the end are clamped to `t - 1`).
    fn push_lfr_frame(&self, rows: &[f32], first: usize, t: usize, i: usize, out: &mut Vec<f32>) {
        let d = self.fbank.num_bins();
        let start = out.len();
        let left = (self.lfr_m - 1) / 2;
        for j in 0..self.lfr_m {
            let r = (i * self.lfr_n + j).saturating_sub(left).min(t - 1);
            let k = r - first;
            out.extend_from_slice(&rows[k * d..(k + 1) * d]);
        }
        if let Some(c) = &self.cmvn {
            c.apply(&mut out[start..]);
        }
    }

    /// A streaming session producing the same frames as [`Frontend::features`].
    pub fn stream(&self) -> StreamingFrontend {
        StreamingFrontend {
            rng: DitherRng::new(self.fbank.opts.dither_seed),
            frontend: self.clone(),
            samples: Vec::new(),
            rows: Vec::new(),
            first_row: 0,
            total_rows: 0,
            emitted: 0,
        }
    }
}

/// Incremental frontend: [`push`](Self::push) samples, get the LFR frames that are complete;
/// [`finish`](Self::finish) emits the end-clamped tail. The concatenated output equals
/// [`Frontend::features`] of the concatenated input.
#[derive(Debug, Clone)]
pub struct StreamingFrontend {
    frontend: Frontend,
    rng: DitherRng,
    /// Samples not yet consumed by a frame start (the overlap of the next frame).
    samples: Vec<f32>,
    /// Fbank rows `first_row..total_rows`, row-major.
    rows: Vec<f32>,
    first_row: usize,
    total_rows: usize,
    /// LFR frames emitted so far.
    emitted: usize,
}

impl StreamingFrontend {
    /// LFR frames emitted so far.
    pub fn frames_emitted(&self) -> usize {
        self.emitted
    }

    /// Output dimension.
    pub fn dim(&self) -> usize {
        self.frontend.dim()
    }

    /// Add samples; return the LFR frames whose fbank rows are now all available.
    pub fn push(&mut self, samples: &[f32]) -> Features {
        let fb = &self.frontend.fbank;
        let d = fb.num_bins();
        self.samples.extend_from_slice(samples);
        let n = fb.num_frames(self.samples.len());
        let mut row = vec![0f32; d];
        for k in 0..n {
            let s = k * fb.frame_shift();
            fb.compute_frame(
                &self.samples[s..s + fb.frame_len()],
                &mut self.rng,
                &mut row,
            );
            self.rows.extend_from_slice(&row);
        }
        self.samples.drain(..n * fb.frame_shift());
        self.total_rows += n;
        // Frame i needs rows up to i*n + m-1 - left (clamped at 0 on the left only).
        let left = (self.frontend.lfr_m - 1) / 2;
        let need = |i: usize| i * self.frontend.lfr_n + self.frontend.lfr_m - 1 - left;
        let mut out = Features {
            data: Vec::new(),
            dim: self.dim(),
        };
        while self.total_rows > 0 && need(self.emitted) < self.total_rows {
            self.frontend.push_lfr_frame(
                &self.rows,
                self.first_row,
                usize::MAX,
                self.emitted,
                &mut out.data,
            );
            self.emitted += 1;
        }
        self.trim();
        out
    }

    /// End of input: emit the remaining frames (rows past the end repeat the last row).
    pub fn finish(&mut self) -> Features {
        let t = self.total_rows;
        let mut out = Features {
            data: Vec::new(),
            dim: self.dim(),
        };
        while self.emitted < self.frontend.num_lfr_frames(t) {
            self.frontend.push_lfr_frame(
                &self.rows,
                self.first_row,
                t,
                self.emitted,
                &mut out.data,
            );
            self.emitted += 1;
        }
        self.trim();
        out
    }

    /// Drop fbank rows no future frame needs.
    fn trim(&mut self) {
        let left = (self.frontend.lfr_m - 1) / 2;
        let keep_from = (self.emitted * self.frontend.lfr_n)
            .saturating_sub(left)
            .min(self.total_rows.saturating_sub(1));
        if keep_from > self.first_row {
            let d = self.frontend.fbank.num_bins();
            self.rows.drain(..(keep_from - self.first_row) * d);
            self.first_row = keep_from;
        }
    }

    /// Forget all input (start a new utterance).
    pub fn reset(&mut self) {
        *self = self.frontend.stream();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 / 16000.0;
                0.3 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                    + 0.05 * ((i * 7919 % 1000) as f32 / 1000.0 - 0.5)
            })
            .collect()
    }

    #[test]
    fn cmvn_parse() {
        let text = "<Nnet>\n<AddShift> 3 3\n<LearnRateCoef> 0 [ -1 -2 -3 ]\n<Rescale> 3 3\n<LearnRateCoef> 0 [ 0.5 1 2 ]\n</Nnet>\n";
        let c = Cmvn::parse(text).unwrap();
        assert_eq!(c.shift, vec![-1.0, -2.0, -3.0]);
        assert_eq!(c.scale, vec![0.5, 1.0, 2.0]);
        let mut row = [1.0, 2.0, 4.0];
        c.apply(&mut row);
        assert_eq!(row, [0.0, 0.0, 2.0]);
        assert!(Cmvn::parse("<AddShift> 3 3\n[ 1 2 3 ]\n").is_err());
    }

    #[test]
    fn streaming_equals_batch() {
        let cmvn = Cmvn {
            shift: vec![-1.0; 560],
            scale: vec![0.5; 560],
        };
        let fe = Frontend::new(FrontendConfig::default(), Some(cmvn)).unwrap();
        for n in [0, 399, 400, 1000, 16000, 16000 + 37, 23456] {
            let w = wave(n);
            let batch = fe.features(&w);
            assert_eq!(batch.frames(), fe.num_lfr_frames(fe.fbank().num_frames(n)));
            for chunk in [1usize, 160, 333, 960, 5000] {
                let mut s = fe.stream();
                let mut got = Features::default();
                for c in w.chunks(chunk) {
                    got.extend(&s.push(c));
                }
                got.extend(&s.finish());
                assert_eq!(got.data, batch.data, "n={n} chunk={chunk}");
            }
        }
    }

    #[test]
    fn dither_is_seeded() {
        let cfg = FrontendConfig {
            fbank: FbankOptions {
                dither: 1.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let fe = Frontend::new(cfg, None).unwrap();
        let w = wave(4000);
        assert_eq!(fe.features(&w), fe.features(&w));
        let plain = Frontend::new(FrontendConfig::default(), None).unwrap();
        assert_ne!(fe.features(&w), plain.features(&w));
    }
}
