//! The transport conformance suite, run against both implementations of the seam: the
//! in-process `MemoryTransport` and the AMQP 1.0 transport on a real RabbitMQ broker (each test
//! declares topics and subscriptions of its own, so the tests run in parallel).
//!
//! Cases: publish → receive → accept (and nothing comes back); release → delivered again;
//! reject → never delivered again; order kept on one subscription (one stream, and many streams
//! published concurrently); fan-out to two subscriptions; every envelope field round-trips
//! (hops, metadata, causation, kind, binary and large payloads).

use crate::support::amqp::*;
use crate::support::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::Envelope;
use whizbang::envelope::{Hop, MessageKind};
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::transport::{Delivery, Settlement, Subscription, Transport};

/// One side of the seam, and how to make a fresh topic with subscriptions on it.
struct Fixture {
    transport: Arc<dyn Transport>,
    bus: Option<Arc<MemoryBus>>,
    topologies: Mutex<Vec<Topology>>,
    _broker: Option<BrokerLease>,
}

impl Fixture {
    fn memory() -> Fixture {
        let bus = MemoryBus::new();
        Fixture {
            transport: Arc::new(MemoryTransport::new(bus.clone())),
            bus: Some(bus),
            topologies: Mutex::new(Vec::new()),
            _broker: None,
        }
    }

    async fn amqp() -> anyhow::Result<Fixture> {
        let broker = require_broker().await?;
        Ok(Fixture {
            transport: amqp_transport(),
            bus: None,
            topologies: Mutex::new(Vec::new()),
            _broker: Some(broker),
        })
    }

    /// A new topic whose subscriptions exist before anything is published.
    fn topic(&self, subscriptions: &[&str]) -> anyhow::Result<String> {
        let topic = unique("conf");
        match &self.bus {
            Some(bus) => subscriptions.iter().for_each(|s| bus.declare(&topic, s)),
            None => {
                let topology = Topology::declare(&[(&topic, subscriptions)])?;
                self.topologies.lock().unwrap().push(topology);
            }
        }
        Ok(topic)
    }
}

/// Receives until `n` deliveries arrived (fails after the deadline).
async fn recv(sub: &mut dyn Subscription, n: usize) -> anyhow::Result<Vec<Delivery>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, sub.receive(n - out.len())).await {
            Ok(batch) => out.extend(batch?),
            Err(_) => anyhow::bail!(
                "received {} of {n} deliveries within {DEADLINE:?}",
                out.len()
            ),
        }
    }
    Ok(out)
}

/// Receives `n` deliveries, accepting each batch as it arrives (credit is `prefetch`: the broker
/// sends more only as deliveries are settled), and returns their envelopes.
async fn recv_accepting(sub: &mut dyn Subscription, n: usize) -> anyhow::Result<Vec<Envelope>> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let batch = match tokio::time::timeout(left, sub.receive(n - out.len())).await {
            Ok(batch) => batch?,
            Err(_) => anyhow::bail!(
                "received {} of {n} deliveries within {DEADLINE:?}",
                out.len()
            ),
        };
        for d in batch {
            sub.settle(d.tag, Settlement::Accept).await?;
            out.push(
                d.message
                    .map_err(|bad| anyhow::anyhow!("malformed: {bad:?}"))?,
            );
        }
    }
    Ok(out)
}

/// Passes when nothing is delivered within `window`.
async fn expect_nothing(sub: &mut dyn Subscription, window: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(window, sub.receive(10)).await {
        Err(_) => Ok(()),
        Ok(Ok(got)) => anyhow::bail!(
            "expected no delivery, got {:?}",
            got.iter()
                .map(|d| d.message.as_ref().map(|e| e.message_id))
                .collect::<Vec<_>>()
        ),
        Ok(Err(e)) => Err(e.into()),
    }
}

fn envelope_of(d: &Delivery) -> &Envelope {
    d.message.as_ref().expect("a well-formed delivery")
}

async fn publish_receive_accept(fx: Fixture) -> anyhow::Result<()> {
    let topic = fx.topic(&["s"])?;
    let t = fx.transport.clone();
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let e = event_envelope(&Bumped::new("stream-1", 1));
    t.publish(&topic, &e).await?;
    let got = recv(&mut *sub, 1).await?;
    assert_eq!(envelope_of(&got[0]), &e);
    sub.settle(got[0].tag, Settlement::Accept).await?;
    // Settling twice is harmless.
    sub.settle(got[0].tag, Settlement::Accept).await?;
    drop(sub);
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    expect_nothing(&mut *sub, Duration::from_millis(500)).await
}

async fn release_redelivers(fx: Fixture) -> anyhow::Result<()> {
    let topic = fx.topic(&["s"])?;
    let t = fx.transport.clone();
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let e = event_envelope(&Bumped::new("stream-1", 1));
    t.publish(&topic, &e).await?;
    let first = recv(&mut *sub, 1).await?;
    sub.settle(first[0].tag, Settlement::Release).await?;
    let again = recv(&mut *sub, 1).await?;
    assert_eq!(
        envelope_of(&again[0]),
        &e,
        "the released message comes back"
    );
    sub.settle(again[0].tag, Settlement::Accept).await?;
    expect_nothing(&mut *sub, Duration::from_millis(500)).await
}

async fn reject_is_final(fx: Fixture) -> anyhow::Result<()> {
    let topic = fx.topic(&["s"])?;
    let t = fx.transport.clone();
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let poison = event_envelope(&Bumped::new("stream-1", 1));
    t.publish(&topic, &poison).await?;
    let got = recv(&mut *sub, 1).await?;
    sub.settle(got[0].tag, Settlement::Reject("poison".into()))
        .await?;
    let next = event_envelope(&Bumped::new("stream-1", 2));
    t.publish(&topic, &next).await?;
    let got = recv(&mut *sub, 1).await?;
    assert_eq!(
        envelope_of(&got[0]),
        &next,
        "the rejected message is not redelivered"
    );
    sub.settle(got[0].tag, Settlement::Accept).await?;
    drop(sub);
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    expect_nothing(&mut *sub, Duration::from_millis(500)).await?;
    if let Some(bus) = &fx.bus {
        let dead = bus.dead_letters(&topic, "s");
        assert_eq!(
            dead,
            vec![(Some(poison.message_id.to_string()), "poison".into())]
        );
    }
    Ok(())
}

async fn order_is_kept(fx: Fixture) -> anyhow::Result<()> {
    let topic = fx.topic(&["s"])?;
    let t = fx.transport.clone();
    let mut sub = t.subscribe(&topic, "s", 100).await?;
    // One stream, one publish at a time (as the publisher does per stream).
    let sent: Vec<Envelope> = (1..=200)
        .map(|i| event_envelope(&Bumped::new("solo", i)))
        .collect();
    for e in &sent {
        t.publish(&topic, e).await?;
    }
    let got = recv_accepting(&mut *sub, sent.len()).await?;
    let ids: Vec<Uuid> = got.iter().map(|e| e.message_id).collect();
    assert_eq!(ids, sent.iter().map(|e| e.message_id).collect::<Vec<_>>());
    // Many streams at once: each stream sequential, the streams concurrent (pipelined).
    let streams = 20;
    let per_stream = 25;
    let tasks = (0..streams).map(|s| {
        let t = t.clone();
        let topic = topic.clone();
        async move {
            let mut ids = Vec::new();
            for i in 1..=per_stream {
                let e = event_envelope(&Bumped::new(format!("multi-{s}"), i));
                t.publish(&topic, &e).await?;
                ids.push(e.message_id);
            }
            anyhow::Ok((format!("multi-{s}"), ids))
        }
    });
    let expected: HashMap<String, Vec<Uuid>> = futures::future::try_join_all(tasks)
        .await?
        .into_iter()
        .collect();
    let got = recv_accepting(&mut *sub, streams * per_stream as usize).await?;
    let mut seen: HashMap<String, Vec<Uuid>> = HashMap::new();
    for e in &got {
        seen.entry(e.stream_id.clone())
            .or_default()
            .push(e.message_id);
    }
    assert_eq!(seen, expected, "per-stream order differs");
    Ok(())
}

async fn fan_out(fx: Fixture) -> anyhow::Result<()> {
    let topic = fx.topic(&["a", "b"])?;
    let t = fx.transport.clone();
    let mut a = t.subscribe(&topic, "a", 10).await?;
    let mut b = t.subscribe(&topic, "b", 10).await?;
    let sent: Vec<Envelope> = (1..=10)
        .map(|i| event_envelope(&Bumped::new("fan", i)))
        .collect();
    for e in &sent {
        t.publish(&topic, e).await?;
    }
    for sub in [&mut a, &mut b] {
        let got = recv(&mut **sub, sent.len()).await?;
        let envelopes: Vec<Envelope> = got.iter().map(|d| envelope_of(d).clone()).collect();
        assert_eq!(envelopes, sent);
        for d in got {
            sub.settle(d.tag, Settlement::Accept).await?;
        }
    }
    Ok(())
}

async fn fields_round_trip(fx: Fixture) -> anyhow::Result<()> {
    let topic = fx.topic(&["s"])?;
    let t = fx.transport.clone();
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let cause = Envelope::new(
        MessageKind::Command,
        "test.Bump",
        "stream/with spaces & ünïcode".into(),
        vec![1, 2, 3],
    );
    let mut caused = Envelope::caused_by(
        &cause,
        MessageKind::Event,
        "test.Bumped",
        "stream/with spaces & ünïcode".into(),
        (0..=255u8).collect(),
    );
    caused.metadata.insert("tenant".into(), "acme".into());
    caused
        .metadata
        .insert("trace-parent".into(), "00-abc-def-01".into());
    caused.metadata.insert("empty".into(), String::new());
    for (i, topic_name) in [Some("orders"), None].into_iter().enumerate() {
        caused.push_hop(Hop {
            service: format!("service-{i}"),
            instance: Uuid::now_v7(),
            topic: topic_name.map(String::from),
            stream_id: caused.stream_id.clone(),
            partition: 9_999 - i as u32,
            timestamp_us: 1_700_000_000_000_000 + i as i64,
        });
    }
    let mut original = Envelope::new(MessageKind::Command, "test.Bump", "s-2".into(), vec![]);
    original.timestamp_us = -1;
    let mut large = event_envelope(&Bumped::new("s-3", 3));
    large.payload = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sent = vec![caused, cause, original, large];
    for e in &sent {
        t.publish(&topic, e).await?;
    }
    let got = recv(&mut *sub, sent.len()).await?;
    for (d, e) in got.iter().zip(&sent) {
        assert_eq!(envelope_of(d), e);
        sub.settle(d.tag, Settlement::Accept).await?;
    }
    Ok(())
}

macro_rules! both_sides {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(super::Fixture::memory()).await
                }
            )*
        }
        mod amqp {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(super::Fixture::amqp().await?).await
                }
            )*
        }
    };
}

both_sides!(
    publish_receive_accept,
    release_redelivers,
    reject_is_final,
    order_is_kept,
    fan_out,
    fields_round_trip,
);
