//! An inbox commit fails while later deliveries of the same streams are already in hand (the
//! prefetch window of a real AMQP 1.0 link): the failed ones are released, and no delivery
//! received after them may enter the inbox before they come back — each stream is still
//! applied once, in publish order (contracts 4 and 5).
//!
//! Found by the chaos run (`whizbang-chaos`, a Postgres restart at 1,500 events/s): the
//! consumer released a failed batch and committed the next deliveries of its window first,
//! 205 applications out of stream order.

use crate::support::amqp::*;
use crate::support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use uuid::Uuid;
use whizbang::Runtime;
use whizbang::store::memory::MemoryStore;
use whizbang::store::{Store, StoreError, WorkBatch, WorkBatchResult};

/// Fails the first `n` work batches that carry inbox rows, without committing them (the
/// database went away mid-batch).
struct FailsInboxBatches {
    left: AtomicUsize,
    failed: AtomicUsize,
}

#[async_trait::async_trait]
impl BatchHook for FailsInboxBatches {
    async fn process(
        &self,
        inner: &MemoryStore,
        instance: Uuid,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let has_inbox = batch.units.iter().any(|u| !u.inbox.is_empty());
        if has_inbox
            && self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::unavailable(
                "connection closed mid-batch (injected)",
            ));
        }
        inner.process_work_batch(instance, batch).await
    }
}

#[actix::test]
async fn a_failed_inbox_commit_lets_nothing_later_overtake_the_released_deliveries()
-> anyhow::Result<()> {
    const STREAMS: u32 = 20;
    const EVENTS: u32 = 40;
    let _broker = require_broker().await?;
    let topic = unique("inbox-fail");
    let _topology = Topology::declare(&[(&topic, &["down"])])?;

    // The queue is full before the consumer starts, so its first window is full too.
    let transport = amqp_transport();
    let streams: Vec<String> = (0..STREAMS).map(|s| unique(&format!("s{s}"))).collect();
    for seq in 1..=EVENTS {
        for stream in &streams {
            whizbang::transport::Transport::publish(
                transport.as_ref(),
                &topic,
                &event_envelope(&Bumped::new(stream, seq)),
            )
            .await?;
        }
    }

    let mut config = subscribed(amqp_config("inbox-fail-down"), &topic, "down");
    config.transport.prefetch = 200;
    let hook = Arc::new(HookedStore::new(
        &config,
        FailsInboxBatches {
            left: AtomicUsize::new(2),
            failed: AtomicUsize::new(0),
        },
    ));
    let recorder = Recorder::default();
    let rt: Runtime = Runtime::builder(config)
        .store(hook.clone() as Arc<dyn Store>)
        .perspective::<Bumped, _>("recorder", recorder.clone())
        .start()
        .await?;

    let expected = (STREAMS * EVENTS) as usize;
    wait_until("every event applied", || recorder.total() >= expected).await?;
    anyhow::ensure!(
        hook.hook.failed.load(Ordering::SeqCst) == 2,
        "the hook failed {} inbox batches, expected 2",
        hook.hook.failed.load(Ordering::SeqCst)
    );
    let in_order: Vec<u32> = (1..=EVENTS).collect();
    for stream in &streams {
        let seqs = recorder.seqs(stream);
        anyhow::ensure!(
            seqs == in_order,
            "stream {stream} applied as {seqs:?}, expected 1..={EVENTS} once each in order"
        );
    }
    anyhow::ensure!(
        recorder.duplicates().is_empty(),
        "{:?}",
        recorder.duplicates()
    );
    rt.shutdown().await?;
    Ok(())
}
