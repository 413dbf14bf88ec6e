//! Idempotent commands on the Postgres store: the first outcome of a keyed command (result,
//! receipt, business refusal) is durable — a new runtime on the same schema answers it again
//! without running its receptor — and two instances racing one key commit it once, both
//! answering the same outcome.

use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::{config, unique};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use whizbang::{
    Command, Config, Decision, DispatchError, DispatchOptions, Event, EventMeta, Message,
    Perspective, PerspectiveError, Receptor, ReceptorContext, ReceptorError, Runtime,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Place {
    order: String,
    amount: u32,
}

impl Message for Place {
    const TYPE_NAME: &'static str = "pgidem.Place";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order)
    }
}
impl Command for Place {}

/// The event and the result; `by` names the instance whose receptor decided it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Placed {
    order: String,
    amount: u32,
    by: String,
}

impl Message for Placed {
    const TYPE_NAME: &'static str = "pgidem.Placed";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order)
    }
}
impl Event for Placed {}

#[derive(Clone)]
struct Orders {
    name: String,
    runs: Arc<AtomicUsize>,
}

impl Receptor<Place> for Orders {
    type Result = Placed;

    async fn handle(
        &self,
        cmd: Place,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Placed>, ReceptorError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if cmd.amount == 0 {
            return Err(ReceptorError::Conflict("an empty order".into()));
        }
        // Long enough for two instances racing one key to overlap.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        Ok(Decision::event(Placed {
            order: cmd.order,
            amount: cmd.amount,
            by: self.name.clone(),
        }))
    }
}

#[derive(Clone, Default)]
struct Applied(Arc<Mutex<Vec<Placed>>>);

impl Perspective<Placed> for Applied {
    async fn apply(&self, e: Placed, _meta: EventMeta) -> Result<(), PerspectiveError> {
        self.0.lock().unwrap().push(e);
        Ok(())
    }
}

fn pg_config(schema: &str) -> Config {
    let mut c = on_postgres(config(&unique("pgidem")), schema);
    c.store.startup_timeout_ms = 15_000;
    c
}

async fn start(schema: &str, name: &str) -> (Runtime, Arc<AtomicUsize>, Applied) {
    let runs = Arc::new(AtomicUsize::new(0));
    let applied = Applied::default();
    let rt = Runtime::builder(pg_config(schema))
        .receptor::<Place, _>(Orders {
            name: name.into(),
            runs: runs.clone(),
        })
        .perspective::<Placed, _>("applied", applied.clone())
        .start()
        .await
        .expect("start on Postgres");
    (rt, runs, applied)
}

fn keyed(key: &str) -> DispatchOptions {
    DispatchOptions::idempotent(key)
}

fn place(order: &str, amount: u32) -> Place {
    Place {
        order: order.into(),
        amount,
    }
}

#[actix_rt::test]
async fn the_first_outcome_is_answered_again_by_a_new_runtime_on_the_same_schema()
-> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let (first_rt, first_runs, _) = start(&schema, "first").await;
    let result: Placed = first_rt
        .local_invoke_with(place("1", 2), keyed("pg-invoke"))
        .await?;
    let receipt = first_rt.send_with(place("2", 3), keyed("pg-send")).await?;
    let refusal = first_rt
        .local_invoke_with::<_, Placed>(place("3", 0), keyed("pg-refused"))
        .await
        .unwrap_err();
    assert_eq!(first_runs.load(Ordering::SeqCst), 3);
    first_rt.shutdown().await?;

    // A restart: a new runtime (new instance, new receptor) on the schema.
    let (rt, runs, applied) = start(&schema, "second").await;
    let again: Placed = rt
        .local_invoke_with(place("1", 2), keyed("pg-invoke"))
        .await?;
    assert_eq!(
        again, result,
        "the first result, decided by the first runtime"
    );
    assert_eq!(again.by, "first");
    let receipt_again = rt.send_with(place("2", 3), keyed("pg-send")).await?;
    assert_eq!(
        (receipt_again.message_id, receipt_again.correlation_id),
        (receipt.message_id, receipt.correlation_id)
    );
    assert_eq!(
        receipt_again.events, receipt.events,
        "versions and positions too"
    );
    assert_eq!(receipt.events.len(), 1);
    let refusal_again = rt
        .local_invoke_with::<_, Placed>(place("3", 0), keyed("pg-refused"))
        .await
        .unwrap_err();
    assert_eq!(refusal_again.to_string(), refusal.to_string());
    assert_eq!(refusal_again.http_status(), 409);
    let reused = rt
        .local_invoke_with::<_, Placed>(place("1", 99), keyed("pg-invoke"))
        .await
        .unwrap_err();
    assert!(
        matches!(reused, DispatchError::IdempotencyKeyReused { .. }),
        "{reused:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "nothing ran after the restart"
    );
    for stream in ["order-1", "order-2", "order-3"] {
        let n = rt.store().read_stream(stream, 1).await?.len();
        assert_eq!(n, usize::from(stream != "order-3"), "{stream}");
    }
    // The first runtime applied the invoked order before answering: not applied again here.
    // (The sent order's event may be, if the first runtime stopped before applying it.)
    assert!(!applied.0.lock().unwrap().iter().any(|p| p.order == "1"));
    rt.shutdown().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}

#[actix_rt::test]
async fn two_instances_racing_one_key_commit_it_once() -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let (a, a_runs, _) = start(&schema, "a").await;
    let (b, b_runs, _) = start(&schema, "b").await;
    for round in 0..5 {
        let key = format!("race-{round}");
        let order = format!("r{round}");
        let (ra, rb) = tokio::join!(
            a.local_invoke_with::<_, Placed>(place(&order, 1), keyed(&key)),
            b.local_invoke_with::<_, Placed>(place(&order, 1), keyed(&key)),
        );
        let (ra, rb) = (ra?, rb?);
        assert_eq!(
            ra, rb,
            "round {round}: both answer the one committed decision"
        );
        let stored = a.store().read_stream(&format!("order-{order}"), 1).await?;
        assert_eq!(stored.len(), 1, "round {round}: committed once");
    }
    // Each instance ran each key at most once.
    let runs = a_runs.load(Ordering::SeqCst) + b_runs.load(Ordering::SeqCst);
    assert!((5..=10).contains(&runs), "{runs} runs");
    a.shutdown().await?;
    b.shutdown().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}
