//! Text-to-music sessions. A session runs its request's *schedule* stage by stage, one bounded
//! step per worker step, so the worker interleaves and batches many sessions:
//!
//! - `ar`: MusicGen, one LM step per worker step (batch phase `ar_step`); audio is decoded and
//!   sent as soon as frames leave the delay pattern, in chunks of `chunk_frames`.
//! - `magnet`: MAGNeT, one decoding iteration (one forward pass with its CFG rows) per worker
//!   step (phase `magnet_iter`; sessions at the same stage and length share one forward), and,
//!   with rescoring, one teacher-forced pass of the autoregressive rescorer between two
//!   iterations (phase `magnet_rescore`, keyed by the rescorer: the passes of every session
//!   rescored by the same model share one forward over all their sequences). Audio is sent
//!   once the last iteration ends.
//! - `hybrid`: the first `prefix` frames by an autoregressive model sharing the codec (streamed
//!   like `ar`; these sessions batch with plain `ar` sessions of that model), then MAGNeT for
//!   the rest with the prefix as a prompt that is never re-masked (arXiv 2401.04577 §3.4; the
//!   prefix model plays the role of the hybrid checkpoint's causal part). The prefix audio goes
//!   out as it is generated and the remainder once MAGNeT ends, through the same streaming
//!   decoder, so the audio is continuous and nothing sent is ever revised.

use std::sync::Arc;

use cadenza_audio::Limits;
use cadenza_codecs::StreamDecoder;
use cadenza_magnet::{DecodeParams, MagnetGeneration};
use cadenza_musicgen::{GenerateParams, Generation};
use cadenza_nn::sampling::SamplingParams;
use cadenza_nn::transformer::CrossKv;
use candle_core::{Device, Tensor};

use crate::codec::{AudioInput, Codes};
use crate::error::EngineError;
use crate::registry::MusicModel;
use crate::scheduler::BatchKey;
use crate::session::{Base, Meta, Output, Stepper};

/// Continue from existing music instead of starting from silence.
#[derive(Debug, Clone)]
pub enum Continuation {
    /// Audio, encoded with the model's codec first.
    Audio(AudioInput),
    /// Codes of the model's codec, `[K, T0]`.
    Codes(Codes),
}

/// Which decoding schedule a music request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Autoregressive (MusicGen, delay pattern).
    Ar,
    /// MAGNeT masked non-autoregressive decoding of the whole clip.
    Magnet,
    /// An autoregressive prefix, then MAGNeT for the rest.
    Hybrid,
}

impl ScheduleKind {
    /// Parses `ar`, `magnet` or `hybrid`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ar" | "autoregressive" => Some(Self::Ar),
            "magnet" => Some(Self::Magnet),
            "hybrid" => Some(Self::Hybrid),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ar => "ar",
            Self::Magnet => "magnet",
            Self::Hybrid => "hybrid",
        }
    }
}

/// Rescoring asked for by a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RescoreRequest {
    /// False turns rescoring off even where the model's default schedule rescores.
    pub enabled: bool,
    /// The rescorer (an autoregressive music model sharing the codec); `None` = the model's
    /// configured `rescore_with`.
    pub model: Option<String>,
    /// The rescorer's weight in (0, 1]; `None` = the model's default (0.3).
    pub weight: Option<f32>,
}

/// The schedule a request asks for; every `None` is the model's default
/// (`[models.schedule]` in the config, see [`crate::config::ScheduleDefaults`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduleRequest {
    /// The schedule.
    pub kind: Option<ScheduleKind>,
    /// MAGNeT iterations per codebook (one positive entry per codebook).
    pub decoding_steps: Option<Vec<usize>>,
    /// Hybrid: seconds generated autoregressively first (< `duration_s`).
    pub prefix_s: Option<f32>,
    /// Hybrid: the autoregressive model that generates the prefix.
    pub prefix_model: Option<String>,
    /// MAGNeT span arrangement: `nonoverlap` or `stride1`.
    pub span_arrangement: Option<String>,
    /// MAGNeT CFG coefficient at a stage's first iteration (annealed to `min_cfg`).
    pub max_cfg: Option<f32>,
    /// MAGNeT CFG coefficient at a stage's last iteration.
    pub min_cfg: Option<f32>,
    /// Rescoring; `None` = the model's default.
    pub rescore: Option<RescoreRequest>,
}

/// A text-to-music request, validated by [`crate::Engine::generate_music`].
#[derive(Debug, Clone)]
pub struct MusicRequest {
    /// Registry name ("" = the default music model).
    pub model: String,
    /// The text description.
    pub prompt: String,
    /// Seconds of new audio.
    pub duration_s: f32,
    /// Sampling settings. Temperature 0 = the schedule's default (1 for autoregressive
    /// stages, 3 annealed for MAGNeT); top-k 0 = 250 for autoregressive stages; for MAGNeT,
    /// top-p 0 with top-k 0 = top-p 0.9.
    pub sampling: SamplingParams,
    /// CFG coefficient; `None` = the model's default; 1 = off. For MAGNeT stages it is the
    /// starting coefficient unless `schedule.max_cfg` is set.
    pub guidance: Option<f32>,
    /// Seed; `None` = random (reported in the final event).
    pub seed: Option<u64>,
    /// Music to continue.
    pub continuation: Option<Continuation>,
    /// Frames per audio chunk; `None` = about 320 ms.
    pub chunk_frames: Option<usize>,
    /// Send the generated codes at the end.
    pub return_tokens: bool,
    /// The decoding schedule.
    pub schedule: ScheduleRequest,
}

/// What a music session sends back.
#[derive(Debug, Clone, PartialEq)]
pub enum MusicEvent {
    /// Steps done of the total, per stage.
    Progress {
        /// `ar` (LM steps), `magnet` (decoding iterations over all codebooks) or `rescore`
        /// (rescoring passes).
        stage: &'static str,
        /// Steps done.
        step: u32,
        /// Steps in all.
        total: u32,
    },
    /// New final audio at the model's rate (the continuation prompt is not echoed).
    Audio {
        /// Index of the first sample among the new audio.
        start_sample: u64,
        /// The samples.
        pcm: cadenza_audio::Pcm,
    },
    /// The generated codes, `[K, T]` (when asked for).
    Tokens(Codes),
    /// Generation finished.
    Done {
        /// The seed used.
        seed: u64,
        /// Tokens generated (frames × codebooks).
        tokens: u64,
        /// Seconds of new audio.
        audio_seconds: f32,
    },
}

/// The MAGNeT part of a resolved schedule.
#[derive(Debug, Clone)]
pub(crate) struct MagnetPlan {
    /// Decoding settings (`frames` = the whole sequence incl. prompt; `prompt` filled in at
    /// run time).
    pub(crate) params: DecodeParams,
    /// Rescorer and MAGNeT's own weight (`1 - rescorer weight`).
    pub(crate) rescorer: Option<(Arc<MusicModel>, f32)>,
}

/// A schedule with every default resolved and validated.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) kind: ScheduleKind,
    /// The autoregressive model of the `ar` stage (the model itself, or the hybrid prefix
    /// model).
    pub(crate) ar: Option<Arc<MusicModel>>,
    /// Frames the `ar` stage generates (after any continuation).
    pub(crate) ar_frames: usize,
    /// CFG of the `ar` stage.
    pub(crate) ar_guidance: f32,
    /// Sampling of the `ar` stage.
    pub(crate) ar_sampling: SamplingParams,
    /// The MAGNeT stage.
    pub(crate) magnet: Option<MagnetPlan>,
    /// New frames the request asked for.
    pub(crate) frames: usize,
}

/// An autoregressive stage between LM steps.
struct ArRun {
    model: Arc<MusicModel>,
    generation: Box<Generation>,
    /// Completed frames not yet decoded.
    pending: Vec<Vec<u32>>,
}

/// Conditioning of a model for the prompt: (cond, mask) as its LM takes them.
type Cond = (Tensor, Tensor);

/// A MAGNeT stage between iterations.
struct MagnetRun {
    generation: Box<MagnetGeneration>,
    /// Snapshot before a batched step, restored if the step fails half-way.
    backup: Option<Box<MagnetGeneration>>,
    /// The rescorer's cross-attention K/V of the prompt (with its CFG row), when rescoring.
    rescore_cross: Option<Vec<CrossKv>>,
    /// Rescoring passes done.
    rescored: usize,
    /// The last iteration's tokens are rescored (the next step is an iteration).
    rescore_done: bool,
    /// Frames already pushed to the decoder (the prompt / AR prefix).
    decoded_frames: usize,
}

enum State {
    Start(Option<Continuation>),
    Ar(Box<ArRun>),
    Magnet(Box<MagnetRun>),
    Finished,
}

/// One music generation session.
pub(crate) struct MusicTask {
    base: Base<MusicEvent>,
    model: Arc<MusicModel>,
    plan: Plan,
    prompt: String,
    seed: u64,
    chunk_frames: usize,
    return_tokens: bool,
    limits: Limits,
    state: State,
    emitted: u64,
    decoder: Option<StreamDecoder>,
    /// Samples of the continuation prompt still to drop from the decoded audio.
    skip_samples: u64,
    /// Frames of the continuation prompt.
    prompt_frames: usize,
    /// The MAGNeT model's conditioning (hybrid: computed at the start, used after the prefix).
    magnet_cond: Option<Cond>,
}

fn rows_of(guidance: f32) -> usize {
    if guidance > 1.0 { 2 } else { 1 }
}

impl MusicTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model: Arc<MusicModel>,
        req: MusicRequest,
        plan: Plan,
        seed: u64,
        limits: Limits,
        out: Output<MusicEvent>,
        meta: Meta,
    ) -> Self {
        let fr = model.frame_rate();
        Self {
            base: Base::new(format!("music:{}", model.info.name), out, meta),
            prompt: req.prompt,
            plan,
            seed,
            chunk_frames: req
                .chunk_frames
                .unwrap_or(((fr * 0.32).round() as usize).max(1)),
            return_tokens: req.return_tokens,
            limits,
            state: State::Start(req.continuation),
            emitted: 0,
            decoder: None,
            skip_samples: 0,
            prompt_frames: 0,
            magnet_cond: None,
            model,
        }
    }

    /// Continuation codes `[K][T0]` (audio is encoded with the model's codec).
    fn continuation_codes(
        &self,
        continuation: Option<Continuation>,
    ) -> Result<Option<Vec<Vec<u32>>>, EngineError> {
        let m = &self.model;
        let k = m.num_codebooks();
        let codes = match continuation {
            None => return Ok(None),
            Some(Continuation::Codes(c)) => {
                c.validate("continuation_codes", k, m.card())?;
                if c.num_codebooks != k {
                    return Err(EngineError::invalid(
                        "continuation_codes",
                        format!("this model needs {k} codebooks, got {}", c.num_codebooks),
                    ));
                }
                c
            }
            Some(Continuation::Audio(a)) => {
                let codec = m.codec();
                let cfg = codec.config();
                let pcm = crate::codec::audio_to_pcm(a, &self.limits, "continuation_audio")?
                    .conform(cfg.sampling_rate, cfg.audio_channels as u16)
                    .map_err(|e| EngineError::audio("continuation_audio", e))?;
                if pcm.frames() == 0 {
                    return Err(EngineError::invalid(
                        "continuation_audio",
                        "the audio is empty",
                    ));
                }
                let x = crate::codec::pcm_to_tensor(&pcm)?.unsqueeze(0)?;
                let enc = codec.encode(&x, None)?;
                let codes = enc.codes.squeeze(0)?.squeeze(0)?.narrow(0, 0, k)?;
                Codes::from_tensor(&codes)?
            }
        };
        Ok(Some(
            (0..codes.num_codebooks)
                .map(|q| codes.codes[q * codes.frames..(q + 1) * codes.frames].to_vec())
                .collect(),
        ))
    }

    /// The conditioning an autoregressive model computes for the prompt.
    fn ar_cond(&self, m: &MusicModel) -> Result<Cond, EngineError> {
        let ar = m
            .ar()
            .ok_or_else(|| EngineError::Internal("not an autoregressive model".into()))?;
        let (ids, mask) = ar.tokenize(&[self.prompt.as_str()])?;
        let cond = ar.condition(&ids, &mask)?;
        Ok((cond, mask.to_dtype(candle_core::DType::F32)?))
    }

    fn start(&mut self, continuation: Option<Continuation>) -> Result<State, EngineError> {
        let prompt = self.continuation_codes(continuation)?;
        self.prompt_frames = prompt.as_ref().map_or(0, |p| p[0].len());
        let codec = self.model.codec();
        self.skip_samples = (self.prompt_frames * codec.config().hop_length()) as u64;
        self.decoder = Some(StreamDecoder::new(codec)?);
        if let Some(mg) = self.model.magnet() {
            let (ids, mask) = mg.tokenize(&[self.prompt.as_str()])?;
            // audiocraft's fuser attends to every text position (padding only zeroed): no
            // cross-attention mask, as in the parity tests.
            self.magnet_cond = Some((mg.condition(&ids, &mask)?, mask));
        }
        match self.plan.kind {
            ScheduleKind::Ar | ScheduleKind::Hybrid => {
                let ar_model = self
                    .plan
                    .ar
                    .clone()
                    .ok_or_else(|| EngineError::Internal("no autoregressive model".into()))?;
                let (cond, mask) = self.ar_cond(&ar_model)?;
                let params = GenerateParams {
                    frames: self.plan.ar_frames,
                    sampling: self.plan.ar_sampling.clone(),
                    guidance: self.plan.ar_guidance,
                    seed: self.seed,
                    prompt,
                };
                let ar = ar_model
                    .ar()
                    .ok_or_else(|| EngineError::Internal("not an autoregressive model".into()))?;
                let generation = Generation::new(ar, &cond, &mask, params)?;
                Ok(State::Ar(Box::new(ArRun {
                    model: ar_model,
                    generation: Box::new(generation),
                    pending: Vec::new(),
                })))
            }
            ScheduleKind::Magnet => self.start_magnet(prompt.unwrap_or_default()),
        }
    }

    /// Starts the MAGNeT stage from `prompt` `[K][P]` (continuation and/or AR prefix).
    fn start_magnet(&mut self, prompt: Vec<Vec<u32>>) -> Result<State, EngineError> {
        let plan = self
            .plan
            .magnet
            .as_ref()
            .ok_or_else(|| EngineError::Internal("no MAGNeT stage".into()))?;
        let mg = self
            .model
            .magnet()
            .ok_or_else(|| EngineError::Internal("not a MAGNeT model".into()))?;
        let (cond, _) = self
            .magnet_cond
            .as_ref()
            .ok_or_else(|| EngineError::Internal("no MAGNeT conditioning".into()))?;
        let decoded_frames = prompt.first().map_or(0, Vec::len);
        // The whole sequence: prompt + the new frames, rounded up to whole spans where the
        // model can run that long (non-overlapping spans trim the sequence to a multiple of
        // the span length; the extra frames are cut from the output).
        let want = self.prompt_frames + self.plan.frames;
        let c = &mg.lm.config;
        let up = want.div_ceil(c.span_len) * c.span_len;
        let fits = c.subcodes_context.is_none() || up <= c.max_frames;
        let frames = if fits { up } else { want };
        let params = DecodeParams {
            frames,
            seed: self.seed,
            prompt: (decoded_frames > 0).then_some(prompt),
            ..plan.params.clone()
        };
        let generation = MagnetGeneration::new(&mg.lm, cond, None, params)?;
        let rescore_cross = match &plan.rescorer {
            Some((r, _)) => {
                let ar = r.ar().ok_or_else(|| {
                    EngineError::Internal("the rescorer is not autoregressive".into())
                })?;
                let (cond, mask) = self.ar_cond(r)?;
                Some(cadenza_magnet::rescore::rescorer_cross(
                    &ar.lm,
                    &cond,
                    ar.mask_cross_attention.then_some(&mask),
                    ar.defaults.guidance_scale,
                )?)
            }
            None => None,
        };
        Ok(State::Magnet(Box::new(MagnetRun {
            generation: Box::new(generation),
            backup: None,
            rescore_cross,
            rescored: 0,
            rescore_done: false,
            decoded_frames,
        })))
    }

    /// Decodes `frames` (and, when `last`, the decoder's tail) and sends the new audio.
    fn emit_audio(&mut self, frames: &[Vec<u32>], last: bool) -> Result<(), EngineError> {
        let model = self.model.clone();
        let codec = model.codec();
        let k = model.num_codebooks();
        let decoder = self
            .decoder
            .as_mut()
            .ok_or_else(|| EngineError::Internal("no decoder".into()))?;
        let mut audio = if frames.is_empty() {
            Tensor::zeros((1, 0), candle_core::DType::F32, &Device::Cpu)?
        } else {
            let n = frames.len();
            let flat: Vec<u32> = (0..k)
                .flat_map(|q| frames.iter().map(move |f| f[q]))
                .collect();
            decoder.push(codec, &Tensor::from_vec(flat, (k, n), &Device::Cpu)?)?
        };
        if last {
            audio = Tensor::cat(&[&audio, &decoder.finish(codec)?], 1)?;
        }
        let n = audio.dim(1)? as u64;
        let drop = self.skip_samples.min(n);
        self.skip_samples -= drop;
        let audio = audio.narrow(1, drop as usize, (n - drop) as usize)?;
        if audio.dim(1)? > 0 {
            let rate = codec.config().sampling_rate;
            let pcm = crate::codec::tensor_to_pcm(&audio, rate)?;
            let len = pcm.frames() as u64;
            self.base.chunk_sent("audio");
            let meta = &self.base.meta;
            meta.metrics
                .audio_seconds(&meta.model, "out", len as f64 / rate as f64);
            self.base.out.push(MusicEvent::Audio {
                start_sample: self.emitted,
                pcm,
            });
            self.emitted += len;
        }
        Ok(())
    }

    /// Sends the tokens (if asked) and the final event for the complete sequence `frames`
    /// (`[K][T]`, continuation included).
    fn finish(&mut self, frames: &[Vec<u32>]) {
        let k = self.model.num_codebooks();
        let p = self.prompt_frames;
        let new: Vec<u32> = frames
            .iter()
            .flat_map(|row| row[p.min(row.len())..].iter().copied())
            .collect();
        let n = new.len() / k.max(1);
        if self.return_tokens {
            self.base.out.push(MusicEvent::Tokens(Codes {
                num_codebooks: k,
                frames: n,
                codes: new,
            }));
        }
        let rate = self.model.codec().config().sampling_rate;
        self.base.out.push(MusicEvent::Done {
            seed: self.seed,
            tokens: (n * k) as u64,
            audio_seconds: self.emitted as f32 / rate as f32,
        });
    }

    /// After an LM step of the `ar` stage: sends the audio of completed frames every
    /// `chunk_frames`, progress, and at the end either the final events (`ar`) or the start of
    /// the MAGNeT stage (`hybrid`).
    fn after_ar_step(
        &mut self,
        mut run: Box<ArRun>,
        completed: Option<Vec<u32>>,
    ) -> Result<bool, EngineError> {
        let ar_model = run.model.clone();
        let ar = ar_model
            .ar()
            .ok_or_else(|| EngineError::Internal("not an autoregressive model".into()))?;
        run.pending.extend(completed);
        let done = run.generation.is_done(ar);
        let hybrid = self.plan.kind == ScheduleKind::Hybrid;
        if done || run.pending.len() >= self.chunk_frames {
            let frames = std::mem::take(&mut run.pending);
            let k = ar.lm.num_codebooks() as u64;
            let meta = &self.base.meta;
            meta.metrics.tokens(&meta.model, frames.len() as u64 * k);
            self.emit_audio(&frames, done && !hybrid)?;
            self.base.out.push(MusicEvent::Progress {
                stage: "ar",
                step: run.generation.steps_done() as u32,
                total: run.generation.total_steps(ar) as u32,
            });
        }
        if !done {
            self.state = State::Ar(run);
            return Ok(false);
        }
        if hybrid {
            // Continuation + AR prefix become MAGNeT's prompt (never re-masked).
            self.state = self.start_magnet(run.generation.frames().to_vec())?;
            return Ok(false);
        }
        self.finish(run.generation.frames());
        Ok(true)
    }

    /// After a MAGNeT iteration or rescoring pass: progress, and at the end the audio of
    /// everything not yet decoded, the tokens and the final event.
    fn after_magnet_step(
        &mut self,
        run: Box<MagnetRun>,
        iterated: bool,
    ) -> Result<bool, EngineError> {
        let g = &run.generation;
        if iterated {
            self.base.out.push(MusicEvent::Progress {
                stage: "magnet",
                step: g.iterations_done() as u32,
                total: g.total_iterations() as u32,
            });
        } else {
            let k = g.frames().len();
            self.base.out.push(MusicEvent::Progress {
                stage: "rescore",
                step: run.rescored as u32,
                total: (g.total_iterations() - k) as u32,
            });
        }
        if !g.is_done() {
            self.state = State::Magnet(run);
            return Ok(false);
        }
        // The sequence may be longer than asked (rounded up to whole spans): cut it.
        let want = self.prompt_frames + self.plan.frames;
        let frames: Vec<Vec<u32>> = g
            .frames()
            .iter()
            .map(|r| r[..want.min(r.len())].to_vec())
            .collect();
        let t = frames[0].len();
        let new: Vec<Vec<u32>> = (run.decoded_frames.min(t)..t)
            .map(|f| frames.iter().map(|r| r[f]).collect())
            .collect();
        let meta = &self.base.meta;
        let k = frames.len() as u64;
        meta.metrics
            .tokens(&meta.model, (t - run.decoded_frames.min(t)) as u64 * k);
        self.emit_audio(&new, true)?;
        self.finish(&frames);
        Ok(true)
    }

    fn rescorer(&self) -> Option<(Arc<MusicModel>, f32)> {
        self.plan.magnet.as_ref().and_then(|m| m.rescorer.clone())
    }

    /// Whether the MAGNeT run's next step is a rescoring pass.
    fn needs_rescore(&self, run: &MagnetRun) -> bool {
        self.rescorer().is_some() && run.generation.awaiting_rescore() && !run.rescore_done
    }

    /// One rescoring pass: the rescorer's probabilities of the tokens now in the current
    /// stage, mixed into MAGNeT's before the next re-masking (paper §3.3).
    fn rescore(&self, run: &mut MagnetRun) -> Result<(), EngineError> {
        let (r, _) = self
            .rescorer()
            .ok_or_else(|| EngineError::Internal("no rescorer".into()))?;
        let mut probs = Self::rescore_probs(&r, &[&*run])?;
        self.apply_rescore(run, probs.remove(0))
    }

    /// The rescorer `r`'s teacher-forced probabilities for several runs in one forward pass.
    fn rescore_probs(
        r: &MusicModel,
        runs: &[&MagnetRun],
    ) -> Result<Vec<Vec<Vec<f32>>>, EngineError> {
        let ar = r
            .ar()
            .ok_or_else(|| EngineError::Internal("the rescorer is not autoregressive".into()))?;
        let inputs = runs
            .iter()
            .map(|run| {
                let cross = run
                    .rescore_cross
                    .as_deref()
                    .ok_or_else(|| EngineError::Internal("no rescorer conditioning".into()))?;
                Ok(cadenza_magnet::rescore::RescoreInput {
                    cross,
                    frames: run.generation.frames(),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        Ok(cadenza_magnet::rescore::teacher_forced_probs_batch(
            &ar.lm,
            &ar.pattern,
            &inputs,
            ar.defaults.guidance_scale,
        )?)
    }

    /// Mixes a rescoring pass's probabilities (all codebooks) into the pending iteration.
    fn apply_rescore(&self, run: &mut MagnetRun, probs: Vec<Vec<f32>>) -> Result<(), EngineError> {
        let (_, magnet_weight) = self
            .rescorer()
            .ok_or_else(|| EngineError::Internal("no rescorer".into()))?;
        let s = run.generation.stage();
        run.generation.rescore(&probs[s], magnet_weight)?;
        run.rescored += 1;
        run.rescore_done = true;
        Ok(())
    }

    /// Batched `magnet_rescore`: one forward pass of the rescorer over every session's
    /// sequence (all sessions of the batch rescore with the same model).
    fn run_rescore_batch(items: &mut [&mut Self]) -> Vec<Result<Option<bool>, EngineError>> {
        let Some((r, _)) = items[0].rescorer() else {
            return items.iter_mut().map(|t| t.run()).collect();
        };
        let same = items.iter().all(|t| {
            matches!(&t.state, State::Magnet(run) if t.needs_rescore(run))
                && t.rescorer().is_some_and(|(m, _)| Arc::ptr_eq(&m, &r))
        });
        if !same {
            return items.iter_mut().map(|t| t.run()).collect();
        }
        let probs = {
            let runs: Vec<&MagnetRun> = items
                .iter()
                .filter_map(|t| match &t.state {
                    State::Magnet(run) => Some(&**run),
                    _ => None,
                })
                .collect();
            Self::rescore_probs(&r, &runs)
        };
        match probs {
            Ok(probs) => items
                .iter_mut()
                .zip(probs)
                .map(|(t, p)| {
                    let State::Magnet(mut run) = std::mem::replace(&mut t.state, State::Finished)
                    else {
                        return Err(EngineError::Internal("music session lost its state".into()));
                    };
                    t.apply_rescore(&mut run, p)?;
                    t.after_magnet_step(run, false).map(Some)
                })
                .collect(),
            // Nothing changed (the pass failed before any session was touched).
            Err(e) => {
                let msg = e.to_string();
                items
                    .iter()
                    .map(|_| Err(EngineError::Internal(msg.clone())))
                    .collect()
            }
        }
    }

    fn work(&mut self) -> Result<bool, EngineError> {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Start(c) => {
                self.state = self.start(c)?;
                Ok(false)
            }
            State::Ar(mut run) => {
                let ar_model = run.model.clone();
                let ar = ar_model
                    .ar()
                    .ok_or_else(|| EngineError::Internal("not an autoregressive model".into()))?;
                let out = run.generation.step(ar)?;
                self.after_ar_step(run, out.completed)
            }
            State::Magnet(mut run) => {
                if self.needs_rescore(&run) {
                    self.rescore(&mut run)?;
                    return self.after_magnet_step(run, false);
                }
                let mg = self
                    .model
                    .magnet()
                    .ok_or_else(|| EngineError::Internal("not a MAGNeT model".into()))?;
                run.generation.step(&mg.lm)?;
                run.rescore_done = false;
                self.after_magnet_step(run, true)
            }
            // Only reachable after a panic interrupted a step of this session.
            State::Finished => Err(EngineError::Internal(
                "the session was interrupted by an internal error".into(),
            )),
        }
    }

    /// The batch phase of the next step.
    fn phase(&self) -> Option<(&'static str, String)> {
        match &self.state {
            State::Ar(r) => Some(("ar_step", r.model.info.name.clone())),
            State::Magnet(r) if self.needs_rescore(r) => self
                .rescorer()
                .map(|(m, _)| ("magnet_rescore", m.info.name.clone())),
            State::Magnet(_) => Some(("magnet_iter", self.model.info.name.clone())),
            _ => None,
        }
    }

    /// Batched `ar_step`: one forward pass for every session (all on the same AR model).
    fn run_ar_batch(items: &mut [&mut Self]) -> Vec<Result<Option<bool>, EngineError>> {
        let model = match &items[0].state {
            State::Ar(r) => r.model.clone(),
            _ => return items.iter_mut().map(|t| t.run()).collect(),
        };
        let same = items
            .iter()
            .all(|t| matches!(&t.state, State::Ar(r) if Arc::ptr_eq(&r.model, &model)));
        let Some(ar) = model.ar().filter(|_| same) else {
            return items.iter_mut().map(|t| t.run()).collect();
        };
        // The generations step in place, so a panic leaves every session in a state that
        // `rollback` can restore.
        let outs = {
            let mut gens: Vec<&mut Generation> = items
                .iter_mut()
                .filter_map(|t| match &mut t.state {
                    State::Ar(r) => Some(&mut *r.generation),
                    _ => None,
                })
                .collect();
            Generation::step_batch(ar, &mut gens)
        };
        match outs {
            Ok(outs) => items
                .iter_mut()
                .zip(outs)
                .map(
                    |(t, o)| match std::mem::replace(&mut t.state, State::Finished) {
                        State::Ar(run) => t.after_ar_step(run, o.completed).map(Some),
                        _ => Err(EngineError::Internal("music session lost its state".into())),
                    },
                )
                .collect(),
            Err(e) => {
                let msg = e.to_string();
                items
                    .iter()
                    .map(|_| Err(EngineError::Internal(msg.clone())))
                    .collect()
            }
        }
    }

    /// Batched `magnet_iter`: sessions at the same stage and sequence length share one forward
    /// pass (the stage's attention mask and the input shape must match); other groups run as
    /// their own batches within this step.
    fn run_magnet_batch(items: &mut [&mut Self]) -> Vec<Result<Option<bool>, EngineError>> {
        let model = items[0].model.clone();
        let Some(mg) = model
            .magnet()
            .filter(|_| items.iter().all(|t| Arc::ptr_eq(&t.model, &model)))
        else {
            return items.iter_mut().map(|t| t.run()).collect();
        };
        let key = |t: &Self| match &t.state {
            State::Magnet(r) => Some((r.generation.stage(), r.generation.frames()[0].len())),
            _ => None,
        };
        let mut results: Vec<Option<Result<Option<bool>, EngineError>>> =
            (0..items.len()).map(|_| None).collect();
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (i, t) in items.iter().enumerate() {
            match key(t) {
                Some(k) => match groups.iter_mut().find(|(g, _)| *g == k) {
                    Some((_, v)) => v.push(i),
                    None => groups.push((k, vec![i])),
                },
                None => results[i] = Some(Err(EngineError::Internal("not a MAGNeT stage".into()))),
            }
        }
        for (_, idx) in groups {
            // Snapshot, so that `rollback` (after a panic) or an error restores every session.
            for &i in &idx {
                if let State::Magnet(r) = &mut items[i].state {
                    r.backup = Some(r.generation.clone());
                }
            }
            let outcome = {
                let mut gens: Vec<&mut MagnetGeneration> = Vec::with_capacity(idx.len());
                for (i, t) in items.iter_mut().enumerate() {
                    if idx.contains(&i)
                        && let State::Magnet(r) = &mut t.state
                    {
                        gens.push(&mut *r.generation);
                    }
                }
                MagnetGeneration::step_batch(&mg.lm, &mut gens)
            };
            match outcome {
                Ok(_) => {
                    for &i in &idx {
                        let t = &mut *items[i];
                        results[i] = Some(match std::mem::replace(&mut t.state, State::Finished) {
                            State::Magnet(mut run) => {
                                run.backup = None;
                                run.rescore_done = false;
                                t.after_magnet_step(run, true).map(Some)
                            }
                            _ => Err(EngineError::Internal("music session lost its state".into())),
                        });
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for &i in &idx {
                        items[i].rollback();
                        results[i] = Some(Err(EngineError::Internal(msg.clone())));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::Internal("not stepped".into()))))
            .collect()
    }
}

impl Stepper for MusicTask {
    type Event = MusicEvent;
    fn base(&self) -> &Base<MusicEvent> {
        &self.base
    }
    fn base_mut(&mut self) -> &mut Base<MusicEvent> {
        &mut self.base
    }
    fn run(&mut self) -> Result<Option<bool>, EngineError> {
        self.work().map(Some)
    }

    /// Steps of running sessions batch by stage: `ar_step` (keyed by the autoregressive model,
    /// so hybrid prefixes batch with plain MusicGen sessions of that model), `magnet_iter`
    /// (keyed by the MAGNeT model) and `magnet_rescore` (keyed by the rescorer). The first step
    /// (text encoding, prompt encoding) runs alone.
    fn batch_key(&self) -> Option<BatchKey> {
        self.phase().map(|(phase, model)| BatchKey {
            kind: "music",
            model,
            phase,
        })
    }

    fn run_batch(items: &mut [&mut Self]) -> Vec<Result<Option<bool>, EngineError>> {
        if items.len() < 2 {
            return items.iter_mut().map(|t| t.run()).collect();
        }
        let phase = items[0].phase().map(|p| p.0);
        if items.iter().any(|t| t.phase().map(|p| p.0) != phase) {
            return items.iter_mut().map(|t| t.run()).collect();
        }
        match phase {
            Some("ar_step") => Self::run_ar_batch(items),
            Some("magnet_iter") => Self::run_magnet_batch(items),
            Some("magnet_rescore") => Self::run_rescore_batch(items),
            _ => items.iter_mut().map(|t| t.run()).collect(),
        }
    }

    fn rollback(&mut self) {
        match &mut self.state {
            State::Ar(r) => r.generation.rollback(),
            State::Magnet(r) => {
                if let Some(b) = r.backup.take() {
                    r.generation = b;
                }
            }
            _ => {}
        }
    }

    fn rows(&self) -> usize {
        match &self.state {
            State::Ar(_) | State::Start(_) if self.plan.kind != ScheduleKind::Magnet => {
                rows_of(self.plan.ar_guidance)
            }
            State::Magnet(r) if self.needs_rescore(r) => self
                .rescorer()
                .and_then(|(m, _)| m.ar().map(|a| rows_of(a.defaults.guidance_scale)))
                .unwrap_or(1),
            State::Magnet(r) => r.generation.rows(),
            _ => self
                .plan
                .magnet
                .as_ref()
                .map_or(1, |m| if m.params.cfg { 2 } else { 1 }),
        }
    }

    fn remaining_steps(&self) -> Option<usize> {
        let magnet_total = |p: &MagnetPlan| {
            let n: usize = p.params.decoding_steps.iter().sum();
            let k = p.params.decoding_steps.len();
            n + if p.rescorer.is_some() { n - k } else { 0 }
        };
        let magnet = self.plan.magnet.as_ref().map_or(0, magnet_total);
        Some(match &self.state {
            State::Ar(r) => {
                let ar = r.model.ar()?;
                r.generation.total_steps(ar) - r.generation.steps_done() + magnet
            }
            State::Magnet(r) => {
                let g = &r.generation;
                let left = g.total_iterations() - g.iterations_done();
                let k = g.frames().len();
                let rescore_left = if self.rescorer().is_some() {
                    (g.total_iterations() - k).saturating_sub(r.rescored)
                } else {
                    0
                };
                left + rescore_left
            }
            _ => {
                let ar = self
                    .plan
                    .ar
                    .as_ref()
                    .and_then(|m| m.ar())
                    .map_or(0, |a| a.pattern.steps_for(self.plan.ar_frames));
                ar + magnet
            }
        })
    }
}

/// Looks up an autoregressive model sharing `m`'s codec for `field`; every failure is an
/// invalid argument naming `field`.
fn ar_partner(
    reg: &crate::Registry,
    m: &MusicModel,
    name: &str,
    field: &str,
) -> Result<Arc<MusicModel>, EngineError> {
    let other = reg
        .music(name)
        .map_err(|e| EngineError::invalid(field, e.to_string()))?;
    if other.ar().is_none() {
        return Err(EngineError::invalid(
            field,
            format!("'{name}' is not an autoregressive music model"),
        ));
    }
    m.same_codec(&other)
        .map_err(|e| EngineError::invalid(field, e))?;
    Ok(other)
}

/// Sampling of an autoregressive stage: temperature 0 = 1, top-k 0 = 250 (MusicGen's
/// defaults), capped by the vocabulary.
fn ar_sampling(s: &SamplingParams, card: usize) -> Result<SamplingParams, EngineError> {
    let mut s = s.clone();
    if s.temperature == 0.0 {
        s.temperature = 1.0;
    }
    if s.top_k == 0 {
        s.top_k = 250.min(card);
    }
    s.validate()
        .map_err(|(f, r)| EngineError::invalid(format!("sampling.{f}"), r))?;
    if s.top_k > card {
        return Err(EngineError::invalid(
            "sampling.top_k",
            format!("{} exceeds the vocabulary ({card})", s.top_k),
        ));
    }
    Ok(s)
}

/// Validates a request's schedule against its model and the loaded models, filling every
/// default (request → the model's `[models.schedule]` → built-in). Every bad value is
/// [`EngineError::InvalidArgument`] naming its request field.
pub(crate) fn resolve_plan(
    reg: &crate::Registry,
    m: &Arc<MusicModel>,
    req: &mut MusicRequest,
    server_max_s: f64,
    continuation_frames: usize,
) -> Result<Plan, EngineError> {
    let fr = m.frame_rate();
    let d = m.schedule.clone();
    let sreq = req.schedule.clone();
    let is_magnet = m.magnet().is_some();
    let kind = match sreq.kind {
        Some(k) => k,
        None => match d.kind.as_deref() {
            Some(k) => ScheduleKind::parse(k).ok_or_else(|| {
                EngineError::Internal(format!("model schedule kind '{k}' (checked at load)"))
            })?,
            None if is_magnet => ScheduleKind::Magnet,
            None => ScheduleKind::Ar,
        },
    };
    match (kind, is_magnet) {
        (ScheduleKind::Ar, true) => {
            return Err(EngineError::invalid(
                "schedule.kind",
                format!(
                    "'{}' is a MAGNeT model: it runs the magnet and hybrid schedules",
                    m.info.name
                ),
            ));
        }
        (ScheduleKind::Magnet | ScheduleKind::Hybrid, false) => {
            return Err(EngineError::invalid(
                "schedule.kind",
                format!(
                    "'{}' is an autoregressive model: it runs the ar schedule only \
                     ({} needs a MAGNeT model)",
                    m.info.name,
                    kind.as_str()
                ),
            ));
        }
        _ => {}
    }
    if kind == ScheduleKind::Ar {
        let magnet_only = [
            ("schedule.decoding_steps", sreq.decoding_steps.is_some()),
            (
                "schedule.rescore",
                sreq.rescore.as_ref().is_some_and(|r| r.enabled),
            ),
            ("schedule.span_arrangement", sreq.span_arrangement.is_some()),
            ("schedule.max_cfg", sreq.max_cfg.is_some()),
            ("schedule.min_cfg", sreq.min_cfg.is_some()),
        ];
        if let Some((f, _)) = magnet_only.iter().find(|(_, set)| *set) {
            return Err(EngineError::invalid(
                *f,
                "only for the magnet and hybrid schedules",
            ));
        }
    }
    if kind != ScheduleKind::Hybrid {
        if sreq.prefix_s.is_some() {
            return Err(EngineError::invalid(
                "schedule.prefix_s",
                "only for the hybrid schedule",
            ));
        }
        if sreq.prefix_model.is_some() {
            return Err(EngineError::invalid(
                "schedule.prefix_model",
                "only for the hybrid schedule",
            ));
        }
    }

    // Duration: the server's limit and the model's own.
    let model_max_s = match (m.ar(), m.magnet()) {
        // `generation_config.json` `max_length`: BOS + frames + delays.
        (Some(ar), _) => {
            (ar.defaults
                .max_length
                .saturating_sub(1 + ar.pattern.max_delay())) as f64
                / fr
        }
        // MAGNeT's restricted-attention masks are built for `segment_duration`.
        (_, Some(mg)) if mg.lm.config.subcodes_context.is_some() => {
            mg.lm.config.max_frames.saturating_sub(continuation_frames) as f64 / fr
        }
        _ => f64::INFINITY,
    };
    let max_s = server_max_s.min(model_max_s);
    if !req.duration_s.is_finite() || req.duration_s <= 0.0 || req.duration_s as f64 > max_s {
        return Err(EngineError::invalid(
            "duration_s",
            format!("{} s is outside (0, {max_s}]", req.duration_s),
        ));
    }
    let frames = ((req.duration_s as f64) * fr).round().max(1.0) as usize;

    // The autoregressive stage.
    let ar_model = match kind {
        ScheduleKind::Ar => Some(m.clone()),
        ScheduleKind::Hybrid => {
            let name = sreq.prefix_model.clone().or(d.prefix_model.clone()).ok_or_else(|| {
                EngineError::invalid(
                    "schedule.prefix_model",
                    format!(
                        "'{}' has no default prefix model: name an autoregressive model with the same codec",
                        m.info.name
                    ),
                )
            })?;
            Some(ar_partner(reg, m, &name, "schedule.prefix_model")?)
        }
        ScheduleKind::Magnet => None,
    };
    let mut ar_frames = frames;
    if kind == ScheduleKind::Hybrid {
        let prefix_s = sreq.prefix_s.or(d.prefix_s).unwrap_or(3.0);
        if !prefix_s.is_finite() || prefix_s <= 0.0 || prefix_s >= req.duration_s {
            return Err(EngineError::invalid(
                "schedule.prefix_s",
                format!(
                    "{prefix_s} s must be positive and shorter than duration_s ({} s)",
                    req.duration_s
                ),
            ));
        }
        ar_frames = ((prefix_s as f64) * fr).round().max(1.0) as usize;
        if ar_frames >= frames {
            return Err(EngineError::invalid(
                "schedule.prefix_s",
                format!("{prefix_s} s leaves no frame for MAGNeT"),
            ));
        }
    }
    let (ar_sampling_p, ar_guidance) = match ar_model.as_ref().and_then(|a| a.ar()) {
        Some(ar) => {
            let g = req.guidance.unwrap_or(ar.defaults.guidance_scale);
            if !g.is_finite() || !(1.0..=100.0).contains(&g) {
                return Err(EngineError::invalid(
                    "guidance",
                    format!("{g} is outside [1, 100] (0 = model default, 1 = no CFG)"),
                ));
            }
            (ar_sampling(&req.sampling, ar.lm.card())?, g)
        }
        None => (req.sampling.clone(), 1.0),
    };

    // The MAGNeT stage.
    let magnet = match m.magnet() {
        Some(mg) if kind != ScheduleKind::Ar => {
            let k = mg.lm.num_codebooks();
            let steps = sreq
                .decoding_steps
                .clone()
                .or(d.decoding_steps.clone())
                .unwrap_or_else(|| (0..k).map(|q| if q == 0 { 20 } else { 10 }).collect());
            if steps.len() != k {
                return Err(EngineError::invalid(
                    "schedule.decoding_steps",
                    format!(
                        "{} entries; this model needs one per codebook ({k})",
                        steps.len()
                    ),
                ));
            }
            if steps.iter().any(|&s| s == 0 || s > 1000) {
                return Err(EngineError::invalid(
                    "schedule.decoding_steps",
                    format!("{steps:?}: every entry must be in [1, 1000]"),
                ));
            }
            let span = match sreq
                .span_arrangement
                .clone()
                .or(d.span_arrangement.clone())
                .as_deref()
            {
                None | Some("nonoverlap") => cadenza_magnet::SpanArrangement::NonOverlap,
                Some("stride1") => cadenza_magnet::SpanArrangement::Stride1,
                Some(other) => {
                    return Err(EngineError::invalid(
                        "schedule.span_arrangement",
                        format!("'{other}' is not one of nonoverlap, stride1"),
                    ));
                }
            };
            let max_cfg = sreq.max_cfg.or(req.guidance).or(d.max_cfg).unwrap_or(10.0);
            let min_cfg = sreq.min_cfg.or(d.min_cfg).unwrap_or(1.0);
            if !min_cfg.is_finite() || min_cfg < 1.0 {
                return Err(EngineError::invalid(
                    "schedule.min_cfg",
                    format!("{min_cfg} must be at least 1"),
                ));
            }
            if !max_cfg.is_finite() || max_cfg < min_cfg || max_cfg > 100.0 {
                return Err(EngineError::invalid(
                    "schedule.max_cfg",
                    format!("{max_cfg} must be in [min_cfg ({min_cfg}), 100]"),
                ));
            }
            let card = mg.lm.card();
            let s = &req.sampling;
            let temperature = if s.temperature == 0.0 {
                d.temperature.unwrap_or(3.0)
            } else {
                s.temperature
            };
            let top_p = if s.top_p == 0.0 && s.top_k == 0 {
                d.top_p.unwrap_or(0.9)
            } else {
                s.top_p
            };
            let check = SamplingParams {
                temperature,
                top_k: s.top_k,
                top_p,
                greedy: s.greedy,
            };
            check
                .validate()
                .map_err(|(f, r)| EngineError::invalid(format!("sampling.{f}"), r))?;
            if s.top_k > card {
                return Err(EngineError::invalid(
                    "sampling.top_k",
                    format!("{} exceeds the vocabulary ({card})", s.top_k),
                ));
            }
            let enabled = match &sreq.rescore {
                Some(r) => r.enabled,
                None => d.rescore.unwrap_or(false),
            };
            let rescorer = if enabled {
                let r = sreq.rescore.clone().unwrap_or_default();
                let name = r.model.or(d.rescore_with.clone()).ok_or_else(|| {
                    EngineError::invalid(
                        "schedule.rescore.model",
                        format!(
                            "'{}' has no default rescorer: name an autoregressive model with the same codec",
                            m.info.name
                        ),
                    )
                })?;
                let model = ar_partner(reg, m, &name, "schedule.rescore.model")?;
                // Paper §3.3: a weighted mix of the two models' probabilities; the weight is
                // not read from the paper here (its text was not available): 0.3 for the
                // rescorer (0.7 for MAGNeT) is the recalled default, a parameter either way.
                let w = r.weight.or(d.rescore_weight).unwrap_or(0.3);
                if !w.is_finite() || w <= 0.0 || w > 1.0 {
                    return Err(EngineError::invalid(
                        "schedule.rescore.weight",
                        format!("{w} is outside (0, 1]"),
                    ));
                }
                Some((model, 1.0 - w))
            } else {
                None
            };
            Some(MagnetPlan {
                params: DecodeParams {
                    frames,
                    decoding_steps: steps,
                    temperature,
                    anneal_temp: true,
                    top_k: s.top_k,
                    top_p,
                    greedy: s.greedy,
                    max_cfg_coef: max_cfg,
                    min_cfg_coef: min_cfg,
                    cfg: max_cfg > 1.0 || min_cfg > 1.0,
                    span_arrangement: span,
                    span_scoring: cadenza_magnet::SpanScoring::Max,
                    seed: 0,
                    prompt: None,
                },
                rescorer,
            })
        }
        _ => None,
    };
    Ok(Plan {
        kind,
        ar: ar_model,
        ar_frames,
        ar_guidance,
        ar_sampling: ar_sampling_p,
        magnet,
        frames,
    })
}
