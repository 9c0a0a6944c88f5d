//! `cadenza bench load`: N concurrent music-generation streams against a server, for N in a
//! list; reports aggregate frames/s, time to first audio chunk (p50/p95) and per-stream
//! real-time factor. With `--local` it starts the server in this process on a free port (the
//! streams still go through gRPC).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cadenza_proto::v1 as pb;
use clap::Args;

/// Load generator for the music service.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Server to load (ignored with --local).
    #[arg(long, env = "CADENZA_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Start a server in this process on the configuration (default: built-in) and load it.
    #[arg(long)]
    local: bool,
    /// With --local: configuration to serve.
    #[arg(long, env = "CADENZA_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Music model (default: the server's).
    #[arg(long)]
    model: Option<String>,
    /// Concurrent streams per round, comma-separated.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    streams: Vec<usize>,
    /// Seconds of audio each stream generates.
    #[arg(long, default_value_t = 4.0)]
    duration: f32,
    /// Rounds per N; the median round (by aggregate frames/s) is reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// The prompt (each stream gets its own seed).
    #[arg(long, default_value = "solo flute folk tune in D major at 100 bpm")]
    prompt: String,
    /// One JSON object per N instead of a table.
    #[arg(long)]
    json: bool,
}

/// One stream's measurements.
struct StreamStats {
    first_chunk: Duration,
    total: Duration,
    audio_s: f64,
    frames: f64,
}

/// One round of N streams.
#[derive(Debug, Clone)]
struct Round {
    n: usize,
    wall: Duration,
    frames_per_s: f64,
    ttfc_p50: f64,
    ttfc_p95: f64,
    rtf_mean: f64,
    rtf_max: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn one_stream(
    ch: tonic::transport::Channel,
    a: &LoadArgs,
    seed: u64,
    frame_rate: f64,
) -> Result<StreamStats> {
    let mut client = pb::music_client::MusicClient::new(ch).max_decoding_message_size(256 << 20);
    let req = pb::GenerateMusicRequest {
        model: a.model.clone().map(|name| pb::ModelRef { name }),
        prompt: a.prompt.clone(),
        duration_s: a.duration,
        sampling: Some(pb::Sampling {
            seed,
            ..Default::default()
        }),
        output_encoding: pb::Encoding::PcmF32le as i32,
        ..Default::default()
    };
    let t = Instant::now();
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| anyhow::anyhow!("server: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let mut first = None;
    let mut samples = 0usize;
    let mut rate = 0u32;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("server: {} ({:?})", s.message(), s.code()))?
    {
        if let Some(pb::music_event::Event::Audio(c)) = msg.event {
            first.get_or_insert_with(|| t.elapsed());
            let f = c.format.unwrap_or_default();
            rate = f.sample_rate_hz;
            samples += c.data.len() / 4 / f.channels.max(1) as usize;
        }
    }
    let total = t.elapsed();
    let audio_s = if rate > 0 {
        samples as f64 / f64::from(rate)
    } else {
        0.0
    };
    Ok(StreamStats {
        first_chunk: first.context("the stream sent no audio")?,
        total,
        audio_s,
        frames: audio_s * frame_rate,
    })
}

async fn round(ch: &tonic::transport::Channel, a: &LoadArgs, n: usize, fr: f64) -> Result<Round> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| one_stream(ch.clone(), a, 1 + i as u64, fr))
        .collect();
    let stats = futures::future::try_join_all(tasks).await?;
    let wall = t.elapsed();
    let frames: f64 = stats.iter().map(|s| s.frames).sum();
    let mut ttfc: Vec<f64> = stats.iter().map(|s| s.first_chunk.as_secs_f64()).collect();
    ttfc.sort_by(f64::total_cmp);
    let rtf: Vec<f64> = stats
        .iter()
        .map(|s| s.total.as_secs_f64() / s.audio_s.max(1e-9))
        .collect();
    Ok(Round {
        n,
        wall,
        frames_per_s: frames / wall.as_secs_f64(),
        ttfc_p50: percentile(&ttfc, 0.5),
        ttfc_p95: percentile(&ttfc, 0.95),
        rtf_mean: rtf.iter().sum::<f64>() / rtf.len() as f64,
        rtf_max: rtf.iter().copied().fold(0.0, f64::max),
    })
}

/// Runs the benchmark.
pub async fn run(a: LoadArgs) -> Result<()> {
    if a.streams.is_empty() || a.streams.contains(&0) {
        bail!("--streams needs positive counts, e.g. 1,4,8,16");
    }
    // --local: a server in this process, on a free loopback port, with a queue large enough
    // for the biggest round.
    let mut local_stop = None;
    let server = if a.local {
        let mut cfg =
            cadenza_server::Config::load(a.config.as_deref()).map_err(anyhow::Error::msg)?;
        let most = a.streams.iter().copied().max().unwrap_or(1);
        cfg.engine.max_active = cfg.engine.max_active.max(most + cfg.engine.live_reserve);
        cfg.server.metrics_addr = None;
        let engine =
            cadenza_engine::Engine::start(cfg.engine.clone(), &cfg.models, cfg.base_dir.as_deref())
                .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            cadenza_server::serve(&cfg, engine, listener, async {
                let _ = rx.await;
            })
            .await
        });
        local_stop = Some((tx, handle));
        format!("http://{addr}")
    } else {
        a.server.clone()
    };
    let ch = crate::connect(&server).await?;
    // Wait until the server has warmed up, and find the model's frame rate.
    let mut models = pb::models_client::ModelsClient::new(ch.clone());
    let mut health = tonic_health_client(ch.clone());
    let t = Instant::now();
    loop {
        let ok = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| {
                r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            })
            .unwrap_or(false);
        if ok {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{server} did not report SERVING within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list = models
        .list_models(pb::ListModelsRequest {
            kind: "music".into(),
        })
        .await?
        .into_inner()
        .models;
    let m = match &a.model {
        Some(n) => list.iter().find(|m| &m.name == n),
        None => list.first(),
    }
    .context("the server has no such music model")?;
    let fr = m.frame_rate;
    if !a.json {
        println!(
            "model {} ({} parameters), {} s per stream, {} round(s) per N",
            m.name, m.parameters, a.duration, a.rounds
        );
        println!(
            "{:>4} {:>9} {:>12} {:>10} {:>10} {:>9} {:>9} {:>10}",
            "N", "wall s", "frames/s", "ttfc p50", "ttfc p95", "RTF mean", "RTF max", "vs N=1"
        );
    }
    let mut base = None;
    for &n in &a.streams {
        let mut rounds = Vec::new();
        for _ in 0..a.rounds.max(1) {
            rounds.push(round(&ch, &a, n, fr).await?);
        }
        rounds.sort_by(|x, y| x.frames_per_s.total_cmp(&y.frames_per_s));
        let r = rounds[rounds.len() / 2].clone();
        let b = *base.get_or_insert(r.frames_per_s);
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "n": r.n, "wall_s": r.wall.as_secs_f64(), "frames_per_s": r.frames_per_s,
                    "ttfc_p50_s": r.ttfc_p50, "ttfc_p95_s": r.ttfc_p95,
                    "rtf_mean": r.rtf_mean, "rtf_max": r.rtf_max,
                    "throughput_vs_first": r.frames_per_s / b, "model": m.name,
                })
            );
        } else {
            println!(
                "{:>4} {:>9.2} {:>12.1} {:>9.3}s {:>9.3}s {:>9.3} {:>9.3} {:>9.2}x",
                r.n,
                r.wall.as_secs_f64(),
                r.frames_per_s,
                r.ttfc_p50,
                r.ttfc_p95,
                r.rtf_mean,
                r.rtf_max,
                r.frames_per_s / b
            );
        }
    }
    if let Some((tx, handle)) = local_stop {
        let _ = tx.send(());
        handle.await??;
    }
    Ok(())
}

fn tonic_health_client(
    ch: tonic::transport::Channel,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    tonic_health::pb::health_client::HealthClient::new(ch)
}
