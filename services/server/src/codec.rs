//! `cadenza.v1.Codec`: thin handlers that convert, call the engine and convert back.

use std::pin::Pin;

use cadenza_audio::{Pcm, RawEncoding, WavFormat};
use cadenza_engine::{AudioInput, CodecEvent, Codes, Engine, EngineError, Session};
use cadenza_proto::v1 as pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{invalid, status};
use crate::request_options;

/// The codec service.
#[derive(Debug, Clone)]
pub struct CodecService {
    engine: Engine,
}

impl CodecService {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn bandwidth(kbps: f32) -> Result<Option<f32>, Status> {
    if !kbps.is_finite() || kbps < 0.0 {
        return Err(invalid(
            "bandwidth_kbps",
            format!("{kbps} is not a valid bandwidth"),
        ));
    }
    Ok((kbps > 0.0).then_some(kbps))
}

pub(crate) fn raw_encoding(e: pb::Encoding, field: &str) -> Result<RawEncoding, Status> {
    match e {
        pb::Encoding::PcmS16le => Ok(RawEncoding::S16Le),
        pb::Encoding::PcmF32le => Ok(RawEncoding::F32Le),
        other => Err(invalid(
            field,
            format!(
                "{} is not a raw PCM encoding (use PCM_S16LE or PCM_F32LE)",
                other.as_str_name()
            ),
        )),
    }
}

pub(crate) fn audio_input(
    audio: Vec<u8>,
    format: Option<pb::AudioFormat>,
    limits: &cadenza_audio::Limits,
) -> Result<AudioInput, Status> {
    let format = format.unwrap_or_default();
    match format.encoding() {
        pb::Encoding::File | pb::Encoding::Wav | pb::Encoding::Unspecified => {
            Ok(AudioInput::File(audio))
        }
        e => {
            limits
                .check_sample_rate(format.sample_rate_hz)
                .map_err(|err| status(EngineError::audio("format.sample_rate_hz", err)))?;
            limits
                .check_channels(format.channels as usize)
                .map_err(|err| status(EngineError::audio("format.channels", err)))?;
            let channels = u16::try_from(format.channels).map_err(|_| {
                invalid(
                    "format.channels",
                    format!("{} channels is absurd", format.channels),
                )
            })?;
            Ok(AudioInput::Raw {
                bytes: audio,
                encoding: raw_encoding(e, "format.encoding")?,
                sample_rate: format.sample_rate_hz,
                channels,
            })
        }
    }
}

pub(crate) fn codes_from_pb(c: pb::Codes) -> Codes {
    Codes {
        num_codebooks: c.num_codebooks as usize,
        frames: c.frames as usize,
        codes: c.codes,
    }
}

pub(crate) fn codes_to_pb(c: &Codes) -> pb::Codes {
    pb::Codes {
        num_codebooks: c.num_codebooks as u32,
        frames: c.frames as u32,
        codes: c.codes.clone(),
    }
}

/// Appends `next` to `acc` along the frame axis.
fn append_codes(acc: &mut Option<Codes>, next: Codes) -> Result<(), Status> {
    match acc {
        None => *acc = Some(next),
        Some(a) => {
            if a.num_codebooks != next.num_codebooks {
                return Err(status(EngineError::Internal(
                    "codebook count changed mid-encode".into(),
                )));
            }
            let (q, fa, fb) = (a.num_codebooks, a.frames, next.frames);
            let mut codes = Vec::with_capacity(q * (fa + fb));
            for row in 0..q {
                codes.extend_from_slice(&a.codes[row * fa..(row + 1) * fa]);
                codes.extend_from_slice(&next.codes[row * fb..(row + 1) * fb]);
            }
            a.frames += fb;
            a.codes = codes;
        }
    }
    Ok(())
}

/// Output audio bytes in the requested encoding.
fn encode_audio(pcm: &Pcm, enc: pb::Encoding) -> Result<(Vec<u8>, pb::AudioFormat), Status> {
    let (bytes, enc) = match enc {
        pb::Encoding::Wav | pb::Encoding::Unspecified => (
            cadenza_audio::encode_wav(pcm, WavFormat::I16)
                .map_err(|e| status(EngineError::Internal(e.to_string())))?,
            pb::Encoding::Wav,
        ),
        pb::Encoding::PcmS16le => (
            cadenza_audio::to_s16le(&pcm.samples),
            pb::Encoding::PcmS16le,
        ),
        pb::Encoding::PcmF32le => (
            cadenza_audio::to_f32le(&pcm.samples),
            pb::Encoding::PcmF32le,
        ),
        pb::Encoding::File => {
            return Err(invalid(
                "output_encoding",
                "FILE is an input encoding; use WAV, PCM_S16LE or PCM_F32LE",
            ));
        }
    };
    Ok((
        bytes,
        pb::AudioFormat {
            encoding: enc as i32,
            sample_rate_hz: pcm.sample_rate,
            channels: pcm.channels as u32,
        },
    ))
}

fn raw_output(enc: pb::Encoding) -> Result<pb::Encoding, Status> {
    match enc {
        pb::Encoding::Unspecified | pb::Encoding::PcmF32le => Ok(pb::Encoding::PcmF32le),
        pb::Encoding::PcmS16le => Ok(pb::Encoding::PcmS16le),
        other => Err(invalid(
            "config.output_encoding",
            format!(
                "{} cannot be streamed; use PCM_S16LE or PCM_F32LE",
                other.as_str_name()
            ),
        )),
    }
}

/// Forwards a session's events to a gRPC stream; a failed send means the client left, and
/// dropping the session's receiver cancels the work.
fn forward<T: Send + 'static>(
    mut session: Session<CodecEvent>,
    mut convert: impl FnMut(CodecEvent) -> Result<Option<T>, Status> + Send + 'static,
) -> BoxStream<T> {
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(4);
    tokio::spawn(async move {
        while let Some(ev) = session.events.recv().await {
            let item = match ev {
                Ok(ev) => match convert(ev) {
                    Ok(None) => continue,
                    Ok(Some(item)) => Ok(item),
                    Err(st) => Err(st),
                },
                Err(e) => Err(status(e)),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// The first message of a client stream, which must exist (it carries the config).
pub(crate) async fn first_message<M>(inbound: &mut Streaming<M>) -> Result<M, Status> {
    inbound
        .message()
        .await?
        .ok_or_else(|| invalid("config", "the stream ended before its first message"))
}

/// Feeds a client stream into a session: `first` (from the config message), then every message's
/// payload, then a clean end. A client error, a cancelled stream or a protocol violation (`Err`
/// from `payload`) drops the input instead, which cancels the session.
fn pump<M: Send + 'static, T: Send + 'static>(
    mut inbound: Streaming<M>,
    input: cadenza_engine::SessionInput<T>,
    first: Option<T>,
    payload: impl Fn(M) -> Result<Option<T>, ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Some(x) = first
            && input.send(x).await.is_err()
        {
            return;
        }
        while let Some(msg) = inbound.next().await {
            let Ok(Ok(item)) = msg.map(&payload) else {
                return;
            };
            if let Some(x) = item
                && input.send(x).await.is_err()
            {
                return;
            }
        }
        let _ = input.end().await;
    });
}

#[tonic::async_trait]
impl pb::codec_server::Codec for CodecService {
    async fn encode(
        &self,
        request: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        let opts = request_options(&request)?;
        let req = request.into_inner();
        let opts = request_options_meta(opts, req.meta.as_ref());
        let model = req.model.map(|m| m.name).unwrap_or_default();
        let info = self.engine.codec_info(&model).map_err(status)?;
        let input = audio_input(req.audio, req.format, &self.engine.audio_limits())?;
        let mut session = self
            .engine
            .encode(&model, input, bandwidth(req.bandwidth_kbps)?, opts)
            .map_err(status)?;
        let mut codes = None;
        let mut scales = Vec::new();
        let mut resp = pb::EncodeResponse {
            model: info.name.clone(),
            sample_rate_hz: info.sample_rate,
            ..Default::default()
        };
        while let Some(ev) = session.events.recv().await {
            match ev.map_err(status)? {
                CodecEvent::Codes { codes: c, scale } => {
                    append_codes(&mut codes, c)?;
                    scales.extend(scale);
                }
                CodecEvent::Encoded {
                    num_samples,
                    bandwidth_kbps,
                    ..
                } => {
                    resp.num_samples = num_samples;
                    resp.bandwidth_kbps = bandwidth_kbps;
                }
                _ => {}
            }
        }
        let codes = codes
            .ok_or_else(|| status(EngineError::Internal("encoding produced no codes".into())))?;
        resp.codes = Some(codes_to_pb(&codes));
        resp.scales = scales;
        Ok(Response::new(resp))
    }

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let opts = request_options(&request)?;
        let req = request.into_inner();
        let opts = request_options_meta(opts, req.meta.as_ref());
        let out_enc = req.output_encoding();
        let model = req.model.map(|m| m.name).unwrap_or_default();
        let codes = req.codes.ok_or_else(|| invalid("codes", "missing"))?;
        encode_audio(
            &Pcm {
                sample_rate: 8000,
                channels: 1,
                samples: vec![],
            },
            out_enc,
        )?; // validate early
        let trim = (req.num_samples > 0).then_some(req.num_samples);
        let mut session = self
            .engine
            .decode(&model, codes_from_pb(codes), req.scales, trim, opts)
            .map_err(status)?;
        let mut pcm: Option<Pcm> = None;
        while let Some(ev) = session.events.recv().await {
            if let CodecEvent::Audio { pcm: p, .. } = ev.map_err(status)? {
                match &mut pcm {
                    None => pcm = Some(p),
                    Some(acc) => acc.samples.extend_from_slice(&p.samples),
                }
            }
        }
        let pcm =
            pcm.ok_or_else(|| status(EngineError::Internal("decoding produced no audio".into())))?;
        let (audio, format) = encode_audio(&pcm, out_enc)?;
        Ok(Response::new(pb::DecodeResponse {
            audio,
            format: Some(format),
            num_samples: pcm.frames() as u64,
        }))
    }

    type StreamEncodeStream = BoxStream<pb::EncodeChunk>;

    async fn stream_encode(
        &self,
        request: Request<Streaming<pb::StreamEncodeRequest>>,
    ) -> Result<Response<Self::StreamEncodeStream>, Status> {
        let opts = request_options(&request)?;
        let mut inbound = request.into_inner();
        let first = first_message(&mut inbound).await?;
        let cfg = first
            .config
            .ok_or_else(|| invalid("config", "the first message must carry the config"))?;
        let opts = request_options_meta(opts, cfg.meta.as_ref());
        let model = cfg.model.map(|m| m.name).unwrap_or_default();
        let format = cfg
            .format
            .ok_or_else(|| invalid("config.format", "missing (raw PCM format of the stream)"))?;
        let enc = raw_encoding(format.encoding(), "config.format.encoding")?;
        let channels = u16::try_from(format.channels).map_err(|_| {
            invalid(
                "config.format.channels",
                format!("{} channels is absurd", format.channels),
            )
        })?;
        let bw = bandwidth(cfg.bandwidth_kbps)?;
        let info = self.engine.codec_info(&model).map_err(status)?;
        let (input, session) = self
            .engine
            .stream_encode(&model, enc, format.sample_rate_hz, channels, bw, opts)
            .map_err(status)?;
        let first_audio = first.audio;
        let first_audio = (!first_audio.is_empty()).then_some(first_audio);
        pump(inbound, input, first_audio, |m: pb::StreamEncodeRequest| {
            // Only the first message may configure; a second config is a client bug.
            if m.config.is_some() {
                Err(())
            } else {
                Ok((!m.audio.is_empty()).then_some(m.audio))
            }
        });
        let (name, rate) = (info.name, info.sample_rate);
        Ok(Response::new(forward(session, move |ev| {
            Ok(match ev {
                CodecEvent::Codes { codes, scale } => Some(pb::EncodeChunk {
                    event: Some(pb::encode_chunk::Event::Codes(codes_to_pb(&codes))),
                    scale: scale.unwrap_or(0.0),
                }),
                CodecEvent::Encoded {
                    num_samples,
                    bandwidth_kbps,
                    ..
                } => Some(pb::EncodeChunk {
                    event: Some(pb::encode_chunk::Event::Done(pb::EncodeResponse {
                        codes: None,
                        scales: vec![],
                        num_samples,
                        sample_rate_hz: rate,
                        bandwidth_kbps,
                        model: name.clone(),
                    })),
                    scale: 0.0,
                }),
                _ => None,
            })
        })))
    }

    type StreamDecodeStream = BoxStream<pb::DecodeChunk>;

    async fn stream_decode(
        &self,
        request: Request<Streaming<pb::StreamDecodeRequest>>,
    ) -> Result<Response<Self::StreamDecodeStream>, Status> {
        let opts = request_options(&request)?;
        let mut inbound = request.into_inner();
        let first = first_message(&mut inbound).await?;
        let cfg = first
            .config
            .ok_or_else(|| invalid("config", "the first message must carry the config"))?;
        let opts = request_options_meta(opts, cfg.meta.as_ref());
        let out = raw_output(cfg.output_encoding())?;
        let model = cfg.model.map(|m| m.name).unwrap_or_default();
        let (input, session) = self.engine.stream_decode(&model, opts).map_err(status)?;
        let first_codes = first.codes;
        pump(
            inbound,
            input,
            first_codes.map(codes_from_pb),
            |m: pb::StreamDecodeRequest| {
                if m.config.is_some() {
                    Err(())
                } else {
                    Ok(m.codes.map(codes_from_pb))
                }
            },
        );
        Ok(Response::new(forward(session, move |ev| match ev {
            CodecEvent::Audio { start_sample, pcm } => {
                let (audio, format) = encode_audio(&pcm, out)?;
                Ok(Some(pb::DecodeChunk {
                    audio,
                    format: Some(format),
                    start_sample,
                }))
            }
            _ => Ok(None),
        })))
    }
}

/// Applies `RequestMeta.deadline_ms` on top of the gRPC deadline (the earlier wins), and
/// `RequestMeta.priority` over the `cadenza-priority` header (`REALTIME` is for live streams;
/// for other requests it counts as `INTERACTIVE`).
pub(crate) fn request_options_meta(
    mut opts: cadenza_engine::RequestOptions,
    meta: Option<&pb::RequestMeta>,
) -> cadenza_engine::RequestOptions {
    use cadenza_engine::Priority;
    match meta.map(|m| m.priority()) {
        Some(pb::Priority::Batch) => opts.priority = Priority::Batch,
        Some(pb::Priority::Realtime | pb::Priority::Interactive) => {
            opts.priority = Priority::Interactive
        }
        _ => {}
    }
    if let Some(m) = meta
        && m.deadline_ms > 0
    {
        let d = std::time::Instant::now() + std::time::Duration::from_millis(m.deadline_ms);
        opts.deadline = Some(opts.deadline.map_or(d, |o| o.min(d)));
    }
    opts
}
