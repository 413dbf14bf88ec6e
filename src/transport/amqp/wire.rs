//! The wire mapping: an [`Envelope`] as an AMQP 1.0 message and back, exactly.
//!
//! | envelope | AMQP 1.0 |
//! |---|---|
//! | `message_id` | `properties.message-id` (string, the UUID) |
//! | `correlation_id` | `properties.correlation-id` (string, the UUID) |
//! | `message_type` | `properties.subject` (also RabbitMQ's routing key on `/exchange/T`) |
//! | `stream_id` | `properties.group-id` (the Service Bus session id) and the message annotation `x-opt-partition-key` |
//! | `payload` | one `data` section; `properties.content-type` = `application/msgpack` |
//! | `timestamp_us` | application property `whizbang-timestamp-us` (long; `properties.creation-time` carries the milliseconds for tools) |
//! | `kind` | application property `whizbang-kind` (`event` / `command`) |
//! | `causation_id` | application property `whizbang-causation-id` (absent for an original request) |
//! | `hops` | application property `whizbang-hops` (JSON array; AMQP properties hold scalars only) |
//! | `metadata` | one application property `whizbang-meta-KEY` per entry (strings, filterable in Service Bus rules) |
//! | `metadata["traceparent"]`, `metadata["tracestate"]` | application properties `traceparent` / `tracestate` (W3C Trace Context, as other AMQP clients propagate it; see [`crate::telemetry`]) |
//! | — | `header.durable` = true |
//!
//! Decoding never panics and never guesses: anything missing or of the wrong type becomes a
//! [`MalformedDelivery`] naming the first problem found, so the consumer rejects the delivery
//! with that reason.

use crate::envelope::{Envelope, Hop, MessageKind};
use crate::telemetry::{TRACEPARENT, TRACESTATE};
use crate::transport::MalformedDelivery;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Header, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use std::collections::BTreeMap;
use uuid::Uuid;

/// The content type of every payload whizbang sends (rmp-serde MessagePack).
pub const CONTENT_TYPE: &str = "application/msgpack";
/// Message annotation carrying the stream id (Service Bus partitioning).
pub const PARTITION_KEY: &str = "x-opt-partition-key";
/// Application property: `command` or `event` ([`crate::envelope::MessageKind`]).
pub const PROP_KIND: &str = "whizbang-kind";
/// Application property: the causation id, when there is one.
pub const PROP_CAUSATION_ID: &str = "whizbang-causation-id";
/// Application property: the envelope's creation time, microseconds since the Unix epoch.
pub const PROP_TIMESTAMP_US: &str = "whizbang-timestamp-us";
/// Application property: the envelope's hops as a JSON array (AMQP properties hold scalars only).
pub const PROP_HOPS: &str = "whizbang-hops";
/// Prefix of the application properties carrying the envelope's metadata.
pub const PROP_META_PREFIX: &str = "whizbang-meta-";

/// The AMQP message of an envelope.
pub fn to_message(envelope: &Envelope) -> Message<Data> {
    let mut app = ApplicationProperties::default();
    app.insert(
        PROP_KIND.to_string(),
        SimpleValue::String(envelope.kind.as_str().to_string()),
    );
    app.insert(
        PROP_TIMESTAMP_US.to_string(),
        SimpleValue::Long(envelope.timestamp_us),
    );
    if let Some(cause) = envelope.causation_id {
        app.insert(
            PROP_CAUSATION_ID.to_string(),
            SimpleValue::String(cause.to_string()),
        );
    }
    // Hop holds strings, a UUID and integers only: serialising it cannot fail.
    let hops = serde_json::to_string(&envelope.hops).unwrap_or_else(|_| "[]".into());
    app.insert(PROP_HOPS.to_string(), SimpleValue::String(hops));
    for (key, value) in &envelope.metadata {
        let name = match key.as_str() {
            TRACEPARENT | TRACESTATE => key.clone(),
            _ => format!("{PROP_META_PREFIX}{key}"),
        };
        app.insert(name, SimpleValue::String(value.clone()));
    }
    let mut annotations = MessageAnnotations::default();
    annotations.insert(
        Symbol::from(PARTITION_KEY).into(),
        Value::String(envelope.stream_id.clone()),
    );
    let properties = Properties {
        message_id: Some(MessageId::String(envelope.message_id.to_string())),
        correlation_id: Some(MessageId::String(envelope.correlation_id.to_string())),
        subject: Some(envelope.message_type.clone()),
        content_type: Some(Symbol::from(CONTENT_TYPE)),
        group_id: Some(envelope.stream_id.clone()),
        creation_time: Some(Timestamp::from_milliseconds(
            envelope.timestamp_us.div_euclid(1000),
        )),
        ..Properties::default()
    };
    Message {
        header: Some(Header {
            durable: true,
            ..Header::default()
        }),
        delivery_annotations: None,
        message_annotations: Some(annotations),
        properties: Some(properties),
        application_properties: Some(app),
        body: Data(Binary::from(envelope.payload.clone())),
        footer: None,
    }
}

/// Rebuilds the envelope of a received message; the error names what is wrong.
pub fn from_message(message: Message<Body<Value>>) -> Result<Envelope, MalformedDelivery> {
    let message_id = message
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
        .map(message_id_text);
    let bad = |reason: String| MalformedDelivery {
        message_id: message_id.clone(),
        reason,
    };
    let Some(properties) = message.properties else {
        return Err(bad("no properties section".into()));
    };
    let Some(id_text) = message_id.clone() else {
        return Err(bad("no message-id".into()));
    };
    let message_id_uuid = Uuid::parse_str(&id_text)
        .map_err(|_| bad(format!("message-id `{id_text}` is not a UUID")))?;
    match properties.content_type.as_ref().map(|s| s.0.as_str()) {
        Some(CONTENT_TYPE) => {}
        Some(other) => {
            return Err(bad(format!("content-type `{other}` is not {CONTENT_TYPE}")));
        }
        None => return Err(bad(format!("no content-type (expected {CONTENT_TYPE})"))),
    }
    let correlation_id = match properties.correlation_id.as_ref().map(message_id_text) {
        Some(text) => Uuid::parse_str(&text)
            .map_err(|_| bad(format!("correlation-id `{text}` is not a UUID")))?,
        None => return Err(bad("no correlation-id".into())),
    };
    let message_type = properties
        .subject
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no subject (the message type)".into()))?;
    let stream_id = properties
        .group_id
        .ok_or_else(|| bad("no group-id (the stream id)".into()))?;

    let app = message.application_properties.unwrap_or_default();
    let kind = match app.get(PROP_KIND) {
        Some(SimpleValue::String(s)) => MessageKind::parse(s)
            .ok_or_else(|| bad(format!("{PROP_KIND} `{s}` is neither event nor command")))?,
        Some(_) => return Err(bad(format!("{PROP_KIND} is not a string"))),
        None => return Err(bad(format!("no {PROP_KIND} application property"))),
    };
    let timestamp_us = match app.get(PROP_TIMESTAMP_US) {
        Some(SimpleValue::Long(us)) => *us,
        Some(SimpleValue::Int(us)) => i64::from(*us),
        Some(SimpleValue::Ulong(us)) => i64::try_from(*us)
            .map_err(|_| bad(format!("{PROP_TIMESTAMP_US} {us} is out of range")))?,
        Some(_) => return Err(bad(format!("{PROP_TIMESTAMP_US} is not an integer"))),
        None => return Err(bad(format!("no {PROP_TIMESTAMP_US} application property"))),
    };
    let causation_id = match app.get(PROP_CAUSATION_ID) {
        Some(SimpleValue::String(s)) => Some(
            Uuid::parse_str(s)
                .map_err(|_| bad(format!("{PROP_CAUSATION_ID} `{s}` is not a UUID")))?,
        ),
        Some(SimpleValue::Null) | None => None,
        Some(_) => return Err(bad(format!("{PROP_CAUSATION_ID} is not a string"))),
    };
    let hops: Vec<Hop> = match app.get(PROP_HOPS) {
        Some(SimpleValue::String(json)) => serde_json::from_str(json)
            .map_err(|e| bad(format!("{PROP_HOPS} does not decode: {e}")))?,
        Some(_) => return Err(bad(format!("{PROP_HOPS} is not a string"))),
        None => Vec::new(),
    };
    let mut metadata = BTreeMap::new();
    for (key, value) in app.iter() {
        let name = match key.as_str() {
            TRACEPARENT | TRACESTATE => Some(key.as_str()),
            _ => key.strip_prefix(PROP_META_PREFIX),
        };
        if let Some(name) = name {
            match value {
                SimpleValue::String(v) => {
                    metadata.insert(name.to_string(), v.clone());
                }
                _ => return Err(bad(format!("metadata property {key} is not a string"))),
            }
        }
    }
    let payload = match message.body {
        Body::Data(sections) => {
            let mut bytes = Vec::new();
            for section in sections {
                bytes.extend_from_slice(section.0.as_slice());
            }
            bytes
        }
        Body::Empty => return Err(bad("no body".into())),
        Body::Value(_) => return Err(bad("body is an amqp-value, not a data section".into())),
        Body::Sequence(_) => {
            return Err(bad("body is an amqp-sequence, not a data section".into()));
        }
    };
    Ok(Envelope {
        message_id: message_id_uuid,
        correlation_id,
        causation_id,
        timestamp_us,
        message_type,
        kind,
        stream_id,
        hops,
        metadata,
        payload,
    })
}

fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Binary(b) => b
            .as_slice()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{AmqpValue, Batch};

    fn sample() -> Envelope {
        let cause = Envelope::new(
            MessageKind::Command,
            "CreateOrder",
            "order-1".into(),
            vec![],
        );
        let mut e = Envelope::caused_by(
            &cause,
            MessageKind::Event,
            "OrderCreated",
            "order-1".into(),
            vec![0x82, 0xa1, b'a', 0x01, 0xff, 0x00],
        );
        e.metadata.insert("tenant".into(), "acme".into());
        e.metadata.insert("user id".into(), "ü-42".into());
        e.metadata.insert(
            TRACEPARENT.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        e.metadata
            .insert(TRACESTATE.into(), "congo=t61rcWkgMzE".into());
        e.push_hop(Hop {
            service: "order-service".into(),
            instance: Uuid::now_v7(),
            topic: Some("orders".into()),
            stream_id: "order-1".into(),
            partition: 17,
            timestamp_us: 1_700_000_000_123_456,
        });
        e.push_hop(Hop {
            service: "x".into(),
            instance: Uuid::nil(),
            topic: None,
            stream_id: "order-1".into(),
            partition: 0,
            timestamp_us: -5,
        });
        e
    }

    /// What a receiver sees: the sent message with its body as the generic body type.
    fn received(m: Message<Data>) -> Message<Body<Value>> {
        Message {
            header: m.header,
            delivery_annotations: m.delivery_annotations,
            message_annotations: m.message_annotations,
            properties: m.properties,
            application_properties: m.application_properties,
            body: Body::Data(Batch::new(vec![m.body])),
            footer: m.footer,
        }
    }

    /// RabbitMQ's sharded subscriptions hash the encoded message-annotations section (its AMQP
    /// 1.0 plugin exposes no other per-stream value to the consistent-hash exchange): it must
    /// hold the stream id and nothing else, so that one stream always lands on one shard.
    #[test]
    fn message_annotations_hold_the_stream_id_alone() {
        let e = sample();
        let annotations = to_message(&e).message_annotations.unwrap();
        assert_eq!(annotations.len(), 1);
        let key: fe2o3_amqp::types::messaging::annotations::OwnedKey =
            Symbol::from(PARTITION_KEY).into();
        assert_eq!(
            annotations.get(&key),
            Some(&Value::String(e.stream_id.clone()))
        );
        // Two messages of one stream, differing in everything else, encode the same section.
        let mut other = sample();
        other.message_id = Uuid::now_v7();
        other.message_type = "Other".into();
        other.payload = vec![1, 2, 3];
        let bytes = |e: &Envelope| serde_amqp::to_vec(&to_message(e).message_annotations).unwrap();
        assert_eq!(bytes(&e), bytes(&other));
        other.stream_id = "order-2".into();
        assert_ne!(bytes(&e), bytes(&other));
    }

    #[test]
    fn round_trips_every_field() {
        let e = sample();
        let m = to_message(&e);
        let p = m.properties.as_ref().unwrap();
        assert_eq!(p.subject.as_deref(), Some("OrderCreated"));
        assert_eq!(p.group_id.as_deref(), Some("order-1"));
        assert_eq!(p.content_type.as_ref().unwrap().0, CONTENT_TYPE);
        assert!(m.header.as_ref().unwrap().durable);
        let key: fe2o3_amqp::types::messaging::annotations::OwnedKey =
            Symbol::from(PARTITION_KEY).into();
        assert_eq!(
            m.message_annotations.as_ref().unwrap().get(&key),
            Some(&Value::String("order-1".into()))
        );
        assert_eq!(from_message(received(m)).unwrap(), e);
    }

    /// The W3C trace context goes as the plain `traceparent` / `tracestate` properties that
    /// other AMQP clients (OpenTelemetry's instrumentations) read and write, not as metadata.
    #[test]
    fn the_trace_context_travels_as_w3c_application_properties() {
        let e = sample();
        let m = to_message(&e);
        let app = m.application_properties.as_ref().unwrap();
        assert_eq!(
            app.get(TRACEPARENT),
            Some(&SimpleValue::String(e.metadata[TRACEPARENT].clone()))
        );
        assert_eq!(
            app.get(TRACESTATE),
            Some(&SimpleValue::String("congo=t61rcWkgMzE".into()))
        );
        assert!(!app.contains_key(&format!("{PROP_META_PREFIX}{TRACEPARENT}")));
        let back = from_message(received(m)).unwrap();
        assert_eq!(back.metadata[TRACEPARENT], e.metadata[TRACEPARENT]);
        assert_eq!(back.metadata[TRACESTATE], e.metadata[TRACESTATE]);
    }

    #[test]
    fn an_original_request_has_no_causation() {
        let e = Envelope::new(MessageKind::Command, "Ping", "s".into(), vec![]);
        let m = to_message(&e);
        assert!(
            !m.application_properties
                .as_ref()
                .unwrap()
                .contains_key(PROP_CAUSATION_ID)
        );
        assert_eq!(from_message(received(m)).unwrap(), e);
    }

    fn reason_of(m: Message<Body<Value>>) -> MalformedDelivery {
        from_message(m).unwrap_err()
    }

    #[test]
    fn malformed_messages_name_their_problem() {
        let e = sample();
        let id = Some(e.message_id.to_string());

        let mut m = received(to_message(&e));
        m.properties.as_mut().unwrap().message_id = None;
        assert_eq!(
            reason_of(m),
            MalformedDelivery {
                message_id: None,
                reason: "no message-id".into()
            }
        );

        let mut m = received(to_message(&e));
        m.properties.as_mut().unwrap().content_type = Some(Symbol::from("application/json"));
        let bad = reason_of(m);
        assert_eq!(bad.message_id, id);
        assert!(bad.reason.contains("application/json"), "{}", bad.reason);

        let mut m = received(to_message(&e));
        m.body = Body::Empty;
        assert_eq!(reason_of(m).reason, "no body");

        let mut m = received(to_message(&e));
        m.body = Body::Value(AmqpValue(Value::String("hi".into())));
        assert!(reason_of(m).reason.contains("amqp-value"));

        let mut m = received(to_message(&e));
        m.application_properties
            .as_mut()
            .unwrap()
            .insert(PROP_HOPS.into(), SimpleValue::String("{not json".into()));
        assert!(reason_of(m).reason.contains(PROP_HOPS));

        let mut m = received(to_message(&e));
        m.application_properties
            .as_mut()
            .unwrap()
            .insert(PROP_KIND.into(), SimpleValue::String("query".into()));
        assert!(reason_of(m).reason.contains("query"));

        let mut m = received(to_message(&e));
        m.application_properties = None;
        assert!(reason_of(m).reason.contains(PROP_KIND));

        let mut m = received(to_message(&e));
        m.properties.as_mut().unwrap().message_id = Some(MessageId::String("nope".into()));
        let bad = reason_of(m);
        assert_eq!(bad.message_id.as_deref(), Some("nope"));
        assert!(bad.reason.contains("not a UUID"));

        let mut m = received(to_message(&e));
        m.properties.as_mut().unwrap().group_id = None;
        assert!(reason_of(m).reason.contains("group-id"));

        let mut m = received(to_message(&e));
        m.properties = None;
        assert_eq!(reason_of(m).reason, "no properties section");
    }

    #[test]
    fn several_data_sections_are_concatenated() {
        let e = sample();
        let mut m = received(to_message(&e));
        let half = e.payload.len() / 2;
        m.body = Body::Data(Batch::new(vec![
            Data(Binary::from(e.payload[..half].to_vec())),
            Data(Binary::from(e.payload[half..].to_vec())),
        ]));
        assert_eq!(from_message(m).unwrap().payload, e.payload);
    }
}
