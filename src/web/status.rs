//! The status endpoint: what one request caused, by correlation id, as JSON.
//!
//! Owns [`StatusReport`] (the JSON a client polls after a `202 Accepted` or a `504`) and the
//! handler [`status`] over [`crate::Runtime::status`]. It must not change anything: looking up
//! is all it does.

use super::RuntimeHandle;
use super::problem::Problem;
use crate::dispatcher::{DeliveryReceipt, ReceiptStatus};
use crate::store::{CorrelationStatus, DeadLetter, Queue};
use actix_web::{HttpResponse, web};
use serde::Serialize;
use uuid::Uuid;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// Work it caused is still waiting, retrying or in flight (outbox or inbox).
    Pending,
    /// Its events are stored, its perspectives applied and its outbox published.
    Completed,
    /// Some of its work kept failing and was dead-lettered; its stream waits for an operator.
    DeadLettered,
}

/// One stored event of the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    /// The event's type name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Its stream.
    pub stream_id: String,
    /// Its version in the stream.
    pub version: u64,
}

/// A dead letter on one of the request's streams, with the reason it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterReport {
    /// `outbox` (not published) or `inbox` (not applied).
    pub queue: &'static str,
    /// The dead-lettered message.
    pub message_id: Uuid,
    /// Its type name.
    pub message_type: String,
    /// The stream that waits behind it.
    pub stream_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub error: String,
}

/// The JSON of the status endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusReport {
    /// The request looked up.
    pub correlation_id: Uuid,
    /// Where it stands.
    pub state: Progress,
    /// Its stored events, in order.
    pub events: Vec<StoredEvent>,
    /// Outbox rows not yet published.
    pub outbox_pending: u64,
    /// Inbox rows (perspectives, local commands) not yet processed.
    pub inbox_pending: u64,
    /// Inbox messages processed.
    pub perspectives_applied: u64,
    /// Rows dead-lettered.
    pub dead_lettered: u64,
    /// The dead letters on the request's streams, each with its reason.
    pub dead_letters: Vec<DeadLetterReport>,
}

impl StatusReport {
    /// The report of `status`, or `None` when the store knows nothing of `correlation_id`.
    /// `dead_letters` are the store's dead letters; those on the request's streams are kept.
    pub fn new(
        correlation_id: Uuid,
        status: CorrelationStatus,
        dead_letters: &[DeadLetter],
    ) -> Option<StatusReport> {
        let known = !status.events.is_empty()
            || status.outbox_pending > 0
            || status.inbox_pending > 0
            || status.inbox_processed > 0
            || status.dead_lettered > 0;
        if !known {
            return None;
        }
        let state = if status.dead_lettered > 0 {
            Progress::DeadLettered
        } else if status.outbox_pending > 0 || status.inbox_pending > 0 {
            Progress::Pending
        } else {
            Progress::Completed
        };
        let dead_letters = if status.dead_lettered > 0 {
            dead_letters
                .iter()
                .filter(|d| status.events.iter().any(|(_, s, _)| *s == d.stream_id))
                .map(|d| DeadLetterReport {
                    queue: match d.queue {
                        Queue::Outbox => "outbox",
                        Queue::Inbox => "inbox",
                    },
                    message_id: d.message_id,
                    message_type: d.message_type.clone(),
                    stream_id: d.stream_id.clone(),
                    attempts: d.attempts,
                    error: d.error.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(StatusReport {
            correlation_id,
            state,
            events: status
                .events
                .into_iter()
                .map(|(event_type, stream_id, version)| StoredEvent {
                    event_type,
                    stream_id,
                    version,
                })
                .collect(),
            outbox_pending: status.outbox_pending,
            inbox_pending: status.inbox_pending,
            perspectives_applied: status.inbox_processed,
            dead_lettered: status.dead_lettered,
            dead_letters,
        })
    }
}

/// The JSON of a [`DeliveryReceipt`] (a `202 Accepted` body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceiptJson {
    /// The dispatched message's id.
    pub message_id: Uuid,
    /// The request's correlation id: the status endpoint's key.
    pub correlation_id: Uuid,
    /// The stream it was written to.
    pub stream_id: String,
    /// When it was created, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// `delivered` (handled here and committed) or `accepted` (queued for a remote receptor).
    pub status: &'static str,
    /// The events committed, as `{stream_id, version, position}`.
    pub events: Vec<ReceiptEvent>,
}

/// One event of a [`ReceiptJson`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceiptEvent {
    /// The event's message id.
    pub message_id: Uuid,
    /// Its stream.
    pub stream_id: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its position in the global log.
    pub position: u64,
}

impl From<&DeliveryReceipt> for ReceiptJson {
    fn from(r: &DeliveryReceipt) -> ReceiptJson {
        ReceiptJson {
            message_id: r.message_id,
            correlation_id: r.correlation_id,
            stream_id: r.stream_id.clone(),
            timestamp_us: r.timestamp_us,
            status: match r.status {
                ReceiptStatus::Delivered => "delivered",
                ReceiptStatus::Accepted => "accepted",
            },
            events: r
                .events
                .iter()
                .map(|e| ReceiptEvent {
                    message_id: e.message_id,
                    stream_id: e.stream_id.clone(),
                    version: e.version,
                    position: e.position,
                })
                .collect(),
        }
    }
}

/// `GET …/{correlation_id}`: the [`StatusReport`] as JSON (200), 404 when the id is unknown
/// (or its records were purged after `store.dedup_retention_hours`), 400 when it is not a UUID.
/// Needs a [`RuntimeHandle`] as app data.
///
/// ```no_run
/// use actix_web::{App, web};
/// # fn wire(handle: whizbang::web::RuntimeHandle) {
/// let app = App::new()
///     .app_data(web::Data::new(handle))
///     .route("/orders/status/{correlation_id}", web::get().to(whizbang::web::status));
/// # }
/// ```
pub async fn status(
    handle: web::Data<RuntimeHandle>,
    correlation_id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let correlation_id = Uuid::parse_str(&correlation_id).map_err(|_| {
        Problem::bad_request("the correlation id must be a UUID").with_field("correlation_id")
    })?;
    match handle.status_report(correlation_id).await? {
        Some(report) => Ok(HttpResponse::Ok().json(report)),
        None => Err(Problem::not_found(format!(
            "nothing is known of correlation id {correlation_id}"
        ))
        .with_correlation_id(correlation_id)),
    }
}
