//! Backpressure inside the instance: at most `coordinator.max_rows_in_flight` rows per queue are
//! handed to partition actors (and so held in memory) at once. A backlog larger than that stays
//! in the store, whether it arrives through the broker (the consumer's units) or is found by a
//! claim, and is taken as the handlers finish; nothing is lost and each stream stays in order.

use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use whizbang::transport::memory::MemoryBus;
use whizbang::{Config, EventMeta, Perspective, PerspectiveError};

const TOPIC: &str = "backlog";
const SUBSCRIPTION: &str = "receiver";
const LIMIT: u32 = 5;
const STREAMS: u32 = 60;
const EVENTS: u32 = 3;

/// Records each event once the gate lets it through; counts how many are waiting at it.
#[derive(Clone)]
struct GatedRecorder {
    gate: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    recorder: Recorder,
}

impl Perspective<Bumped> for GatedRecorder {
    async fn apply(&self, event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.gate
            .acquire()
            .await
            .map_err(|e| PerspectiveError(e.to_string()))?
            .forget();
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        Perspective::<Bumped>::apply(&self.recorder, event, meta).await
    }
}

async fn a_backlog_beyond_the_limit_waits_in_the_store(mut c: Config) -> anyhow::Result<()> {
    c.coordinator.max_rows_in_flight = LIMIT;
    let bus = MemoryBus::new();
    let perspective = GatedRecorder {
        gate: Arc::new(Semaphore::new(0)),
        waiting: Arc::new(AtomicUsize::new(0)),
        recorder: Recorder::new(),
    };
    let rt = on_bus(subscribed(c, TOPIC, SUBSCRIPTION), &bus)
        .perspective::<Bumped, _>("gated", perspective.clone())
        .start()
        .await?;
    for seq in 1..=EVENTS {
        for s in 0..STREAMS {
            bus.inject(TOPIC, event_envelope(&Bumped::new(format!("s-{s}"), seq)));
        }
    }
    // The consumer takes every delivery into the inbox (the broker is drained), but hands at
    // most LIMIT rows to the partition actors while the perspective holds them.
    wait_until("the broker drained into the inbox", || {
        bus.depth(TOPIC, SUBSCRIPTION) == 0
    })
    .await?;
    wait_until("the perspective holding rows", || {
        perspective.waiting.load(Ordering::SeqCst) > 0
    })
    .await?;
    holds_for(
        "the rows in flight within the limit",
        Duration::from_secs(1),
        || {
            rt.health().inbox_rows_in_flight <= LIMIT as usize
                && perspective.waiting.load(Ordering::SeqCst) <= LIMIT as usize
        },
    )
    .await?;
    assert_eq!(perspective.recorder.total(), 0);
    perspective.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    wait_until("every event applied", || {
        perspective.recorder.total() == (STREAMS * EVENTS) as usize
    })
    .await?;
    for s in 0..STREAMS {
        assert_eq!(
            perspective.recorder.seqs(&format!("s-{s}")),
            (1..=EVENTS).collect::<Vec<_>>()
        );
    }
    assert_eq!(perspective.recorder.duplicates(), vec![]);
    rt.shutdown().await?;
    Ok(())
}

#[actix_rt::test]
async fn a_backlog_beyond_the_limit_waits_in_the_memory_store() {
    a_backlog_beyond_the_limit_waits_in_the_store(config("backpressure"))
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_backlog_beyond_the_limit_waits_in_postgres() {
    let _pg = pg::slot().await;
    let schema = new_schema();
    a_backlog_beyond_the_limit_waits_in_the_store(on_postgres(config("backpressure-pg"), &schema))
        .await
        .unwrap();
    pg::drop_schemas(&[&schema]).await.unwrap();
}
