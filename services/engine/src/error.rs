//! The engine's error type. The server maps it to gRPC statuses in exactly one place.

use std::time::Duration;

/// Everything a request to the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request field is out of range or malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field, e.g. `bandwidth_kbps`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Input audio could not be used.
    #[error("bad audio in {field}: {source}")]
    Audio {
        /// The request field carrying the audio.
        field: String,
        /// The decoder's error.
        #[source]
        source: cadenza_audio::AudioError,
    },
    /// No model of this name (and kind) is loaded.
    #[error("unknown model '{name}'{}", if .available.is_empty() { String::new() } else { format!(" (available: {})", .available.join(", ")) })]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// Names of loaded models of the requested kind.
        available: Vec<String>,
    },
    /// A size limit was exceeded (request too large).
    #[error("{what} exceeds the limit: {detail}")]
    TooLarge {
        /// What was too large.
        what: String,
        /// The sizes involved.
        detail: String,
    },
    /// The queue is full: retry later.
    #[error("server overloaded: {queued} requests queued (limit {limit}); retry in {}s", .retry_after.as_secs())]
    Overloaded {
        /// Requests waiting when this one was refused.
        queued: usize,
        /// The queue limit.
        limit: usize,
        /// A hint for when to retry.
        retry_after: Duration,
    },
    /// The request's deadline passed (or cannot be met).
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The client went away or cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The engine is shutting down.
    #[error("shutting down: {0}")]
    Unavailable(String),
    /// A bug or a model failure; the session is dropped, the worker keeps going.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Shorthand for [`EngineError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Wraps an audio error, keeping limit errors distinct.
    pub fn audio(field: impl Into<String>, source: cadenza_audio::AudioError) -> Self {
        let field = field.into();
        if source.is_limit() {
            Self::TooLarge {
                what: field,
                detail: source.to_string(),
            }
        } else {
            Self::Audio { field, source }
        }
    }

    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::Audio { .. } => "bad_audio",
            Self::UnknownModel { .. } => "unknown_model",
            Self::TooLarge { .. } => "too_large",
            Self::Overloaded { .. } => "overloaded",
            Self::DeadlineExceeded(_) => "deadline",
            Self::Cancelled(_) => "cancelled",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        Self::Internal(e.to_string())
    }
}
