//! The heartbeat never overlaps itself: a beat that is due while the previous one is still
//! running is skipped. Overlapping beats of a loaded Postgres queued on the instance's liveness
//! lock, each holding a pooled connection, until no work batch (and no shutdown) got one.

use crate::support::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;
use whizbang::store::memory::MemoryStore;
use whizbang::store::{Heartbeat, StoreError};

/// Makes every heartbeat take three heartbeat intervals, and counts how many run at once.
#[derive(Default)]
struct SlowBeats {
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    done: AtomicUsize,
}

const SLOW_BEAT: Duration = Duration::from_secs(3);

#[async_trait::async_trait]
impl BatchHook for SlowBeats {
    async fn heartbeat(
        &self,
        inner: &MemoryStore,
        instance: Uuid,
    ) -> Result<Heartbeat, StoreError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        // The slow server this stands for: the beat's answer takes three intervals.
        tokio::time::sleep(SLOW_BEAT).await;
        let beat = whizbang::store::Store::heartbeat(inner, instance).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.done.fetch_add(1, Ordering::SeqCst);
        beat
    }
}

#[actix::test]
async fn a_heartbeat_slower_than_its_interval_is_not_overlapped_by_the_next() -> anyhow::Result<()>
{
    let mut c = config("slow-beats");
    c.partitions.heartbeat_seconds = 1;
    c.partitions.lease_seconds = 30;
    let hooked = std::sync::Arc::new(HookedStore::new(&c, SlowBeats::default()));
    let rt = whizbang::Runtime::builder(c)
        .store(hooked.clone())
        .receptor::<Bump, _>(BumpReceptor)
        .start()
        .await?;
    // Two slow beats: six intervals, in which overlapping beats would have started five more.
    wait_until("two slow heartbeats to finish", || {
        hooked.hook.done.load(Ordering::SeqCst) >= 2
    })
    .await?;
    // The runtime still works beside them.
    let _: Bumped = rt
        .local_invoke(Bump {
            stream: unique("beats"),
            seq: 1,
        })
        .await?;
    rt.shutdown().await?;
    let most = hooked.hook.most_at_once.load(Ordering::SeqCst);
    assert_eq!(most, 1, "{most} heartbeats ran at once");
    Ok(())
}
