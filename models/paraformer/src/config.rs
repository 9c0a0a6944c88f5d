//! FunASR `config.yaml` of a Paraformer model directory (the sections this crate reads). Field
//! defaults are those of the FunASR constructors (funasr 1.4.16): `SANMEncoder.__init__`
//! (`models/sanm/encoder.py`), `ParaformerSANMDecoder.__init__` (`models/paraformer/decoder.py`),
//! `CifPredictorV2.__init__` (`models/paraformer/cif_predictor.py`), `WavFrontend.__init__`
//! (`frontends/wav_frontend.py`). Unknown keys (training options) are ignored; options that
//! change inference and are not implemented fail in [`Config::validate`].

use serde::Deserialize;

use crate::ParaformerError;

fn d_true() -> bool {
    true
}
fn d_256() -> usize {
    256
}
fn d_4() -> usize {
    4
}
fn d_2048() -> usize {
    2048
}
fn d_6() -> usize {
    6
}
fn d_11() -> usize {
    11
}
fn d_21() -> usize {
    21
}
fn d_conv2d() -> Option<String> {
    Some("conv2d".into())
}
fn d_linear() -> String {
    "linear".into()
}
fn d_sanm() -> String {
    "sanm".into()
}
fn d_some0() -> Option<usize> {
    Some(0)
}
fn d_one() -> f64 {
    1.0
}
fn d_16k() -> u32 {
    16_000
}
fn d_hamming() -> String {
    "hamming".into()
}
fn d_80() -> usize {
    80
}
fn d_25() -> f32 {
    25.0
}
fn d_10() -> f32 {
    10.0
}
fn d_1() -> usize {
    1
}

/// `encoder_conf` (`SANMEncoder`).
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderConfig {
    /// Model width.
    #[serde(default = "d_256")]
    pub output_size: usize,
    /// Attention heads.
    #[serde(default = "d_4")]
    pub attention_heads: usize,
    /// Feed-forward width.
    #[serde(default = "d_2048")]
    pub linear_units: usize,
    /// Layers (`encoders0` + `encoders`).
    #[serde(default = "d_6")]
    pub num_blocks: usize,
    /// Input layer; only `pe` (sinusoidal positions, no projection) is supported.
    #[serde(default = "d_conv2d")]
    pub input_layer: Option<String>,
    /// Pre-LN (the only supported value is true).
    #[serde(default = "d_true")]
    pub normalize_before: bool,
    /// Concat-after (unsupported).
    #[serde(default)]
    pub concat_after: bool,
    /// Feed-forward type (only `linear`).
    #[serde(default = "d_linear")]
    pub positionwise_layer_type: String,
    /// FSMN kernel size.
    #[serde(default = "d_11")]
    pub kernel_size: usize,
    /// FSMN shift (extra left padding).
    #[serde(default)]
    pub sanm_shfit: usize,
    /// Self-attention type (only `sanm`).
    #[serde(default = "d_sanm")]
    pub selfattention_layer_type: String,
    /// Intermediate CTC layers (unsupported unless empty).
    #[serde(default)]
    pub interctc_layer_idx: Vec<usize>,
    /// LoRA adapters (unsupported).
    #[serde(default)]
    pub lora_list: Option<Vec<String>>,
}

/// `decoder_conf` (`ParaformerSANMDecoder`).
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
    /// Attention heads of the cross-attention.
    #[serde(default = "d_4")]
    pub attention_heads: usize,
    /// Feed-forward width.
    #[serde(default = "d_2048")]
    pub linear_units: usize,
    /// Total layers: `att_layer_num` in `decoders`, the rest in `decoders2`.
    #[serde(default = "d_6")]
    pub num_blocks: usize,
    /// Layers with cross-attention (`decoders`).
    #[serde(default = "d_6")]
    pub att_layer_num: usize,
    /// FSMN kernel size.
    #[serde(default = "d_21")]
    pub kernel_size: usize,
    /// FSMN shift of `decoders` (`null` in the YAML means `(kernel_size - 1) / 2`).
    #[serde(default = "d_some0")]
    pub sanm_shfit: Option<usize>,
    /// Pre-LN (only true).
    #[serde(default = "d_true")]
    pub normalize_before: bool,
    /// Concat-after (unsupported).
    #[serde(default)]
    pub concat_after: bool,
    /// Output projection present (required).
    #[serde(default = "d_true")]
    pub use_output_layer: bool,
    /// LoRA adapters (unsupported).
    #[serde(default)]
    pub lora_list: Option<Vec<String>>,
}

/// `predictor_conf` (`CifPredictorV2`).
#[derive(Debug, Clone, Deserialize)]
pub struct PredictorConfig {
    /// Input width (= encoder output size).
    pub idim: usize,
    /// Firing threshold.
    #[serde(default = "d_one")]
    pub threshold: f64,
    /// Left context of the CIF convolution.
    pub l_order: usize,
    /// Right context of the CIF convolution.
    pub r_order: usize,
    /// Multiplier of the sigmoid output.
    #[serde(default = "d_one")]
    pub smooth_factor: f64,
    /// Subtracted from the scaled sigmoid output (then ReLU).
    #[serde(default)]
    pub noise_threshold: f64,
    /// Weight appended after the last frame (0.45 in paraformer-large).
    #[serde(default)]
    pub tail_threshold: f64,
}

/// `frontend_conf` (`WavFrontend`).
#[derive(Debug, Clone, Deserialize)]
pub struct FrontendConf {
    /// Sample rate.
    #[serde(default = "d_16k")]
    pub fs: u32,
    /// Window name.
    #[serde(default = "d_hamming")]
    pub window: String,
    /// Mel bins.
    #[serde(default = "d_80")]
    pub n_mels: usize,
    /// Frame length in ms.
    #[serde(default = "d_25")]
    pub frame_length: f32,
    /// Frame shift in ms.
    #[serde(default = "d_10")]
    pub frame_shift: f32,
    /// LFR stack size.
    #[serde(default = "d_1")]
    pub lfr_m: usize,
    /// LFR stride.
    #[serde(default = "d_1")]
    pub lfr_n: usize,
    /// Dither (FunASR default 1.0). Ignored: this crate always extracts with dither 0 so that
    /// recognition is deterministic.
    #[serde(default = "d_one")]
    pub dither: f64,
    /// Only true is supported.
    #[serde(default = "d_true")]
    pub snip_edges: bool,
    /// Scale samples by 32768 (FunASR's spelling).
    #[serde(default = "d_true")]
    pub upsacle_samples: bool,
}

/// The whole `config.yaml` (sections used for inference).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Model class (`Paraformer`).
    #[serde(default)]
    pub model: Option<String>,
    /// Encoder class (`SANMEncoder`).
    pub encoder: String,
    /// Encoder options.
    pub encoder_conf: EncoderConfig,
    /// Decoder class (`ParaformerSANMDecoder`).
    pub decoder: String,
    /// Decoder options.
    pub decoder_conf: DecoderConfig,
    /// Predictor class (`CifPredictorV2`).
    pub predictor: String,
    /// Predictor options.
    pub predictor_conf: PredictorConfig,
    /// Frontend class (`WavFrontend`).
    #[serde(default)]
    pub frontend: Option<String>,
    /// Frontend options.
    pub frontend_conf: FrontendConf,
    /// Feature normalisation module (unsupported unless null).
    #[serde(default)]
    pub normalize: Option<String>,
    /// Encoder input size (`n_mels * lfr_m` when absent).
    #[serde(default)]
    pub input_size: Option<usize>,
}

fn unsupported(what: String) -> ParaformerError {
    ParaformerError::Unsupported(what)
}

impl Config {
    /// Parse `config.yaml` text.
    pub fn from_yaml(text: &str) -> Result<Self, ParaformerError> {
        serde_yaml::from_str(text).map_err(|e| ParaformerError::Config(e.to_string()))
    }

    /// True for FunASR's chunked streaming model (`model: ParaformerStreaming`).
    pub fn is_streaming(&self) -> bool {
        self.model.as_deref() == Some("ParaformerStreaming")
    }

    /// Encoder input width.
    pub fn input_size(&self) -> usize {
        self.input_size
            .unwrap_or(self.frontend_conf.n_mels * self.frontend_conf.lfr_m)
    }

    /// Reject every option this implementation does not run, naming it.
    pub fn validate(&self) -> Result<(), ParaformerError> {
        let streaming = self.is_streaming();
        if let Some(m) = &self.model
            && m != "Paraformer"
            && m != "ParaformerStreaming"
        {
            return Err(unsupported(format!(
                "model: {m} (only Paraformer and ParaformerStreaming; BiCifParaformer, \
                 SeacoParaformer, ContextualParaformer are not implemented)"
            )));
        }
        let e = &self.encoder_conf;
        // Paraformer: SANMEncoder with `pe`; ParaformerStreaming: SANMEncoderChunkOpt
        // (`models/scama/encoder.py`) with `pe_online` (StreamSinusoidalPositionEncoder).
        let (want_encoder, want_input) = if streaming {
            ("SANMEncoderChunkOpt", "pe_online")
        } else {
            ("SANMEncoder", "pe")
        };
        if self.encoder != want_encoder {
            return Err(unsupported(format!(
                "encoder: {} with model {} (expected {want_encoder})",
                self.encoder,
                self.model.as_deref().unwrap_or("Paraformer")
            )));
        }
        if e.input_layer.as_deref() != Some(want_input) {
            return Err(unsupported(format!(
                "encoder_conf.input_layer: {:?} (only \"{want_input}\" with {want_encoder})",
                e.input_layer
            )));
        }
        if !e.normalize_before || e.concat_after {
            return Err(unsupported(
                "encoder_conf.normalize_before=false / concat_after=true".into(),
            ));
        }
        if e.positionwise_layer_type != "linear" {
            return Err(unsupported(format!(
                "encoder_conf.positionwise_layer_type: {}",
                e.positionwise_layer_type
            )));
        }
        if e.selfattention_layer_type != "sanm" {
            return Err(unsupported(format!(
                "encoder_conf.selfattention_layer_type: {}",
                e.selfattention_layer_type
            )));
        }
        if !e.interctc_layer_idx.is_empty() {
            return Err(unsupported("encoder_conf.interctc_layer_idx".into()));
        }
        if e.lora_list.is_some() || self.decoder_conf.lora_list.is_some() {
            return Err(unsupported("lora_list".into()));
        }
        if e.num_blocks == 0
            || !e.output_size.is_multiple_of(e.attention_heads)
            || e.kernel_size == 0
        {
            return Err(ParaformerError::Config(format!(
                "bad encoder sizes: {} blocks, width {}, {} heads, kernel {}",
                e.num_blocks, e.output_size, e.attention_heads, e.kernel_size
            )));
        }
        if e.sanm_shfit > (e.kernel_size - 1) / 2 {
            return Err(unsupported(format!(
                "encoder_conf.sanm_shfit {} > (kernel_size-1)/2",
                e.sanm_shfit
            )));
        }
        let d = &self.decoder_conf;
        if self.decoder != "ParaformerSANMDecoder" {
            return Err(unsupported(format!("decoder: {}", self.decoder)));
        }
        if !d.normalize_before || d.concat_after || !d.use_output_layer {
            return Err(unsupported(
                "decoder_conf.normalize_before=false / concat_after=true / use_output_layer=false"
                    .into(),
            ));
        }
        if d.att_layer_num > d.num_blocks
            || !e.output_size.is_multiple_of(d.attention_heads)
            || d.kernel_size == 0
        {
            return Err(ParaformerError::Config(format!(
                "bad decoder sizes: {} blocks, {} attention layers, {} heads, kernel {}",
                d.num_blocks, d.att_layer_num, d.attention_heads, d.kernel_size
            )));
        }
        let shift = d.sanm_shfit.unwrap_or((d.kernel_size - 1) / 2);
        if shift > d.kernel_size - 1 {
            return Err(unsupported(format!("decoder_conf.sanm_shfit {shift}")));
        }
        if self.predictor != "CifPredictorV2" {
            return Err(unsupported(format!("predictor: {}", self.predictor)));
        }
        if self.predictor_conf.idim != e.output_size {
            return Err(ParaformerError::Config(format!(
                "predictor_conf.idim {} != encoder output_size {}",
                self.predictor_conf.idim, e.output_size
            )));
        }
        if let Some(f) = &self.frontend
            && f != "WavFrontend"
            && f != "wav_frontend"
            && f != "WavFrontendOnline"
        {
            return Err(unsupported(format!("frontend: {f}")));
        }
        if !self.frontend_conf.snip_edges {
            return Err(unsupported("frontend_conf.snip_edges=false".into()));
        }
        if let Some(n) = &self.normalize {
            return Err(unsupported(format!("normalize: {n}")));
        }
        if self.input_size() != self.frontend_conf.n_mels * self.frontend_conf.lfr_m {
            return Err(ParaformerError::Config(format!(
                "input_size {} != n_mels * lfr_m",
                self.input_size()
            )));
        }
        Ok(())
    }
}
