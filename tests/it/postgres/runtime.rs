//! The whole runtime on the Postgres store (`store.backend = "postgres"`) with the in-process
//! transport, against the real server (`WHIZBANG_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`):
//!
//! - the order scenario: read-your-writes, send + status, every event applied once in order;
//! - two instances of one service sharing a schema;
//! - lease takeover after an instance dies holding work, and at once after a graceful shutdown;
//! - connections killed under load (`pg_terminate_backend`): the runtime recovers by itself;
//! - takeover after a crash within a heartbeat under the default 300 s lease: a child process
//!   (this test binary run again, `crash_child`) SIGKILLed with work in flight, through its
//!   liveness lock; and an instance whose lock connection is terminated takes the lock again.
//!
//! Every check is made against what the store holds: for each stream, the message ids applied
//! by a perspective must equal the message ids stored, in version order — exactly once each, in
//! order. Each test uses its own schemas (`t_<uuid>`), so tests run in parallel; an unreachable
//! server fails the test.

use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::{self, DEADLINE, captured_logs, config, on_bus, subscribed};
use actix::System;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::Client;
use uuid::Uuid;
use whizbang::envelope::Envelope;
use whizbang::routing::partition_of;
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::transport::{Subscription, Transport, TransportError};
use whizbang::{
    Command, Config, Decision, DispatchError, DispatchOptions, Event, EventMeta, Message,
    Perspective, PerspectiveError, ReceiptStatus, Receptor, ReceptorContext, ReceptorError,
    Runtime,
};

const TOPIC: &str = "pg-bumps";
const SUBSCRIPTION: &str = "downstream";

// ---- the database -------------------------------------------------------------------------

/// A client of the test database, with the runtime's logs going to the shared capture
/// (`RUST_LOG=whizbang=debug` and `WHIZBANG_TEST_SHOW_LOGS=1` to see them).
async fn connect() -> Client {
    captured_logs();
    pg::connect().await
}

/// Drops the test's schemas once it has passed; a failure to drop does not fail the test.
async fn drop_schemas(schemas: &[&str]) {
    let _ = pg::drop_schemas(schemas).await;
}

/// Events as stored, per stream, in version order: (version, message id, event).
type Stored = BTreeMap<String, Vec<(i64, Uuid, Bumped)>>;

async fn stored_events(client: &Client, schema: &str) -> Stored {
    let rows = client
        .query(
            &format!(
                "SELECT stream_id, version, message_id, payload FROM {schema}.wb_events
                  ORDER BY stream_id, version"
            ),
            &[],
        )
        .await
        .expect("read wb_events");
    let mut out = Stored::new();
    for row in rows {
        let payload: Vec<u8> = row.get(3);
        let event: Bumped = whizbang::message::decode(&payload).expect("decode a stored event");
        out.entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2), event));
    }
    out
}

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Rows still in the outbox and inbox of `schema`.
async fn queued(client: &Client, schema: &str) -> (i64, i64) {
    (
        count(client, &format!("SELECT count(*) FROM {schema}.wb_outbox")).await,
        count(client, &format!("SELECT count(*) FROM {schema}.wb_inbox")).await,
    )
}

/// Evaluates `$check` (an expression that may `.await`) until it is `None`; fails after
/// `$deadline` with the last state it described (`Some(state)`).
macro_rules! wait_for {
    ($what:expr, $deadline:expr, $check:expr) => {{
        let start = Instant::now();
        loop {
            let state: Option<String> = $check;
            match state {
                None => break,
                Some(state) if start.elapsed() > $deadline => panic!(
                    "timed out after {:?} waiting for {}; last state: {state}",
                    $deadline, $what
                ),
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }};
}

// ---- messages and handlers ----------------------------------------------------------------

/// Asks for one `Bumped` on `stream`. `token` is unique per attempt, so a retried call can be
/// told apart from the original.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Bump {
    stream: String,
    seq: u32,
    token: Uuid,
}

impl Message for Bump {
    const TYPE_NAME: &'static str = "pgtest.Bump";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Bump {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Bumped {
    stream: String,
    seq: u32,
    token: Uuid,
}

impl Message for Bumped {
    const TYPE_NAME: &'static str = "pgtest.Bumped";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Bumped {}

fn bump(stream: &str, seq: u32) -> Bump {
    Bump {
        stream: stream.into(),
        seq,
        token: Uuid::now_v7(),
    }
}

fn bumped(stream: &str, seq: u32) -> Bumped {
    Bumped {
        stream: stream.into(),
        seq,
        token: Uuid::now_v7(),
    }
}

struct BumpReceptor;

impl Receptor<Bump> for BumpReceptor {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Bump,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        Ok(Decision::event(Bumped {
            stream: cmd.stream,
            seq: cmd.seq,
            token: cmd.token,
        }))
    }
}

#[derive(Default)]
struct RecorderState {
    /// Per stream, the message ids in the order they were applied.
    by_stream: HashMap<String, Vec<Uuid>>,
    /// Applications per instance tag.
    by_tag: HashMap<&'static str, usize>,
    total: usize,
    /// Wall-clock time of the first application.
    first: Option<SystemTime>,
}

/// Records every event it applies. Clones share the record; `tagged` clones also count which
/// instance applied what.
#[derive(Clone, Default)]
struct Recorder {
    state: Arc<Mutex<RecorderState>>,
    tag: &'static str,
}

impl Recorder {
    fn tagged(&self, tag: &'static str) -> Recorder {
        Recorder {
            state: self.state.clone(),
            tag,
        }
    }

    fn total(&self) -> usize {
        self.state.lock().unwrap().total
    }

    fn stream(&self, stream: &str) -> Vec<Uuid> {
        self.state
            .lock()
            .unwrap()
            .by_stream
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }

    fn first(&self) -> Option<SystemTime> {
        self.state.lock().unwrap().first
    }

    fn by_tag(&self, tag: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .by_tag
            .get(tag)
            .copied()
            .unwrap_or(0)
    }
}

impl Perspective<Bumped> for Recorder {
    async fn apply(&self, _event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut st = self.state.lock().unwrap();
        st.first.get_or_insert_with(SystemTime::now);
        st.total += 1;
        *st.by_tag.entry(self.tag).or_default() += 1;
        st.by_stream
            .entry(meta.stream_id)
            .or_default()
            .push(meta.message_id);
        Ok(())
    }
}

/// A perspective that never finishes: its instance holds the row (and everything queued
/// behind it in the partition) in flight for ever.
#[derive(Clone, Default)]
struct Blocker {
    entered: Arc<AtomicUsize>,
}

impl Perspective<Bumped> for Blocker {
    async fn apply(&self, _event: Bumped, _meta: EventMeta) -> Result<(), PerspectiveError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        futures::future::pending::<()>().await;
        Ok(())
    }
}

/// A transport whose sends are never accepted: outbox rows stay in flight.
struct HangingTransport {
    inner: MemoryTransport,
    attempts: Arc<AtomicUsize>,
}

#[async_trait]
impl Transport for HangingTransport {
    async fn publish(&self, _topic: &str, _envelope: &Envelope) -> Result<(), TransportError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        futures::future::pending::<()>().await;
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        self.inner.subscribe(topic, subscription, prefetch).await
    }

    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError> {
        self.inner.check_topology(topics, subscriptions).await
    }
}

// ---- configuration and runtimes -------------------------------------------------------------

/// A Postgres-backed configuration of `service` in `schema`.
fn pg_config(service: &str, schema: &str) -> Config {
    let mut c = on_postgres(config(service), schema);
    c.store.startup_timeout_ms = 15_000;
    c
}

fn publishing(c: Config) -> Config {
    support::publishing(c, Bumped::TYPE_NAME, TOPIC)
}

/// A service in its own schema consuming `TOPIC`, recording into `remote`.
async fn downstream(bus: &Arc<MemoryBus>, schema: &str, remote: &Recorder) -> Runtime {
    let c = pg_config(&format!("downstream-{}", Uuid::now_v7().simple()), schema);
    on_bus(subscribed(c, TOPIC, SUBSCRIPTION), bus)
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await
        .expect("start the downstream service")
}

/// Fails unless, for every stored stream, `recorder` applied exactly the stored message ids in
/// version order (and nothing else).
fn assert_applied_once_in_order(who: &str, stored: &Stored, recorder: &Recorder) {
    let mut expected_total = 0;
    for (stream, events) in stored {
        let ids: Vec<Uuid> = events.iter().map(|(_, id, _)| *id).collect();
        expected_total += ids.len();
        let applied = recorder.stream(stream);
        if applied != ids {
            let dups = applied.len()
                - applied
                    .iter()
                    .collect::<std::collections::HashSet<_>>()
                    .len();
            panic!(
                "{who}: stream {stream}: applied {} events ({dups} duplicates), stored {}; \
                 applied {applied:?}, stored {ids:?}",
                applied.len(),
                ids.len()
            );
        }
    }
    assert_eq!(
        recorder.total(),
        expected_total,
        "{who}: applied events that are not stored"
    );
}

/// Versions 1..n per stream, and (for streams written one call after another) seq order.
fn assert_versions_follow_seq(stored: &Stored) {
    for (stream, events) in stored {
        for (i, (version, _, event)) in events.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1, "stream {stream}: gapless versions");
            assert_eq!(
                event.seq,
                i as u32 + 1,
                "stream {stream}: stored in seq order"
            );
        }
    }
}

// ---- (a) the order scenario -------------------------------------------------------------------

#[actix_rt::test]
async fn order_scenario_on_postgres() {
    let _pg = pg::slot().await;
    const STREAMS: usize = 200;
    const EVENTS: u32 = 10;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let local = Recorder::default();
    let rt = on_bus(
        publishing(pg_config(
            &format!("orders-{}", Uuid::now_v7().simple()),
            &schema,
        )),
        &bus,
    )
    .receptor::<Bump, _>(BumpReceptor)
    .perspective::<Bumped, _>("summary", local.clone())
    .start()
    .await
    .expect("start on postgres");
    let started = Instant::now();

    // 1. local_invoke: the perspective has run when the call returns.
    for i in 0..20 {
        let stream = format!("ryw-{i}");
        let cmd = bump(&stream, 1);
        let token = cmd.token;
        let result: Bumped = rt.local_invoke(cmd).await.expect("local_invoke");
        assert_eq!((result.seq, result.token), (1, token));
        let applied = local.stream(&stream);
        assert_eq!(
            applied.len(),
            1,
            "read-your-writes: applied when the call returns"
        );
        let stored = rt.store().read_stream(&stream, 1).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].envelope.message_id, applied[0]);
    }

    // 2. send: a receipt once committed, then status by correlation id.
    let receipt = rt.send(bump("sent-1", 1)).await.expect("send");
    assert_eq!(receipt.status, ReceiptStatus::Delivered);
    assert_eq!(receipt.events.len(), 1);
    assert_eq!(
        (
            receipt.events[0].stream_id.as_str(),
            receipt.events[0].version
        ),
        ("sent-1", 1)
    );
    let mut last: Option<whizbang::store::CorrelationStatus>;
    wait_for!("the sent command's perspectives and publish", DEADLINE, {
        let status = rt.status(receipt.correlation_id).await.expect("status");
        let done = status.inbox_processed == 1
            && status.inbox_pending == 0
            && status.outbox_pending == 0
            && status.dead_lettered == 0;
        last = Some(status.clone());
        (!done).then(|| format!("{status:?}"))
    });
    let status = last.unwrap();
    assert_eq!(
        status.events,
        vec![(Bumped::TYPE_NAME.to_string(), "sent-1".to_string(), 1)]
    );
    wait_for!("the downstream service to apply it", DEADLINE, {
        (remote.stream("sent-1").len() != 1).then(|| format!("{:?}", remote.stream("sent-1")))
    });
    assert_eq!(remote.stream("sent-1"), vec![receipt.events[0].message_id]);

    // 3. Many streams at once, each one call after another.
    let load = Instant::now();
    let calls = (0..STREAMS).map(|s| {
        let rt = &rt;
        async move {
            let stream = format!("order-{s}");
            for seq in 1..=EVENTS {
                let r = rt.send(bump(&stream, seq)).await.expect("send");
                assert_eq!(r.events[0].version, u64::from(seq));
            }
        }
    });
    futures::future::join_all(calls).await;
    let sent = load.elapsed();
    let expected = 20 + 1 + STREAMS * EVENTS as usize;
    wait_for!("every event applied here and downstream", DEADLINE, {
        let (o, i) = queued(&client, &schema).await;
        let (_, di) = queued(&client, &down_schema).await;
        let done = local.total() >= expected && remote.total() >= expected && o + i + di == 0;
        (!done).then(|| {
            format!(
                "local {} remote {} of {expected}; outbox {o} inbox {i} downstream inbox {di}",
                local.total(),
                remote.total()
            )
        })
    });
    let stored = stored_events(&client, &schema).await;
    assert_eq!(stored.values().map(Vec::len).sum::<usize>(), expected);
    assert_versions_follow_seq(&stored);
    assert_applied_once_in_order("local perspective", &stored, &local);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    eprintln!(
        "order scenario: {} sends in {sent:?}, all applied after {:?}",
        STREAMS * EVENTS as usize,
        load.elapsed()
    );

    rt.shutdown().await.expect("shutdown");
    down.shutdown().await.expect("shutdown");
    let leases = count(
        &client,
        &format!("SELECT count(*) FROM {schema}.wb_partition_leases WHERE instance_id IS NOT NULL"),
    )
    .await;
    assert_eq!(leases, 0, "shutdown released every lease");
    eprintln!("order scenario total {:?}", started.elapsed());
    drop_schemas(&[&schema, &down_schema]).await;
}

// ---- (b) two instances sharing a schema --------------------------------------------------------

#[actix_rt::test]
async fn two_instances_share_one_schema() {
    let _pg = pg::slot().await;
    const STREAMS: usize = 100;
    const EVENTS: u32 = 10;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let local = Recorder::default();
    let config = publishing(pg_config(
        &format!("shared-{}", Uuid::now_v7().simple()),
        &schema,
    ));
    let start = |tag: &'static str| {
        on_bus(config.clone(), &bus)
            .instance_id(Uuid::now_v7())
            .receptor::<Bump, _>(BumpReceptor)
            .perspective::<Bumped, _>("summary", local.tagged(tag))
            .start()
    };
    let a = start("a").await.expect("start instance a");
    let b = start("b").await.expect("start instance b");
    assert_ne!(a.instance_id(), b.instance_id());

    // Each stream's calls alternate between the instances, one after another.
    let began = Instant::now();
    let calls = (0..STREAMS).map(|s| {
        let (a, b) = (&a, &b);
        async move {
            let stream = format!("shared-{s}");
            for seq in 1..=EVENTS {
                let rt = if (s + seq as usize).is_multiple_of(2) {
                    a
                } else {
                    b
                };
                let r = rt.send(bump(&stream, seq)).await.expect("send");
                assert_eq!(r.events[0].version, u64::from(seq));
            }
        }
    });
    futures::future::join_all(calls).await;
    let expected = STREAMS * EVENTS as usize;
    wait_for!("every event applied once", DEADLINE, {
        let (o, i) = queued(&client, &schema).await;
        let (_, di) = queued(&client, &down_schema).await;
        let done = local.total() >= expected && remote.total() >= expected && o + i + di == 0;
        (!done).then(|| {
            format!(
                "local {} (a {}, b {}) remote {} of {expected}; outbox {o} inbox {i} downstream inbox {di}",
                local.total(),
                local.by_tag("a"),
                local.by_tag("b"),
                remote.total()
            )
        })
    });
    let stored = stored_events(&client, &schema).await;
    assert_eq!(stored.len(), STREAMS);
    assert_versions_follow_seq(&stored);
    assert_applied_once_in_order("local perspective (both instances)", &stored, &local);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    eprintln!(
        "two instances: {expected} events in {:?}; applied by a {}, by b {}",
        began.elapsed(),
        local.by_tag("a"),
        local.by_tag("b")
    );
    assert!(
        local.by_tag("a") > 0 && local.by_tag("b") > 0,
        "both instances did work"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    down.shutdown().await.unwrap();
    drop_schemas(&[&schema, &down_schema]).await;
}

/// Fails every event of a stream whose name starts with `poison`.
struct FailsPoison;

impl Perspective<Bumped> for FailsPoison {
    async fn apply(&self, event: Bumped, _meta: EventMeta) -> Result<(), PerspectiveError> {
        if event.stream.starts_with("poison") {
            return Err(PerspectiveError("poisoned read model".into()));
        }
        Ok(())
    }
}

/// A `local_invoke` whose event another instance processes (that instance holds the partition)
/// and dead-letters is answered with the dead-letter error and the perspective's last error,
/// not left to wait out its deadline.
#[actix_rt::test]
async fn a_waiter_for_a_row_another_instance_dead_letters_gets_the_dead_letter_error() {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let mut config = pg_config(&format!("dead-wait-{}", Uuid::now_v7().simple()), &schema);
    config.partitions.partition_count = 2;
    config.partitions.lease_seconds = 120;
    config.store.max_attempts = 4;
    config.store.backoff_base_ms = 200;
    config.store.backoff_max_ms = 400;
    config.coordinator.poll_interval_ms = 50;
    let bus = MemoryBus::new();
    let start = |id: Uuid| {
        on_bus(config.clone(), &bus)
            .instance_id(id)
            .receptor::<Bump, _>(BumpReceptor)
            .perspective::<Bumped, _>("summary", FailsPoison)
            .start()
    };
    // Two poisoned streams of one partition: the holder's first row keeps the partition busy
    // (retrying), so the second instance cannot lease it and waits for the holder's work.
    let partition = partition_of("poison-0", 2);
    let second = (1..)
        .map(|i| format!("poison-{i}"))
        .find(|s| partition_of(s, 2) == partition)
        .unwrap();
    let holder = start(Uuid::now_v7()).await.expect("start the holder");
    holder.send(bump("poison-0", 1)).await.expect("send");
    let client = connect().await;
    wait_for!("the holder to lease the partition", DEADLINE, {
        let held = count(
            &client,
            &format!(
                "SELECT count(*) FROM {schema}.wb_partition_leases WHERE partition = {partition} \
                 AND instance_id = '{}'",
                holder.instance_id()
            ),
        )
        .await;
        (held != 1).then(|| format!("leases of the holder on {partition}: {held}"))
    });
    let waiter = start(Uuid::now_v7()).await.expect("start the waiter");
    let began = Instant::now();
    let options = DispatchOptions {
        deadline: Some(Duration::from_secs(30)),
        ..DispatchOptions::default()
    };
    let answer = waiter
        .local_invoke_with::<Bump, Bumped>(bump(&second, 1), options)
        .await;
    match answer {
        Err(DispatchError::PerspectiveFailed { error, .. }) => {
            assert!(error.contains("dead-lettered"), "{error}");
            assert!(error.contains("poisoned read model"), "{error}");
        }
        other => panic!("expected the dead-letter error, got {other:?}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "answered when dead-lettered, not at the deadline: {:?}",
        began.elapsed()
    );
    let applied_by_waiter = count(
        &client,
        &format!("SELECT count(*) FROM {schema}.wb_partition_leases WHERE instance_id = '{}' AND partition = {partition}", waiter.instance_id()),
    )
    .await;
    assert_eq!(applied_by_waiter, 0, "the row was the holder's to process");
    waiter.shutdown().await.unwrap();
    holder.shutdown().await.unwrap();
    drop_schemas(&[&schema]).await;
}

// ---- (c) takeover ----------------------------------------------------------------------------

/// Publishes `streams` × `events` through `rt`, one after another per stream.
async fn publish_all(rt: &Runtime, streams: &[String], events: u32) -> Result<(), String> {
    for stream in streams {
        for seq in 1..=events {
            rt.publish(bumped(stream, seq))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Waits until instance `instance` holds every row of `schema` in flight: inbox rows in its
/// (blocked) partitions and outbox rows in its (hanging) publisher.
async fn wait_all_claimed_by(client: &Client, schema: &str, instance: Uuid, rows: i64) {
    wait_for!(
        "the first instance to hold every row in flight",
        DEADLINE,
        {
            let sql = |table: &str| {
                format!("SELECT count(*) FROM {schema}.{table} WHERE claimed_by = '{instance}'")
            };
            let (o, i) = (
                count(client, &sql("wb_outbox")).await,
                count(client, &sql("wb_inbox")).await,
            );
            (o != rows || i != rows).then(|| format!("outbox {o}, inbox {i} of {rows} claimed"))
        }
    );
}

#[actix_rt::test]
async fn takeover_after_an_instance_dies_with_work_in_flight() {
    let _pg = pg::slot().await;
    const STREAMS: usize = 20;
    const EVENTS: u32 = 5;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let mut config = publishing(pg_config(
        &format!("takeover-{}", Uuid::now_v7().simple()),
        &schema,
    ));
    config.partitions.lease_seconds = 2;
    config.partitions.heartbeat_seconds = 1;
    let streams: Vec<String> = (0..STREAMS).map(|s| format!("take-{s}")).collect();

    // Instance A, in its own actix system on its own thread: its perspective blocks and its
    // sends hang, so everything it claims stays in flight.
    let a_id = Uuid::now_v7();
    let blocker = Blocker::default();
    let hung = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<System, String>>();
    let thread = {
        let (config, bus, streams, blocker, hung) = (
            config.clone(),
            bus.clone(),
            streams.clone(),
            blocker.clone(),
            hung.clone(),
        );
        std::thread::spawn(move || {
            let system = System::new();
            let started = system.block_on(async move {
                let rt = Runtime::builder(config)
                    .instance_id(a_id)
                    .transport(Arc::new(HangingTransport {
                        inner: MemoryTransport::new(bus),
                        attempts: hung,
                    }))
                    .perspective::<Bumped, _>("summary", blocker)
                    .start()
                    .await
                    .map_err(|e| e.to_string())?;
                publish_all(&rt, &streams, EVENTS).await?;
                Ok::<_, String>((rt, System::current()))
            });
            match started {
                Ok((rt, handle)) => {
                    let _ = ready_tx.send(Ok(handle));
                    // Runs A's actors until the test stops the system, abruptly: no shutdown,
                    // no lease release.
                    let _ = system.run();
                    drop(rt);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
    };
    let a_system = ready_rx
        .await
        .expect("instance a's thread")
        .expect("instance a started and published");
    let rows = (STREAMS * EVENTS as usize) as i64;
    wait_all_claimed_by(&client, &schema, a_id, rows).await;
    assert!(blocker.entered.load(Ordering::SeqCst) > 0);
    assert!(hung.load(Ordering::SeqCst) > 0);
    let live_leases = count(
        &client,
        &format!(
            "SELECT count(*) FROM {schema}.wb_partition_leases
              WHERE instance_id = '{a_id}' AND expires_at > now()"
        ),
    )
    .await;
    assert!(live_leases > 0, "a holds live leases when it dies");
    // The earliest A's leases can expire (its heartbeats may only push them later).
    let a_expiry: SystemTime = client
        .query_one(
            &format!(
                "SELECT min(expires_at) FROM {schema}.wb_partition_leases WHERE instance_id = '{a_id}'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // A dies.
    let died = Instant::now();
    a_system.stop();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap()
        .expect("instance a's thread ends");

    // B takes the partitions over once A's leases expire, and processes everything in order.
    let local = Recorder::default();
    let b = on_bus(config.clone(), &bus)
        .instance_id(Uuid::now_v7())
        .perspective::<Bumped, _>("summary", local.clone())
        .start()
        .await
        .expect("start instance b");
    let expected = rows as usize;
    wait_for!("instance b to finish a's work", DEADLINE, {
        let (o, i) = queued(&client, &schema).await;
        let (_, di) = queued(&client, &down_schema).await;
        let done = local.total() >= expected && remote.total() >= expected && o + i + di == 0;
        (!done).then(|| {
            format!(
                "local {} remote {} of {expected}; outbox {o} inbox {i} downstream inbox {di}",
                local.total(),
                remote.total()
            )
        })
    });
    eprintln!(
        "takeover: b finished a's work {:?} after a died",
        died.elapsed()
    );
    // Same host, same clock as the database: B applied nothing while A's leases were live.
    let first = local.first().expect("b applied events");
    assert!(
        first >= a_expiry,
        "b applied an event {:?} before a's lease expired",
        a_expiry.duration_since(first).unwrap_or_default()
    );
    let stored = stored_events(&client, &schema).await;
    assert_eq!(stored.len(), STREAMS);
    assert_versions_follow_seq(&stored);
    assert_applied_once_in_order("instance b's perspective", &stored, &local);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    let reclaimed = count(
        &client,
        &format!("SELECT count(*) FROM {schema}.wb_partition_leases WHERE generation < 2"),
    )
    .await;
    assert_eq!(
        reclaimed, 0,
        "every partition changed hands (fencing token bumped)"
    );
    b.shutdown().await.unwrap();
    down.shutdown().await.unwrap();
    drop_schemas(&[&schema, &down_schema]).await;
}

#[actix_rt::test]
async fn graceful_shutdown_releases_leases_at_once() {
    let _pg = pg::slot().await;
    const STREAMS: usize = 20;
    const EVENTS: u32 = 5;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let mut config = publishing(pg_config(
        &format!("graceful-{}", Uuid::now_v7().simple()),
        &schema,
    ));
    // Long leases: if B gets the partitions quickly, it is because A gave them back.
    config.partitions.lease_seconds = 120;
    config.partitions.heartbeat_seconds = 10;
    // A's perspective and transport hang: its shutdown stops them at the deadline and still
    // releases the leases.
    config.runtime.shutdown_timeout_ms = 1_500;
    let streams: Vec<String> = (0..STREAMS).map(|s| format!("grace-{s}")).collect();

    let a_id = Uuid::now_v7();
    let blocker = Blocker::default();
    let a = Runtime::builder(config.clone())
        .instance_id(a_id)
        .transport(Arc::new(HangingTransport {
            inner: MemoryTransport::new(bus.clone()),
            attempts: Arc::new(AtomicUsize::new(0)),
        }))
        .perspective::<Bumped, _>("summary", blocker.clone())
        .start()
        .await
        .expect("start instance a");
    publish_all(&a, &streams, EVENTS).await.expect("publish");
    let rows = (STREAMS * EVENTS as usize) as i64;
    wait_all_claimed_by(&client, &schema, a_id, rows).await;

    a.shutdown().await.expect("graceful shutdown");
    let held = count(
        &client,
        &format!("SELECT count(*) FROM {schema}.wb_partition_leases WHERE instance_id = '{a_id}'"),
    )
    .await;
    assert_eq!(held, 0, "shutdown released every lease before returning");

    let released = Instant::now();
    let local = Recorder::default();
    let b = on_bus(config.clone(), &bus)
        .instance_id(Uuid::now_v7())
        .perspective::<Bumped, _>("summary", local.clone())
        .start()
        .await
        .expect("start instance b");
    let expected = rows as usize;
    // Well inside the 120 s lease.
    wait_for!(
        "instance b to take over at once",
        Duration::from_secs(30),
        {
            let (o, i) = queued(&client, &schema).await;
            let (_, di) = queued(&client, &down_schema).await;
            let done = local.total() >= expected && remote.total() >= expected && o + i + di == 0;
            (!done).then(|| {
                format!(
                    "local {} remote {} of {expected}; outbox {o} inbox {i} downstream inbox {di}",
                    local.total(),
                    remote.total()
                )
            })
        }
    );
    eprintln!(
        "graceful: b finished a's work {:?} after a shut down",
        released.elapsed()
    );
    let stored = stored_events(&client, &schema).await;
    assert_versions_follow_seq(&stored);
    assert_applied_once_in_order("instance b's perspective", &stored, &local);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    b.shutdown().await.unwrap();
    down.shutdown().await.unwrap();
    drop_schemas(&[&schema, &down_schema]).await;
}

// ---- (d) connections killed under load ---------------------------------------------------------

#[actix_rt::test]
async fn connections_killed_mid_run_recover_without_loss_or_duplicates() {
    let _pg = pg::slot().await;
    const STREAMS: usize = 40;
    const EVENTS: u32 = 25;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let service = format!("killed-{}", Uuid::now_v7().simple());
    let down_service = down.config().service.name.clone();
    let local = Recorder::default();
    let rt = on_bus(publishing(pg_config(&service, &schema)), &bus)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("summary", local.clone())
        .start()
        .await
        .expect("start");

    // The killer: terminates every connection of both services, again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (stop, kills) = (stop.clone(), kills.clone());
        let names = vec![
            format!("whizbang:{service}"),
            format!("whizbang:{down_service}"),
        ];
        tokio::spawn(async move {
            let client = connect().await;
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let n = client
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
                        &[&names],
                    )
                    .await
                    .expect("pg_terminate_backend")
                    .len();
                kills.fetch_add(n, Ordering::SeqCst);
                round += 1;
                // Irregular gaps, so kills land in every phase of a batch.
                tokio::time::sleep(Duration::from_millis(30 + (round * 37) % 170)).await;
            }
        })
    };

    let successes = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let retries = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let calls = (0..STREAMS).map(|s| {
        let (rt, successes, retries) = (&rt, successes.clone(), retries.clone());
        async move {
            let stream = format!("kill-{s}");
            for seq in 1..=EVENTS {
                let call_started = Instant::now();
                loop {
                    let cmd = bump(&stream, seq);
                    let token = cmd.token;
                    match rt.local_invoke::<Bump, Bumped>(cmd).await {
                        Ok(result) => {
                            assert_eq!(result.token, token);
                            successes.lock().unwrap().push(token);
                            break;
                        }
                        Err(e) if e.is_retryable() => {
                            retries.fetch_add(1, Ordering::SeqCst);
                            assert!(
                                call_started.elapsed() < DEADLINE,
                                "stream {stream} seq {seq}: still failing after {DEADLINE:?}: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("stream {stream} seq {seq}: not retryable: {e:?}"),
                    }
                }
            }
        }
    });
    futures::future::join_all(calls).await;
    stop.store(true, Ordering::SeqCst);
    killer.await.unwrap();
    let kills = kills.load(Ordering::SeqCst);
    let retries = retries.load(Ordering::SeqCst);
    eprintln!(
        "killed {kills} connections during {:?}; {retries} retried calls",
        began.elapsed()
    );
    assert!(kills > 0, "the killer found connections to kill");

    // Everything stored is applied, here and downstream, exactly once and in order.
    wait_for!("every stored event applied once", DEADLINE, {
        let stored: usize = stored_events(&client, &schema)
            .await
            .values()
            .map(Vec::len)
            .sum();
        let (o, i) = queued(&client, &schema).await;
        let (_, di) = queued(&client, &down_schema).await;
        let done = local.total() >= stored && remote.total() >= stored && o + i + di == 0;
        (!done).then(|| {
            format!(
                "local {} remote {} of {stored} stored; outbox {o} inbox {i} downstream inbox {di}",
                local.total(),
                remote.total()
            )
        })
    });
    let stored = stored_events(&client, &schema).await;
    let mut tokens: HashMap<Uuid, usize> = HashMap::new();
    for events in stored.values() {
        for (_, _, e) in events {
            *tokens.entry(e.token).or_default() += 1;
        }
    }
    assert!(
        tokens.values().all(|n| *n == 1),
        "no command attempt stored twice"
    );
    let successes = successes.lock().unwrap().clone();
    assert_eq!(successes.len(), STREAMS * EVENTS as usize);
    for token in &successes {
        assert_eq!(
            tokens.get(token),
            Some(&1),
            "the event of successful call {token} is stored exactly once"
        );
    }
    // Versions are gapless; events of failed-but-committed attempts may sit between the
    // successful ones, so seq order is not checked here.
    for (stream, events) in &stored {
        for (i, (version, _, _)) in events.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1, "stream {stream}: gapless versions");
        }
    }
    assert_applied_once_in_order("local perspective", &stored, &local);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    eprintln!(
        "{} stored ({} from failed attempts that had committed)",
        tokens.len(),
        tokens.len() - successes.len()
    );
    rt.shutdown().await.unwrap();
    down.shutdown().await.unwrap();
    drop_schemas(&[&schema, &down_schema]).await;
}

// ---- (e) takeover after a crash, by the liveness lock ------------------------------------------

/// Environment of the child process of [`a_killed_process_is_taken_over_within_a_heartbeat`]:
/// the schema and service it runs in. Without them [`crash_child`] does nothing.
const CRASH_SCHEMA: &str = "WHIZBANG_TEST_CRASH_SCHEMA";
const CRASH_SERVICE: &str = "WHIZBANG_TEST_CRASH_SERVICE";
/// The child's test, as the parent runs it from this test binary.
const CRASH_CHILD: &str = "postgres::runtime::crash_child";
/// What the child prints once it has written its work: this, then its instance id.
const CRASH_READY: &str = "crash-child-ready";
const CRASH_STREAMS: usize = 10;
const CRASH_EVENTS: u32 = 6;
/// Events of each stream the child applies (and completes) before it blocks.
const CRASH_DONE: u32 = 2;

/// The configuration of both the child and the instance that survives it: the default 300 s
/// lease, a heartbeat every second.
fn crash_config(service: &str, schema: &str) -> Config {
    let mut c = publishing(pg_config(service, schema));
    c.partitions.heartbeat_seconds = 1;
    c.store.pool_size = 4;
    assert_eq!(c.partitions.lease_seconds, 300, "the default lease");
    c
}

/// The child's perspective: applies the first [`CRASH_DONE`] events of each stream, then blocks
/// for ever, so the rest of each stream stays in flight.
#[derive(Clone)]
struct BlocksAfterDone;

impl Perspective<Bumped> for BlocksAfterDone {
    async fn apply(&self, event: Bumped, _meta: EventMeta) -> Result<(), PerspectiveError> {
        if event.seq > CRASH_DONE {
            futures::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// The child process (run only by the parent test, through the environment above): an instance
/// whose sends hang and whose perspective blocks after [`CRASH_DONE`] events per stream, so
/// that it holds leases with work in flight; it says so, then waits for its SIGKILL (or, should
/// the parent die first, the end of its standard input).
#[actix_rt::test]
#[ignore = "the child process of a_killed_process_is_taken_over_within_a_heartbeat, which runs it"]
async fn crash_child() {
    let (Ok(schema), Ok(service)) = (std::env::var(CRASH_SCHEMA), std::env::var(CRASH_SERVICE))
    else {
        return;
    };
    let rt = Runtime::builder(crash_config(&service, &schema))
        .transport(Arc::new(HangingTransport {
            inner: MemoryTransport::new(MemoryBus::new()),
            attempts: Arc::new(AtomicUsize::new(0)),
        }))
        .perspective::<Bumped, _>("summary", BlocksAfterDone)
        .start()
        .await
        .expect("the child starts");
    let streams: Vec<String> = (0..CRASH_STREAMS).map(|s| format!("crash-{s}")).collect();
    publish_all(&rt, &streams, CRASH_EVENTS)
        .await
        .expect("the child publishes");
    println!("{CRASH_READY} {}", rt.instance_id());
    let _ = tokio::task::spawn_blocking(|| {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    })
    .await;
    std::process::exit(1);
}

/// Kills the child when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process that dies (SIGKILL) holding leases of the default 300 s with work in flight: the
/// other instance resumes its partitions' work within a heartbeat + 2 s, through the dead
/// process's liveness lock, which went with its connections; nothing is lost, and nothing the
/// dead process had committed (its first events of each stream, applied and completed) is done
/// again. Every partition it held changed hands (the fencing token grew).
#[actix_rt::test]
async fn a_killed_process_is_taken_over_within_a_heartbeat() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let service = format!("crash-{}", Uuid::now_v7().simple());
    let config = crash_config(&service, &schema);
    let heartbeat = Duration::from_secs(config.partitions.heartbeat_seconds);

    // The survivor first, so that it holds its lock from before the child's.
    let local = Recorder::default();
    let survivor = on_bus(config.clone(), &bus)
        .perspective::<Bumped, _>("summary", local.clone())
        .start()
        .await
        .expect("start the survivor");

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([CRASH_CHILD, "--exact", "--ignored", "--nocapture"])
        .env(CRASH_SCHEMA, &schema)
        .env(CRASH_SERVICE, &service)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the child process");
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Uuid>();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix(CRASH_READY)
                && let (Some(tx), Ok(id)) = (ready.take(), id.trim().parse())
            {
                let _ = tx.send(id);
            }
        }
    });
    let dead = tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("the child writes its work in time")
        .expect("the child says it is ready");

    // Its work in flight: the first events of each stream applied and completed, the rest held
    // by its blocked perspective, every outbox row by its hanging sends.
    let in_flight = (CRASH_STREAMS * (CRASH_EVENTS - CRASH_DONE) as usize) as i64;
    let all = (CRASH_STREAMS * CRASH_EVENTS as usize) as i64;
    wait_for!("the child to hold its work in flight", DEADLINE, {
        let claimed = |table: &str| {
            format!("SELECT count(*) FROM {schema}.{table} WHERE claimed_by = '{dead}'")
        };
        let (o, i) = queued(&client, &schema).await;
        let (co, ci) = (
            count(&client, &claimed("wb_outbox")).await,
            count(&client, &claimed("wb_inbox")).await,
        );
        (o != all || co != all || i != in_flight || ci != in_flight).then(|| {
            format!("outbox {o} ({co} claimed) of {all}, inbox {i} ({ci} claimed) of {in_flight}")
        })
    });
    let held: Vec<(i32, i64)> = client
        .query(
            &format!(
                "SELECT partition, generation FROM {schema}.wb_partition_leases
                  WHERE instance_id = '{dead}' AND expires_at > now() + interval '200 seconds'"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!held.is_empty(), "the child holds long leases when it dies");

    // SIGKILL.
    child.0.kill().expect("SIGKILL the child");
    let killed = SystemTime::now();
    let killed_at = Instant::now();
    child.0.wait().unwrap();

    let expected_here = in_flight as usize;
    wait_for!(
        "the survivor to finish the dead process's work",
        DEADLINE,
        {
            let (o, i) = queued(&client, &schema).await;
            let (_, di) = queued(&client, &down_schema).await;
            let done =
                local.total() >= expected_here && remote.total() >= all as usize && o + i + di == 0;
            (!done).then(|| {
            format!(
                "local {} of {expected_here}, remote {} of {all}; outbox {o} inbox {i} downstream inbox {di}",
                local.total(),
                remote.total()
            )
        })
        }
    );
    let resumed = local
        .first()
        .expect("the survivor applied events")
        .duration_since(killed)
        .unwrap_or_default();
    eprintln!(
        "crash takeover: the survivor applied its first event {resumed:?} after the SIGKILL, \
         finished after {:?} (lease {} s, heartbeat {heartbeat:?})",
        killed_at.elapsed(),
        config.partitions.lease_seconds
    );
    assert!(
        resumed <= heartbeat + Duration::from_secs(2),
        "resumed {resumed:?} after the kill, bound heartbeat + 2 s"
    );

    let stored = stored_events(&client, &schema).await;
    assert_eq!(stored.len(), CRASH_STREAMS);
    assert_versions_follow_seq(&stored);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    // Here: exactly what the child had not completed, once each and in order.
    let not_done: Stored = stored
        .iter()
        .map(|(s, events)| (s.clone(), events[CRASH_DONE as usize..].to_vec()))
        .collect();
    assert_applied_once_in_order("the survivor's perspective", &not_done, &local);
    for (partition, generation) in held {
        let (holder, now): (Option<Uuid>, i64) = {
            let row = client
                .query_one(
                    &format!(
                        "SELECT instance_id, generation FROM {schema}.wb_partition_leases
                          WHERE partition = $1"
                    ),
                    &[&partition],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert!(
            now > generation && holder != Some(dead),
            "partition {partition}: generation {generation} -> {now}, held by {holder:?}"
        );
    }
    survivor.shutdown().await.unwrap();
    down.shutdown().await.unwrap();
    drop_schemas(&[&schema, &down_schema]).await;
}

/// The sessions holding `instance`'s liveness lock whose `application_name` is `name`.
async fn lock_sessions(client: &Client, schema: &str, instance: Uuid, name: &str) -> Vec<i32> {
    client
        .query(
            &format!(
                "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                  WHERE a.application_name = $2 AND l.locktype = 'advisory' AND l.granted
                    AND l.objsubid = 2 AND l.classid = {schema}.wb_liveness_class()::oid
                    AND l.objid = {schema}.wb_liveness_key($1)::oid"
            ),
            &[&instance, &name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// An instance whose dedicated lock connection is terminated (`pg_terminate_backend`, again and
/// again, while it works) takes its lock again on a new connection; meanwhile its LISTEN
/// connection holds it, so another instance heartbeating every 100 ms never finds it free and
/// takes nothing over: every event is applied once, in order, here and downstream.
#[actix_rt::test]
async fn an_instance_whose_lock_connection_is_terminated_takes_its_lock_again() {
    let _pg = pg::slot().await;
    const STREAMS: usize = 20;
    const EVENTS: u32 = 40;
    const TERMINATIONS: usize = 4;
    let client = connect().await;
    let (schema, down_schema) = (new_schema(), new_schema());
    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let down = downstream(&bus, &down_schema, &remote).await;
    let service = format!("relock-{}", Uuid::now_v7().simple());
    let lock_name = format!("whizbang:{service}:lock");

    // An eager judge: an instance of the same schema whose heartbeat runs every 100 ms and
    // that never claims (anything it took over would stay visible in the leases).
    let mut judge_config = pg_config("judge", &schema);
    judge_config.store.pool_size = 2;
    let judge_store: Arc<dyn whizbang::store::Store> = Arc::new(
        whizbang::store::postgres::PostgresStore::connect(&judge_config)
            .await
            .expect("the judge's store"),
    );
    let judge = Uuid::now_v7();
    judge_store
        .register_instance(judge, "judge", "host")
        .await
        .unwrap();

    let mut config = publishing(pg_config(&service, &schema));
    config.partitions.heartbeat_seconds = 1;
    let local = Recorder::default();
    let rt = on_bus(config, &bus)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("summary", local.clone())
        .start()
        .await
        .expect("start");
    let x = rt.instance_id();

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (stop, kills) = (stop.clone(), kills.clone());
        let (schema, lock_name) = (schema.clone(), lock_name.clone());
        let judge_store = judge_store.clone();
        tokio::spawn(async move {
            let client = connect().await;
            let mut terminated: Vec<i32> = Vec::new();
            let mut judged = 0usize;
            let mut next_kill = Instant::now() + Duration::from_millis(300);
            while !stop.load(Ordering::SeqCst) || terminated.len() < TERMINATIONS {
                judge_store
                    .heartbeat(judge)
                    .await
                    .expect("the judge's heartbeat");
                judged += 1;
                let expired = count(
                    &client,
                    &format!(
                        "SELECT count(*) FROM {schema}.wb_partition_leases
                          WHERE instance_id = '{x}' AND expires_at <= now()"
                    ),
                )
                .await;
                assert_eq!(expired, 0, "a lease of the live instance was expired");
                if terminated.len() < TERMINATIONS && Instant::now() >= next_kill {
                    let pids = lock_sessions(&client, &schema, x, &lock_name).await;
                    if let Some(&pid) = pids.iter().find(|p| !terminated.contains(p)) {
                        client
                            .execute("SELECT pg_terminate_backend($1)", &[&pid])
                            .await
                            .unwrap();
                        terminated.push(pid);
                        kills.fetch_add(1, Ordering::SeqCst);
                        next_kill = Instant::now() + Duration::from_millis(400);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (terminated, judged)
        })
    };

    let began = Instant::now();
    let calls = (0..STREAMS).map(|s| {
        let rt = &rt;
        async move {
            let stream = format!("relock-{s}");
            for seq in 1..=EVENTS {
                let cmd = bump(&stream, seq);
                let token = cmd.token;
                let result = rt
                    .local_invoke::<Bump, Bumped>(cmd)
                    .await
                    .unwrap_or_else(|e| panic!("stream {stream} seq {seq}: {e}"));
                assert_eq!(result.token, token);
                // Spread the calls over the terminations.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    futures::future::join_all(calls).await;
    stop.store(true, Ordering::SeqCst);
    let under_load = kills.load(Ordering::SeqCst);
    let (terminated, judged) = killer.await.unwrap();
    eprintln!(
        "terminated the lock connection {} times during {:?}; the judge heartbeat {judged} times",
        terminated.len(),
        began.elapsed()
    );
    assert_eq!(terminated.len(), TERMINATIONS);
    assert!(
        under_load >= 2,
        "only {under_load} terminations while the calls ran"
    );

    // The lock is held again by a new dedicated connection.
    wait_for!("the lock taken again on a new connection", DEADLINE, {
        let pids = lock_sessions(&client, &schema, x, &lock_name).await;
        (pids.len() != 1 || terminated.contains(&pids[0])).then(|| format!("{pids:?}"))
    });
    let recorded = count(
        &client,
        &format!(
            "SELECT count(*) FROM {schema}.wb_instances WHERE instance_id = '{x}' AND locked_at IS NOT NULL"
        ),
    )
    .await;
    assert_eq!(recorded, 1, "the instance is still judged by its lock");
    let judge_leases = count(
        &client,
        &format!("SELECT count(*) FROM {schema}.wb_partition_leases WHERE instance_id = '{judge}'"),
    )
    .await;
    assert_eq!(judge_leases, 0);

    let expected = STREAMS * EVENTS as usize;
    wait_for!("every event applied here and downstream", DEADLINE, {
        let (o, i) = queued(&client, &schema).await;
        let (_, di) = queued(&client, &down_schema).await;
        let done = local.total() >= expected && remote.total() >= expected && o + i + di == 0;
        (!done).then(|| {
            format!(
                "local {} remote {} of {expected}; outbox {o} inbox {i} downstream inbox {di}",
                local.total(),
                remote.total()
            )
        })
    });
    let stored = stored_events(&client, &schema).await;
    assert_eq!(stored.len(), STREAMS);
    assert_versions_follow_seq(&stored);
    assert_applied_once_in_order("local perspective", &stored, &local);
    assert_applied_once_in_order("downstream perspective", &stored, &remote);
    rt.shutdown().await.unwrap();
    down.shutdown().await.unwrap();
    judge_store.release_partitions(judge, None).await.unwrap();
    drop(judge_store);
    drop_schemas(&[&schema, &down_schema]).await;
}
