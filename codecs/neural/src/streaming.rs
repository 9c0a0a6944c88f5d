//! Streaming EnCodec: codes in, audio out (and audio in, codes out) chunk by chunk, equal to the
//! whole-sequence result.
//!
//! A SEANet stack is `pre` convs → LSTM → `post` convs. The convs have a small, finite receptive
//! field; the LSTM has an unbounded one but is causal. So the streamer keeps the LSTM state
//! across calls and recomputes each conv stack on a window that extends `margin` frames past
//! the part it emits, on both sides: window edges that are not real signal edges only disturb
//! outputs inside the margin, which are dropped. At the real start and end the window edge *is*
//! the signal edge, so the reference's padding applies exactly. A causal stack needs no right
//! margin, so causal models stream with no look-ahead.
//!
//! Chunked (normalising, 48 kHz) models are not streamed frame by frame: their codes come per
//! 1 s chunk with a scale, and [`Encodec::decode`] handles them.

use candle_core::{D, DType, Device, Result, Tensor, bail};

use crate::encodec::{Encodec, Layer, LstmState, Seanet, run};

/// Margin (in frames of the stack's input) recomputed left of each window. It must exceed the
/// left receptive field of every conv stack: 7-tap convs reach 3–6 frames, the up/down-sampling
/// blocks about 2 frames; 8 leaves room and is checked by the step-equals-forward tests.
const LEFT_MARGIN: usize = 8;
/// Right margin for non-causal models (their convs look at most ~3 frames ahead).
const RIGHT_MARGIN: usize = 4;

/// How many input frames can be finalised. Even causal convs pad their left edge by *reflecting*
/// the first samples (which lie in the future), so the very first window waits for
/// `LEFT_MARGIN` frames: after that, the start is exact and only `right` frames of look-ahead
/// are needed.
fn ready_frames(received: usize, done: usize, right: usize, last: bool) -> usize {
    if last {
        received
    } else if done == 0 && received < LEFT_MARGIN {
        0
    } else {
        received.saturating_sub(right)
    }
}

/// One conv stack fed incrementally: holds not-yet-final input and emits final output.
#[derive(Debug)]
struct WindowedStack {
    /// Unit conversion: one input frame → `scale` output samples of this stack.
    scale: usize,
    /// Input frames kept (from `buf_start`), shape (B, C, n).
    buf: Option<Tensor>,
    buf_start: usize,
    /// Total input frames received.
    received: usize,
    /// Input frames whose output has been emitted.
    done: usize,
    left: usize,
    right: usize,
}

impl WindowedStack {
    fn new(scale: usize, left: usize, right: usize) -> Self {
        Self {
            scale,
            buf: None,
            buf_start: 0,
            received: 0,
            done: 0,
            left,
            right,
        }
    }

    fn push(&mut self, xs: &Tensor) -> Result<()> {
        let n = xs.dim(D::Minus1)?;
        if n == 0 {
            return Ok(());
        }
        self.buf = Some(match self.buf.take() {
            None => xs.clone(),
            Some(b) => Tensor::cat(&[&b, xs], D::Minus1)?,
        });
        self.received += n;
        Ok(())
    }

    /// Runs `layers` on the window needed to finalise as much output as possible.
    /// Returns the output for input frames `[done, ready)`, or `None` if nothing is ready.
    fn step(&mut self, layers: &[Layer], last: bool) -> Result<Option<Tensor>> {
        let ready = ready_frames(self.received, self.done, self.right, last);
        if ready <= self.done {
            return Ok(None);
        }
        let Some(buf) = &self.buf else {
            return Ok(None);
        };
        let win_start = self.done.saturating_sub(self.left).max(self.buf_start);
        let win_end = if last {
            self.received
        } else {
            (ready + self.right).min(self.received)
        };
        let window = buf.narrow(D::Minus1, win_start - self.buf_start, win_end - win_start)?;
        let ys = run(layers, &window)?;
        let from = (self.done - win_start) * self.scale;
        let len = (ready - self.done) * self.scale;
        let avail = ys.dim(D::Minus1)?;
        if from + len > avail {
            bail!(
                "streaming window produced {avail} samples, needed {}",
                from + len
            )
        }
        let out = ys.narrow(D::Minus1, from, len)?;
        self.done = ready;
        // Drop input that no later window will need.
        let keep_from = self.done.saturating_sub(self.left);
        if keep_from > self.buf_start {
            let drop = keep_from - self.buf_start;
            let b = buf.dim(D::Minus1)?;
            self.buf = Some(buf.narrow(D::Minus1, drop, b - drop)?.contiguous()?);
            self.buf_start = keep_from;
        }
        Ok(Some(out))
    }
}

/// Streams one SEANet: `pre` windowed → LSTM with carried state → `post` windowed.
#[derive(Debug)]
struct SeanetStream {
    pre: WindowedStack,
    lstm_state: LstmState,
    post: WindowedStack,
}

impl SeanetStream {
    /// `post_scale`: output samples per input frame of the `post` stack.
    fn new(net: &Seanet, post_scale: usize, causal: bool, dev: &Device) -> Result<Self> {
        let right = if causal { 0 } else { RIGHT_MARGIN };
        Ok(Self {
            pre: WindowedStack::new(1, LEFT_MARGIN, right),
            lstm_state: net.lstm.zero_state(1, dev)?,
            post: WindowedStack::new(post_scale, LEFT_MARGIN, right),
        })
    }

    /// Feeds the LSTM with whatever `pre` output is new, then finalises what `post` can.
    fn advance(&mut self, net: &Seanet, mid: Option<Tensor>, last: bool) -> Result<Option<Tensor>> {
        if let Some(mid) = mid {
            let mid = net.lstm.forward_with_state(&mid, &mut self.lstm_state)?;
            self.post.push(&mid)?;
        }
        self.post.step(&net.post, last)
    }
}

/// Decodes codes to audio incrementally. Feeding all codes in any chunking and then calling
/// [`StreamDecoder::finish`] gives the same samples as [`Encodec::decode`] (within float noise).
#[derive(Debug)]
pub struct StreamDecoder {
    stream: SeanetStream,
    samples_out: usize,
    finished: bool,
}

impl StreamDecoder {
    /// A decoder for one stream (batch 1). Fails for chunked (normalising) models.
    pub fn new(model: &Encodec) -> Result<Self> {
        let cfg = model.config();
        if cfg.chunk_length().is_some() {
            bail!(
                "streaming decode is not available for chunked (normalising) EnCodec models; \
                 decode whole chunks"
            )
        }
        let stream = SeanetStream::new(
            &model.decoder,
            cfg.hop_length(),
            cfg.use_causal_conv,
            model.device(),
        )?;
        Ok(Self {
            stream,
            samples_out: 0,
            finished: false,
        })
    }

    /// Feeds `(n_q, frames)` codes; returns `(channels, samples)` audio that is now final
    /// (possibly zero samples).
    pub fn push(&mut self, model: &Encodec, codes: &Tensor) -> Result<Tensor> {
        self.feed(model, Some(codes), false)
    }

    /// Ends the stream and returns the remaining audio.
    pub fn finish(&mut self, model: &Encodec) -> Result<Tensor> {
        self.feed(model, None, true)
    }

    /// Samples emitted so far.
    pub fn samples_out(&self) -> usize {
        self.samples_out
    }

    fn feed(&mut self, model: &Encodec, codes: Option<&Tensor>, last: bool) -> Result<Tensor> {
        if self.finished {
            bail!("stream decoder already finished")
        }
        if let Some(c) = codes {
            let emb = model
                .quantizer
                .decode(&c.to_dtype(DType::U32)?.unsqueeze(0)?)?;
            self.stream.pre.push(&emb)?;
        }
        let mid = self.stream.pre.step(&model.decoder.pre, last)?;
        let out = self.stream.advance(&model.decoder, mid, last)?;
        self.finished = last;
        match out {
            Some(o) => {
                let o = o.squeeze(0)?;
                self.samples_out += o.dim(1)?;
                Ok(o)
            }
            None => Tensor::zeros(
                (model.config().audio_channels, 0),
                DType::F32,
                model.device(),
            ),
        }
    }
}

/// Encodes audio to codes incrementally (non-chunked models). Feeding all audio in any chunking
/// and calling [`StreamEncoder::finish`] gives the codes of [`Encodec::encode`].
#[derive(Debug)]
pub struct StreamEncoder {
    stream: SeanetStream,
    n_q: usize,
    finished: bool,
}

impl StreamEncoder {
    /// An encoder for one stream at `bandwidth` (must be one of the model's).
    pub fn new(model: &Encodec, bandwidth: Option<f32>) -> Result<Self> {
        let cfg = model.config();
        if cfg.chunk_length().is_some() || cfg.normalize {
            bail!("streaming encode is not available for chunked (normalising) EnCodec models")
        }
        let n_q = model.check_bandwidth(Some(bandwidth.unwrap_or(cfg.target_bandwidths[0])))?;
        // `pre` consumes samples and emits frames; it is driven by `pre_step_frames`, which
        // counts its buffer in samples and its progress in frames.
        let stream = SeanetStream::new(&model.encoder, 1, cfg.use_causal_conv, model.device())?;
        Ok(Self {
            stream,
            n_q,
            finished: false,
        })
    }

    /// Feeds `(channels, samples)` audio; returns `(n_q, frames)` u32 codes now final.
    pub fn push(&mut self, model: &Encodec, audio: &Tensor) -> Result<Tensor> {
        self.feed(model, Some(audio), false)
    }

    /// Ends the stream and returns the remaining codes.
    pub fn finish(&mut self, model: &Encodec) -> Result<Tensor> {
        self.feed(model, None, true)
    }

    fn feed(&mut self, model: &Encodec, audio: Option<&Tensor>, last: bool) -> Result<Tensor> {
        if self.finished {
            bail!("stream encoder already finished")
        }
        let hop = model.config().hop_length();
        if let Some(a) = audio {
            self.stream.pre.push(&a.unsqueeze(0)?)?;
        }
        // The pre stack maps `hop` samples to one frame: emit only whole frames until the end.
        let pre = &mut self.stream.pre;
        let received_frames = if last {
            pre.received.div_ceil(hop)
        } else {
            pre.received / hop
        };
        let mid = pre_step_frames(pre, &model.encoder.pre, hop, received_frames, last)?;
        let emb = self.stream.advance(&model.encoder, mid, last)?;
        self.finished = last;
        match emb {
            Some(e) => model.quantizer.encode(&e, self.n_q)?.squeeze(0),
            None => Tensor::zeros((self.n_q, 0), DType::U32, model.device()),
        }
    }
}

/// Window step for the encoder's downsampling stack, whose input is samples and output frames.
/// `WindowedStack` counts in input units; here the unit is a frame of `hop` samples, so the
/// window bounds are multiples of `hop` (which keeps every strided conv aligned with the
/// whole-signal computation) except at the real end.
fn pre_step_frames(
    st: &mut WindowedStack,
    layers: &[Layer],
    hop: usize,
    received_frames: usize,
    last: bool,
) -> Result<Option<Tensor>> {
    let ready = ready_frames(received_frames, st.done, st.right, last);
    if ready <= st.done {
        return Ok(None);
    }
    let Some(buf) = &st.buf else { return Ok(None) };
    let left = LEFT_MARGIN;
    let win_start_f = st.done.saturating_sub(left).max(st.buf_start / hop);
    let win_start = win_start_f * hop;
    let win_end = if last {
        st.received
    } else {
        ((ready + st.right) * hop).min(st.received)
    };
    let window = buf.narrow(D::Minus1, win_start - st.buf_start, win_end - win_start)?;
    let ys = run(layers, &window)?;
    let from = st.done - win_start_f;
    let len = ready - st.done;
    let avail = ys.dim(D::Minus1)?;
    if from + len > avail {
        bail!(
            "streaming encoder window produced {avail} frames, needed {}",
            from + len
        )
    }
    let out = ys.narrow(D::Minus1, from, len)?;
    st.done = ready;
    let keep_from = st.done.saturating_sub(left) * hop;
    if keep_from > st.buf_start {
        let drop = keep_from - st.buf_start;
        let b = buf.dim(D::Minus1)?;
        st.buf = Some(buf.narrow(D::Minus1, drop, b - drop)?.contiguous()?);
        st.buf_start = keep_from;
    }
    Ok(Some(out))
}
