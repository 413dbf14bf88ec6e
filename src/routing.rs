//! Routing: turns what a receptor (or a caller of `publish`) emitted into one unit of work.
//!
//! Owns the rules of where a message goes: every event is appended to the event store; an event
//! with a destination topic also gets an outbox row; an event with local perspectives gets an
//! inbox row (processed by its partition actor, deduplicated against the echo from the broker);
//! a follow-on command goes to the local receptor's inbox or to its topic's outbox. A message
//! bound for the outbox must fit the transport (`transport.max_message_bytes`, the same
//! inclusive limit every receiver applies): one that does not is refused here, before anything
//! of its unit is written, rather than committed, published and then rejected by every
//! receiver. Messages that stay in this service are not limited. Also owns the stable
//! stream → partition hash. It must not perform I/O.

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

/// Who is writing (stamped into every hop), and the settings its routing follows.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub service: String,
    pub instance: Uuid,
    pub partition_count: u32,
    /// The largest payload (inclusive) a message bound for the outbox may have:
    /// `transport.max_message_bytes`, what every receiver admits.
    pub max_message_bytes: usize,
    /// `messaging.system` of the publish and receive spans (see `telemetry`).
    pub messaging_system: &'static str,
    /// Which new traces are kept (`[telemetry.tracing]`; see `telemetry::traces`).
    pub sampler: crate::telemetry::traces::Sampler,
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
pub(crate) fn plan_unit(
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

/// Adds one message, with its destinations, to `unit`. On an error nothing of the message was
/// added (the caller drops the whole unit).
pub(crate) fn add_message(
    origin: &Origin,
    table: &RegistryTable,
    unit: &mut UnitOfWork,
    mut envelope: Envelope,
) -> Result<(), DispatchError> {
    let invalid = |envelope: &Envelope, reason| DispatchError::InvalidMessage {
        message_type: envelope.message_type.clone(),
        reason,
    };
    envelope
        .check_storable()
        .map_err(|reason| invalid(&envelope, reason))?;
    let partition = origin.partition(&envelope.stream_id);
    let topic = table.topic(&envelope.message_type).map(str::to_string);
    // Where it goes: the local inbox (perspectives of an event, the receptor of a command),
    // the outbox (an event's topic; a command's topic when no receptor is here).
    let (local, outbox) = match envelope.kind {
        MessageKind::Event => (
            !table.perspectives(&envelope.message_type).is_empty(),
            topic,
        ),
        MessageKind::Command if table.receptor(&envelope.message_type).is_some() => (true, None),
        MessageKind::Command if topic.is_some() => (false, topic),
        MessageKind::Command => {
            return Err(DispatchError::HandlerNotFound {
                message_type: envelope.message_type,
            });
        }
    };
    if outbox.is_some() {
        envelope
            .check_size(origin.max_message_bytes)
            .map_err(|reason| invalid(&envelope, reason))?;
    }
    envelope.push_hop(origin.hop(&envelope.stream_id, None));
    if envelope.kind == MessageKind::Event {
        unit.events.push(envelope.clone());
    }
    if local {
        unit.inbox.push(NewInboxRow {
            envelope: envelope.clone(),
            partition,
        });
    }
    if let Some(topic) = outbox {
        unit.outbox.push(NewOutboxRow {
            envelope,
            topic,
            partition,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(limit: usize) -> (Origin, std::sync::Arc<RegistryTable>) {
        let view = crate::registry::RegistryView::default();
        let topics = [("t.Remote", "remote"), ("t.Shipped", "shipments")]
            .into_iter()
            .map(|(m, t)| (m.to_string(), t.to_string()))
            .collect();
        let _registry = crate::registry::Registry::new(
            topics,
            view.clone(),
            std::time::Duration::from_secs(30),
            Uuid::now_v7(),
            crate::telemetry::Meters::noop(),
            crate::supervision::Supervision::new()
                .issuer()
                .issue(crate::supervision::ActorKind::Registry, 0),
        );
        let origin = Origin {
            service: "routing-test".into(),
            instance: Uuid::now_v7(),
            partition_count: 16,
            max_message_bytes: limit,
            messaging_system: "test",
            sampler: crate::telemetry::traces::Sampler::new(&Default::default()),
        };
        (origin, view.current())
    }

    fn message(kind: MessageKind, message_type: &str, payload_bytes: usize) -> Envelope {
        Envelope::new(kind, message_type, "s-1".into(), vec![7; payload_bytes])
    }

    #[test]
    fn a_message_bound_for_the_outbox_must_fit_the_transport_limit() {
        let (origin, table) = routed(10);
        for (kind, message_type) in [
            (MessageKind::Event, "t.Shipped"),
            (MessageKind::Command, "t.Remote"),
        ] {
            // At the limit: routed to the outbox.
            let mut unit = UnitOfWork::default();
            add_message(&origin, &table, &mut unit, message(kind, message_type, 10)).unwrap();
            assert_eq!(unit.outbox.len(), 1, "{message_type}");
            assert_eq!(unit.outbox[0].envelope.payload.len(), 10);
            // One byte over: refused, naming the size and the limit; nothing added.
            let mut unit = UnitOfWork::default();
            let bad = message(kind, message_type, 11);
            match add_message(&origin, &table, &mut unit, bad.clone()) {
                Err(DispatchError::InvalidMessage {
                    message_type: t,
                    reason,
                }) => {
                    assert_eq!(t, message_type);
                    assert!(reason.contains(&bad.message_id.to_string()), "{reason}");
                    assert!(reason.contains("11 bytes"), "{reason}");
                    assert!(reason.contains("limit of 10"), "{reason}");
                }
                other => panic!("{message_type}: expected InvalidMessage, got {other:?}"),
            }
            assert!(unit.events.is_empty() && unit.outbox.is_empty() && unit.inbox.is_empty());
        }
    }

    #[test]
    fn a_message_that_stays_local_is_not_limited_by_the_transport() {
        let (origin, table) = routed(10);
        let mut unit = UnitOfWork::default();
        add_message(
            &origin,
            &table,
            &mut unit,
            message(MessageKind::Event, "t.LocalOnly", 1_000),
        )
        .unwrap();
        assert_eq!(unit.events.len(), 1);
        assert!(unit.outbox.is_empty());
        // A command with neither a receptor nor a topic has nowhere to go, whatever its size.
        let r = add_message(
            &origin,
            &table,
            &mut unit,
            message(MessageKind::Command, "t.Nobody", 1),
        );
        assert!(
            matches!(r, Err(DispatchError::HandlerNotFound { .. })),
            "{r:?}"
        );
        assert_eq!(unit.events.len(), 1);
    }

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
