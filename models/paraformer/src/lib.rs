//! Paraformer: non-autoregressive speech recognition (FunASR), on candle.
//!
//! Paraformer (Gao et al., "Paraformer: Fast and Accurate Parallel Transformer for
//! Non-autoregressive End-to-End Speech Recognition", Interspeech 2022, arXiv:2206.08317) encodes
//! LFR fbank features with a SAN-M encoder (self-attention + FSMN memory), predicts the token
//! count and one acoustic embedding per token with a continuous integrate-and-fire (CIF)
//! predictor, and decodes every token at once with a SAN-M decoder. Reference implementation:
//! FunASR 1.4.16, `funasr/models/paraformer/{model,cif_predictor,decoder}.py`,
//! `funasr/models/sanm/{encoder,attention}.py`, `funasr/frontends/wav_frontend.py`
//! (<https://github.com/modelscope/FunASR>).
//!
//! A model directory as published (e.g. `paraformer-zh`,
//! `speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch`) holds `model.pt` (torch
//! zip state dict), `config.yaml`, `am.mvn` and `tokens.json` (or `tokens.txt`):
//!
//! ```no_run
//! let model = cadenza_paraformer::Paraformer::load("paraformer-zh", &candle_core::Device::Cpu)?;
//! let pcm: Vec<f32> = vec![0.0; 16000]; // 16 kHz mono in [-1, 1]
//! let t = model.recognize(&pcm)?;
//! println!("{} {:?}", t.text, t.timestamps);
//! # Ok::<(), cadenza_paraformer::ParaformerError>(())
//! ```
//!
//! Batch size 1 per call; weights are shared (`Paraformer` is cheap to clone).
//! [`StreamingRecognizer`] gives partial results while audio arrives by re-decoding the
//! utterance so far (the offline model; FunASR's chunked `ParaformerStreaming` checkpoints are not
//! supported yet and fail at load).

pub mod config;
pub mod model;
pub mod text;

use std::path::Path;

use cadenza_audio::{
    Cmvn, FbankError, FbankOptions, Features, Frontend, FrontendConfig, WindowType,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::Config;
pub use model::CifOutput;
use model::Network;

/// Errors of loading or running a Paraformer.
#[derive(Debug, thiserror::Error)]
pub enum ParaformerError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `config.yaml` or the token list is malformed or inconsistent.
    #[error("bad Paraformer config: {0}")]
    Config(String),
    /// The checkpoint uses an option this implementation does not support.
    #[error("unsupported Paraformer option: {0}")]
    Unsupported(String),
    /// Frontend (fbank / CMVN) error.
    #[error(transparent)]
    Frontend(#[from] FbankError),
    /// Tensor error (missing or mis-shaped weight, device error).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ParaformerError>;

/// One recognition result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    /// Token ids (blank, `<s>`, `</s>` removed).
    pub token_ids: Vec<u32>,
    /// Token strings of `token_ids`.
    pub tokens: Vec<String>,
    /// Joined text (FunASR `sentence_postprocess`).
    pub text: String,
    /// `[start_ms, end_ms]` per token (FunASR `ts_prediction_lfr6_standard`, silences dropped).
    pub timestamps: Vec<[i64; 2]>,
}

/// A loaded Paraformer model: frontend, networks and token list.
#[derive(Debug, Clone)]
pub struct Paraformer {
    config: Config,
    frontend: Frontend,
    net: Network,
    tokens: Vec<String>,
    device: Device,
}

const BLANK: u32 = 0;
const SOS: u32 = 1;
const EOS: u32 = 2;

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ParaformerError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Read `tokens.json` (a JSON list) or `tokens.txt` (one token per line).
pub fn load_tokens(dir: &Path) -> Result<Vec<String>> {
    let json = dir.join("tokens.json");
    if json.exists() {
        return serde_json::from_str(&read(&json)?)
            .map_err(|e| ParaformerError::Config(format!("tokens.json: {e}")));
    }
    let txt = dir.join("tokens.txt");
    Ok(read(&txt)?
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect())
}

impl Paraformer {
    /// Load a FunASR Paraformer directory (`model.pt`, `config.yaml`, `am.mvn`, `tokens.json`
    /// or `tokens.txt`). Unsupported options fail here, named.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Config::from_yaml(&read(&dir.join("config.yaml"))?)?;
        config.validate()?;
        let tokens = load_tokens(dir)?;
        if tokens.len() <= EOS as usize {
            return Err(ParaformerError::Config(format!(
                "{} tokens: need at least <blank>, <s>, </s>",
                tokens.len()
            )));
        }
        let cmvn = Cmvn::from_file(dir.join("am.mvn"))?;
        let fc = &config.frontend_conf;
        let frontend = Frontend::new(
            FrontendConfig {
                fbank: FbankOptions {
                    sample_rate: fc.fs,
                    num_mel_bins: fc.n_mels,
                    frame_length_ms: fc.frame_length,
                    frame_shift_ms: fc.frame_shift,
                    dither: 0.0,
                    window: WindowType::parse(&fc.window)?,
                    input_scale: if fc.upsacle_samples { 32768.0 } else { 1.0 },
                    ..FbankOptions::default()
                },
                lfr_m: fc.lfr_m,
                lfr_n: fc.lfr_n,
            },
            Some(cmvn),
        )?;
        let vb = load_state_dict(&dir.join("model.pt"), device)?;
        let vocab = tokens.len();
        let net = Network::new(&config, vocab, vb)?;
        Ok(Paraformer {
            config,
            frontend,
            net,
            tokens,
            device: device.clone(),
        })
    }

    /// The parsed `config.yaml`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The feature frontend (fbank + LFR + CMVN).
    pub fn frontend(&self) -> &Frontend {
        &self.frontend
    }

    /// Expected input sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        self.config.frontend_conf.fs
    }

    /// The token list.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// The networks (for tests and tools).
    pub fn network(&self) -> &Network {
        &self.net
    }

    /// Recognise one utterance of mono samples in [-1, 1] at [`sample_rate`](Self::sample_rate).
    pub fn recognize(&self, pcm: &[f32]) -> Result<Transcript> {
        self.recognize_features(&self.frontend.features(pcm))
    }

    /// `[1, T, D]` tensor of frontend features.
    pub fn features_tensor(&self, feats: &Features) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &feats.data,
            (1, feats.frames(), feats.dim),
            &self.device,
        )?)
    }

    /// Recognise from frontend features.
    pub fn recognize_features(&self, feats: &Features) -> Result<Transcript> {
        if feats.frames() == 0 {
            return Ok(Transcript::default());
        }
        let enc = self.net.encoder.forward(&self.features_tensor(feats)?)?;
        let cif = self.net.predictor.forward(&enc)?;
        if cif.token_num == 0 {
            return Ok(Transcript::default());
        }
        let logp = self.net.decoder.forward(&cif.embeds, &enc)?;
        let ids: Vec<u32> = logp.squeeze(0)?.argmax(candle_core::D::Minus1)?.to_vec1()?;
        Ok(self.transcript(&ids, &cif))
    }

    /// Build the transcript of argmax ids: drop blank/sos/eos, map to tokens, join, timestamps
    /// (as `Paraformer.inference` with a tokenizer and `output_timestamp`).
    fn transcript(&self, ids: &[u32], cif: &CifOutput) -> Transcript {
        let token_ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i != BLANK && i != SOS && i != EOS)
            .collect();
        let tokens: Vec<String> = token_ids
            .iter()
            .map(|&i| {
                self.tokens
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_else(|| "<unk>".into())
            })
            .collect();
        // Paraformer.inference passes (peaks, alphas) to the (us_alphas, us_peaks) parameters.
        let timestamps = text::ts_prediction_lfr6_standard(&cif.peaks, &cif.alphas, &tokens);
        let text = text::sentence_postprocess(&tokens);
        Transcript {
            token_ids,
            tokens,
            text,
            timestamps,
        }
    }

    /// A streaming session over this model.
    pub fn streaming(&self) -> StreamingRecognizer {
        StreamingRecognizer {
            model: self.clone(),
            frontend: self.frontend.stream(),
            feats: Features {
                data: Vec::new(),
                dim: self.frontend.dim(),
            },
            decoded_frames: 0,
            partial_every: 10,
        }
    }
}

/// Read the state dict of `model.pt`: a torch zip whose pickle is the state dict itself (as
/// published) or a dict holding it under `state_dict` / `model` (FunASR training checkpoints).
fn load_state_dict(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let mut last = None;
    for key in [None, Some("state_dict"), Some("model")] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(t) if !t.is_empty() => {
                let map = t.into_iter().collect();
                return Ok(VarBuilder::from_tensors(map, DType::F32, device));
            }
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => e.into(),
        None => ParaformerError::Config(format!("{}: no tensors found", path.display())),
    })
}

/// A partial (or final) result of a streaming session.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// The transcript of all audio so far.
    pub transcript: Transcript,
    /// True for the result of [`StreamingRecognizer::finish`].
    pub is_final: bool,
}

/// Streaming session over an offline [`Paraformer`]: features are extracted incrementally;
/// every `partial_every` new LFR frames (600 ms by default at 60 ms per frame) the utterance so
/// far is re-recognised and returned as a [`Partial`]. [`finish`](Self::finish) returns exactly
/// [`Paraformer::recognize`] of the whole input.
#[derive(Debug, Clone)]
pub struct StreamingRecognizer {
    model: Paraformer,
    frontend: cadenza_audio::StreamingFrontend,
    feats: Features,
    decoded_frames: usize,
    partial_every: usize,
}

impl StreamingRecognizer {
    /// Set how many new LFR frames trigger a partial result (at least 1).
    pub fn with_partial_every(mut self, frames: usize) -> Self {
        self.partial_every = frames.max(1);
        self
    }

    /// Add samples; returns a partial result when enough new audio arrived.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<Partial>> {
        self.feats.extend(&self.frontend.push(samples));
        if self.feats.frames() >= self.decoded_frames + self.partial_every {
            self.decoded_frames = self.feats.frames();
            let transcript = self.model.recognize_features(&self.feats)?;
            return Ok(vec![Partial {
                transcript,
                is_final: false,
            }]);
        }
        Ok(Vec::new())
    }

    /// End of audio: the final transcript. The session is reset for a new utterance.
    pub fn finish(&mut self) -> Result<Partial> {
        self.feats.extend(&self.frontend.finish());
        let transcript = self.model.recognize_features(&self.feats)?;
        self.frontend.reset();
        self.feats.data.clear();
        self.decoded_frames = 0;
        Ok(Partial {
            transcript,
            is_final: true,
        })
    }
}
