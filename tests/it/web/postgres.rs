//! The order API's main flows over real HTTP on the Postgres store (a schema per test): `201`
//! with the order summary read from a real table, `202` tracked to completion on the status
//! endpoint, a `409` that stores nothing.

use super::harness::{Api, order_json, orders_config};
use crate::orders::CreateOrderReceptor;
use crate::support::pg::{self, new_schema, on_postgres};

#[actix::test]
async fn both_flows_on_the_postgres_store() -> anyhow::Result<()> {
    let _slot = pg::slot().await;
    let schema = new_schema();
    let api = Api::start(
        on_postgres(orders_config(), &schema),
        CreateOrderReceptor::standard(),
    )
    .await?;

    let created = api.post_json("/orders", &order_json("P-1")).await?;
    anyhow::ensure!(created.status == 201, "{} {}", created.status, created.body);
    assert_eq!(created.header("location"), Some("/orders/P-1"));
    // Read-your-writes, from the table.
    let summary = api.get("/orders/P-1").await?;
    assert_eq!(summary.status, 200, "{}", summary.body);
    assert_eq!(summary.body["total_cents"], 5_000);
    let client = pg::connect().await;
    let row = client
        .query_one(
            &format!("SELECT total_cents FROM {schema}.order_summary WHERE order_id = 'P-1'"),
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, i64>(0), 5_000);

    let accepted = api.post_json("/orders/async", &order_json("P-2")).await?;
    anyhow::ensure!(
        accepted.status == 202,
        "{} {}",
        accepted.status,
        accepted.body
    );
    let location = accepted.header("location").expect("a Location").to_string();
    let correlation = accepted.str("correlation_id").expect("a receipt").parse()?;
    let settled = api.tracker().settle(correlation).await?;
    assert_eq!(settled.published.len(), 1);
    let status = api.get(&location).await?;
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.str("state"), Some("completed"), "{}", status.body);
    assert_eq!(api.get("/orders/P-2").await?.status, 200);

    let over = serde_json::json!({"order_id": "P-3", "customer_id": "c",
        "lines": [{"sku": "GADGET", "quantity": 20, "unit_price_cents": 9900}]});
    let conflict = api.post_json("/orders", &over.to_string()).await?;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    assert_eq!(pg::rows(&schema, "wb_events", Some("order-P-3")).await?, 0);
    assert_eq!(api.get("/orders/P-3").await?.status, 404);

    api.stop().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}
