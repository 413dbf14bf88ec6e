//! `/metrics` after the order scenario, scraped over real HTTP: the order service on the
//! Postgres store (a schema of its own) and the inventory service subscribed to its events,
//! each serving its own listener (`telemetry.metrics_listen = "127.0.0.1:0"`). The documented
//! series carry the counts the scenario caused, and no label holds a stream or message id.

use crate::orders::{CreateOrder, CreateOrderReceptor, Inventory, OrderCreated, OrderSummaries};
use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::scrape::{self, Scrape};
use crate::support::{config, publishing, subscribed, wait_for};
use std::net::SocketAddr;
use whizbang::telemetry::METRICS;
use whizbang::testing::RecordingTransport;
use whizbang::{Config, Consistency, DispatchError, Runtime, StartError};

const TOPIC: &str = "metrics-orders";
const ORDERS: usize = 3;

fn listening(mut c: Config) -> Config {
    c.telemetry.metrics_listen = "127.0.0.1:0".into();
    // The backlog and lease gauges are refreshed by the heartbeat.
    c.partitions.heartbeat_seconds = 1;
    c
}

fn order(id: &str, quantity: i32) -> CreateOrder {
    CreateOrder {
        order_id: id.into(),
        customer_id: "alice".into(),
        lines: vec![crate::orders::line("GADGET", quantity, 9_900)],
    }
}

/// Scrapes `addr` until `done` holds of the page; the last page.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> anyhow::Result<Scrape> {
    let last = std::cell::RefCell::new(None);
    wait_for(what, || async {
        let page = scrape::metrics(addr).await.expect("/metrics answers");
        let ok = done(&page);
        *last.borrow_mut() = Some(page);
        ok
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; last page:\n{:?}",
            last.borrow().as_ref().map(|p| &p.text)
        )
    })?;
    Ok(last.into_inner().expect("scraped at least once"))
}

#[actix::test]
async fn the_order_scenario_shows_in_the_documented_series() -> anyhow::Result<()> {
    let _slot = pg::slot().await;
    let schema = new_schema();
    let transport = RecordingTransport::memory();
    let orders_config = listening(on_postgres(
        publishing(config("metrics-orders"), "OrderCreated", TOPIC),
        &schema,
    ));
    let summaries = OrderSummaries::for_config(&orders_config).await?;
    let orders = Runtime::builder(orders_config)
        .transport(transport.clone())
        .receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
        .read_model::<OrderCreated, _>("order-summary", summaries.clone(), Consistency::Async)
        .start()
        .await?;
    let inventory = Runtime::builder(listening(subscribed(
        config("metrics-inventory"),
        TOPIC,
        "inventory",
    )))
    .transport(transport.clone())
    .perspective::<OrderCreated, _>("inventory", Inventory::default())
    .start()
    .await?;
    let (at_orders, at_inventory) = (
        orders.metrics_addr().expect("a listener"),
        inventory.metrics_addr().expect("a listener"),
    );
    assert_ne!(at_orders.port(), 0, "the port chosen is reported");

    for i in 0..ORDERS {
        let created: OrderCreated = orders.local_invoke(order(&format!("M-{i}"), 1)).await?;
        assert_eq!(created.total_cents, 9_900);
    }
    // Over the credit limit: refused by the receptor.
    let refused = orders
        .local_invoke::<CreateOrder, OrderCreated>(order("M-over", 20))
        .await;
    assert!(
        matches!(refused, Err(DispatchError::Rejected { .. })),
        "{refused:?}"
    );

    let n = ORDERS as f64;
    let page = scrape_until(
        at_orders,
        "the orders published and the backlog read",
        |p| {
            p.value(
                "whizbang_publish_total",
                &[("topic", TOPIC), ("outcome", "ok")],
            ) == Some(n)
                && p.value("whizbang_queue_backlog_rows", &[("queue", "outbox")]) == Some(0.0)
                && p.value("whizbang_queue_backlog_rows", &[("queue", "inbox")]) == Some(0.0)
                && p.value("whizbang_leases_acquired_total", &[])
                    .is_some_and(|v| v >= 1.0)
        },
    )
    .await?;
    let dispatched = |outcome| {
        page.value(
            "whizbang_dispatches_total",
            &[("message_type", "CreateOrder"), ("outcome", outcome)],
        )
    };
    assert_eq!(dispatched("ok"), Some(n), "{}", page.text);
    assert_eq!(dispatched("rejected"), Some(1.0));
    assert_eq!(dispatched("timeout"), Some(0.0));
    assert_eq!(
        page.value("whizbang_dispatches_in_flight", &[]),
        Some(0.0),
        "every dispatch ended"
    );
    let receptor = |outcome| {
        page.value(
            "whizbang_receptor_duration_seconds_count",
            &[("message_type", "CreateOrder"), ("outcome", outcome)],
        )
    };
    assert_eq!(receptor("ok"), Some(n));
    assert_eq!(receptor("failed"), Some(1.0));
    assert_eq!(
        page.value(
            "whizbang_perspective_duration_seconds_count",
            &[("perspective", "order-summary"), ("outcome", "ok")]
        ),
        Some(n)
    );
    let batches = page
        .value(
            "whizbang_work_batch_duration_seconds_count",
            &[("outcome", "ok")],
        )
        .expect("work batches");
    assert!(batches >= 1.0, "{batches}");
    let units = page
        .value("whizbang_work_batch_size_sum", &[("item", "units")])
        .expect("batch sizes");
    // One unit per created order (the refusal wrote nothing), plus completions' batches.
    assert!(units >= n, "{units}");
    assert_eq!(
        page.value(
            "whizbang_queue_oldest_pending_age_seconds",
            &[("queue", "outbox")]
        ),
        Some(0.0)
    );
    assert_eq!(
        page.value(
            "whizbang_retries_total",
            &[("queue", "inbox"), ("kind", "failed")]
        ),
        Some(0.0)
    );
    assert_eq!(page.value("whizbang_dead_letters_total", &[]), Some(0.0));
    // Partitions are leased by the claims and given up idle by the heartbeat: every one
    // released was acquired, and what is left is held.
    let leases = |name| page.value(name, &[]).expect(name);
    assert_eq!(
        leases("whizbang_leases_acquired_total"),
        leases("whizbang_leases_released_total") + leases("whizbang_leases_held"),
        "{}",
        page.text
    );
    assert_eq!(
        page.value("whizbang_actor_restarts_total", &[("actor", "coordinator")]),
        Some(0.0)
    );

    let delivered = scrape_until(at_inventory, "the inventory's deliveries", |p| {
        p.value(
            "whizbang_deliveries_total",
            &[
                ("subscription", "metrics-orders/inventory"),
                ("settlement", "accepted"),
            ],
        ) == Some(n)
            && p.value(
                "whizbang_perspective_duration_seconds_count",
                &[("perspective", "inventory"), ("outcome", "ok")],
            ) == Some(n)
    })
    .await?;
    assert_eq!(
        delivered.value(
            "whizbang_deliveries_total",
            &[
                ("subscription", "metrics-orders/inventory"),
                ("settlement", "rejected")
            ],
        ),
        Some(0.0)
    );

    // Every exported metric is in the reference list, and every listed metric is exported by
    // one of the two services (deliveries only where something is consumed).
    let listed: std::collections::BTreeSet<String> =
        METRICS.iter().map(|m| m.name.to_string()).collect();
    let mut exported = page.metric_names();
    exported.extend(delivered.metric_names());
    assert_eq!(exported, listed);
    // Bounded labels: no stream id or message id anywhere in a series.
    for p in [&page, &delivered] {
        for s in &p.samples {
            for (k, v) in &s.labels {
                assert!(
                    !v.starts_with("order-M-") && uuid::Uuid::parse_str(v).is_err(),
                    "{} has an unbounded label {k}={v}",
                    s.name
                );
            }
        }
    }

    orders.shutdown().await?;
    inventory.shutdown().await?;
    // Stopped with the runtime.
    assert!(scrape::get(at_orders, "/metrics").await.is_err());
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}

/// An address that cannot be bound is a typed start-up error naming it.
#[actix::test]
async fn a_listen_address_in_use_fails_the_start() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let mut c = config("metrics-in-use");
    c.telemetry.metrics_listen = addr.to_string();
    match Runtime::builder(c).start().await {
        Err(StartError::MetricsListen { addr: named, .. }) => assert_eq!(named, addr),
        Err(other) => panic!("expected MetricsListen, got {other}"),
        Ok(_) => panic!("started on an address in use"),
    }
    Ok(())
}
