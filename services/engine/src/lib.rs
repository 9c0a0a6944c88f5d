//! Cadenza's engine: the model registry and the workers that run every request.
//!
//! The path of a request is `server (gRPC) → Engine → worker → model`. [`Engine`] validates
//! what it can up front (model names, bandwidths, code shapes: those fail at once with
//! [`EngineError::InvalidArgument`]), admits the request to a worker (or refuses it at once with
//! [`EngineError::Overloaded`] and the queue length), and hands back a [`Session`]: a bounded
//! channel of events. Dropping the session's receiver cancels the work within one step.
//!
//! Workers are OS threads, never the async runtime's; see [`worker`]. This crate knows nothing of
//! gRPC or protobuf.

pub mod codec;
pub mod config;
pub mod error;
pub mod music;
pub mod registry;
mod session;
pub mod worker;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cadenza_audio::{Limits, RawEncoding};
use candle_core::Device;
use tokio::sync::mpsc;

pub use codec::{AudioInput, CodecEvent, Codes, StreamInput};
pub use config::{EngineConfig, ModelEntry, ModelKind, ModelSource};
pub use error::EngineError;
pub use music::{Continuation, MusicEvent, MusicRequest};
pub use registry::{ModelInfo, Registry};
pub use worker::{Admitted, WorkerHandle};

/// Events buffered per session before the worker holds further output (backpressure).
const SESSION_CHANNEL: usize = 16;

/// A running request: its admission and its events. Drop `events` to cancel.
#[derive(Debug)]
pub struct Session<T> {
    /// Queue position at admission.
    pub admitted: Admitted,
    /// Events, ending with a final event or an error.
    pub events: Events<T>,
}

/// Where a session's terminal error is left for its receiver (see [`Events::recv`]).
#[derive(Debug, Clone, Default)]
pub struct TerminalSlot(Arc<std::sync::Mutex<Option<EngineError>>>);

impl TerminalSlot {
    /// Records the error that ends the session (the first one wins).
    pub fn set(&self, err: EngineError) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(err);
    }

    fn take(&self) -> Option<EngineError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The receiving end of a session: every event sent, then the terminal error if there is one.
#[derive(Debug)]
pub struct Events<T> {
    rx: mpsc::Receiver<Result<T, EngineError>>,
    terminal: TerminalSlot,
}

impl<T> Events<T> {
    fn channel(cap: usize) -> (mpsc::Sender<Result<T, EngineError>>, TerminalSlot, Self) {
        let (tx, rx) = mpsc::channel(cap);
        let terminal = TerminalSlot::default();
        (tx, terminal.clone(), Self { rx, terminal })
    }

    /// The next event; `None` once the session is over.
    pub async fn recv(&mut self) -> Option<Result<T, EngineError>> {
        match self.rx.recv().await {
            Some(ev) => Some(ev),
            None => self.terminal.take().map(Err),
        }
    }
}

/// The input side of a streaming session. Dropping it without [`SessionInput::end`] cancels
/// the session (the client went away).
#[derive(Debug)]
pub struct SessionInput<T> {
    tx: Option<mpsc::Sender<StreamInput<T>>>,
    waker: worker::Waker,
}

impl<T> SessionInput<T> {
    /// Sends more input, waiting while the session's input buffer is full.
    pub async fn send(&self, item: T) -> Result<(), EngineError> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| EngineError::invalid("stream", "input already ended"))?;
        tx.send(StreamInput::Data(item))
            .await
            .map_err(|_| EngineError::Cancelled("the session has ended".into()))?;
        self.waker.wake();
        Ok(())
    }

    /// Marks the clean end of input.
    pub async fn end(mut self) -> Result<(), EngineError> {
        if let Some(tx) = self.tx.take() {
            tx.send(StreamInput::End)
                .await
                .map_err(|_| EngineError::Cancelled("the session has ended".into()))?;
        }
        self.waker.wake();
        Ok(())
    }
}

impl<T> Drop for SessionInput<T> {
    fn drop(&mut self) {
        self.tx = None;
        self.waker.wake();
    }
}

/// Per-request options common to every call.
#[derive(Debug, Clone, Default)]
pub struct RequestOptions {
    /// Work stops with `DeadlineExceeded` once this passes.
    pub deadline: Option<Instant>,
}

/// The engine: loaded models and the worker pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    worker: WorkerHandle,
    cfg: EngineConfig,
}

impl Engine {
    /// Loads the models and starts the workers. `base` resolves relative model paths.
    pub fn start(
        cfg: EngineConfig,
        models: &[ModelEntry],
        base: Option<&Path>,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let registry = Registry::load(models, base, &Device::Cpu)?;
        let worker = WorkerHandle::spawn(
            "cpu",
            cfg.max_active,
            cfg.max_queue,
            Duration::from_millis(cfg.slow_consumer_timeout_ms),
        )
        .map_err(|e| format!("starting the CPU worker: {e}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                worker,
                cfg,
            }),
        })
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Every loaded model.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner.registry.infos()
    }

    /// Sessions admitted and not finished.
    pub fn load(&self) -> usize {
        self.inner.worker.load()
    }

    /// Input limits for untrusted audio.
    pub fn audio_limits(&self) -> Limits {
        Limits {
            max_seconds: self.inner.cfg.max_audio_seconds,
            max_bytes: self.inner.cfg.max_input_bytes,
            ..Limits::default()
        }
    }

    /// Description of a codec model (by name; empty = the default codec).
    pub fn codec_info(&self, model: &str) -> Result<ModelInfo, EngineError> {
        Ok(self.inner.registry.codec(model)?.info.clone())
    }

    /// Makes a session's output channel, builds its task on it and admits it to the worker.
    fn spawn<E, T>(
        &self,
        task: impl FnOnce(session::Output<E>) -> Result<T, EngineError>,
    ) -> Result<Session<E>, EngineError>
    where
        T: worker::Task + 'static,
    {
        let (tx, slot, rx) = Events::channel(SESSION_CHANNEL);
        let admitted = self.inner.worker.submit(Box::new(task((tx, slot))?))?;
        Ok(Session {
            admitted,
            events: rx,
        })
    }

    /// The input side of a streaming session, waking the worker on every send.
    fn input<T>(&self, tx: mpsc::Sender<StreamInput<T>>) -> SessionInput<T> {
        SessionInput {
            tx: Some(tx),
            waker: self.inner.worker.waker(),
        }
    }

    /// Encodes a whole input to codes. Events: `Codes` (one per step, or per chunk with its
    /// scale for chunked models), `Progress`, then `Encoded`.
    pub fn encode(
        &self,
        model: &str,
        audio: AudioInput,
        bandwidth: Option<f32>,
        opts: RequestOptions,
    ) -> Result<Session<CodecEvent>, EngineError> {
        let m = self.inner.registry.codec(model)?;
        if let AudioInput::File(b) | AudioInput::Raw { bytes: b, .. } = &audio {
            self.audio_limits()
                .check_bytes(b.len())
                .map_err(|e| EngineError::audio("audio", e))?;
            if b.is_empty() {
                return Err(EngineError::invalid("audio", "no audio bytes were sent"));
            }
        }
        let (limits, step) = (self.audio_limits(), self.inner.cfg.codec_step_seconds);
        self.spawn(|out| {
            codec::EncodeTask::new(m, audio, bandwidth, limits, step, out, opts.deadline)
        })
    }

    /// Decodes codes to audio. `scales`: one per chunk for normalising models, else empty.
    /// `trim`: cut the output to this many samples. Events: `Audio`, `Progress`, then `Decoded`.
    pub fn decode(
        &self,
        model: &str,
        codes: Codes,
        scales: Vec<f32>,
        trim: Option<u64>,
        opts: RequestOptions,
    ) -> Result<Session<CodecEvent>, EngineError> {
        let m = self.inner.registry.codec(model)?;
        if codes.frames > self.inner.cfg.max_code_frames {
            return Err(EngineError::TooLarge {
                what: "codes".into(),
                detail: format!(
                    "{} frames, the limit is {}",
                    codes.frames, self.inner.cfg.max_code_frames
                ),
            });
        }
        let step = self.inner.cfg.codec_step_seconds;
        self.spawn(|out| codec::DecodeTask::new(m, codes, scales, trim, step, out, opts.deadline))
    }

    /// Streams raw PCM in, codes out (non-chunked models).
    pub fn stream_encode(
        &self,
        model: &str,
        encoding: RawEncoding,
        sample_rate: u32,
        channels: u16,
        bandwidth: Option<f32>,
        opts: RequestOptions,
    ) -> Result<(SessionInput<Vec<u8>>, Session<CodecEvent>), EngineError> {
        let m = self.inner.registry.codec(model)?;
        let (in_tx, in_rx) = mpsc::channel(8);
        let limits = self.audio_limits();
        let session = self.spawn(|out| {
            codec::StreamEncodeTask::new(
                m,
                encoding,
                sample_rate,
                channels,
                bandwidth,
                &limits,
                in_rx,
                out,
                opts.deadline,
            )
        })?;
        Ok((self.input(in_tx), session))
    }

    /// Streams codes in, audio out (non-chunked models).
    pub fn stream_decode(
        &self,
        model: &str,
        opts: RequestOptions,
    ) -> Result<(SessionInput<Codes>, Session<CodecEvent>), EngineError> {
        let m = self.inner.registry.codec(model)?;
        let (in_tx, in_rx) = mpsc::channel(8);
        let max_frames = self.inner.cfg.max_code_frames;
        let session = self
            .spawn(|out| codec::StreamDecodeTask::new(m, max_frames, in_rx, out, opts.deadline))?;
        Ok((self.input(in_tx), session))
    }

    /// Description of a music model (by name; empty = the default).
    pub fn music_info(&self, model: &str) -> Result<ModelInfo, EngineError> {
        Ok(self.inner.registry.music(model)?.info.clone())
    }

    /// Starts text-to-music generation. Validates every parameter first (errors name the
    /// field). Events: `Audio` chunks as frames complete, `Progress`, optionally `Tokens`,
    /// then `Done`.
    pub fn generate_music(
        &self,
        mut req: MusicRequest,
        opts: RequestOptions,
    ) -> Result<Session<MusicEvent>, EngineError> {
        let m = self.inner.registry.music(&req.model)?;
        let lm = &m.model.lm;
        // top-k 0 = MusicGen's default of 250, capped by the vocabulary.
        if req.sampling.top_k == 0 {
            req.sampling.top_k = 250.min(lm.card());
        }
        if req.prompt.trim().is_empty() {
            return Err(EngineError::invalid("prompt", "the prompt is empty"));
        }
        if req.prompt.len() > 2000 {
            return Err(EngineError::invalid(
                "prompt",
                format!("{} bytes; the limit is 2000", req.prompt.len()),
            ));
        }
        // The model's own limit (`generation_config.json` `max_length`: BOS + frames + delays)
        // and the server's, whichever is lower.
        let model_max_s = (m
            .model
            .defaults
            .max_length
            .saturating_sub(1 + m.model.pattern.max_delay())) as f64
            / m.model.frame_rate();
        let max_s = self.inner.cfg.max_music_seconds.min(model_max_s);
        if !req.duration_s.is_finite() || req.duration_s <= 0.0 || req.duration_s as f64 > max_s {
            return Err(EngineError::invalid(
                "duration_s",
                format!("{} s is outside (0, {max_s}]", req.duration_s),
            ));
        }
        req.sampling
            .validate()
            .map_err(|(f, r)| EngineError::invalid(format!("sampling.{f}"), r))?;
        if req.sampling.top_k > lm.card() {
            return Err(EngineError::invalid(
                "sampling.top_k",
                format!(
                    "{} exceeds the vocabulary ({})",
                    req.sampling.top_k,
                    lm.card()
                ),
            ));
        }
        let guidance = req.guidance.unwrap_or(m.model.defaults.guidance_scale);
        if !guidance.is_finite() || !(1.0..=100.0).contains(&guidance) {
            return Err(EngineError::invalid(
                "guidance",
                format!("{guidance} is outside [1, 100] (0 = model default, 1 = no CFG)"),
            ));
        }
        if let Some(0) = req.chunk_frames {
            return Err(EngineError::invalid("chunk_ms", "must be positive"));
        }
        if let Some(Continuation::Codes(c)) = &req.continuation
            && c.frames > (max_s * m.model.frame_rate()) as usize
        {
            return Err(EngineError::TooLarge {
                what: "continuation_codes".into(),
                detail: format!("{} frames", c.frames),
            });
        }
        let frames = ((req.duration_s as f64) * m.model.frame_rate())
            .round()
            .max(1.0) as usize;
        let seed = req.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ 0x5DEE_CE66_D1CE_4E5B
        });
        let limits = Limits {
            max_seconds: max_s,
            ..self.audio_limits()
        };
        self.spawn(|out| {
            Ok(music::MusicTask::new(
                m,
                req,
                frames,
                guidance,
                seed,
                limits,
                out,
                opts.deadline,
            ))
        })
    }

    /// Stops the workers; running sessions end with `Unavailable`.
    pub fn shutdown(&self) {
        self.inner.worker.shutdown();
    }
}
