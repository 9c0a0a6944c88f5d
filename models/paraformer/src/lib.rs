//! Paraformer (placeholder).
