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

pub mod asr;
pub mod codec;
pub mod config;
pub mod error;
pub mod metrics;
pub mod music;
pub mod registry;
pub mod scheduler;
mod session;
pub mod worker;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cadenza_audio::{Limits, RawEncoding};
use candle_core::Device;
use tokio::sync::mpsc;

pub use asr::{
    AsrConfig, AsrEvent, AsrInput, EndReason, Endpointing, Hypothesis, Pass, RawFormat, Word,
};
pub use codec::{AudioInput, CodecEvent, Codes, StreamInput};
pub use config::{
    EngineConfig, ModelEntry, ModelKind, ModelSource, ScheduleDefaults, WorkerConfig,
};
pub use error::EngineError;
pub use metrics::Metrics;
pub use music::{
    Continuation, MusicEvent, MusicRequest, RescoreRequest, ScheduleKind, ScheduleRequest,
};
pub use registry::{ModelInfo, MusicBackend, MusicModel, Registry};
pub use scheduler::Priority;
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
    /// Work stops with `DeadlineExceeded` once this passes; a request whose steps cannot
    /// finish before it (at the measured step time) is refused at admission.
    pub deadline: Option<Instant>,
    /// Scheduling priority (default: interactive).
    pub priority: Priority,
}

/// The engine: loaded models and the worker pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    workers: Vec<WorkerHandle>,
    metrics: Arc<Metrics>,
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
        let metrics = Arc::new(Metrics::default());
        let workers = cfg
            .worker_list()
            .iter()
            .map(|w| {
                WorkerHandle::spawn(
                    &w.name,
                    cfg.policy(),
                    Duration::from_millis(cfg.slow_consumer_timeout_ms),
                    metrics.clone(),
                )
                .map_err(|e| format!("starting worker '{}': {e}", w.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                workers,
                metrics,
                cfg,
            }),
        })
    }

    /// The engine's metrics (rendered by the server at `/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Runs every loaded model once through the workers (a short generation, a codec round
    /// trip), so the first real request does not pay for first-touch allocations and the
    /// step-time estimates used for deadlines exist. Returns how long it took.
    pub async fn warmup(&self) -> Result<Duration, EngineError> {
        let t = Instant::now();
        for info in self.models() {
            let opts = RequestOptions::default();
            match info.kind {
                ModelKind::Music => {
                    let req = MusicRequest {
                        model: info.name.clone(),
                        prompt: "warm-up".into(),
                        duration_s: 0.1,
                        // top-k 0: the model's default, capped by its vocabulary.
                        sampling: cadenza_nn::sampling::SamplingParams {
                            top_k: 0,
                            ..Default::default()
                        },
                        guidance: None,
                        seed: Some(0),
                        continuation: None,
                        chunk_frames: None,
                        return_tokens: false,
                        // Hybrid defaults need more than 0.1 s: warm the MAGNeT path alone.
                        schedule: ScheduleRequest {
                            kind: (info.architecture == "magnet").then_some(ScheduleKind::Magnet),
                            ..Default::default()
                        },
                    };
                    let mut s = self.generate_music(req, opts)?;
                    while let Some(ev) = s.events.recv().await {
                        ev?;
                    }
                }
                ModelKind::Codec => {
                    let rate = info.sample_rate;
                    let samples = vec![0f32; (rate / 10) as usize * info.channels as usize];
                    let bytes = cadenza_audio::to_s16le(&samples);
                    let audio = AudioInput::Raw {
                        bytes,
                        encoding: RawEncoding::S16Le,
                        sample_rate: rate,
                        channels: info.channels,
                    };
                    let mut s = self.encode(&info.name, audio, None, opts)?;
                    while let Some(ev) = s.events.recv().await {
                        ev?;
                    }
                }
                ModelKind::Asr => {
                    let rate = info.sample_rate;
                    let cfg = AsrConfig {
                        model: info.name.clone(),
                        endpointing: Endpointing {
                            disabled: true,
                            ..Endpointing::default()
                        },
                        ..AsrConfig::default()
                    };
                    let pcm = cadenza_audio::Pcm::new(rate, 1, vec![0.01; rate as usize / 2])
                        .map_err(|e| EngineError::Internal(e.to_string()))?;
                    let mut s = self.recognize(cfg, AudioInput::Pcm(pcm), opts)?;
                    while let Some(ev) = s.events.recv().await {
                        ev?;
                    }
                }
            }
        }
        Ok(t.elapsed())
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Every loaded model.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner.registry.infos()
    }

    /// Sessions admitted and not finished (all workers).
    pub fn load(&self) -> usize {
        self.inner.workers.iter().map(WorkerHandle::load).sum()
    }

    /// Sessions waiting for a slot (all workers).
    pub fn queued(&self) -> usize {
        self.inner.workers.iter().map(WorkerHandle::queued).sum()
    }

    /// Slots and queue places in all (for load balancing across processes).
    pub fn capacity(&self) -> usize {
        self.inner.workers.len() * (self.inner.cfg.max_active + self.inner.cfg.max_queue)
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

    /// Makes a session's output channel, builds its task on it and admits it to the least
    /// loaded worker. Returns the session and the worker's waker (for its input side).
    fn spawn<E, T>(
        &self,
        model: &str,
        kind: &'static str,
        opts: &RequestOptions,
        task: impl FnOnce(session::Output<E>, session::Meta) -> Result<T, EngineError>,
    ) -> Result<(Session<E>, worker::Waker), EngineError>
    where
        T: worker::Task + 'static,
    {
        let w = self
            .inner
            .workers
            .iter()
            .min_by_key(|w| w.load())
            .ok_or_else(|| EngineError::Unavailable("no workers".into()))?;
        let (tx, slot, rx) = Events::channel(SESSION_CHANNEL);
        let meta = session::Meta {
            model: model.to_string(),
            priority: opts.priority,
            deadline: opts.deadline,
            metrics: self.inner.metrics.clone(),
            span: tracing::info_span!("session", kind, model, worker = w.name()),
        };
        let admitted = w.submit(Box::new(task((tx, slot), meta)?))?;
        Ok((
            Session {
                admitted,
                events: rx,
            },
            w.waker(),
        ))
    }

    /// Counts a refused request by reason.
    fn counted<T>(&self, r: Result<T, EngineError>) -> Result<T, EngineError> {
        if let Err(e) = &r
            && !matches!(
                e,
                EngineError::Overloaded { .. } | EngineError::DeadlineExceeded(_)
            )
        {
            // (Overload and deadline refusals are counted where they are decided.)
            self.inner.metrics.reject(e.kind());
        }
        r
    }

    /// The input side of a streaming session, waking its worker on every send.
    fn input<T>(tx: mpsc::Sender<StreamInput<T>>, waker: worker::Waker) -> SessionInput<T> {
        SessionInput {
            tx: Some(tx),
            waker,
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
        self.counted(self.encode_impl(model, audio, bandwidth, opts))
    }

    fn encode_impl(
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
        let name = m.info.name.clone();
        self.spawn(&name, "encode", &opts, |out, meta| {
            codec::EncodeTask::new(m, audio, bandwidth, limits, step, out, meta)
        })
        .map(|(s, _)| s)
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
        self.counted(self.decode_impl(model, codes, scales, trim, opts))
    }

    fn decode_impl(
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
        let name = m.info.name.clone();
        self.spawn(&name, "decode", &opts, |out, meta| {
            codec::DecodeTask::new(m, codes, scales, trim, step, out, meta)
        })
        .map(|(s, _)| s)
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
        self.counted(self.stream_encode_impl(
            model,
            encoding,
            sample_rate,
            channels,
            bandwidth,
            opts,
        ))
    }

    fn stream_encode_impl(
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
        let name = m.info.name.clone();
        let (session, waker) = self.spawn(&name, "stream_encode", &opts, |out, meta| {
            codec::StreamEncodeTask::new(
                m,
                encoding,
                sample_rate,
                channels,
                bandwidth,
                &limits,
                in_rx,
                out,
                meta,
            )
        })?;
        Ok((Self::input(in_tx, waker), session))
    }

    /// Streams codes in, audio out (non-chunked models).
    pub fn stream_decode(
        &self,
        model: &str,
        opts: RequestOptions,
    ) -> Result<(SessionInput<Codes>, Session<CodecEvent>), EngineError> {
        self.counted(self.stream_decode_impl(model, opts))
    }

    fn stream_decode_impl(
        &self,
        model: &str,
        opts: RequestOptions,
    ) -> Result<(SessionInput<Codes>, Session<CodecEvent>), EngineError> {
        let m = self.inner.registry.codec(model)?;
        let (in_tx, in_rx) = mpsc::channel(8);
        let max_frames = self.inner.cfg.max_code_frames;
        let name = m.info.name.clone();
        let (session, waker) = self.spawn(&name, "stream_decode", &opts, |out, meta| {
            codec::StreamDecodeTask::new(m, max_frames, in_rx, out, meta)
        })?;
        Ok((Self::input(in_tx, waker), session))
    }

    /// Description of a music model (by name; empty = the default autoregressive model).
    pub fn music_info(&self, model: &str) -> Result<ModelInfo, EngineError> {
        Ok(self.inner.registry.music_for(model, None)?.info.clone())
    }

    /// Description of the music model a request would run: by name, or (empty name) the
    /// first model that runs the schedule `kind` (see [`Registry::music_for`]).
    pub fn music_info_for(
        &self,
        model: &str,
        kind: Option<ScheduleKind>,
    ) -> Result<ModelInfo, EngineError> {
        Ok(self.inner.registry.music_for(model, kind)?.info.clone())
    }

    /// Starts text-to-music generation. Validates every parameter first (errors name the
    /// field). Events: `Audio` chunks as frames complete, `Progress`, optionally `Tokens`,
    /// then `Done`.
    pub fn generate_music(
        &self,
        req: MusicRequest,
        opts: RequestOptions,
    ) -> Result<Session<MusicEvent>, EngineError> {
        self.counted(self.generate_music_impl(req, opts))
    }

    fn generate_music_impl(
        &self,
        mut req: MusicRequest,
        opts: RequestOptions,
    ) -> Result<Session<MusicEvent>, EngineError> {
        let m = self
            .inner
            .registry
            .music_for(&req.model, req.schedule.kind)?;
        if req.prompt.trim().is_empty() {
            return Err(EngineError::invalid("prompt", "the prompt is empty"));
        }
        if req.prompt.len() > 2000 {
            return Err(EngineError::invalid(
                "prompt",
                format!("{} bytes; the limit is 2000", req.prompt.len()),
            ));
        }
        if let Some(0) = req.chunk_frames {
            return Err(EngineError::invalid("chunk_ms", "must be positive"));
        }
        let fr = m.frame_rate();
        let continuation_frames = match &req.continuation {
            Some(Continuation::Codes(c)) => c.frames,
            _ => 0,
        };
        let plan = music::resolve_plan(
            &self.inner.registry,
            &m,
            &mut req,
            self.inner.cfg.max_music_seconds,
            continuation_frames,
        )?;
        let max_s = self.inner.cfg.max_music_seconds;
        if let Some(Continuation::Codes(c)) = &req.continuation
            && c.frames > (max_s * fr) as usize
        {
            return Err(EngineError::TooLarge {
                what: "continuation_codes".into(),
                detail: format!("{} frames", c.frames),
            });
        }
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
        let name = m.info.name.clone();
        self.spawn(&name, "music", &opts, |out, meta| {
            Ok(music::MusicTask::new(m, req, plan, seed, limits, out, meta))
        })
        .map(|(s, _)| s)
    }

    /// Description of a speech-recognition model (by name; empty = the default).
    pub fn asr_info(&self, model: &str) -> Result<ModelInfo, EngineError> {
        Ok(self.inner.registry.asr(model)?.info.clone())
    }

    /// Recognises a whole recording: the same segmentation and final hypotheses a stream of
    /// the same audio gets (interim results are never sent). Events: `Endpoint` and final
    /// `Hypothesis` per segment, then `Done`.
    pub fn recognize(
        &self,
        cfg: AsrConfig,
        audio: AudioInput,
        opts: RequestOptions,
    ) -> Result<Session<AsrEvent>, EngineError> {
        self.counted(self.recognize_impl(cfg, audio, opts))
    }

    fn recognize_impl(
        &self,
        mut cfg: AsrConfig,
        audio: AudioInput,
        opts: RequestOptions,
    ) -> Result<Session<AsrEvent>, EngineError> {
        let (m, offline) = asr::resolve(&self.inner.registry, &mut cfg)?;
        if let AudioInput::File(b) | AudioInput::Raw { bytes: b, .. } = &audio {
            self.audio_limits()
                .check_bytes(b.len())
                .map_err(|e| EngineError::audio("audio", e))?;
            if b.is_empty() {
                return Err(EngineError::invalid("audio", "no audio bytes were sent"));
            }
        }
        cfg.interim_results = false;
        let limits = self.audio_limits();
        let name = m.info.name.clone();
        self.spawn(&name, "recognize", &opts, |out, meta| {
            asr::whole_task(m, offline, cfg, audio, limits, out, meta)
        })
        .map(|(s, _)| s)
    }

    /// Live recognition of streamed raw PCM, at [`Priority::Live`]. Send `AsrInput`s, then
    /// [`SessionInput::end`]. Events: interim `Hypothesis` (with `interim_results`),
    /// `Endpoint` + final `Hypothesis` per segment, `Flushed` per flush, then `Done`.
    /// Streams longer than `engine.max_audio_seconds` or `engine.max_input_bytes` fail with
    /// `TooLarge`.
    pub fn recognize_stream(
        &self,
        cfg: AsrConfig,
        format: RawFormat,
        mut opts: RequestOptions,
    ) -> Result<(SessionInput<AsrInput>, Session<AsrEvent>), EngineError> {
        opts.priority = Priority::Live;
        self.counted(self.recognize_stream_impl(cfg, format, opts))
    }

    fn recognize_stream_impl(
        &self,
        mut cfg: AsrConfig,
        format: RawFormat,
        opts: RequestOptions,
    ) -> Result<(SessionInput<AsrInput>, Session<AsrEvent>), EngineError> {
        let (m, offline) = asr::resolve(&self.inner.registry, &mut cfg)?;
        let (in_tx, in_rx) = mpsc::channel(8);
        let limits = self.audio_limits();
        let name = m.info.name.clone();
        let (session, waker) = self.spawn(&name, "recognize_stream", &opts, |out, meta| {
            asr::stream_task(m, offline, cfg, format, in_rx, limits, out, meta)
        })?;
        Ok((Self::input(in_tx, waker), session))
    }

    /// Stops the workers; running sessions end with `Unavailable`.
    pub fn shutdown(&self) {
        for w in &self.inner.workers {
            w.shutdown();
        }
    }
}
