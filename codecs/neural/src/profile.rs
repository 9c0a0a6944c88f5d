//! Opt-in wall-clock breakdown of EnCodec by layer type, for benchmarks.
//!
//! Off by default (one relaxed atomic load per layer). [`enable`] turns it on process-wide;
//! [`take`] returns and clears the accumulated times. The first seven categories are exclusive of
//! each other; the parenthesised ones are parts of them (conv input building and conv gemms
//! across conv, convtr and resblock; the LSTM recurrence within lstm).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Layer types timed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain (non-residual) convolutions, including the ELU before them.
    Conv,
    /// Transposed convolutions, including the ELU before them.
    ConvTr,
    /// Residual blocks (their convs, ELUs and shortcut).
    ResBlock,
    /// Stand-alone ELU layers (not fused into a following conv).
    Elu,
    /// The LSTM (input projections, recurrence and skip).
    Lstm,
    /// Residual vector quantizer (encode or decode).
    Quantizer,
    /// Layout conversions between `(B, C, T)` tensors and the time-major kernels.
    Layout,
    /// Inside the above: building conv inputs (padding, ELU, bias column).
    ConvInput,
    /// Inside the above: the conv gemms.
    ConvGemm,
    /// Inside the above: the LSTM recurrence.
    LstmStep,
}

const KINDS: [(Kind, &str); 10] = [
    (Kind::Conv, "conv"),
    (Kind::ConvTr, "convtr"),
    (Kind::ResBlock, "resblock"),
    (Kind::Elu, "elu"),
    (Kind::Lstm, "lstm"),
    (Kind::Quantizer, "quantizer"),
    (Kind::Layout, "layout"),
    (Kind::ConvInput, "(of which conv input)"),
    (Kind::ConvGemm, "(conv gemm)"),
    (Kind::LstmStep, "(lstm recurrence)"),
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 10] = [const { AtomicU64::new(0) }; 10];

/// Turns timing on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Returns `(name, seconds)` per layer type accumulated since the last call, and resets them.
pub fn take() -> Vec<(&'static str, f64)> {
    KINDS
        .iter()
        .enumerate()
        .map(|(i, (_, name))| (*name, NANOS[i].swap(0, Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

/// Times the guard's lifetime under `kind` when profiling is on.
pub(crate) fn scope(kind: Kind) -> Option<Guard> {
    ENABLED.load(Ordering::Relaxed).then(|| Guard {
        kind,
        start: Instant::now(),
    })
}

pub(crate) struct Guard {
    kind: Kind,
    start: Instant,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let idx = KINDS.iter().position(|(k, _)| *k == self.kind).unwrap_or(0);
        NANOS[idx].fetch_add(self.start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}
