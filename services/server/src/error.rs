//! The one place engine errors become gRPC statuses.

use cadenza_engine::EngineError;
use tonic::{Code, Status};

/// Maps an engine error to a status whose message names the problem. `RESOURCE_EXHAUSTED`
/// for overload carries a `retry-after` (seconds) metadata entry.
pub fn status(err: EngineError) -> Status {
    let code = match &err {
        EngineError::InvalidArgument { .. } | EngineError::Audio { .. } => Code::InvalidArgument,
        EngineError::UnknownModel { .. } => Code::NotFound,
        EngineError::TooLarge { .. } | EngineError::Overloaded { .. } => Code::ResourceExhausted,
        EngineError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        EngineError::Cancelled(_) => Code::Cancelled,
        EngineError::Unavailable(_) => Code::Unavailable,
        EngineError::Internal(_) => Code::Internal,
    };
    let mut st = Status::new(code, err.to_string());
    if let EngineError::Overloaded {
        retry_after,
        queued,
        ..
    } = &err
    {
        if let Ok(v) = retry_after.as_secs().max(1).to_string().parse() {
            st.metadata_mut().insert("retry-after", v);
        }
        if let Ok(v) = queued.to_string().parse() {
            st.metadata_mut().insert("x-queue-length", v);
        }
    }
    st
}

/// Shorthand for an `INVALID_ARGUMENT` naming a request field.
pub fn invalid(field: &str, reason: impl Into<String>) -> Status {
    status(EngineError::invalid(field, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn overload_carries_retry_after() {
        let st = status(EngineError::Overloaded {
            queued: 3,
            limit: 3,
            retry_after: Duration::from_secs(2),
        });
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert_eq!(st.metadata().get("retry-after").unwrap(), "2");
        assert!(
            st.message().contains("3 requests queued"),
            "{}",
            st.message()
        );
    }

    #[test]
    fn field_is_named() {
        let st = status(EngineError::invalid(
            "bandwidth_kbps",
            "7 kbps is not supported",
        ));
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(
            st.message(),
            "invalid bandwidth_kbps: 7 kbps is not supported"
        );
    }
}
