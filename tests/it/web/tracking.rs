//! `whizbang::testing` on its own: a tracked dispatch returns only once the in-process receiving
//! service has applied what was published (checked at once, with no wait in the test), and a
//! request whose work keeps failing is reported as not settled by the deadline, with what was
//! seen last.

use super::harness::TOPIC;
use crate::orders::{CreateOrder, CreateOrderReceptor, OrderCreated, line};
use crate::support::{config, publishing, subscribed};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use whizbang::testing::{RecordingTransport, TrackError, Tracker};
use whizbang::{EventMeta, Perspective, PerspectiveError, Runtime};

/// Applies after a pause, or always fails.
#[derive(Clone)]
struct Receiver {
    applied: Arc<AtomicUsize>,
    delay: Duration,
    fail: bool,
}

impl Perspective<OrderCreated> for Receiver {
    async fn apply(&self, _e: OrderCreated, _meta: EventMeta) -> Result<(), PerspectiveError> {
        tokio::time::sleep(self.delay).await;
        if self.fail {
            return Err(PerspectiveError("refused".into()));
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn services(
    receiver: Receiver,
) -> anyhow::Result<(Arc<RecordingTransport>, Runtime, Runtime)> {
    let transport = RecordingTransport::memory();
    let orders = Runtime::builder(publishing(config("orders"), "OrderCreated", TOPIC))
        .transport(transport.clone())
        .receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
        .start()
        .await?;
    let mut receiving = subscribed(config("receiver"), TOPIC, "receiver");
    receiving.store.max_attempts = 1_000;
    let receiving = Runtime::builder(receiving)
        .transport(transport.clone())
        .perspective::<OrderCreated, _>("receiver", receiver)
        .start()
        .await?;
    Ok((transport, orders, receiving))
}

fn order(id: &str) -> CreateOrder {
    CreateOrder {
        order_id: id.into(),
        customer_id: "alice".into(),
        lines: vec![line("GIZMO", 1, 450)],
    }
}

#[actix::test]
async fn a_tracked_send_returns_once_the_receiving_service_applied_it() -> anyhow::Result<()> {
    let applied = Arc::new(AtomicUsize::new(0));
    let (transport, orders, receiving) = services(Receiver {
        applied: applied.clone(),
        delay: Duration::from_millis(300),
        fail: false,
    })
    .await?;
    let tracker = Tracker::new(&transport)
        .service(&orders)
        .service(&receiving)
        .deadline(crate::support::DEADLINE);
    let (receipt, settled) = tracker.send(&orders, order("T-1")).await?;
    assert_eq!(
        applied.load(Ordering::SeqCst),
        1,
        "applied before the tracker returned"
    );
    assert_eq!(settled.correlation_id, receipt.correlation_id);
    let published: Vec<OrderCreated> = settled.published_of();
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].order_id, "T-1");
    assert_eq!(
        settled.service("receiver").map(|s| s.inbox_processed),
        Some(1)
    );

    let (created, settled): (OrderCreated, _) = tracker.invoke(&orders, order("T-2")).await?;
    assert_eq!(created.order_id, "T-2");
    assert_eq!(applied.load(Ordering::SeqCst), 2);
    assert_eq!(settled.published.len(), 1);
    orders.shutdown().await?;
    receiving.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn work_that_keeps_failing_is_not_settled_by_the_deadline() -> anyhow::Result<()> {
    let (transport, orders, receiving) = services(Receiver {
        applied: Arc::new(AtomicUsize::new(0)),
        delay: Duration::ZERO,
        fail: true,
    })
    .await?;
    let tracker = Tracker::new(&transport)
        .service(&orders)
        .service(&receiving)
        .deadline(Duration::from_millis(500));
    match tracker.send(&orders, order("T-3")).await {
        Err(TrackError::NotSettled {
            published, last, ..
        }) => {
            assert_eq!(published, 1);
            let receiver = last
                .iter()
                .find(|s| s.service == "receiver")
                .expect("watched");
            assert_eq!(receiver.status.inbox_processed, 0, "{last:?}");
        }
        other => anyhow::bail!("expected NotSettled, got {other:?}"),
    }
    orders.shutdown().await?;
    receiving.shutdown().await?;
    Ok(())
}
