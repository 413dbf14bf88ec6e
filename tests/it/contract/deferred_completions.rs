//! Completions (published outbox rows, processed inbox rows) do not ride with the units of the
//! scoped and immediate strategies: a writer waiting for its unit does not pay for deleting the
//! rows of earlier calls. The flush timer writes them, and shutdown drains them. On the memory
//! store behind a hook that records what each batch carries.

use crate::support::*;
use std::sync::Mutex;
use uuid::Uuid;
use whizbang::config::FlushStrategy;
use whizbang::store::memory::MemoryStore;
use whizbang::store::{Store, StoreError, WorkBatch, WorkBatchResult};

/// What one batch carried: units, completions.
#[derive(Default)]
struct Carried(Mutex<Vec<(usize, usize)>>);

impl Carried {
    fn batches(&self) -> Vec<(usize, usize)> {
        self.0.lock().unwrap().clone()
    }
    fn completions(&self) -> usize {
        self.batches().iter().map(|(_, c)| c).sum()
    }
}

#[async_trait::async_trait]
impl BatchHook for Carried {
    async fn process(
        &self,
        inner: &MemoryStore,
        instance: Uuid,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let carried = (batch.units.len(), batch.completions());
        self.0.lock().unwrap().push(carried);
        inner.process_work_batch(instance, batch).await
    }
}

const CALLS: u32 = 20;

/// A runtime whose `Bumped` events are published and applied by a local perspective, so each
/// call leaves two rows to complete (its outbox row and its inbox row).
async fn runtime(
    strategy: FlushStrategy,
    flush_interval_ms: u64,
) -> anyhow::Result<(whizbang::Runtime, std::sync::Arc<HookedStore<Carried>>)> {
    let mut c = publishing(config("deferred"), "test.Bumped", "bumped");
    c.coordinator.flush_strategy = strategy;
    c.coordinator.flush_interval_ms = flush_interval_ms;
    let hooked = std::sync::Arc::new(HookedStore::new(&c, Carried::default()));
    let rt = whizbang::Runtime::builder(c)
        .store(hooked.clone())
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("local", Recorder::new())
        .start()
        .await?;
    Ok((rt, hooked))
}

async fn invoke_in_turn(rt: &whizbang::Runtime, stream: &str) -> anyhow::Result<()> {
    for seq in 1..=CALLS {
        rt.local_invoke::<Bump, Bumped>(Bump {
            stream: stream.into(),
            seq,
        })
        .await?;
    }
    Ok(())
}

#[actix::test]
async fn units_go_without_completions_and_shutdown_writes_them() -> anyhow::Result<()> {
    for strategy in [FlushStrategy::Scoped, FlushStrategy::Immediate] {
        // A timer that does not fire during the test: only shutdown may write completions.
        let (rt, hooked) = runtime(strategy, 60_000).await?;
        invoke_in_turn(&rt, &unique("deferred")).await?;
        let with_both = hooked
            .hook
            .batches()
            .iter()
            .filter(|(units, completions)| *units > 0 && *completions > 0)
            .count();
        anyhow::ensure!(
            with_both == 0,
            "{strategy:?}: {with_both} unit batches carried completions: {:?}",
            hooked.hook.batches()
        );
        rt.shutdown().await?;
        let written = hooked.hook.completions();
        anyhow::ensure!(
            written == 2 * CALLS as usize,
            "{strategy:?}: {written} completions written by shutdown, expected {}",
            2 * CALLS
        );
    }
    Ok(())
}

#[actix::test]
async fn the_flush_timer_writes_completions() -> anyhow::Result<()> {
    let (rt, hooked) = runtime(FlushStrategy::Scoped, 20).await?;
    invoke_in_turn(&rt, &unique("timer")).await?;
    wait_until("every completion written by the timer", || {
        hooked.hook.completions() == 2 * CALLS as usize
    })
    .await?;
    rt.shutdown().await?;
    Ok(())
}
