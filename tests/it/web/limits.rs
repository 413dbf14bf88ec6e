//! The order API at its limits, over real HTTP: `504` past the request deadline (with the
//! correlation id to look up, and the work committing afterwards), `503` with `Retry-After`
//! while the instance has `runtime.max_in_flight` requests in flight.

use super::harness::{Api, Slow, order_json, orders_config};
use crate::support::wait_until;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[actix::test]
async fn past_the_deadline_504_and_at_the_limit_503_with_retry_after() -> anyhow::Result<()> {
    let mut config = orders_config();
    config.runtime.max_in_flight = 1;
    config.runtime.dispatch_timeout_ms = 400;
    let entered = Arc::new(AtomicUsize::new(0));
    let receptor = Slow {
        delay: Duration::from_secs(3),
        entered: entered.clone(),
    };
    let api = Api::start(config, receptor).await?;

    // The first request takes the only slot and is not decided within its deadline.
    let first = {
        let request = api
            .client
            .post(api.url("/orders"))
            .insert_header(("Content-Type", "application/json"));
        actix::spawn(super::harness::call(request, Some(order_json("D-1"))))
    };
    wait_until("the first request to reach the receptor", || {
        entered.load(Ordering::SeqCst) == 1
    })
    .await?;
    // The second finds no room for the whole of its deadline: 503, retry later.
    let second = api.post_json("/orders", &order_json("D-2")).await?;
    assert_eq!(second.status, 503, "{}", second.body);
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(
        second.header("content-type"),
        Some(whizbang::web::PROBLEM_JSON)
    );
    assert_eq!(
        entered.load(Ordering::SeqCst),
        1,
        "the refused one did not start"
    );

    let first = first.await??;
    assert_eq!(first.status, 504, "{}", first.body);
    let correlation = first
        .str("correlation_id")
        .expect("the correlation id")
        .to_string();
    // "The work may still commit": it does, and the status endpoint shows it.
    api.tracker()
        .settle_eventually(correlation.parse()?)
        .await?;
    let status = api.get(&format!("/orders/status/{correlation}")).await?;
    assert_eq!(status.str("state"), Some("completed"), "{}", status.body);
    assert_eq!(api.get("/orders/D-1").await?.status, 200);
    assert_eq!(api.get("/orders/D-2").await?.status, 404);
    api.stop().await
}
