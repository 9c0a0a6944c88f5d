//! `cadenza music`: text-to-music, streamed from a server or run in process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cadenza_audio::{Pcm, WavFormat};
use cadenza_engine::{
    AudioInput, Codes, Continuation, MusicEvent, MusicRequest, RequestOptions, RescoreRequest,
    ScheduleKind, ScheduleRequest,
};
use cadenza_nn::sampling::SamplingParams;
use cadenza_proto::v1 as pb;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ClientArgs;
use crate::codes_file::CodesFile;

/// Generate music from a text description.
#[derive(Args, Debug)]
pub struct MusicArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// What the music should be, e.g. "upbeat rock song with electric guitar at 120 bpm".
    prompt: String,
    /// Seconds of new audio.
    #[arg(long, default_value_t = 5.0)]
    duration: f32,
    /// Output WAV file.
    #[arg(short, long, default_value = "music.wav")]
    output: PathBuf,
    /// Random seed (default: random; the one used is printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Softmax temperature (default 1).
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample among the k most likely tokens (default 250, capped by the vocabulary).
    #[arg(long)]
    top_k: Option<u32>,
    /// Nucleus sampling threshold in (0, 1); 0 = off.
    #[arg(long)]
    top_p: Option<f32>,
    /// Classifier-free guidance coefficient (default: the model's, 3 for MusicGen; 1 = off).
    #[arg(long)]
    guidance: Option<f32>,
    /// Take the most likely token at every step (deterministic).
    #[arg(long)]
    greedy: bool,
    /// Continue this audio file instead of starting from silence.
    #[arg(long = "continue", value_name = "AUDIO")]
    continue_from: Option<PathBuf>,
    /// Also write the generated codes (`codes` [n_q, frames]) to this .safetensors file.
    #[arg(long)]
    tokens_out: Option<PathBuf>,
    /// Decoding schedule: `ar` (MusicGen models), `magnet` or `hybrid` (MAGNeT models).
    /// Default: the model's.
    #[arg(long, value_parser = ["ar", "magnet", "hybrid"])]
    schedule: Option<String>,
    /// MAGNeT decoding iterations per codebook, e.g. 20,10,10,10.
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<u32>>,
    /// Hybrid: seconds generated autoregressively before MAGNeT takes over (default 3).
    #[arg(long)]
    prefix_seconds: Option<f32>,
    /// Hybrid: the autoregressive model generating the prefix (default: the model's).
    #[arg(long)]
    prefix_model: Option<String>,
    /// Rescore MAGNeT's confidences with this autoregressive model (same codec).
    #[arg(long, value_name = "MODEL")]
    rescore_with: Option<String>,
    /// The rescorer's weight in (0, 1] (default 0.3); turns rescoring on.
    #[arg(long, value_name = "W")]
    rescore_weight: Option<f32>,
    /// No rescoring, even where the model's default schedule rescores.
    #[arg(long, conflicts_with_all = ["rescore_with", "rescore_weight"])]
    no_rescore: bool,
}

impl MusicArgs {
    /// The schedule flags as the engine's request.
    fn schedule(&self) -> ScheduleRequest {
        let rescore = if self.no_rescore {
            Some(RescoreRequest::default())
        } else if self.rescore_with.is_some() || self.rescore_weight.is_some() {
            Some(RescoreRequest {
                enabled: true,
                model: self.rescore_with.clone(),
                weight: self.rescore_weight,
            })
        } else {
            None
        };
        ScheduleRequest {
            kind: self.schedule.as_deref().and_then(ScheduleKind::parse),
            decoding_steps: self
                .steps
                .as_ref()
                .map(|v| v.iter().map(|&x| x as usize).collect()),
            prefix_s: self.prefix_seconds,
            prefix_model: self.prefix_model.clone(),
            rescore,
            ..Default::default()
        }
    }

    /// The schedule flags as the proto message (`None` when none is given).
    fn schedule_pb(&self) -> Option<pb::Schedule> {
        let s = self.schedule();
        if s == ScheduleRequest::default() {
            return None;
        }
        Some(pb::Schedule {
            kind: match s.kind {
                None => pb::schedule::Kind::Unspecified,
                Some(ScheduleKind::Ar) => pb::schedule::Kind::Autoregressive,
                Some(ScheduleKind::Magnet) => pb::schedule::Kind::Magnet,
                Some(ScheduleKind::Hybrid) => pb::schedule::Kind::Hybrid,
            } as i32,
            decoding_steps: self.steps.clone().unwrap_or_default(),
            prefix_s: s.prefix_s.unwrap_or(0.0),
            prefix_model: s.prefix_model.map(|name| pb::ModelRef { name }),
            rescore: s.rescore.map(|r| pb::Rescore {
                model: r.model.map(|name| pb::ModelRef { name }),
                weight: r.weight.unwrap_or(0.0),
                disabled: !r.enabled,
            }),
            ..Default::default()
        })
    }
}

fn bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} generating {prefix} [{bar:30}] {pos}/{len} steps, {msg} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

struct Outcome {
    pcm: Option<Pcm>,
    codes: Option<Codes>,
    seed: u64,
    model: String,
}

pub async fn run(a: MusicArgs) -> Result<()> {
    let out = if a.client.local {
        local(&a).await?
    } else {
        remote(&a).await?
    };
    let pcm = out.pcm.context("no audio was generated")?;
    cadenza_audio::write_wav(&a.output, &pcm, WavFormat::I16)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "{}: {:.2} s at {} Hz (model {}, seed {})",
        a.output.display(),
        pcm.duration_secs(),
        pcm.sample_rate,
        out.model,
        out.seed
    );
    if let Some(path) = &a.tokens_out {
        let c = out.codes.context("the server sent no tokens")?;
        CodesFile {
            num_codebooks: c.num_codebooks,
            frames: c.frames,
            codes: c.codes,
            scales: vec![],
            model: out.model.clone(),
            sample_rate: pcm.sample_rate,
            num_samples: pcm.frames() as u64,
            bandwidth_kbps: 0.0,
        }
        .write(path)?;
        eprintln!("{}: codes written", path.display());
    }
    Ok(())
}

fn append(acc: &mut Option<Pcm>, p: Pcm) {
    match acc {
        None => *acc = Some(p),
        Some(x) => x.samples.extend_from_slice(&p.samples),
    }
}

async fn local(a: &MusicArgs) -> Result<Outcome> {
    let (engine, model) =
        crate::codec_cmd::local_engine_of(&a.client, cadenza_engine::ModelKind::Music)?;
    let continuation = match &a.continue_from {
        Some(p) => Some(Continuation::Audio(AudioInput::File(
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        ))),
        None => None,
    };
    let req = MusicRequest {
        model,
        prompt: a.prompt.clone(),
        duration_s: a.duration,
        sampling: SamplingParams {
            // 0 = the schedule's default (the engine resolves it).
            temperature: a.temperature.unwrap_or(0.0),
            top_k: a.top_k.unwrap_or(0) as usize,
            top_p: a.top_p.unwrap_or(0.0),
            greedy: a.greedy,
        },
        guidance: a.guidance,
        seed: a.seed,
        continuation,
        chunk_frames: None,
        return_tokens: a.tokens_out.is_some(),
        schedule: a.schedule(),
    };
    let model = engine.music_info_for(&req.model, req.schedule.kind)?.name;
    let mut session = engine.generate_music(req, RequestOptions::default())?;
    let pb = bar();
    let mut out = Outcome {
        pcm: None,
        codes: None,
        seed: 0,
        model,
    };
    while let Some(ev) = session.events.recv().await {
        match ev? {
            MusicEvent::Progress { stage, step, total } => {
                pb.set_prefix(stage);
                pb.set_length(total.into());
                pb.set_position(step.into());
            }
            MusicEvent::Audio { pcm, .. } => {
                append(&mut out.pcm, pcm);
                pb.set_message(format!(
                    "{:.1} s of audio",
                    out.pcm.as_ref().map_or(0.0, Pcm::duration_secs)
                ));
            }
            MusicEvent::Tokens(c) => out.codes = Some(c),
            MusicEvent::Done { seed, .. } => out.seed = seed,
        }
    }
    pb.finish_and_clear();
    engine.shutdown();
    Ok(out)
}

async fn remote(a: &MusicArgs) -> Result<Outcome> {
    let ch = crate::connect(&a.client.server).await?;
    let mut client = pb::music_client::MusicClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let continuation = match &a.continue_from {
        Some(p) => Some(pb::generate_music_request::Continuation::ContinuationAudio(
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None => None,
    };
    let req = pb::GenerateMusicRequest {
        model: a.client.model.clone().map(|name| pb::ModelRef { name }),
        prompt: a.prompt.clone(),
        duration_s: a.duration,
        sampling: Some(pb::Sampling {
            temperature: a.temperature.unwrap_or(0.0),
            top_k: a.top_k.unwrap_or(0),
            top_p: a.top_p.unwrap_or(0.0),
            seed: a.seed.unwrap_or(0),
            greedy: a.greedy,
        }),
        guidance: a.guidance.unwrap_or(0.0),
        continuation,
        continuation_format: Some(pb::AudioFormat {
            encoding: pb::Encoding::File as i32,
            ..Default::default()
        }),
        output_encoding: pb::Encoding::PcmF32le as i32,
        return_tokens: a.tokens_out.is_some(),
        schedule: a.schedule_pb(),
        ..Default::default()
    };
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| anyhow::anyhow!("server: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let pb = bar();
    let mut out = Outcome {
        pcm: None,
        codes: None,
        seed: 0,
        model: String::new(),
    };
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("server: {} ({:?})", s.message(), s.code()))?
    {
        use pb::music_event::Event;
        match msg.event {
            Some(Event::Admitted(adm)) if adm.queue_position > 0 => {
                pb.set_message(format!("queued at position {}", adm.queue_position))
            }
            Some(Event::Progress(p)) => {
                pb.set_prefix(p.stage);
                pb.set_length(p.total.into());
                pb.set_position(p.step.into());
            }
            Some(Event::Audio(chunk)) => {
                let f = chunk.format.unwrap_or_default();
                let samples: Vec<f32> = chunk
                    .data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                append(
                    &mut out.pcm,
                    Pcm::new(f.sample_rate_hz, f.channels.max(1) as u16, samples)?,
                );
                pb.set_message(format!(
                    "{:.1} s of audio",
                    out.pcm.as_ref().map_or(0.0, Pcm::duration_secs)
                ));
            }
            Some(Event::Tokens(c)) => {
                out.codes = Some(Codes {
                    num_codebooks: c.num_codebooks as usize,
                    frames: c.frames as usize,
                    codes: c.codes,
                })
            }
            Some(Event::Final(f)) => {
                out.seed = f.seed;
                out.model = f.model;
            }
            _ => {}
        }
    }
    pb.finish_and_clear();
    if out.pcm.is_none() {
        bail!("the server sent no audio");
    }
    Ok(out)
}
