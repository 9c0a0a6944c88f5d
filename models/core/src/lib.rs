//! Shared pieces of Cadenza's codec-token language models (MusicGen, MAGNeT, SongGen, …):
//!
//! - [`transformer`]: pre-norm transformer layers with self-attention (preallocated KV cache,
//!   fused QKV), cross-attention (K/V computed once per session) and a feed-forward block, loaded
//!   from either Hugging Face or audiocraft key names;
//! - [`positions`]: the sinusoidal position embeddings MusicGen checkpoints expect;
//! - [`patterns`]: codebook interleaving patterns (delay; parallel);
//! - [`sampling`]: temperature, top-k, top-p, greedy, a seeded RNG, classifier-free guidance.
//!
//! Pure candle: no networking, no async runtime.

pub mod patterns;
pub mod positions;
pub mod sampling;
pub mod transformer;
