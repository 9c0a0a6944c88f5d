//! `cadenza`: run the server, or talk to one (or run models in process with `--local`).

mod asr_cmd;
mod bench_load;
mod codec_cmd;
mod codes_file;
#[cfg(feature = "mic")]
mod mic;
mod music_cmd;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use cadenza_server::Config;
use clap::{Args, Parser, Subcommand};

/// Cadenza: audio generation and recognition over gRPC.
#[derive(Parser, Debug)]
#[command(name = "cadenza", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the gRPC server (all services, health, reflection) on the configured models.
    Serve(ServeArgs),
    /// Check a configuration file, or print the built-in default.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// List the models a server (or the local configuration) provides.
    Models {
        #[command(flatten)]
        client: ClientArgs,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Neural codec: audio to codes and back.
    Codec {
        #[command(subcommand)]
        action: codec_cmd::CodecAction,
    },
    /// Text-to-music: generate a WAV from a description (streams while it generates).
    Music(music_cmd::MusicArgs),
    /// Transcribe speech from files or the microphone (Paraformer).
    Asr(asr_cmd::AsrArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        action: BenchAction,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration (default: the built-in configs/default.toml with the embedded models).
    #[arg(long, env = "CADENZA_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.addr` (e.g. 0.0.0.0:50051).
    #[arg(long, env = "CADENZA_ADDR")]
    addr: Option<std::net::SocketAddr>,
    /// Prometheus metrics address, overriding `server.metrics_addr` ("off" disables).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Front-end mode: load no models and forward every request to this worker server
    /// (repeat for several; overrides `[frontend] upstreams`).
    #[arg(long = "upstream", value_name = "URL")]
    upstreams: Vec<String>,
    /// This process's name in the worker protocol (overrides `server.worker_id`).
    #[arg(long)]
    worker_id: Option<String>,
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Load the configuration and its models, then report what would be served.
    Validate {
        /// TOML configuration (default: built-in).
        #[arg(long, env = "CADENZA_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the built-in default configuration.
    ShowDefault,
}

/// Options shared by every command that talks to a server or runs locally.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Server to talk to.
    #[arg(long, env = "CADENZA_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Run in this process instead of calling a server.
    #[arg(long)]
    pub local: bool,
    /// With --local: configuration to load models from (default: built-in).
    #[arg(long, env = "CADENZA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model: a registry name (default: the server's default model of that kind); with --local
    /// also a Hugging Face model directory (EnCodec for `codec`, MusicGen for `music`).
    #[arg(long)]
    pub model: Option<String>,
}

#[derive(Subcommand, Debug)]
enum BenchAction {
    /// Time EnCodec encode and decode of an input (see tools/bench/codec.sh).
    Codec {
        /// Hugging Face EnCodec directory.
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with a float32 `input` tensor [1, channels, samples].
        #[arg(long)]
        input: PathBuf,
        /// Bandwidth in kbps (default: the model's highest).
        #[arg(long)]
        bandwidth: Option<f32>,
        /// Timed repetitions; the best is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Expected CPU threads; candle takes its thread count from RAYON_NUM_THREADS, so a
        /// mismatch is an error rather than a silently different benchmark.
        #[arg(long)]
        threads: Option<usize>,
        /// Print one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// N concurrent music streams against a server: aggregate frames/s, time to first chunk,
    /// real-time factor (see README "Benchmarks").
    Load(bench_load::LoadArgs),
    /// Paraformer real-time factor in process: offline (whole file) and streaming (600 ms
    /// chunks, a partial per chunk), with per-chunk partial latency (see tools/bench/paraformer.sh).
    Asr(asr_cmd::BenchAsrArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Connects to a Cadenza server, with an error that says what to check.
pub async fn connect(server: &str) -> Result<tonic::transport::Channel> {
    tonic::transport::Endpoint::from_shared(server.to_string())
        .with_context(|| format!("bad server address {server}"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot connect to {server} (is `cadenza serve` running? or use --local)")
        })
}

/// Loads a configuration and starts an engine on it.
pub fn start_engine(config: Option<&std::path::Path>) -> Result<(Config, cadenza_engine::Engine)> {
    let cfg = Config::load(config).map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let engine =
        cadenza_engine::Engine::start(cfg.engine.clone(), &cfg.models, cfg.base_dir.as_deref())
            .map_err(anyhow::Error::msg)?;
    tracing::info!(models = cfg.models.len(), elapsed = ?t.elapsed(), "models loaded");
    Ok((cfg, engine))
}

/// `engine.threads` is process-wide (candle sizes its thread pools from `RAYON_NUM_THREADS`
/// when they are first used), so `serve` re-executes itself with the variable set when the
/// configuration asks for a count the environment does not already give.
#[cfg(unix)]
fn ensure_threads(threads: usize) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if threads == 0 {
        return Ok(());
    }
    let want = threads.to_string();
    if std::env::var("RAYON_NUM_THREADS").ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding the cadenza executable")?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("RAYON_NUM_THREADS", &want)
        .env("CANDLE_NUM_THREADS", &want)
        .exec();
    Err(anyhow::anyhow!(
        "restarting with RAYON_NUM_THREADS={want}: {err}"
    ))
}

#[cfg(not(unix))]
fn ensure_threads(threads: usize) -> Result<()> {
    if threads != 0 && threads != candle_core::utils::get_num_threads() {
        anyhow::bail!("engine.threads = {threads}: set RAYON_NUM_THREADS={threads} instead");
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut cfg = Config::load(args.config.as_deref()).map_err(anyhow::Error::msg)?;
    if let Some(addr) = args.addr {
        cfg.server.addr = addr;
    }
    if let Some(m) = &args.metrics_addr {
        cfg.server.metrics_addr = if m == "off" {
            None
        } else {
            Some(m.parse().with_context(|| format!("--metrics-addr {m}"))?)
        };
    }
    if let Some(id) = args.worker_id {
        cfg.server.worker_id = id;
    }
    if !args.upstreams.is_empty() {
        cfg.frontend.upstreams = args.upstreams;
        cfg.validate().map_err(anyhow::Error::msg)?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.server.addr)
        .await
        .with_context(|| format!("binding {}", cfg.server.addr))?;
    if !cfg.frontend.upstreams.is_empty() {
        eprintln!(
            "cadenza front-end listening on {}, forwarding to {}",
            listener.local_addr()?,
            cfg.frontend.upstreams.join(", ")
        );
        return cadenza_server::serve_frontend(&cfg, listener, shutdown_signal()).await;
    }
    ensure_threads(cfg.engine.threads)?;
    let t = Instant::now();
    let engine =
        cadenza_engine::Engine::start(cfg.engine.clone(), &cfg.models, cfg.base_dir.as_deref())
            .map_err(anyhow::Error::msg)?;
    tracing::info!(models = cfg.models.len(), elapsed = ?t.elapsed(), "models loaded");
    eprintln!("cadenza listening on {}", listener.local_addr()?);
    cadenza_server::serve(&cfg, engine, listener, shutdown_signal()).await
}

fn validate(config: Option<PathBuf>) -> Result<()> {
    let (_cfg, engine) = start_engine(config.as_deref())?;
    for m in engine.models() {
        println!(
            "{}\t{}\t{}\t{} Hz\t{} params{}",
            m.name,
            m.kind.as_str(),
            m.source,
            m.sample_rate,
            m.parameters,
            if m.untrained { "\tUNTRAINED" } else { "" }
        );
    }
    println!("configuration OK");
    Ok(())
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Config {
            action: ConfigAction::Validate { config },
        } => validate(config),
        Command::Config {
            action: ConfigAction::ShowDefault,
        } => {
            print!("{}", cadenza_server::config::DEFAULT_CONFIG);
            Ok(())
        }
        Command::Models { client, json } => codec_cmd::list_models(&client, json).await,
        Command::Codec { action } => codec_cmd::run(action).await,
        Command::Music(args) => music_cmd::run(args).await,
        Command::Asr(args) => asr_cmd::run(args).await,
        Command::Bench {
            action:
                BenchAction::Codec {
                    model,
                    input,
                    bandwidth,
                    repeats,
                    threads,
                    json,
                },
        } => {
            let have = candle_core::utils::get_num_threads();
            if let Some(t) = threads.filter(|&t| t != have) {
                anyhow::bail!("--threads {t}, but candle uses {have}: set RAYON_NUM_THREADS={t}");
            }
            codec_cmd::bench(&model, &input, bandwidth, repeats, json)
        }
        Command::Bench {
            action: BenchAction::Load(args),
        } => bench_load::run(args).await,
        Command::Bench {
            action: BenchAction::Asr(args),
        } => asr_cmd::bench(args),
    }
}

/// candle asks for its thread count on every matrix product; without `RAYON_NUM_THREADS` it
/// re-reads `/proc/cpuinfo` each time (candle-core 0.11 `utils::get_num_threads` →
/// `num_cpus::get_physical`), which cost more than the small models' math in profiles of
/// `bench load`. So the process re-executes itself once with the variable set to the cores it
/// may use; `engine.threads` (see `ensure_threads`) overrides it for `serve`.
#[cfg(unix)]
fn pin_thread_count() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Ok(exe) = std::env::current_exe() {
        // Only returns on failure; then run on without it.
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("RAYON_NUM_THREADS", n.to_string())
            .exec();
        eprintln!("warning: could not set RAYON_NUM_THREADS ({err}); continuing");
    }
}

#[cfg(not(unix))]
fn pin_thread_count() {}

fn main() {
    pin_thread_count();
    init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(err) = rt.block_on(run()) {
        // A closed stdout (e.g. `| head`) is not an error.
        if err.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(0);
        }
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
