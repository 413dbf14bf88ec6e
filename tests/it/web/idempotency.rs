//! The `Idempotency-Key` header on every command route of the order API (`POST /orders`,
//! `POST /orders/async`, `POST /orders/batch`) over real HTTP: a repeat answers the same status
//! and body without running the receptor again; the same key with another body answers 422; on
//! Postgres, also after the runtime and the server were stopped and new ones started on the same
//! schema.

use super::harness::{Api, Reply, call, order_json, orders_config};
use super::scopes::{batch_json, counting};
use crate::support::pg::{self, new_schema, on_postgres};
use std::sync::atomic::Ordering;

/// `POST path` with `body` and an `Idempotency-Key`.
async fn post_keyed(api: &Api, path: &str, key: &str, body: &str) -> anyhow::Result<Reply> {
    call(
        api.client
            .post(api.url(path))
            .insert_header(("Content-Type", "application/json"))
            .insert_header(("Idempotency-Key", key)),
        Some(body.to_string()),
    )
    .await
}

/// Each command route with a key and a body of its own: (route, key, body, another body,
/// success status, receptor runs of one request).
fn routes(tag: &str) -> Vec<(&'static str, String, String, String, u16, usize)> {
    vec![
        (
            "/orders",
            format!("{tag}-invoke"),
            order_json(&format!("{tag}-1")),
            order_json(&format!("{tag}-1b")),
            201,
            1,
        ),
        (
            "/orders/async",
            format!("{tag}-send"),
            order_json(&format!("{tag}-2")),
            order_json(&format!("{tag}-2b")),
            202,
            1,
        ),
        (
            "/orders/batch",
            format!("{tag}-batch"),
            batch_json(&[&format!("{tag}-3"), &format!("{tag}-4")], None),
            batch_json(&[&format!("{tag}-3"), &format!("{tag}-5")], None),
            201,
            2,
        ),
    ]
}

#[actix::test]
async fn a_repeated_key_answers_the_first_outcome_on_every_command_route() -> anyhow::Result<()> {
    let (receptor, ran) = counting();
    let api = Api::start(orders_config(), receptor).await?;
    let mut runs = 0;
    for (path, key, body, other, status, per_request) in routes("K") {
        let first = post_keyed(&api, path, &key, &body).await?;
        anyhow::ensure!(
            first.status == status,
            "{path}: {} {}",
            first.status,
            first.body
        );
        runs += per_request;
        assert_eq!(ran.load(Ordering::SeqCst), runs, "{path}: first run");

        let again = post_keyed(&api, path, &key, &body).await?;
        assert_eq!(again.status, first.status, "{path}: {}", again.body);
        assert_eq!(again.body, first.body, "{path}: the same body");
        assert_eq!(again.header("location"), first.header("location"), "{path}");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            runs,
            "{path}: the receptor ran once"
        );

        let reused = post_keyed(&api, path, &key, &other).await?;
        assert_eq!(reused.status, 422, "{path}: {}", reused.body);
        assert_eq!(
            ran.load(Ordering::SeqCst),
            runs,
            "{path}: nothing ran for the 422"
        );
    }
    // A key of one route is not another route's: a single order under the batch's key is 422.
    let crossed = post_keyed(&api, "/orders", "K-batch", &order_json("K-3")).await?;
    assert_eq!(crossed.status, 422, "{}", crossed.body);
    // Each order was placed once.
    for id in ["K-1", "K-2", "K-3", "K-4"] {
        assert_eq!(api.events_of(id).await?, 1, "{id}");
    }
    for id in ["K-1b", "K-2b", "K-5"] {
        assert_eq!(api.get(&format!("/orders/{id}")).await?.status, 404, "{id}");
    }
    api.stop().await
}

#[actix::test]
async fn a_repeated_key_answers_the_first_outcome_after_a_restart_on_postgres() -> anyhow::Result<()>
{
    let _slot = pg::slot().await;
    let schema = new_schema();
    let config = on_postgres(orders_config(), &schema);

    let (receptor, ran) = counting();
    let api = Api::start(config.clone(), receptor).await?;
    let mut first = Vec::new();
    for (path, key, body, _, status, _) in routes("R") {
        let reply = post_keyed(&api, path, &key, &body).await?;
        anyhow::ensure!(
            reply.status == status,
            "{path}: {} {}",
            reply.status,
            reply.body
        );
        first.push(reply);
    }
    assert_eq!(ran.load(Ordering::SeqCst), 4);
    api.stop().await?;

    // A new runtime and a new server on the same schema: the keys are in the store.
    let (receptor, ran) = counting();
    let api = Api::start(config, receptor).await?;
    for ((path, key, body, other, _, _), first) in routes("R").into_iter().zip(first) {
        let again = post_keyed(&api, path, &key, &body).await?;
        assert_eq!(again.status, first.status, "{path}: {}", again.body);
        assert_eq!(
            again.body, first.body,
            "{path}: the same body after the restart"
        );
        assert_eq!(again.header("location"), first.header("location"), "{path}");
        let reused = post_keyed(&api, path, &key, &other).await?;
        assert_eq!(reused.status, 422, "{path}: {}", reused.body);
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no receptor ran after the restart"
    );
    for id in ["R-1", "R-2", "R-3", "R-4"] {
        let stream = format!("order-{id}");
        assert_eq!(
            pg::rows(&schema, "wb_events", Some(&stream)).await?,
            1,
            "{id}"
        );
    }
    // Read-your-writes holds for the replays too: the summaries are in the table.
    assert_eq!(api.get("/orders/R-4").await?.status, 200);
    api.stop().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}
