//! The store conformance suite: the same cases run against the in-memory store and the Postgres
//! store (each Postgres case in a schema of its own, so they run in parallel). A case that
//! cannot reach Postgres fails. A case that passes drops the schemas it opened; a failed one
//! leaves them to be looked at.

use crate::support::pg::{self, connect, database_url, drop_schemas, new_schema};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::envelope::{Envelope, MessageKind};
use whizbang::read_model::{ReadModelTx, Refused};
use whizbang::routing::partition_of;
use whizbang::store::memory::MemoryStore;
use whizbang::store::postgres::PostgresStore;
use whizbang::store::*;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Postgres,
    /// Postgres with every batch through the set-based `wb_process_work_batch`, none through
    /// `wb_process_one_message`: the two must keep the same contract.
    PostgresSetBased,
}

fn settings() -> StoreSettings {
    StoreSettings {
        partition_count: 16,
        max_partitions_per_instance: 16,
        lease: Duration::from_secs(30),
        max_attempts: 10,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        dedup_retention: Duration::from_secs(3600),
    }
}

async fn open(backend: Backend, s: StoreSettings) -> Arc<dyn Store> {
    match backend {
        Backend::Memory => Arc::new(MemoryStore::new(s)),
        Backend::Postgres => open_postgres(s).await.0,
        Backend::PostgresSetBased => open_postgres_with(s, false).await.0,
    }
}

/// A Postgres store in a schema of its own; also returns the schema's name.
async fn open_postgres(s: StoreSettings) -> (Arc<dyn Store>, String) {
    open_postgres_with(s, true).await
}

async fn open_postgres_with(s: StoreSettings, one_message_path: bool) -> (Arc<dyn Store>, String) {
    let mut c = whizbang::Config::default();
    c.store.backend = whizbang::config::StoreBackend::Postgres;
    c.store.database_url = database_url().into();
    c.store.schema = new_schema();
    c.store.startup_timeout_ms = 5_000;
    c.store.pool_size = 4;
    c.partitions.partition_count = s.partition_count;
    c.partitions.max_partitions_per_instance = s.max_partitions_per_instance;
    c.partitions.lease_seconds = s.lease.as_secs().max(2);
    c.partitions.heartbeat_seconds = 1;
    c.store.max_attempts = s.max_attempts;
    c.store.backoff_base_ms = s.backoff_base.as_millis() as u64;
    c.store.backoff_max_ms = s.backoff_max.as_millis() as u64;
    let store = PostgresStore::connect(&c)
        .await
        .expect("Postgres must be reachable for the conformance suite");
    // The config knob is whole seconds; the suite wants 1 s leases.
    let store = store
        .with_lease(s.lease)
        .with_dedup_retention(s.dedup_retention);
    let store = if one_message_path {
        store
    } else {
        store.without_one_message_path()
    };
    // Outside a case run by `conformance!` (no scope), the test drops its schema itself.
    let _ = OPENED.try_with(|opened| opened.borrow_mut().push(c.store.schema.clone()));
    (Arc::new(store), c.store.schema)
}

tokio::task_local! {
    /// The schemas the running case opened.
    static OPENED: std::cell::RefCell<Vec<String>>;
}

/// Runs one case; once it has passed, drops the schemas it opened.
async fn run_case(case: impl Future<Output = ()>) {
    let _pg = pg::slot().await;
    let opened = OPENED
        .scope(std::cell::RefCell::new(Vec::new()), async {
            case.await;
            OPENED.with(|opened| opened.take())
        })
        .await;
    if opened.is_empty() {
        return;
    }
    let opened: Vec<&str> = opened.iter().map(String::as_str).collect();
    drop_schemas(&opened)
        .await
        .expect("the case's schemas are dropped");
}

fn event(stream: &str, n: u8) -> Envelope {
    Envelope::new(MessageKind::Event, "Tick", stream.to_string(), vec![n])
}

fn part(stream: &str) -> u32 {
    partition_of(stream, settings().partition_count)
}

/// A unit appending `e`, with an outbox row (topic "t") and an inbox row.
fn unit(e: &Envelope, claim: bool) -> UnitOfWork {
    UnitOfWork {
        events: vec![e.clone()],
        outbox: vec![NewOutboxRow {
            envelope: e.clone(),
            topic: "t".into(),
            partition: part(&e.stream_id),
        }],
        inbox: vec![NewInboxRow {
            envelope: e.clone(),
            partition: part(&e.stream_id),
        }],
        claim_for_writer: claim,
        ..UnitOfWork::default()
    }
}

fn inbox_only(e: &Envelope, claim: bool) -> UnitOfWork {
    UnitOfWork {
        inbox: vec![NewInboxRow {
            envelope: e.clone(),
            partition: part(&e.stream_id),
        }],
        claim_for_writer: claim,
        ..UnitOfWork::default()
    }
}

async fn batch(store: &Arc<dyn Store>, instance: InstanceId, b: WorkBatch) -> WorkBatchResult {
    store.process_work_batch(instance, b).await.expect("batch")
}

fn units(units: Vec<UnitOfWork>) -> WorkBatch {
    WorkBatch {
        units,
        ..WorkBatch::default()
    }
}

fn claim_all() -> WorkBatch {
    WorkBatch {
        claim: Some(ClaimBudget {
            outbox: 1000,
            inbox: 1000,
        }),
        ..WorkBatch::default()
    }
}

fn committed(
    o: &UnitOutcome,
) -> (
    &Vec<AppendedEvent>,
    &Vec<OutboxWork>,
    &Vec<InboxWork>,
    &Vec<Uuid>,
) {
    match o {
        UnitOutcome::Committed {
            appended,
            claimed_outbox,
            claimed_inbox,
            duplicate_inbox,
        } => (appended, claimed_outbox, claimed_inbox, duplicate_inbox),
        UnitOutcome::Conflict { .. } | UnitOutcome::KeyTaken { .. } => {
            panic!("unexpected outcome: {o:?}")
        }
    }
}

/// `u` recording idempotency key `key` for a request hashing to `hash`, with `outcome`.
fn keyed(mut u: UnitOfWork, key: &str, hash: &[u8], outcome: &[u8]) -> UnitOfWork {
    u.idempotency = Some(NewIdempotencyRecord {
        key: key.into(),
        request_hash: hash.to_vec(),
        outcome: outcome.to_vec(),
    });
    u
}

fn key_taken(o: &UnitOutcome) -> &str {
    match o {
        UnitOutcome::KeyTaken { key } => key,
        other => panic!("expected the key taken, got {other:?}"),
    }
}

async fn instance(store: &Arc<dyn Store>) -> InstanceId {
    let id = Uuid::now_v7();
    store.register_instance(id, "svc", "host").await.unwrap();
    id
}

/// Claims, keeps the first inbox row and hands the others back (a processor that parks its
/// stream behind the head it is retrying).
async fn claim_head(store: &Arc<dyn Store>, a: InstanceId) -> Option<InboxWork> {
    let r = batch(store, a, claim_all()).await;
    let mut rows = r.claimed_inbox.into_iter();
    let head = rows.next();
    let rest: Vec<WorkRef> = rows.map(|w| w.work).collect();
    if !rest.is_empty() {
        batch(
            store,
            a,
            WorkBatch {
                inbox_releases: rest,
                ..WorkBatch::default()
            },
        )
        .await;
    }
    head
}

/// `c` claims until the outbox rows under a lease that is running out come its way.
async fn claim_after_expiry(store: &Arc<dyn Store>, c: InstanceId) -> WorkBatchResult {
    eventually(10, "takeover after expiry", || {
        let store = store.clone();
        async move {
            let r = batch(&store, c, claim_all()).await;
            (!r.claimed_outbox.is_empty()).then_some(r)
        }
    })
    .await
}

/// A batch completing every row `r` handed out.
fn completing(r: &WorkBatchResult) -> WorkBatch {
    WorkBatch {
        outbox_completions: r.claimed_outbox.iter().map(|w| w.work).collect(),
        inbox_completions: r.claimed_inbox.iter().map(|w| w.work).collect(),
        ..WorkBatch::default()
    }
}

/// A batch reporting one outbox row published.
fn completing_outbox(work: WorkRef) -> WorkBatch {
    WorkBatch {
        outbox_completions: vec![work],
        ..WorkBatch::default()
    }
}

/// The ids of the messages of `stream` among `envelopes`, in their order.
fn ids_on<'e>(stream: &str, envelopes: impl Iterator<Item = &'e Envelope>) -> Vec<Uuid> {
    envelopes
        .filter(|e| e.stream_id == stream)
        .map(|e| e.message_id)
        .collect()
}

/// Other stream names of `stream`'s partition.
fn streams_sharing_partition_with(stream: &str) -> impl Iterator<Item = String> + '_ {
    (0..)
        .map(move |i| format!("{stream}-{i}"))
        .filter(move |s| part(s) == part(stream))
}

/// Polls `f` until it yields `Some`, failing after `secs`.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------

async fn heartbeat_with_no_work(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let hb = store.heartbeat(a).await.unwrap();
    assert!(hb.live_instances >= 1);
    assert!(hb.held_partitions.is_empty());
    let r = batch(&store, a, WorkBatch::default()).await;
    assert!(r.units.is_empty() && r.stale.is_empty());
    let r = batch(&store, a, claim_all()).await;
    assert!(r.claimed_outbox.is_empty() && r.claimed_inbox.is_empty());
}

async fn versions_per_stream_and_positions(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (x1, y1, x2) = (event("x", 1), event("y", 1), event("x", 2));
    let r = batch(
        &store,
        a,
        units(vec![unit(&x1, true), unit(&y1, true), unit(&x2, true)]),
    )
    .await;
    let versions: Vec<(String, u64)> = r
        .units
        .iter()
        .flat_map(|u| {
            committed(u)
                .0
                .iter()
                .map(|e| (e.stream_id.clone(), e.version))
        })
        .collect();
    assert_eq!(
        versions,
        vec![("x".into(), 1), ("y".into(), 1), ("x".into(), 2)]
    );
    for n in 3..=5 {
        let e = event("x", n);
        let r = batch(&store, a, units(vec![unit(&e, false)])).await;
        assert_eq!(committed(&r.units[0]).0[0].version, n as u64);
    }
    let stream = store.read_stream("x", 1).await.unwrap();
    assert_eq!(
        stream.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(stream[1].envelope, {
        let mut e = x2.clone();
        e.hops.clear();
        e
    });
    let all = store.read_all(0, 100).await.unwrap();
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=6).collect::<Vec<_>>(), "gap-free positions");
    assert_eq!(store.read_all(4, 100).await.unwrap().len(), 2);
    assert_eq!(store.read_stream("x", 4).await.unwrap().len(), 2);
}

/// Streams in a batch out of byte order ("b" before "B" before "a"), a stream with earlier
/// events, a unit with two events of one stream, and an event without queue rows: versions
/// follow each stream's order in the batch and positions the batch's order.
async fn versions_follow_batch_order_across_streams(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    for n in 1..=2 {
        batch(&store, a, units(vec![unit(&event("b", n), true)])).await;
    }
    let (b3, big, a1, b4, b5, a2) = (
        event("b", 3),
        event("B", 1),
        event("a", 1),
        event("b", 4),
        event("b", 5),
        event("a", 2),
    );
    let mut two = unit(&b4, true);
    two.events.push(b5.clone());
    let bare = UnitOfWork {
        events: vec![a2.clone()],
        ..UnitOfWork::default()
    };
    let r = batch(
        &store,
        a,
        units(vec![
            unit(&b3, true),
            unit(&big, false),
            unit(&a1, true),
            two,
            bare,
        ]),
    )
    .await;
    let appended: Vec<(String, u64, u64)> = r
        .units
        .iter()
        .flat_map(|u| {
            committed(u)
                .0
                .iter()
                .map(|e| (e.stream_id.clone(), e.version, e.position))
        })
        .collect();
    let expected: Vec<(String, u64, u64)> =
        [("b", 3), ("B", 1), ("a", 1), ("b", 4), ("b", 5), ("a", 2)]
            .into_iter()
            .zip(3..)
            .map(|((s, v), p)| (s.to_string(), v, p))
            .collect();
    assert_eq!(appended, expected);
    for (stream, ids) in [
        ("b", vec![b3.message_id, b4.message_id, b5.message_id]),
        ("a", vec![a1.message_id, a2.message_id]),
    ] {
        let stored: Vec<Uuid> = store
            .read_stream(stream, 1)
            .await
            .unwrap()
            .iter()
            .map(|e| e.envelope.message_id)
            .collect();
        assert!(stored.ends_with(&ids), "{stream}: {stored:?}");
    }
}

async fn conflict_goes_to_its_unit_only(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e0, e1, e2) = (event("s", 0), event("s", 1), event("s", 2));
    let mut u0 = unit(&e0, true);
    u0.expectations
        .push(("s".into(), ExpectedVersion::NoStream));
    let mut u1 = unit(&e1, true);
    u1.expectations
        .push(("s".into(), ExpectedVersion::Exact(0)));
    let u2 = unit(&e2, true);
    let r = batch(&store, a, units(vec![u0, u1, u2])).await;
    committed(&r.units[0]);
    match &r.units[1] {
        UnitOutcome::Conflict {
            stream_id,
            expected,
            actual,
        } => {
            assert_eq!(stream_id, "s");
            assert_eq!(*expected, ExpectedVersion::Exact(0));
            assert_eq!(*actual, 1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(committed(&r.units[2]).0[0].version, 2);
    let stream = store.read_stream("s", 1).await.unwrap();
    let ids: Vec<Uuid> = stream.iter().map(|e| e.envelope.message_id).collect();
    assert_eq!(ids, vec![e0.message_id, e2.message_id]);
    // The conflicting unit left no queue rows either.
    let status = store.correlation_status(e1.correlation_id).await.unwrap();
    assert_eq!(status, CorrelationStatus::default());
}

/// A unit writing to several streams (a request scope's commands) is refused whole when one of
/// its expectations fails: nothing of any of its streams is written.
async fn a_unit_over_several_streams_is_refused_whole(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let e0 = event("whole-a", 0);
    batch(&store, a, units(vec![unit(&e0, true)])).await;
    let (e1, e2, e3) = (
        event("whole-b", 1),
        event("whole-a", 2),
        event("whole-c", 3),
    );
    let mut u = unit(&e1, true);
    for e in [&e2, &e3] {
        let more = unit(e, true);
        u.events.extend(more.events);
        u.outbox.extend(more.outbox);
        u.inbox.extend(more.inbox);
    }
    u.expectations
        .push(("whole-b".into(), ExpectedVersion::NoStream));
    u.expectations
        .push(("whole-a".into(), ExpectedVersion::NoStream));
    let r = batch(&store, a, units(vec![u])).await;
    assert!(
        matches!(&r.units[0], UnitOutcome::Conflict { stream_id, actual: 1, .. } if stream_id == "whole-a"),
        "{:?}",
        r.units[0]
    );
    assert_eq!(store.read_stream("whole-a", 1).await.unwrap().len(), 1);
    assert!(store.read_stream("whole-b", 1).await.unwrap().is_empty());
    assert!(store.read_stream("whole-c", 1).await.unwrap().is_empty());
    for e in [&e1, &e2, &e3] {
        let status = store.correlation_status(e.correlation_id).await.unwrap();
        assert_eq!(status, CorrelationStatus::default(), "no queue rows");
    }
}

async fn concurrent_writers_exactly_one_wins(b: Backend) {
    let store = open(b, settings()).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    for round in 0..10u64 {
        let (ea, ec) = (event("hot", 1), event("hot", 2));
        let mut ua = unit(&ea, false);
        ua.expectations
            .push(("hot".into(), ExpectedVersion::Exact(round)));
        let mut uc = unit(&ec, false);
        uc.expectations
            .push(("hot".into(), ExpectedVersion::Exact(round)));
        let (ra, rc) = tokio::join!(
            store.process_work_batch(a, units(vec![ua])),
            store.process_work_batch(c, units(vec![uc]))
        );
        let (ra, rc) = (ra.expect("writer a's batch"), rc.expect("writer c's batch"));
        let outcomes = [&ra.units[0], &rc.units[0]].map(|o| o.clone());
        let wins = outcomes
            .iter()
            .filter(|o| matches!(o, UnitOutcome::Committed { .. }))
            .count();
        assert_eq!(wins, 1, "round {round}: {outcomes:?}");
        assert!(outcomes.iter().any(|o| matches!(o,
            UnitOutcome::Conflict { actual, .. } if *actual == round + 1)));
    }
    assert_eq!(store.read_stream("hot", 1).await.unwrap().len(), 10);
}

async fn inbox_dedup(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let e = event("d", 1);
    let r = batch(&store, a, units(vec![inbox_only(&e, true)])).await;
    let (_, _, claimed, dups) = committed(&r.units[0]);
    assert_eq!(claimed.len(), 1);
    assert!(dups.is_empty());
    // Again while pending, and twice within one batch: duplicates, no second row.
    let r = batch(
        &store,
        a,
        units(vec![inbox_only(&e, true), inbox_only(&e, true)]),
    )
    .await;
    for u in &r.units {
        let (_, _, claimed, dups) = committed(u);
        assert!(claimed.is_empty());
        assert_eq!(dups, &vec![e.message_id]);
    }
    let f = event("d", 2);
    let r = batch(
        &store,
        a,
        units(vec![inbox_only(&f, true), inbox_only(&f, true)]),
    )
    .await;
    assert_eq!(committed(&r.units[0]).2.len(), 1);
    assert_eq!(committed(&r.units[1]).3, &vec![f.message_id]);
    // After processing, the dedup record still refuses it.
    let work = claimed[0].work;
    let done = WorkBatch {
        inbox_completions: vec![work],
        ..WorkBatch::default()
    };
    assert!(batch(&store, a, done).await.stale.is_empty());
    assert_eq!(
        store
            .inbox_settled(&[e.message_id, f.message_id])
            .await
            .unwrap(),
        vec![(e.message_id, InboxSettled::Processed)]
    );
    let r = batch(&store, a, units(vec![inbox_only(&e, true)])).await;
    assert_eq!(committed(&r.units[0]).3, &vec![e.message_id]);
}

async fn writer_claims_and_completes(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let e = event("w", 1);
    let r = batch(&store, a, units(vec![unit(&e, true)])).await;
    let (_, out, inb, _) = committed(&r.units[0]);
    assert_eq!(out.len(), 1);
    assert_eq!(inb.len(), 1);
    assert_eq!(out[0].envelope.message_id, e.message_id);
    assert_eq!(out[0].topic, "t");
    assert_eq!(out[0].work.partition, part("w"));
    // In flight: a claim does not hand them out again.
    let again = batch(&store, a, claim_all()).await;
    assert!(again.claimed_outbox.is_empty() && again.claimed_inbox.is_empty());
    let status = store.correlation_status(e.correlation_id).await.unwrap();
    assert_eq!((status.outbox_pending, status.inbox_pending), (1, 1));
    let done = WorkBatch {
        outbox_completions: vec![out[0].work],
        inbox_completions: vec![inb[0].work],
        ..WorkBatch::default()
    };
    assert!(batch(&store, a, done.clone()).await.stale.is_empty());
    let status = store.correlation_status(e.correlation_id).await.unwrap();
    assert_eq!(status.events.len(), 1);
    assert_eq!(
        (
            status.outbox_pending,
            status.inbox_pending,
            status.inbox_processed
        ),
        (0, 0, 1)
    );
    // Completing twice is refused, not applied twice.
    assert_eq!(batch(&store, a, done).await.stale.len(), 2);
}

/// A batch of published outbox rows only (what a writer's publisher reports) applies each
/// report it can and names exactly the others.
async fn outbox_completions_apply_each_and_name_the_rest(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e, f, g) = (event("p", 1), event("q", 1), event("r", 1));
    let r = batch(
        &store,
        a,
        units(vec![unit(&e, true), unit(&f, true), unit(&g, true)]),
    )
    .await;
    let work: Vec<_> = r.units.iter().map(|u| committed(u).1[0].work).collect();
    let only_outbox = |w: Vec<WorkRef>| WorkBatch {
        outbox_completions: w,
        ..WorkBatch::default()
    };
    assert!(
        batch(&store, a, only_outbox(vec![work[1]]))
            .await
            .stale
            .is_empty()
    );
    // f's row is gone and g's report carries a generation its lease never had.
    let forged = WorkRef {
        generation: work[2].generation + 1,
        ..work[2]
    };
    let r = batch(&store, a, only_outbox(vec![work[0], work[1], forged])).await;
    let mut stale = r.stale;
    stale.sort();
    let mut expected = vec![f.message_id, g.message_id];
    expected.sort();
    assert_eq!(stale, expected);
    let status = store.correlation_status(e.correlation_id).await.unwrap();
    assert_eq!(status.outbox_pending, 0, "e's row left the outbox");
    let status = store.correlation_status(g.correlation_id).await.unwrap();
    assert_eq!(status.outbox_pending, 1, "g's row stays");
}

async fn writer_claim_never_overtakes_pending_rows(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e1, e2) = (event("o", 1), event("o", 2));
    let r = batch(&store, a, units(vec![inbox_only(&e1, false)])).await;
    assert!(committed(&r.units[0]).2.is_empty(), "not asked to claim");
    let r = batch(&store, a, units(vec![inbox_only(&e2, true)])).await;
    assert!(
        committed(&r.units[0]).2.is_empty(),
        "e2 would overtake the pending e1"
    );
    let r = batch(&store, a, claim_all()).await;
    let ids: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![e1.message_id, e2.message_id]);
}

/// A message only sent on (nothing appended: a command for another service) that is queued
/// again is written once, also in a batch that appends events (the Postgres batch inserts the
/// outbox rows of appended events without `ON CONFLICT` only when every outbox row of the batch
/// is one); the rows keep their stream's order.
async fn an_outbox_message_queued_twice_is_written_once(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let send_only = |m: &Envelope| UnitOfWork {
        outbox: vec![NewOutboxRow {
            envelope: m.clone(),
            topic: "t".into(),
            partition: part(&m.stream_id),
        }],
        ..UnitOfWork::default()
    };
    let command = Envelope::new(MessageKind::Command, "Ship", "q".to_string(), vec![1]);
    batch(&store, a, units(vec![send_only(&command)])).await;
    let e = event("q", 2);
    let r = batch(&store, a, units(vec![send_only(&command), unit(&e, false)])).await;
    assert_eq!(committed(&r.units[1]).0.len(), 1, "the event is appended");
    let r = batch(&store, a, claim_all()).await;
    let ids: Vec<Uuid> = r
        .claimed_outbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![command.message_id, e.message_id]);
}

async fn failure_backs_off_and_parks_the_stream(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e1, e2) = (event("p", 1), event("p", 2));
    let other = event("q", 1);
    let r = batch(
        &store,
        a,
        units(vec![
            inbox_only(&e1, true),
            inbox_only(&e2, true),
            inbox_only(&other, false),
        ]),
    )
    .await;
    let w1 = committed(&r.units[0]).2[0].clone();
    let w2 = committed(&r.units[1]).2[0].clone();
    let fail = WorkBatch {
        inbox_failures: vec![Failure {
            work: w1.work,
            kind: FailureKind::Failed,
            error: "boom".into(),
        }],
        inbox_releases: vec![w2.work],
        ..claim_all()
    };
    let r = batch(&store, a, fail).await;
    assert!(r.stale.is_empty(), "{:?}", r.stale);
    assert!(
        r.next_retry_in
            .is_some_and(|d| d <= Duration::from_millis(50))
    );
    // The other stream is not held back; p is parked behind its failed head.
    let ids: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![other.message_id]);
    let retried = eventually(5, "the retry", || {
        let store = store.clone();
        async move {
            let r = batch(&store, a, claim_all()).await;
            (!r.claimed_inbox.is_empty()).then_some(r.claimed_inbox)
        }
    })
    .await;
    let ids: Vec<Uuid> = retried.iter().map(|w| w.envelope.message_id).collect();
    assert_eq!(
        ids,
        vec![e1.message_id, e2.message_id],
        "retry first, then the rest, in order"
    );
    assert_eq!(retried[0].attempts, 1);
}

async fn dead_letter_after_max_attempts_then_requeue_and_skip(b: Backend) {
    let mut s = settings();
    s.max_attempts = 3;
    s.backoff_base = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(20);
    let store = open(b, s).await;
    let a = instance(&store).await;
    let (e1, e2) = (event("z", 1), event("z", 2));
    let r = batch(
        &store,
        a,
        units(vec![inbox_only(&e1, true), inbox_only(&e2, false)]),
    )
    .await;
    let mut work = committed(&r.units[0]).2[0].work;
    for attempt in 1..=3 {
        let r = batch(
            &store,
            a,
            WorkBatch {
                inbox_failures: vec![Failure {
                    work,
                    kind: FailureKind::Failed,
                    error: format!("failure {attempt}"),
                }],
                ..WorkBatch::default()
            },
        )
        .await;
        if attempt == 3 {
            assert_eq!(r.dead_lettered, vec![e1.message_id]);
            break;
        }
        assert!(r.dead_lettered.is_empty());
        work = eventually(5, "retry claim", || {
            let store = store.clone();
            async move {
                claim_head(&store, a).await.map(|w| {
                    assert_eq!(
                        w.envelope.message_id, e1.message_id,
                        "parked stream overtaken"
                    );
                    w.work
                })
            }
        })
        .await;
    }
    let dead = store.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, e1.message_id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].queue, Queue::Inbox);
    assert!(dead[0].error.contains("failure 3"), "{}", dead[0].error);
    // A caller waiting for it (on another instance) learns it was dead-lettered, and why.
    match &store.inbox_settled(&[e1.message_id]).await.unwrap()[..] {
        [(id, InboxSettled::DeadLettered { last_error })] => {
            assert_eq!(*id, e1.message_id);
            assert!(last_error.contains("failure 3"), "{last_error}");
        }
        other => panic!("the dead letter is settled as such: {other:?}"),
    }
    // Parked: nothing of the stream is claimable, even after the backoff.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(batch(&store, a, claim_all()).await.claimed_inbox.is_empty());
    let mut rx = store.work_signal();
    // Let any wake-up already on its way arrive, then start from a quiet signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    store.requeue_dead_letter(e1.message_id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a requeue wakes the instances: the stream is claimable again")
        .unwrap();
    let r = batch(&store, a, claim_all()).await;
    let ids: Vec<(Uuid, u32)> = r
        .claimed_inbox
        .iter()
        .map(|w| (w.envelope.message_id, w.attempts))
        .collect();
    assert_eq!(ids, vec![(e1.message_id, 0), (e2.message_id, 0)]);
    // Dead-letter it again, then skip it: the stream moves on.
    let mut work = r.claimed_inbox[0].work;
    let rest = r.claimed_inbox[1].work;
    let mut first = true;
    for _ in 0..3 {
        let r = batch(
            &store,
            a,
            WorkBatch {
                inbox_failures: vec![Failure {
                    work,
                    kind: FailureKind::Failed,
                    error: "again".into(),
                }],
                inbox_releases: if first { vec![rest] } else { vec![] },
                ..WorkBatch::default()
            },
        )
        .await;
        first = false;
        if !r.dead_lettered.is_empty() {
            break;
        }
        work = eventually(5, "retry claim", || {
            let store = store.clone();
            async move { claim_head(&store, a).await.map(|w| w.work) }
        })
        .await;
    }
    assert_eq!(store.dead_letters().await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    store.skip_dead_letter(e1.message_id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("a skip wakes the instances: the rest of the stream is claimable")
        .unwrap();
    assert!(store.dead_letters().await.unwrap().is_empty());
    let r = batch(&store, a, claim_all()).await;
    let ids: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![e2.message_id]);
    assert!(store.requeue_dead_letter(Uuid::now_v7()).await.is_err());
}

async fn transient_failure_does_not_count(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let e = event("tr", 1);
    let r = batch(&store, a, units(vec![unit(&e, true)])).await;
    let w = committed(&r.units[0]).1[0].work;
    batch(
        &store,
        a,
        WorkBatch {
            outbox_failures: vec![Failure {
                work: w,
                kind: FailureKind::Transient,
                error: "broker down".into(),
            }],
            ..WorkBatch::default()
        },
    )
    .await;
    let claimed = eventually(5, "transient retry", || {
        let store = store.clone();
        async move {
            let r = batch(&store, a, claim_all()).await;
            r.claimed_outbox.first().cloned()
        }
    })
    .await;
    assert_eq!(claimed.envelope.message_id, e.message_id);
    assert_eq!(claimed.attempts, 0);
}

async fn orphaned_work_recovered_after_lease_expiry(b: Backend) {
    let mut s = settings();
    s.lease = Duration::from_secs(1);
    let store = open(b, s).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    let events: Vec<Envelope> = (1..=3).map(|n| event("orphan", n)).collect();
    let r = batch(
        &store,
        a,
        units(events.iter().map(|e| unit(e, true)).collect()),
    )
    .await;
    let a_work = committed(&r.units[0]).1[0].work;
    // A "crashes": no completion, no heartbeat. C cannot take a live lease.
    let r = batch(&store, c, claim_all()).await;
    assert!(
        r.claimed_outbox.is_empty() && r.claimed_inbox.is_empty(),
        "took a live lease"
    );
    let claimed = claim_after_expiry(&store, c).await;
    let ids: Vec<Uuid> = claimed
        .claimed_outbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(
        ids,
        events.iter().map(|e| e.message_id).collect::<Vec<_>>(),
        "in stream order"
    );
    assert_eq!(claimed.claimed_inbox.len(), 3);
    assert!(
        claimed.claimed_outbox[0].work.generation > a_work.generation,
        "fencing token grew"
    );
    // C's next heartbeat reports the partition as taken over from A, once.
    assert_eq!(
        store.heartbeat(c).await.unwrap().taken_over,
        vec![part("orphan")],
        "taken over from A"
    );
    assert!(
        store.heartbeat(c).await.unwrap().taken_over.is_empty(),
        "a takeover is reported once"
    );
    // A wakes up and reports: refused (fencing), and C's claim stands.
    let r = batch(&store, a, completing_outbox(a_work)).await;
    assert_eq!(r.stale, vec![a_work.message_id]);
    let r = batch(
        &store,
        c,
        WorkBatch {
            outbox_completions: claimed.claimed_outbox.iter().map(|w| w.work).collect(),
            ..WorkBatch::default()
        },
    )
    .await;
    assert!(r.stale.is_empty());
}

/// Writes are fenced too: a writer claims its new rows only under its lease's current
/// generation. Once its lease ran out and another instance took the partition, its rows go in
/// unclaimed (on a stream with nothing pending, where no order probe would hold them back) and
/// the holder claims them; once it leases the partition again, they are claimed at the new
/// generation, and so are the next ones.
async fn a_writer_claims_only_at_its_leases_current_generation(b: Backend) {
    let mut s = settings();
    s.lease = Duration::from_secs(1);
    let store = open(b, s).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    let first = event("generations", 1);
    let r = batch(&store, a, units(vec![unit(&first, true)])).await;
    let a_gen = committed(&r.units[0]).1[0].work.generation;
    // A goes quiet; once its lease has run out, C takes the partition over with A's rows.
    let taken = claim_after_expiry(&store, c).await;
    let c_gen = taken.claimed_outbox[0].work.generation;
    assert!(c_gen > a_gen, "fencing token grew");
    // Another stream of the same partition, with no row of its own pending.
    let sibling = streams_sharing_partition_with("generations")
        .next()
        .unwrap();
    let second = event(&sibling, 2);
    let r = batch(&store, a, units(vec![unit(&second, true)])).await;
    let (_, outbox, inbox, _) = committed(&r.units[0]);
    assert!(
        outbox.is_empty() && inbox.is_empty(),
        "A claimed rows in a partition C holds: {outbox:?} {inbox:?}"
    );
    assert!(batch(&store, c, completing(&taken)).await.stale.is_empty());
    let r = batch(&store, c, claim_all()).await;
    let ids: Vec<Uuid> = r
        .claimed_outbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![second.message_id], "C claims A's new row");
    assert_eq!(r.claimed_outbox[0].work.generation, c_gen);
    assert!(batch(&store, c, completing(&r)).await.stale.is_empty());
    // C hands the partition back; A's next rows are claimed at a generation above C's.
    store.release_partitions(c, None).await.unwrap();
    let third = event("generations", 3);
    let r = batch(&store, a, units(vec![unit(&third, true)])).await;
    let (_, outbox, inbox, _) = committed(&r.units[0]);
    assert_eq!(outbox.len(), 1, "A leases the free partition again");
    assert_eq!(inbox.len(), 1);
    let again = outbox[0].work.generation;
    assert!(again > c_gen, "claimed at {again}, C held {c_gen}");
    assert_eq!(inbox[0].work.generation, again);
    let fourth = event("generations", 4);
    let r = batch(&store, a, units(vec![unit(&fourth, true)])).await;
    let (_, outbox, inbox, _) = committed(&r.units[0]);
    assert_eq!(
        (outbox.len(), inbox.len()),
        (1, 1),
        "its own rows in flight hold nothing back"
    );
    assert_eq!(outbox[0].work.generation, again);
    assert_eq!(inbox[0].work.generation, again);
}

/// The setting of a takeover on the writer's side: with 1 s leases, A writes a unit on `stream`
/// (its rows claimed for A) and goes quiet; C then writes on fresh streams of the same partition
/// (nothing pending there) until one of its rows comes back claimed, i.e. C holds the lease. A's
/// row is untouched, still claimed by A at its generation. Returns the store, A, C, the event
/// and A's claim of its outbox row.
async fn taken_over_by_writing(
    b: Backend,
    stream: &str,
) -> (Arc<dyn Store>, InstanceId, InstanceId, Envelope, WorkRef) {
    let mut s = settings();
    s.lease = Duration::from_secs(1);
    let store = open(b, s).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    let first = event(stream, 1);
    let r = batch(&store, a, units(vec![unit(&first, true)])).await;
    let a_work = committed(&r.units[0]).1[0].work;
    let mut fresh = streams_sharing_partition_with(stream);
    let c_gen = eventually(10, "C to take the partition over", || {
        let store = store.clone();
        let e = event(&fresh.next().unwrap(), 1);
        async move {
            let r = batch(&store, c, units(vec![unit(&e, true)])).await;
            committed(&r.units[0]).1.first().map(|w| w.work.generation)
        }
    })
    .await;
    assert!(c_gen > a_work.generation, "fencing token grew");
    (store, a, c, first, a_work)
}

/// Order holds across a takeover on the writer's side too: once an instance has taken over a
/// partition whose lease ran out, its own new row on a stream must wait behind the row the
/// previous holder had claimed and not finished (still claimed by it, at the old generation),
/// and it claims the two in order.
async fn a_new_holders_writes_wait_behind_the_previous_holders_rows(b: Backend) {
    let (store, a, c, first, a_work) = taken_over_by_writing(b, "handover").await;
    let second = event("handover", 2);
    let r = batch(&store, c, units(vec![unit(&second, true)])).await;
    let (_, outbox, inbox, _) = committed(&r.units[0]);
    assert!(
        outbox.is_empty() && inbox.is_empty(),
        "C's row overtook A's unfinished one: {outbox:?} {inbox:?}"
    );
    let r = batch(&store, c, claim_all()).await;
    let outbox = ids_on("handover", r.claimed_outbox.iter().map(|w| &w.envelope));
    let inbox = ids_on("handover", r.claimed_inbox.iter().map(|w| &w.envelope));
    let in_order = vec![first.message_id, second.message_id];
    assert_eq!(outbox, in_order, "C claims A's row, then its own");
    assert_eq!(inbox, in_order);
    let stale = batch(&store, a, completing_outbox(a_work)).await.stale;
    assert_eq!(
        stale,
        vec![a_work.message_id],
        "A's late completion is fenced"
    );
}

/// A late completion is fenced by the lease, not only by the row: after the partition has
/// changed hands, the previous holder's report of a row it published is refused even while
/// that row is still claimed at the old generation (the new holder has not claimed it yet), and
/// the new holder then claims and publishes the row itself.
async fn a_late_completion_is_fenced_by_the_lease_before_the_row_is_claimed_again(b: Backend) {
    let (store, a, c, first, a_work) = taken_over_by_writing(b, "late").await;
    let stale = batch(&store, a, completing_outbox(a_work)).await.stale;
    assert_eq!(stale, vec![a_work.message_id], "A's completion is fenced");
    let r = batch(&store, c, claim_all()).await;
    assert_eq!(
        ids_on("late", r.claimed_outbox.iter().map(|w| &w.envelope)),
        vec![first.message_id],
        "the row stayed queued for C"
    );
    assert!(batch(&store, c, completing(&r)).await.stale.is_empty());
}

async fn graceful_release_hands_over_at_once(b: Backend) {
    let store = open(b, settings()).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    let e = event("g", 1);
    let r = batch(&store, a, units(vec![unit(&e, true)])).await;
    assert_eq!(committed(&r.units[0]).1.len(), 1);
    assert!(
        batch(&store, c, claim_all())
            .await
            .claimed_outbox
            .is_empty()
    );
    store.release_partitions(a, None).await.unwrap();
    let r = batch(&store, c, claim_all()).await;
    assert_eq!(r.claimed_outbox.len(), 1);
    assert_eq!(r.claimed_inbox.len(), 1);
    assert!(
        store.heartbeat(c).await.unwrap().taken_over.is_empty(),
        "a partition given up is not taken over"
    );
}

async fn instances_share_partitions_without_overlap(b: Backend) {
    let mut s = settings();
    s.partition_count = 12;
    s.max_partitions_per_instance = 4;
    let store = open(b, s.clone()).await;
    let writer = instance(&store).await;
    let streams: Vec<String> = (0..48).map(|i| format!("share-{i}")).collect();
    let mut all = Vec::new();
    for st in &streams {
        for n in 0..3 {
            let e = event(st, n);
            let mut u = inbox_only(&e, false);
            u.inbox[0].partition = partition_of(st, 12);
            all.push(e.message_id);
            batch(&store, writer, units(vec![u])).await;
        }
    }
    let ids = [
        instance(&store).await,
        instance(&store).await,
        instance(&store).await,
    ];
    let mut seen = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < all.len() {
        assert!(
            Instant::now() < deadline,
            "not all rows were processed: {}/{}",
            seen.len(),
            all.len()
        );
        for &i in &ids {
            let r = batch(&store, i, claim_all()).await;
            let hb = store.heartbeat(i).await.unwrap();
            assert!(
                hb.held_partitions.len() <= 4,
                "max partitions exceeded: {:?}",
                hb.held_partitions
            );
            let mut done = Vec::new();
            for w in r.claimed_inbox {
                assert_eq!(partition_of(&w.envelope.stream_id, 12), w.work.partition);
                assert!(
                    seen.insert(w.envelope.message_id, i).is_none(),
                    "row claimed twice"
                );
                done.push(w.work);
            }
            let r = batch(
                &store,
                i,
                WorkBatch {
                    inbox_completions: done,
                    ..WorkBatch::default()
                },
            )
            .await;
            assert!(r.stale.is_empty());
        }
        // No partition is held by two instances at once.
        let mut held = std::collections::HashSet::new();
        for &i in &ids {
            for p in store.heartbeat(i).await.unwrap().held_partitions {
                assert!(held.insert(p), "partition {p} held twice");
            }
        }
    }
    let per: Vec<usize> = ids
        .iter()
        .map(|i| seen.values().filter(|v| *v == i).count())
        .collect();
    assert!(
        per.iter().filter(|n| **n > 0).count() >= 2,
        "work was not shared: {per:?}"
    );
}

/// `n` streams (`{prefix}-{i}`, 64 partitions), one inbox row each, in partitions `a` leases;
/// `a` hands the rows back unprocessed, so they are pending but in its partitions.
async fn pending_in_own_partitions(store: &Arc<dyn Store>, a: InstanceId, prefix: &str, n: usize) {
    let mut rows = Vec::new();
    for i in 0..n {
        let st = format!("{prefix}-{i}");
        let e = event(&st, 0);
        let mut u = inbox_only(&e, true);
        u.inbox[0].partition = partition_of(&st, 64);
        let r = batch(store, a, units(vec![u])).await;
        rows.extend(committed(&r.units[0]).2.iter().map(|w| w.work));
    }
    batch(
        store,
        a,
        WorkBatch {
            inbox_releases: rows,
            ..WorkBatch::default()
        },
    )
    .await;
}

async fn joiner_gets_work_as_others_release_excess(b: Backend) {
    let mut s = settings();
    s.partition_count = 64;
    s.max_partitions_per_instance = 64;
    let store = open(b, s).await;
    let a = instance(&store).await;
    pending_in_own_partitions(&store, a, "fair", 40).await;
    let held_before = store.heartbeat(a).await.unwrap().held_partitions.len();
    assert!(held_before > 10);
    let c = instance(&store).await;
    assert!(
        batch(&store, c, claim_all()).await.claimed_inbox.is_empty(),
        "took live leases"
    );
    store.heartbeat(c).await.unwrap();
    let hb = store.heartbeat(a).await.unwrap();
    assert!(!hb.released.is_empty(), "no excess released");
    assert!(
        hb.released.len() <= 10,
        "released everything at once: {}",
        hb.released.len()
    );
    let r = batch(&store, c, claim_all()).await;
    assert!(
        !r.claimed_inbox.is_empty(),
        "the joiner got none of the released work"
    );
    for w in &r.claimed_inbox {
        assert!(
            hb.released.contains(&w.work.partition),
            "took partition {} not released",
            w.work.partition
        );
    }
    let still_a = store.heartbeat(a).await.unwrap().held_partitions;
    assert!(
        !still_a.is_empty(),
        "no global reshuffle: A keeps most of its partitions"
    );
}

async fn heartbeat_releases_idle_partitions(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let e = event("idle", 1);
    let r = batch(&store, a, units(vec![unit(&e, true)])).await;
    let (_, out, inb, _) = committed(&r.units[0]);
    let busy = store.heartbeat(a).await.unwrap();
    assert_eq!(busy.held_partitions, vec![part("idle")], "in flight: kept");
    assert!(busy.released.is_empty());
    batch(
        &store,
        a,
        WorkBatch {
            outbox_completions: vec![out[0].work],
            inbox_completions: vec![inb[0].work],
            ..WorkBatch::default()
        },
    )
    .await;
    let hb = store.heartbeat(a).await.unwrap();
    assert_eq!(hb.released, vec![part("idle")]);
    assert!(hb.held_partitions.is_empty());
}

async fn max_partitions_per_instance_is_respected(b: Backend) {
    let mut s = settings();
    s.max_partitions_per_instance = 2;
    let store = open(b, s).await;
    let writer = instance(&store).await;
    let streams: Vec<String> = (0..40).map(|i| format!("max-{i}")).collect();
    let mut parts = std::collections::HashSet::new();
    for st in &streams {
        parts.insert(part(st));
        batch(
            &store,
            writer,
            units(vec![inbox_only(&event(st, 0), false)]),
        )
        .await;
    }
    assert!(parts.len() > 2);
    let a = instance(&store).await;
    let r = batch(&store, a, claim_all()).await;
    let claimed: std::collections::HashSet<u32> =
        r.claimed_inbox.iter().map(|w| w.work.partition).collect();
    assert!(!claimed.is_empty() && claimed.len() <= 2, "{claimed:?}");
    assert!(store.heartbeat(a).await.unwrap().held_partitions.len() <= 2);
}

async fn work_signal_fires_for_pending_work(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let mut rx = store.work_signal();
    rx.borrow_and_update();
    let e = event("sig", 1);
    batch(&store, a, units(vec![unit(&e, false)])).await;
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("no wake-up for pending work")
        .unwrap();
}

/// A lease that ran out with work behind it (its holder died) wakes the other instances at
/// their next heartbeat, so the partition is taken over at once, not at the next fallback poll.
async fn an_expired_lease_with_work_wakes_the_others_at_their_heartbeat(b: Backend) {
    let mut s = settings();
    s.lease = Duration::from_secs(1);
    let store = open(b, s).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    let e = event("wake", 1);
    batch(&store, a, units(vec![unit(&e, true)])).await;
    // A "crashes" holding the partition. C's heartbeats keep C alive until A's lease is out.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1300) {
        store.heartbeat(c).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rx = store.work_signal();
    // Let any wake-up already on its way arrive, then start from a quiet signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    store.heartbeat(c).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("no wake-up for work behind an expired lease")
        .unwrap();
    // And the claim it prompts takes the partition over.
    let r = batch(&store, c, claim_all()).await;
    assert_eq!(r.claimed_outbox.len(), 1, "taken over");
    // Nothing behind an expired lease any more: a heartbeat wakes nobody.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    store.heartbeat(c).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(700), rx.changed())
            .await
            .is_err(),
        "woken with nothing to take over"
    );
}

async fn claims_whose_answer_was_lost_are_handed_out_again(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e1, e2) = (event("lost", 1), event("lost", 2));
    // Both committed and leased to the writer; pretend the answer for e1 never arrived.
    let r = batch(
        &store,
        a,
        units(vec![inbox_only(&e1, true), inbox_only(&e2, true)]),
    )
    .await;
    let w2 = committed(&r.units[1]).2[0].work;
    assert!(
        batch(&store, a, claim_all()).await.claimed_inbox.is_empty(),
        "in flight"
    );
    let recover = |inbox: Vec<Uuid>| WorkBatch {
        in_flight: Some(InFlight {
            outbox: Vec::new(),
            inbox,
        }),
        ..claim_all()
    };
    // e2 is really in flight, e1 is not: only e1 is handed out again.
    let r = batch(&store, a, recover(vec![w2.message_id])).await;
    let ids: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![e1.message_id]);
    // Now both are known: nothing more.
    let r = batch(&store, a, recover(vec![e1.message_id, e2.message_id])).await;
    assert!(r.claimed_inbox.is_empty());
}

/// An event both published and applied locally has an outbox row and an inbox row with one
/// message id; the recovery claim tells them apart, so a finished twin neither hides a row that
/// needs handing out again nor gets a running one handed out twice.
async fn in_flight_twins_are_told_apart_by_queue(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let e = event("twin", 1);
    let r = batch(&store, a, units(vec![unit(&e, true)])).await;
    let (_, out, inb, _) = committed(&r.units[0]);
    assert_eq!((out.len(), inb.len()), (1, 1));
    let recover = |outbox: Vec<Uuid>, inbox: Vec<Uuid>| WorkBatch {
        in_flight: Some(InFlight { outbox, inbox }),
        ..claim_all()
    };
    // The outbox row is still publishing, the inbox row's claim was lost: only the inbox row
    // comes back.
    let r = batch(&store, a, recover(vec![e.message_id], vec![])).await;
    assert!(
        r.claimed_outbox.is_empty(),
        "the running outbox row stays put"
    );
    let ids: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![e.message_id]);
    // The other way round: the inbox row runs, the outbox row's claim was lost.
    let r = batch(&store, a, recover(vec![], vec![e.message_id])).await;
    assert!(
        r.claimed_inbox.is_empty(),
        "the running inbox row stays put"
    );
    let ids: Vec<Uuid> = r
        .claimed_outbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![e.message_id]);
    // Both running: nothing.
    let r = batch(&store, a, recover(vec![e.message_id], vec![e.message_id])).await;
    assert!(r.claimed_outbox.is_empty() && r.claimed_inbox.is_empty());
}

/// A lost batch answer left more claimed rows than the recovery claim's budget returns: the
/// rows past the budget are given up (claimable again, in order), so they still hold back a
/// newer row of their stream instead of counting as in flight and letting it overtake them.
async fn a_recovery_claim_beyond_its_budget_gives_the_rest_up(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let lost: Vec<Envelope> = (1..=5).map(|n| event("deep", n)).collect();
    // Committed and claimed for the writer, but the answer never reached it.
    let r = batch(
        &store,
        a,
        units(lost.iter().map(|e| unit(e, true)).collect()),
    )
    .await;
    let claimed: usize = r.units.iter().map(|u| committed(u).2.len()).sum();
    assert_eq!(claimed, 5, "all five claimed for the writer");
    // The recovery claim: nothing in flight, room for two of each queue.
    let recover = WorkBatch {
        claim: Some(ClaimBudget {
            outbox: 2,
            inbox: 2,
        }),
        in_flight: Some(InFlight {
            outbox: vec![],
            inbox: vec![],
        }),
        ..WorkBatch::default()
    };
    let r = batch(&store, a, recover).await;
    let got: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(got, vec![lost[0].message_id, lost[1].message_id]);
    assert_eq!(r.claimed_outbox.len(), 2);
    // A sixth event of the stream: rows 3-5 are not in flight, so it must wait behind them.
    let sixth = event("deep", 6);
    let r = batch(&store, a, units(vec![unit(&sixth, true)])).await;
    let (_, out, inb, _) = committed(&r.units[0]);
    assert!(
        out.is_empty() && inb.is_empty(),
        "the sixth row was handed out ahead of rows 3-5"
    );
    // The next claim hands out 3, 4, 5 and then 6, in order.
    let r = batch(&store, a, claim_all()).await;
    let got: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    let want: Vec<Uuid> = lost[2..]
        .iter()
        .chain([&sixth])
        .map(|e| e.message_id)
        .collect();
    assert_eq!(got, want);
}

async fn perspective_checkpoints(b: Backend) {
    let store = open(b, settings()).await;
    assert_eq!(store.load_checkpoint("summary").await.unwrap(), None);
    store.save_checkpoint("summary", 41).await.unwrap();
    store.save_checkpoint("summary", 42).await.unwrap();
    store.save_checkpoint("other", 7).await.unwrap();
    assert_eq!(store.load_checkpoint("summary").await.unwrap(), Some(42));
    assert_eq!(store.load_checkpoint("other").await.unwrap(), Some(7));
}

async fn an_idempotency_key_is_recorded_with_its_unit_and_refuses_a_second(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    assert_eq!(store.idempotency_record("k-1").await.unwrap(), None);
    let (e1, e2) = (event("idem", 1), event("idem", 2));
    let mut first = unit(&e1, true);
    first.events.push(e2.clone());
    let r = batch(&store, a, units(vec![keyed(first, "k-1", b"h1", b"first")])).await;
    let appended = committed(&r.units[0]).0.clone();
    assert_eq!(appended.len(), 2);
    let record = store
        .idempotency_record("k-1")
        .await
        .unwrap()
        .expect("recorded with its unit");
    assert_eq!(
        record.record,
        NewIdempotencyRecord {
            key: "k-1".into(),
            request_hash: b"h1".to_vec(),
            outcome: b"first".to_vec(),
        }
    );
    assert_eq!(record.appended, appended, "the unit's events, in its order");

    // The same key again, in a later batch (with a version expectation it would meet, and
    // another request): refused whole, nothing of it written.
    let e3 = event("idem-other", 3);
    let mut again = keyed(unit(&e3, true), "k-1", b"h2", b"second");
    again
        .expectations
        .push(("idem-other".into(), ExpectedVersion::NoStream));
    let r = batch(&store, a, units(vec![again])).await;
    assert_eq!(key_taken(&r.units[0]), "k-1");
    assert!(store.read_stream("idem-other", 1).await.unwrap().is_empty());
    let status = store.correlation_status(e3.correlation_id).await.unwrap();
    assert_eq!(status, CorrelationStatus::default(), "no queue rows either");
    let kept = store.idempotency_record("k-1").await.unwrap().unwrap();
    assert_eq!(
        kept.record.outcome,
        b"first".to_vec(),
        "the first record stays"
    );
}

async fn a_key_taken_earlier_in_the_batch_refuses_the_later_unit_only(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e1, e2, e3) = (event("kb", 1), event("kb", 2), event("kb-free", 3));
    let r = batch(
        &store,
        a,
        units(vec![
            keyed(unit(&e1, true), "dup", b"h", b"one"),
            keyed(unit(&e2, true), "dup", b"h", b"two"),
            keyed(unit(&e3, true), "free", b"h", b"three"),
        ]),
    )
    .await;
    assert_eq!(committed(&r.units[0]).0[0].version, 1);
    assert_eq!(key_taken(&r.units[1]), "dup");
    assert_eq!(committed(&r.units[2]).0[0].stream_id, "kb-free");
    let ids: Vec<Uuid> = store
        .read_stream("kb", 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.envelope.message_id)
        .collect();
    assert_eq!(ids, vec![e1.message_id]);
    let dup = store.idempotency_record("dup").await.unwrap().unwrap();
    assert_eq!(dup.record.outcome, b"one".to_vec());
    assert!(store.idempotency_record("free").await.unwrap().is_some());
}

async fn a_unit_refused_on_its_version_gives_its_key_back(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e1, e2) = (event("kv", 1), event("kv", 2));
    let mut u = keyed(unit(&e1, true), "kv-key", b"h", b"o");
    u.expectations
        .push(("kv".into(), ExpectedVersion::Exact(5)));
    let r = batch(&store, a, units(vec![u])).await;
    assert!(
        matches!(r.units[0], UnitOutcome::Conflict { .. }),
        "{:?}",
        r.units[0]
    );
    assert_eq!(store.idempotency_record("kv-key").await.unwrap(), None);
    // The key is free for the command run again.
    let r = batch(
        &store,
        a,
        units(vec![keyed(unit(&e2, true), "kv-key", b"h", b"o2")]),
    )
    .await;
    committed(&r.units[0]);
    let record = store.idempotency_record("kv-key").await.unwrap().unwrap();
    assert_eq!(record.record.outcome, b"o2".to_vec());
    assert_eq!(record.appended.len(), 1);
    assert_eq!(record.appended[0].message_id, e2.message_id);
}

async fn a_unit_of_only_an_idempotency_record_commits(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let refusal = keyed(UnitOfWork::default(), "refused", b"h", b"no");
    let r = batch(&store, a, units(vec![refusal])).await;
    assert!(committed(&r.units[0]).0.is_empty());
    let record = store.idempotency_record("refused").await.unwrap().unwrap();
    assert_eq!(record.record.outcome, b"no".to_vec());
    assert!(record.appended.is_empty());
    let again = keyed(UnitOfWork::default(), "refused", b"h", b"no again");
    let r = batch(&store, a, units(vec![again])).await;
    assert_eq!(key_taken(&r.units[0]), "refused");
}

async fn concurrent_units_with_one_key_commit_exactly_one(b: Backend) {
    let store = open(b, settings()).await;
    let (a, c) = (instance(&store).await, instance(&store).await);
    for round in 0..10 {
        let key = format!("race-{round}");
        let (ea, ec) = (
            event(&format!("ra-{round}"), 1),
            event(&format!("rc-{round}"), 2),
        );
        let (ra, rc) = tokio::join!(
            store.process_work_batch(a, units(vec![keyed(unit(&ea, false), &key, b"h", b"a")])),
            store.process_work_batch(c, units(vec![keyed(unit(&ec, false), &key, b"h", b"c")]))
        );
        let (ra, rc) = (ra.expect("writer a's batch"), rc.expect("writer c's batch"));
        let outcomes = [&ra.units[0], &rc.units[0]].map(|o| o.clone());
        let winner = match (&outcomes[0], &outcomes[1]) {
            (UnitOutcome::Committed { .. }, UnitOutcome::KeyTaken { .. }) => (&ea, b"a"),
            (UnitOutcome::KeyTaken { .. }, UnitOutcome::Committed { .. }) => (&ec, b"c"),
            other => panic!("round {round}: exactly one must commit: {other:?}"),
        };
        let loser = if winner.0.message_id == ea.message_id {
            &ec
        } else {
            &ea
        };
        let record = store.idempotency_record(&key).await.unwrap().unwrap();
        assert_eq!(record.record.outcome, winner.1.to_vec());
        assert_eq!(record.appended[0].message_id, winner.0.message_id);
        assert!(
            store
                .read_stream(&loser.stream_id, 1)
                .await
                .unwrap()
                .is_empty(),
            "round {round}: the loser wrote nothing"
        );
    }
}

async fn idempotency_keys_are_purged_after_the_retention(b: Backend) {
    let mut s = settings();
    s.dedup_retention = Duration::from_millis(300);
    let store = open(b, s).await;
    let a = instance(&store).await;
    let r = batch(
        &store,
        a,
        units(vec![keyed(UnitOfWork::default(), "old", b"h", b"o")]),
    )
    .await;
    committed(&r.units[0]);
    store.heartbeat(a).await.unwrap();
    assert!(
        store.idempotency_record("old").await.unwrap().is_some(),
        "kept within the retention"
    );
    eventually(10, "the key purged by a heartbeat", || {
        let store = store.clone();
        async move {
            store.heartbeat(a).await.unwrap();
            store
                .idempotency_record("old")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    // Gone: the key may be used again.
    let r = batch(
        &store,
        a,
        units(vec![keyed(UnitOfWork::default(), "old", b"h2", b"o2")]),
    )
    .await;
    committed(&r.units[0]);
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $case() { super::$case(super::Backend::Memory).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $case() {
                super::run_case(super::$case(super::Backend::Postgres)).await
            } )*
        }
        mod postgres_set_based {
            $( #[tokio::test] async fn $case() {
                super::run_case(super::$case(super::Backend::PostgresSetBased)).await
            } )*
        }
    };
}

conformance!(
    heartbeat_with_no_work,
    versions_per_stream_and_positions,
    versions_follow_batch_order_across_streams,
    conflict_goes_to_its_unit_only,
    a_unit_over_several_streams_is_refused_whole,
    concurrent_writers_exactly_one_wins,
    inbox_dedup,
    writer_claims_and_completes,
    outbox_completions_apply_each_and_name_the_rest,
    writer_claim_never_overtakes_pending_rows,
    an_outbox_message_queued_twice_is_written_once,
    failure_backs_off_and_parks_the_stream,
    dead_letter_after_max_attempts_then_requeue_and_skip,
    transient_failure_does_not_count,
    orphaned_work_recovered_after_lease_expiry,
    a_writer_claims_only_at_its_leases_current_generation,
    a_new_holders_writes_wait_behind_the_previous_holders_rows,
    a_late_completion_is_fenced_by_the_lease_before_the_row_is_claimed_again,
    graceful_release_hands_over_at_once,
    instances_share_partitions_without_overlap,
    joiner_gets_work_as_others_release_excess,
    heartbeat_releases_idle_partitions,
    max_partitions_per_instance_is_respected,
    work_signal_fires_for_pending_work,
    an_expired_lease_with_work_wakes_the_others_at_their_heartbeat,
    perspective_checkpoints,
    claims_whose_answer_was_lost_are_handed_out_again,
    in_flight_twins_are_told_apart_by_queue,
    a_recovery_claim_beyond_its_budget_gives_the_rest_up,
    an_idempotency_key_is_recorded_with_its_unit_and_refuses_a_second,
    a_key_taken_earlier_in_the_batch_refuses_the_later_unit_only,
    a_unit_refused_on_its_version_gives_its_key_back,
    a_unit_of_only_an_idempotency_record_commits,
    concurrent_units_with_one_key_commit_exactly_one,
    idempotency_keys_are_purged_after_the_retention,
    a_read_model_applies_each_event_once,
    an_inline_unit_commits_with_its_read_models_or_not_at_all,
    an_inbox_claim_carries_the_events_version_and_position,
);

/// Postgres only (the memory store has no concurrent transactions): a partition above the fair
/// share whose rows a claim is taking at this moment (row locks held, not yet committed) is not
/// released by the heartbeat; once the claim is over, the excess goes.
#[tokio::test]
async fn postgres_a_partition_being_claimed_is_not_released_as_excess() {
    let _pg = pg::slot().await;
    let mut s = settings();
    s.partition_count = 64;
    s.max_partitions_per_instance = 64;
    let (store, schema) = open_postgres(s).await;
    let a = instance(&store).await;
    // None in flight: all six partitions are candidates for shedding.
    pending_in_own_partitions(&store, a, "busy", 6).await;
    let held = store.heartbeat(a).await.unwrap().held_partitions;
    // A second live instance halves A's fair share.
    let _b = instance(&store).await;
    // "A claim in progress": an open transaction holding the row locks of every pending row.
    let mut client = connect().await;
    let tx = client.transaction().await.unwrap();
    tx.execute(&format!("SELECT 1 FROM {schema}.wb_inbox FOR UPDATE"), &[])
        .await
        .unwrap();
    let hb = store.heartbeat(a).await.unwrap();
    assert!(
        hb.released.is_empty(),
        "released {:?} while their rows were being claimed",
        hb.released
    );
    tx.rollback().await.unwrap();
    let hb = store.heartbeat(a).await.unwrap();
    assert!(
        !hb.released.is_empty() && hb.released.iter().all(|p| held.contains(p)),
        "the excess goes once the claim is over: released {:?} of {held:?}",
        hb.released
    );
    let _ = drop_schemas(&[&schema]).await;
}

/// Postgres only: a graceful shutdown's release and a heartbeat of the same instance in
/// progress take their locks in one order. The heartbeat locks the instance's row, then its
/// leases; the release used to lock the leases, then the instance's row (to delete it), and the
/// two deadlocked (seen under a slowed-down server). Here the test holds a heartbeat's first
/// locks in an open transaction, lets the release start, then takes the leases as the heartbeat
/// does next: neither may fail.
#[tokio::test]
async fn postgres_a_release_during_a_heartbeat_does_not_deadlock() {
    let _pg = pg::slot().await;
    let mut s = settings();
    s.partition_count = 64;
    s.max_partitions_per_instance = 64;
    let (store, schema) = open_postgres(s).await;
    let a = instance(&store).await;
    pending_in_own_partitions(&store, a, "hb", 6).await;
    let mut client = connect().await;
    let heartbeat = client.transaction().await.unwrap();
    heartbeat
        .execute(
            &format!("SELECT pg_advisory_xact_lock({schema}.wb_instance_key($1))"),
            &[&a],
        )
        .await
        .unwrap();
    heartbeat
        .execute(
            &format!("UPDATE {schema}.wb_instances SET last_seen = now() WHERE instance_id = $1"),
            &[&a],
        )
        .await
        .unwrap();
    let releasing = tokio::spawn({
        let store = store.clone();
        async move { store.release_partitions(a, None).await }
    });
    let watcher = connect().await;
    // Only this schema's statements: other tests of the process wait on locks of their own.
    let waiting_sql = format!(
        "SELECT count(*) FROM pg_stat_activity
          WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
            AND query LIKE '%{schema}.%'
            AND (query LIKE '%wb_partition_leases%' OR query LIKE '%pg_advisory_xact_lock%')"
    );
    eventually(10, "the release to wait for a lock", || async {
        let waiting: i64 = watcher.query_one(&waiting_sql, &[]).await.unwrap().get(0);
        (waiting > 0).then_some(())
    })
    .await;
    heartbeat
        .execute(
            &format!(
                "UPDATE {schema}.wb_partition_leases SET expires_at = now() + interval '30 seconds'
                  WHERE instance_id = $1"
            ),
            &[&a],
        )
        .await
        .expect("the heartbeat's lease renewal is not chosen as a deadlock victim");
    heartbeat.commit().await.unwrap();
    releasing
        .await
        .unwrap()
        .expect("the release is not chosen as a deadlock victim");
    let held: i64 = watcher
        .query_one(
            &format!("SELECT count(*) FROM {schema}.wb_partition_leases WHERE instance_id = $1"),
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "every lease was released");
    let _ = drop_schemas(&[&schema]).await;
}

/// Dedup keys outlive their inbox rows by the retention, counted from receipt, and only a
/// processed message's key is purged (by the heartbeat); marking a message processed is a HOT
/// update (no index entry names processed_at).
#[tokio::test]
async fn postgres_dedup_keys_are_purged_after_retention_once_processed() {
    let _pg = pg::slot().await;
    let (store, schema) = open_postgres(settings()).await;
    let a = instance(&store).await;
    let (old_done, old_pending, new_done) = (event("r", 1), event("r2", 2), event("r3", 3));
    let mut done = Vec::new();
    for (e, complete) in [(&old_done, true), (&old_pending, false), (&new_done, true)] {
        let r = batch(&store, a, units(vec![inbox_only(e, true)])).await;
        let claimed = committed(&r.units[0]).2;
        assert_eq!(claimed.len(), 1);
        if complete {
            done.push(claimed[0].work);
        }
    }
    let completions = WorkBatch {
        inbox_completions: done,
        ..WorkBatch::default()
    };
    assert!(batch(&store, a, completions).await.stale.is_empty());
    let client = connect().await;
    // Received a retention (168 h by default) and more ago.
    client
        .execute(
            &format!(
                "UPDATE {schema}.wb_dedup SET received_at = now() - interval '169 hours'
                  WHERE message_id = ANY($1)"
            ),
            &[&vec![old_done.message_id, old_pending.message_id]],
        )
        .await
        .unwrap();
    store.heartbeat(a).await.unwrap();
    let kept: Vec<Uuid> = client
        .query(
            &format!("SELECT message_id FROM {schema}.wb_dedup ORDER BY message_id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut expected = vec![old_pending.message_id, new_done.message_id];
    expected.sort();
    assert_eq!(kept, expected, "only the old processed key goes");
    // Only this table's indexes are described: `pg_indexes` may describe those of every schema
    // before it filters, and another test dropping its schema then fails the description.
    let indexed: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_index x WHERE x.indrelid = '{schema}.wb_dedup'::regclass
                    AND pg_get_indexdef(x.indexrelid) LIKE '%processed_at%'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(indexed, 0, "an index on processed_at rules out HOT updates");
    let _ = drop_schemas(&[&schema]).await;
}

/// Postgres only: the queue probes keep going through their indexes after `wb_outbox` and
/// `wb_inbox` were vacuumed while empty (as autovacuum does once a queue drains). Such a VACUUM
/// truncates the table to no pages and makes the functions plan again; without their plans
/// pinned (schema 0012) the planner took the tables for empty and probed them row by row with a
/// sequential scan, so every new row read every queued one. Sequential scans of the queue tables
/// are counted by the server's statistics, which a backend publishes within ~10 s of going idle.
#[tokio::test]
async fn postgres_queue_probes_use_their_indexes_after_a_vacuum_of_the_empty_queues() {
    let _pg = pg::slot().await;
    let (store, schema) = open_postgres(settings()).await;
    let a = instance(&store).await;
    let client = connect().await;
    for table in ["wb_outbox", "wb_inbox"] {
        client
            .batch_execute(&format!("VACUUM {schema}.{table}"))
            .await
            .unwrap();
    }
    let client = Arc::new(client);
    let sql = format!(
        "SELECT coalesce(sum(seq_scan), 0)::bigint, coalesce(sum(idx_scan), 0)::bigint
           FROM pg_stat_user_tables
          WHERE schemaname = '{schema}' AND relname IN ('wb_outbox', 'wb_inbox')"
    );
    let scans = || {
        let (client, sql) = (client.clone(), sql.clone());
        async move {
            let row = client.query_one(&sql, &[]).await.unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    };
    let (seq_before, idx_before) = scans().await;
    // Two batches of 50 units on streams of their own, then one unit alone (the one-message
    // function): every row is probed for older rows of its stream, in both queues, and the
    // second and third batches find rows queued by the first.
    for round in 0..2 {
        let units_of_round = (0..50)
            .map(|i| unit(&event(&format!("vacuumed-{round}-{i}"), 1), true))
            .collect();
        batch(&store, a, units(units_of_round)).await;
    }
    batch(
        &store,
        a,
        units(vec![unit(&event("vacuumed-0-0", 2), true)]),
    )
    .await;
    let (seq_after, _) = eventually(30, "the batches' scans in the statistics", || {
        let scans = scans();
        async move {
            let (seq, idx) = scans.await;
            (seq > seq_before || idx > idx_before).then_some((seq, idx))
        }
    })
    .await;
    assert_eq!(
        seq_after - seq_before,
        0,
        "the batches scanned wb_outbox or wb_inbox sequentially after the vacuum"
    );
    let _ = drop_schemas(&[&schema]).await;
}

/// A read model's run for the store cases: counts its runs and stages one effect, counted when
/// the store runs it (with the commit).
struct Counted {
    runs: std::sync::atomic::AtomicUsize,
    effects: Arc<std::sync::atomic::AtomicUsize>,
    refuse: bool,
}

impl Counted {
    fn new(refuse: bool) -> Counted {
        Counted {
            runs: Default::default(),
            effects: Default::default(),
            refuse,
        }
    }
    fn runs(&self) -> usize {
        self.runs.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn effects(&self) -> usize {
        self.effects.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ApplyInTx for Counted {
    fn apply<'a>(
        &'a self,
        tx: &'a mut ReadModelTx<'_>,
    ) -> futures::future::BoxFuture<'a, Result<(), Refused>> {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let effects = self.effects.clone();
        tx.on_commit(move || {
            effects.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let refuse = self.refuse;
        Box::pin(async move { if refuse { Err(Refused) } else { Ok(()) } })
    }
}

async fn a_read_model_applies_each_event_once(b: Backend) {
    let store = open(b, settings()).await;
    let id = Uuid::now_v7();
    // Refused: nothing recorded, the staged effect never runs.
    let refusing = Counted::new(true);
    let r = store.apply_once("summary", id, false, &refusing).await;
    assert_eq!(r.unwrap(), AppliedOnce::Refused);
    assert_eq!((refusing.runs(), refusing.effects()), (1, 0));
    // Applied once; a second run of the same event (a redelivery, a retry after a crash
    // before the completion) is not applied again.
    let model = Counted::new(false);
    let r = store.apply_once("summary", id, false, &model).await;
    assert_eq!(r.unwrap(), AppliedOnce::Applied);
    let r = store.apply_once("summary", id, false, &model).await;
    assert_eq!(r.unwrap(), AppliedOnce::AlreadyApplied);
    assert_eq!((model.runs(), model.effects()), (1, 1));
    // Another read model is recorded apart.
    let other = Counted::new(false);
    let r = store.apply_once("other", id, false, &other).await;
    assert_eq!(r.unwrap(), AppliedOnce::Applied);
    // A replay (a rebuild) applies it whatever was recorded, and the record stays.
    let r = store.apply_once("summary", id, true, &model).await;
    assert_eq!(r.unwrap(), AppliedOnce::Applied);
    assert_eq!((model.runs(), model.effects()), (2, 2));
    let r = store.apply_once("summary", id, false, &model).await;
    assert_eq!(r.unwrap(), AppliedOnce::AlreadyApplied);
}

/// The inline read models of one unit, for the store cases: records the appended events it was
/// given and answers each as applied by `model`.
struct InlineModels {
    model: &'static str,
    refuse: bool,
    seen: std::sync::Mutex<Vec<AppendedEvent>>,
    effects: Arc<std::sync::atomic::AtomicUsize>,
}

impl InlineModels {
    fn new(model: &'static str, refuse: bool) -> InlineModels {
        InlineModels {
            model,
            refuse,
            seen: Default::default(),
            effects: Default::default(),
        }
    }
}

impl InlineApply for InlineModels {
    fn apply<'a>(
        &'a self,
        tx: &'a mut ReadModelTx<'_>,
        appended: &'a [AppendedEvent],
    ) -> futures::future::BoxFuture<'a, Result<Vec<(String, Uuid)>, Refused>> {
        self.seen.lock().unwrap().extend(appended.iter().cloned());
        let effects = self.effects.clone();
        tx.on_commit(move || {
            effects.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let answer = if self.refuse {
            Err(Refused)
        } else {
            Ok(appended
                .iter()
                .map(|a| (self.model.to_string(), a.message_id))
                .collect())
        };
        Box::pin(async move { answer })
    }
}

async fn an_inline_unit_commits_with_its_read_models_or_not_at_all(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    // Refused: nothing of the unit is written (no event, no queue row to claim).
    let e0 = event("inline", 0);
    let refusing = InlineModels::new("summary", true);
    let r = store.commit_inline(a, unit(&e0, true), &refusing).await;
    assert!(matches!(r.unwrap(), InlineOutcome::Refused));
    assert_eq!(refusing.seen.lock().unwrap()[0].version, 1);
    assert_eq!(
        refusing.effects.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(store.read_stream("inline", 1).await.unwrap().is_empty());
    let claimed = batch(&store, a, claim_all()).await;
    assert!(claimed.claimed_outbox.is_empty() && claimed.claimed_inbox.is_empty());

    // Committed: the read model saw the versions and positions the events got, its effect ran,
    // and each event is recorded as applied by it.
    let before = UnitOfWork {
        events: vec![event("before", 1)],
        ..UnitOfWork::default()
    };
    batch(&store, a, units(vec![before])).await;
    let (e1, e2) = (event("inline", 1), event("inline", 2));
    let mut u = unit(&e1, true);
    u.events.push(e2.clone());
    let models = InlineModels::new("summary", false);
    let outcome = match store.commit_inline(a, u, &models).await.unwrap() {
        InlineOutcome::Unit(o) => o,
        InlineOutcome::Refused => panic!("refused"),
    };
    let appended = committed(&outcome).0.clone();
    assert_eq!(
        appended
            .iter()
            .map(|e| (e.version, e.position))
            .collect::<Vec<_>>(),
        [(1, 2), (2, 3)]
    );
    assert_eq!(*models.seen.lock().unwrap(), appended);
    assert_eq!(models.effects.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(store.read_stream("inline", 1).await.unwrap().len(), 2);
    for e in [&e1, &e2] {
        let again = Counted::new(false);
        let r = store
            .apply_once("summary", e.message_id, false, &again)
            .await;
        assert_eq!(r.unwrap(), AppliedOnce::AlreadyApplied);
    }
    // Its rows were not leased to the writer: they wait for a claim.
    let (_, claimed_outbox, claimed_inbox, _) = committed(&outcome);
    assert!(claimed_outbox.is_empty() && claimed_inbox.is_empty());
    let claimed = eventually(10, "the inline unit's rows to be claimed", || {
        let store = store.clone();
        async move {
            let r = batch(&store, a, claim_all()).await;
            (!r.claimed_inbox.is_empty()).then_some(r)
        }
    })
    .await;
    assert_eq!(claimed.claimed_inbox.len(), 1, "the unit had one inbox row");
    assert_eq!(
        claimed.claimed_outbox.len(),
        1,
        "the unit had one outbox row"
    );

    // A version conflict writes nothing and runs no read model.
    let mut late = unit(&event("inline", 3), true);
    late.expectations = vec![("inline".into(), ExpectedVersion::Exact(1))];
    let unrun = InlineModels::new("summary", false);
    match store.commit_inline(a, late, &unrun).await.unwrap() {
        InlineOutcome::Unit(UnitOutcome::Conflict { actual, .. }) => assert_eq!(actual, 2),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(unrun.seen.lock().unwrap().is_empty());
    assert_eq!(store.read_stream("inline", 1).await.unwrap().len(), 2);
}

async fn an_inbox_claim_carries_the_events_version_and_position(b: Backend) {
    let store = open(b, settings()).await;
    let a = instance(&store).await;
    let (e1, e2) = (event("placed", 1), event("placed", 2));
    // Leased to the writer at once.
    let r = batch(&store, a, units(vec![unit(&e1, true)])).await;
    let claimed = &committed(&r.units[0]).2;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].version, claimed[0].position),
        (Some(1), Some(1))
    );
    // Claimed later.
    batch(&store, a, units(vec![unit(&e2, false)])).await;
    // An event received from elsewhere: not in this event store.
    let received = event("received", 1);
    batch(&store, a, units(vec![inbox_only(&received, false)])).await;
    let mut found = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while found.len() < 2 && Instant::now() < deadline {
        let r = batch(&store, a, claim_all()).await;
        found.extend(r.claimed_inbox);
    }
    let place = |id: Uuid| {
        let w = found
            .iter()
            .find(|w| w.envelope.message_id == id)
            .unwrap_or_else(|| panic!("{id} claimed, of {found:?}"));
        (w.version, w.position)
    };
    assert_eq!(place(e2.message_id), (Some(2), Some(2)));
    assert_eq!(place(received.message_id), (None, None));
}

/// Postgres only: a read model's statements run in the transaction that records it, so a
/// refusal after its write leaves nothing of the write, and an applied event's write and
/// record are there together.
#[tokio::test]
async fn postgres_a_read_models_writes_commit_with_its_record() {
    let _pg = pg::slot().await;
    let (store, schema) = open_postgres(settings()).await;
    let client = connect().await;
    client
        .execute(
            &format!("CREATE TABLE {schema}.rm_rows (id uuid PRIMARY KEY)"),
            &[],
        )
        .await
        .unwrap();

    struct Writes {
        table: String,
        id: Uuid,
        refuse_after_write: bool,
    }
    impl ApplyInTx for Writes {
        fn apply<'a>(
            &'a self,
            tx: &'a mut ReadModelTx<'_>,
        ) -> futures::future::BoxFuture<'a, Result<(), Refused>> {
            Box::pin(async move {
                let pg = tx.postgres().expect("the Postgres transaction");
                pg.execute(
                    &format!("INSERT INTO {} (id) VALUES ($1)", self.table),
                    &[&self.id],
                )
                .await
                .map_err(|_| Refused)?;
                if self.refuse_after_write {
                    Err(Refused)
                } else {
                    Ok(())
                }
            })
        }
    }
    let id = Uuid::now_v7();
    let table = format!("{schema}.rm_rows");
    let rows = || async {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {schema}.rm_rows"), &[])
            .await
            .unwrap()
            .get(0);
        let recorded: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {schema}.wb_read_model_applied"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n, recorded)
    };
    let refusing = Writes {
        table: table.clone(),
        id,
        refuse_after_write: true,
    };
    let r = store
        .apply_once("rows", id, false, &refusing)
        .await
        .unwrap();
    assert_eq!(r, AppliedOnce::Refused);
    assert_eq!(rows().await, (0, 0), "the write went with the refusal");
    let writes = Writes {
        table,
        id,
        refuse_after_write: false,
    };
    let r = store.apply_once("rows", id, false, &writes).await.unwrap();
    assert_eq!(r, AppliedOnce::Applied);
    assert_eq!(rows().await, (1, 1));
    // Applied again, the insert would fail on its primary key: it is not run at all.
    let r = store.apply_once("rows", id, false, &writes).await.unwrap();
    assert_eq!(r, AppliedOnce::AlreadyApplied);
    assert_eq!(rows().await, (1, 1));
    let _ = drop_schemas(&[&schema]).await;
}
