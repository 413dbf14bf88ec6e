//! `POST /orders/batch` over real HTTP: the orders of one request are placed in one request
//! scope (`whizbang::web::RequestScope`, written by the `complete_scopes` middleware once the
//! handler answered `201`) — all of them, read models updated before the answer, or, when one is
//! refused, none. On the in-memory store and on Postgres.

use super::harness::{Api, Slow, orders_config};
use crate::support::pg::{self, new_schema, on_postgres};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use whizbang::Config;

/// A batch body of orders `ids` (valid ones), with the order `over` (if given) over the credit
/// limit at its place.
pub fn batch_json(ids: &[&str], over: Option<usize>) -> String {
    let orders: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let quantity = if over == Some(i) { 20 } else { 1 };
            serde_json::json!({"order_id": id, "customer_id": "carol",
                "lines": [{"sku": "GADGET", "quantity": quantity, "unit_price_cents": 9900}]})
        })
        .collect();
    serde_json::json!({ "orders": orders }).to_string()
}

/// A receptor that counts its runs.
pub fn counting() -> (Slow, Arc<AtomicUsize>) {
    let entered = Arc::new(AtomicUsize::new(0));
    let receptor = Slow {
        delay: Duration::ZERO,
        entered: entered.clone(),
    };
    (receptor, entered)
}

/// The case, on `config`'s store: a batch placed whole, then one refused whole.
async fn all_or_nothing(config: Config) -> anyhow::Result<Api> {
    let (receptor, ran) = counting();
    let api = Api::start(config, receptor).await?;

    let placed = api
        .post_json("/orders/batch", &batch_json(&["S-1", "S-2", "S-3"], None))
        .await?;
    anyhow::ensure!(placed.status == 201, "{} {}", placed.status, placed.body);
    let orders = placed.body["orders"].as_array().expect("orders");
    assert_eq!(orders.len(), 3);
    assert_eq!(orders[2]["order_id"], "S-3");
    assert_eq!(orders[0]["total_cents"], 9_900);
    // Read-your-writes: every summary is there on the next request.
    for id in ["S-1", "S-2", "S-3"] {
        let summary = api.get(&format!("/orders/{id}")).await?;
        assert_eq!(summary.status, 200, "{id}: {}", summary.body);
    }
    assert_eq!(ran.load(Ordering::SeqCst), 3);

    // The third order is over the credit limit: 409 naming it, and the first two, already
    // decided in the scope, are not written either.
    let refused = api
        .post_json(
            "/orders/batch",
            &batch_json(&["T-1", "T-2", "T-3"], Some(2)),
        )
        .await?;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.str("field"), Some("orders[2]"));
    assert_eq!(
        ran.load(Ordering::SeqCst),
        6,
        "the receptor decided all three"
    );
    for id in ["T-1", "T-2", "T-3"] {
        assert_eq!(api.events_of(id).await?, 0, "{id} stored events");
        assert_eq!(api.get(&format!("/orders/{id}")).await?.status, 404, "{id}");
    }
    assert_eq!(api.summaries.count().await?, 3);

    // A body that does not parse: refused before any order is decided.
    let empty = api.post_json("/orders/batch", r#"{"orders": []}"#).await?;
    assert_eq!(empty.status, 400, "{}", empty.body);
    assert_eq!(ran.load(Ordering::SeqCst), 6);
    Ok(api)
}

#[actix::test]
async fn a_batch_is_placed_whole_or_not_at_all_in_memory() -> anyhow::Result<()> {
    let api = all_or_nothing(orders_config()).await?;
    api.stop().await
}

#[actix::test]
async fn a_batch_is_placed_whole_or_not_at_all_on_postgres() -> anyhow::Result<()> {
    let _slot = pg::slot().await;
    let schema = new_schema();
    let api = all_or_nothing(on_postgres(orders_config(), &schema)).await?;
    for id in ["T-1", "T-2", "T-3"] {
        let stream = format!("order-{id}");
        assert_eq!(pg::rows(&schema, "wb_events", Some(&stream)).await?, 0);
    }
    assert_eq!(pg::rows(&schema, "wb_events", None).await?, 3);
    let client = pg::connect().await;
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.order_summary"), &[])
        .await?
        .get(0);
    assert_eq!(n, 3, "the summaries table holds the first batch only");
    api.stop().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}
