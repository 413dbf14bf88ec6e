//! The consumer actor: one subscription's deliveries → the inbox.
//!
//! Owns the receive loop of one subscription: takes up to `prefetch` deliveries, rejects the
//! malformed ones with a logged reason (undecodable, unknown type, oversized), commits the good
//! ones to the inbox in one batch (duplicates are dropped there), and only then accepts them at
//! the broker — so a delivery is never settled before its inbox row is committed. If the commit
//! fails the deliveries are released for redelivery. It must not run handlers: committed rows
//! go to partition actors through the coordinator, in delivery order.

use crate::coordinator::{Commit, Coordinator};
use crate::envelope::Envelope;
use crate::registry::RegistryView;
use crate::routing::Origin;
use crate::store::{NewInboxRow, UnitOfWork};
use crate::transport::{Settlement, Subscription, Transport};
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;

pub struct Consumer {
    pub topic: String,
    pub subscription: String,
    pub transport: Arc<dyn Transport>,
    pub coordinator: Addr<Coordinator>,
    pub registry: RegistryView,
    pub origin: Origin,
    pub prefetch: u32,
    /// The largest payload admitted, inclusive (see [`Envelope::check_size`]).
    pub max_message_bytes: usize,
}

impl Actor for Consumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let lp = ReceiveLoop {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            transport: self.transport.clone(),
            coordinator: self.coordinator.clone(),
            registry: self.registry.clone(),
            origin: self.origin.clone(),
            prefetch: self.prefetch,
            max_message_bytes: self.max_message_bytes,
        };
        ctx.spawn(lp.run().into_actor(self));
    }
}

struct ReceiveLoop {
    topic: String,
    subscription: String,
    transport: Arc<dyn Transport>,
    coordinator: Addr<Coordinator>,
    registry: RegistryView,
    origin: Origin,
    prefetch: u32,
    max_message_bytes: usize,
}

impl ReceiveLoop {
    async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut sub = match self
                .transport
                .subscribe(&self.topic, &self.subscription, self.prefetch)
                .await
            {
                Ok(sub) => {
                    backoff = Duration::from_millis(100);
                    sub
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot open subscription");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if let Err(e) = self.consume(&mut *sub).await {
                tracing::warn!(topic = %self.topic, subscription = %self.subscription, error = %e, "subscription lost; reopening");
                tokio::time::sleep(backoff).await;
            }
        }
    }

    async fn consume(
        &self,
        sub: &mut dyn Subscription,
    ) -> Result<(), crate::transport::TransportError> {
        loop {
            let deliveries = sub.receive(self.prefetch as usize).await?;
            let mut accepted = Vec::new();
            let mut rows = Vec::new();
            for delivery in deliveries {
                match self.admit(delivery.message) {
                    Ok(envelope) => {
                        rows.push(NewInboxRow {
                            partition: self.origin.partition(&envelope.stream_id),
                            envelope,
                        });
                        accepted.push(delivery.tag);
                    }
                    Err(reason) => {
                        tracing::warn!(topic = %self.topic, subscription = %self.subscription, %reason, "delivery rejected");
                        sub.settle(delivery.tag, Settlement::Reject(reason)).await?;
                    }
                }
            }
            if accepted.is_empty() {
                continue;
            }
            // One unit for the whole receive: committed all together or not at all. With one
            // unit per delivery the coordinator could split them over two batches, and when the
            // first batch failed (its deliveries released) while the second committed, a later
            // message of a stream entered the inbox ahead of an earlier one.
            let unit = UnitOfWork {
                inbox: rows,
                claim_for_writer: true,
                ..UnitOfWork::default()
            };
            let settlement = match self.coordinator.send(Commit { unit, wait: false }).await {
                Ok(Ok(_)) => Settlement::Accept,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, deliveries = accepted.len(), "inbox commit failed; deliveries released");
                    Settlement::Release
                }
                Err(e) => {
                    tracing::warn!(error = %e, deliveries = accepted.len(), "coordinator unavailable; deliveries released");
                    Settlement::Release
                }
            };
            for tag in accepted {
                sub.settle(tag, settlement.clone()).await?;
            }
        }
    }

    /// Checks a delivery before it may enter the inbox; the error is the rejection reason.
    fn admit(
        &self,
        message: Result<Envelope, crate::transport::MalformedDelivery>,
    ) -> Result<Envelope, String> {
        let mut envelope = message.map_err(|bad| match bad.message_id {
            Some(id) => format!("malformed delivery {id}: {}", bad.reason),
            None => format!("malformed delivery: {}", bad.reason),
        })?;
        envelope.check_size(self.max_message_bytes)?;
        let table = self.registry.current();
        let Some((kind, check)) = table.known(&envelope.message_type) else {
            return Err(format!(
                "unknown message type `{}` (message {})",
                envelope.message_type, envelope.message_id
            ));
        };
        if kind != envelope.kind {
            return Err(format!(
                "message {} says it is a {} but `{}` is registered as a {}",
                envelope.message_id,
                envelope.kind.as_str(),
                envelope.message_type,
                kind.as_str()
            ));
        }
        check(&envelope.payload)
            .map_err(|e| format!("message {} does not decode: {e}", envelope.message_id))?;
        envelope.check_storable()?;
        envelope.push_hop(
            self.origin
                .hop(&envelope.stream_id, Some(self.topic.as_str())),
        );
        Ok(envelope)
    }
}

/// Stops receiving. Unsettled deliveries go back to the broker when the link closes.
pub struct StopConsumer;

impl Message for StopConsumer {
    type Result = ();
}

impl Handler<StopConsumer> for Consumer {
    type Result = ();

    fn handle(&mut self, _msg: StopConsumer, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
