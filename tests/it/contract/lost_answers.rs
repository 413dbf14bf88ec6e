//! Work batches whose answer is lost (the store committed, the reply never came) or that fail
//! outright, again and again, while two services run: every stored event is still applied
//! exactly once and in order, by the local perspective and by the perspective of the service
//! that consumes it (contracts 3 and 4, and the README's "within a running process each
//! perspective applies each event once"). On the memory store, so the failures are
//! deterministic; `postgres_runtime` does the same with real connections killed.
//!
//! The event here is both published and applied locally, so its outbox row and its inbox row
//! share one message id: the recovery after a lost answer must tell them apart.

use crate::support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use uuid::Uuid;
use whizbang::store::memory::MemoryStore;
use whizbang::store::{Store, StoreError, WorkBatch, WorkBatchResult};
use whizbang::transport::memory::MemoryBus;
use whizbang::{Message, Runtime};

const TOPIC: &str = "lost-answers";

/// Loses the answer of every third batch after committing it, and fails every seventh
/// without committing.
#[derive(Default)]
struct LosesAnswers {
    batches: AtomicUsize,
    lost: AtomicUsize,
}

#[async_trait::async_trait]
impl BatchHook for LosesAnswers {
    async fn process(
        &self,
        inner: &MemoryStore,
        instance: Uuid,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let n = self.batches.fetch_add(1, Ordering::SeqCst);
        if n % 7 == 6 {
            return Err(StoreError::unavailable("connection refused (injected)"));
        }
        let result = inner.process_work_batch(instance, batch).await?;
        if n % 3 == 2 {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::unavailable(
                "connection closed after COMMIT (injected)",
            ));
        }
        Ok(result)
    }
}

/// Fails unless `recorder` applied exactly the events `store` holds for `stream`, in version
/// order.
async fn applied_once_in_order(
    who: &str,
    store: &Arc<dyn Store>,
    stream: &str,
    recorder: &Recorder,
) -> anyhow::Result<()> {
    let stored: Vec<Uuid> = store
        .read_stream(stream, 0)
        .await?
        .into_iter()
        .map(|e| e.envelope.message_id)
        .collect();
    let applied = recorder.ids(stream);
    anyhow::ensure!(
        applied == stored,
        "{who}: stream {stream}: applied {applied:?}, stored {stored:?}"
    );
    Ok(())
}

#[actix::test]
async fn lost_batch_answers_neither_lose_nor_repeat_an_application() -> anyhow::Result<()> {
    const STREAMS: usize = 20;
    const EVENTS: u32 = 20;
    let bus = MemoryBus::new();

    let down_config = subscribed(config("lost-downstream"), TOPIC, "down");
    let down_hook = Arc::new(HookedStore::new(&down_config, LosesAnswers::default()));
    let remote = Recorder::new();
    let down = on_bus(down_config, &bus)
        .store(down_hook.clone())
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await?;

    let up_config = publishing(config("lost-upstream"), Bumped::TYPE_NAME, TOPIC);
    let up_hook = Arc::new(HookedStore::new(&up_config, LosesAnswers::default()));
    let local = Recorder::new();
    let rt: Runtime = on_bus(up_config, &bus)
        .store(up_hook.clone())
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;

    let streams: Vec<String> = (0..STREAMS).map(|i| unique(&format!("lost-{i}"))).collect();
    let calls = streams.iter().map(|stream| {
        let rt = &rt;
        async move {
            for seq in 1..=EVENTS {
                // A call whose commit answer was lost fails retryably although it may have
                // committed; the caller retries with a new command, as a client would.
                loop {
                    match rt
                        .local_invoke::<Bump, Bumped>(Bump {
                            stream: stream.clone(),
                            seq,
                        })
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.is_retryable() => {}
                        Err(e) => anyhow::bail!("{stream} #{seq}: not retryable: {e}"),
                    }
                }
            }
            Ok(())
        }
    });
    for r in futures::future::join_all(calls).await {
        r?;
    }

    let up_store = rt.store().clone();
    let down_store = down.store().clone();
    let mut correlations = Vec::new();
    for s in &streams {
        for e in up_store.read_stream(s, 0).await? {
            correlations.push(e.envelope.correlation_id);
        }
    }
    anyhow::ensure!(correlations.len() >= STREAMS * EVENTS as usize);
    // Done when nothing is queued on either side any more: a repeat could only come from a
    // queued row.
    wait_for("every outbox and inbox row finished on both sides", || {
        let (up, down, ids) = (&up_store, &down_store, &correlations);
        async move {
            for id in ids {
                let (Ok(u), Ok(d)) = (
                    up.correlation_status(*id).await,
                    down.correlation_status(*id).await,
                ) else {
                    return false;
                };
                if u.outbox_pending + u.inbox_pending + d.inbox_pending > 0
                    || d.inbox_processed == 0
                {
                    return false;
                }
            }
            true
        }
    })
    .await?;
    for stream in &streams {
        applied_once_in_order("local perspective", &up_store, stream, &local).await?;
        applied_once_in_order("downstream perspective", &up_store, stream, &remote).await?;
    }
    // Downstream makes fewer, larger batches: after each failed inbox commit the consumer
    // reopens its subscription, and what arrived meanwhile comes as one receive (often more
    // rows than one recovery claim's budget: the case the recovery must get right).
    anyhow::ensure!(
        up_hook.hook.lost.load(Ordering::SeqCst) > 10
            && down_hook.hook.lost.load(Ordering::SeqCst) >= 3,
        "answers were lost on both sides ({} upstream, {} downstream)",
        up_hook.hook.lost.load(Ordering::SeqCst),
        down_hook.hook.lost.load(Ordering::SeqCst)
    );
    rt.shutdown().await?;
    down.shutdown().await?;
    Ok(())
}
