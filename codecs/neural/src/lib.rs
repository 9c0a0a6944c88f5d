//! Neural audio codecs for Cadenza, on candle.
//!
//! - [`encodec`]: EnCodec (24/32/48 kHz), faithful to transformers' `EncodecModel`, loading Hugging
//!   Face directories in both weight-norm key styles.
//! - [`streaming`]: chunk-by-chunk decode (and encode) equal to the whole-sequence result.
//!
//! Model code only: no networking, no async runtime.

pub mod encodec;
mod kernels;
pub mod profile;
pub mod streaming;

pub use encodec::{Config as EncodecConfig, Encodec, Encoded};
pub use streaming::{StreamDecoder, StreamEncoder};
