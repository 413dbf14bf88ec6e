//! Several consumer instances on one subscription (guarantee 4 across instances), on RabbitMQ's
//! sharded topology (`transport.amqp.shards`, `scripts/amqp-topology.sh TOPIC:SUB/N`): the
//! consistent-hash exchange keeps each stream on one shard queue, each shard is a
//! single-active-consumer queue, and every instance attaches to every shard.
//!
//! - The hash exchange puts every message of a stream on one shard, and spreads the streams.
//! - Two runtimes on one shared Postgres schema (as real instances of one service are) apply
//!   many streams with no order violation, nothing lost and nothing applied twice.
//! - The same while the instance that was receiving is stopped mid-stream: the other takes its
//!   shards over and order still holds.
//! - A rejected delivery lands in the subscription's dead-letter queue.

use crate::support::amqp::*;
use crate::support::pg::{self, drop_schemas, on_postgres};
use crate::support::*;
use fe2o3_amqp::types::messaging::{Body, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;
use whizbang::transport::amqp::wire;
use whizbang::{Config, EventMeta, Perspective, PerspectiveError, Runtime};

const SHARDS: u32 = 4;

/// One application: the instance, the stream, the event's seq, its message id.
type Application = (&'static str, String, u32, Uuid);

/// Every application of an event by either instance, in the order they happened.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<Vec<Application>>>);

/// The perspective of one instance: records into the shared log under its name.
#[derive(Clone)]
struct Instance {
    name: &'static str,
    log: Applied,
}

impl Perspective<Bumped> for Instance {
    async fn apply(&self, event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        self.log
            .0
            .lock()
            .unwrap()
            .push((self.name, meta.stream_id, event.seq, meta.message_id));
        Ok(())
    }
}

impl Applied {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn by_instance(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for (name, ..) in self.0.lock().unwrap().iter() {
            *counts.entry(*name).or_default() += 1;
        }
        counts
    }

    /// Checks every stream was applied exactly 1..=events, in order; returns the problems.
    fn violations(&self, streams: &[String], events: u32) -> Vec<String> {
        let log = self.0.lock().unwrap();
        let mut per_stream: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut ids = HashSet::new();
        let mut problems = Vec::new();
        for (_, stream, seq, id) in log.iter() {
            if !ids.insert(*id) {
                problems.push(format!("{stream} #{seq} ({id}) applied twice"));
            }
            per_stream.entry(stream.as_str()).or_default().push(*seq);
        }
        for stream in streams {
            let seqs = per_stream.remove(stream.as_str()).unwrap_or_default();
            if seqs != (1..=events).collect::<Vec<_>>() {
                problems.push(format!("{stream}: applied {seqs:?}"));
            }
        }
        problems
    }
}

/// A plain fe2o3-amqp sender on the topic exchange (as any producer could be), sending the
/// events of each stream in order.
struct PlainSender {
    sender: Sender,
    _session: fe2o3_amqp::session::SessionHandle<()>,
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
}

impl PlainSender {
    async fn open(topic: &str) -> anyhow::Result<PlainSender> {
        let mut connection = Connection::open("plain-sender", amqp_url().as_str()).await?;
        let mut session = Session::begin(&mut connection).await?;
        let sender = Sender::attach(&mut session, "plain", format!("/exchange/{topic}")).await?;
        Ok(PlainSender {
            sender,
            _session: session,
            connection,
        })
    }

    /// Sends one event and waits for its outcome, within [`DEADLINE`] (fe2o3-amqp may otherwise
    /// wait for an outcome forever when the connection goes).
    async fn send(&mut self, event: &Bumped) -> anyhow::Result<()> {
        let outcome = tokio::time::timeout(
            DEADLINE,
            self.sender.send(wire::to_message(&event_envelope(event))),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no outcome for {event:?} within {DEADLINE:?}"))??;
        anyhow::ensure!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        Ok(())
    }

    async fn close(self) {
        drop(self.sender);
        let mut connection = self.connection;
        let _ = connection.close().await;
    }
}

fn streams(events_prefix: &str, n: usize) -> Vec<String> {
    let run = Uuid::now_v7().simple().to_string();
    (0..n)
        .map(|i| format!("{events_prefix}-{run}-{i}"))
        .collect()
}

#[tokio::test]
async fn the_hash_exchange_keeps_each_stream_on_one_shard() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("shard");
    let _topology = Topology::declare(&[(&topic, &["inventory/4"])])?;
    let streams = streams("s", 40);
    let mut sender = PlainSender::open(&topic).await?;
    for seq in 1..=3 {
        for stream in &streams {
            sender.send(&Bumped::new(stream.as_str(), seq)).await?;
        }
    }
    sender.close().await;

    let mut shard_of: HashMap<String, HashSet<u32>> = HashMap::new();
    let mut per_shard = Vec::new();
    let mut connection = Connection::open("shard-reader", amqp_url().as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    for shard in 0..SHARDS {
        let queue = format!("{topic}.inventory.{shard}");
        wait_for("the shard depth to settle", || async {
            queue_depth(&queue).ok().flatten().is_some()
        })
        .await?;
        let depth = queue_depth(&queue)?.unwrap_or(0);
        per_shard.push(depth);
        let mut receiver = Receiver::attach(
            &mut session,
            format!("r{shard}"),
            format!("/amq/queue/{queue}"),
        )
        .await?;
        for _ in 0..depth {
            let delivery = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>()).await??;
            receiver.accept(&delivery).await?;
            let group = delivery
                .message()
                .properties
                .as_ref()
                .and_then(|p| p.group_id.clone())
                .expect("a group id");
            shard_of.entry(group).or_default().insert(shard);
        }
        drop(receiver);
    }
    drop(session);
    let _ = connection.close().await;

    assert_eq!(
        per_shard.iter().sum::<u64>(),
        3 * streams.len() as u64,
        "every message reaches exactly one shard: {per_shard:?}"
    );
    assert_eq!(shard_of.len(), streams.len());
    for (stream, shards) in &shard_of {
        assert_eq!(
            shards.len(),
            1,
            "stream {stream} spread over shards {shards:?}"
        );
    }
    let used = per_shard.iter().filter(|n| **n > 0).count();
    assert!(used >= 2, "the streams were not spread: {per_shard:?}");
    Ok(())
}

/// An inventory-side configuration on the sharded subscription, Postgres store in `schema`.
fn instance_config(topic: &str, schema: &str) -> Config {
    let mut c = subscribed(amqp_config("inventory-service"), topic, "inventory");
    c.transport.amqp.shards = SHARDS;
    // Small windows so that a shard's deliveries are spread over several inbox commits.
    c.transport.prefetch = 50;
    c.runtime.shutdown_timeout_ms = 20_000;
    // Live instances are known from the heartbeat: soon, so that the shards are shared soon
    // (the lease stays at its default: a short one expires under load and re-runs events).
    c.partitions.heartbeat_seconds = 1;
    // Two runtimes share the server with the other tests: a few connections each.
    c.store.pool_size = 4;
    on_postgres(c, schema)
}

async fn start_instance(
    name: &'static str,
    config: Config,
    log: &Applied,
) -> anyhow::Result<Runtime> {
    Ok(Runtime::builder(config)
        .perspective::<Bumped, _>(
            "inventory",
            Instance {
                name,
                log: log.clone(),
            },
        )
        .start()
        .await?)
}

const STREAMS: usize = 50;
const EVENTS: u32 = 20;

/// Two instances on one subscription and one schema consume `STREAMS` × `EVENTS` events sent
/// in order per stream. Without `stop_midway` both start together (each shard goes to whichever
/// attached first); with it, the first instance starts alone (so it is every shard's active
/// consumer), the second joins as a standby, and the first is shut down once a third of the
/// events has been applied, the sender still sending.
async fn two_instances(stop_midway: bool) -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let _broker = require_broker().await?;
    let topic = unique("compete");
    let _topology = Topology::declare(&[(&topic, &["inventory/4"])])?;
    let schema = format!("t_{}_c", Uuid::now_v7().simple());
    let log = Applied::default();
    // The runtimes' warnings, shown if the run fails (the buffer is shared with the tests
    // running beside this one).
    let logs = captured_logs();
    let result = async {
        let streams = streams("order", STREAMS);
        let mut sender = PlainSender::open(&topic).await?;
        let (first, second) = if stop_midway {
            let first = start_instance("a", instance_config(&topic, &schema), &log).await?;
            // The first instance is attached (and every shard's active consumer) once it
            // applies: the one to stop is the one receiving.
            sender.send(&Bumped::new(streams[0].as_str(), 1)).await?;
            wait_until("the first instance to apply", || log.len() >= 1).await?;
            let second = start_instance("b", instance_config(&topic, &schema), &log).await?;
            (first, second)
        } else {
            // Started together, the two race for each shard: whichever attaches first is its
            // active consumer.
            let (first, second) = tokio::join!(
                start_instance("a", instance_config(&topic, &schema), &log),
                start_instance("b", instance_config(&topic, &schema), &log)
            );
            let (first, second) = (first?, second?);
            sender.send(&Bumped::new(streams[0].as_str(), 1)).await?;
            (first, second)
        };

        let total = STREAMS * EVENTS as usize;
        // The sender keeps going on its own task while an instance may be stopped, a round
        // (one event of every stream) every 100 ms.
        let to_send = streams.clone();
        let sending = tokio::spawn(async move {
            for seq in 1..=EVENTS {
                for (i, stream) in to_send.iter().enumerate() {
                    if i == 0 && seq == 1 {
                        continue;
                    }
                    sender.send(&Bumped::new(stream.as_str(), seq)).await?;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sender.close().await;
            anyhow::Ok(())
        });
        if !stop_midway {
            // The instance that attached first hands shards over to the other once the
            // heartbeat shows two instances: both receive at once.
            wait_until("both instances to be active on shards", || {
                first.active_shards() > 0 && second.active_shards() > 0
            })
            .await?;
            let (a, b) = (first.active_shards(), second.active_shards());
            eprintln!("active shards: a {a}, b {b}");
            assert!(
                a + b <= SHARDS,
                "more active receivers than shards: {a} + {b}"
            );
        }
        let mut first = Some(first);
        if stop_midway {
            wait_until("a third of the events to be applied", || {
                log.len() >= total / 3
            })
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}: {} of {total} applied ({:?}), first instance active on {} shards, second on {}",
                    log.len(),
                    log.by_instance(),
                    first.as_ref().map_or(0, |r| r.active_shards()),
                    second.active_shards()
                )
            })?;
            // Mid-stream: the sender is still sending, and deliveries are in flight at the
            // first instance (received, being committed, or applied and not yet completed).
            anyhow::ensure!(
                !sending.is_finished(),
                "the sender finished before the stop: nothing was in flight"
            );
            if let Some(runtime) = first.take() {
                runtime.shutdown().await?;
            }
        }
        tokio::time::timeout(DEADLINE * 2, sending)
            .await
            .map_err(|_| {
                anyhow::anyhow!("the sender did not finish within {:?}", DEADLINE * 2)
            })???;
        wait_until("every event to be applied", || log.len() >= total)
            .await
            .map_err(|e| anyhow::anyhow!("{e}: {} of {total} applied", log.len()))?;
        holds_for("no event applied twice", Duration::from_millis(500), || {
            log.len() == total
        })
        .await?;
        let problems = log.violations(&streams, EVENTS);
        assert!(
            problems.is_empty(),
            "{} problems, first ones: {:#?}",
            problems.len(),
            &problems[..problems.len().min(10)]
        );
        let counts = log.by_instance();
        eprintln!("applied per instance: {counts:?}");
        if stop_midway {
            assert!(
                counts.get("b").copied().unwrap_or(0) > 0,
                "the second instance took nothing over: {counts:?}"
            );
        }
        for shard in 0..SHARDS {
            let queue = format!("{topic}.inventory.{shard}");
            wait_for("the shard queues to drain", || async {
                queue_depth(&queue).ok().flatten() == Some(0)
            })
            .await?;
        }
        if let Some(runtime) = first {
            runtime.shutdown().await?;
        }
        second.shutdown().await?;
        anyhow::Ok(())
    }
    .await;
    if result.is_err() {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "last warnings of the process:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    drop_schemas(&[&schema]).await?;
    result
}

#[actix::test]
async fn two_instances_on_one_subscription_apply_every_stream_in_order() -> anyhow::Result<()> {
    two_instances(false).await
}

#[actix::test]
async fn an_instance_stopped_mid_stream_hands_its_shards_over_in_order() -> anyhow::Result<()> {
    two_instances(true).await
}

#[actix::test]
async fn a_rejected_delivery_lands_in_the_dead_letter_queue() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("dlq");
    let _topology = Topology::declare(&[(&topic, &["inventory/2"])])?;
    let mut config = subscribed(amqp_config("inventory-service"), &topic, "inventory");
    config.transport.amqp.shards = 2;
    let recorder = Recorder::default();
    let runtime = Runtime::builder(config)
        .perspective::<Bumped, _>("inventory", recorder.clone())
        .start()
        .await?;

    let stream = "order-dlq";
    let good = |seq: u32| wire::to_message(&event_envelope(&Bumped::new(stream, seq)));
    let mut unknown = good(2);
    unknown.properties.as_mut().unwrap().subject = Some("test.NoSuchEvent".into());
    let unknown_id = match unknown
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone())
    {
        Some(fe2o3_amqp::types::messaging::MessageId::String(s)) => s,
        other => anyhow::bail!("unexpected message id {other:?}"),
    };
    let mut sender = PlainSender::open(&topic).await?;
    for message in [good(1), unknown, good(3)] {
        let outcome = tokio::time::timeout(DEADLINE, sender.sender.send(message)).await??;
        anyhow::ensure!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    sender.close().await;
    wait_until("the good events to be applied", || {
        recorder.seqs(stream).len() >= 2
    })
    .await?;
    assert_eq!(recorder.seqs(stream), vec![1, 3]);

    let dead = format!("{topic}.inventory.dead");
    wait_for("the rejected delivery in the dead-letter queue", || async {
        queue_depth(&dead).ok().flatten() == Some(1)
    })
    .await?;
    let mut connection = Connection::open("dead-reader", amqp_url().as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut receiver = Receiver::attach(&mut session, "dead", format!("/amq/queue/{dead}")).await?;
    let delivery = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>()).await??;
    receiver.accept(&delivery).await?;
    let id = delivery
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.message_id.clone());
    assert_eq!(
        id,
        Some(fe2o3_amqp::types::messaging::MessageId::String(unknown_id)),
        "the dead letter is the rejected message"
    );
    drop(receiver);
    drop(session);
    let _ = connection.close().await;
    runtime.shutdown().await?;
    Ok(())
}

/// A receiver that goes away holding deliveries it has not settled (its instance stopped, or an
/// inbox commit failed) gives them back ahead of everything after them: the standby that the
/// broker activates next receives them first. On RabbitMQ a detached link's unsettled
/// deliveries stay with its session until that ends, while the next consumer is activated at
/// the detach: a link detached before its connection closed let the standby receive later
/// messages first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_closed_with_unsettled_deliveries_gives_them_back_first() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("giveback");
    let _topology = Topology::declare(&[(&topic, &["inventory/1"])])?;
    let stream = "gb-1";
    let mut sender = PlainSender::open(&topic).await?;
    for seq in 1..=6 {
        sender.send(&Bumped::new(stream, seq)).await?;
    }
    sender.close().await;
    let mut config = amqp_transport_config();
    config.amqp.shards = 1;
    let a = whizbang::transport::amqp::AmqpTransport::from_config(&config, "giveback-a")?;
    let b = whizbang::transport::amqp::AmqpTransport::from_config(&config, "giveback-b")?;
    use whizbang::transport::Transport as _;
    let mut first = a.subscribe_receiver(&topic, "inventory", 0, 2).await?;
    let held = tokio::time::timeout(DEADLINE, first.receive(2)).await??;
    anyhow::ensure!(!held.is_empty(), "the active receiver got deliveries");
    let mut standby = b.subscribe_receiver(&topic, "inventory", 0, 10).await?;
    // Its unsettled deliveries go back as it closes; the standby takes over.
    first.close().await;
    let mut seqs = Vec::new();
    while seqs.len() < 6 {
        for d in tokio::time::timeout(DEADLINE, standby.receive(10)).await?? {
            let envelope = d.message.map_err(|e| anyhow::anyhow!("{}", e.reason))?;
            let event: Bumped = whizbang::message::decode(&envelope.payload)?;
            seqs.push(event.seq);
            standby
                .settle(d.tag, whizbang::transport::Settlement::Accept)
                .await?;
        }
    }
    anyhow::ensure!(
        seqs == (1..=6).collect::<Vec<_>>(),
        "the standby received {seqs:?}"
    );
    standby.close().await;
    Ok(())
}
