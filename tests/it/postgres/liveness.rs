//! The liveness lock of the Postgres store, at the store's level: each instance holds a
//! session-level advisory lock of its own (`wb_take_liveness`) on its store's connections, and
//! another instance's heartbeat that finds it free takes the dead instance's partitions over
//! as if their leases had run out, leases of 300 s notwithstanding. Every test works with
//! several stores on one schema, as separate processes would; dropping a store closes its
//! connections as a dying process does.
//!
//! The runtime-level proofs (a child process SIGKILLed with work in flight, an instance's lock
//! connection terminated under load) are in `runtime.rs`.

use crate::support::pg::{self, connect, database_url, drop_schemas, new_schema};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;
use whizbang::envelope::{Envelope, MessageKind};
use whizbang::routing::partition_of;
use whizbang::store::postgres::PostgresStore;
use whizbang::store::*;

const PARTITIONS: u32 = 16;

/// A store on `schema` with the default 300 s lease and the given grace.
async fn open(schema: &str, grace: Option<Duration>) -> Arc<dyn Store> {
    let mut c = whizbang::Config::default();
    c.store.backend = whizbang::config::StoreBackend::Postgres;
    c.store.database_url = database_url().into();
    c.store.schema = schema.into();
    c.store.startup_timeout_ms = 10_000;
    c.store.pool_size = 2;
    c.service.name = "liveness".into();
    c.partitions.partition_count = PARTITIONS;
    c.partitions.max_partitions_per_instance = PARTITIONS;
    c.partitions.heartbeat_seconds = 1;
    assert_eq!(c.partitions.lease_seconds, 300, "the default lease");
    let store = PostgresStore::connect(&c)
        .await
        .expect("Postgres must be reachable");
    Arc::new(match grace {
        Some(grace) => store.with_liveness_grace(grace),
        None => store,
    })
}

async fn instance(store: &Arc<dyn Store>) -> InstanceId {
    let id = Uuid::now_v7();
    store
        .register_instance(id, "liveness", "host")
        .await
        .unwrap();
    id
}

fn event(stream: &str, n: u8) -> Envelope {
    Envelope::new(MessageKind::Event, "Tick", stream.to_string(), vec![n])
}

/// `events` on `stream`, appended with outbox and inbox rows claimed for the writer `by`;
/// answers the writer's claims of the outbox rows.
async fn write(store: &Arc<dyn Store>, by: InstanceId, stream: &str, events: u8) -> Vec<WorkRef> {
    let partition = partition_of(stream, PARTITIONS);
    let units = (1..=events)
        .map(|n| {
            let e = event(stream, n);
            UnitOfWork {
                events: vec![e.clone()],
                outbox: vec![NewOutboxRow {
                    envelope: e.clone(),
                    topic: "t".into(),
                    partition,
                }],
                inbox: vec![NewInboxRow {
                    envelope: e,
                    partition,
                }],
                claim_for_writer: true,
                ..UnitOfWork::default()
            }
        })
        .collect();
    let r = store
        .process_work_batch(
            by,
            WorkBatch {
                units,
                ..WorkBatch::default()
            },
        )
        .await
        .unwrap();
    r.units
        .iter()
        .map(|u| match u {
            UnitOutcome::Committed { claimed_outbox, .. } => {
                assert_eq!(claimed_outbox.len(), 1, "the row is claimed for its writer");
                claimed_outbox[0].work
            }
            other => panic!("not committed: {other:?}"),
        })
        .collect()
}

async fn claim(store: &Arc<dyn Store>, by: InstanceId) -> WorkBatchResult {
    store
        .process_work_batch(
            by,
            WorkBatch {
                claim: Some(ClaimBudget {
                    outbox: 100,
                    inbox: 100,
                }),
                ..WorkBatch::default()
            },
        )
        .await
        .unwrap()
}

/// Live leases of `instance`.
async fn live_leases(client: &Client, schema: &str, instance: InstanceId) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.wb_partition_leases
                  WHERE instance_id = $1 AND expires_at > now()"
            ),
            &[&instance],
        )
        .await
        .unwrap()
        .get(0)
}

/// The sessions holding `instance`'s liveness lock.
async fn lock_holders(client: &Client, schema: &str, instance: InstanceId) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_locks
                  WHERE locktype = 'advisory' AND granted AND objsubid = 2
                    AND classid = {schema}.wb_liveness_class()::oid
                    AND objid = {schema}.wb_liveness_key($1)::oid"
            ),
            &[&instance],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until no session holds `instance`'s lock (the server has seen its connections close).
async fn wait_lock_free(client: &Client, schema: &str, instance: InstanceId) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock_holders(client, schema, instance).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the lock of {instance} outlived its store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn locked_at_is_set(client: &Client, schema: &str, instance: InstanceId) -> bool {
    client
        .query_one(
            &format!(
                "SELECT locked_at IS NOT NULL FROM {schema}.wb_instances WHERE instance_id = $1"
            ),
            &[&instance],
        )
        .await
        .unwrap()
        .get(0)
}

/// An instance holds its lock on two connections from its registration on, and gives it up
/// when it stops gracefully.
#[tokio::test]
async fn an_instance_holds_its_lock_on_two_connections_until_it_stops() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let schema = new_schema();
    let store = open(&schema, None).await;
    let a = instance(&store).await;
    assert!(
        lock_holders(&client, &schema, a).await >= 1,
        "held once registered"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock_holders(&client, &schema, a).await < 2 {
        assert!(Instant::now() < deadline, "held by both connections");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(locked_at_is_set(&client, &schema, a).await);
    let names: Vec<String> = client
        .query(
            &format!(
                "SELECT a.application_name FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
                  WHERE l.locktype = 'advisory' AND l.objsubid = 2
                    AND l.classid = {schema}.wb_liveness_class()::oid
                    AND l.objid = {schema}.wb_liveness_key($1)::oid
                  ORDER BY 1"
            ),
            &[&a],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["whizbang:liveness", "whizbang:liveness:lock"]);
    store.release_partitions(a, None).await.unwrap();
    wait_lock_free(&client, &schema, a).await;
    drop(store);
    drop_schemas(&[&schema]).await.unwrap();
}

/// A process that dies frees its lock at once, and the next heartbeat of another instance takes
/// its partitions over with its work, although its leases (300 s) are far from over: the next
/// claim leases them under a new generation, so what the dead instance would report (were it
/// alive after all, cut off) is refused. It is not counted live any more.
#[tokio::test]
async fn a_dead_instances_partitions_are_taken_over_at_the_next_heartbeat() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let schema = new_schema();
    let survivor_store = open(&schema, None).await;
    let survivor = instance(&survivor_store).await;
    let dead_store = open(&schema, None).await;
    let dead = instance(&dead_store).await;
    let claims = write(&dead_store, dead, "crashed", 3).await;
    dead_store.heartbeat(dead).await.unwrap();

    // Alive: nothing moves.
    let hb = survivor_store.heartbeat(survivor).await.unwrap();
    assert_eq!(hb.live_instances, 2);
    assert_eq!(live_leases(&client, &schema, dead).await, 1);
    let r = claim(&survivor_store, survivor).await;
    assert!(r.claimed_outbox.is_empty() && r.claimed_inbox.is_empty());

    // The process dies. A heartbeat it sent just before, run by the server after its death
    // (here: through the survivor's store), changes nothing of how it is judged.
    drop(dead_store);
    wait_lock_free(&client, &schema, dead).await;
    survivor_store.heartbeat(dead).await.unwrap();
    let hb = survivor_store.heartbeat(survivor).await.unwrap();
    assert_eq!(
        hb.live_instances, 1,
        "the dead instance is not counted live"
    );
    assert_eq!(live_leases(&client, &schema, dead).await, 0);
    // One run after the judge renews the leases nobody has taken yet: judged again.
    survivor_store.heartbeat(dead).await.unwrap();
    assert_eq!(live_leases(&client, &schema, dead).await, 1);
    survivor_store.heartbeat(survivor).await.unwrap();
    assert_eq!(live_leases(&client, &schema, dead).await, 0);
    let r = claim(&survivor_store, survivor).await;
    let ids: Vec<Uuid> = r.claimed_outbox.iter().map(|w| w.work.message_id).collect();
    assert_eq!(
        ids,
        claims.iter().map(|w| w.message_id).collect::<Vec<_>>(),
        "the dead instance's rows, in order"
    );
    assert_eq!(r.claimed_inbox.len(), 3);
    assert!(r.claimed_outbox[0].work.generation > claims[0].generation);
    assert_eq!(
        survivor_store.heartbeat(survivor).await.unwrap().taken_over,
        vec![partition_of("crashed", PARTITIONS)],
        "the survivor's heartbeat reports the takeover"
    );
    // The old holder's late report is fenced; the new holder's is not.
    let late = survivor_store
        .process_work_batch(
            dead,
            WorkBatch {
                outbox_completions: claims.clone(),
                ..WorkBatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        late.stale.len(),
        3,
        "the dead instance's reports are refused"
    );
    let done = survivor_store
        .process_work_batch(
            survivor,
            WorkBatch {
                outbox_completions: r.claimed_outbox.iter().map(|w| w.work).collect(),
                inbox_completions: r.claimed_inbox.iter().map(|w| w.work).collect(),
                ..WorkBatch::default()
            },
        )
        .await
        .unwrap();
    assert!(done.stale.is_empty());
    drop(survivor_store);
    drop_schemas(&[&schema]).await.unwrap();
}

/// After a server restart every instance is reconnecting: one that has just taken its lock
/// again must not take the partitions of one that has not yet. So an instance judges another
/// by its lock only if that one is known to have held its lock after the judge took its own
/// (it took it then, or a heartbeat, its own or another instance's, found it held), or once
/// the judge has held its own for the grace. Here P starts after X, Y and W; X dies; Y then
/// heartbeats (seeing its own lock and W's held, X's free); Y and W die.
#[tokio::test]
async fn a_young_instance_judges_one_it_has_not_seen_alive_only_after_the_grace() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let schema = new_schema();
    let x_store = open(&schema, None).await;
    let x = instance(&x_store).await;
    let y_store = open(&schema, None).await;
    let y = instance(&y_store).await;
    let w_store = open(&schema, None).await;
    let w = instance(&w_store).await;
    write(&x_store, x, "unseen", 1).await;
    write(&y_store, y, "seen", 1).await;
    write(&w_store, w, "seen-by-another", 1).await;
    let p_store = open(&schema, None).await;
    let p = instance(&p_store).await;
    drop(x_store);
    wait_lock_free(&client, &schema, x).await;
    y_store.heartbeat(y).await.unwrap();
    assert_eq!(
        live_leases(&client, &schema, x).await,
        1,
        "Y, older than X's last sign of life by less than the grace, does not judge it"
    );
    drop((y_store, w_store));
    wait_lock_free(&client, &schema, y).await;
    wait_lock_free(&client, &schema, w).await;

    p_store.heartbeat(p).await.unwrap();
    assert_eq!(
        live_leases(&client, &schema, y).await,
        0,
        "Y, seen alive by itself"
    );
    assert_eq!(
        live_leases(&client, &schema, w).await,
        0,
        "W, seen alive by Y"
    );
    assert_eq!(
        live_leases(&client, &schema, x).await,
        1,
        "X, not seen alive, waits for the grace"
    );
    // The same instance with its grace over (its lock is held by p_store's connections).
    let judge = open(&schema, Some(Duration::ZERO)).await;
    judge.heartbeat(p).await.unwrap();
    assert_eq!(live_leases(&client, &schema, x).await, 0);
    drop((p_store, judge));
    drop_schemas(&[&schema]).await.unwrap();
}

/// An instance with no lock recorded (an older build, which takes none) is judged by its leases
/// only: nobody takes its partitions before they expire.
#[tokio::test]
async fn an_instance_without_a_recorded_lock_is_judged_by_its_leases() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let schema = new_schema();
    let p_store = open(&schema, None).await;
    let p = instance(&p_store).await;
    let old = Uuid::now_v7();
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.wb_instances (instance_id, service, host)
                 VALUES ($1, 'liveness', 'old')"
            ),
            &[&old],
        )
        .await
        .unwrap();
    write(&p_store, old, "old-build", 1).await;
    assert!(!locked_at_is_set(&client, &schema, old).await);
    assert_eq!(lock_holders(&client, &schema, old).await, 0);
    p_store.heartbeat(p).await.unwrap();
    assert_eq!(
        live_leases(&client, &schema, old).await,
        1,
        "left to its lease"
    );
    let r = claim(&p_store, p).await;
    assert!(r.claimed_outbox.is_empty() && r.claimed_inbox.is_empty());
    drop(p_store);
    drop_schemas(&[&schema]).await.unwrap();
}

/// An instance whose lock is free judges nobody: it may be reconnecting after a server restart,
/// when every other instance's lock is free too, or be a dead process whose last heartbeat the
/// server runs after its death. An instance holding its own lock judges both.
#[tokio::test]
async fn an_instance_without_its_lock_judges_nobody() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let schema = new_schema();
    let p_store = open(&schema, None).await;
    let p = instance(&p_store).await;
    let x_store = open(&schema, None).await;
    let x = instance(&x_store).await;
    let z_store = open(&schema, None).await;
    let z = instance(&z_store).await;
    write(&x_store, x, "x-stream", 1).await;
    write(&z_store, z, "z-stream", 1).await;
    drop((x_store, z_store));
    wait_lock_free(&client, &schema, x).await;
    wait_lock_free(&client, &schema, z).await;
    // X's heartbeat, without its lock (through another store).
    p_store.heartbeat(x).await.unwrap();
    assert_eq!(live_leases(&client, &schema, z).await, 1);
    assert_eq!(
        live_leases(&client, &schema, x).await,
        1,
        "renewed, as ever"
    );
    p_store.heartbeat(p).await.unwrap();
    assert_eq!(live_leases(&client, &schema, z).await, 0);
    assert_eq!(live_leases(&client, &schema, x).await, 0);
    drop(p_store);
    drop_schemas(&[&schema]).await.unwrap();
}
