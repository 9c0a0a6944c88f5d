//! `cadenza.v1.Music`: text-to-music generation streamed as it is generated.

use std::pin::Pin;

use cadenza_audio::{Pcm, RawEncoding};
use cadenza_engine::{
    Continuation, Engine, EngineError, MusicEvent, MusicRequest, RescoreRequest, ScheduleKind,
    ScheduleRequest,
};
use cadenza_nn::sampling::SamplingParams;
use cadenza_proto::v1 as pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::codec::{codes_from_pb, codes_to_pb, request_options_meta};
use crate::error::{invalid, status};
use crate::request_options;

/// The music service.
#[derive(Debug, Clone)]
pub struct MusicService {
    engine: Engine,
}

impl MusicService {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn event(e: pb::music_event::Event) -> pb::MusicEvent {
    pb::MusicEvent { event: Some(e) }
}

fn sampling(s: Option<pb::Sampling>) -> (SamplingParams, Option<u64>) {
    let s = s.unwrap_or_default();
    (
        SamplingParams {
            // 0 = the schedule's default (1 for autoregressive stages, 3 annealed for MAGNeT);
            // the engine resolves it.
            temperature: s.temperature,
            // 0 = the model's default; the engine resolves it (top-k 250, capped by the vocabulary).
            top_k: s.top_k as usize,
            top_p: s.top_p,
            greedy: s.greedy,
        },
        (s.seed != 0).then_some(s.seed),
    )
}

fn continuation(req: &mut pb::GenerateMusicRequest) -> Result<Option<Continuation>, Status> {
    use pb::generate_music_request::Continuation as C;
    Ok(match req.continuation.take() {
        None => None,
        Some(C::ContinuationCodes(c)) => Some(Continuation::Codes(codes_from_pb(c))),
        Some(C::ContinuationAudio(a)) => {
            let f = req.continuation_format.unwrap_or_default();
            Some(Continuation::Audio(match f.encoding() {
                pb::Encoding::PcmS16le | pb::Encoding::PcmF32le => {
                    cadenza_engine::AudioInput::Raw {
                        bytes: a,
                        encoding: if f.encoding() == pb::Encoding::PcmS16le {
                            RawEncoding::S16Le
                        } else {
                            RawEncoding::F32Le
                        },
                        sample_rate: f.sample_rate_hz,
                        channels: u16::try_from(f.channels)
                            .map_err(|_| invalid("continuation_format.channels", "absurd"))?,
                    }
                }
                _ => cadenza_engine::AudioInput::File(a),
            }))
        }
    })
}

/// The proto schedule as the engine's request (zero values = model defaults).
fn schedule(s: Option<pb::Schedule>) -> Result<ScheduleRequest, Status> {
    let Some(s) = s else {
        return Ok(ScheduleRequest::default());
    };
    let kind = match pb::schedule::Kind::try_from(s.kind) {
        Ok(pb::schedule::Kind::Unspecified) => None,
        Ok(pb::schedule::Kind::Autoregressive) => Some(ScheduleKind::Ar),
        Ok(pb::schedule::Kind::Magnet) => Some(ScheduleKind::Magnet),
        Ok(pb::schedule::Kind::Hybrid) => Some(ScheduleKind::Hybrid),
        Err(_) => {
            return Err(invalid(
                "schedule.kind",
                format!("unknown schedule kind {}", s.kind),
            ));
        }
    };
    let nonzero = |x: f32| (x != 0.0).then_some(x);
    Ok(ScheduleRequest {
        kind,
        decoding_steps: (!s.decoding_steps.is_empty())
            .then(|| s.decoding_steps.iter().map(|&x| x as usize).collect()),
        prefix_s: nonzero(s.prefix_s),
        prefix_model: s.prefix_model.map(|m| m.name).filter(|n| !n.is_empty()),
        span_arrangement: (!s.span_arrangement.is_empty()).then_some(s.span_arrangement),
        max_cfg: nonzero(s.max_cfg),
        min_cfg: nonzero(s.min_cfg),
        rescore: s.rescore.map(|r| RescoreRequest {
            enabled: !r.disabled,
            model: r.model.map(|m| m.name).filter(|n| !n.is_empty()),
            weight: nonzero(r.weight),
        }),
    })
}

fn audio_bytes(pcm: &Pcm, enc: pb::Encoding) -> Vec<u8> {
    match enc {
        pb::Encoding::PcmS16le => cadenza_audio::to_s16le(&pcm.samples),
        _ => cadenza_audio::to_f32le(&pcm.samples),
    }
}

#[tonic::async_trait]
impl pb::music_server::Music for MusicService {
    type GenerateStream = BoxStream<pb::MusicEvent>;

    async fn generate(
        &self,
        request: Request<pb::GenerateMusicRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let opts = request_options(&request)?;
        let mut req = request.into_inner();
        let opts = request_options_meta(opts, req.meta.as_ref());
        let model = req.model.take().map(|m| m.name).unwrap_or_default();
        let schedule = schedule(req.schedule.take())?;
        let info = self
            .engine
            .music_info_for(&model, schedule.kind)
            .map_err(status)?;
        let out_enc = match req.output_encoding() {
            pb::Encoding::Unspecified => pb::Encoding::PcmF32le,
            e @ (pb::Encoding::PcmF32le | pb::Encoding::PcmS16le | pb::Encoding::Wav) => e,
            e => {
                return Err(invalid(
                    "output_encoding",
                    format!("{} is not an output encoding", e.as_str_name()),
                ));
            }
        };
        let (sampling, seed) = sampling(req.sampling.take());
        let chunk_frames = (req.chunk_ms > 0)
            .then(|| ((req.chunk_ms as f64 / 1000.0 * info.frame_rate).round() as usize).max(1));
        let continuation = continuation(&mut req)?;
        let session = self
            .engine
            .generate_music(
                MusicRequest {
                    model: info.name.clone(),
                    prompt: req.prompt,
                    duration_s: req.duration_s,
                    sampling,
                    guidance: (req.guidance != 0.0).then_some(req.guidance),
                    seed,
                    continuation,
                    chunk_frames,
                    return_tokens: req.return_tokens,
                    schedule,
                },
                opts,
            )
            .map_err(status)?;
        let (tx, rx) = mpsc::channel::<Result<pb::MusicEvent, Status>>(4);
        let name = info.name.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let mut events = session.events;
            let admitted = pb::Admission {
                queue_position: session.admitted.queue_position as u32,
                worker_id: "cpu".into(),
            };
            if tx
                .send(Ok(event(pb::music_event::Event::Admitted(admitted))))
                .await
                .is_err()
            {
                return;
            }
            let mut seq = 0u64;
            let mut wav: Option<Pcm> = None;
            while let Some(ev) = events.recv().await {
                let msg = match ev {
                    Err(e) => Err(status(e)),
                    Ok(MusicEvent::Progress { stage, step, total }) => {
                        Ok(event(pb::music_event::Event::Progress(pb::Progress {
                            stage: stage.into(),
                            step,
                            total,
                        })))
                    }
                    Ok(MusicEvent::Audio { start_sample, pcm }) => {
                        if out_enc == pb::Encoding::Wav {
                            match &mut wav {
                                None => wav = Some(pcm),
                                Some(w) => w.samples.extend_from_slice(&pcm.samples),
                            }
                            continue;
                        }
                        seq += 1;
                        Ok(event(pb::music_event::Event::Audio(pb::AudioChunk {
                            seq: seq - 1,
                            start_sample,
                            data: audio_bytes(&pcm, out_enc),
                            format: Some(pb::AudioFormat {
                                encoding: out_enc as i32,
                                sample_rate_hz: pcm.sample_rate,
                                channels: pcm.channels.into(),
                            }),
                            provisional: false,
                        })))
                    }
                    Ok(MusicEvent::Tokens(c)) => {
                        Ok(event(pb::music_event::Event::Tokens(codes_to_pb(&c))))
                    }
                    Ok(MusicEvent::Done {
                        seed,
                        tokens,
                        audio_seconds,
                    }) => {
                        if let Some(w) = wav.take() {
                            let data = match cadenza_audio::encode_wav(
                                &w,
                                cadenza_audio::WavFormat::I16,
                            ) {
                                Ok(d) => d,
                                Err(e) => {
                                    let _ = tx
                                        .send(Err(status(EngineError::Internal(e.to_string()))))
                                        .await;
                                    return;
                                }
                            };
                            let chunk = pb::AudioChunk {
                                seq,
                                start_sample: 0,
                                data,
                                format: Some(pb::AudioFormat {
                                    encoding: pb::Encoding::Wav as i32,
                                    sample_rate_hz: w.sample_rate,
                                    channels: w.channels.into(),
                                }),
                                provisional: false,
                            };
                            if tx
                                .send(Ok(event(pb::music_event::Event::Audio(chunk))))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Ok(event(pb::music_event::Event::Final(pb::MusicFinal {
                            seed,
                            model: name.clone(),
                            tokens,
                            audio_seconds,
                            finish_reason: "length".into(),
                            usage: Some(pb::Usage {
                                tokens,
                                audio_seconds: audio_seconds as f64,
                                compute_seconds: started.elapsed().as_secs_f64(),
                            }),
                        })))
                    }
                };
                let stop = msg.is_err();
                // A failed send means the client left: returning drops `events`, which cancels
                // the session within one step.
                if tx.send(msg).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
