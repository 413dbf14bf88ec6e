//! The envelope: what travels with every message through store, transport and handlers.
//!
//! Owns identity (UUIDv7 message id), the correlation / causation chain, the hops a message took
//! and free-form metadata. It must not know how a payload is interpreted: the payload is opaque
//! bytes produced by [`crate::message::encode`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Whether a message is a command (one receptor) or an event (event store + perspectives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    /// Handled by exactly one receptor.
    Command,
    /// Appended to the event store and applied by every perspective of its type.
    Event,
}

impl MessageKind {
    /// The name stored in the database and carried on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Event => "event",
        }
    }

    /// The kind named by [`MessageKind::as_str`]'s text; `None` for anything else.
    pub fn parse(s: &str) -> Option<MessageKind> {
        match s {
            "command" => Some(MessageKind::Command),
            "event" => Some(MessageKind::Event),
            _ => None,
        }
    }
}

/// One step of a message's journey: which service instance handled it, on which topic, stream
/// and partition, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The service that handled the message.
    pub service: String,
    /// The instance of that service.
    pub instance: Uuid,
    /// The topic it was published on, if it crossed the transport.
    pub topic: Option<String>,
    /// The stream it belonged to there.
    pub stream_id: String,
    /// The stream's partition in that service.
    pub partition: u32,
    /// When, microseconds since the Unix epoch.
    pub timestamp_us: i64,
}

/// A message with everything the runtime needs to route, order, trace and deduplicate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// UUIDv7: unique, and time-ordered so indexes stay compact.
    pub message_id: Uuid,
    /// Shared by every message caused, directly or not, by the same original request.
    pub correlation_id: Uuid,
    /// The message id of the message that caused this one; `None` for an original request.
    pub causation_id: Option<Uuid>,
    /// Creation time, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// The stable type name ([`crate::message::Message::TYPE_NAME`]).
    pub message_type: String,
    /// Command or event.
    pub kind: MessageKind,
    /// The stream: the unit of ordering (one partition, strictly in order).
    pub stream_id: String,
    /// Every service instance the message passed through, oldest first.
    pub hops: Vec<Hop>,
    /// Free-form key/value pairs, inherited by every message this one causes.
    pub metadata: BTreeMap<String, String>,
    /// The rmp-serde encoded message.
    pub payload: Vec<u8>,
}

impl Envelope {
    /// Checks the fields the stores keep as text: a NUL character cannot be stored in a
    /// PostgreSQL `text` column, and one such message would fail the whole batch it is
    /// committed with, taking the messages of other callers down with it. The error is the
    /// reason, for a typed refusal of this one message.
    pub fn check_storable(&self) -> Result<(), String> {
        for (field, value) in [
            ("stream id", &self.stream_id),
            ("message type", &self.message_type),
        ] {
            if value.contains('\0') {
                return Err(format!(
                    "the {field} of message {} contains a NUL character",
                    self.message_id
                ));
            }
        }
        Ok(())
    }

    /// Checks the payload fits a transport that carries at most `max_bytes` of it. The limit is
    /// inclusive — a payload of exactly `max_bytes` passes — and this one check is what both
    /// the sending side (routing, before a message enters the outbox) and the receiving side
    /// (the consumer, before a delivery enters the inbox) apply, so they agree on the boundary.
    /// The error is the reason, naming the size and the limit.
    pub fn check_size(&self, max_bytes: usize) -> Result<(), String> {
        if self.payload.len() > max_bytes {
            return Err(format!(
                "message {} is {} bytes, over the limit of {max_bytes} (transport.max_message_bytes)",
                self.message_id,
                self.payload.len()
            ));
        }
        Ok(())
    }

    /// A new original message: fresh message id, a new correlation id, no cause.
    pub fn new(
        kind: MessageKind,
        message_type: &str,
        stream_id: String,
        payload: Vec<u8>,
    ) -> Envelope {
        let message_id = Uuid::now_v7();
        Envelope {
            message_id,
            correlation_id: message_id,
            causation_id: None,
            timestamp_us: now_us(),
            message_type: message_type.to_string(),
            kind,
            stream_id,
            hops: Vec::new(),
            metadata: BTreeMap::new(),
            payload,
        }
    }

    /// A message caused by `cause`: keeps its correlation id, takes its message id as the
    /// causation id, and inherits its metadata.
    pub fn caused_by(
        cause: &Envelope,
        kind: MessageKind,
        message_type: &str,
        stream_id: String,
        payload: Vec<u8>,
    ) -> Envelope {
        let mut envelope = Envelope::new(kind, message_type, stream_id, payload);
        envelope.correlation_id = cause.correlation_id;
        envelope.causation_id = Some(cause.message_id);
        envelope.metadata = cause.metadata.clone();
        envelope
    }

    /// Records one more step of the journey.
    pub fn push_hop(&mut self, hop: Hop) {
        self.hops.push(hop);
    }
}

/// Microseconds since the Unix epoch, by this machine's clock (used for traces, never leases).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caused_message_keeps_correlation_and_points_at_its_cause() {
        let cmd = Envelope::new(MessageKind::Command, "CreateOrder", "o-1".into(), vec![]);
        assert_eq!(cmd.correlation_id, cmd.message_id);
        assert_eq!(cmd.message_id.get_version_num(), 7);
        let ev = Envelope::caused_by(
            &cmd,
            MessageKind::Event,
            "OrderCreated",
            "o-1".into(),
            vec![],
        );
        assert_eq!(ev.correlation_id, cmd.correlation_id);
        assert_eq!(ev.causation_id, Some(cmd.message_id));
        assert_ne!(ev.message_id, cmd.message_id);
    }

    #[test]
    fn the_size_limit_is_inclusive() {
        let at = Envelope::new(MessageKind::Event, "E", "s".into(), vec![0; 64]);
        assert_eq!(at.check_size(64), Ok(()));
        let over = Envelope::new(MessageKind::Event, "E", "s".into(), vec![0; 65]);
        let reason = over.check_size(64).unwrap_err();
        assert!(
            reason.contains("65 bytes, over the limit of 64"),
            "{reason}"
        );
    }
}
