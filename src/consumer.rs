//! The consumer actor: one subscription's deliveries → the inbox.
//!
//! Owns the receive loop of one subscription: takes up to `prefetch` deliveries, rejects the
//! malformed ones with a logged reason (undecodable, unknown type, oversized), commits the good
//! ones to the inbox in one batch (duplicates are dropped there), and only then accepts them at
//! the broker — so a delivery is never settled before its inbox row is committed. If the commit
//! fails the deliveries are released for redelivery and the subscription is reopened, so that
//! nothing received after them can enter the inbox first. It must not run handlers: committed
//! rows go to partition actors through the coordinator, in delivery order.

use crate::coordinator::commit;
use crate::envelope::Envelope;
use crate::registry::RegistryView;
use crate::retry::Backoff;
use crate::routing::Origin;
use crate::store::{NewInboxRow, UnitOfWork};
use crate::supervision::{ActorKind, EngineCell, HealthState, Lifeline, fault};
use crate::transport::{Settlement, Subscription, Transport};
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;

pub struct Consumer {
    pub topic: String,
    pub subscription: String,
    pub transport: Arc<dyn Transport>,
    /// Read for every commit: the engine may have been restarted since the last one.
    pub engine: EngineCell,
    pub registry: RegistryView,
    pub origin: Origin,
    pub prefetch: u32,
    /// The largest payload admitted, inclusive (see [`Envelope::check_size`]).
    pub max_message_bytes: usize,
    pub health: HealthState,
    /// Tells the supervisor when this actor ends (see `supervision`).
    pub _lifeline: Lifeline,
}

impl Actor for Consumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let lp = ReceiveLoop {
            topic: self.topic.clone(),
            subscription: self.subscription.clone(),
            transport: self.transport.clone(),
            engine: self.engine.clone(),
            registry: self.registry.clone(),
            origin: self.origin.clone(),
            prefetch: self.prefetch,
            max_message_bytes: self.max_message_bytes,
            health: self.health.clone(),
        };
        ctx.spawn(lp.run().into_actor(self));
    }
}

/// Why a receive loop gave its subscription up without a transport error.
enum ReceiveEnd {
    CommitFailed,
}

struct ReceiveLoop {
    topic: String,
    subscription: String,
    transport: Arc<dyn Transport>,
    engine: EngineCell,
    registry: RegistryView,
    origin: Origin,
    prefetch: u32,
    max_message_bytes: usize,
    health: HealthState,
}

impl ReceiveLoop {
    async fn run(self) {
        let mut reopen = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        // Grows while inbox commits keep failing (the store is down), reset by a commit.
        let mut commit_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let mut sub = match self
                .transport
                .subscribe(&self.topic, &self.subscription, self.prefetch)
                .await
            {
                Ok(sub) => {
                    self.health.transport_ok();
                    reopen.reset();
                    sub
                }
                Err(e) => {
                    self.health.transport_failed();
                    let delay = reopen.next_delay();
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open subscription");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            match self.consume(&mut *sub, &mut commit_backoff).await {
                Ok(ReceiveEnd::CommitFailed) => {
                    // Deliveries that came after the released ones may already be in hand (the
                    // prefetch window). Committing them before the released ones come back would
                    // put a later message of a stream ahead of an earlier one in the inbox, so
                    // the link goes: the broker takes back every unsettled delivery and hands
                    // them out again in queue order.
                    drop(sub);
                    let delay = commit_backoff.next_delay();
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, retry_in_ms = delay.as_millis() as u64, "inbox commit failed; reopening the subscription so the released deliveries come first");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    drop(sub);
                    self.health.transport_failed();
                    let delay = reopen.next_delay();
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, error = %e, retry_in_ms = delay.as_millis() as u64, "subscription lost; reopening");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Receives and commits until the link fails (`Err`) or an inbox commit fails (its
    /// deliveries released).
    async fn consume(
        &self,
        sub: &mut dyn Subscription,
        commit_backoff: &mut Backoff,
    ) -> Result<ReceiveEnd, crate::transport::TransportError> {
        loop {
            let deliveries = sub.receive(self.prefetch as usize).await?;
            fault::check(self.origin.instance, ActorKind::Consumer);
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
            let settlement = match commit(&self.engine.coordinator(), unit, false).await {
                Ok(_) => Settlement::Accept,
                Err(e) => {
                    tracing::warn!(error = %e, deliveries = accepted.len(), "inbox commit failed; deliveries released");
                    Settlement::Release
                }
            };
            let failed = matches!(settlement, Settlement::Release);
            for tag in accepted {
                sub.settle(tag, settlement.clone()).await?;
            }
            if failed {
                return Ok(ReceiveEnd::CommitFailed);
            }
            commit_backoff.reset();
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
