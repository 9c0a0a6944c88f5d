//! Loaded models, by name. Weights are loaded once and shared by every session.

use std::collections::BTreeMap;
use std::sync::Arc;

use cadenza_codecs::Encodec;
use candle_core::Device;

use crate::config::{ModelEntry, ModelKind, ModelSource};
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
    name: "encodec-tiny-untrained",
    config_json: include_str!("../../../models/pretrained/encodec-tiny-untrained/config.json"),
    weights: include_bytes!("../../../models/pretrained/encodec-tiny-untrained/model.safetensors"),
    card: include_str!("../../../models/pretrained/encodec-tiny-untrained/MODEL_CARD.md"),
    untrained: true,
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
    name: "musicgen-tiny-untrained",
    config_json: include_str!("../../../models/pretrained/musicgen-tiny-untrained/config.json"),
    generation_config_json: include_str!(
        "../../../models/pretrained/musicgen-tiny-untrained/generation_config.json"
    ),
    tokenizer_json: include_bytes!(
        "../../../models/pretrained/musicgen-tiny-untrained/tokenizer.json"
    ),
    weights: include_bytes!("../../../models/pretrained/musicgen-tiny-untrained/model.safetensors"),
    card: include_str!("../../../models/pretrained/musicgen-tiny-untrained/MODEL_CARD.md"),
    untrained: true,
}];

/// Names of the embedded models.
pub fn embedded_names() -> Vec<&'static str> {
    EMBEDDED
        .iter()
        .map(|m| m.name)
        .chain(EMBEDDED_MUSIC.iter().map(|m| m.name))
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

/// A loaded text-to-music model.
#[derive(Debug)]
pub struct MusicModel {
    /// Its public description.
    pub info: ModelInfo,
    /// The weights.
    pub model: cadenza_musicgen::MusicGen,
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
                    let m = load_asr(e, &source, device).map_err(|err| {
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
        Ok(reg)
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
        let found = if name.is_empty() {
            self.music.values().next()
        } else {
            self.music.get(name)
        };
        found.cloned().ok_or_else(|| EngineError::UnknownModel {
            name: if name.is_empty() {
                "(default music model)".into()
            } else {
                name.to_string()
            },
            available: self.music.keys().cloned().collect(),
        })
    }

    /// A speech-recognition model by name (empty name = the first).
    pub fn asr(&self, name: &str) -> Result<Arc<AsrModel>, EngineError> {
        let found = if name.is_empty() {
            self.asr.values().next()
        } else {
            self.asr.get(name)
        };
        found.cloned().ok_or_else(|| EngineError::UnknownModel {
            name: if name.is_empty() {
                "(default asr model)".into()
            } else {
                name.to_string()
            },
            available: self.asr.keys().cloned().collect(),
        })
    }

    /// A codec by name (empty name = the only/first codec).
    pub fn codec(&self, name: &str) -> Result<Arc<CodecModel>, EngineError> {
        let found = if name.is_empty() {
            self.codecs.values().next()
        } else {
            self.codecs.get(name)
        };
        found.cloned().ok_or_else(|| EngineError::UnknownModel {
            name: if name.is_empty() {
                "(default codec)".into()
            } else {
                name.to_string()
            },
            available: self.codecs.keys().cloned().collect(),
        })
    }
}

fn load_music(
    e: &ModelEntry,
    source: &ModelSource,
    base: Option<&std::path::Path>,
    device: &Device,
) -> Result<MusicModel, String> {
    use cadenza_musicgen::MusicGen;
    let (name, card) = (e.name.as_str(), e.card.as_deref());
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
            let path = |p: &Option<String>, what: &str| -> Result<std::path::PathBuf, String> {
                match p.as_deref().map(|p| ModelSource::parse(p, base)) {
                    Some(ModelSource::Path(p)) => Ok(p),
                    _ => Err(format!(
                        "format = \"audiocraft\" needs `{what}` = a directory"
                    )),
                }
            };
            let ckpt = if dir.is_dir() {
                dir.join("state_dict.bin")
            } else {
                dir.clone()
            };
            let model = MusicGen::load_audiocraft(
                &ckpt,
                &path(&e.t5, "t5")?,
                &path(&e.codec, "codec")?,
                device,
            )
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
                return Err(format!("unknown music format '{f}' (hf, audiocraft)"));
            }
            let model = MusicGen::load_hf(dir, device).map_err(|e| e.to_string())?;
            let card = std::fs::read_to_string(dir.join("MODEL_CARD.md"))
                .or_else(|_| std::fs::read_to_string(dir.join("README.md")))
                .map(|c| card_summary(&c))
                .unwrap_or_default();
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
    Ok(MusicModel { info, model })
}

fn load_asr(e: &ModelEntry, source: &ModelSource, device: &Device) -> Result<AsrModel, String> {
    let ModelSource::Path(dir) = source else {
        return Err("asr models load from a FunASR model directory (no embedded asr model)".into());
    };
    if let Some(f) = e.format.as_deref().filter(|f| *f != "funasr") {
        return Err(format!("unknown asr format '{f}' (funasr)"));
    }
    let model = cadenza_paraformer::Paraformer::load(dir, device).map_err(|e| e.to_string())?;
    let card = std::fs::read_to_string(dir.join("MODEL_CARD.md"))
        .or_else(|_| std::fs::read_to_string(dir.join("README.md")))
        .map(|c| card_summary(&c))
        .unwrap_or_default();
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
        parameters: 0,
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

fn load_codec(
    name: &str,
    source: &ModelSource,
    card: Option<&str>,
    device: &Device,
) -> Result<CodecModel, String> {
    let (model, card_text, untrained) = match source {
        ModelSource::Embedded(n) => {
            let emb = EMBEDDED.iter().find(|m| m.name == n).ok_or_else(|| {
                format!(
                    "no embedded model '{n}' (embedded: {})",
                    embedded_names().join(", ")
                )
            })?;
            let cfg = Encodec::parse_config(emb.config_json).map_err(|e| e.to_string())?;
            let tensors = candle_core::safetensors::load_buffer(emb.weights, device)
                .map_err(|e| e.to_string())?;
            let model = Encodec::from_tensors(&cfg, tensors, device).map_err(|e| e.to_string())?;
            (model, card_summary(emb.card), emb.untrained)
        }
        ModelSource::Path(dir) => {
            let model = Encodec::load(dir, device).map_err(|e| e.to_string())?;
            let card = std::fs::read_to_string(dir.join("MODEL_CARD.md"))
                .or_else(|_| std::fs::read_to_string(dir.join("README.md")))
                .map(|c| card_summary(&c))
                .unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_summary_takes_first_paragraph() {
        let card = "# Title\n\nUNTRAINED placeholder: random\nweights.\n\n## More\ntext";
        assert_eq!(card_summary(card), "UNTRAINED placeholder: random weights.");
    }

    #[test]
    fn embedded_default_loads() {
        let entries = vec![ModelEntry {
            name: "codec".into(),
            kind: ModelKind::Codec,
            source: "embedded:encodec-tiny-untrained".into(),
            card: None,
            format: None,
            t5: None,
            codec: None,
            second_pass: None,
        }];
        let reg = Registry::load(&entries, None, &Device::Cpu).unwrap();
        let m = reg.codec("codec").unwrap();
        assert!(m.info.untrained);
        assert_eq!(m.info.sample_rate, 24_000);
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
