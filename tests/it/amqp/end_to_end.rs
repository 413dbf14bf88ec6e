//! End to end over the real broker: an order-side runtime (receptor, event store, outbox,
//! publisher) and an inventory-side runtime (consumer, inbox, perspective) talk only through
//! RabbitMQ's AMQP 1.0. Every event reaches the inventory perspective exactly once and in
//! order per stream — with the in-memory store and with the Postgres store on both sides.

use crate::support::amqp::*;
use crate::support::pg::{self, drop_schemas, on_postgres};
use crate::support::*;
use std::time::Duration;
use uuid::Uuid;
use whizbang::{Config, Message, ReceiptStatus, Runtime};

const STREAMS: usize = 40;
const EVENTS: u32 = 15;

/// Sends `EVENTS` bumps on each of `STREAMS` streams (each stream in order, the streams
/// concurrently) and checks what the inventory side applied.
async fn scenario(orders: Config, inventory: Config) -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let inventory = Runtime::builder(inventory)
        .perspective::<Bumped, _>("inventory", recorder.clone())
        .start()
        .await?;
    let orders = Runtime::builder(orders)
        .receptor::<Bump, _>(BumpReceptor)
        .start()
        .await?;
    let run = Uuid::now_v7().simple().to_string();
    let streams: Vec<String> = (0..STREAMS).map(|i| format!("order-{run}-{i}")).collect();
    let orders_ref = &orders;
    let sends = streams.iter().map(|stream| async move {
        for seq in 1..=EVENTS {
            let receipt = orders_ref
                .send(Bump {
                    stream: stream.clone(),
                    seq,
                })
                .await?;
            anyhow::ensure!(receipt.status == ReceiptStatus::Delivered, "{receipt:?}");
        }
        anyhow::Ok(())
    });
    futures::future::try_join_all(sends).await?;
    let total = STREAMS * EVENTS as usize;
    wait_until("every event to reach the inventory perspective", || {
        recorder.total() >= total
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {} of {total} applied", recorder.total()))?;
    holds_for("no event applied twice", Duration::from_millis(300), || {
        recorder.total() == total
    })
    .await?;
    assert!(
        recorder.duplicates().is_empty(),
        "{:?}",
        recorder.duplicates()
    );
    for stream in &streams {
        assert_eq!(
            recorder.seqs(stream),
            (1..=EVENTS).collect::<Vec<_>>(),
            "stream {stream} out of order or incomplete"
        );
    }
    orders.shutdown().await?;
    inventory.shutdown().await?;
    Ok(())
}

fn configs(topic: &str) -> (Config, Config) {
    let orders = publishing(amqp_config("order-service"), Bumped::TYPE_NAME, topic);
    let inventory = subscribed(amqp_config("inventory-service"), topic, "inventory");
    (orders, inventory)
}

#[actix::test]
async fn memory_stores_over_amqp_apply_every_event_once_in_order() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("e2e-mem");
    let _topology = Topology::declare(&[(&topic, &["inventory"])])?;
    let (orders, inventory) = configs(&topic);
    scenario(orders, inventory).await
}

#[actix::test]
async fn postgres_stores_over_amqp_apply_every_event_once_in_order() -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let _broker = require_broker().await?;
    let topic = unique("e2e-pg");
    let _topology = Topology::declare(&[(&topic, &["inventory"])])?;
    let (orders, inventory) = configs(&topic);
    let id = Uuid::now_v7().simple().to_string();
    let (orders_schema, inventory_schema) = (format!("t_{id}_o"), format!("t_{id}_i"));
    let result = scenario(
        on_postgres(orders, &orders_schema),
        on_postgres(inventory, &inventory_schema),
    )
    .await;
    drop_schemas(&[&orders_schema, &inventory_schema]).await?;
    result
}
