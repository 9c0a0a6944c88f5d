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
//!
//! Streaming: for FunASR's chunked model (`paraformer-zh-streaming` format: `model:
//! ParaformerStreaming`, `encoder: SANMEncoderChunkOpt`) [`Paraformer::streaming`] runs the
//! reference's chunked inference ([`ChunkSession`]: encoder with feature/look-back caches, CIF
//! state carried across chunks, cached decoder, final flush) and yields one partial per chunk;
//! [`Paraformer::recognize`] of such a model runs the same chunking over the whole input. For an
//! offline `Paraformer` the [`StreamingRecognizer`] re-decodes the utterance so far.

pub mod config;
pub mod model;
pub mod ngram;
pub mod search;
pub mod text;

use std::path::Path;

use cadenza_audio::{
    Cmvn, FbankError, FbankOptions, Features, Frontend, FrontendConfig, WindowType,
};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::Config;
pub use model::{ChunkConfig, CifOutput};
use model::{CifChunkState, DecoderChunkState, EncoderChunkState, Network};
pub use ngram::NgramLm;
pub use search::DecodeOptions;

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
    num_parameters: usize,
    device: Device,
    decoding: DecodeOptions,
    /// The frontend under each of `decoding.vtln_warps` (empty when there are none).
    warped: Vec<Frontend>,
}

/// `decoding.yaml` of a model directory (Cadenza's; the keys are FunASR's / ESPnet's inference
/// options): beam search with n-gram shallow fusion. Every key is optional; an absent file or
/// `ngram_weight: 0` decodes greedily (the reference's default).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodingConfig {
    /// Hypotheses kept per position (`beam_size`, default 10).
    #[serde(default)]
    pub beam_size: Option<usize>,
    /// The ARPA file (plain or `.gz`), relative to the model directory (`ngram_file`).
    #[serde(default)]
    pub ngram_file: Option<String>,
    /// Weight of the LM's log10 probabilities (`ngram_weight`).
    #[serde(default)]
    pub ngram_weight: Option<f32>,
    /// Score added per token (`penalty`).
    #[serde(default)]
    pub penalty: Option<f32>,
    /// Weight of joint CTC prefix scoring (`decoding_ctc_weight`, 0..=1); used only when the
    /// checkpoint has its CTC layer (`ctc.ctc_lo`), as FunASR.
    #[serde(default)]
    pub decoding_ctc_weight: Option<f32>,
    /// Test-time VTLN (`vtln_warps`, Cadenza's): whole-utterance recognition decodes the
    /// utterance once per warp factor of the mel banks (Kaldi's VTLN warp) and keeps the
    /// transcript with the best score per token position; `[]` turns it off.
    #[serde(default)]
    pub vtln_warps: Option<Vec<f32>>,
}

impl DecodingConfig {
    /// Parse `decoding.yaml` text.
    pub fn from_yaml(text: &str) -> Result<Self> {
        serde_yaml::from_str(text)
            .map_err(|e| ParaformerError::Config(format!("decoding.yaml: {e}")))
    }

    /// `other`'s keys where it sets them, else this one's.
    pub fn overridden_by(&self, other: &DecodingConfig) -> DecodingConfig {
        DecodingConfig {
            beam_size: other.beam_size.or(self.beam_size),
            ngram_file: other.ngram_file.clone().or_else(|| self.ngram_file.clone()),
            ngram_weight: other.ngram_weight.or(self.ngram_weight),
            penalty: other.penalty.or(self.penalty),
            decoding_ctc_weight: other.decoding_ctc_weight.or(self.decoding_ctc_weight),
            vtln_warps: other.vtln_warps.clone().or_else(|| self.vtln_warps.clone()),
        }
    }

    /// The decoding options, with the LM built from `ngram` (the bytes of `ngram_file`, read
    /// by the caller) over `tokens`. Checks the values.
    pub fn options(&self, ngram: Option<&[u8]>, tokens: &[String]) -> Result<DecodeOptions> {
        let beam_size = self.beam_size.unwrap_or(10);
        let ngram_weight = self.ngram_weight.unwrap_or(0.0);
        let penalty = self.penalty.unwrap_or(0.0);
        let ctc_weight = self.decoding_ctc_weight.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&ctc_weight) {
            return Err(ParaformerError::Config(format!(
                "decoding: decoding_ctc_weight {ctc_weight} (0..=1)"
            )));
        }
        if beam_size == 0 || beam_size > 100 {
            return Err(ParaformerError::Config(format!(
                "decoding: beam_size {beam_size} (1..=100)"
            )));
        }
        if !ngram_weight.is_finite() || ngram_weight < 0.0 || !penalty.is_finite() {
            return Err(ParaformerError::Config(format!(
                "decoding: ngram_weight {ngram_weight} must be >= 0, penalty {penalty} finite"
            )));
        }
        let vtln_warps = self.vtln_warps.clone().unwrap_or_default();
        if vtln_warps.len() > 9 || vtln_warps.iter().any(|w| !(0.7..=1.4).contains(w)) {
            return Err(ParaformerError::Config(format!(
                "decoding: vtln_warps {vtln_warps:?} (at most 9 factors, each 0.7..=1.4)"
            )));
        }
        let ngram = match ngram {
            Some(b) => Some(std::sync::Arc::new(NgramLm::from_bytes(b, tokens)?)),
            None if ngram_weight > 0.0 => {
                return Err(ParaformerError::Config(
                    "decoding: ngram_weight > 0 needs an ngram_file".into(),
                ));
            }
            None => None,
        };
        Ok(DecodeOptions {
            beam_size,
            ngram,
            ngram_weight,
            penalty,
            ctc_weight,
            vtln_warps,
        })
    }

    /// This configuration (a model's own) under `overrides` (a service configuration's), as
    /// decoding options: `read_lm` gives the bytes of the `ngram_file` the merged configuration
    /// names (none read when it names none).
    pub fn resolve<'a>(
        &self,
        overrides: &DecodingConfig,
        tokens: &[String],
        read_lm: impl FnOnce(&str) -> Result<std::borrow::Cow<'a, [u8]>>,
    ) -> Result<DecodeOptions> {
        let cfg = self.overridden_by(overrides);
        let bytes = cfg.ngram_file.as_deref().map(read_lm).transpose()?;
        cfg.options(bytes.as_deref(), tokens)
    }

    /// Read a model directory's `decoding.yaml` (default: none) and its `ngram_file`.
    pub fn load_options(
        dir: &Path,
        overrides: &DecodingConfig,
        tokens: &[String],
    ) -> Result<DecodeOptions> {
        let file = dir.join("decoding.yaml");
        let base = if file.exists() {
            Self::from_yaml(&read(&file)?)?
        } else {
            DecodingConfig::default()
        };
        base.resolve(overrides, tokens, |f| {
            read_bytes(&dir.join(f)).map(std::borrow::Cow::Owned)
        })
    }
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

/// The bytes of a file, or [`ParaformerError::Io`] naming it.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ParaformerError::Io {
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
    /// or `tokens.txt`; optionally Cadenza's `decoding.yaml` and the n-gram LM it names).
    /// Unsupported options fail here, named. A `model.safetensors` with the same keys may stand
    /// in for `model.pt` (Cadenza's embedded defaults ship that way).
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_with(dir, &DecodingConfig::default(), device)
    }

    /// [`load`](Self::load), with `overrides` on top of the directory's `decoding.yaml`
    /// (a relative `ngram_file` resolves against the directory).
    pub fn load_with(
        dir: impl AsRef<Path>,
        overrides: &DecodingConfig,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let config = read(&dir.join("config.yaml"))?;
        let tokens = load_tokens(dir)?;
        let cmvn = Cmvn::from_file(dir.join("am.mvn"))?;
        let pt = dir.join("model.pt");
        let st = dir.join("model.safetensors");
        let tensors = if !pt.exists() && st.exists() {
            candle_core::safetensors::load(&st, device)?
        } else {
            load_state_dict(&pt)?
        };
        let decoding = DecodingConfig::load_options(dir, overrides, &tokens)?;
        Self::from_parts(&config, tokens, cmvn, tensors, device)?.with_decoding(decoding)
    }

    /// This model with other decoding options (greedy by default; see [`DecodingConfig`]).
    /// Fails when a VTLN warp factor does not fit the frontend's mel range.
    pub fn with_decoding(mut self, decoding: DecodeOptions) -> Result<Self> {
        self.warped = decoding
            .vtln_warps
            .iter()
            .map(|&w| self.frontend.with_vtln_warp(w))
            .collect::<std::result::Result<_, _>>()?;
        self.decoding = decoding;
        Ok(self)
    }

    /// The decoding options in use.
    pub fn decoding(&self) -> &DecodeOptions {
        &self.decoding
    }

    /// Build from the parts of a model directory already in memory: `config.yaml` text, the
    /// token list, the CMVN statistics (`am.mvn`) and the state dict's tensors (FunASR keys;
    /// any float dtype, computed in f32).
    pub fn from_parts(
        config_yaml: &str,
        tokens: Vec<String>,
        cmvn: Cmvn,
        tensors: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let config = Config::from_yaml(config_yaml)?;
        config.validate()?;
        if tokens.len() <= EOS as usize {
            return Err(ParaformerError::Config(format!(
                "{} tokens: need at least <blank>, <s>, </s>",
                tokens.len()
            )));
        }
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
        // The CTC head of `ctc_weight > 0` recipes is read (for joint CTC scoring) when present,
        // but not counted: the recogniser's size is encoder, predictor and decoder.
        let num_parameters = tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("ctc."))
            .map(|(_, t)| t.elem_count())
            .sum();
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let vocab = tokens.len();
        let net = Network::new(&config, vocab, vb)?;
        Ok(Paraformer {
            config,
            frontend,
            net,
            tokens,
            num_parameters,
            device: device.clone(),
            decoding: DecodeOptions::default(),
            warped: Vec::new(),
        })
    }

    /// Values in the checkpoint (`model.pt`).
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
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
    ///
    /// With `vtln_warps` in the decoding options (an offline model), the utterance is decoded
    /// once per warp factor of the fbank's mel banks and the transcript with the highest
    /// decoding score per token position wins (the beam score with its LM and CTC terms, or the
    /// greedy path's summed log-probability; the first factor wins a tie). This is the
    /// per-utterance warp search of VTLN (Lee and Rose 1996; Kaldi's `--vtln-warp`), scored by
    /// the recogniser itself instead of a GMM likelihood. Streaming models, and a
    /// [`StreamingRecognizer`]'s partial and final results, decode the frontend as it is (the
    /// service's segment finals call this method on the segment's samples).
    pub fn recognize(&self, pcm: &[f32]) -> Result<Transcript> {
        if self.warped.is_empty() || self.is_streaming() {
            return self.recognize_features(&self.frontend.features(pcm));
        }
        let mut best: Option<(f32, Transcript)> = None;
        for fe in &self.warped {
            let (t, score) = self.decode_offline(&fe.features(pcm))?;
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, t));
            }
        }
        Ok(best.map(|(_, t)| t).unwrap_or_default())
    }

    /// `[1, T, D]` tensor of frontend features.
    pub fn features_tensor(&self, feats: &Features) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &feats.data,
            (1, feats.frames(), feats.dim),
            &self.device,
        )?)
    }

    /// True for a chunked streaming model (`model: ParaformerStreaming`).
    pub fn is_streaming(&self) -> bool {
        self.config.is_streaming()
    }

    /// A low-level chunked inference session of a streaming model (feed features chunk by
    /// chunk). Fails for an offline model.
    pub fn chunk_session(&self, chunk: ChunkConfig) -> Result<ChunkSession> {
        if !self.is_streaming() {
            return Err(ParaformerError::Unsupported(
                "chunked inference needs a ParaformerStreaming model".into(),
            ));
        }
        if chunk.chunk_size[1] == 0 {
            return Err(ParaformerError::Config("chunk_size[1] must be > 0".into()));
        }
        Ok(ChunkSession {
            model: self.clone(),
            chunk,
            enc: EncoderChunkState::new(self.config.input_size(), &chunk, &self.device)?,
            cif: CifChunkState::default(),
            dec: DecoderChunkState::default(),
        })
    }

    /// Recognise from frontend features. A streaming model runs its chunked inference with the
    /// default [`ChunkConfig`] (as `ParaformerStreaming.inference` with `is_final=True` on the
    /// whole input: full chunks, then the rest as the final chunk, or a tail flush when nothing
    /// is left); timestamps are empty then (the streaming reference outputs none).
    pub fn recognize_features(&self, feats: &Features) -> Result<Transcript> {
        if self.is_streaming() {
            let mut s = self.chunk_session(ChunkConfig::default())?;
            let ids = s.run_all(feats)?;
            return Ok(self.transcript_ids(&ids));
        }
        Ok(self.decode_offline(feats)?.0)
    }

    /// Offline decoding of `feats`: the transcript and its score per token position (the
    /// best beam hypothesis's score, or the greedy path's summed log-probability, divided by
    /// the predicted token count; `-inf` when nothing was predicted).
    fn decode_offline(&self, feats: &Features) -> Result<(Transcript, f32)> {
        let none = || (Transcript::default(), f32::NEG_INFINITY);
        if feats.frames() == 0 {
            return Ok(none());
        }
        let enc = self.net.encoder.forward(&self.features_tensor(feats)?)?;
        let cif = self.net.predictor.forward(&enc)?;
        if cif.token_num == 0 {
            return Ok(none());
        }
        let positions = cif.token_num as f32;
        let logp = self.net.decoder.forward(&cif.embeds, &enc)?.squeeze(0)?;
        if self.decoding.uses_beam_search(self.net.ctc.is_some()) {
            let am: Vec<f32> = logp.flatten_all()?.to_vec1()?;
            let ctc = if self.decoding.ctc_weight > 0.0 {
                self.net.ctc_log_probs(&enc)?
            } else {
                None
            };
            let hyps =
                search::beam_search(&am, self.tokens.len(), EOS, &self.decoding, ctc.as_deref());
            let Some(best) = hyps.first() else {
                return Ok(none());
            };
            return Ok((self.transcript(&best.tokens, &cif), best.score / positions));
        }
        let ids: Vec<u32> = logp.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let score: f32 = logp.max(candle_core::D::Minus1)?.sum_all()?.to_scalar()?;
        Ok((self.transcript(&ids, &cif), score / positions))
    }

    /// Build the transcript of argmax ids: drop blank/sos/eos, map to tokens, join, timestamps
    /// (as `Paraformer.inference` with a tokenizer and `output_timestamp`).
    fn transcript(&self, ids: &[u32], cif: &CifOutput) -> Transcript {
        let token_ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| i != BLANK && i != SOS && i != EOS)
            .collect();
        let tokens = self.token_names(&token_ids);
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

    /// The token strings of `ids` (`<unk>` for an id outside the list).
    fn token_names(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| {
                self.tokens
                    .get(i as usize)
                    .cloned()
                    .unwrap_or_else(|| "<unk>".into())
            })
            .collect()
    }

    /// Transcript of token ids from chunked decoding (blank/sos/eos already removed), no
    /// timestamps.
    fn transcript_ids(&self, ids: &[u32]) -> Transcript {
        let tokens = self.token_names(ids);
        Transcript {
            token_ids: ids.to_vec(),
            text: text::sentence_postprocess(&tokens),
            tokens,
            timestamps: Vec::new(),
        }
    }

    /// A streaming session over this model: chunked inference for a streaming model (default
    /// [`ChunkConfig`], one partial per chunk), re-decoding for an offline one.
    pub fn streaming(&self) -> StreamingRecognizer {
        let chunked = if self.is_streaming() {
            self.chunk_session(ChunkConfig::default()).ok()
        } else {
            None
        };
        StreamingRecognizer {
            model: self.clone(),
            frontend: self.frontend.stream(),
            feats: Features {
                data: Vec::new(),
                dim: self.frontend.dim(),
            },
            decoded_frames: 0,
            partial_every: 10,
            chunked,
            ids: Vec::new(),
        }
    }
}

/// Output of one chunk of [`ChunkSession`].
#[derive(Debug, Clone)]
pub struct ChunkOutput {
    /// Encoder output of the chunk's window `[1, cached + new frames, d]`.
    pub encoder_out: Tensor,
    /// CIF weights of the window after the chunk masks.
    pub alphas: Vec<f32>,
    /// Token ids fired in this chunk (blank/sos/eos removed).
    pub token_ids: Vec<u32>,
}

/// Chunked inference of a `ParaformerStreaming` model, as `ParaformerStreaming.generate_chunk`
/// (funasr `models/paraformer_streaming/model.py`) with the caches of `init_cache`.
#[derive(Debug, Clone)]
pub struct ChunkSession {
    model: Paraformer,
    chunk: ChunkConfig,
    enc: EncoderChunkState,
    cif: CifChunkState,
    dec: DecoderChunkState,
}

impl ChunkSession {
    /// The chunk geometry.
    pub fn chunk_config(&self) -> ChunkConfig {
        self.chunk
    }

    /// Run one chunk: `[n, dim]` features (`None` or zero frames = the final tail chunk, which
    /// reuses the cached look-ahead frames). After a final chunk the session is reset.
    pub fn step(&mut self, feats: Option<&Features>, is_final: bool) -> Result<ChunkOutput> {
        let net = &self.model.net;
        let x = match feats {
            Some(f) if f.frames() > 0 => Some(self.model.features_tensor(f)?),
            _ => None,
        };
        let enc = net
            .encoder
            .forward_chunk(x.as_ref(), &mut self.enc, &self.chunk)?;
        let cif =
            net.predictor
                .forward_chunk(&enc, &mut self.cif, self.chunk.chunk_size, is_final)?;
        let mut token_ids = Vec::new();
        // generate_chunk returns before the decoder when no token fired (its cache untouched).
        if let Some(embeds) = &cif.embeds {
            let logp = net
                .decoder
                .forward_chunk(embeds, &enc, &mut self.dec, &self.chunk)?;
            let ids: Vec<u32> = logp.squeeze(0)?.argmax(candle_core::D::Minus1)?.to_vec1()?;
            token_ids = ids
                .into_iter()
                .filter(|&i| i != BLANK && i != SOS && i != EOS)
                .collect();
        }
        if is_final {
            self.reset()?;
        }
        Ok(ChunkOutput {
            encoder_out: enc,
            alphas: cif.alphas,
            token_ids,
        })
    }

    /// Forget all state (a new utterance).
    pub fn reset(&mut self) -> Result<()> {
        self.enc = EncoderChunkState::new(
            self.model.config.input_size(),
            &self.chunk,
            &self.model.device,
        )?;
        self.cif = CifChunkState::default();
        self.dec = DecoderChunkState::default();
        Ok(())
    }

    /// Whole input: chunks of `chunk_size[1]` frames while at least that many remain, then the
    /// rest as the final chunk, or a tail flush when nothing is left (as `inference` with
    /// `is_final=True` cuts audio into 600 ms strides). Returns all token ids.
    pub fn run_all(&mut self, feats: &Features) -> Result<Vec<u32>> {
        let step = self.chunk.chunk_size[1];
        let mut ids = Vec::new();
        let mut start = 0;
        while feats.frames() - start >= step {
            let c = feats_slice(feats, start, step);
            ids.extend(self.step(Some(&c), false)?.token_ids);
            start += step;
        }
        let rest = feats_slice(feats, start, feats.frames() - start);
        ids.extend(self.step(Some(&rest), true)?.token_ids);
        Ok(ids)
    }
}

/// Frames `start..start + n` of `f`.
fn feats_slice(f: &Features, start: usize, n: usize) -> Features {
    Features {
        data: f.data[start * f.dim..(start + n) * f.dim].to_vec(),
        dim: f.dim,
    }
}

/// Read the state dict of `model.pt`: a torch zip whose pickle is the state dict itself (as
/// published) or a dict holding it under `state_dict` / `model` (FunASR training checkpoints).
fn load_state_dict(path: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut last = None;
    for key in [None, Some("state_dict"), Some("model")] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(t) if !t.is_empty() => return Ok(t.into_iter().collect()),
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
    /// Chunked inference (streaming models).
    chunked: Option<ChunkSession>,
    /// Tokens of the chunks decoded so far (chunked mode).
    ids: Vec<u32>,
}

impl StreamingRecognizer {
    /// True when this session runs FunASR's chunked streaming inference (one partial per chunk
    /// of `chunk_size[1]` LFR frames) rather than re-decoding with an offline model.
    pub fn is_chunked(&self) -> bool {
        self.chunked.is_some()
    }

    /// Use another chunk geometry (streaming models only; resets the session).
    pub fn with_chunk_config(mut self, chunk: ChunkConfig) -> Result<Self> {
        if self.chunked.is_some() {
            self.chunked = Some(self.model.chunk_session(chunk)?);
        }
        Ok(self)
    }

    fn chunked_push(&mut self, last: bool) -> Result<Vec<Partial>> {
        let Some(session) = self.chunked.as_mut() else {
            return Ok(Vec::new());
        };
        let step = session.chunk_config().chunk_size[1];
        let mut out = Vec::new();
        let mut start = 0;
        while self.feats.frames() - start >= step {
            let c = feats_slice(&self.feats, start, step);
            self.ids.extend(session.step(Some(&c), false)?.token_ids);
            start += step;
            out.push(Partial {
                transcript: self.model.transcript_ids(&self.ids),
                is_final: false,
            });
        }
        if last {
            let rest = feats_slice(&self.feats, start, self.feats.frames() - start);
            self.ids.extend(session.step(Some(&rest), true)?.token_ids);
            start = self.feats.frames();
        }
        self.feats = feats_slice(&self.feats, start, self.feats.frames() - start);
        Ok(out)
    }
    /// Set how many new LFR frames trigger a partial result (at least 1).
    pub fn with_partial_every(mut self, frames: usize) -> Self {
        self.partial_every = frames.max(1);
        self
    }

    /// Add samples; returns a partial result when enough new audio arrived.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<Partial>> {
        self.feats.extend(&self.frontend.push(samples));
        if self.chunked.is_some() {
            return self.chunked_push(false);
        }
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
        if self.chunked.is_some() {
            // Full chunks left after the frontend's flush still go out as non-final chunks
            // (their partials are superseded by the final result).
            self.chunked_push(true)?;
            let transcript = self.model.transcript_ids(&self.ids);
            self.frontend.reset();
            self.feats.data.clear();
            self.ids.clear();
            return Ok(Partial {
                transcript,
                is_final: true,
            });
        }
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
