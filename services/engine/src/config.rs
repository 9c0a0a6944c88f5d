//! Engine configuration: which models to load and the limits that protect the workers.
//! Deserialised from the `[engine]` table and `[[models]]` array of the server's TOML file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Limits and queue sizes of the engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Sessions stepped concurrently per worker.
    pub max_active: usize,
    /// Sessions waiting for a slot per worker; beyond this, requests are refused at once
    /// with `RESOURCE_EXHAUSTED` and their queue position.
    pub max_queue: usize,
    /// Slots per worker that only live streams (ASR) may take (other sessions always get at
    /// least one slot).
    pub live_reserve: usize,
    /// Most slots per worker that batch jobs may hold.
    pub batch_slots: usize,
    /// Most model rows in one batched step (a CFG music session counts 2).
    pub max_batch_rows: usize,
    /// CPU threads for model math (0 = one per core). Process-wide: the CLI sets
    /// `RAYON_NUM_THREADS` from it before anything starts.
    pub threads: usize,
    /// Run every model once before reporting SERVING.
    pub warmup: bool,
    /// Workers, one per device (default: one on the CPU).
    pub workers: Vec<WorkerConfig>,
    /// Longest input audio accepted, in seconds.
    pub max_audio_seconds: f64,
    /// Largest encoded input accepted, in bytes.
    pub max_input_bytes: usize,
    /// Most code frames accepted in one decode request.
    pub max_code_frames: usize,
    /// A session whose client does not read its output for this long is dropped.
    pub slow_consumer_timeout_ms: u64,
    /// Audio seconds processed per worker step for codec work (smaller = fairer interleaving).
    pub codec_step_seconds: f64,
    /// Longest music generation accepted, in seconds of new audio.
    pub max_music_seconds: f64,
}

/// One worker: a device and the thread that steps its sessions.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Name in metrics and logs.
    pub name: String,
    /// `cpu`, or `cuda:N` / `metal:N` (only in builds with that backend).
    #[serde(default = "cpu")]
    pub device: String,
}

fn cpu() -> String {
    "cpu".into()
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_active: 16,
            max_queue: 64,
            live_reserve: 2,
            batch_slots: 8,
            max_batch_rows: 64,
            threads: 0,
            warmup: true,
            workers: Vec::new(),
            max_audio_seconds: 600.0,
            max_input_bytes: 256 << 20,
            max_code_frames: 75 * 600,
            slow_consumer_timeout_ms: 30_000,
            codec_step_seconds: 2.0,
            max_music_seconds: 30.0,
        }
    }
}

impl EngineConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_active == 0 {
            return Err("engine.max_active must be at least 1".into());
        }
        if self.batch_slots == 0 {
            return Err("engine.batch_slots must be at least 1".into());
        }
        if self.max_batch_rows == 0 {
            return Err("engine.max_batch_rows must be at least 1".into());
        }
        if !(self.max_audio_seconds.is_finite() && self.max_audio_seconds > 0.0) {
            return Err("engine.max_audio_seconds must be positive".into());
        }
        if !(self.max_music_seconds.is_finite() && self.max_music_seconds > 0.0) {
            return Err("engine.max_music_seconds must be positive".into());
        }
        if !(self.codec_step_seconds.is_finite() && self.codec_step_seconds > 0.0) {
            return Err("engine.codec_step_seconds must be positive".into());
        }
        let mut names = std::collections::HashSet::new();
        for w in &self.workers {
            if !names.insert(&w.name) {
                return Err(format!("engine.workers: '{}' appears twice", w.name));
            }
            if w.device != "cpu" {
                return Err(format!(
                    "engine.workers '{}': device '{}' is not available in this build \
                     (it runs on the CPU only; GPU backends need a build with candle's \
                     cuda or metal feature)",
                    w.name, w.device
                ));
            }
        }
        Ok(())
    }

    /// The workers to start (the configured ones, or one on the CPU).
    pub fn worker_list(&self) -> Vec<WorkerConfig> {
        if self.workers.is_empty() {
            vec![WorkerConfig {
                name: "cpu".into(),
                device: "cpu".into(),
            }]
        } else {
            self.workers.clone()
        }
    }

    /// The scheduling policy of each worker.
    pub fn policy(&self) -> crate::scheduler::Policy {
        crate::scheduler::Policy {
            max_active: self.max_active,
            max_queue: self.max_queue,
            live_reserve: self.live_reserve,
            batch_slots: self.batch_slots,
            max_batch_rows: self.max_batch_rows,
        }
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Weights compiled into the binary (see `models/pretrained/`).
    Embedded(String),
    /// A directory in the checkpoint's own format.
    Path(PathBuf),
}

impl ModelSource {
    /// Parses `embedded:NAME` or a path; relative paths are resolved against `base`.
    pub fn parse(s: &str, base: Option<&Path>) -> Self {
        match s.strip_prefix("embedded:") {
            Some(name) => Self::Embedded(name.to_string()),
            None => {
                let p = PathBuf::from(s);
                match base {
                    Some(b) if p.is_relative() => Self::Path(b.join(p)),
                    _ => Self::Path(p),
                }
            }
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded(n) => write!(f, "embedded:{n}"),
            Self::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Registry name clients use.
    pub name: String,
    /// Model family: `codec` (EnCodec), `music` (MusicGen) or `asr` (Paraformer).
    pub kind: ModelKind,
    /// `embedded:NAME` or a directory path.
    pub source: String,
    /// Overrides the model card summary shown by `ListModels`.
    #[serde(default)]
    pub card: Option<String>,
    /// Checkpoint format of a music model: `hf` (default; a `MusicgenForConditionalGeneration`
    /// directory), `audiocraft` (an autoregressive MusicGen `state_dict.bin` or its directory,
    /// plus `t5` and `codec`) or `audiocraft-magnet` (a MAGNeT `state_dict.bin`, e.g.
    /// `facebook/magnet-small-10secs`, plus `t5` and `codec`). A MAGNeT model is still
    /// `kind = "music"`: it serves the same `Music.Generate` API with other schedules.
    #[serde(default)]
    pub format: Option<String>,
    /// Music models: the default decoding schedule and its parameters (`[models.schedule]`).
    #[serde(default)]
    pub schedule: Option<ScheduleDefaults>,
    /// audiocraft format: the Hugging Face T5 directory (e.g. `t5-base`).
    #[serde(default)]
    pub t5: Option<String>,
    /// audiocraft format: the Hugging Face EnCodec directory (e.g. `encodec_32khz`).
    #[serde(default)]
    pub codec: Option<String>,
    /// `asr` models: the model that re-decodes each finished segment in two-pass recognition
    /// (another `asr` entry's name; default: the model itself).
    #[serde(default)]
    pub second_pass: Option<String>,
    /// `asr` models: beam search with an n-gram LM and joint CTC scoring (`[models.decoding]`:
    /// `beam_size`, `ngram_file`, `ngram_weight`, `decoding_ctc_weight`, `penalty`), over the
    /// model's own `decoding.yaml`; both weights 0 decode greedily.
    #[serde(default)]
    pub decoding: Option<cadenza_paraformer::DecodingConfig>,
}

/// The model families the engine can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A neural audio codec (EnCodec, Hugging Face directory format).
    Codec,
    /// Text-to-music (MusicGen, Hugging Face directory format).
    Music,
    /// Speech recognition (Paraformer, FunASR model directory).
    Asr,
}

impl ModelKind {
    /// The lowercase name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Codec => "codec",
            Self::Music => "music",
            Self::Asr => "asr",
        }
    }
}

/// Per-model schedule defaults (`[models.schedule]` of a music model). Every field is optional;
/// a request overrides them field by field.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleDefaults {
    /// `ar`, `magnet` or `hybrid`. Default: `ar` for MusicGen, `magnet` for MAGNeT.
    pub kind: Option<String>,
    /// MAGNeT iterations per codebook. Default: `[20, 10, 10, 10]` (audiocraft's `MAGNeT`
    /// defaults; one entry per codebook for other codebook counts: 20 then 10s).
    pub decoding_steps: Option<Vec<usize>>,
    /// Hybrid: seconds generated autoregressively first. Default 3.
    pub prefix_s: Option<f32>,
    /// Hybrid: the autoregressive model (registry name) that generates the prefix; it must
    /// share the codec. Needed for `hybrid`.
    pub prefix_model: Option<String>,
    /// Rescore MAGNeT's confidences by default (needs `rescore_with`). Default false.
    pub rescore: Option<bool>,
    /// The autoregressive model (registry name) used for rescoring.
    pub rescore_with: Option<String>,
    /// The rescorer's weight in (0, 1]. Default 0.3 (MAGNeT's own weight 0.7).
    pub rescore_weight: Option<f32>,
    /// MAGNeT span arrangement: `nonoverlap` (default) or `stride1`.
    pub span_arrangement: Option<String>,
    /// MAGNeT CFG coefficient at the first iteration of a stage. Default 10.
    pub max_cfg: Option<f32>,
    /// MAGNeT CFG coefficient at the last iteration of a stage. Default 1.
    pub min_cfg: Option<f32>,
    /// MAGNeT initial temperature (annealed to 0 within each stage). Default 3.
    pub temperature: Option<f32>,
    /// MAGNeT top-p. Default 0.9.
    pub top_p: Option<f32>,
}
