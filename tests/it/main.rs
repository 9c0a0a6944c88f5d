//! End-to-end tests: a real server on `127.0.0.1:0`, real tonic clients.
//!
//! Modules: `asr` (recognition through the server, the engine and the model agree; errors),
//! `codec` (round trips and parity through the server), `errors` (every bad input
//! gets a clear status), `music` (streamed generation, parity, validation), `ops` (health,
//! reflection, overload, cancellation, shutdown).

mod asr;
mod codec;
mod defaults;
mod errors;
mod magnet;
mod music;
mod ops;
mod pool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use cadenza_engine::Engine;
use cadenza_proto::v1 as pb;
use cadenza_server::Config;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A server running in this process on an ephemeral port.
pub struct TestServer {
    pub url: String,
    /// `http://…/metrics` of this server.
    pub metrics_url: String,
    pub engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<()>>>,
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/encodec")
}

/// The test configuration: the three parity-fixture codecs plus the embedded default.
pub fn test_config(engine_extra: &str) -> String {
    let f = fixtures();
    // Warm-up is off unless a test asks for it (it would hold slots that tests count).
    let warmup = if engine_extra.contains("warmup") {
        ""
    } else {
        "warmup = false"
    };
    format!(
        r#"
[server]
addr = "127.0.0.1:0"
drain_timeout_s = 2

[engine]
max_active = 4
max_queue = 8
max_audio_seconds = 30.0
max_code_frames = 3000
slow_consumer_timeout_ms = 2000
codec_step_seconds = 0.5
{warmup}
{engine_extra}

[[models]]
name = "causal24"
kind = "codec"
source = "{c24}"

[[models]]
name = "noncausal32"
kind = "codec"
source = "{n32}"

[[models]]
name = "norm48"
kind = "codec"
source = "{n48}"

[[models]]
name = "default"
kind = "codec"
source = "embedded:encodec-tiny"

[[models]]
name = "musicgen"
kind = "music"
source = "{mg}"

[[models]]
name = "paraformer"
kind = "asr"
source = "{pf}"
"#,
        c24 = f.join("causal24").display(),
        n32 = f.join("noncausal32").display(),
        n48 = f.join("norm48").display(),
        mg = f.join("../musicgen/hf-tiny").display(),
        pf = f.join("../paraformer/tiny").display(),
    )
}

impl TestServer {
    pub async fn start(config_toml: &str) -> Result<Self> {
        let cfg = Config::parse(config_toml, None).map_err(anyhow::Error::msg)?;
        let engine =
            Engine::start(cfg.engine.clone(), &cfg.models, None).map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let metrics_url = format!("http://{}/metrics", metrics.local_addr()?);
        let (stop, rx) = oneshot::channel::<()>();
        let e = engine.clone();
        let handle = tokio::spawn(async move {
            cadenza_server::serve_with(&cfg, e, listener, Some(metrics), async {
                let _ = rx.await;
            })
            .await
        });
        Ok(Self {
            url,
            metrics_url,
            engine,
            stop: Some(stop),
            handle: Some(handle),
        })
    }

    pub async fn default() -> Result<Self> {
        Self::start(&test_config("")).await
    }

    pub async fn channel(&self) -> Result<Channel> {
        Ok(tonic::transport::Endpoint::from_shared(self.url.clone())?
            .connect()
            .await?)
    }

    pub async fn codec(&self) -> Result<pb::codec_client::CodecClient<Channel>> {
        Ok(pb::codec_client::CodecClient::new(self.channel().await?)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20))
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), h).await???;
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Reference tensors of a fixture (`io.safetensors`), as flat vectors with shapes.
pub struct Fixture {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Fixture {
    pub fn load(name: &str) -> Result<Self> {
        let bytes = std::fs::read(fixtures().join(name).join("io.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let mut tensors = HashMap::new();
        for (k, t) in st.tensors() {
            let vals: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                d => anyhow::bail!("unsupported dtype {d:?} for {k}"),
            };
            tensors.insert(k, (t.shape().to_vec(), vals));
        }
        Ok(Self { tensors })
    }

    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, v) = &self.tensors[key];
        (s.clone(), v.iter().map(|&x| x as f32).collect())
    }

    pub fn u32(&self, key: &str) -> (Vec<usize>, Vec<u32>) {
        let (s, v) = &self.tensors[key];
        (s.clone(), v.iter().map(|&x| x as u32).collect())
    }
}

pub fn f32le(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

pub fn from_f32le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn model(name: &str) -> Option<pb::ModelRef> {
    Some(pb::ModelRef { name: name.into() })
}

/// Interleaves a `[1, C, T]` planar fixture tensor.
pub fn interleave(shape: &[usize], planar: &[f32]) -> Vec<f32> {
    let (c, t) = (shape[1], shape[2]);
    let mut out = vec![0.0; c * t];
    for ch in 0..c {
        for i in 0..t {
            out[i * c + ch] = planar[ch * t + i];
        }
    }
    out
}

pub fn raw_f32(rate: u32, channels: u32) -> Option<pb::AudioFormat> {
    Some(pb::AudioFormat {
        encoding: pb::Encoding::PcmF32le as i32,
        sample_rate_hz: rate,
        channels,
    })
}
