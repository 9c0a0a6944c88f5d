//! Loaded models, by name. Weights are loaded once and shared by every session.

use std::collections::BTreeMap;
use std::sync::Arc;

use cadenza_codecs::Encodec;
use candle_core::Device;

use crate::config::{ModelEntry, ModelKind, ModelSource, ScheduleDefaults};
use crate::error::EngineError;

/// A model compiled into the binary: its files and model card.
struct EmbeddedModel {
    name: &'static str,
    config_json: &'static str,
    weights: &'static [u8],
    card: &'static str,
    untrained: bool,
}

/// The models shipped inside the binary (`models/pretrained/`).
const EMBEDDED: &[EmbeddedModel] = &[EmbeddedModel {
    name: "encodec-tiny",
    config_json: include_str!("../../../models/pretrained/encodec-tiny/config.json"),
    weights: include_bytes!("../../../models/pretrained/encodec-tiny/model.safetensors"),
    card: include_str!("../../../models/pretrained/encodec-tiny/MODEL_CARD.md"),
    untrained: false,
}];

/// An embedded MusicGen (Hugging Face directory files).
struct EmbeddedMusic {
    name: &'static str,
    config_json: &'static str,
    generation_config_json: &'static str,
    tokenizer_json: &'static [u8],
    weights: &'static [u8],
    card: &'static str,
    untrained: bool,
}

const EMBEDDED_MUSIC: &[EmbeddedMusic] = &[EmbeddedMusic {
    name: "musicgen-tiny",
    config_json: include_str!("../../../models/pretrained/musicgen-tiny/config.json"),
    generation_config_json: include_str!(
        "../../../models/pretrained/musicgen-tiny/generation_config.json"
    ),
    tokenizer_json: include_bytes!("../../../models/pretrained/musicgen-tiny/tokenizer.json"),
    weights: include_bytes!("../../../models/pretrained/musicgen-tiny/model.safetensors"),
    card: include_str!("../../../models/pretrained/musicgen-tiny/MODEL_CARD.md"),
    untrained: false,
}];

/// An embedded MAGNeT: an audiocraft `state_dict.bin` LM, the T5 directory it was trained with
/// (`t5/`: `config.json`, `model.safetensors`, `tokenizer.json`, what a configuration's `t5`
/// names) and the codec whose tokens it was trained on (`codec/`: an HF EnCodec directory, what
/// a configuration's `codec` names; audiocraft ships it beside the LM as
/// `compression_state_dict.bin`).
struct EmbeddedMagnet {
    name: &'static str,
    state_dict: &'static [u8],
    t5_config_json: &'static str,
    t5_weights: &'static [u8],
    t5_tokenizer_json: &'static [u8],
    codec_config_json: &'static str,
    codec_weights: &'static [u8],
    card: &'static str,
    untrained: bool,
}

const EMBEDDED_MAGNET: &[EmbeddedMagnet] = &[EmbeddedMagnet {
    name: "magnet-tiny",
    state_dict: include_bytes!("../../../models/pretrained/magnet-tiny/state_dict.bin"),
    t5_config_json: include_str!("../../../models/pretrained/magnet-tiny/t5/config.json"),
    t5_weights: include_bytes!("../../../models/pretrained/magnet-tiny/t5/model.safetensors"),
    t5_tokenizer_json: include_bytes!("../../../models/pretrained/magnet-tiny/t5/tokenizer.json"),
    codec_config_json: include_str!("../../../models/pretrained/magnet-tiny/codec/config.json"),
    codec_weights: include_bytes!("../../../models/pretrained/magnet-tiny/codec/model.safetensors"),
    card: include_str!("../../../models/pretrained/magnet-tiny/MODEL_CARD.md"),
    untrained: false,
}];

/// An embedded Paraformer: the files of a FunASR directory, with the weights as safetensors.
struct EmbeddedAsr {
    name: &'static str,
    config_yaml: &'static str,
    tokens_json: &'static str,
    am_mvn: &'static str,
    weights: &'static [u8],
    /// `decoding.yaml` and the bytes of the `ngram_file` it names (beam search + n-gram LM).
    decoding_yaml: &'static str,
    ngram: &'static [u8],
    card: &'static str,
}

const EMBEDDED_ASR: &[EmbeddedAsr] = &[EmbeddedAsr {
    name: "paraformer-tiny-en",
    config_yaml: include_str!("../../../models/pretrained/paraformer-tiny-en/config.yaml"),
    tokens_json: include_str!("../../../models/pretrained/paraformer-tiny-en/tokens.json"),
    am_mvn: include_str!("../../../models/pretrained/paraformer-tiny-en/am.mvn"),
    weights: include_bytes!("../../../models/pretrained/paraformer-tiny-en/model.safetensors"),
    decoding_yaml: include_str!("../../../models/pretrained/paraformer-tiny-en/decoding.yaml"),
    ngram: include_bytes!("../../../models/pretrained/paraformer-tiny-en/ngram.arpa.gz"),
    card: include_str!("../../../models/pretrained/paraformer-tiny-en/MODEL_CARD.md"),
}];

/// Names of the embedded models.
pub fn embedded_names() -> Vec<&'static str> {
    EMBEDDED
        .iter()
        .map(|m| m.name)
        .chain(EMBEDDED_MUSIC.iter().map(|m| m.name))
        .chain(EMBEDDED_MAGNET.iter().map(|m| m.name))
        .chain(EMBEDDED_ASR.iter().map(|m| m.name))
        .collect()
}

/// What `ListModels` says about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Registry name.
    pub name: String,
    /// Family (`codec`, …).
    pub kind: ModelKind,
    /// Architecture, e.g. `encodec`.
    pub architecture: String,
    /// Native sample rate.
    pub sample_rate: u32,
    /// Native channel count.
    pub channels: u16,
    /// Token frames per second.
    pub frame_rate: f64,
    /// Codebooks at the highest bandwidth.
    pub num_codebooks: usize,
    /// Entries per codebook.
    pub codebook_size: usize,
    /// Supported bandwidths in kbps.
    pub bandwidths_kbps: Vec<f32>,
    /// Parameter count.
    pub parameters: u64,
    /// Random / untrained weights.
    pub untrained: bool,
    /// Model card summary.
    pub card: String,
    /// Where the weights came from.
    pub source: String,
}

/// A loaded codec model.
#[derive(Debug)]
pub struct CodecModel {
    /// Its public description.
    pub info: ModelInfo,
    /// The weights.
    pub model: Encodec,
}

/// The weights of a text-to-music model: which schedules it can run.
#[derive(Debug)]
pub enum MusicBackend {
    /// Autoregressive MusicGen (delay pattern): schedule `ar`.
    Ar(Box<cadenza_musicgen::MusicGen>),
    /// MAGNeT (masked, non-autoregressive): schedules `magnet` and `hybrid`.
    Magnet(Box<cadenza_magnet::Magnet>),
}

/// A loaded text-to-music model.
#[derive(Debug)]
pub struct MusicModel {
    /// Its public description.
    pub info: ModelInfo,
    /// The weights.
    pub backend: MusicBackend,
    /// Schedule defaults from its config entry.
    pub schedule: ScheduleDefaults,
}

impl MusicModel {
    /// The MusicGen weights, if it is autoregressive.
    pub fn ar(&self) -> Option<&cadenza_musicgen::MusicGen> {
        match &self.backend {
            MusicBackend::Ar(m) => Some(m),
            MusicBackend::Magnet(_) => None,
        }
    }

    /// The MAGNeT weights, if it is one.
    pub fn magnet(&self) -> Option<&cadenza_magnet::Magnet> {
        match &self.backend {
            MusicBackend::Magnet(m) => Some(m),
            MusicBackend::Ar(_) => None,
        }
    }

    /// Its codec.
    pub fn codec(&self) -> &Encodec {
        match &self.backend {
            MusicBackend::Ar(m) => &m.codec,
            MusicBackend::Magnet(m) => &m.codec,
        }
    }

    /// Token frames per second.
    pub fn frame_rate(&self) -> f64 {
        match &self.backend {
            MusicBackend::Ar(m) => m.frame_rate(),
            MusicBackend::Magnet(m) => m.frame_rate(),
        }
    }

    /// Codebooks the LM models.
    pub fn num_codebooks(&self) -> usize {
        self.info.num_codebooks
    }

    /// Entries per codebook.
    pub fn card(&self) -> usize {
        self.info.codebook_size
    }

    /// Whether `other` produces and reads the same tokens: the same codec configuration
    /// (sample rate, channels, hop length, codebook size), the same LM codebooks and cards,
    /// and the same codebook entries in the codebooks the LMs model (to float16 precision), so
    /// two models on codecs of one shape but trained apart are told apart.
    pub fn same_codec(&self, other: &MusicModel) -> Result<(), String> {
        let (a, b) = (self.codec().config(), other.codec().config());
        let diffs = [
            (
                "sample rate",
                a.sampling_rate as usize,
                b.sampling_rate as usize,
            ),
            ("channels", a.audio_channels, b.audio_channels),
            ("hop length", a.hop_length(), b.hop_length()),
            ("codec codebook size", a.codebook_size, b.codebook_size),
            ("LM codebooks", self.num_codebooks(), other.num_codebooks()),
            ("LM card", self.card(), other.card()),
        ];
        match diffs.iter().find(|(_, x, y)| x != y) {
            Some((what, x, y)) => Err(format!(
                "'{}' and '{}' do not share a codec ({what} {x} vs {y})",
                self.info.name, other.info.name
            )),
            None if !self
                .codec()
                .same_codebooks(other.codec(), self.num_codebooks()) =>
            {
                Err(format!(
                    "'{}' and '{}' do not share a codec (same configuration, different \
                     codebook entries: their codecs were trained apart, so their tokens differ)",
                    self.info.name, other.info.name
                ))
            }
            None => Ok(()),
        }
    }
}

/// A loaded speech-recognition model.
#[derive(Debug)]
pub struct AsrModel {
    /// Its public description.
    pub info: ModelInfo,
    /// The weights (cheap to clone; shared by every session).
    pub model: cadenza_paraformer::Paraformer,
    /// The configured second-pass model's name (two-pass recognition), if any.
    pub second_pass: Option<String>,
}

/// All loaded models.
#[derive(Debug, Default)]
pub struct Registry {
    codecs: BTreeMap<String, Arc<CodecModel>>,
    music: BTreeMap<String, Arc<MusicModel>>,
    asr: BTreeMap<String, Arc<AsrModel>>,
}

/// The card summary of a model directory: its `MODEL_CARD.md`, else its `README.md` (Hugging
/// Face layout), else empty.
fn dir_card(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("MODEL_CARD.md"))
        .or_else(|_| std::fs::read_to_string(dir.join("README.md")))
        .map(|c| card_summary(&c))
        .unwrap_or_default()
}

/// First paragraph of a model card after its title, as a one-line summary.
fn card_summary(card: &str) -> String {
    let mut lines = card
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty() || l.starts_with('#'));
    let mut out = String::new();
    for l in lines.by_ref() {
        if l.is_empty() {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(l);
    }
    out
}

impl Registry {
    /// Loads every entry; fails on the first model that cannot be loaded, naming it.
    pub fn load(
        entries: &[ModelEntry],
        base: Option<&std::path::Path>,
        device: &Device,
    ) -> Result<Self, String> {
        let mut reg = Registry::default();
        for e in entries {
            if reg.codecs.contains_key(&e.name)
                || reg.music.contains_key(&e.name)
                || reg.asr.contains_key(&e.name)
            {
                return Err(format!("model '{}' is configured twice", e.name));
            }
            let source = ModelSource::parse(&e.source, base);
            match e.kind {
                ModelKind::Codec => {
                    let m =
                        load_codec(&e.name, &source, e.card.as_deref(), device).map_err(|err| {
                            format!("loading model '{}' from {source}: {err}", e.name)
                        })?;
                    reg.codecs.insert(e.name.clone(), Arc::new(m));
                }
                ModelKind::Music => {
                    let m = load_music(e, &source, base, device).map_err(|err| {
                        format!("loading model '{}' from {source}: {err}", e.name)
                    })?;
                    reg.music.insert(e.name.clone(), Arc::new(m));
                }
                ModelKind::Asr => {
                    let m = load_asr(e, &source, base, device).map_err(|err| {
                        format!("loading model '{}' from {source}: {err}", e.name)
                    })?;
                    reg.asr.insert(e.name.clone(), Arc::new(m));
                }
            }
        }
        for m in reg.asr.values() {
            if let Some(sp) = &m.second_pass
                && !reg.asr.contains_key(sp)
            {
                return Err(format!(
                    "model '{}': second_pass = \"{sp}\" is not an asr model of this configuration",
                    m.info.name
                ));
            }
        }
        reg.check_schedules()?;
        Ok(reg)
    }

    /// Checks every music model's schedule defaults against the loaded models: the prefix
    /// model and rescorer exist, are autoregressive and share the codec.
    fn check_schedules(&self) -> Result<(), String> {
        for m in self.music.values() {
            let s = &m.schedule;
            let kind = s
                .kind
                .as_deref()
                .unwrap_or(if m.ar().is_some() { "ar" } else { "magnet" });
            let ok_kinds: &[&str] = if m.ar().is_some() {
                &["ar"]
            } else {
                &["magnet", "hybrid"]
            };
            if !ok_kinds.contains(&kind) {
                return Err(format!(
                    "model '{}': schedule.kind '{kind}' is not supported ({})",
                    m.info.name,
                    ok_kinds.join(", ")
                ));
            }
            for (field, name) in [
                ("prefix_model", &s.prefix_model),
                ("rescore_with", &s.rescore_with),
            ] {
                let Some(name) = name else { continue };
                let other = self.music.get(name).ok_or_else(|| {
                    format!(
                        "model '{}': schedule.{field} '{name}' is not a loaded music model",
                        m.info.name
                    )
                })?;
                if other.ar().is_none() {
                    return Err(format!(
                        "model '{}': schedule.{field} '{name}' is not autoregressive",
                        m.info.name
                    ));
                }
                m.same_codec(other)
                    .map_err(|e| format!("model '{}': schedule.{field}: {e}", m.info.name))?;
            }
            if kind == "hybrid" && s.prefix_model.is_none() {
                return Err(format!(
                    "model '{}': schedule.kind 'hybrid' needs schedule.prefix_model",
                    m.info.name
                ));
            }
            if s.rescore == Some(true) && s.rescore_with.is_none() {
                return Err(format!(
                    "model '{}': schedule.rescore needs schedule.rescore_with",
                    m.info.name
                ));
            }
        }
        Ok(())
    }

    /// Every model's description, sorted by name.
    pub fn infos(&self) -> Vec<ModelInfo> {
        let mut v: Vec<ModelInfo> = self
            .codecs
            .values()
            .map(|m| m.info.clone())
            .chain(self.music.values().map(|m| m.info.clone()))
            .chain(self.asr.values().map(|m| m.info.clone()))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A music model by name (empty name = the first).
    pub fn music(&self, name: &str) -> Result<Arc<MusicModel>, EngineError> {
        lookup(&self.music, name, "music")
    }

    /// A speech-recognition model by name (empty name = the first).
    pub fn asr(&self, name: &str) -> Result<Arc<AsrModel>, EngineError> {
        lookup(&self.asr, name, "asr")
    }

    /// A music model by name; an empty name picks the first model that runs `kind`'s
    /// schedule (MAGNeT models for `magnet` / `hybrid`, autoregressive ones otherwise), or
    /// the first model if none does.
    pub fn music_for(
        &self,
        name: &str,
        kind: Option<crate::ScheduleKind>,
    ) -> Result<Arc<MusicModel>, EngineError> {
        if !name.is_empty() {
            return self.music(name);
        }
        let want_magnet = matches!(
            kind,
            Some(crate::ScheduleKind::Magnet | crate::ScheduleKind::Hybrid)
        );
        match self
            .music
            .values()
            .find(|m| m.magnet().is_some() == want_magnet)
        {
            Some(m) => Ok(m.clone()),
            None => self.music(""),
        }
    }

    /// A codec by name (empty name = the only/first codec).
    pub fn codec(&self, name: &str) -> Result<Arc<CodecModel>, EngineError> {
        lookup(&self.codecs, name, "codec")
    }
}

/// The files of an audiocraft-format model: its `state_dict.bin` (`source` is the file or its
/// directory) and the `t5` and `codec` directories the entry names (relative to `base`).
fn audiocraft_parts(
    e: &ModelEntry,
    source: &std::path::Path,
    base: Option<&std::path::Path>,
    format: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf), String> {
    let dir =
        |v: &Option<String>, what: &str| match v.as_deref().map(|v| ModelSource::parse(v, base)) {
            Some(ModelSource::Path(p)) => Ok(p),
            _ => Err(format!(
                "format = \"{format}\" needs `{what}` = a directory"
            )),
        };
    let ckpt = if source.is_dir() {
        source.join("state_dict.bin")
    } else {
        source.to_path_buf()
    };
    Ok((ckpt, dir(&e.t5, "t5")?, dir(&e.codec, "codec")?))
}

fn load_music(
    e: &ModelEntry,
    source: &ModelSource,
    base: Option<&std::path::Path>,
    device: &Device,
) -> Result<MusicModel, String> {
    use cadenza_musicgen::MusicGen;
    let (name, card) = (e.name.as_str(), e.card.as_deref());
    let is_magnet = match source {
        ModelSource::Embedded(n) => EMBEDDED_MAGNET.iter().any(|m| m.name == n),
        ModelSource::Path(_) => e.format.as_deref() == Some("audiocraft-magnet"),
    };
    if is_magnet {
        return load_magnet(e, source, base, device);
    }
    let (model, card_text, untrained) = match source {
        ModelSource::Embedded(n) => {
            let emb = EMBEDDED_MUSIC.iter().find(|m| m.name == n).ok_or_else(|| {
                format!(
                    "no embedded music model '{n}' (embedded: {})",
                    embedded_names().join(", ")
                )
            })?;
            let tensors = candle_core::safetensors::load_buffer(emb.weights, device)
                .map_err(|e| e.to_string())?;
            let model = MusicGen::from_parts(
                emb.config_json,
                Some(emb.generation_config_json),
                Some(emb.tokenizer_json),
                tensors,
                device,
            )
            .map_err(|e| e.to_string())?;
            (model, card_summary(emb.card), emb.untrained)
        }
        ModelSource::Path(dir) if e.format.as_deref() == Some("audiocraft") => {
            let (ckpt, t5_dir, codec_dir) = audiocraft_parts(e, dir, base, "audiocraft")?;
            let model = MusicGen::load_audiocraft(&ckpt, &t5_dir, &codec_dir, device)
                .map_err(|e| e.to_string())?;
            let card = dir
                .parent()
                .and_then(|d| std::fs::read_to_string(d.join("README.md")).ok())
                .map(|c| card_summary(&c))
                .unwrap_or_default();
            (model, card, false)
        }
        ModelSource::Path(dir) => {
            if let Some(f) = e.format.as_deref().filter(|f| *f != "hf") {
                return Err(format!(
                    "unknown music format '{f}' (hf, audiocraft, audiocraft-magnet)"
                ));
            }
            let model = MusicGen::load_hf(dir, device).map_err(|e| e.to_string())?;
            let card = dir_card(dir);
            (model, card, false)
        }
    };
    if model.tokenizer.is_none() {
        return Err("the model directory has no tokenizer.json (the T5 tokenizer is needed for text prompts)".into());
    }
    let codec = model.codec.config();
    let info = ModelInfo {
        name: name.to_string(),
        kind: ModelKind::Music,
        architecture: "musicgen".into(),
        sample_rate: codec.sampling_rate,
        channels: codec.audio_channels as u16,
        frame_rate: model.frame_rate(),
        num_codebooks: model.lm.num_codebooks(),
        codebook_size: model.lm.card(),
        bandwidths_kbps: vec![],
        parameters: model.num_parameters as u64,
        untrained,
        card: card.map(str::to_string).unwrap_or(card_text),
        source: source.to_string(),
    };
    Ok(MusicModel {
        info,
        backend: MusicBackend::Ar(Box::new(model)),
        schedule: e.schedule.clone().unwrap_or_default(),
    })
}

/// Reads an audiocraft MAGNeT LM checkpoint for a codec of `frame_rate` frames/s; returns the
/// LM and its parameter count.
fn read_magnet_lm(
    path: &std::path::Path,
    frame_rate: usize,
    device: &Device,
) -> Result<(cadenza_magnet::MagnetLm, u64), String> {
    let (yaml, tensors) = cadenza_musicgen::audiocraft::read_checkpoint_raw(path, device)
        .map_err(|e| e.to_string())?;
    let params = tensors.values().map(|t| t.elem_count() as u64).sum();
    let cfg = cadenza_magnet::MagnetXpCfg::from_yaml(&yaml).map_err(|e| e.to_string())?;
    let lm = cadenza_magnet::MagnetLm::from_tensors(&cfg, tensors, frame_rate, device)
        .map_err(|e| e.to_string())?;
    Ok((lm, params))
}

fn codec_frame_rate(codec: &Encodec) -> usize {
    let c = codec.config();
    (c.sampling_rate as f64 / c.hop_length() as f64).round() as usize
}

fn load_magnet(
    e: &ModelEntry,
    source: &ModelSource,
    base: Option<&std::path::Path>,
    device: &Device,
) -> Result<MusicModel, String> {
    use cadenza_magnet::Magnet;
    let (model, params, card_text, untrained) = match source {
        ModelSource::Embedded(n) => {
            let emb = EMBEDDED_MAGNET
                .iter()
                .find(|m| m.name == n)
                .ok_or_else(|| format!("no embedded MAGNeT '{n}'"))?;
            let codec = codec_from_bytes(emb.codec_config_json, emb.codec_weights, device)?;
            let (t5, tokenizer) = Magnet::t5_from_bytes(
                emb.t5_config_json,
                emb.t5_weights,
                emb.t5_tokenizer_json,
                device,
            )
            .map_err(|e| format!("{} t5: {e}", emb.name))?;
            // candle reads torch zip checkpoints from files only: stage the bytes in a
            // private temporary file.
            let tmp = std::env::temp_dir().join(format!(
                "cadenza-{}-{}-{:?}.bin",
                emb.name,
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&tmp, emb.state_dict).map_err(|e| format!("{}: {e}", tmp.display()))?;
            let lm = read_magnet_lm(&tmp, codec_frame_rate(&codec), device);
            let _ = std::fs::remove_file(&tmp);
            let (lm, params) = lm?;
            let model = Magnet::from_lm(lm, t5, Some(tokenizer), codec, device)
                .map_err(|e| e.to_string())?;
            (model, params, card_summary(emb.card), emb.untrained)
        }
        ModelSource::Path(p) => {
            let (ckpt, t5_dir, codec_dir) = audiocraft_parts(e, p, base, "audiocraft-magnet")?;
            // Magnet::load_audiocraft's steps, keeping the parameter count.
            let codec =
                cadenza_codecs::Encodec::load(&codec_dir, device).map_err(|e| e.to_string())?;
            let (lm, params) = read_magnet_lm(&ckpt, codec_frame_rate(&codec), device)?;
            let shell = Magnet::load_t5(&t5_dir, device).map_err(|e| e.to_string())?;
            let model = Magnet::from_lm(lm, shell.0, Some(shell.1), codec, device)
                .map_err(|e| e.to_string())?;
            let card = ckpt
                .parent()
                .and_then(|d| std::fs::read_to_string(d.join("README.md")).ok())
                .map(|c| card_summary(&c))
                .unwrap_or_default();
            (model, params, card, false)
        }
    };
    if model.tokenizer.is_none() {
        return Err("the T5 directory has no tokenizer.json (needed for text prompts)".into());
    }
    let codec = model.codec.config();
    let info = ModelInfo {
        name: e.name.clone(),
        kind: ModelKind::Music,
        architecture: "magnet".into(),
        sample_rate: codec.sampling_rate,
        channels: codec.audio_channels as u16,
        frame_rate: model.frame_rate(),
        num_codebooks: model.lm.num_codebooks(),
        codebook_size: model.lm.card(),
        bandwidths_kbps: vec![],
        parameters: params,
        untrained,
        card: e.card.clone().unwrap_or(card_text),
        source: source.to_string(),
    };
    Ok(MusicModel {
        info,
        backend: MusicBackend::Magnet(Box::new(model)),
        schedule: e.schedule.clone().unwrap_or_default(),
    })
}

fn load_asr(
    e: &ModelEntry,
    source: &ModelSource,
    base: Option<&std::path::Path>,
    device: &Device,
) -> Result<AsrModel, String> {
    use cadenza_paraformer::{DecodingConfig, Paraformer};
    use std::borrow::Cow;
    if let Some(f) = e.format.as_deref().filter(|f| *f != "funasr") {
        return Err(format!("unknown asr format '{f}' (funasr)"));
    }
    // a relative ngram_file of the configuration resolves against its folder, as `source`
    let mut overrides = e.decoding.clone().unwrap_or_default();
    if let (Some(f), Some(b)) = (overrides.ngram_file.as_mut(), base)
        && std::path::Path::new(f.as_str()).is_relative()
    {
        *f = b.join(&*f).display().to_string();
    }
    let (model, card) = match source {
        ModelSource::Embedded(n) => {
            let emb = EMBEDDED_ASR.iter().find(|m| m.name == n).ok_or_else(|| {
                format!(
                    "no embedded asr model '{n}' (embedded: {})",
                    embedded_names().join(", ")
                )
            })?;
            let tokens: Vec<String> = serde_json::from_str(emb.tokens_json)
                .map_err(|e| format!("embedded tokens.json: {e}"))?;
            let cmvn = cadenza_audio::Cmvn::parse(emb.am_mvn).map_err(|e| e.to_string())?;
            let tensors = candle_core::safetensors::load_buffer(emb.weights, device)
                .map_err(|e| e.to_string())?;
            // the embedded decoding.yaml and LM, under the entry's [models.decoding] (whose
            // ngram_file, when it names one, is a file)
            let decoding = DecodingConfig::from_yaml(emb.decoding_yaml)
                .and_then(|cfg| {
                    cfg.resolve(&overrides, &tokens, |f| match overrides.ngram_file {
                        Some(_) => cadenza_paraformer::read_bytes(f.as_ref()).map(Cow::Owned),
                        None => Ok(Cow::Borrowed(emb.ngram)),
                    })
                })
                .map_err(|e| e.to_string())?;
            let model = Paraformer::from_parts(emb.config_yaml, tokens, cmvn, tensors, device)
                .and_then(|m| m.with_decoding(decoding))
                .map_err(|e| e.to_string())?;
            (model, card_summary(emb.card))
        }
        ModelSource::Path(dir) => {
            let model =
                Paraformer::load_with(dir, &overrides, device).map_err(|e| e.to_string())?;
            let card = dir_card(dir);
            (model, card)
        }
    };
    let lfr_n = model.config().frontend_conf.lfr_n.max(1) as f64;
    let shift_ms = model.config().frontend_conf.frame_shift as f64;
    let info = ModelInfo {
        name: e.name.clone(),
        kind: ModelKind::Asr,
        architecture: "paraformer".into(),
        sample_rate: model.sample_rate(),
        channels: 1,
        frame_rate: 1000.0 / (lfr_n * shift_ms),
        num_codebooks: 0,
        codebook_size: model.tokens().len(),
        bandwidths_kbps: vec![],
        parameters: model.num_parameters() as u64,
        untrained: false,
        card: e.card.clone().unwrap_or(card),
        source: source.to_string(),
    };
    Ok(AsrModel {
        info,
        model,
        second_pass: e.second_pass.clone(),
    })
}

/// The embedded codec `name` and its built model.
fn embedded_codec(
    name: &str,
    device: &Device,
) -> Result<(&'static EmbeddedModel, Encodec), String> {
    let emb = EMBEDDED.iter().find(|m| m.name == name).ok_or_else(|| {
        format!(
            "no embedded model '{name}' (embedded: {})",
            embedded_names().join(", ")
        )
    })?;
    Ok((emb, codec_from_bytes(emb.config_json, emb.weights, device)?))
}

/// An EnCodec from the bytes of an HF directory's `config.json` and `model.safetensors`.
fn codec_from_bytes(config_json: &str, weights: &[u8], device: &Device) -> Result<Encodec, String> {
    let cfg = Encodec::parse_config(config_json).map_err(|e| e.to_string())?;
    let tensors =
        candle_core::safetensors::load_buffer(weights, device).map_err(|e| e.to_string())?;
    Encodec::from_tensors(&cfg, tensors, device).map_err(|e| e.to_string())
}

fn load_codec(
    name: &str,
    source: &ModelSource,
    card: Option<&str>,
    device: &Device,
) -> Result<CodecModel, String> {
    let (model, card_text, untrained) = match source {
        ModelSource::Embedded(n) => {
            let (emb, model) = embedded_codec(n, device)?;
            (model, card_summary(emb.card), emb.untrained)
        }
        ModelSource::Path(dir) => {
            let model = Encodec::load(dir, device).map_err(|e| e.to_string())?;
            let card = dir_card(dir);
            (model, card, false)
        }
    };
    let cfg = model.config();
    let info = ModelInfo {
        name: name.to_string(),
        kind: ModelKind::Codec,
        architecture: "encodec".into(),
        sample_rate: cfg.sampling_rate,
        channels: cfg.audio_channels as u16,
        frame_rate: cfg.sampling_rate as f64 / cfg.hop_length() as f64,
        num_codebooks: cfg.num_quantizers(),
        codebook_size: cfg.codebook_size,
        bandwidths_kbps: cfg.target_bandwidths.clone(),
        parameters: model.num_parameters() as u64,
        untrained,
        card: card.map(str::to_string).unwrap_or(card_text),
        source: source.to_string(),
    };
    Ok(CodecModel { info, model })
}

/// A model by name from one kind's table; an empty name is the first (the default).
fn lookup<T>(
    table: &BTreeMap<String, Arc<T>>,
    name: &str,
    kind: &str,
) -> Result<Arc<T>, EngineError> {
    let found = if name.is_empty() {
        table.values().next()
    } else {
        table.get(name)
    };
    found.cloned().ok_or_else(|| EngineError::UnknownModel {
        name: if name.is_empty() {
            format!("(default {kind} model)")
        } else {
            name.to_string()
        },
        available: table.keys().cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_summary_takes_first_paragraph() {
        let card = "# Title\n\nUNTRAINED placeholder: random\nweights.\n\n## More\ntext";
        assert_eq!(card_summary(card), "UNTRAINED placeholder: random weights.");
    }

    fn asr_entry(decoding: Option<&str>) -> ModelEntry {
        ModelEntry {
            name: "asr".into(),
            kind: ModelKind::Asr,
            source: "embedded:paraformer-tiny-en".into(),
            card: None,
            format: None,
            t5: None,
            codec: None,
            second_pass: None,
            decoding: decoding.map(|d| cadenza_paraformer::DecodingConfig::from_yaml(d).unwrap()),
            schedule: None,
        }
    }

    #[test]
    fn embedded_asr_decodes_with_its_ngram_unless_overridden() {
        let reg = Registry::load(&[asr_entry(None)], None, &Device::Cpu).unwrap();
        let d = reg.asr("asr").unwrap().model.decoding().clone();
        assert!(d.uses_beam_search(true), "the default decodes with its LM");
        assert_eq!((d.beam_size, d.ngram_weight, d.ctc_weight), (8, 3.5, 0.9));
        assert!(
            reg.asr("asr").unwrap().model.network().ctc.is_some(),
            "ships its CTC layer"
        );
        assert_eq!(d.ngram.as_ref().map(|lm| lm.order()), Some(6));
        // [models.decoding] ngram_weight = 0 alone keeps the joint CTC beam search (the model
        // has its CTC layer); both weights 0: greedy; beam_size alone keeps the LM
        let e = asr_entry(Some("ngram_weight: 0.0"));
        let reg = Registry::load(&[e], None, &Device::Cpu).unwrap();
        let m = &reg.asr("asr").unwrap().model;
        assert!(m.decoding().uses_beam_search(m.network().ctc.is_some()));
        let e = asr_entry(Some("ngram_weight: 0.0\ndecoding_ctc_weight: 0.0"));
        let reg = Registry::load(&[e], None, &Device::Cpu).unwrap();
        let m = &reg.asr("asr").unwrap().model;
        assert!(!m.decoding().uses_beam_search(m.network().ctc.is_some()));
        let e = asr_entry(Some("beam_size: 3"));
        let reg = Registry::load(&[e], None, &Device::Cpu).unwrap();
        assert_eq!(reg.asr("asr").unwrap().model.decoding().beam_size, 3);
        // a missing LM file or a bad value fails the load, named
        let e = asr_entry(Some("ngram_file: /nonexistent/lm.arpa"));
        let err = Registry::load(&[e], None, &Device::Cpu).unwrap_err();
        assert!(err.contains("/nonexistent/lm.arpa"), "{err}");
        let e = asr_entry(Some("ngram_weight: -1.0"));
        let err = Registry::load(&[e], None, &Device::Cpu).unwrap_err();
        assert!(err.contains("ngram_weight -1"), "{err}");
    }

    #[test]
    fn embedded_default_loads() {
        let entries = vec![ModelEntry {
            name: "codec".into(),
            kind: ModelKind::Codec,
            source: "embedded:encodec-tiny".into(),
            card: None,
            format: None,
            t5: None,
            codec: None,
            second_pass: None,
            decoding: None,
            schedule: None,
        }];
        let reg = Registry::load(&entries, None, &Device::Cpu).unwrap();
        let m = reg.codec("codec").unwrap();
        assert!(!m.info.untrained);
        assert_eq!(m.info.sample_rate, 32_000);
        assert!(m.info.parameters > 0);
        assert!(matches!(
            reg.codec("nope"),
            Err(EngineError::UnknownModel { .. })
        ));
    }

    #[test]
    fn bad_source_names_the_model() {
        let entries = vec![ModelEntry {
            name: "x".into(),
            kind: ModelKind::Codec,
            source: "/nonexistent/dir".into(),
            card: None,
            format: None,
            t5: None,
            codec: None,
            second_pass: None,
            decoding: None,
            schedule: None,
        }];
        let err = Registry::load(&entries, None, &Device::Cpu).unwrap_err();
        assert!(err.contains("model 'x'"), "{err}");
    }

    #[test]
    fn audiocraft_format_needs_t5_and_codec() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/musicgen/audiocraft-tiny");
        let entries = vec![ModelEntry {
            name: "ac".into(),
            kind: ModelKind::Music,
            source: dir.display().to_string(),
            card: None,
            format: Some("audiocraft".into()),
            t5: None,
            codec: None,
            second_pass: None,
            decoding: None,
            schedule: None,
        }];
        let err = Registry::load(&entries, None, &Device::Cpu).unwrap_err();
        assert!(err.contains("`t5`"), "{err}");
        let entries = vec![ModelEntry {
            format: Some("onnx".into()),
            ..entries[0].clone()
        }];
        let err = Registry::load(&entries, None, &Device::Cpu).unwrap_err();
        assert!(err.contains("unknown music format 'onnx'"), "{err}");
    }
}
