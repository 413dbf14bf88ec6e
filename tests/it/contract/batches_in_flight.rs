//! Several work batches of one instance in flight at once (`coordinator.max_batches_in_flight`):
//! they overlap, but never two with units of the same stream, and never a claim (or a batch
//! with failure or release reports) beside another; each stream's events are still applied
//! once and in order. On the memory store with a slow batch, so the overlap is deterministic.

use crate::support::*;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;
use whizbang::store::memory::MemoryStore;
use whizbang::store::{Store, StoreError, WorkBatch, WorkBatchResult};

/// Holds every batch for a few milliseconds and checks, while it is held, what runs beside it.
#[derive(Default)]
struct Overlap {
    running: AtomicUsize,
    most_at_once: AtomicUsize,
    /// Streams of the units of the batches being held, with how many batches hold each.
    streams: Mutex<HashMap<String, usize>>,
    /// A claim, failure or release batch is being held.
    exclusive: Mutex<bool>,
    violations: Mutex<Vec<String>>,
}

impl Overlap {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
}

fn streams_of(batch: &WorkBatch) -> Vec<String> {
    let mut streams: Vec<String> = batch
        .units
        .iter()
        .flat_map(|u| {
            u.events
                .iter()
                .map(|e| e.stream_id.clone())
                .chain(u.inbox.iter().map(|r| r.envelope.stream_id.clone()))
                .chain(u.outbox.iter().map(|r| r.envelope.stream_id.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    streams.sort();
    streams.dedup();
    streams
}

#[async_trait::async_trait]
impl BatchHook for Overlap {
    async fn process(
        &self,
        inner: &MemoryStore,
        instance: Uuid,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let exclusive = batch.claim.is_some()
            || !batch.outbox_failures.is_empty()
            || !batch.inbox_failures.is_empty()
            || !batch.outbox_releases.is_empty()
            || !batch.inbox_releases.is_empty();
        let streams = streams_of(&batch);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        {
            let mut held = self.exclusive.lock().unwrap();
            if *held || (exclusive && now > 1) {
                self.violation(format!(
                    "a batch that must run alone overlapped another ({now} running)"
                ));
            }
            *held = exclusive;
        }
        {
            let mut busy = self.streams.lock().unwrap();
            for s in &streams {
                let n = busy.entry(s.clone()).or_default();
                if *n > 0 {
                    self.violation(format!("stream {s} in two batches at once"));
                }
                *n += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
        let result = inner.process_work_batch(instance, batch).await;
        {
            let mut busy = self.streams.lock().unwrap();
            for s in &streams {
                if let Some(n) = busy.get_mut(s) {
                    *n -= 1;
                }
            }
        }
        if exclusive {
            *self.exclusive.lock().unwrap() = false;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

#[actix::test]
async fn batches_overlap_only_on_distinct_streams_and_keep_each_stream_in_order()
-> anyhow::Result<()> {
    const STREAMS: usize = 12;
    const EVENTS: u32 = 15;
    let mut c = config("in-flight");
    c.coordinator.max_batches_in_flight = 4;
    let hooked = std::sync::Arc::new(HookedStore::new(&c, Overlap::default()));
    let local = Recorder::new();
    let rt = whizbang::Runtime::builder(c)
        .store(hooked.clone())
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;

    let streams: Vec<String> = (0..STREAMS)
        .map(|i| unique(&format!("flight-{i}")))
        .collect();
    let calls = streams.iter().map(|stream| {
        let rt = &rt;
        async move {
            for seq in 1..=EVENTS {
                rt.local_invoke::<Bump, Bumped>(Bump {
                    stream: stream.clone(),
                    seq,
                })
                .await?;
            }
            anyhow::Ok(())
        }
    });
    for r in futures::future::join_all(calls).await {
        r?;
    }

    let violations = hooked.hook.violations.lock().unwrap().clone();
    anyhow::ensure!(violations.is_empty(), "{violations:?}");
    let most = hooked.hook.most_at_once.load(Ordering::SeqCst);
    anyhow::ensure!(
        most >= 2,
        "batches never overlapped (at most {most} at once)"
    );
    anyhow::ensure!(most <= 4, "{most} batches at once, above the configured 4");
    for stream in &streams {
        let seqs = local.seqs(stream);
        anyhow::ensure!(
            seqs == (1..=EVENTS).collect::<Vec<_>>(),
            "{stream}: applied {seqs:?}"
        );
    }
    rt.shutdown().await?;
    Ok(())
}
