//! Speech recognition sessions: audio in (streamed raw PCM or a whole file), segmented into
//! utterances by an energy voice-activity rule ([`Segmenter`]), recognised with Paraformer.
//!
//! While a segment is open its audio feeds a [`StreamingRecognizer`]. For a chunked streaming
//! model (FunASR `ParaformerStreaming`, e.g. `paraformer-zh-streaming`) it runs the reference's
//! chunked inference with the request's `chunk_size` (`[0, 10, 5]` by default) and yields one
//! interim hypothesis per chunk (tokens of all chunks so far); for an offline model it re-decodes
//! the segment so far every `chunk` encoder frames (600 ms by default). At each endpoint the
//! segment's final hypothesis is, in two-pass mode, the configured offline model's recognition
//! of the segment (`second_pass` of the online model, or `offline_model`); otherwise the
//! streaming model's flush (chunked model) or `Paraformer::recognize` of the segment (offline
//! model). Either way the final text does not depend on how the input was cut into messages, and
//! the unary path (which runs this same task over a decoded file) gives the same segments and
//! texts as a stream of the same audio.
//!
//! Sessions step alone: the Paraformer API decodes one utterance per call, so no
//! [`BatchKey`](crate::scheduler::BatchKey) is offered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cadenza_audio::{Limits, RawEncoding, StreamResampler};
use cadenza_paraformer::{ChunkConfig, StreamingRecognizer, Transcript};
use tokio::sync::mpsc;

use crate::codec::{AudioInput, StreamInput};
use crate::error::EngineError;
use crate::registry::AsrModel;
use crate::session::{Base, Meta, Output, Stepper};

/// Energy endpointing settings (see [`Segmenter`]). `Default` gives the server defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpointing {
    /// Silence (ms) after speech that ends a segment.
    pub trailing_silence_ms: u32,
    /// A segment longer than this (ms) is cut at the next frame.
    pub max_utterance_ms: u32,
    /// Frames quieter than this (dBFS) are silence, whatever the noise floor.
    pub energy_threshold_db: f32,
    /// Frames must also be this many dB above the adaptive noise floor to count as speech.
    pub floor_margin_db: f32,
    /// Speech (ms, consecutive) needed to open a segment; shorter blips are ignored.
    pub min_speech_ms: u32,
    /// Audio (ms) kept before the first speech frame of a segment.
    pub pre_roll_ms: u32,
    /// No automatic endpoints: one segment from the first sample, ended only by flush, end of
    /// input or `max_utterance_ms`.
    pub disabled: bool,
}

impl Default for Endpointing {
    fn default() -> Self {
        Self {
            trailing_silence_ms: 800,
            max_utterance_ms: 20_000,
            energy_threshold_db: -45.0,
            floor_margin_db: 10.0,
            min_speech_ms: 100,
            pre_roll_ms: 200,
            disabled: false,
        }
    }
}

impl Endpointing {
    fn validate(&self) -> Result<(), EngineError> {
        let bad = |f: &str, r: &str| Err(EngineError::invalid(format!("endpointing.{f}"), r));
        if self.trailing_silence_ms > 60_000 {
            return bad("trailing_silence_ms", "must be at most 60000 ms");
        }
        if self.max_utterance_ms < 1000 {
            return bad("max_utterance_ms", "must be at least 1000 ms");
        }
        if !self.energy_threshold_db.is_finite() || self.energy_threshold_db > 0.0 {
            return bad("energy_threshold_db", "must be a negative dBFS value");
        }
        Ok(())
    }
}

/// Why a segment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Trailing silence.
    Silence,
    /// The segment reached `max_utterance_ms`.
    MaxUtterance,
    /// A client flush.
    Flush,
    /// The end of the input.
    EndOfInput,
}

impl EndReason {
    /// The API's name of the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Silence => "silence",
            Self::MaxUtterance => "max_utterance",
            Self::Flush => "flush",
            Self::EndOfInput => "end_of_input",
        }
    }
}

/// What the segmenter decided about the samples it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum SegEvent {
    /// A segment opens at this sample (absolute index; includes the pre-roll).
    Start(u64),
    /// Samples of the open segment, in order.
    Audio(Vec<f32>),
    /// The open segment ends before this sample.
    End(u64, EndReason),
}

/// Energy voice-activity segmentation on 10 ms frames of mono audio.
///
/// The rule: a frame is speech when its RMS level (dBFS) is above `energy_threshold_db` *and*
/// at least `floor_margin_db` above an adaptive noise floor. The floor follows quieter frames at
/// once, rises towards non-speech frames with a ~200 ms time constant and towards speech frames
/// with a ~10 s one (so a long utterance does not become "noise"). `min_speech_ms` of
/// consecutive speech opens a segment, starting `pre_roll_ms` before the first speech frame;
/// `trailing_silence_ms` of consecutive non-speech frames closes it (the silence stays in the
/// segment), as does `max_utterance_ms`. Decisions depend only on the sample values and their
/// positions, never on how the input was chunked.
#[derive(Debug, Clone)]
pub struct Segmenter {
    cfg: Endpointing,
    rate: u32,
    frame_len: usize,
    floor_db: f32,
    /// Samples not yet making up a whole frame.
    carry: Vec<f32>,
    /// Recent samples while no segment is open (pre-roll plus the current speech run).
    idle: VecDeque<f32>,
    /// Absolute index of `idle[0]`.
    idle_start: u64,
    /// Absolute index of the first sample of `carry` (all before it are classified).
    pos: u64,
    /// Consecutive speech frames while idle.
    speech_run: u64,
    /// The open segment: (start sample, consecutive non-speech frames).
    open: Option<(u64, u64)>,
}

impl Segmenter {
    /// A segmenter for mono audio at `rate` Hz.
    pub fn new(cfg: Endpointing, rate: u32) -> Self {
        let frame_len = (rate as usize / 100).max(1);
        Self {
            floor_db: cfg.energy_threshold_db - cfg.floor_margin_db,
            cfg,
            rate,
            frame_len,
            carry: Vec::new(),
            idle: VecDeque::new(),
            idle_start: 0,
            pos: 0,
            speech_run: 0,
            open: None,
        }
    }

    fn frames_of(&self, ms: u32) -> u64 {
        (ms as u64).div_ceil(10)
    }

    /// Classifies the new samples; returns what happened, in order.
    pub fn push(&mut self, samples: &[f32]) -> Vec<SegEvent> {
        let mut out = Vec::new();
        self.carry.extend_from_slice(samples);
        let n = self.carry.len() / self.frame_len * self.frame_len;
        let carry = std::mem::take(&mut self.carry);
        for f in carry[..n].chunks_exact(self.frame_len) {
            self.frame(f, &mut out);
        }
        self.carry = carry[n..].to_vec();
        out
    }

    /// Ends the open segment (if any) with `reason`, including samples short of a frame.
    pub fn finish(&mut self, reason: EndReason) -> Vec<SegEvent> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.carry);
        if !rest.is_empty() {
            if self.open.is_none() && self.cfg.disabled {
                self.open = Some((self.pos, 0));
                out.push(SegEvent::Start(self.pos));
            }
            self.pos += rest.len() as u64;
            if self.open.is_some() {
                audio(&mut out, &rest);
            }
        }
        if self.open.take().is_some() {
            out.push(SegEvent::End(self.pos, reason));
        }
        self.idle.clear();
        self.idle_start = self.pos;
        self.speech_run = 0;
        out
    }

    fn frame(&mut self, f: &[f32], out: &mut Vec<SegEvent>) {
        let end = self.pos + f.len() as u64;
        let db = rms_db(f);
        let speech = self.cfg.disabled
            || (db > self.cfg.energy_threshold_db && db > self.floor_db + self.cfg.floor_margin_db);
        // 10 ms frames: 0.05 ≈ 200 ms time constant, 0.001 ≈ 10 s.
        self.floor_db = if db < self.floor_db {
            db.max(-120.0)
        } else if speech {
            self.floor_db + 0.001 * (db - self.floor_db)
        } else {
            self.floor_db + 0.05 * (db - self.floor_db)
        };
        match self.open {
            None => {
                self.idle.extend(f);
                self.speech_run = if speech { self.speech_run + 1 } else { 0 };
                let need = self.frames_of(self.cfg.min_speech_ms).max(1);
                if self.speech_run >= need {
                    let first = end - self.speech_run * self.frame_len as u64;
                    let pre = self.cfg.pre_roll_ms as u64 * self.rate as u64 / 1000;
                    let start = first.saturating_sub(pre).max(self.idle_start);
                    out.push(SegEvent::Start(start));
                    let skip = (start - self.idle_start) as usize;
                    let seg: Vec<f32> = self.idle.iter().skip(skip).copied().collect();
                    audio(out, &seg);
                    self.idle.clear();
                    self.idle_start = end;
                    self.speech_run = 0;
                    self.open = Some((start, 0));
                } else {
                    let keep =
                        (self.frames_of(self.cfg.pre_roll_ms) + need) as usize * self.frame_len;
                    while self.idle.len() > keep {
                        self.idle.pop_front();
                        self.idle_start += 1;
                    }
                }
            }
            Some((start, silence)) => {
                audio(out, f);
                let silence = if speech { 0 } else { silence + 1 };
                let len_ms = (end - start) * 1000 / self.rate as u64;
                let reason = if !self.cfg.disabled
                    && silence >= self.frames_of(self.cfg.trailing_silence_ms).max(1)
                {
                    Some(EndReason::Silence)
                } else if len_ms >= self.cfg.max_utterance_ms as u64 {
                    Some(EndReason::MaxUtterance)
                } else {
                    None
                };
                match reason {
                    Some(r) => {
                        out.push(SegEvent::End(end, r));
                        self.open = None;
                        self.idle_start = end;
                    }
                    None => self.open = Some((start, silence)),
                }
            }
        }
        self.pos = end;
    }
}

/// Appends samples to the last `Audio` event, or adds one.
fn audio(out: &mut Vec<SegEvent>, s: &[f32]) {
    if s.is_empty() {
        return;
    }
    if let Some(SegEvent::Audio(a)) = out.last_mut() {
        a.extend_from_slice(s);
    } else {
        out.push(SegEvent::Audio(s.to_vec()));
    }
}

/// RMS level of a frame in dBFS (a full-scale square wave is 0 dB).
fn rms_db(f: &[f32]) -> f32 {
    let ms = f.iter().map(|x| x * x).sum::<f32>() / f.len().max(1) as f32;
    10.0 * (ms + 1e-12).log10()
}

/// What a recognition request asks for.
#[derive(Debug, Clone, Default)]
pub struct AsrConfig {
    /// The (online) model; empty = the first `asr` model.
    pub model: String,
    /// Language code; empty = the model's default.
    pub language: String,
    /// Send interim hypotheses while a segment is spoken (streams).
    pub interim_results: bool,
    /// Re-decode each finished segment with the offline model.
    pub two_pass: bool,
    /// The offline model of `two_pass`; empty = the online model's `second_pass`, else itself.
    pub offline_model: String,
    /// `[look-back, chunk, look-ahead]` in 60 ms encoder frames, or empty. Only `chunk` is
    /// used: interim hypotheses come every `chunk` frames of new audio.
    pub chunk_size: Vec<u32>,
    /// Per-token timings in final hypotheses.
    pub timestamps: bool,
    /// Segmentation.
    pub endpointing: Endpointing,
}

/// Raw PCM format of a recognition stream.
#[derive(Debug, Clone, Copy)]
pub struct RawFormat {
    /// Sample encoding.
    pub encoding: RawEncoding,
    /// Rate in Hz.
    pub sample_rate: u32,
    /// Interleaved channels (downmixed to mono).
    pub channels: u16,
}

/// Client input of a recognition stream.
#[derive(Debug, Clone)]
pub enum AsrInput {
    /// Raw PCM in the stream's format.
    Audio(Vec<u8>),
    /// End the current segment now and answer `Flushed` with this marker.
    Flush(u64),
}

/// Which pass produced a hypothesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The streaming recogniser (interim results, and finals without two-pass).
    Online,
    /// The offline model's re-decoding of a finished segment.
    OfflineCorrection,
}

/// A token with its time on the input timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Word {
    /// Token text.
    pub text: String,
    /// Start, seconds from the first input sample.
    pub start_s: f32,
    /// End, seconds.
    pub end_s: f32,
}

/// The current text of one segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// 0-based segment index.
    pub segment: u32,
    /// 0-based revision within the segment.
    pub revision: u32,
    /// Which pass made it.
    pub pass: Pass,
    /// The segment's last hypothesis.
    pub is_final: bool,
    /// Fraction of this hypothesis' tokens unchanged (same token at the same position) since
    /// the previous hypothesis of the segment; 0 for the first, 1 when final.
    pub stability: f32,
    /// Text.
    pub text: String,
    /// Token ids (blank/sos/eos removed).
    pub token_ids: Vec<u32>,
    /// Token timings (finals with `timestamps`).
    pub words: Vec<Word>,
    /// Segment start, seconds.
    pub start_s: f32,
    /// Segment end, seconds (0 until final).
    pub end_s: f32,
    /// Input seconds decoded when this was made.
    pub audio_processed_s: f32,
}

/// Events of a recognition session.
#[derive(Debug, Clone, PartialEq)]
pub enum AsrEvent {
    /// An interim or final hypothesis.
    Hypothesis(Hypothesis),
    /// A segment ended; its final hypothesis follows.
    Endpoint {
        /// Segment index.
        segment: u32,
        /// Start, seconds.
        start_s: f32,
        /// End, seconds.
        end_s: f32,
        /// Why it ended.
        reason: EndReason,
    },
    /// Everything before a client flush marker has been answered.
    Flushed(u64),
    /// Last event of a successful session.
    Done {
        /// The (online) model's name.
        model: String,
        /// Segments finalised.
        segments: u32,
        /// Seconds of input audio.
        audio_seconds: f64,
        /// Seconds spent in the session's steps.
        compute_seconds: f64,
    },
}

/// Validates a request against its model and resolves the two-pass model.
pub(crate) fn resolve(
    reg: &crate::registry::Registry,
    cfg: &mut AsrConfig,
) -> Result<(Arc<AsrModel>, Option<Arc<AsrModel>>), EngineError> {
    let m = reg.asr(&cfg.model)?;
    let lang = cfg.language.to_ascii_lowercase();
    if !(lang.is_empty() || lang.starts_with("zh") || lang.starts_with("en")) {
        return Err(EngineError::invalid(
            "config.language",
            format!(
                "'{}' is not supported by '{}' (zh, en)",
                cfg.language, m.info.name
            ),
        ));
    }
    if !cfg.chunk_size.is_empty() && (cfg.chunk_size.len() != 3 || cfg.chunk_size[1] == 0) {
        return Err(EngineError::invalid(
            "config.chunk_size",
            "need exactly 3 entries [look-back, chunk, look-ahead] with chunk >= 1",
        ));
    }
    cfg.endpointing.validate()?;
    let offline = if cfg.two_pass {
        let name = if !cfg.offline_model.is_empty() {
            cfg.offline_model.clone()
        } else {
            m.second_pass.clone().unwrap_or_else(|| m.info.name.clone())
        };
        let o = reg.asr(&name)?;
        if o.model.sample_rate() != m.model.sample_rate() {
            return Err(EngineError::invalid(
                "config.offline_model",
                format!("'{name}' runs at a different sample rate"),
            ));
        }
        Some(o)
    } else {
        None
    };
    Ok((m, offline))
}

/// Where a session's audio comes from.
enum Source {
    Stream {
        rx: mpsc::Receiver<StreamInput<AsrInput>>,
        format: RawFormat,
    },
    Whole {
        audio: Option<AudioInput>,
        /// Model-rate mono samples not yet segmented.
        pending: VecDeque<f32>,
    },
}

/// The open segment.
struct Open {
    index: u32,
    start: u64,
    revision: u32,
    prev: Vec<u32>,
    samples: Vec<f32>,
}

/// One recognition session (streamed or whole-file).
pub(crate) struct AsrTask {
    base: Base<AsrEvent>,
    model: Arc<AsrModel>,
    offline: Option<Arc<AsrModel>>,
    cfg: AsrConfig,
    source: Source,
    resampler: Option<StreamResampler>,
    seg: Segmenter,
    rec: StreamingRecognizer,
    partial_every: usize,
    open: Option<Open>,
    segments: u32,
    /// Input frames received (at the input rate).
    frames_in: u64,
    /// Model-rate samples segmented.
    samples: u64,
    bytes_in: usize,
    limits: Limits,
    /// Time spent in finished steps.
    compute: Duration,
    /// Start of the step now running (its time is not in `compute` yet).
    step_started: Option<Instant>,
}

/// Model-rate samples one whole-file step segments.
const WHOLE_STEP_SECONDS: usize = 2;

impl AsrTask {
    fn new(
        model: Arc<AsrModel>,
        offline: Option<Arc<AsrModel>>,
        cfg: AsrConfig,
        source: Source,
        limits: Limits,
        out: Output<AsrEvent>,
        meta: Meta,
    ) -> Result<Self, EngineError> {
        let rate = model.model.sample_rate();
        let resampler = match &source {
            Source::Stream { format, .. } => {
                limits
                    .check_sample_rate(format.sample_rate)
                    .map_err(|e| EngineError::audio("config.input.sample_rate_hz", e))?;
                limits
                    .check_channels(format.channels as usize)
                    .map_err(|e| EngineError::audio("config.input.channels", e))?;
                Some(
                    StreamResampler::new(format.sample_rate, rate, 1)
                        .map_err(|e| EngineError::audio("config.input.sample_rate_hz", e))?,
                )
            }
            Source::Whole { .. } => None,
        };
        let partial_every = if cfg.interim_results {
            cfg.chunk_size.get(1).map_or(10, |&c| c as usize)
        } else {
            // No interim results: the recogniser only accumulates features.
            1 << 40
        };
        let seg = Segmenter::new(cfg.endpointing.clone(), rate);
        let rec = recognizer(&model, &cfg, partial_every)?;
        Ok(Self {
            base: Base::new(format!("asr:{}", model.info.name), out, meta),
            model,
            offline,
            cfg,
            source,
            resampler,
            seg,
            rec,
            partial_every,
            open: None,
            segments: 0,
            frames_in: 0,
            samples: 0,
            bytes_in: 0,
            limits,
            compute: Duration::ZERO,
            step_started: None,
        })
    }

    fn rate(&self) -> u32 {
        self.model.model.sample_rate()
    }

    fn secs(&self, sample: u64) -> f32 {
        (sample as f64 / self.rate() as f64) as f32
    }

    fn decode_whole(&mut self) -> Result<(), EngineError> {
        let Source::Whole { audio, pending } = &mut self.source else {
            return Ok(());
        };
        let Some(audio) = audio.take() else {
            return Ok(());
        };
        let pcm = match audio {
            AudioInput::File(b) => cadenza_audio::decode(&b, &self.limits),
            AudioInput::Raw {
                bytes,
                encoding,
                sample_rate,
                channels,
            } => cadenza_audio::decode_raw(&bytes, encoding, sample_rate, channels, &self.limits),
            AudioInput::Pcm(p) => Ok(p),
        }
        .map_err(|e| EngineError::audio("audio", e))?;
        self.limits
            .check_frames(pcm.frames() as u64, pcm.sample_rate)
            .map_err(|e| EngineError::audio("audio", e))?;
        if pcm.frames() == 0 {
            return Err(EngineError::invalid(
                "audio",
                "the recording holds no samples",
            ));
        }
        self.frames_in = pcm.frames() as u64;
        let rate = self.model.model.sample_rate();
        let mut rs = StreamResampler::new(pcm.sample_rate, rate, 1)
            .map_err(|e| EngineError::audio("audio", e))?;
        let mono = pcm.to_mono();
        let mut s = rs.push(&mono).map_err(|e| EngineError::audio("audio", e))?;
        s.extend(rs.finish().map_err(|e| EngineError::audio("audio", e))?);
        pending.extend(s);
        let secs = pcm.duration_secs();
        self.base
            .meta
            .metrics
            .audio_seconds(&self.model.info.name, "in", secs);
        Ok(())
    }

    /// One step: `Some(done)`, or `None` while waiting for stream input.
    fn work(&mut self) -> Result<Option<bool>, EngineError> {
        let arrived = Instant::now();
        let (samples, end, flush) = match &mut self.source {
            Source::Whole { audio, .. } if audio.is_some() => {
                self.decode_whole()?;
                return Ok(Some(false));
            }
            Source::Whole { pending, .. } => {
                let n = pending
                    .len()
                    .min(WHOLE_STEP_SECONDS * self.model.model.sample_rate() as usize);
                let s: Vec<f32> = pending.drain(..n).collect();
                let end = pending.is_empty();
                (s, end, None)
            }
            Source::Stream { rx, format } => {
                let format = *format;
                match rx.try_recv() {
                    Ok(StreamInput::Data(AsrInput::Audio(bytes))) => {
                        (self.stream_audio(&bytes, format)?, false, None)
                    }
                    Ok(StreamInput::Data(AsrInput::Flush(id))) => (Vec::new(), false, Some(id)),
                    Ok(StreamInput::End) => {
                        if self.frames_in == 0 {
                            return Err(EngineError::invalid(
                                "audio",
                                "the stream ended without any audio",
                            ));
                        }
                        let tail = match &mut self.resampler {
                            Some(r) => r.finish().map_err(|e| EngineError::audio("audio", e))?,
                            None => Vec::new(),
                        };
                        (tail, true, None)
                    }
                    Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Err(EngineError::Cancelled(
                            "the client stream ended without finishing".into(),
                        ));
                    }
                }
            }
        };
        self.samples += samples.len() as u64;
        let mut events = self.seg.push(&samples);
        if end {
            events.extend(self.seg.finish(EndReason::EndOfInput));
        } else if flush.is_some() {
            events.extend(self.seg.finish(EndReason::Flush));
        }
        self.handle(events, arrived)?;
        if let Some(id) = flush {
            self.base.out.push(AsrEvent::Flushed(id));
        }
        if end {
            self.base.out.push(AsrEvent::Done {
                model: self.model.info.name.clone(),
                segments: self.segments,
                audio_seconds: self.frames_in as f64 / self.input_rate() as f64,
                // this last step too: it ran the final recognition (for a short file, all)
                compute_seconds: (self.compute
                    + self.step_started.map_or(Duration::ZERO, |t| t.elapsed()))
                .as_secs_f64(),
            });
        }
        Ok(Some(end))
    }

    fn input_rate(&self) -> u32 {
        match &self.source {
            Source::Stream { format, .. } => format.sample_rate,
            Source::Whole { .. } => self.rate(),
        }
        .max(1)
    }

    /// Decodes, limits, downmixes and resamples one chunk of streamed PCM.
    fn stream_audio(&mut self, bytes: &[u8], f: RawFormat) -> Result<Vec<f32>, EngineError> {
        self.bytes_in += bytes.len();
        if self.bytes_in > self.limits.max_bytes {
            return Err(EngineError::TooLarge {
                what: "audio stream".into(),
                detail: format!(
                    "more than {} bytes (engine.max_input_bytes)",
                    self.limits.max_bytes
                ),
            });
        }
        let pcm = cadenza_audio::decode_raw(
            bytes,
            f.encoding,
            f.sample_rate,
            f.channels,
            &Limits {
                max_seconds: f64::MAX,
                ..self.limits.clone()
            },
        )
        .map_err(|e| EngineError::audio("audio", e))?;
        self.frames_in += pcm.frames() as u64;
        let secs = self.frames_in as f64 / f.sample_rate as f64;
        if secs > self.limits.max_seconds {
            return Err(EngineError::TooLarge {
                what: "audio stream".into(),
                detail: format!(
                    "more than {} s of audio (engine.max_audio_seconds); end the stream and \
                     start a new one",
                    self.limits.max_seconds
                ),
            });
        }
        self.base.meta.metrics.audio_seconds(
            &self.model.info.name,
            "in",
            pcm.frames() as f64 / f.sample_rate as f64,
        );
        let mono = pcm.to_mono();
        match &mut self.resampler {
            Some(r) => r.push(&mono).map_err(|e| EngineError::audio("audio", e)),
            None => Ok(mono),
        }
    }

    fn handle(&mut self, events: Vec<SegEvent>, arrived: Instant) -> Result<(), EngineError> {
        for ev in events {
            match ev {
                SegEvent::Start(start) => {
                    self.open = Some(Open {
                        index: self.segments,
                        start,
                        revision: 0,
                        prev: Vec::new(),
                        samples: Vec::new(),
                    });
                    self.rec = recognizer(&self.model, &self.cfg, self.partial_every)?;
                }
                SegEvent::Audio(a) => {
                    let partials = self.rec.push(&a).map_err(model_err)?;
                    let Some(open) = &mut self.open else {
                        continue;
                    };
                    open.samples.extend_from_slice(&a);
                    if !self.cfg.interim_results {
                        continue;
                    }
                    if self.rec.is_chunked() {
                        // Chunked model: every chunk's partial (a push may complete several).
                        for p in partials {
                            self.partial(p.transcript, arrived);
                        }
                    } else if let Some(p) = partials.into_iter().last() {
                        self.partial(p.transcript, arrived);
                    }
                }
                SegEvent::End(end, reason) => self.finalize(end, reason, arrived)?,
            }
        }
        Ok(())
    }

    fn partial(&mut self, t: Transcript, arrived: Instant) {
        let processed = self.secs(self.samples);
        let Some(open) = &mut self.open else {
            return;
        };
        let same = open
            .prev
            .iter()
            .zip(&t.token_ids)
            .take_while(|(a, b)| a == b)
            .count();
        let stability = if t.token_ids.is_empty() {
            0.0
        } else {
            same as f32 / t.token_ids.len() as f32
        };
        let h = Hypothesis {
            segment: open.index,
            revision: open.revision,
            pass: Pass::Online,
            is_final: false,
            stability,
            text: t.text,
            token_ids: t.token_ids.clone(),
            words: Vec::new(),
            start_s: (open.start as f64 / self.model.model.sample_rate() as f64) as f32,
            end_s: 0.0,
            audio_processed_s: processed,
        };
        open.prev = t.token_ids;
        open.revision += 1;
        self.emit(h, "partial", arrived);
    }

    fn finalize(
        &mut self,
        end: u64,
        reason: EndReason,
        arrived: Instant,
    ) -> Result<(), EngineError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let (start_s, end_s) = (self.secs(open.start), self.secs(end));
        self.base.out.push(AsrEvent::Endpoint {
            segment: open.index,
            start_s,
            end_s,
            reason,
        });
        let (t, pass) = match &self.offline {
            Some(o) => (
                o.model.recognize(&open.samples).map_err(model_err)?,
                Pass::OfflineCorrection,
            ),
            // The chunked model's flush: the same result as recognising the segment whole, and
            // it honours the request's chunk_size; no second pass over the audio.
            None if self.rec.is_chunked() => (
                self.rec.finish().map_err(model_err)?.transcript,
                Pass::Online,
            ),
            None => (
                self.model
                    .model
                    .recognize(&open.samples)
                    .map_err(model_err)?,
                Pass::Online,
            ),
        };
        let words = if self.cfg.timestamps {
            t.tokens
                .iter()
                .zip(&t.timestamps)
                .map(|(w, [a, b])| Word {
                    text: w.clone(),
                    start_s: start_s + *a as f32 / 1000.0,
                    end_s: start_s + *b as f32 / 1000.0,
                })
                .collect()
        } else {
            Vec::new()
        };
        let h = Hypothesis {
            segment: open.index,
            revision: open.revision,
            pass,
            is_final: true,
            stability: 1.0,
            text: t.text,
            token_ids: t.token_ids,
            words,
            start_s,
            end_s,
            audio_processed_s: self.secs(self.samples),
        };
        self.segments += 1;
        self.emit(h, "final", arrived);
        Ok(())
    }

    fn emit(&mut self, h: Hypothesis, pass: &str, arrived: Instant) {
        self.base.chunk_sent("hypothesis");
        self.base.meta.metrics.partial_latency(
            &self.model.info.name,
            pass,
            arrived.elapsed().as_secs_f64(),
        );
        self.base.out.push(AsrEvent::Hypothesis(h));
    }
}

/// A streaming recogniser for a segment: chunked inference with the request's `chunk_size` for a
/// streaming model (look-backs as [`ChunkConfig::default`]), re-decoding every `partial_every`
/// frames for an offline one.
fn recognizer(
    model: &AsrModel,
    cfg: &AsrConfig,
    partial_every: usize,
) -> Result<StreamingRecognizer, EngineError> {
    let rec = model.model.streaming().with_partial_every(partial_every);
    if !rec.is_chunked() || cfg.chunk_size.len() != 3 {
        return Ok(rec);
    }
    let c = &cfg.chunk_size;
    let chunk = ChunkConfig {
        chunk_size: [c[0] as usize, c[1] as usize, c[2] as usize],
        ..ChunkConfig::default()
    };
    rec.with_chunk_config(chunk)
        .map_err(|e| EngineError::invalid("config.chunk_size", e.to_string()))
}

fn model_err(e: cadenza_paraformer::ParaformerError) -> EngineError {
    EngineError::Internal(format!("paraformer: {e}"))
}

impl Stepper for AsrTask {
    type Event = AsrEvent;
    fn base(&self) -> &Base<AsrEvent> {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base<AsrEvent> {
        &mut self.base
    }
    fn run(&mut self) -> Result<Option<bool>, EngineError> {
        let t = Instant::now();
        self.step_started = Some(t);
        let r = self.work();
        self.compute += t.elapsed();
        self.step_started = None;
        r
    }
}

/// A streaming session's task.
#[allow(clippy::too_many_arguments)]
pub(crate) fn stream_task(
    model: Arc<AsrModel>,
    offline: Option<Arc<AsrModel>>,
    cfg: AsrConfig,
    format: RawFormat,
    rx: mpsc::Receiver<StreamInput<AsrInput>>,
    limits: Limits,
    out: Output<AsrEvent>,
    meta: Meta,
) -> Result<AsrTask, EngineError> {
    AsrTask::new(
        model,
        offline,
        cfg,
        Source::Stream { rx, format },
        limits,
        out,
        meta,
    )
}

/// A whole-recording task.
pub(crate) fn whole_task(
    model: Arc<AsrModel>,
    offline: Option<Arc<AsrModel>>,
    cfg: AsrConfig,
    audio: AudioInput,
    limits: Limits,
    out: Output<AsrEvent>,
    meta: Meta,
) -> Result<AsrTask, EngineError> {
    AsrTask::new(
        model,
        offline,
        cfg,
        Source::Whole {
            audio: Some(audio),
            pending: VecDeque::new(),
        },
        limits,
        out,
        meta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| amp * (i as f32 * 2.0 * std::f32::consts::PI * 220.0 / 16000.0).sin())
            .collect()
    }

    fn run(seg: &mut Segmenter, audio: &[f32], chunk: usize) -> Vec<SegEvent> {
        let mut ev = Vec::new();
        for c in audio.chunks(chunk) {
            ev.extend(seg.push(c));
        }
        ev.extend(seg.finish(EndReason::EndOfInput));
        // Merge adjacent audio for comparison.
        let mut out: Vec<SegEvent> = Vec::new();
        for e in ev {
            match (out.last_mut(), e) {
                (Some(SegEvent::Audio(a)), SegEvent::Audio(b)) => a.extend(b),
                (_, e) => out.push(e),
            }
        }
        out
    }

    fn bounds(ev: &[SegEvent]) -> Vec<(u64, u64, EndReason)> {
        let mut v = Vec::new();
        let mut start = None;
        for e in ev {
            match e {
                SegEvent::Start(s) => start = Some(*s),
                SegEvent::End(e, r) => v.push((start.take().unwrap(), *e, *r)),
                SegEvent::Audio(_) => assert!(start.is_some(), "audio outside a segment"),
            }
        }
        v
    }

    #[test]
    fn speech_silence_speech_is_two_segments() {
        // 0.5 s silence, 1 s tone, 1.2 s near-silence, 1 s tone, 0.3 s silence.
        let mut a = vec![0.0; 8000];
        a.extend(tone(16000, 0.3));
        a.extend(vec![1e-4; 19200]);
        a.extend(tone(16000, 0.3));
        a.extend(vec![0.0; 4800]);
        let cfg = Endpointing::default();
        let ev = run(&mut Segmenter::new(cfg.clone(), 16000), &a, 1600);
        let b = bounds(&ev);
        assert_eq!(b.len(), 2, "{b:?}");
        // First: starts 200 ms pre-roll before the tone at 0.5 s, ends 800 ms after it.
        assert_eq!(b[0].0, 8000 - 3200);
        assert_eq!(b[0].2, EndReason::Silence);
        assert_eq!(b[0].1, 24000 + 12800);
        // Second: starts at the second tone minus pre-roll, ends at the end of input.
        assert_eq!(b[1].0, 43200 - 3200);
        assert_eq!(b[1].2, EndReason::EndOfInput);
        assert_eq!(b[1].1, a.len() as u64);
        // The audio of each segment is exactly the input between its bounds.
        let audios: Vec<&Vec<f32>> = ev
            .iter()
            .filter_map(|e| match e {
                SegEvent::Audio(x) => Some(x),
                _ => None,
            })
            .collect();
        assert_eq!(audios[0][..], a[b[0].0 as usize..b[0].1 as usize]);
        assert_eq!(audios[1][..], a[b[1].0 as usize..b[1].1 as usize]);
        // Chunking does not change the decisions.
        for chunk in [1, 77, 160, 16000] {
            let ev2 = run(&mut Segmenter::new(cfg.clone(), 16000), &a, chunk);
            assert_eq!(ev2, ev, "chunk {chunk}");
        }
    }

    #[test]
    fn blips_and_silence_make_no_segment() {
        let mut a = vec![0.0; 16000];
        a.extend(tone(800, 0.3)); // 50 ms < min_speech_ms
        a.extend(vec![0.0; 16000]);
        let ev = run(&mut Segmenter::new(Endpointing::default(), 16000), &a, 1000);
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn disabled_is_one_segment_of_everything() {
        let mut a = vec![0.0; 8000];
        a.extend(tone(8005, 0.3));
        let cfg = Endpointing {
            disabled: true,
            ..Endpointing::default()
        };
        let ev = run(&mut Segmenter::new(cfg, 16000), &a, 333);
        assert_eq!(
            bounds(&ev),
            vec![(0, a.len() as u64, EndReason::EndOfInput)]
        );
        assert_eq!(ev[1], SegEvent::Audio(a.clone()));
    }

    #[test]
    fn long_speech_is_cut_at_max_utterance() {
        let a = tone(16000 * 3, 0.3);
        let cfg = Endpointing {
            max_utterance_ms: 1000,
            ..Endpointing::default()
        };
        let b = bounds(&run(&mut Segmenter::new(cfg, 16000), &a, 4000));
        assert!(b.len() >= 3, "{b:?}");
        assert_eq!(b[0].2, EndReason::MaxUtterance);
        assert_eq!(b[0].1 - b[0].0, 16000);
    }
}
