//! Inbox order across instances, at the store's level: a redelivered message whose first inbox
//! insert (by another instance) is still uncommitted makes the batch wait on its dedup key, and
//! the rows after it in that batch must then not be leased to the writer ahead of it.
//!
//! This is the store half of a competing-consumer handover: instance A commits message 5 of a
//! stream while its link is dropped, the broker gives 5 and 6 to instance B, and B's batch
//! waits for A's transaction. Deciding B's claim of 6 with a snapshot from before that wait
//! did not see A's 5 and leased 6 to B's writer at once, so B applied 6 before it polled 5.

use crate::support::pg::{self, connect, drop_schemas, new_schema, on_postgres};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;
use whizbang::envelope::{Envelope, MessageKind};
use whizbang::routing::partition_of;
use whizbang::store::postgres::PostgresStore;
use whizbang::store::*;

const PARTITIONS: u32 = 16;

async fn open(schema: &str) -> Arc<dyn Store> {
    let mut c = on_postgres(whizbang::Config::default(), schema);
    c.store.startup_timeout_ms = 10_000;
    c.store.pool_size = 2;
    c.service.name = "inbox-order".into();
    c.partitions.partition_count = PARTITIONS;
    c.partitions.max_partitions_per_instance = PARTITIONS;
    Arc::new(
        PostgresStore::connect(&c)
            .await
            .expect("Postgres must be reachable"),
    )
}

fn inbox_unit(stream: &str, envelopes: &[Envelope]) -> WorkBatch {
    let partition = partition_of(stream, PARTITIONS);
    WorkBatch {
        units: vec![UnitOfWork {
            inbox: envelopes
                .iter()
                .map(|e| NewInboxRow {
                    envelope: e.clone(),
                    partition,
                })
                .collect(),
            claim_for_writer: true,
            ..UnitOfWork::default()
        }],
        ..WorkBatch::default()
    }
}

fn committed(r: &WorkBatchResult) -> (&Vec<InboxWork>, &Vec<Uuid>) {
    match &r.units[0] {
        UnitOutcome::Committed {
            claimed_inbox,
            duplicate_inbox,
            ..
        } => (claimed_inbox, duplicate_inbox),
        other => panic!("not committed: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_after_a_redelivery_that_waited_on_another_instance_are_not_leased_ahead_of_it() {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let store = open(&schema).await;
    let b = Uuid::now_v7();
    store
        .register_instance(b, "inbox-order", "b")
        .await
        .unwrap();
    let stream = "order-7";
    let event = |n: u8| Envelope::new(MessageKind::Event, "Tick", stream.to_string(), vec![n]);

    // B's writer holds the stream's partition and has message 4 in hand.
    let four = event(4);
    let r = store
        .process_work_batch(b, inbox_unit(stream, std::slice::from_ref(&four)))
        .await
        .unwrap();
    let (claimed, _) = committed(&r);
    assert_eq!(claimed.len(), 1, "B leases the partition and takes 4");
    let four_work = claimed[0].work;

    // Instance A's transaction inserts 5 (its dedup key and its inbox row, unclaimed: A does
    // not hold the partition) and has not committed.
    let (five, six) = (event(5), event(6));
    let mut a = connect().await;
    let tx = a.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {schema}.wb_dedup (message_id, correlation_id) VALUES ($1, $2)"),
        &[&five.message_id, &five.correlation_id],
    )
    .await
    .unwrap();
    tx.execute(
        &format!(
            "INSERT INTO {schema}.wb_inbox (message_id, message_kind, stream_id, partition,
                    correlation_id, causation_id, message_type, timestamp_us, meta, payload)
             SELECT $1, message_kind, stream_id, partition, $2, causation_id, message_type,
                    timestamp_us, meta, '\\x05'::bytea
               FROM {schema}.wb_inbox WHERE message_id = $3"
        ),
        &[&five.message_id, &five.correlation_id, &four.message_id],
    )
    .await
    .unwrap();

    // The broker redelivers 5, then 6, to B: B's batch waits on 5's dedup key.
    let batch = {
        let store = store.clone();
        let rows = [five.clone(), six.clone()];
        tokio::spawn(async move { store.process_work_batch(b, inbox_unit(stream, &rows)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!batch.is_finished(), "B's batch waits for A's transaction");
    tx.commit().await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), batch)
        .await
        .expect("B's batch ends once A commits")
        .unwrap()
        .unwrap();
    let (claimed, duplicates) = committed(&r);
    assert_eq!(duplicates, &vec![five.message_id], "5 was A's");
    assert!(
        claimed.is_empty(),
        "6 must not be leased to B's writer while 5 waits in the inbox: {:?}",
        claimed
            .iter()
            .map(|w| w.envelope.payload.clone())
            .collect::<Vec<_>>()
    );

    // B finishes 4; its next claim hands out 5 before 6.
    let r = store
        .process_work_batch(
            b,
            WorkBatch {
                inbox_completions: vec![four_work],
                claim: Some(ClaimBudget {
                    outbox: 0,
                    inbox: 100,
                }),
                ..WorkBatch::default()
            },
        )
        .await
        .unwrap();
    let order: Vec<Uuid> = r
        .claimed_inbox
        .iter()
        .map(|w| w.envelope.message_id)
        .collect();
    assert_eq!(order, vec![five.message_id, six.message_id], "5, then 6");
    drop(store);
    drop_schemas(&[&schema]).await.unwrap();
}
