//! The error type shared by every fallible function of this crate.

/// Everything that can go wrong while reading, converting or writing audio.
///
/// Every variant's message names the problem, so it can be passed to a client as is.
/// [`AudioError::is_limit`] separates "the input is too big" (a resource limit) from
/// "the input is bad" (an invalid argument).
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    /// No bytes at all, or a stream that decoded to zero audio frames.
    #[error("audio input is empty: no bytes or no audio frames")]
    Empty,

    /// The data ends before a complete header or any complete audio packet could be read.
    /// Carries the decoder's message.
    #[error("audio data is truncated or could not be decoded: {0}")]
    Truncated(String),

    /// The container or codec data is invalid. Carries the decoder's message.
    #[error("malformed audio data: {0}")]
    Malformed(String),

    /// The container or codec is not recognised or not supported.
    #[error("unsupported audio format: {0}")]
    UnsupportedFormat(String),

    /// A sample is NaN or infinite. `index` is the position of the offending sample in the
    /// interleaved sample sequence that was being checked.
    #[error("audio sample {index} is not a finite number (NaN or infinity)")]
    NonFinite {
        /// Index of the first non-finite sample (interleaved).
        index: usize,
    },

    /// The channel count is zero or above the allowed maximum.
    #[error("unsupported channel count {channels}: must be between 1 and {max}")]
    BadChannels {
        /// The channel count that was found or requested.
        channels: usize,
        /// The largest allowed channel count.
        max: usize,
    },

    /// The sample rate is outside the allowed range.
    #[error("unsupported sample rate {rate} Hz: must be between {min} and {max} Hz")]
    BadSampleRate {
        /// The sample rate that was found or requested.
        rate: u32,
        /// Smallest allowed rate.
        min: u32,
        /// Largest allowed rate.
        max: u32,
    },

    /// The audio is longer than the allowed duration. Decoding stops as soon as the limit is
    /// passed, so `seconds` is how much had been decoded at that point, not the full length.
    #[error("audio is too long: more than {seconds:.2} s, the limit is {max_seconds} s")]
    TooLong {
        /// Duration decoded (or declared) when the limit was hit.
        seconds: f64,
        /// The limit.
        max_seconds: f64,
    },

    /// The encoded input is bigger than the allowed number of bytes.
    #[error("audio input is too large: {bytes} bytes, the limit is {max_bytes} bytes")]
    TooLarge {
        /// Size of the input (saturated to `usize::MAX`).
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },

    /// The requested channel conversion is not supported (only N→1 and 1→2 are).
    #[error(
        "cannot convert {from} channel(s) to {to} channel(s): only downmix to mono and mono to stereo are supported"
    )]
    UnsupportedChannels {
        /// Channels of the input.
        from: u16,
        /// Requested channels.
        to: u16,
    },

    /// Raw PCM bytes whose length is not a whole number of frames.
    #[error(
        "raw audio length {bytes} bytes is not a multiple of the frame size {frame_bytes} bytes"
    )]
    BadRawLength {
        /// Length of the input in bytes.
        bytes: usize,
        /// Size of one frame (all channels) in bytes.
        frame_bytes: usize,
    },

    /// An interleaved sample buffer whose length is not a whole number of frames.
    #[error("{samples} interleaved samples is not a multiple of the channel count {channels}")]
    Misaligned {
        /// Number of samples.
        samples: usize,
        /// Channel count.
        channels: usize,
    },

    /// Planar channels of different lengths.
    #[error("planar channel {channel} has {len} samples but channel 0 has {expected}")]
    RaggedPlanar {
        /// Index of the first channel whose length differs.
        channel: usize,
        /// Its length.
        len: usize,
        /// Length of channel 0.
        expected: usize,
    },

    /// The resampler could not be built or failed.
    #[error("resampling failed: {0}")]
    Resample(String),

    /// Reading or writing a file failed.
    #[error("audio I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The WAV encoder failed.
    #[error("WAV encoding failed: {0}")]
    Wav(String),
}

impl AudioError {
    /// True for errors caused by a resource limit ([`AudioError::TooLong`],
    /// [`AudioError::TooLarge`]); a server maps these to `RESOURCE_EXHAUSTED` and every other
    /// variant to `INVALID_ARGUMENT`.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            AudioError::TooLong { .. } | AudioError::TooLarge { .. }
        )
    }
}
