//! `cadenza codec …`, `cadenza models` and `cadenza bench codec`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cadenza_audio::{Pcm, WavFormat};
use cadenza_engine::{
    AudioInput, CodecEvent, Codes, Engine, ModelEntry, ModelKind, RequestOptions,
};
use cadenza_proto::v1 as pb;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ClientArgs;
use crate::codes_file::CodesFile;

#[derive(Subcommand, Debug)]
pub enum CodecAction {
    /// Encode an audio file (WAV, FLAC, MP3, OGG; any rate) to codes in a .safetensors file
    /// (integer tensor `codes` [n_q, frames], plus `scales` for normalising models).
    Encode {
        #[command(flatten)]
        client: ClientArgs,
        /// Audio file to encode.
        input: PathBuf,
        /// Output .safetensors file.
        #[arg(short, long)]
        output: PathBuf,
        /// Bandwidth in kbps; must be one the model lists (default: its highest).
        #[arg(long)]
        bandwidth: Option<f32>,
    },
    /// Decode a codes .safetensors file to a WAV file at the model's rate.
    Decode {
        #[command(flatten)]
        client: ClientArgs,
        /// Codes file written by `cadenza codec encode` (or any safetensors with `codes`).
        input: PathBuf,
        /// Output WAV file.
        #[arg(short, long)]
        output: PathBuf,
        /// Write 32-bit float WAV instead of 16-bit PCM.
        #[arg(long)]
        float: bool,
    },
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// An in-process engine for `--local`: `--model DIR` loads that directory as a model of `kind`,
/// otherwise the configuration's models are used and `--model` names one of them.
pub(crate) fn local_engine_of(args: &ClientArgs, kind: ModelKind) -> Result<(Engine, String)> {
    if let Some(m) = &args.model
        && Path::new(m).is_dir()
    {
        let mut cfg =
            cadenza_server::Config::load(args.config.as_deref()).map_err(anyhow::Error::msg)?;
        let name = Path::new(m)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "local".into());
        cfg.models = vec![ModelEntry {
            name: name.clone(),
            kind,
            source: m.clone(),
            card: None,
            format: None,
            t5: None,
            codec: None,
            second_pass: None,
            decoding: None,
            schedule: None,
        }];
        let engine = Engine::start(cfg.engine, &cfg.models, None).map_err(anyhow::Error::msg)?;
        return Ok((engine, name));
    }
    let (_cfg, engine) = crate::start_engine(args.config.as_deref())?;
    Ok((engine, args.model.clone().unwrap_or_default()))
}

fn local_engine(args: &ClientArgs) -> Result<(Engine, String)> {
    local_engine_of(args, ModelKind::Codec)
}

async fn connect_codec(
    server: &str,
) -> Result<pb::codec_client::CodecClient<tonic::transport::Channel>> {
    let ch = crate::connect(server).await?;
    Ok(pb::codec_client::CodecClient::new(ch)
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("server: {} ({:?})", s.message(), s.code())
}

pub async fn run(action: CodecAction) -> Result<()> {
    match action {
        CodecAction::Encode {
            client,
            input,
            output,
            bandwidth,
        } => {
            let bytes =
                std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
            let file = if client.local {
                encode_local(&client, bytes, bandwidth).await?
            } else {
                encode_remote(&client, bytes, bandwidth).await?
            };
            file.write(&output)?;
            eprintln!(
                "{}: {} codebooks × {} frames ({} samples at {} Hz, {} kbps, model {})",
                output.display(),
                file.num_codebooks,
                file.frames,
                file.num_samples,
                file.sample_rate,
                file.bandwidth_kbps,
                file.model
            );
            Ok(())
        }
        CodecAction::Decode {
            client,
            input,
            output,
            float,
        } => {
            let file = CodesFile::read(&input)?;
            let pcm = if client.local {
                decode_local(&client, &file).await?
            } else {
                decode_remote(&client, &file).await?
            };
            let fmt = if float {
                WavFormat::F32
            } else {
                WavFormat::I16
            };
            cadenza_audio::write_wav(&output, &pcm, fmt)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "{}: {:.2} s at {} Hz, {} channel(s)",
                output.display(),
                pcm.duration_secs(),
                pcm.sample_rate,
                pcm.channels
            );
            Ok(())
        }
    }
}

async fn encode_local(
    args: &ClientArgs,
    bytes: Vec<u8>,
    bandwidth: Option<f32>,
) -> Result<CodesFile> {
    let (engine, model) = local_engine(args)?;
    let info = engine.codec_info(&model)?;
    let mut session = engine.encode(
        &model,
        AudioInput::File(bytes),
        bandwidth,
        RequestOptions::default(),
    )?;
    let bar = progress_bar(0, "encoding");
    let mut codes: Option<Codes> = None;
    let mut file = CodesFile {
        num_codebooks: 0,
        frames: 0,
        codes: vec![],
        scales: vec![],
        model: info.name.clone(),
        sample_rate: info.sample_rate,
        num_samples: 0,
        bandwidth_kbps: 0.0,
    };
    while let Some(ev) = session.events.recv().await {
        match ev? {
            CodecEvent::Progress { step, total } => {
                bar.set_length(total.into());
                bar.set_position(step.into());
            }
            CodecEvent::Codes { codes: c, scale } => {
                codes = Some(match codes {
                    None => c,
                    Some(a) => concat(a, c)?,
                });
                file.scales.extend(scale);
            }
            CodecEvent::Encoded {
                num_samples,
                bandwidth_kbps,
                ..
            } => {
                file.num_samples = num_samples;
                file.bandwidth_kbps = bandwidth_kbps;
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    engine.shutdown();
    let codes = codes.context("encoding produced no codes")?;
    file.num_codebooks = codes.num_codebooks;
    file.frames = codes.frames;
    file.codes = codes.codes;
    Ok(file)
}

fn concat(a: Codes, b: Codes) -> Result<Codes> {
    if a.num_codebooks != b.num_codebooks {
        bail!("codebook count changed while encoding");
    }
    let q = a.num_codebooks;
    let mut codes = Vec::with_capacity(a.codes.len() + b.codes.len());
    for r in 0..q {
        codes.extend_from_slice(&a.codes[r * a.frames..(r + 1) * a.frames]);
        codes.extend_from_slice(&b.codes[r * b.frames..(r + 1) * b.frames]);
    }
    Ok(Codes {
        num_codebooks: q,
        frames: a.frames + b.frames,
        codes,
    })
}

async fn encode_remote(
    args: &ClientArgs,
    bytes: Vec<u8>,
    bandwidth: Option<f32>,
) -> Result<CodesFile> {
    let mut client = connect_codec(&args.server).await?;
    let bar = ProgressBar::new_spinner();
    bar.set_message("encoding on the server");
    bar.enable_steady_tick(Duration::from_millis(120));
    let resp = client
        .encode(pb::EncodeRequest {
            meta: None,
            model: args.model.clone().map(|name| pb::ModelRef { name }),
            audio: bytes,
            format: Some(pb::AudioFormat {
                encoding: pb::Encoding::File as i32,
                sample_rate_hz: 0,
                channels: 0,
            }),
            bandwidth_kbps: bandwidth.unwrap_or(0.0),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    bar.finish_and_clear();
    let codes = resp.codes.context("server sent no codes")?;
    Ok(CodesFile {
        num_codebooks: codes.num_codebooks as usize,
        frames: codes.frames as usize,
        codes: codes.codes,
        scales: resp.scales,
        model: resp.model,
        sample_rate: resp.sample_rate_hz,
        num_samples: resp.num_samples,
        bandwidth_kbps: resp.bandwidth_kbps,
    })
}

fn file_codes(file: &CodesFile) -> Codes {
    Codes {
        num_codebooks: file.num_codebooks,
        frames: file.frames,
        codes: file.codes.clone(),
    }
}

/// The model to decode with: `--model` if given, else the one recorded in the file.
fn decode_model(args: &ClientArgs, file: &CodesFile) -> Option<String> {
    args.model
        .clone()
        .or_else(|| (!file.model.is_empty()).then(|| file.model.clone()))
}

async fn decode_local(args: &ClientArgs, file: &CodesFile) -> Result<Pcm> {
    let mut args = args.clone();
    args.model = decode_model(&args, file);
    let (engine, model) = local_engine(&args)?;
    let trim = (file.num_samples > 0).then_some(file.num_samples);
    let mut session = engine.decode(
        &model,
        file_codes(file),
        file.scales.clone(),
        trim,
        RequestOptions::default(),
    )?;
    let bar = progress_bar(0, "decoding");
    let mut pcm: Option<Pcm> = None;
    while let Some(ev) = session.events.recv().await {
        match ev? {
            CodecEvent::Progress { step, total } => {
                bar.set_length(total.into());
                bar.set_position(step.into());
            }
            CodecEvent::Audio { pcm: p, .. } => match &mut pcm {
                None => pcm = Some(p),
                Some(acc) => acc.samples.extend_from_slice(&p.samples),
            },
            _ => {}
        }
    }
    bar.finish_and_clear();
    engine.shutdown();
    pcm.context("decoding produced no audio")
}

async fn decode_remote(args: &ClientArgs, file: &CodesFile) -> Result<Pcm> {
    let mut client = connect_codec(&args.server).await?;
    let model = decode_model(args, file).map(|name| pb::ModelRef { name });
    if !file.scales.is_empty() {
        // Chunked (normalising) models decode whole chunks: one unary call.
        let resp = client
            .decode(pb::DecodeRequest {
                meta: None,
                model,
                codes: Some(crate::codec_cmd::to_pb(&file_codes(file))),
                scales: file.scales.clone(),
                num_samples: file.num_samples,
                output_encoding: pb::Encoding::PcmF32le as i32,
            })
            .await
            .map_err(status_err)?
            .into_inner();
        let fmt = resp.format.context("no format")?;
        return Pcm::new(
            fmt.sample_rate_hz,
            fmt.channels as u16,
            f32_samples(&resp.audio),
        )
        .map_err(Into::into);
    }
    // Stream codes in one-second blocks; audio streams back as it becomes final.
    let block = 75usize.max(file.frames / 100);
    let codes = file_codes(file);
    let mut msgs = vec![pb::StreamDecodeRequest {
        config: Some(pb::StreamDecodeConfig {
            meta: None,
            model,
            output_encoding: pb::Encoding::PcmF32le as i32,
        }),
        codes: None,
    }];
    let mut pos = 0;
    while pos < codes.frames {
        let n = block.min(codes.frames - pos);
        let mut part = Vec::with_capacity(codes.num_codebooks * n);
        for r in 0..codes.num_codebooks {
            part.extend_from_slice(
                &codes.codes[r * codes.frames + pos..r * codes.frames + pos + n],
            );
        }
        msgs.push(pb::StreamDecodeRequest {
            config: None,
            codes: Some(pb::Codes {
                num_codebooks: codes.num_codebooks as u32,
                frames: n as u32,
                codes: part,
            }),
        });
        pos += n;
    }
    let total = if file.num_samples > 0 {
        file.num_samples
    } else {
        0
    };
    let bar = progress_bar(total, "decoding (samples)");
    let mut stream = client
        .stream_decode(tokio_stream::iter(msgs))
        .await
        .map_err(status_err)?
        .into_inner();
    let mut samples = Vec::new();
    let (mut rate, mut channels) = (0, 1);
    while let Some(chunk) = stream.message().await.map_err(status_err)? {
        let fmt = chunk.format.unwrap_or_default();
        rate = fmt.sample_rate_hz;
        channels = fmt.channels.max(1) as u16;
        samples.extend(f32_samples(&chunk.audio));
        bar.set_position((samples.len() / channels as usize) as u64);
    }
    bar.finish_and_clear();
    if file.num_samples > 0 {
        samples.truncate(file.num_samples as usize * channels as usize);
    }
    Pcm::new(rate, channels, samples).map_err(Into::into)
}

pub(crate) fn to_pb(c: &Codes) -> pb::Codes {
    pb::Codes {
        num_codebooks: c.num_codebooks as u32,
        frames: c.frames as u32,
        codes: c.codes.clone(),
    }
}

fn f32_samples(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub async fn list_models(args: &ClientArgs, json: bool) -> Result<()> {
    let models: Vec<pb::ModelInfo> = if args.local {
        let (engine, _) = local_engine(args)?;
        let out = engine
            .models()
            .into_iter()
            .map(cadenza_server::models::model_info)
            .collect();
        engine.shutdown();
        out
    } else {
        let ch = crate::connect(&args.server).await?;
        pb::models_client::ModelsClient::new(ch)
            .list_models(pb::ListModelsRequest {
                kind: String::new(),
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .models
    };
    for m in models {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "name": m.name, "kind": m.kind, "architecture": m.architecture,
                    "sample_rate_hz": m.sample_rate_hz, "channels": m.channels, "frame_rate": m.frame_rate,
                    "num_codebooks": m.num_codebooks, "codebook_size": m.codebook_size,
                    "bandwidths_kbps": m.bandwidths_kbps, "parameters": m.parameters,
                    "untrained": m.untrained, "card": m.card, "source": m.source,
                })
            );
        } else {
            println!(
                "{}  [{} / {}]  {} Hz, {} ch, {:.1} frames/s, {}×{} codebooks, {:.2} M params{}\n    {}",
                m.name,
                m.kind,
                m.architecture,
                m.sample_rate_hz,
                m.channels,
                m.frame_rate,
                m.num_codebooks,
                m.codebook_size,
                m.parameters as f64 / 1e6,
                if m.untrained { "  UNTRAINED" } else { "" },
                m.card
            );
        }
    }
    Ok(())
}

/// `cadenza bench codec`: best-of-N encode and decode time on one input.
pub fn bench(
    model_dir: &Path,
    input: &Path,
    bandwidth: Option<f32>,
    repeats: usize,
    json: bool,
) -> Result<()> {
    use candle_core::Device;
    let model = cadenza_codecs::Encodec::load(model_dir, &Device::Cpu)?;
    let tensors = candle_core::safetensors::load(input, &Device::Cpu)?;
    let x = tensors
        .get("input")
        .context("the input file has no `input` tensor")?;
    let bw = bandwidth.or_else(|| model.config().target_bandwidths.last().copied());
    let audio_s = x.dim(2)? as f64 / model.config().sampling_rate as f64;
    // Warm-up (allocations, thread pool).
    let enc = model.encode(x, bw)?;
    model.decode(&enc.codes, &enc.scales, enc.last_frame_pad_length)?;
    let (mut best_enc, mut best_dec) = (f64::MAX, f64::MAX);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        let enc = model.encode(x, bw)?;
        best_enc = best_enc.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        model.decode(&enc.codes, &enc.scales, enc.last_frame_pad_length)?;
        best_dec = best_dec.min(t.elapsed().as_secs_f64());
    }
    let threads = candle_core::utils::get_num_threads();
    if json {
        println!(
            "{}",
            serde_json::json!({"impl": "cadenza", "encode_s": best_enc, "decode_s": best_dec, "audio_s": audio_s, "threads": threads})
        );
    } else {
        println!(
            "encode {best_enc:.3} s ({:.1}× real time), decode {best_dec:.3} s ({:.1}× real time), {threads} threads",
            audio_s / best_enc,
            audio_s / best_dec
        );
    }
    Ok(())
}
