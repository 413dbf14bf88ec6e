//! `transport.max_message_bytes` over the real broker, with the Postgres store on both sides
//! (contract 8). The limit is inclusive and both sides agree on it: an event whose payload is
//! exactly the limit is stored, published over AMQP 1.0 and applied by the consuming service;
//! one byte over is refused at dispatch with a typed error naming its size and the limit, and
//! nothing of it is written. On the receiving side, a delivery exactly at the limit (from a
//! plain AMQP sender, which no dispatcher checked) is applied and one a byte over is rejected
//! with that reason.

use crate::support::amqp::*;
use crate::support::pg::{self, drop_schemas, new_schema, rows};
use crate::support::*;
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::{Connection, Sender, Session};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use whizbang::envelope::MessageKind;
use whizbang::transport::amqp::wire;
use whizbang::{
    Config, DispatchError, Envelope, Event, EventMeta, Message, Perspective, PerspectiveError,
    ReceiptStatus, Runtime,
};

const LIMIT: u32 = 4_096;

/// An event padded to a chosen payload size.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Parcel {
    stream: String,
    seq: u32,
    pad: String,
}

impl Message for Parcel {
    const TYPE_NAME: &'static str = "test.Parcel";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Parcel {}

/// A `Parcel` whose encoded payload is exactly `bytes` long.
fn parcel_of(stream: &str, seq: u32, bytes: usize) -> Parcel {
    let make = |n: usize| Parcel {
        stream: stream.into(),
        seq,
        pad: "x".repeat(n),
    };
    let mut n = 0;
    for _ in 0..8 {
        let len = whizbang::message::encode(&make(n)).expect("encodes").len();
        if len == bytes {
            return make(n);
        }
        n = (n + bytes)
            .checked_sub(len)
            .expect("the unpadded parcel fits in `bytes`");
    }
    panic!("no pad makes the payload exactly {bytes} bytes");
}

/// Records (stream, seq, payload size) of every parcel applied, in order.
#[derive(Clone, Default)]
struct Parcels(Arc<Mutex<Vec<(String, u32, usize)>>>);

impl Parcels {
    fn of(&self, stream: &str) -> Vec<(u32, usize)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, ..)| s == stream)
            .map(|(_, seq, size)| (*seq, *size))
            .collect()
    }
}

impl Perspective<Parcel> for Parcels {
    async fn apply(&self, event: Parcel, meta: EventMeta) -> Result<(), PerspectiveError> {
        let size = whizbang::message::encode(&event)
            .map_err(|e| PerspectiveError(e.to_string()))?
            .len();
        self.0
            .lock()
            .unwrap()
            .push((meta.stream_id, event.seq, size));
        Ok(())
    }
}

/// `service` on the Postgres store in a schema of its own, with the test's size limit.
fn on_postgres(service: &str) -> (Config, String) {
    let schema = new_schema();
    let mut c = pg::on_postgres(amqp_config(service), &schema);
    c.transport.max_message_bytes = LIMIT;
    (c, schema)
}

/// The consuming service on Postgres, subscribed to `topic` as "receiver", recording parcels.
async fn start_receiver(topic: &str) -> anyhow::Result<(Runtime, String, Parcels)> {
    let (config, schema) = on_postgres("size-receiver");
    let parcels = Parcels::default();
    let receiver = Runtime::builder(subscribed(config, topic, "receiver"))
        .perspective::<Parcel, _>("parcels", parcels.clone())
        .start()
        .await?;
    Ok((receiver, schema, parcels))
}

#[actix::test]
async fn an_event_at_the_limit_crosses_the_broker_and_one_byte_over_is_refused_at_dispatch()
-> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let _broker = require_broker().await?;
    let logs = captured_logs();
    let topic = unique("size");
    let _topology = Topology::declare(&[(&topic, &["receiver"])])?;
    let (receiver, receiver_schema, parcels) = start_receiver(&topic).await?;
    let (sender_config, sender_schema) = on_postgres("size-sender");
    let sender = Runtime::builder(publishing(sender_config, Parcel::TYPE_NAME, &topic))
        .start()
        .await?;

    let stream = unique("parcel");
    let limit = LIMIT as usize;
    let receipt = sender.publish(parcel_of(&stream, 1, limit)).await?;
    anyhow::ensure!(receipt.status == ReceiptStatus::Accepted, "{receipt:?}");
    match sender.publish(parcel_of(&stream, 2, limit + 1)).await {
        Err(e @ DispatchError::InvalidMessage { .. }) => {
            anyhow::ensure!(e.http_status() == 400 && !e.is_retryable(), "{e}");
            let text = e.to_string();
            anyhow::ensure!(
                text.contains(Parcel::TYPE_NAME)
                    && text.contains(&format!("{} bytes", limit + 1))
                    && text.contains(&format!("limit of {LIMIT}")),
                "{text}"
            );
        }
        other => anyhow::bail!("expected InvalidMessage, got {other:?}"),
    }
    sender.publish(parcel_of(&stream, 3, limit)).await?;

    // The receiver applies both events at the limit, in order, and rejects nothing.
    wait_until("the events at the limit applied by the receiver", || {
        parcels.of(&stream).len() >= 2
    })
    .await?;
    anyhow::ensure!(
        parcels.of(&stream) == vec![(1, limit), (3, limit)],
        "{:?}",
        parcels.of(&stream)
    );
    let queue = format!("{topic}.receiver");
    wait_for("the subscription queue to be empty", || async {
        queue_depth(&queue).ok().flatten() == Some(0)
    })
    .await?;
    let rejected = log_lines_with(&logs, "delivery rejected");
    anyhow::ensure!(
        !rejected.iter().any(|l| l.contains(&topic)),
        "{rejected:#?}"
    );

    // The sender stored the two accepted events and nothing of the refused one: its outbox
    // for the stream drains (a row for it would have been published, in order, before seq 3).
    anyhow::ensure!(rows(&sender_schema, "wb_events", Some(&stream)).await? == 2);
    wait_for("the sender's outbox to drain", || async {
        rows(&sender_schema, "wb_outbox", Some(&stream)).await.ok() == Some(0)
    })
    .await?;
    anyhow::ensure!(rows(&sender_schema, "wb_inbox", Some(&stream)).await? == 0);
    anyhow::ensure!(rows(&receiver_schema, "wb_events", Some(&stream)).await? == 0);

    sender.shutdown().await?;
    receiver.shutdown().await?;
    drop_schemas(&[&sender_schema, &receiver_schema]).await
}

#[actix::test]
async fn the_receiver_admits_a_delivery_at_the_limit_and_rejects_one_byte_over()
-> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let _broker = require_broker().await?;
    let logs = captured_logs();
    let topic = unique("size-in");
    let _topology = Topology::declare(&[(&topic, &["receiver"])])?;
    let (receiver, receiver_schema, parcels) = start_receiver(&topic).await?;

    // A plain sender: no dispatcher checks what it sends.
    let mut connection = Connection::open("plain-sender", amqp_url().as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut plain = Sender::attach(&mut session, "plain", format!("/exchange/{topic}")).await?;
    let stream = unique("parcel-in");
    let limit = LIMIT as usize;
    let envelope = |seq: u32, bytes: usize| -> anyhow::Result<Envelope> {
        Ok(Envelope::new(
            MessageKind::Event,
            Parcel::TYPE_NAME,
            stream.clone(),
            whizbang::message::encode(&parcel_of(&stream, seq, bytes))?,
        ))
    };
    let at = envelope(1, limit)?;
    let over = envelope(2, limit + 1)?;
    let after = envelope(3, limit)?;
    anyhow::ensure!(at.payload.len() == limit && over.payload.len() == limit + 1);
    for e in [&at, &over, &after] {
        let outcome = plain.send(wire::to_message(e)).await?;
        anyhow::ensure!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }

    wait_until("the deliveries at the limit applied", || {
        parcels.of(&stream).len() >= 2
    })
    .await?;
    anyhow::ensure!(
        parcels.of(&stream) == vec![(1, limit), (3, limit)],
        "{:?}",
        parcels.of(&stream)
    );
    let reason = format!(
        "message {} is {} bytes, over the limit of {LIMIT}",
        over.message_id,
        limit + 1
    );
    wait_until("the rejection of the delivery over the limit", || {
        !log_lines_with(&logs, &reason).is_empty()
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; rejections logged: {:#?}",
            log_lines_with(&logs, "delivery rejected")
        )
    })?;
    let rejected: Vec<String> = log_lines_with(&logs, "delivery rejected")
        .into_iter()
        .filter(|l| l.contains(&topic))
        .collect();
    anyhow::ensure!(
        rejected.len() == 1 && rejected[0].contains(&reason),
        "{rejected:#?}"
    );
    let queue = format!("{topic}.receiver");
    wait_for("the subscription queue to be empty", || async {
        queue_depth(&queue).ok().flatten() == Some(0)
    })
    .await?;
    // The inbox received the two at the limit and never the one over it.
    let received = |id: Uuid| {
        let schema = receiver_schema.clone();
        async move {
            let row = pg::connect()
                .await
                .query_one(
                    &format!("SELECT count(*) FROM {schema}.wb_dedup WHERE message_id::text = $1"),
                    &[&id.to_string()],
                )
                .await?;
            anyhow::Ok(row.get::<_, i64>(0))
        }
    };
    anyhow::ensure!(received(at.message_id).await? == 1);
    anyhow::ensure!(received(after.message_id).await? == 1);
    anyhow::ensure!(received(over.message_id).await? == 0);

    drop(plain);
    drop(session);
    let _ = connection.close().await;
    receiver.shutdown().await?;
    drop_schemas(&[&receiver_schema]).await
}
