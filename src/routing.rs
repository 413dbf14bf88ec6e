//! Routing: turns what a receptor (or a caller of `publish`) emitted into one unit of work.
//!
//! Owns the rules of where a message goes: every event is appended to the event store; an event
//! with a destination topic also gets an outbox row; an event with local perspectives gets an
//! inbox row (processed by its partition actor, deduplicated against the echo from the broker);
//! a follow-on command goes to the local receptor's inbox or to its topic's outbox. Also owns
//! the stable stream → partition hash. It must not perform I/O.

use crate::envelope::{Envelope, Hop, MessageKind, now_us};
use crate::error::DispatchError;
use crate::handler::Emitted;
use crate::registry::RegistryTable;
use crate::store::{ExpectedVersion, NewInboxRow, NewOutboxRow, UnitOfWork, WorkRef};
use uuid::Uuid;

/// Maps a stream to its partition: FNV-1a (64-bit) of the stream id's UTF-8 bytes, modulo the
/// partition count. Stable across processes, builds and platforms; `schema/` has the same
/// function in SQL for operators.
pub fn partition_of(stream_id: &str, partition_count: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in stream_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partition_count.max(1))) as u32
}

/// Who is writing: stamped into every hop.
#[derive(Debug, Clone)]
pub struct Origin {
    pub service: String,
    pub instance: Uuid,
    pub partition_count: u32,
}

impl Origin {
    pub fn hop(&self, stream_id: &str, topic: Option<&str>) -> Hop {
        Hop {
            service: self.service.clone(),
            instance: self.instance,
            topic: topic.map(str::to_string),
            stream_id: stream_id.to_string(),
            partition: partition_of(stream_id, self.partition_count),
            timestamp_us: now_us(),
        }
    }

    pub fn partition(&self, stream_id: &str) -> u32 {
        partition_of(stream_id, self.partition_count)
    }
}

/// Builds the unit for messages caused by `cause` (a command being handled).
pub fn plan_unit(
    origin: &Origin,
    table: &RegistryTable,
    cause: &Envelope,
    events: Vec<Emitted>,
    commands: Vec<Emitted>,
    expectations: Vec<(String, ExpectedVersion)>,
    completes_inbox: Option<WorkRef>,
) -> Result<UnitOfWork, DispatchError> {
    let mut unit = UnitOfWork {
        expectations,
        claim_for_writer: true,
        completes_inbox: completes_inbox.into_iter().collect(),
        ..UnitOfWork::default()
    };
    for emitted in events.into_iter().chain(commands) {
        let payload = emitted.payload.map_err(DispatchError::Codec)?;
        let envelope = Envelope::caused_by(
            cause,
            emitted.kind,
            emitted.message_type,
            emitted.stream_id,
            payload,
        );
        add_message(origin, table, &mut unit, envelope)?;
    }
    Ok(unit)
}

/// Adds one message, with its destinations, to `unit`.
pub fn add_message(
    origin: &Origin,
    table: &RegistryTable,
    unit: &mut UnitOfWork,
    mut envelope: Envelope,
) -> Result<(), DispatchError> {
    envelope
        .check_storable()
        .map_err(|reason| DispatchError::InvalidMessage {
            message_type: envelope.message_type.clone(),
            reason,
        })?;
    let partition = origin.partition(&envelope.stream_id);
    let topic = table.topic(&envelope.message_type).map(str::to_string);
    envelope.push_hop(origin.hop(&envelope.stream_id, None));
    match envelope.kind {
        MessageKind::Event => {
            unit.events.push(envelope.clone());
            if !table.perspectives(&envelope.message_type).is_empty() {
                unit.inbox.push(NewInboxRow {
                    envelope: envelope.clone(),
                    partition,
                });
            }
            if let Some(topic) = topic {
                unit.outbox.push(NewOutboxRow {
                    envelope,
                    topic,
                    partition,
                });
            }
        }
        MessageKind::Command => {
            if table.receptor(&envelope.message_type).is_some() {
                unit.inbox.push(NewInboxRow {
                    envelope,
                    partition,
                });
            } else if let Some(topic) = topic {
                unit.outbox.push(NewOutboxRow {
                    envelope,
                    topic,
                    partition,
                });
            } else {
                return Err(DispatchError::HandlerNotFound {
                    message_type: envelope.message_type,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_hash_is_stable_and_in_range() {
        // Pinned values: changing the function would move every stream to another partition.
        assert_eq!(partition_of("", 10_000), 6037);
        assert_eq!(partition_of("a", 10_000), 1996);
        assert_eq!(partition_of("order-1", 10_000), 3325);
        for i in 0..1000 {
            assert!(partition_of(&format!("s-{i}"), 7) < 7);
        }
        let spread: std::collections::HashSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("s-{i}"), 10))
            .collect();
        assert_eq!(spread.len(), 10);
    }
}
