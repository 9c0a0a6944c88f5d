//! Codec sessions: encode audio to codes and decode codes to audio, one bounded step at a time,
//! with the model's exact streaming encoder/decoder (so chunked work equals whole-signal work).

use std::sync::Arc;

use cadenza_audio::{Limits, Pcm, RawEncoding, StreamResampler};
use cadenza_codecs::{StreamDecoder, StreamEncoder, encodec::linear_overlap_add};
use candle_core::{DType, Device, Tensor};
use tokio::sync::mpsc;

use crate::error::EngineError;

/// Where a codec task sends its events, and where its terminal error goes.
pub(crate) type Output = crate::session::Output<CodecEvent>;
use crate::registry::CodecModel;
use crate::session::{Base, Meta, Stepper};

/// Audio given to the engine.
#[derive(Debug, Clone)]
pub enum AudioInput {
    /// A complete file in any supported container.
    File(Vec<u8>),
    /// Headerless interleaved PCM.
    Raw {
        /// The bytes.
        bytes: Vec<u8>,
        /// Sample encoding.
        encoding: RawEncoding,
        /// Rate in Hz.
        sample_rate: u32,
        /// Interleaved channels.
        channels: u16,
    },
    /// Already decoded audio.
    Pcm(Pcm),
}

/// A matrix of codes, `codes[q * frames + t]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codes {
    /// Codebooks (rows).
    pub num_codebooks: usize,
    /// Frames (columns).
    pub frames: usize,
    /// Row-major codes.
    pub codes: Vec<u32>,
}

impl Codes {
    fn to_tensor(&self) -> Result<Tensor, EngineError> {
        Ok(Tensor::from_vec(
            self.codes.clone(),
            (self.num_codebooks, self.frames),
            &Device::Cpu,
        )?)
    }

    pub(crate) fn from_tensor(t: &Tensor) -> Result<Self, EngineError> {
        let (q, f) = t.dims2()?;
        Ok(Self {
            num_codebooks: q,
            frames: f,
            codes: t.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?,
        })
    }

    /// Checks shape and range against a model.
    pub fn validate(
        &self,
        field: &str,
        max_codebooks: usize,
        codebook_size: usize,
    ) -> Result<(), EngineError> {
        if self.num_codebooks == 0 || self.frames == 0 {
            return Err(EngineError::invalid(
                field,
                "codes are empty (need at least one codebook and one frame)",
            ));
        }
        if self.num_codebooks > max_codebooks {
            return Err(EngineError::invalid(
                field,
                format!(
                    "{} codebooks given, the model has {max_codebooks}",
                    self.num_codebooks
                ),
            ));
        }
        if self.codes.len() != self.num_codebooks * self.frames {
            return Err(EngineError::invalid(
                field,
                format!(
                    "{} codes given for {} codebooks × {} frames",
                    self.codes.len(),
                    self.num_codebooks,
                    self.frames
                ),
            ));
        }
        if let Some((i, c)) = self
            .codes
            .iter()
            .enumerate()
            .find(|(_, c)| **c as usize >= codebook_size)
        {
            return Err(EngineError::invalid(
                field,
                format!("code {c} at index {i} is outside the codebook (size {codebook_size})"),
            ));
        }
        Ok(())
    }
}

/// What codec sessions send back.
#[derive(Debug, Clone, PartialEq)]
pub enum CodecEvent {
    /// Work done so far.
    Progress {
        /// Steps done.
        step: u32,
        /// Steps in all (0 when unknown, for streams).
        total: u32,
    },
    /// New frames of codes (one chunk of a chunked model, with its scale).
    Codes {
        /// The codes.
        codes: Codes,
        /// Scale of normalising models.
        scale: Option<f32>,
    },
    /// New final audio at the model's rate.
    Audio {
        /// Index (per channel) of the first sample.
        start_sample: u64,
        /// Interleaved samples.
        pcm: Pcm,
    },
    /// Encoding finished.
    Encoded {
        /// Input length in samples at the model's rate.
        num_samples: u64,
        /// Bandwidth used.
        bandwidth_kbps: f32,
        /// Codebooks used.
        num_codebooks: usize,
    },
    /// Decoding finished.
    Decoded {
        /// Samples per channel produced.
        num_samples: u64,
    },
}

/// Input of a streaming session.
#[derive(Debug)]
pub enum StreamInput<T> {
    /// More data.
    Data(T),
    /// Clean end of input.
    End,
}

pub(crate) fn audio_to_pcm(
    input: AudioInput,
    limits: &Limits,
    field: &str,
) -> Result<Pcm, EngineError> {
    match input {
        AudioInput::File(bytes) => {
            cadenza_audio::decode(&bytes, limits).map_err(|e| EngineError::audio(field, e))
        }
        AudioInput::Raw {
            bytes,
            encoding,
            sample_rate,
            channels,
        } => cadenza_audio::decode_raw(&bytes, encoding, sample_rate, channels, limits)
            .map_err(|e| EngineError::audio(field, e)),
        AudioInput::Pcm(p) => Ok(p),
    }
}

pub(crate) fn pcm_to_tensor(pcm: &Pcm) -> Result<Tensor, EngineError> {
    let c = pcm.channels as usize;
    let t = Tensor::from_vec(pcm.samples.clone(), (pcm.frames(), c), &Device::Cpu)?;
    Ok(t.t()?.contiguous()?)
}

pub(crate) fn tensor_to_pcm(t: &Tensor, sample_rate: u32) -> Result<Pcm, EngineError> {
    let (c, _n) = t.dims2()?;
    let samples = t.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Pcm::new(sample_rate, c as u16, samples)
        .map_err(|e| EngineError::Internal(format!("model produced unusable audio: {e}")))
}

enum EncodeState {
    Start(AudioInput),
    Running {
        pcm: Tensor,
        pos: usize,
        len: usize,
        enc: Option<StreamEncoder>,
    },
}

/// Encodes a whole input, `codec_step_seconds` of audio per step.
pub(crate) struct EncodeTask {
    base: Base<CodecEvent>,
    model: Arc<CodecModel>,
    bandwidth: f32,
    n_q: usize,
    limits: Limits,
    step_samples: usize,
    state: Option<EncodeState>,
    steps: u32,
}

impl EncodeTask {
    pub(crate) fn new(
        model: Arc<CodecModel>,
        input: AudioInput,
        bandwidth: Option<f32>,
        limits: Limits,
        step_seconds: f64,
        out: Output,
        meta: Meta,
    ) -> Result<Self, EngineError> {
        let (bandwidth, n_q) = resolve_bandwidth(&model, bandwidth)?;
        let cfg = model.model.config();
        let hop = cfg.hop_length();
        let step_samples = ((step_seconds * cfg.sampling_rate as f64) as usize)
            .div_ceil(hop)
            .max(1)
            * hop;
        Ok(Self {
            base: Base::new(format!("encode:{}", model.info.name), out, meta),
            model,
            bandwidth,
            n_q,
            limits,
            step_samples,
            state: Some(EncodeState::Start(input)),
            steps: 0,
        })
    }

    fn work(&mut self) -> Result<bool, EngineError> {
        let m = &self.model.model;
        let cfg = m.config();
        match self.state.take() {
            Some(EncodeState::Start(input)) => {
                let pcm = audio_to_pcm(input, &self.limits, "audio")?
                    .conform(cfg.sampling_rate, cfg.audio_channels as u16)
                    .map_err(|e| EngineError::audio("audio", e))?;
                if pcm.frames() == 0 {
                    return Err(EngineError::invalid("audio", "the audio is empty"));
                }
                let len = pcm.frames();
                let enc = if cfg.chunk_length().is_some() {
                    None
                } else {
                    Some(StreamEncoder::new(m, Some(self.bandwidth))?)
                };
                self.state = Some(EncodeState::Running {
                    pcm: pcm_to_tensor(&pcm)?,
                    pos: 0,
                    len,
                    enc,
                });
                Ok(false)
            }
            Some(EncodeState::Running {
                pcm,
                mut pos,
                len,
                mut enc,
            }) => {
                let total = self.total_steps(len);
                let done = match (&mut enc, cfg.chunk_length(), cfg.chunk_stride()) {
                    (Some(e), _, _) => {
                        let n = self.step_samples.min(len - pos);
                        let mut codes = e.push(m, &pcm.narrow(1, pos, n)?)?;
                        pos += n;
                        if pos >= len {
                            codes = Tensor::cat(&[&codes, &e.finish(m)?], 1)?;
                        }
                        if codes.dim(1)? > 0 {
                            self.base.chunk_sent("codes");
                            self.base.out.push(CodecEvent::Codes {
                                codes: Codes::from_tensor(&codes)?,
                                scale: None,
                            });
                        }
                        pos >= len
                    }
                    (None, Some(chunk), Some(stride)) => {
                        // One chunk per step, exactly as `Encodec::encode` splits them; every
                        // chunk's codes are padded to the frames of a full chunk.
                        let n = chunk.min(len - pos);
                        let (codes, scale) =
                            m.encode_frame(&pcm.narrow(1, pos, n)?.unsqueeze(0)?, self.n_q)?;
                        let full = chunk.div_ceil(cfg.hop_length());
                        let frames = codes.dim(2)?;
                        let codes = codes
                            .pad_with_zeros(2, 0, full.saturating_sub(frames))?
                            .squeeze(0)?;
                        let scale = match scale {
                            Some(s) => Some(s.to_vec1::<f32>()?[0]),
                            None => None,
                        };
                        self.base.chunk_sent("codes");
                        self.base.out.push(CodecEvent::Codes {
                            codes: Codes::from_tensor(&codes)?,
                            scale,
                        });
                        pos += stride;
                        pos >= len
                    }
                    _ => return Err(EngineError::Internal("inconsistent codec chunking".into())),
                };
                self.steps += 1;
                self.base.out.push(CodecEvent::Progress {
                    step: self.steps,
                    total,
                });
                if done {
                    self.base.out.push(CodecEvent::Encoded {
                        num_samples: len as u64,
                        bandwidth_kbps: self.bandwidth,
                        num_codebooks: self.n_q,
                    });
                } else {
                    self.state = Some(EncodeState::Running { pcm, pos, len, enc });
                }
                Ok(done)
            }
            None => Ok(true),
        }
    }

    fn total_steps(&self, len: usize) -> u32 {
        let cfg = self.model.model.config();
        match cfg.chunk_stride() {
            Some(stride) => len.div_ceil(stride) as u32,
            None => len.div_ceil(self.step_samples) as u32,
        }
    }
}

impl Stepper for EncodeTask {
    type Event = CodecEvent;
    fn base(&self) -> &Base<CodecEvent> {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base<CodecEvent> {
        &mut self.base
    }
    fn run(&mut self) -> Result<Option<bool>, EngineError> {
        self.work().map(Some)
    }
}

/// Resolves a requested bandwidth (kbps; `None` = the model's highest, as the API documents)
/// to the bandwidth used and its codebook count, or says which ones the model supports.
///
/// The library's `Encodec` keeps Hugging Face's default (`encode(bandwidth=None)` takes
/// `target_bandwidths[0]`, the lowest); the service's default is the best quality a model has,
/// which for a single-bandwidth model is the same.
pub(crate) fn resolve_bandwidth(
    model: &CodecModel,
    bandwidth: Option<f32>,
) -> Result<(f32, usize), EngineError> {
    let cfg = model.model.config();
    let bw = bandwidth.unwrap_or_else(|| {
        cfg.target_bandwidths
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    });
    let n_q = model.model.check_bandwidth(Some(bw)).map_err(|_| {
        EngineError::invalid(
            "bandwidth_kbps",
            format!(
                "{bw} kbps is not supported by '{}'; choose one of {:?}",
                model.info.name, cfg.target_bandwidths
            ),
        )
    })?;
    Ok((bw, n_q))
}

/// Frames per chunk of a chunked model (codes of every chunk are padded to this).
pub(crate) fn chunk_frames(model: &CodecModel) -> Option<usize> {
    let cfg = model.model.config();
    cfg.chunk_length().map(|c| c.div_ceil(cfg.hop_length()))
}

/// Decodes a whole code matrix, `codec_step_seconds` of frames per step.
pub(crate) struct DecodeTask {
    base: Base<CodecEvent>,
    model: Arc<CodecModel>,
    codes: Tensor,
    scales: Vec<f32>,
    trim: Option<u64>,
    pos: usize,
    step_frames: usize,
    dec: Option<StreamDecoder>,
    chunks: Vec<Tensor>,
    emitted: u64,
    steps: u32,
}

impl DecodeTask {
    pub(crate) fn new(
        model: Arc<CodecModel>,
        codes: Codes,
        scales: Vec<f32>,
        trim: Option<u64>,
        step_seconds: f64,
        out: Output,
        meta: Meta,
    ) -> Result<Self, EngineError> {
        let cfg = model.model.config();
        codes.validate("codes", cfg.num_quantizers(), cfg.codebook_size)?;
        let (dec, step_frames) = match chunk_frames(&model) {
            Some(cf) => {
                if !codes.frames.is_multiple_of(cf) {
                    return Err(EngineError::invalid(
                        "codes",
                        format!(
                            "this chunked model needs a multiple of {cf} frames (one block per chunk), got {}",
                            codes.frames
                        ),
                    ));
                }
                let n_chunks = codes.frames / cf;
                if cfg.normalize && scales.len() != n_chunks {
                    return Err(EngineError::invalid(
                        "scales",
                        format!(
                            "{n_chunks} chunks need {n_chunks} scales, got {}",
                            scales.len()
                        ),
                    ));
                }
                (None, cf)
            }
            None => {
                if !scales.is_empty() {
                    return Err(EngineError::invalid(
                        "scales",
                        "this model does not use scales",
                    ));
                }
                (
                    Some(StreamDecoder::new(&model.model)?),
                    ((step_seconds * cfg.frame_rate() as f64) as usize).max(1),
                )
            }
        };
        Ok(Self {
            base: Base::new(format!("decode:{}", model.info.name), out, meta),
            codes: codes.to_tensor()?,
            model,
            scales,
            trim,
            pos: 0,
            step_frames,
            dec,
            chunks: Vec::new(),
            emitted: 0,
            steps: 0,
        })
    }

    fn emit(&mut self, audio: &Tensor) -> Result<(), EngineError> {
        let mut audio = audio.clone();
        if let Some(limit) = self.trim {
            let keep = limit.saturating_sub(self.emitted).min(audio.dim(1)? as u64) as usize;
            audio = audio.narrow(1, 0, keep)?;
        }
        let n = audio.dim(1)?;
        if n > 0 {
            let pcm = tensor_to_pcm(&audio, self.model.model.config().sampling_rate)?;
            self.base.chunk_sent("audio");
            self.base.out.push(CodecEvent::Audio {
                start_sample: self.emitted,
                pcm,
            });
            self.emitted += n as u64;
        }
        Ok(())
    }

    fn work(&mut self) -> Result<bool, EngineError> {
        let m = &self.model.model;
        let frames = self.codes.dim(1)?;
        let n = self.step_frames.min(frames - self.pos);
        let part = self.codes.narrow(1, self.pos, n)?;
        self.pos += n;
        let done = self.pos >= frames;
        match &mut self.dec {
            Some(dec) => {
                let mut audio = dec.push(m, &part)?;
                if done {
                    audio = Tensor::cat(&[&audio, &dec.finish(m)?], 1)?;
                }
                self.emit(&audio)?;
            }
            None => {
                let i = self.chunks.len();
                let scale = match self.scales.get(i) {
                    Some(s) if m.config().normalize => Some(Tensor::new(&[*s], &Device::Cpu)?),
                    _ => None,
                };
                self.chunks
                    .push(m.decode_frame(&part.unsqueeze(0)?, scale.as_ref())?);
                if done {
                    let stride = m.config().chunk_stride().unwrap_or(1);
                    let audio = linear_overlap_add(&self.chunks, stride)?.squeeze(0)?;
                    self.emit(&audio)?;
                }
            }
        }
        self.steps += 1;
        self.base.out.push(CodecEvent::Progress {
            step: self.steps,
            total: frames.div_ceil(self.step_frames) as u32,
        });
        if done {
            self.base.out.push(CodecEvent::Decoded {
                num_samples: self.emitted,
            });
        }
        Ok(done)
    }
}

impl Stepper for DecodeTask {
    type Event = CodecEvent;
    fn base(&self) -> &Base<CodecEvent> {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base<CodecEvent> {
        &mut self.base
    }
    fn run(&mut self) -> Result<Option<bool>, EngineError> {
        self.work().map(Some)
    }
}

/// Raw PCM chunks in, codes out, for non-chunked models.
pub(crate) struct StreamEncodeTask {
    base: Base<CodecEvent>,
    model: Arc<CodecModel>,
    input: mpsc::Receiver<StreamInput<Vec<u8>>>,
    encoding: RawEncoding,
    in_rate: u32,
    in_channels: u16,
    resampler: StreamResampler,
    enc: StreamEncoder,
    samples_in: u64,
    max_samples: u64,
    n_q: usize,
    bandwidth: f32,
}

impl StreamEncodeTask {
    pub(crate) fn new(
        model: Arc<CodecModel>,
        encoding: RawEncoding,
        sample_rate: u32,
        channels: u16,
        bandwidth: Option<f32>,
        limits: &Limits,
        input: mpsc::Receiver<StreamInput<Vec<u8>>>,
        out: Output,
        meta: Meta,
    ) -> Result<Self, EngineError> {
        let cfg = model.model.config();
        if cfg.chunk_length().is_some() {
            return Err(EngineError::invalid(
                "model",
                format!(
                    "'{}' is a chunked (normalising) codec; use the unary Encode",
                    model.info.name
                ),
            ));
        }
        limits
            .check_sample_rate(sample_rate)
            .map_err(|e| EngineError::audio("format.sample_rate_hz", e))?;
        limits
            .check_channels(channels as usize)
            .map_err(|e| EngineError::audio("format.channels", e))?;
        let (bandwidth, n_q) = resolve_bandwidth(&model, bandwidth)?;
        let resampler =
            StreamResampler::new(sample_rate, cfg.sampling_rate, cfg.audio_channels as u16)
                .map_err(|e| EngineError::audio("format.sample_rate_hz", e))?;
        let enc = StreamEncoder::new(&model.model, Some(bandwidth))?;
        Ok(Self {
            base: Base::new(format!("stream-encode:{}", model.info.name), out, meta),
            max_samples: (limits.max_seconds * cfg.sampling_rate as f64) as u64,
            model,
            input,
            encoding,
            in_rate: sample_rate,
            in_channels: channels,
            resampler,
            enc,
            samples_in: 0,
            n_q,
            bandwidth,
        })
    }

    fn work(&mut self) -> Result<Option<bool>, EngineError> {
        let m = &self.model.model;
        let cfg = m.config();
        let (resampled, last) = match self.input.try_recv() {
            Ok(StreamInput::Data(bytes)) => {
                let pcm = cadenza_audio::decode_raw(
                    &bytes,
                    self.encoding,
                    self.in_rate,
                    self.in_channels,
                    &Limits {
                        max_seconds: f64::MAX,
                        ..Limits::default()
                    },
                )
                .map_err(|e| EngineError::audio("audio", e))?;
                let pcm = pcm
                    .conform(pcm.sample_rate, cfg.audio_channels as u16)
                    .map_err(|e| EngineError::audio("audio", e))?;
                (
                    self.resampler
                        .push(&pcm.samples)
                        .map_err(|e| EngineError::audio("audio", e))?,
                    false,
                )
            }
            Ok(StreamInput::End) => (
                self.resampler
                    .finish()
                    .map_err(|e| EngineError::audio("audio", e))?,
                true,
            ),
            Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                return Err(EngineError::Cancelled(
                    "the client stream ended without finishing".into(),
                ));
            }
        };
        let c = cfg.audio_channels;
        let n = resampled.len() / c;
        self.samples_in += n as u64;
        if self.samples_in > self.max_samples {
            return Err(EngineError::TooLarge {
                what: "audio stream".into(),
                detail: format!(
                    "more than {} s of audio",
                    self.max_samples / cfg.sampling_rate as u64
                ),
            });
        }
        let mut codes = if n > 0 {
            let t = Tensor::from_vec(resampled, (n, c), &Device::Cpu)?
                .t()?
                .contiguous()?;
            self.enc.push(m, &t)?
        } else {
            Tensor::zeros((self.n_q, 0), DType::U32, &Device::Cpu)?
        };
        if last {
            if self.samples_in == 0 {
                return Err(EngineError::invalid("audio", "the stream carried no audio"));
            }
            codes = Tensor::cat(&[&codes, &self.enc.finish(m)?], 1)?;
        }
        if codes.dim(1)? > 0 {
            self.base.chunk_sent("codes");
            self.base.out.push(CodecEvent::Codes {
                codes: Codes::from_tensor(&codes)?,
                scale: None,
            });
        }
        if last {
            self.base.out.push(CodecEvent::Encoded {
                num_samples: self.samples_in,
                bandwidth_kbps: self.bandwidth,
                num_codebooks: self.n_q,
            });
        }
        Ok(Some(last))
    }
}

impl Stepper for StreamEncodeTask {
    type Event = CodecEvent;
    fn base(&self) -> &Base<CodecEvent> {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base<CodecEvent> {
        &mut self.base
    }
    fn run(&mut self) -> Result<Option<bool>, EngineError> {
        self.work()
    }
}

/// Codes in, audio out, for non-chunked models.
pub(crate) struct StreamDecodeTask {
    base: Base<CodecEvent>,
    model: Arc<CodecModel>,
    input: mpsc::Receiver<StreamInput<Codes>>,
    dec: StreamDecoder,
    n_q: Option<usize>,
    frames_in: usize,
    max_frames: usize,
    emitted: u64,
}

impl StreamDecodeTask {
    pub(crate) fn new(
        model: Arc<CodecModel>,
        max_frames: usize,
        input: mpsc::Receiver<StreamInput<Codes>>,
        out: Output,
        meta: Meta,
    ) -> Result<Self, EngineError> {
        if model.model.config().chunk_length().is_some() {
            return Err(EngineError::invalid(
                "model",
                format!(
                    "'{}' is a chunked (normalising) codec; use the unary Decode",
                    model.info.name
                ),
            ));
        }
        let dec = StreamDecoder::new(&model.model)?;
        Ok(Self {
            base: Base::new(format!("stream-decode:{}", model.info.name), out, meta),
            model,
            input,
            dec,
            n_q: None,
            frames_in: 0,
            max_frames,
            emitted: 0,
        })
    }

    fn work(&mut self) -> Result<Option<bool>, EngineError> {
        let m = &self.model.model;
        let cfg = m.config();
        let (audio, last) = match self.input.try_recv() {
            Ok(StreamInput::Data(codes)) => {
                codes.validate("codes", cfg.num_quantizers(), cfg.codebook_size)?;
                match self.n_q {
                    None => self.n_q = Some(codes.num_codebooks),
                    Some(q) if q != codes.num_codebooks => {
                        return Err(EngineError::invalid(
                            "codes.num_codebooks",
                            format!("changed from {q} to {} mid-stream", codes.num_codebooks),
                        ));
                    }
                    Some(_) => {}
                }
                self.frames_in += codes.frames;
                if self.frames_in > self.max_frames {
                    return Err(EngineError::TooLarge {
                        what: "code stream".into(),
                        detail: format!("more than {} frames", self.max_frames),
                    });
                }
                (self.dec.push(m, &codes.to_tensor()?)?, false)
            }
            Ok(StreamInput::End) => {
                if self.frames_in == 0 {
                    return Err(EngineError::invalid("codes", "the stream carried no codes"));
                }
                (self.dec.finish(m)?, true)
            }
            Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                return Err(EngineError::Cancelled(
                    "the client stream ended without finishing".into(),
                ));
            }
        };
        let n = audio.dim(1)?;
        if n > 0 {
            let pcm = tensor_to_pcm(&audio, cfg.sampling_rate)?;
            self.base.chunk_sent("audio");
            self.base.out.push(CodecEvent::Audio {
                start_sample: self.emitted,
                pcm,
            });
            self.emitted += n as u64;
        }
        if last {
            self.base.out.push(CodecEvent::Decoded {
                num_samples: self.emitted,
            });
        }
        Ok(Some(last))
    }
}

impl Stepper for StreamDecodeTask {
    type Event = CodecEvent;
    fn base(&self) -> &Base<CodecEvent> {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base<CodecEvent> {
        &mut self.base
    }
    fn run(&mut self) -> Result<Option<bool>, EngineError> {
        self.work()
    }
}
