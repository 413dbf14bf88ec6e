//! Idempotent commands (`DispatchOptions::idempotency_key`) on the in-memory store: a command
//! repeated with its key answers the first outcome (result, receipt, or business refusal)
//! without running the receptor again; the key reused for another command is refused (422);
//! concurrent dispatches of one key run the receptor once; a retry after a lost commit answer
//! is safe. `postgres::runtime` checks the same across a restart on Postgres.

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use whizbang::store::memory::MemoryStore;
use whizbang::store::{Store, StoreError, WorkBatch, WorkBatchResult};
use whizbang::{
    Command, Decision, DispatchError, DispatchOptions, Event, EventMeta, Message, Perspective,
    PerspectiveError, ReceiptStatus, Receptor, ReceptorContext, ReceptorError, Runtime,
};

/// Places an order; an order of nothing is refused (a business rule, 409).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Place {
    order: String,
    amount: u32,
}

impl Message for Place {
    const TYPE_NAME: &'static str = "idem.Place";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order)
    }
}
impl Command for Place {}

/// The event and the result: `run` says which run of the receptor decided it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Placed {
    order: String,
    amount: u32,
    run: usize,
}

impl Message for Placed {
    const TYPE_NAME: &'static str = "idem.Placed";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order)
    }
}
impl Event for Placed {}

/// Counts its runs.
#[derive(Clone, Default)]
struct Orders {
    runs: Arc<AtomicUsize>,
}

impl Receptor<Place> for Orders {
    type Result = Placed;

    async fn handle(
        &self,
        cmd: Place,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Placed>, ReceptorError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if cmd.amount == 0 {
            return Err(ReceptorError::Conflict(format!(
                "order {} has nothing in it",
                cmd.order
            )));
        }
        // Long enough for concurrent dispatches of one key to overlap.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        Ok(Decision::event(Placed {
            order: cmd.order,
            amount: cmd.amount,
            run,
        }))
    }
}

/// The orders applied, in order.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<Vec<Placed>>>);

impl Perspective<Placed> for Applied {
    async fn apply(&self, e: Placed, _meta: EventMeta) -> Result<(), PerspectiveError> {
        self.0.lock().unwrap().push(e);
        Ok(())
    }
}

async fn start(store: Option<Arc<dyn Store>>) -> (Runtime, Orders, Applied) {
    let (orders, applied) = (Orders::default(), Applied::default());
    let mut builder = Runtime::builder(config(&unique("idem")))
        .receptor::<Place, _>(orders.clone())
        .perspective::<Placed, _>("applied", applied.clone());
    if let Some(store) = store {
        builder = builder.store(store);
    }
    (builder.start().await.expect("runtime"), orders, applied)
}

fn keyed(key: &str) -> DispatchOptions {
    DispatchOptions::idempotent(key)
}

#[actix::test]
async fn the_same_key_twice_runs_the_receptor_once_and_answers_the_first_result()
-> anyhow::Result<()> {
    let (rt, orders, applied) = start(None).await;
    let place = Place {
        order: "1".into(),
        amount: 5,
    };
    let first: Placed = rt.local_invoke_with(place.clone(), keyed("k-1")).await?;
    let again: Placed = rt.local_invoke_with(place.clone(), keyed("k-1")).await?;
    assert_eq!(first, again, "the first result, again");
    assert_eq!(
        orders.runs.load(Ordering::SeqCst),
        1,
        "the receptor ran once"
    );
    assert_eq!(rt.store().read_stream("order-1", 1).await?.len(), 1);
    assert_eq!(applied.0.lock().unwrap().clone(), vec![first.clone()]);

    // Without a key, every dispatch runs.
    let unkeyed: Placed = rt.local_invoke(place).await?;
    assert_eq!(unkeyed.run, 2);
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn send_with_a_key_answers_the_first_receipt() -> anyhow::Result<()> {
    let (rt, orders, _) = start(None).await;
    let place = Place {
        order: "2".into(),
        amount: 3,
    };
    let first = rt.send_with(place.clone(), keyed("k-send")).await?;
    let again = rt.send_with(place.clone(), keyed("k-send")).await?;
    assert_eq!(first.status, ReceiptStatus::Delivered);
    assert_eq!(
        (again.message_id, again.correlation_id, again.timestamp_us),
        (first.message_id, first.correlation_id, first.timestamp_us)
    );
    assert_eq!(again.stream_id, first.stream_id);
    assert_eq!(again.status, first.status);
    assert_eq!(
        again.events, first.events,
        "the events the first one committed"
    );
    assert_eq!(first.events.len(), 1);
    // A local_invoke with the key answers the result the first dispatch decided.
    let result: Placed = rt.local_invoke_with(place, keyed("k-send")).await?;
    assert_eq!(result.run, 1);
    assert_eq!(orders.runs.load(Ordering::SeqCst), 1);
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_key_reused_for_another_command_is_refused() -> anyhow::Result<()> {
    let (rt, orders, _) = start(None).await;
    let _: Placed = rt
        .local_invoke_with(
            Place {
                order: "3".into(),
                amount: 1,
            },
            keyed("k-3"),
        )
        .await?;
    let err = rt
        .local_invoke_with::<_, Placed>(
            Place {
                order: "3".into(),
                amount: 2,
            },
            keyed("k-3"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DispatchError::IdempotencyKeyReused { key } if key == "k-3"),
        "{err:?}"
    );
    assert_eq!(err.http_status(), 422);
    assert!(!err.is_retryable());
    let err = rt
        .send_with(
            Place {
                order: "4".into(),
                amount: 1,
            },
            keyed("k-3"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::IdempotencyKeyReused { .. }),
        "{err:?}"
    );
    assert_eq!(orders.runs.load(Ordering::SeqCst), 1, "nothing else ran");
    assert!(rt.store().read_stream("order-4", 1).await?.is_empty());
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_business_refusal_is_answered_again() -> anyhow::Result<()> {
    let (rt, orders, _) = start(None).await;
    let empty = Place {
        order: "5".into(),
        amount: 0,
    };
    let first = rt
        .local_invoke_with::<_, Placed>(empty.clone(), keyed("k-5"))
        .await
        .unwrap_err();
    let again = rt
        .local_invoke_with::<_, Placed>(empty.clone(), keyed("k-5"))
        .await
        .unwrap_err();
    let by_send = rt.send_with(empty, keyed("k-5")).await.unwrap_err();
    for e in [&first, &again, &by_send] {
        assert!(
            matches!(e, DispatchError::Rejected { error: ReceptorError::Conflict(m), .. }
                if m == "order 5 has nothing in it"),
            "{e:?}"
        );
        assert_eq!(e.http_status(), 409);
    }
    assert_eq!(
        orders.runs.load(Ordering::SeqCst),
        1,
        "refused once, answered thrice"
    );
    assert!(rt.store().read_stream("order-5", 1).await?.is_empty());
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn concurrent_dispatches_of_one_key_run_the_receptor_once() -> anyhow::Result<()> {
    let (rt, orders, _) = start(None).await;
    let rt = Arc::new(rt);
    let place = Place {
        order: "6".into(),
        amount: 9,
    };
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let (rt, place) = (rt.clone(), place.clone());
            actix::spawn(async move {
                if i % 2 == 0 {
                    rt.local_invoke_with::<_, Placed>(place, keyed("k-6"))
                        .await
                        .map(|p| p.run)
                } else {
                    rt.send_with(place, keyed("k-6"))
                        .await
                        .map(|r| r.events.len())
                }
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await??, 1);
    }
    assert_eq!(
        orders.runs.load(Ordering::SeqCst),
        1,
        "one run for eight calls"
    );
    assert_eq!(rt.store().read_stream("order-6", 1).await?.len(), 1);
    let rt = Arc::into_inner(rt).expect("the calls are done");
    rt.shutdown().await?;
    Ok(())
}

/// Loses the answer of the first batch that records an idempotency key, after committing it.
#[derive(Default)]
struct LosesFirstKeyedAnswer {
    lost: AtomicBool,
}

#[async_trait::async_trait]
impl BatchHook for LosesFirstKeyedAnswer {
    async fn process(
        &self,
        inner: &MemoryStore,
        instance: Uuid,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let keyed = batch.units.iter().any(|u| u.idempotency.is_some());
        let result = inner.process_work_batch(instance, batch).await?;
        if keyed && !self.lost.swap(true, Ordering::SeqCst) {
            return Err(StoreError::unavailable(
                "connection closed after COMMIT (injected)",
            ));
        }
        Ok(result)
    }
}

#[actix::test]
async fn a_retry_after_a_lost_commit_answer_answers_the_first_outcome() -> anyhow::Result<()> {
    let cfg = config("idem-lost");
    let store: Arc<dyn Store> = Arc::new(HookedStore::new(&cfg, LosesFirstKeyedAnswer::default()));
    let (rt, orders, applied) = start(Some(store)).await;
    let place = Place {
        order: "7".into(),
        amount: 4,
    };
    let lost = rt
        .local_invoke_with::<_, Placed>(place.clone(), keyed("k-7"))
        .await
        .unwrap_err();
    assert!(lost.is_retryable(), "a lost answer says retry: {lost:?}");
    // The caller cannot know it committed; with the key, retrying is safe.
    let retried: Placed = rt.local_invoke_with(place, keyed("k-7")).await?;
    assert_eq!(retried.run, 1, "the first run's result");
    assert_eq!(
        orders.runs.load(Ordering::SeqCst),
        1,
        "the receptor ran once"
    );
    assert_eq!(rt.store().read_stream("order-7", 1).await?.len(), 1);
    // Read-your-writes holds for the replay: the first run's event is applied, once.
    assert_eq!(applied.0.lock().unwrap().clone(), vec![retried]);
    rt.shutdown().await?;
    Ok(())
}
