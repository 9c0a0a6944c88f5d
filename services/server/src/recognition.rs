//! `cadenza.v1.Recognition`: thin handlers that convert, call the engine and convert back.

use std::pin::Pin;

use cadenza_engine::{
    AsrConfig, AsrEvent, AsrInput, Endpointing, Engine, Hypothesis, Pass, RawFormat,
};
use cadenza_proto::v1 as pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{audio_input, raw_encoding, request_options_meta};
use crate::error::{invalid, status};
use crate::request_options;

/// The recognition service.
#[derive(Debug, Clone)]
pub struct RecognitionService {
    engine: Engine,
}

impl RecognitionService {
    /// Wraps an engine.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The engine's request from the API's config (zero fields = defaults).
fn asr_config(c: &pb::RecognitionConfig) -> AsrConfig {
    let d = Endpointing::default();
    let e = c.endpointing.unwrap_or_default();
    AsrConfig {
        model: c.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        language: c.language.clone(),
        interim_results: c.interim_results,
        two_pass: c.two_pass,
        offline_model: c
            .offline_model
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
        chunk_size: c.chunk_size.clone(),
        timestamps: c.timestamps,
        endpointing: Endpointing {
            trailing_silence_ms: if e.trailing_silence_ms > 0 {
                e.trailing_silence_ms
            } else {
                d.trailing_silence_ms
            },
            max_utterance_ms: if e.max_utterance_ms > 0 {
                e.max_utterance_ms
            } else {
                d.max_utterance_ms
            },
            energy_threshold_db: if e.energy_threshold_db != 0.0 {
                e.energy_threshold_db
            } else {
                d.energy_threshold_db
            },
            disabled: e.disabled,
            ..d
        },
    }
}

/// The one engine → wire mapping of a hypothesis (the CLI's `--local` printing goes through it too).
pub fn hypothesis_pb(h: Hypothesis) -> pb::Hypothesis {
    pb::Hypothesis {
        segment: h.segment,
        revision: h.revision,
        pass: match h.pass {
            Pass::Online => pb::hypothesis::Pass::Online,
            Pass::OfflineCorrection => pb::hypothesis::Pass::OfflineCorrection,
        } as i32,
        is_final: h.is_final,
        stability: h.stability,
        text: h.text,
        words: h
            .words
            .into_iter()
            .map(|w| pb::WordTiming {
                text: w.text,
                start_s: w.start_s,
                end_s: w.end_s,
            })
            .collect(),
        start_s: h.start_s,
        end_s: h.end_s,
        audio_processed_s: h.audio_processed_s,
    }
}

/// Joins segment texts: a space between two segments only where both sides are ASCII
/// alphanumeric (English words), none between CJK characters.
pub fn join_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for t in texts.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let spaced = out
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c.is_ascii_punctuation())
            && t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if spaced {
            out.push(' ');
        }
        out.push_str(t);
    }
    out
}

fn usage(audio_seconds: f64, compute_seconds: f64) -> pb::Usage {
    pb::Usage {
        tokens: 0,
        audio_seconds,
        compute_seconds,
    }
}

#[tonic::async_trait]
impl pb::recognition_server::Recognition for RecognitionService {
    async fn recognize(
        &self,
        request: Request<pb::RecognizeRequest>,
    ) -> Result<Response<pb::RecognizeResponse>, Status> {
        let opts = request_options(&request)?;
        let req = request.into_inner();
        let opts = request_options_meta(opts, req.meta.as_ref());
        let c = req
            .config
            .ok_or_else(|| invalid("config", "missing (model, input format)"))?;
        let input = audio_input(req.audio, c.input, &self.engine.audio_limits())?;
        let mut session = self
            .engine
            .recognize(asr_config(&c), input, opts)
            .map_err(status)?;
        let mut resp = pb::RecognizeResponse::default();
        while let Some(ev) = session.events.recv().await {
            match ev.map_err(status)? {
                AsrEvent::Hypothesis(h) if h.is_final => resp.segments.push(hypothesis_pb(h)),
                AsrEvent::Done {
                    model,
                    audio_seconds,
                    compute_seconds,
                    ..
                } => {
                    resp.model = model;
                    resp.usage = Some(usage(audio_seconds, compute_seconds));
                }
                _ => {}
            }
        }
        resp.text = join_texts(resp.segments.iter().map(|s| s.text.as_str()));
        Ok(Response::new(resp))
    }

    type StreamingRecognizeStream = BoxStream<pb::RecognizeEvent>;

    async fn streaming_recognize(
        &self,
        request: Request<Streaming<pb::RecognizeClientMsg>>,
    ) -> Result<Response<Self::StreamingRecognizeStream>, Status> {
        use pb::recognize_client_msg::Msg;
        let opts = request_options(&request)?;
        let mut inbound = request.into_inner();
        let first = crate::codec::first_message(&mut inbound).await?;
        let Some(Msg::Config(sc)) = first.msg else {
            return Err(invalid(
                "config",
                "the first message must carry the config (audio was sent before any config)",
            ));
        };
        let opts = request_options_meta(opts, sc.meta.as_ref());
        let c = sc
            .config
            .ok_or_else(|| invalid("config.config", "missing (model, input format)"))?;
        let f = c.input.unwrap_or_default();
        let encoding = raw_encoding(f.encoding(), "config.input.encoding")?;
        let channels = u16::try_from(f.channels)
            .map_err(|_| invalid("config.input.channels", format!("{} is absurd", f.channels)))?;
        let format = RawFormat {
            encoding,
            sample_rate: f.sample_rate_hz,
            channels,
        };
        let (input, mut session) = self
            .engine
            .recognize_stream(asr_config(&c), format, opts)
            .map_err(status)?;
        let (tx, rx) = mpsc::channel::<Result<pb::RecognizeEvent, Status>>(8);
        let event = |e| Ok(pb::RecognizeEvent { event: Some(e) });
        let _ = tx
            .send(event(pb::recognize_event::Event::Admitted(pb::Admission {
                queue_position: session.admitted.queue_position as u32,
                worker_id: "cpu".into(),
            })))
            .await;
        // Client → engine. A protocol violation answers the client with a status naming it and
        // drops the input (which cancels the session).
        let ptx = tx.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let item = match msg.map(|m| m.msg) {
                    Ok(Some(Msg::Audio(a))) if a.is_empty() => continue,
                    Ok(Some(Msg::Audio(a))) => AsrInput::Audio(a),
                    Ok(Some(Msg::Flush(f))) => AsrInput::Flush(f.marker_id),
                    Ok(Some(Msg::End(_))) => break,
                    Ok(Some(Msg::Config(_))) => {
                        let _ = ptx
                            .send(Err(invalid(
                                "config",
                                "a config was sent after the stream started; only the first \
                                 message may carry it",
                            )))
                            .await;
                        return;
                    }
                    Ok(None) => {
                        let _ = ptx.send(Err(invalid("msg", "empty message"))).await;
                        return;
                    }
                    Err(_) => return,
                };
                if input.send(item).await.is_err() {
                    return;
                }
            }
            let _ = input.end().await;
        });
        // Engine → client; a failed send means the client left: dropping the session cancels.
        tokio::spawn(async move {
            use pb::recognize_event::Event;
            while let Some(ev) = session.events.recv().await {
                let item = match ev {
                    Ok(AsrEvent::Hypothesis(h)) => event(Event::Hypothesis(hypothesis_pb(h))),
                    Ok(AsrEvent::Endpoint {
                        segment,
                        start_s,
                        end_s,
                        reason,
                    }) => event(Event::Endpoint(pb::Endpoint {
                        segment,
                        start_s,
                        end_s,
                        reason: reason.as_str().into(),
                    })),
                    Ok(AsrEvent::Flushed(id)) => {
                        event(Event::Flushed(pb::Flushed { marker_id: id }))
                    }
                    Ok(AsrEvent::Done {
                        model,
                        segments,
                        audio_seconds,
                        compute_seconds,
                    }) => event(Event::Final(pb::RecognizeFinal {
                        model,
                        segments,
                        audio_seconds: audio_seconds as f32,
                        usage: Some(usage(audio_seconds, compute_seconds)),
                    })),
                    Err(e) => Err(status(e)),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_cjk_without_and_words_with_spaces() {
        assert_eq!(join_texts(["你好", "世界"]), "你好世界");
        assert_eq!(join_texts(["hello world", "again"]), "hello world again");
        assert_eq!(join_texts(["", "a", " "]), "a");
    }
}
