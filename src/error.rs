//! Errors of the public API, aggregated from each layer.
//!
//! Owns [`DispatchError`] — what `send`, `local_invoke` and `publish` return — and
//! [`StartError`] — what starting the runtime returns. Each answers its caller's questions:
//! which HTTP status it maps to, whether retrying may help, whether it is a conflict.

use crate::config::ConfigError;
use crate::handler::{HandlerFailure, ReceptorError};
use crate::registry::RegistryError;
use crate::store::{ExpectedVersion, StoreError};
use crate::transport::TransportError;
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// No receptor is registered for the command type, and it has no destination topic.
    #[error("no handler registered for message type `{message_type}`")]
    HandlerNotFound { message_type: String },
    /// The receptor refused the command; nothing was written.
    #[error("`{message_type}` rejected: {error}")]
    Rejected {
        message_type: String,
        error: ReceptorError,
    },
    /// The receptor panicked; nothing was written and the runtime keeps serving.
    #[error("receptor for `{message_type}` panicked: {message}")]
    Panicked {
        message_type: String,
        message: String,
    },
    /// A payload could not be encoded or decoded.
    #[error("codec error: {0}")]
    Codec(String),
    /// A message the stores cannot hold (see [`crate::Envelope::check_storable`]), or one bound
    /// for the transport with a payload over its limit (see [`crate::Envelope::check_size`]);
    /// nothing of its unit was written.
    #[error("invalid `{message_type}` message: {reason}")]
    InvalidMessage {
        message_type: String,
        reason: String,
    },
    /// An expected version did not match; nothing of the command was written.
    #[error("version conflict on stream `{stream_id}`: expected {expected:?}, found {actual}")]
    VersionConflict {
        stream_id: String,
        expected: ExpectedVersion,
        actual: u64,
    },
    /// The events were committed, but a perspective failed on `message_id`; the runtime
    /// retries it with backoff (and dead-letters it after the maximum attempts).
    #[error("events committed, but perspective processing of {message_id} failed: {error}")]
    PerspectiveFailed { message_id: Uuid, error: String },
    /// `local_invoke` was asked for a result type the receptor does not return.
    #[error("receptor for `{message_type}` does not return `{expected}`")]
    ResultType {
        message_type: String,
        expected: &'static str,
    },
    #[error("store error: {0}")]
    Store(String, bool),
    /// The runtime is shutting down or an actor is gone.
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
}

impl DispatchError {
    /// The status an HTTP layer would answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            DispatchError::Rejected { error, .. } => error.http_status(),
            DispatchError::InvalidMessage { .. } => 400,
            DispatchError::VersionConflict { .. } => 409,
            DispatchError::Store(_, true) | DispatchError::Unavailable(_) => 503,
            _ => 500,
        }
    }

    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            DispatchError::VersionConflict { .. }
                | DispatchError::Rejected {
                    error: ReceptorError::Conflict(_),
                    ..
                }
        )
    }

    /// Retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DispatchError::VersionConflict { .. }
                | DispatchError::Store(_, true)
                | DispatchError::Unavailable(_)
        )
    }

    pub(crate) fn from_handler(message_type: &str, failure: HandlerFailure) -> DispatchError {
        match failure {
            HandlerFailure::Rejected(error) => DispatchError::Rejected {
                message_type: message_type.into(),
                error,
            },
            HandlerFailure::Panicked(message) => DispatchError::Panicked {
                message_type: message_type.into(),
                message,
            },
            HandlerFailure::Decode(m) => DispatchError::Codec(m),
            // Not produced by receptors; kept total rather than panicking.
            HandlerFailure::Perspective(e) => DispatchError::Rejected {
                message_type: message_type.into(),
                error: ReceptorError::Internal(e.0),
            },
        }
    }
}

impl From<StoreError> for DispatchError {
    fn from(e: StoreError) -> Self {
        let retryable = e.is_retryable();
        DispatchError::Store(e.to_string(), retryable)
    }
}

impl From<actix::MailboxError> for DispatchError {
    fn from(e: actix::MailboxError) -> Self {
        DispatchError::Unavailable(e.to_string())
    }
}

/// Why the runtime did not start. Nothing is left running when start fails.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Unsupported(String),
    #[error("actor system: {0}")]
    Actor(String),
}
