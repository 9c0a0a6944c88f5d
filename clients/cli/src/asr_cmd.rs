//! `cadenza asr`: transcribe files (through a server or in process with `--local`), or the
//! microphone (`--mic`, in builds with the `mic` feature).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use cadenza_engine::{AsrConfig, AsrEvent, AudioInput, ModelKind, RequestOptions};
use cadenza_paraformer::Transcript;
use cadenza_proto::v1 as pb;
use clap::Args;

use crate::ClientArgs;

/// Transcribe speech (Paraformer).
#[derive(Args, Debug)]
pub struct AsrArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Audio files (WAV, FLAC, MP3, OGG/Vorbis; any rate and channel count).
    #[arg(required_unless_present = "mic")]
    files: Vec<PathBuf>,
    /// Print every segment with its time span and per-token timings.
    #[arg(long)]
    timestamps: bool,
    /// One JSON object per file (per final segment with --mic).
    #[arg(long)]
    json: bool,
    /// Transcribe the microphone live (needs a build with `--features mic`). Ctrl-C ends.
    #[arg(long, conflicts_with = "files")]
    mic: bool,
    /// Input device for --mic (name as listed by the error message; default: the system's).
    #[arg(long, requires = "mic")]
    device: Option<String>,
    /// Re-decode each segment with the offline (second-pass) model.
    #[arg(long)]
    two_pass: bool,
    /// Trailing silence (ms) that ends a segment (default 800).
    #[arg(long)]
    silence_ms: Option<u32>,
}

/// One finished segment, as printed.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub text: String,
    pub start_s: f32,
    pub end_s: f32,
    pub words: Vec<(String, f32, f32)>,
}

fn print_file(a: &AsrArgs, file: &str, model: &str, segs: &[Segment]) {
    let text = cadenza_server::recognition::join_texts(segs.iter().map(|s| s.text.as_str()));
    if a.json {
        let v = serde_json::json!({
            "file": file,
            "model": model,
            "text": text,
            "segments": segs.iter().map(seg_json).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    let prefix = if a.files.len() > 1 {
        format!("{file}: ")
    } else {
        String::new()
    };
    if a.timestamps {
        if !prefix.is_empty() {
            println!("{file}:");
        }
        for s in segs {
            println!("[{:8.2} - {:8.2}] {}", s.start_s, s.end_s, s.text);
            let words: Vec<String> = s
                .words
                .iter()
                .map(|(w, a, b)| format!("{w}@{a:.2}-{b:.2}"))
                .collect();
            if !words.is_empty() {
                println!("    {}", words.join(" "));
            }
        }
    } else {
        println!("{prefix}{text}");
    }
}

fn seg_json(s: &Segment) -> serde_json::Value {
    serde_json::json!({
        "text": s.text,
        "start_s": s.start_s,
        "end_s": s.end_s,
        "words": s.words.iter().map(|(w, a, b)| serde_json::json!({"text": w, "start_s": a, "end_s": b})).collect::<Vec<_>>(),
    })
}

fn config(a: &AsrArgs, model: String) -> AsrConfig {
    let mut c = AsrConfig {
        model,
        two_pass: a.two_pass,
        timestamps: true,
        interim_results: a.mic,
        ..AsrConfig::default()
    };
    if let Some(ms) = a.silence_ms {
        c.endpointing.trailing_silence_ms = ms;
    }
    c
}

pub async fn run(a: AsrArgs) -> Result<()> {
    if a.mic {
        return mic(&a).await;
    }
    if a.client.local {
        let (engine, model) = crate::codec_cmd::local_engine_of(&a.client, ModelKind::Asr)?;
        for f in &a.files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let mut s = engine
                .recognize(
                    config(&a, model.clone()),
                    AudioInput::File(bytes),
                    RequestOptions::default(),
                )
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let mut segs = Vec::new();
            let mut name = model.clone();
            while let Some(ev) = s.events.recv().await {
                match ev.map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))? {
                    AsrEvent::Hypothesis(h) if h.is_final => segs.push(seg_of(h)),
                    AsrEvent::Done { model, .. } => name = model,
                    _ => {}
                }
            }
            print_file(&a, &f.display().to_string(), &name, &segs);
        }
        engine.shutdown();
        return Ok(());
    }
    let mut c = connect(&a.client.server).await?;
    for f in &a.files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let mut cfg = pb::RecognitionConfig {
            model: a.client.model.clone().map(|name| pb::ModelRef { name }),
            input: Some(pb::AudioFormat {
                encoding: pb::Encoding::File as i32,
                ..Default::default()
            }),
            two_pass: a.two_pass,
            timestamps: true,
            ..Default::default()
        };
        if let Some(ms) = a.silence_ms {
            cfg.endpointing = Some(pb::Endpointing {
                trailing_silence_ms: ms,
                ..Default::default()
            });
        }
        let resp = c
            .recognize(pb::RecognizeRequest {
                meta: None,
                config: Some(cfg),
                audio: bytes,
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!("{}: server: {} ({:?})", f.display(), s.message(), s.code())
            })?
            .into_inner();
        let segs: Vec<Segment> = resp.segments.into_iter().map(seg_of_pb).collect();
        print_file(&a, &f.display().to_string(), &resp.model, &segs);
    }
    Ok(())
}

/// A final hypothesis of the in-process engine (`--local`, `--mic --local`) as printed: through
/// the server's own engine → wire mapping, so `--local` prints exactly what a server would send.
fn seg_of(h: cadenza_engine::Hypothesis) -> Segment {
    seg_of_pb(cadenza_server::recognition::hypothesis_pb(h))
}

fn seg_of_pb(h: pb::Hypothesis) -> Segment {
    Segment {
        text: h.text,
        start_s: h.start_s,
        end_s: h.end_s,
        words: h
            .words
            .into_iter()
            .map(|w| (w.text, w.start_s, w.end_s))
            .collect(),
    }
}

async fn connect(
    server: &str,
) -> Result<pb::recognition_client::RecognitionClient<tonic::transport::Channel>> {
    let ch = crate::connect(server).await?;
    Ok(pb::recognition_client::RecognitionClient::new(ch)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30))
}

/// Shows a live hypothesis: partials overwrite the current line, finals end it.
#[cfg_attr(not(feature = "mic"), allow(dead_code))]
pub(crate) struct Live {
    json: bool,
    width: usize,
}

#[cfg_attr(not(feature = "mic"), allow(dead_code))]
impl Live {
    fn new(json: bool) -> Self {
        Self { json, width: 0 }
    }

    fn partial(&mut self, text: &str) {
        if self.json {
            return;
        }
        let mut out = std::io::stdout().lock();
        let pad = self.width.saturating_sub(text.chars().count());
        let _ = write!(out, "\r{text}{}", " ".repeat(pad));
        let _ = out.flush();
        self.width = text.chars().count();
    }

    fn final_(&mut self, s: &Segment) {
        if self.json {
            println!("{}", seg_json(s));
            return;
        }
        let pad = self.width.saturating_sub(s.text.chars().count());
        println!("\r{}{}", s.text, " ".repeat(pad));
        self.width = 0;
    }
}

#[cfg(not(feature = "mic"))]
async fn mic(_a: &AsrArgs) -> Result<()> {
    anyhow::bail!(
        "--mic is not in this build of cadenza: rebuild with the `mic` feature, e.g. \
         `cargo build --release -p cadenza-cli --features mic` (needs the ALSA development \
         headers on Linux: `apt-get install libasound2-dev`)"
    )
}

#[cfg(feature = "mic")]
async fn mic(a: &AsrArgs) -> Result<()> {
    use cadenza_engine::{AsrInput, RawFormat};
    use tokio_stream::StreamExt;
    let (capture, mut rx) = crate::mic::Capture::start(a.device.as_deref())?;
    eprintln!(
        "listening on '{}' ({} Hz, {} ch); Ctrl-C to stop",
        capture.name, capture.rate, capture.channels
    );
    let mut live = Live::new(a.json);
    if a.client.local {
        let (engine, model) = crate::codec_cmd::local_engine_of(&a.client, ModelKind::Asr)?;
        let format = RawFormat {
            encoding: cadenza_audio::RawEncoding::F32Le,
            sample_rate: capture.rate,
            channels: capture.channels,
        };
        let (input, mut session) = engine
            .recognize_stream(config(a, model), format, RequestOptions::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let feeder = tokio::spawn(async move {
            let stop = tokio::signal::ctrl_c();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    chunk = rx.recv() => match chunk {
                        Some(c) => {
                            if input.send(AsrInput::Audio(cadenza_audio::to_f32le(&c))).await.is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    _ = &mut stop => break,
                }
            }
            let _ = input.end().await;
        });
        while let Some(ev) = session.events.recv().await {
            match ev.map_err(|e| anyhow::anyhow!("{e}"))? {
                AsrEvent::Hypothesis(h) if h.is_final => live.final_(&seg_of(h)),
                AsrEvent::Hypothesis(h) => live.partial(&h.text),
                _ => {}
            }
        }
        let _ = feeder.await;
        drop(capture);
        return Ok(());
    }
    let mut c = connect(&a.client.server).await?;
    let mut cfg = pb::RecognitionConfig {
        model: a.client.model.clone().map(|name| pb::ModelRef { name }),
        input: Some(pb::AudioFormat {
            encoding: pb::Encoding::PcmF32le as i32,
            sample_rate_hz: capture.rate,
            channels: capture.channels as u32,
        }),
        interim_results: true,
        two_pass: a.two_pass,
        timestamps: true,
        ..Default::default()
    };
    if let Some(ms) = a.silence_ms {
        cfg.endpointing = Some(pb::Endpointing {
            trailing_silence_ms: ms,
            ..Default::default()
        });
    }
    let (tx, out_rx) = tokio::sync::mpsc::channel(8);
    use pb::recognize_client_msg::Msg;
    let _ = tx
        .send(pb::RecognizeClientMsg {
            msg: Some(Msg::Config(pb::StreamingRecognitionConfig {
                meta: None,
                config: Some(cfg),
            })),
        })
        .await;
    tokio::spawn(async move {
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(c) => {
                        let m = pb::RecognizeClientMsg { msg: Some(Msg::Audio(cadenza_audio::to_f32le(&c))) };
                        if tx.send(m).await.is_err() {
                            return;
                        }
                    }
                    None => break,
                },
                _ = &mut stop => break,
            }
        }
        let _ = tx
            .send(pb::RecognizeClientMsg {
                msg: Some(Msg::End(pb::EndOfInput {})),
            })
            .await;
    });
    let mut events = c
        .streaming_recognize(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
        .map_err(|s| anyhow::anyhow!("server: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|s| anyhow::anyhow!("server: {} ({:?})", s.message(), s.code()))?;
        if let Some(pb::recognize_event::Event::Hypothesis(h)) = ev.event {
            if h.is_final {
                live.final_(&seg_of_pb(h));
            } else {
                live.partial(&h.text);
            }
        }
    }
    drop(capture);
    Ok(())
}

/// One short streaming pass (warm-up of the streaming model's code paths).
fn rec_warm(m: &cadenza_paraformer::Paraformer, samples: &[f32]) -> Result<()> {
    let mut r = m.streaming();
    r.push(samples)?;
    r.finish()?;
    Ok(())
}

/// `cadenza bench asr`.
#[derive(Args, Debug)]
pub struct BenchAsrArgs {
    /// FunASR Paraformer directory.
    #[arg(long)]
    model: PathBuf,
    /// Audio file (resampled to 16 kHz mono).
    #[arg(long)]
    input: PathBuf,
    /// Timed offline runs (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Streaming chunk in ms (a partial is decoded after every chunk). A chunked streaming model
    /// decodes every 600 ms of features ([0, 10, 5]) whatever this is; it only sets the pushes.
    #[arg(long, default_value_t = 600)]
    chunk_ms: u32,
    /// Model for the streaming measurements (e.g. a `ParaformerStreaming` directory); default
    /// `--model`.
    #[arg(long)]
    streaming_model: Option<PathBuf>,
    /// Concurrent real-time streams for the partial-latency measurement: each stream gets its
    /// audio paced at real time in `chunk_ms` pieces, and the latency of a piece is from the
    /// moment its audio would have ended to the return of the push that yields its partial.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// One JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// Offline and streaming RTF of one model on one file, in process (no server).
pub fn bench(a: BenchAsrArgs) -> Result<()> {
    use std::time::Instant;
    let dev = candle_core::Device::Cpu;
    let t = Instant::now();
    let m = cadenza_paraformer::Paraformer::load(&a.model, &dev)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = t.elapsed().as_secs_f64();
    let pcm = cadenza_audio::decode_file(&a.input, &cadenza_audio::Limits::default())?;
    let samples = cadenza_audio::resample(&pcm.to_mono(), pcm.sample_rate, m.sample_rate())?;
    let audio_s = samples.len() as f64 / m.sample_rate() as f64;
    m.recognize(&samples)?; // warm-up
    let mut best = f64::INFINITY;
    let mut text = String::new();
    for _ in 0..a.repeats.max(1) {
        let t = Instant::now();
        let r = m.recognize(&samples)?;
        best = best.min(t.elapsed().as_secs_f64());
        text = r.text;
    }
    // Streaming: a chunked model decodes each 600 ms chunk with its caches; an offline model
    // re-decodes the utterance so far after every chunk.
    let sm = match &a.streaming_model {
        Some(d) => cadenza_paraformer::Paraformer::load(d, &dev)
            .with_context(|| format!("loading {}", d.display()))?,
        None => m.clone(),
    };
    let chunk = (sm.sample_rate() as usize * a.chunk_ms as usize / 1000).max(1);
    let frames = (a.chunk_ms as usize).div_ceil(60).max(1);
    let run_stream = |paced: Option<Instant>| -> Result<(f64, Vec<f64>, Transcript)> {
        let mut rec = sm.streaming().with_partial_every(frames);
        let mut lat = Vec::new();
        let t = Instant::now();
        let chunk_s = chunk as f64 / sm.sample_rate() as f64;
        for (i, c) in samples.chunks(chunk).enumerate() {
            let due = match paced {
                Some(t0) => {
                    // The audio of this piece has fully arrived at t0 + (i + 1) * chunk.
                    let due = t0 + std::time::Duration::from_secs_f64((i + 1) as f64 * chunk_s);
                    if let Some(w) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(w);
                    }
                    due
                }
                None => Instant::now(),
            };
            let partials = rec.push(c)?;
            if !partials.is_empty() || paced.is_none() {
                lat.push(due.elapsed().as_secs_f64());
            }
        }
        let fin = rec.finish()?;
        Ok((t.elapsed().as_secs_f64(), lat, fin.transcript))
    };
    rec_warm(&sm, &samples[..samples.len().min(chunk * 2)])?;
    let (stream_s, mut lat, fin) = run_stream(None)?;
    let streams = a.streams.max(1);
    let mut conc_lat = Vec::new();
    if streams > 1 {
        let t0 = Instant::now();
        let results: Vec<Result<(f64, Vec<f64>, Transcript)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..streams)
                .map(|_| s.spawn(|| run_stream(Some(t0))))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("stream panicked")))
                })
                .collect()
        });
        for r in results {
            conc_lat.extend(r?.1);
        }
        conc_lat.sort_by(f64::total_cmp);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let cpct = |p: f64| {
        if conc_lat.is_empty() {
            f64::NAN
        } else {
            conc_lat[((conc_lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let chunked = sm.is_streaming();
    let threads = candle_core::utils::get_num_threads();
    let v = serde_json::json!({
        "impl": "cadenza",
        "load_s": load_s,
        "offline_s": best,
        "audio_s": audio_s,
        "rtf": best / audio_s,
        "stream_s": stream_s,
        "stream_rtf": stream_s / audio_s,
        "chunk_ms": a.chunk_ms,
        "partial_latency_p50_s": pct(0.5),
        "partial_latency_p95_s": pct(0.95),
        "streaming_chunked": chunked,
        "streams": streams,
        "concurrent_partial_latency_p50_s": cpct(0.5),
        "concurrent_partial_latency_p95_s": cpct(0.95),
        "concurrent_partials": conc_lat.len(),
        "threads": threads,
        "tokens": fin.token_ids.len(),
        // Only meaningful when both passes ran the same model.
        "same_final": a.streaming_model.is_none().then(|| fin.text == text),
    });
    if a.json {
        println!("{v}");
    } else {
        println!(
            "offline: {best:.3} s for {audio_s:.2} s of audio (RTF {:.3}); streaming ({} ms \
             pushes, {}): {stream_s:.3} s (RTF {:.3}), partial latency p50 {:.3} s \
             p95 {:.3} s; {streams} paced streams: p50 {:.3} s p95 {:.3} s; {threads} threads",
            best / audio_s,
            a.chunk_ms,
            if chunked {
                "chunked model"
            } else {
                "re-decoding"
            },
            stream_s / audio_s,
            pct(0.5),
            pct(0.95),
            cpct(0.5),
            cpct(0.95)
        );
    }
    Ok(())
}
