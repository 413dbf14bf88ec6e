//! Errors of the public API, aggregated from each layer.
//!
//! Owns [`DispatchError`] — what `send`, `local_invoke` and `publish` return — and
//! [`StartError`] — what starting the runtime returns. Each answers its caller's questions:
//! which HTTP status it maps to, whether retrying may help, whether it is a conflict.

use crate::config::ConfigError;
use crate::handler::{ReceptorError, ReceptorFailure};
use crate::registry::RegistryError;
use crate::store::{ExpectedVersion, StoreError};
use crate::transport::TransportError;
use std::sync::Arc;
use uuid::Uuid;

/// Why `send`, `local_invoke` or `publish` failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// No receptor is registered for the command type, and it has no destination topic.
    #[error("no handler registered for message type `{message_type}`")]
    HandlerNotFound {
        /// The command's type name (for a replay, `perspective <name>`).
        message_type: String,
    },
    /// The receptor refused the command; nothing was written.
    #[error("`{message_type}` rejected: {error}")]
    Rejected {
        /// The command's type name.
        message_type: String,
        /// The receptor's refusal; it decides the HTTP status.
        error: ReceptorError,
    },
    /// The receptor panicked; nothing was written and the runtime keeps serving.
    #[error("receptor for `{message_type}` panicked: {message}")]
    Panicked {
        /// The command's type name.
        message_type: String,
        /// The panic's payload as text (a fixed text when it was not a string).
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
        /// The refused message's type name.
        message_type: String,
        /// What is wrong with it, naming the message id (and the size and limit when too large).
        reason: String,
    },
    /// An expected version did not match; nothing of the command was written.
    #[error("version conflict on stream `{stream_id}`: expected {expected:?}, found {actual}")]
    VersionConflict {
        /// The stream whose version did not match.
        stream_id: String,
        /// What the command expected of the stream.
        expected: ExpectedVersion,
        /// The stream's version when the unit was checked (0: no stream).
        actual: u64,
    },
    /// The events were committed, but a perspective failed on `message_id`; the runtime
    /// retries it with backoff (and dead-letters it after the maximum attempts).
    #[error("events committed, but perspective processing of {message_id} failed: {error}")]
    PerspectiveFailed {
        /// The id of the inbox message whose processing failed: an event, or a command taken from
        /// the inbox.
        message_id: Uuid,
        /// The handler's error as text, or `dead-lettered` once the row reached the maximum
        /// attempts.
        error: String,
    },
    /// An inline read model (`whizbang::Consistency::Inline`) failed on the command's event
    /// `message_id`: nothing of the command was written (HTTP 500; sending it again runs it
    /// again).
    #[error(
        "nothing committed: inline read model `{read_model}` failed on event {message_id}: {error}"
    )]
    InlineReadModelFailed {
        /// The id the event would have had.
        message_id: Uuid,
        /// The read model's name.
        read_model: String,
        /// Its error, panic or timeout as text.
        error: String,
    },
    /// `local_invoke` was asked for a result type the receptor does not return.
    #[error("receptor for `{message_type}` does not return `{expected}`")]
    ResultType {
        /// The command's type name.
        message_type: String,
        /// The type name the caller asked for (`std::any::type_name`).
        expected: &'static str,
    },
    /// The store failed; the error keeps its SQLSTATE and cause (see
    /// [`StoreError::is_retryable`]).
    #[error("store error: {0}")]
    Store(#[source] Arc<StoreError>),
    /// The runtime is shutting down or an actor is gone.
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    /// The receptor did not decide within `coordinator.handler_timeout_ms`; its run was dropped
    /// and nothing was written, so the command may be sent again (HTTP 503).
    #[error(
        "receptor for `{message_type}` did not decide within {timeout_ms} ms \
         (coordinator.handler_timeout_ms); nothing was written"
    )]
    HandlerTimedOut {
        /// The command's type name.
        message_type: String,
        /// The limit that passed.
        timeout_ms: u64,
    },
    /// The instance was at its in-flight limit (`runtime.max_in_flight`, or below it the
    /// adaptive limit, see `runtime.adaptive_in_flight`) for half the caller's deadline;
    /// nothing of this one was started. Retry later (HTTP 503).
    #[error(
        "`{message_type}` not started: the instance is at its limit of {max_in_flight} \
         dispatches in flight (runtime.max_in_flight, runtime.adaptive_in_flight); retry later"
    )]
    Overloaded {
        /// The message's type name.
        message_type: String,
        /// The limit that was reached (the adaptive one, when it is on).
        max_in_flight: u32,
    },
    /// The idempotency key was already used for another command (another type or another
    /// body); nothing was run (HTTP 422). Choose a new key for a new command.
    #[error(
        "idempotency key `{key}` was already used for a different command (another type or \
         body); nothing was run"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// A command of a request scope ([`crate::scope::Scope`]) failed, so nothing of the scope
    /// was written; `error` is that command's own error (which decides the HTTP status and
    /// whether retrying may help).
    #[error(
        "command {index} of the scope (`{message_type}`) failed, so nothing of the scope was \
         written: {error}"
    )]
    ScopeFailed {
        /// The command's place in the scope (0-based, in dispatch order).
        index: usize,
        /// The command's type name.
        message_type: String,
        /// Why it failed.
        error: Box<DispatchError>,
    },
    /// No answer within the caller's deadline. The work was started and goes on: it may still
    /// commit, so look its correlation id up before sending it again (HTTP 504).
    #[error(
        "`{message_type}` not answered within {deadline_ms} ms; the work may still commit: \
         look its correlation id up before sending it again"
    )]
    Timeout {
        /// The message's type name.
        message_type: String,
        /// The deadline that passed.
        deadline_ms: u64,
    },
}

impl DispatchError {
    /// The status an HTTP layer would answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            DispatchError::ScopeFailed { error, .. } => error.http_status(),
            DispatchError::Rejected { error, .. } => error.http_status(),
            DispatchError::InvalidMessage { .. } => 400,
            DispatchError::IdempotencyKeyReused { .. } => 422,
            DispatchError::VersionConflict { .. } => 409,
            DispatchError::Store(e) if e.is_retryable() => 503,
            DispatchError::Unavailable(_)
            | DispatchError::Overloaded { .. }
            | DispatchError::HandlerTimedOut { .. } => 503,
            DispatchError::Timeout { .. } => 504,
            _ => 500,
        }
    }

    /// A version conflict or a receptor's business-rule conflict: the request clashed with the
    /// current state (HTTP 409).
    pub fn is_conflict(&self) -> bool {
        if let DispatchError::ScopeFailed { error, .. } = self {
            return error.is_conflict();
        }
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
        match self {
            DispatchError::ScopeFailed { error, .. } => error.is_retryable(),
            DispatchError::Store(e) => e.is_retryable(),
            DispatchError::VersionConflict { .. }
            | DispatchError::Unavailable(_)
            | DispatchError::Overloaded { .. }
            | DispatchError::HandlerTimedOut { .. } => true,
            // It may have committed: a blind retry could run it twice.
            DispatchError::Timeout { .. } => false,
            _ => false,
        }
    }

    /// How long a caller should wait before retrying (an HTTP layer's `Retry-After`), for the
    /// errors that say "later".
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            DispatchError::ScopeFailed { error, .. } => error.retry_after(),
            DispatchError::Overloaded { .. } | DispatchError::Unavailable(_) => {
                Some(std::time::Duration::from_secs(1))
            }
            DispatchError::Store(e) if e.is_retryable() => Some(std::time::Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The store's error, when the store failed.
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            DispatchError::Store(e) => Some(e),
            DispatchError::ScopeFailed { error, .. } => error.store_error(),
            _ => None,
        }
    }

    pub(crate) fn from_handler(message_type: &str, failure: ReceptorFailure) -> DispatchError {
        match failure {
            ReceptorFailure::Rejected(error) => DispatchError::Rejected {
                message_type: message_type.into(),
                error,
            },
            ReceptorFailure::Panicked(message) => DispatchError::Panicked {
                message_type: message_type.into(),
                message,
            },
            ReceptorFailure::Decode(m) => DispatchError::Codec(m),
            ReceptorFailure::TimedOut(timeout_ms) => DispatchError::HandlerTimedOut {
                message_type: message_type.into(),
                timeout_ms,
            },
        }
    }
}

impl From<StoreError> for DispatchError {
    fn from(e: StoreError) -> Self {
        DispatchError::Store(Arc::new(e))
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
    /// The configuration is invalid, or names a backend this build was compiled without.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be connected to or migrated, or did not register this instance.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport could not be set up, or its topology check failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Two registrations clash (a second receptor for a command type, say).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An actor did not take a start-up message (its mailbox error, as text).
    #[error("actor system: {0}")]
    Actor(String),
    /// `telemetry.metrics_listen` could not be bound (in use, not a local address, no right).
    #[error("cannot listen on telemetry.metrics_listen {addr}: {source}")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why it could not be bound.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_keep_their_cause_and_say_whether_to_retry() {
        let busy: DispatchError = StoreError::Query {
            code: Some("40001".into()),
            message: "40001: could not serialize access".into(),
            source: None,
        }
        .into();
        assert!(busy.is_retryable());
        assert_eq!(busy.http_status(), 503);
        let bug: DispatchError = StoreError::Query {
            code: Some("42601".into()),
            message: "42601: syntax error".into(),
            source: None,
        }
        .into();
        assert!(!bug.is_retryable());
        assert_eq!(bug.http_status(), 500);
        let source = std::error::Error::source(&bug).expect("the store error");
        let store = source
            .downcast_ref::<Arc<StoreError>>()
            .expect("a StoreError");
        assert_eq!(store.sqlstate(), Some("42601"));
        assert_eq!(bug.store_error().and_then(|e| e.sqlstate()), Some("42601"));
        let down: DispatchError = StoreError::unavailable("connection closed").into();
        assert!(down.is_retryable());
        assert_eq!(down.http_status(), 503);
    }

    #[test]
    fn a_reused_idempotency_key_is_unprocessable_and_not_retryable() {
        let e = DispatchError::IdempotencyKeyReused { key: "k-1".into() };
        assert_eq!(e.http_status(), 422);
        assert!(!e.is_retryable());
        assert!(!e.is_conflict());
        assert_eq!(e.retry_after(), None);
        assert!(e.to_string().contains("k-1"), "{e}");
    }
}
