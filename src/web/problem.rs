//! RFC 9457 problem details: what an HTTP client is told when a request fails.
//!
//! Owns [`Problem`] (the `application/problem+json` body and its status, with `Retry-After` for
//! the answers that say "later") and the mapping of every [`DispatchError`] to one. It must not
//! leak internals: a failure of the server (a store bug, a panicking receptor, a codec error) is
//! logged here with its full text and answered with a fixed sentence and an id to find the log
//! line by, never with the error's own text.

use crate::error::DispatchError;
use crate::handler::ReceptorError;
use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use std::fmt;
use std::time::Duration;
use uuid::Uuid;

/// The media type of a problem body (RFC 9457, section 3).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// A problem details object (RFC 9457): its JSON members, its HTTP status and, for a 503, how
/// long the client should wait. Answer one from a handler with `Err(problem)`.
///
/// ```
/// use whizbang::web::Problem;
///
/// let p = Problem::bad_request("quantity must be positive").with_field("lines[0].quantity");
/// assert_eq!(p.status, 400);
/// assert_eq!(p.field.as_deref(), Some("lines[0].quantity"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A URI reference naming the kind of problem (`urn:whizbang:problem:<kind>`): what a client
    /// branches on.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// A short summary of the kind (the same for every occurrence).
    pub title: String,
    /// The HTTP status, repeated in the body.
    pub status: u16,
    /// What happened to this request, for a human.
    pub detail: String,
    /// The request field at fault (`lines[0].quantity`, `Idempotency-Key`), when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The request's correlation id, when it was dispatched: look it up on the status endpoint
    /// (after a 504, before sending it again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id under which a server failure was logged (a 500 says nothing else).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<Uuid>,
    /// Seconds to wait before retrying, also sent as `Retry-After` (503 answers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl Problem {
    /// A problem of `kind` (the last part of its type URI) with `status` and `detail`.
    pub fn new(status: u16, kind: &str, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            problem_type: format!("urn:whizbang:problem:{kind}"),
            title: title.into(),
            status,
            detail: detail.into(),
            field: None,
            correlation_id: None,
            incident: None,
            retry_after_s: None,
        }
    }

    /// 400: the request is malformed or fails validation.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(400, "invalid-request", "Invalid request", detail)
    }

    /// 404: what the request names does not exist.
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(404, "not-found", "Not found", detail)
    }

    /// 413: the body is over the limit (`transport.max_message_bytes`).
    pub fn too_large(size: Option<usize>, limit: usize) -> Problem {
        let detail = match size {
            Some(size) => format!("the body is {size} bytes, over the limit of {limit} bytes"),
            None => format!("the body is over the limit of {limit} bytes"),
        };
        Problem::new(413, "too-large", "Request body too large", detail)
    }

    /// 415: the body is not JSON.
    pub fn unsupported_media_type(found: Option<&str>) -> Problem {
        let detail = match found {
            Some(found) => {
                format!("the body must be application/json, not `{found}`")
            }
            None => "the body must be application/json (no Content-Type was sent)".to_string(),
        };
        Problem::new(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
        .with_field("Content-Type")
    }

    /// 503 with `Retry-After`: the service cannot take the request now.
    pub fn unavailable(detail: impl Into<String>, retry_after: Duration) -> Problem {
        let mut p = Problem::new(503, "unavailable", "Service unavailable", detail);
        p.retry_after_s = Some(retry_after.as_secs().max(1));
        p
    }

    /// 500: the server failed. `cause` is logged with a new incident id, never answered.
    pub fn internal(cause: &dyn fmt::Display) -> Problem {
        let incident = Uuid::now_v7();
        tracing::error!(%incident, error = %cause, "request failed inside the service");
        let mut p = Problem::new(
            500,
            "internal",
            "Internal server error",
            "the service failed to handle the request; it was logged under the incident id",
        );
        p.incident = Some(incident);
        p
    }

    /// Names the request field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Problem {
        self.field = Some(field.into());
        self
    }

    /// Attaches the request's correlation id.
    pub fn with_correlation_id(mut self, correlation_id: Uuid) -> Problem {
        self.correlation_id = Some(correlation_id);
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.title, self.detail)
    }
}

impl std::error::Error for Problem {}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((CONTENT_TYPE, PROBLEM_JSON));
        if let Some(seconds) = self.retry_after_s {
            response.insert_header((RETRY_AFTER, seconds.to_string()));
        }
        match serde_json::to_vec(self) {
            Ok(body) => response.body(body),
            // Only strings and numbers: serializing cannot fail; answered plainly if it did.
            Err(_) => response.body(format!("{{\"status\":{}}}", self.status)),
        }
    }
}

/// Receptor refusals keep their text (the receptor wrote it for the caller); a receptor's
/// `Internal` error is the server's failure and is logged, not answered.
fn rejected(error: &ReceptorError) -> Problem {
    match error {
        ReceptorError::Validation(m) => {
            let mut p = Problem::bad_request(m.clone());
            p.problem_type = "urn:whizbang:problem:validation".into();
            p.title = "Validation failed".into();
            p
        }
        ReceptorError::Conflict(m) => Problem::new(409, "conflict", "Conflict", m.clone()),
        ReceptorError::NotFound(m) => Problem::not_found(m.clone()),
        ReceptorError::Internal(_) => Problem::internal(error),
    }
}

impl From<&DispatchError> for Problem {
    fn from(e: &DispatchError) -> Problem {
        let retry_after = e.retry_after().unwrap_or(Duration::from_secs(1));
        match e {
            DispatchError::Rejected { error, .. } => rejected(error),
            DispatchError::VersionConflict { .. } => Problem::new(
                409,
                "version-conflict",
                "Version conflict",
                format!("{e}; read the current state and decide again"),
            ),
            DispatchError::InvalidMessage { reason, .. }
                if reason.contains("transport.max_message_bytes") =>
            {
                let mut p = Problem::new(
                    413,
                    "too-large",
                    "Message too large",
                    "the message is over the transport's size limit",
                );
                p.detail = format!("{}: {reason}", p.detail);
                p
            }
            DispatchError::InvalidMessage { reason, .. } => Problem::bad_request(reason.clone()),
            DispatchError::Overloaded { .. } => Problem::unavailable(
                "the service is at its limit of requests in flight; nothing was started: retry \
                 later",
                retry_after,
            ),
            DispatchError::HandlerTimedOut { .. } => Problem::unavailable(
                "the request was not decided in time and nothing was written: retry later",
                retry_after,
            ),
            DispatchError::Unavailable(_) => {
                tracing::warn!(error = %e, "request refused: runtime unavailable");
                Problem::unavailable(
                    "the service is stopping or unavailable; nothing was started: retry later",
                    retry_after,
                )
            }
            DispatchError::Store(store) if store.is_retryable() => {
                tracing::warn!(error = %e, "request refused: store unavailable");
                Problem::unavailable(
                    "the service's store is unavailable; nothing was committed: retry later",
                    retry_after,
                )
            }
            DispatchError::Timeout { deadline_ms, .. } => Problem::new(
                504,
                "timeout",
                "No answer in time",
                format!(
                    "no answer within {deadline_ms} ms; the work may still commit: look its \
                     correlation id up on the status endpoint before sending it again"
                ),
            ),
            DispatchError::PerspectiveFailed { .. } => {
                let mut p = Problem::internal(e);
                p.detail = "the request was committed, but updating its read models failed; \
                            they are retried: look its correlation id up on the status endpoint"
                    .into();
                p
            }
            // Anything the client caused keeps its text (e.g. a reused idempotency key); the
            // server's own failures are logged and answered without their text.
            other if other.http_status() < 500 => Problem::new(
                other.http_status(),
                "rejected",
                "Request rejected",
                other.to_string(),
            ),
            other => Problem::internal(other),
        }
    }
}

impl From<DispatchError> for Problem {
    fn from(e: DispatchError) -> Problem {
        Problem::from(&e)
    }
}

/// A handler may return `Result<_, DispatchError>` and answer failures as problems.
impl ResponseError for DispatchError {
    fn status_code(&self) -> StatusCode {
        Problem::from(self).status_code()
    }

    fn error_response(&self) -> HttpResponse {
        Problem::from(self).error_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn every_dispatch_error_maps_to_its_status_without_leaking_internals() {
        let cases: Vec<(DispatchError, u16)> = vec![
            (
                DispatchError::Rejected {
                    message_type: "C".into(),
                    error: ReceptorError::Validation("lines: empty".into()),
                },
                400,
            ),
            (
                DispatchError::Rejected {
                    message_type: "C".into(),
                    error: ReceptorError::Conflict("over the limit".into()),
                },
                409,
            ),
            (
                DispatchError::Rejected {
                    message_type: "C".into(),
                    error: ReceptorError::NotFound("product X".into()),
                },
                404,
            ),
            (
                DispatchError::Overloaded {
                    message_type: "C".into(),
                    max_in_flight: 1,
                },
                503,
            ),
            (
                DispatchError::Timeout {
                    message_type: "C".into(),
                    deadline_ms: 5,
                },
                504,
            ),
            (
                DispatchError::InvalidMessage {
                    message_type: "C".into(),
                    reason:
                        "message x is 9 bytes, over the limit of 4 (transport.max_message_bytes)"
                            .into(),
                },
                413,
            ),
            (DispatchError::Unavailable("mailbox closed".into()), 503),
            (
                StoreError::unavailable("connection to 10.0.0.7 refused").into(),
                503,
            ),
        ];
        for (e, status) in cases {
            let p = Problem::from(&e);
            assert_eq!(p.status, status, "{e}");
            if status == 503 {
                assert_eq!(p.retry_after_s, Some(1), "{e}");
                assert!(!p.detail.contains("10.0.0.7") && !p.detail.contains("mailbox"));
            }
        }
        let secret = DispatchError::Rejected {
            message_type: "C".into(),
            error: ReceptorError::Internal("password=hunter2".into()),
        };
        let p = Problem::from(&secret);
        assert_eq!(p.status, 500);
        assert!(p.incident.is_some());
        assert!(!serde_json::to_string(&p).unwrap().contains("hunter2"));
        let panicked = DispatchError::Panicked {
            message_type: "C".into(),
            message: "index out of bounds at src/secret.rs".into(),
        };
        assert!(!Problem::from(&panicked).detail.contains("secret"));
    }

    #[test]
    fn a_503_carries_retry_after_and_the_problem_media_type() {
        let response = Problem::unavailable("busy", Duration::from_millis(200)).error_response();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers().get(RETRY_AFTER).unwrap(), "1");
        assert_eq!(response.headers().get(CONTENT_TYPE).unwrap(), PROBLEM_JSON);
    }
}
