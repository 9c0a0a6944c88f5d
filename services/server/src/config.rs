//! Server configuration: one TOML file with `[server]`, `[engine]` and `[[models]]`.
//! `configs/default.toml` is compiled in and used when no file is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cadenza_engine::{EngineConfig, ModelEntry};
use serde::Deserialize;

/// The default configuration: every embedded model.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/default.toml");

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Network and protocol settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Worker and limit settings.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Models to load.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Front-end mode: forward every request to worker processes instead of loading models.
    #[serde(default)]
    pub frontend: FrontendSection,
    /// Directory relative model paths are resolved against (the config file's).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Listen address.
    pub addr: SocketAddr,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long in-flight streams may run after a shutdown signal.
    pub drain_timeout_s: u64,
    /// Where Prometheus metrics are served over HTTP (`GET /metrics`); absent = off.
    pub metrics_addr: Option<SocketAddr>,
    /// This process's name in the worker protocol (`cadenza.v1.Worker/Info`).
    pub worker_id: String,
}

/// `[frontend]`: a server that loads no models and forwards to workers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrontendSection {
    /// Worker servers (`http://host:port`); empty = this server runs its own models.
    pub upstreams: Vec<String>,
    /// How often each upstream's load and models are refreshed, in milliseconds.
    pub refresh_ms: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 64 << 20,
            drain_timeout_s: 10,
            metrics_addr: None,
            worker_id: "cadenza".into(),
        }
    }
}

impl Config {
    /// Parses TOML text; `base_dir` resolves relative model paths.
    pub fn parse(text: &str, base_dir: Option<&Path>) -> Result<Self, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.base_dir = base_dir.map(Path::to_path_buf);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        match path {
            None => Self::parse(DEFAULT_CONFIG, None),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                Self::parse(&text, p.parent()).map_err(|e| format!("{}: {e}", p.display()))
            }
        }
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.engine.validate()?;
        if self.models.is_empty() && self.frontend.upstreams.is_empty() {
            return Err("no [[models]] configured (and no [frontend] upstreams)".into());
        }
        for u in &self.frontend.upstreams {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!(
                    "frontend.upstreams: '{u}' is not an http:// or https:// URL"
                ));
            }
        }
        if self.server.max_message_bytes < 1024 {
            return Err("server.max_message_bytes must be at least 1024".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let cfg = Config::load(None).unwrap();
        assert!(!cfg.models.is_empty());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[server]\nadress = \"x\"\n", None).unwrap_err();
        assert!(err.contains("adress"), "{err}");
    }
}
