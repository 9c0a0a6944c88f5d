//! Text-to-music sessions (MusicGen): one LM step per worker step; audio is decoded and sent as
//! soon as frames leave the delay pattern, in chunks of `chunk_frames`.

use std::sync::Arc;

use cadenza_audio::Limits;
use cadenza_codecs::StreamDecoder;
use cadenza_musicgen::{GenerateParams, Generation};
use cadenza_nn::sampling::SamplingParams;
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

/// A text-to-music request, validated by [`crate::Engine::generate_music`].
#[derive(Debug, Clone)]
pub struct MusicRequest {
    /// Registry name ("" = the default music model).
    pub model: String,
    /// The text description.
    pub prompt: String,
    /// Seconds of new audio.
    pub duration_s: f32,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// CFG coefficient; `None` = the model's default; 1 = off.
    pub guidance: Option<f32>,
    /// Seed; `None` = random (reported in the final event).
    pub seed: Option<u64>,
    /// Music to continue.
    pub continuation: Option<Continuation>,
    /// Frames per audio chunk; `None` = about 320 ms.
    pub chunk_frames: Option<usize>,
    /// Send the generated codes at the end.
    pub return_tokens: bool,
}

/// What a music session sends back.
#[derive(Debug, Clone, PartialEq)]
pub enum MusicEvent {
    /// LM steps done of the total.
    Progress {
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
        /// Tokens sampled (frames × codebooks).
        tokens: u64,
        /// Seconds of new audio.
        audio_seconds: f32,
    },
}

/// A session between LM steps.
struct Running {
    generation: Box<Generation>,
    decoder: StreamDecoder,
    /// Completed frames not yet decoded.
    pending: Vec<Vec<u32>>,
    /// Samples of the continuation prompt still to drop from the decoded audio.
    skip_samples: u64,
}

enum State {
    Start(Option<Continuation>),
    Running(Box<Running>),
    Finished,
}

/// One MusicGen generation session.
pub(crate) struct MusicTask {
    base: Base<MusicEvent>,
    model: Arc<MusicModel>,
    prompt: String,
    frames: usize,
    sampling: SamplingParams,
    guidance: f32,
    seed: u64,
    chunk_frames: usize,
    return_tokens: bool,
    limits: Limits,
    state: State,
    emitted: u64,
}

impl MusicTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model: Arc<MusicModel>,
        req: MusicRequest,
        frames: usize,
        guidance: f32,
        seed: u64,
        limits: Limits,
        out: Output<MusicEvent>,
        meta: Meta,
    ) -> Self {
        let fr = model.model.frame_rate();
        Self {
            base: Base::new(format!("music:{}", model.info.name), out, meta),
            prompt: req.prompt,
            frames,
            sampling: req.sampling,
            guidance,
            seed,
            chunk_frames: req
                .chunk_frames
                .unwrap_or(((fr * 0.32).round() as usize).max(1)),
            return_tokens: req.return_tokens,
            limits,
            state: State::Start(req.continuation),
            emitted: 0,
            model,
        }
    }

    fn start(&mut self, continuation: Option<Continuation>) -> Result<State, EngineError> {
        let m = &self.model.model;
        let k = m.lm.num_codebooks();
        let prompt_codes = match continuation {
            None => None,
            Some(Continuation::Codes(c)) => {
                c.validate("continuation_codes", k, m.lm.card())?;
                if c.num_codebooks != k {
                    return Err(EngineError::invalid(
                        "continuation_codes",
                        format!("this model needs {k} codebooks, got {}", c.num_codebooks),
                    ));
                }
                Some(c)
            }
            Some(Continuation::Audio(a)) => {
                let cfg = m.codec.config();
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
                let enc = m.codec.encode(&x, None)?;
                let codes = enc.codes.squeeze(0)?.squeeze(0)?.narrow(0, 0, k)?;
                Some(Codes::from_tensor(&codes)?)
            }
        };
        let prompt = prompt_codes.map(|c| {
            (0..c.num_codebooks)
                .map(|q| c.codes[q * c.frames..(q + 1) * c.frames].to_vec())
                .collect::<Vec<_>>()
        });
        let prompt_frames = prompt.as_ref().map_or(0, |p: &Vec<Vec<u32>>| p[0].len());
        let (ids, mask) = m.tokenize(&[self.prompt.as_str()])?;
        let cond = m.condition(&ids, &mask)?;
        let params = GenerateParams {
            frames: self.frames,
            sampling: self.sampling.clone(),
            guidance: self.guidance,
            seed: self.seed,
            prompt,
        };
        let generation =
            Generation::new(m, &cond, &mask.to_dtype(candle_core::DType::F32)?, params)?;
        let skip_samples = (prompt_frames * m.codec.config().hop_length()) as u64;
        Ok(State::Running(Box::new(Running {
            generation: Box::new(generation),
            decoder: StreamDecoder::new(&m.codec)?,
            pending: Vec::new(),
            skip_samples,
        })))
    }

    /// Decodes `frames` (and, at the end, the decoder's tail) and sends the new audio.
    fn emit_audio(
        &mut self,
        frames: Vec<Vec<u32>>,
        run: &mut Running,
        last: bool,
    ) -> Result<(), EngineError> {
        let m = &self.model.model;
        let k = m.lm.num_codebooks();
        let mut audio = if frames.is_empty() {
            Tensor::zeros((1, 0), candle_core::DType::F32, &Device::Cpu)?
        } else {
            let n = frames.len();
            let flat: Vec<u32> = (0..k)
                .flat_map(|q| frames.iter().map(move |f| f[q]))
                .collect();
            run.decoder
                .push(&m.codec, &Tensor::from_vec(flat, (k, n), &Device::Cpu)?)?
        };
        if last {
            audio = Tensor::cat(&[&audio, &run.decoder.finish(&m.codec)?], 1)?;
        }
        let n = audio.dim(1)? as u64;
        let drop = run.skip_samples.min(n);
        run.skip_samples -= drop;
        let audio = audio.narrow(1, drop as usize, (n - drop) as usize)?;
        if audio.dim(1)? > 0 {
            let rate = m.codec.config().sampling_rate;
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

    /// After an LM step of this session: sends the audio of completed frames every
    /// `chunk_frames`, progress, and at the end the tokens and the final event.
    fn after_step(
        &mut self,
        mut run: Box<Running>,
        completed: Option<Vec<u32>>,
    ) -> Result<bool, EngineError> {
        let model = self.model.clone();
        let m = &model.model;
        run.pending.extend(completed);
        let done = run.generation.is_done(m);
        if done || run.pending.len() >= self.chunk_frames {
            let frames = std::mem::take(&mut run.pending);
            let k = m.lm.num_codebooks() as u64;
            let meta = &self.base.meta;
            meta.metrics.tokens(&meta.model, frames.len() as u64 * k);
            self.emit_audio(frames, &mut run, done)?;
            let total = run.generation.total_steps(m) as u32;
            self.base.out.push(MusicEvent::Progress {
                step: run.generation.steps_done() as u32,
                total,
            });
        }
        if !done {
            self.state = State::Running(run);
            return Ok(false);
        }
        let k = m.lm.num_codebooks();
        let p = run.generation.prompt_frames();
        let new: Vec<u32> = run
            .generation
            .frames()
            .iter()
            .flat_map(|row| row[p..].iter().copied())
            .collect();
        let frames = new.len() / k;
        if self.return_tokens {
            self.base.out.push(MusicEvent::Tokens(Codes {
                num_codebooks: k,
                frames,
                codes: new,
            }));
        }
        self.base.out.push(MusicEvent::Done {
            seed: self.seed,
            tokens: (frames * k) as u64,
            audio_seconds: self.emitted as f32 / m.codec.config().sampling_rate as f32,
        });
        Ok(true)
    }

    fn work(&mut self) -> Result<bool, EngineError> {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Start(c) => {
                self.state = self.start(c)?;
                Ok(false)
            }
            State::Running(mut run) => {
                let out = run.generation.step(&self.model.model)?;
                self.after_step(run, out.completed)
            }
            // Only reachable after a panic interrupted a step of this session.
            State::Finished => Err(EngineError::Internal(
                "the session was interrupted by an internal error".into(),
            )),
        }
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

    /// LM steps of running sessions of the same model batch together; the first step (text
    /// encoding, prompt encoding) runs alone.
    fn batch_key(&self) -> Option<BatchKey> {
        match self.state {
            State::Running(_) => Some(BatchKey {
                kind: "music",
                model: self.model.info.name.clone(),
                phase: "ar_step",
            }),
            _ => None,
        }
    }

    fn run_batch(items: &mut [&mut Self]) -> Vec<Result<Option<bool>, EngineError>> {
        let same_model = items.iter().all(|t| Arc::ptr_eq(&t.model, &items[0].model));
        let all_running = items.iter().all(|t| matches!(t.state, State::Running(_)));
        if items.len() < 2 || !same_model || !all_running {
            return items.iter_mut().map(|t| t.run()).collect();
        }
        let model = items[0].model.clone();
        // The generations step in place, so a panic leaves every session in a state that
        // `rollback` can restore.
        let outs = {
            let mut gens: Vec<&mut Generation> = items
                .iter_mut()
                .filter_map(|t| match &mut t.state {
                    State::Running(r) => Some(&mut *r.generation),
                    _ => None,
                })
                .collect();
            Generation::step_batch(&model.model, &mut gens)
        };
        match outs {
            Ok(outs) => items
                .iter_mut()
                .zip(outs)
                .map(
                    |(t, o)| match std::mem::replace(&mut t.state, State::Finished) {
                        State::Running(run) => t.after_step(run, o.completed).map(Some),
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

    fn rollback(&mut self) {
        if let State::Running(r) = &mut self.state {
            r.generation.rollback();
        }
    }

    fn rows(&self) -> usize {
        if self.guidance > 1.0 { 2 } else { 1 }
    }

    fn remaining_steps(&self) -> Option<usize> {
        let m = &self.model.model;
        Some(match &self.state {
            State::Running(r) => r.generation.total_steps(m) - r.generation.steps_done(),
            _ => m.pattern.steps_for(self.frames),
        })
    }
}
