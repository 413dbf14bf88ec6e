//! The broker goes away mid-run (`rabbitmqctl stop_app`, then `start_app`) while an order-side
//! runtime keeps producing events and an inventory-side runtime consumes them over AMQP 1.0.
//! Nothing is lost and nothing is applied twice: sends whose outcome was lost are published
//! again (the inbox drops the copies), unsettled deliveries come back (the inbox drops those
//! already stored), and per-stream order holds throughout.
//!
//! Its own test binary, with one test: stopping the broker would disturb any other test running
//! beside it. A guard starts the broker again however the test ends.

mod amqp_support;

use amqp_support::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::{Message, Runtime};

const STREAMS: usize = 30;
const EVENTS: u32 = 40;
/// Pace of each stream's producer: the run spans the outage.
const PACE: Duration = Duration::from_millis(200);

/// Starts the broker's application again when dropped, if it was stopped.
struct BrokerGuard {
    stopped: bool,
}

impl BrokerGuard {
    async fn stop(&mut self) -> anyhow::Result<()> {
        self.stopped = true;
        tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"])).await??;
        Ok(())
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"])).await??;
        self.stopped = false;
        Ok(())
    }
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped
            && let Err(e) = rabbitmqctl(&["start_app"])
        {
            eprintln!("could not start the broker again: {e}");
        }
    }
}

#[actix::test]
async fn broker_restart_mid_run_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()> {
    let _broker = require_broker_alone().await?;
    let logs = captured_logs();
    let topic = unique("restart");
    let _topology = Topology::declare(&[(&topic, &["inventory"])])?;
    let recorder = Recorder::default();
    let inventory = Runtime::builder(subscribed(
        amqp_config("inventory-service"),
        &topic,
        "inventory",
    ))
    .perspective::<Bumped, _>("inventory", recorder.clone())
    .start()
    .await?;
    let orders = Arc::new(
        Runtime::builder(publishing(
            amqp_config("order-service"),
            Bumped::TYPE_NAME,
            &topic,
        ))
        .receptor::<Bump, _>(BumpReceptor)
        .start()
        .await?,
    );

    let run = Uuid::now_v7().simple().to_string();
    let streams: Vec<String> = (0..STREAMS).map(|i| format!("order-{run}-{i}")).collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = streams
        .iter()
        .cloned()
        .map(|stream| {
            let orders = orders.clone();
            let sent = sent.clone();
            actix::spawn(async move {
                let mut pace = tokio::time::interval(PACE);
                for seq in 1..=EVENTS {
                    pace.tick().await;
                    orders
                        .send(Bump {
                            stream: stream.clone(),
                            seq,
                        })
                        .await?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let total = STREAMS * EVENTS as usize;

    let mut broker = BrokerGuard { stopped: false };
    wait_until("a quarter of the events to be applied", || {
        recorder.total() >= total / 4
    })
    .await?;
    let stop_started = Instant::now();
    let sent_before = sent.load(Ordering::Relaxed);
    broker.stop().await?;
    // Production goes on into the store while the broker is down.
    wait_until("more events to be sent during the outage", || {
        sent.load(Ordering::Relaxed) >= sent_before + STREAMS * 3
    })
    .await?;
    let applied_during = recorder.total();
    broker.start().await?;
    let outage = stop_started.elapsed();

    for p in producers {
        p.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while recorder.total() < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {total} events applied 120 s after the broker came back",
            recorder.total()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    holds_for("no event applied twice", Duration::from_millis(500), || {
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
    // The outage really was seen by both sides.
    let publish_failures = log_lines_with(&logs, "publish failed").len();
    let consumer_losses = log_lines_with(&logs, "subscription lost").len()
        + log_lines_with(&logs, "cannot open subscription").len();
    println!(
        "outage {outage:?}: {applied_during} of {total} applied before the restart; {publish_failures} publish failures and {consumer_losses} subscription losses logged and recovered"
    );
    assert!(publish_failures > 0 && consumer_losses > 0);
    drop(broker);
    match Arc::try_unwrap(orders) {
        Ok(orders) => orders.shutdown().await?,
        Err(_) => anyhow::bail!("a producer still holds the runtime"),
    }
    inventory.shutdown().await?;
    Ok(())
}
