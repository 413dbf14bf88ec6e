//! The order API over real HTTP on the in-memory store: both flows of the specification
//! (`201 Created` with read-your-writes, `202 Accepted` with a status URL), the status endpoint,
//! and every refusal as `application/problem+json` with its status.

use super::harness::{Api, order_json, orders_config};
use crate::orders::{CreateOrderReceptor, OrderCreated};
use whizbang::web::PROBLEM_JSON;

fn is_problem(reply: &super::harness::Reply, status: u16) -> anyhow::Result<()> {
    anyhow::ensure!(
        reply.status == status,
        "expected {status}, got {} {}",
        reply.status,
        reply.body
    );
    anyhow::ensure!(
        reply.header("content-type") == Some(PROBLEM_JSON),
        "content type {:?}",
        reply.header("content-type")
    );
    anyhow::ensure!(
        reply.body["status"] == status,
        "body status: {}",
        reply.body
    );
    Ok(())
}

#[actix::test]
async fn post_orders_answers_201_with_the_read_model_already_updated() -> anyhow::Result<()> {
    let api = Api::start(orders_config(), CreateOrderReceptor::standard()).await?;
    let created = api.post_json("/orders", &order_json("A-1")).await?;
    anyhow::ensure!(created.status == 201, "{} {}", created.status, created.body);
    assert_eq!(created.header("location"), Some("/orders/A-1"));
    let order: OrderCreated = serde_json::from_value(created.body.clone())?;
    assert_eq!(order.total_cents, 5_000);
    // Read-your-writes: the summary is there on the very next request.
    let summary = api.get("/orders/A-1").await?;
    assert_eq!(summary.status, 200, "{}", summary.body);
    assert_eq!(summary.body["total_cents"], 5_000);
    assert_eq!(summary.body["customer_id"], "alice");
    // The request settles: published once, applied by the inventory service.
    let correlation = created
        .header("x-correlation-id")
        .expect("a correlation id")
        .parse()?;
    let settled = api.tracker().settle(correlation).await?;
    assert_eq!(settled.published_of::<OrderCreated>(), vec![order]);
    assert_eq!(
        api.reserved.0.lock().unwrap().get("WIDGET"),
        Some(&2),
        "the inventory service applied the event"
    );
    api.stop().await
}

#[actix::test]
async fn post_orders_async_answers_202_and_the_status_url_tracks_it() -> anyhow::Result<()> {
    let api = Api::start(orders_config(), CreateOrderReceptor::standard()).await?;
    let accepted = api.post_json("/orders/async", &order_json("B-1")).await?;
    anyhow::ensure!(
        accepted.status == 202,
        "{} {}",
        accepted.status,
        accepted.body
    );
    let correlation = accepted
        .str("correlation_id")
        .expect("a receipt")
        .to_string();
    let location = accepted.header("location").expect("a Location").to_string();
    assert_eq!(location, format!("/orders/status/{correlation}"));
    assert_eq!(accepted.str("status"), Some("delivered"));
    assert_eq!(accepted.body["events"][0]["version"], 1);

    // Settled on both services, without polling here: then the status says so.
    let settled = api.tracker().settle(correlation.parse()?).await?;
    assert_eq!(settled.published.len(), 1);
    assert_eq!(settled.dead_lettered(), 0);
    let status = api.get(&location).await?;
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(status.str("state"), Some("completed"));
    assert_eq!(status.body["events"][0]["type"], "OrderCreated");
    assert_eq!(status.body["events"][0]["stream_id"], "order-B-1");
    assert_eq!(status.body["outbox_pending"], 0);
    assert!(status.body["perspectives_applied"].as_u64() >= Some(1));
    let summary = api.get("/orders/B-1").await?;
    assert_eq!(summary.status, 200, "{}", summary.body);
    assert_eq!(api.reserved.0.lock().unwrap().get("WIDGET"), Some(&2));
    api.stop().await
}

#[actix::test]
async fn refusals_are_problems_with_their_status() -> anyhow::Result<()> {
    let mut config = orders_config();
    config.transport.max_message_bytes = 2_048;
    let api = Api::start(config, CreateOrderReceptor::standard()).await?;

    // 404: an unknown order, an unknown correlation id, an unknown product, an unknown route.
    is_problem(&api.get("/orders/nope").await?, 404)?;
    let unknown = uuid::Uuid::now_v7();
    let status = api.get(&format!("/orders/status/{unknown}")).await?;
    is_problem(&status, 404)?;
    assert_eq!(
        status.str("correlation_id"),
        Some(unknown.to_string().as_str())
    );
    let product = serde_json::json!({"order_id": "C-0", "customer_id": "c",
        "lines": [{"sku": "DOODAD", "quantity": 1, "unit_price_cents": 1}]});
    is_problem(&api.post_json("/orders", &product.to_string()).await?, 404)?;
    is_problem(&api.get("/no/such/route").await?, 404)?;

    // 400: JSON that does not parse names the field; validation names it in the message.
    let bad_type = serde_json::json!({"order_id": "C-1", "customer_id": "c",
        "lines": [{"sku": "WIDGET", "quantity": "two", "unit_price_cents": 1}]});
    let reply = api.post_json("/orders", &bad_type.to_string()).await?;
    is_problem(&reply, 400)?;
    assert_eq!(reply.str("field"), Some("lines[0].quantity"));
    let missing = serde_json::json!({"order_id": "C-1", "lines": []});
    let reply = api.post_json("/orders", &missing.to_string()).await?;
    is_problem(&reply, 400)?;
    assert!(
        reply.str("detail").unwrap().contains("customer_id"),
        "{}",
        reply.body
    );
    is_problem(&api.post_json("/orders", "{\"order_id\":").await?, 400)?;
    let empty = serde_json::json!({"order_id": "C-2", "customer_id": "c", "lines": []});
    let reply = api.post_json("/orders", &empty.to_string()).await?;
    is_problem(&reply, 400)?;
    assert!(
        reply.str("detail").unwrap().starts_with("lines:"),
        "{}",
        reply.body
    );
    is_problem(&api.get("/orders/status/not-a-uuid").await?, 400)?;

    // 400: an Idempotency-Key that is not printable ASCII or is too long.
    for key in ["k".repeat(256), "tab\there".to_string()] {
        let reply = super::harness::call(
            api.client
                .post(api.url("/orders"))
                .insert_header(("Content-Type", "application/json"))
                .insert_header(("Idempotency-Key", key.as_str())),
            Some(order_json("C-3")),
        )
        .await?;
        is_problem(&reply, 400)?;
        assert_eq!(reply.str("field"), Some("Idempotency-Key"));
    }

    // 409: a business rule (the credit limit).
    let over = serde_json::json!({"order_id": "C-4", "customer_id": "c",
        "lines": [{"sku": "GADGET", "quantity": 20, "unit_price_cents": 9900}]});
    let reply = api.post_json("/orders", &over.to_string()).await?;
    is_problem(&reply, 409)?;
    assert!(reply.str("detail").unwrap().contains("credit limit"));

    // 413: over transport.max_message_bytes.
    let lines: Vec<_> = (0..100)
        .map(|i| serde_json::json!({"sku": format!("WIDGET-{i}"), "quantity": 1, "unit_price_cents": 1}))
        .collect();
    let big = serde_json::json!({"order_id": "C-5", "customer_id": "c", "lines": lines});
    is_problem(&api.post_json("/orders", &big.to_string()).await?, 413)?;

    // 415: another content type.
    let reply = super::harness::call(
        api.client
            .post(api.url("/orders"))
            .insert_header(("Content-Type", "text/plain")),
        Some(order_json("C-6")),
    )
    .await?;
    is_problem(&reply, 415)?;

    // Nothing refused reached the store or the read model.
    for id in ["C-0", "C-1", "C-2", "C-3", "C-4", "C-5", "C-6"] {
        assert_eq!(api.events_of(id).await?, 0, "{id} stored events");
    }
    assert_eq!(api.summaries.count().await?, 0);
    api.stop().await
}
