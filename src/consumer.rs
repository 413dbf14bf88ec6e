//! The consumer actor: one subscription's deliveries → the inbox.
//!
//! Owns the receive loop of one subscription: takes up to `prefetch` deliveries, rejects the
//! malformed ones with a logged reason (undecodable, unknown type, oversized), commits the good
//! ones to the inbox in one batch (duplicates are dropped there), and only then accepts them at
//! the broker — so a delivery is never settled before its inbox row is committed. If the commit
//! fails the deliveries are released for redelivery and the subscription is reopened, so that
//! nothing received after them can enter the inbox first. It must not run handlers: committed
//! rows go to partition actors through the coordinator, in delivery order.
//!
//! On a sharded subscription (RabbitMQ single-active-consumer shard queues, see
//! [`ShardShare`]) every instance runs a receiver on every shard and the broker delivers each
//! shard to one of them. A receiver that is active while its instance holds more than its fair
//! share of the shards (shards ÷ live instances, rounded up) hands its shard over: right after
//! a batch is committed and settled (nothing unsettled, so nothing can be overtaken) it
//! detaches, which makes the broker activate a standby of another instance, and attaches again
//! at the back as a standby. A shard nobody took (it comes back within
//! [`HANDOVER_TAKEN_WITHIN`]) is kept for [`HOLD_AFTER_UNTAKEN`] before the next attempt.

use crate::envelope::Envelope;
use crate::protocol::commit;
use crate::registry::RegistryView;
use crate::retry::Backoff;
use crate::routing::Origin;
use crate::store::{NewInboxRow, UnitOfWork};
use crate::supervision::{ActorKind, EngineCell, HealthState, Lifeline, fault};
use crate::telemetry::SettleMeters;
use crate::telemetry::traces;
use crate::transport::{Settlement, Subscription, Transport};
use actix::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A shard handed over that comes back this soon had no standby to take it.
pub const HANDOVER_TAKEN_WITHIN: Duration = Duration::from_secs(5);
/// The pause before asking again for a session when none was available.
const NO_SESSION_PAUSE: Duration = Duration::from_millis(200);
/// How long a shard that nobody took is kept before it is offered again.
pub const HOLD_AFTER_UNTAKEN: Duration = Duration::from_secs(60);

/// What the receivers of one sharded subscription of this instance share: the shard count,
/// the live instances (from the coordinator's heartbeat), and how many of them are active.
#[derive(Clone)]
pub struct ShardShare {
    /// The subscription's shards (its receivers).
    pub shards: u32,
    /// Instances of this service alive, this one included.
    pub live_instances: Arc<AtomicU32>,
    /// This instance's receivers of the subscription that are their shard's active consumer.
    pub active: Arc<AtomicU32>,
}

impl ShardShare {
    /// The most shards one instance should be active on: shards ÷ live instances, rounded up.
    pub fn fair_share(&self) -> u32 {
        self.shards
            .div_ceil(self.live_instances.load(Ordering::Relaxed).max(1))
    }
}

/// One receiver's part in the sharing: whether it is active, and when it last handed over.
#[derive(Default)]
struct Balance {
    active: bool,
    handed_over_at: Option<Instant>,
    hold_until: Option<Instant>,
}

impl Balance {
    /// This receiver got deliveries: it is its shard's active consumer.
    fn became_active(&mut self, share: &ShardShare) {
        if self.active {
            return;
        }
        self.active = true;
        share.active.fetch_add(1, Ordering::SeqCst);
        if let Some(at) = self.handed_over_at.take()
            && at.elapsed() < HANDOVER_TAKEN_WITHIN
        {
            // Nobody stood by to take it: keep it a while rather than flap.
            self.hold_until = Some(Instant::now() + HOLD_AFTER_UNTAKEN);
        }
    }

    /// The link is gone (handed over, lost, or released after a failed commit).
    fn left(&mut self, share: &ShardShare) {
        if std::mem::take(&mut self.active) {
            share.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// True when this receiver should hand its shard over now (and counts it as gone).
    fn should_hand_over(&mut self, share: &ShardShare) -> bool {
        if !self.active || self.hold_until.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        let fair = share.fair_share();
        let leaving = share
            .active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n > fair).then(|| n - 1)
            })
            .is_ok();
        if leaving {
            self.active = false;
            self.handed_over_at = Some(Instant::now());
        }
        leaving
    }
}

pub struct Consumer {
    pub topic: String,
    pub subscription: String,
    /// Which of the subscription's receivers this is ([`Transport::receivers`]): its shard
    /// queue on RabbitMQ, its session receiver on Service Bus, 0 otherwise.
    pub receiver: u32,
    /// Set on a sharded subscription: how this instance's receivers share the shards with the
    /// other instances'.
    pub share: Option<ShardShare>,
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
            receiver: self.receiver,
            share: self.share.clone(),
            transport: self.transport.clone(),
            engine: self.engine.clone(),
            registry: self.registry.clone(),
            origin: self.origin.clone(),
            prefetch: self.prefetch,
            max_message_bytes: self.max_message_bytes,
            settled: self.health.meters().settle(&self.topic, &self.subscription),
            health: self.health.clone(),
        };
        ctx.spawn(lp.run().into_actor(self));
    }
}

/// Why a receive loop gave its subscription up without a transport error.
enum ReceiveEnd {
    CommitFailed,
    /// The instance is active on more than its share of the shards: this one goes to a
    /// standby of another instance.
    HandOver,
}

struct ReceiveLoop {
    topic: String,
    subscription: String,
    receiver: u32,
    share: Option<ShardShare>,
    transport: Arc<dyn Transport>,
    engine: EngineCell,
    registry: RegistryView,
    origin: Origin,
    prefetch: u32,
    max_message_bytes: usize,
    health: HealthState,
    /// `whizbang_deliveries_total` of this subscription.
    settled: SettleMeters,
}

impl ReceiveLoop {
    async fn run(self) {
        let mut reopen = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        // Grows while inbox commits keep failing (the store is down), reset by a commit.
        let mut commit_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut balance = Balance::default();
        loop {
            let mut sub = match self
                .transport
                .subscribe_receiver(
                    &self.topic,
                    &self.subscription,
                    self.receiver,
                    self.prefetch,
                )
                .await
            {
                Ok(sub) => {
                    self.health.transport_ok();
                    reopen.reset();
                    sub
                }
                // No session was available within the service's wait (the attach itself
                // waited): ask again, after a short pause in case the service answered early.
                Err(crate::transport::TransportError::SessionIdle(why)) => {
                    tracing::trace!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, %why, "no session available");
                    tokio::time::sleep(NO_SESSION_PAUSE).await;
                    continue;
                }
                Err(e) => {
                    self.health.transport_failed();
                    let delay = reopen.next_delay();
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot open subscription");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let ended = self
                .consume(&mut *sub, &mut commit_backoff, &mut balance)
                .await;
            if let Some(share) = &self.share {
                balance.left(share);
            }
            match ended {
                Ok(ReceiveEnd::HandOver) => {
                    // Everything received was committed and settled: the standby that the
                    // broker activates now starts exactly where this receiver stopped.
                    drop(sub);
                    tracing::info!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, "shard handed over to a standby instance (more than this instance's share was active)");
                }
                Ok(ReceiveEnd::CommitFailed) => {
                    // Deliveries that came after the released ones may already be in hand (the
                    // prefetch window). Committing them before the released ones come back would
                    // put a later message of a stream ahead of an earlier one in the inbox, so
                    // the link goes: the broker takes back every unsettled delivery and hands
                    // them out again in queue order.
                    drop(sub);
                    let delay = commit_backoff.next_delay();
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, retry_in_ms = delay.as_millis() as u64, "inbox commit failed; reopening the subscription so the released deliveries come first");
                    tokio::time::sleep(delay).await;
                }
                // The session went idle with nothing unsettled: give it back, take the next.
                Err(crate::transport::TransportError::SessionIdle(why)) => {
                    drop(sub);
                    tracing::debug!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, %why, "session given back");
                }
                Err(e) => {
                    drop(sub);
                    self.health.transport_failed();
                    let delay = reopen.next_delay();
                    tracing::warn!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, error = %e, retry_in_ms = delay.as_millis() as u64, "subscription lost; reopening");
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
        balance: &mut Balance,
    ) -> Result<ReceiveEnd, crate::transport::TransportError> {
        loop {
            let deliveries = sub.receive(self.prefetch as usize).await?;
            fault::check(self.origin.instance, ActorKind::Consumer);
            let mut accepted = Vec::new();
            let mut rows = Vec::new();
            // The receive span of the first delivery admitted that records one: the inbox
            // commit's parent.
            let mut first_received = None;
            for delivery in deliveries {
                let span = match &delivery.message {
                    Ok(envelope) => traces::receive(
                        self.origin.messaging_system,
                        &self.topic,
                        &self.subscription,
                        envelope,
                        self.origin.partition(&envelope.stream_id),
                        &self.origin.sampler,
                    ),
                    Err(_) => tracing::Span::none(),
                };
                match span.in_scope(|| self.admit(delivery.message)) {
                    Ok(mut envelope) => {
                        // The inbox row continues the trace from the receive span.
                        traces::stamp(&span, &mut envelope.metadata);
                        if !span.is_disabled() {
                            first_received.get_or_insert(span);
                        }
                        rows.push(NewInboxRow {
                            partition: self.origin.partition(&envelope.stream_id),
                            envelope,
                        });
                        accepted.push(delivery.tag);
                    }
                    Err(reason) => {
                        span.record("otel.status_code", "error");
                        tracing::warn!(topic = %self.topic, subscription = %self.subscription, receiver = self.receiver, %reason, "delivery rejected");
                        sub.settle(delivery.tag, Settlement::Reject(reason)).await?;
                        self.settled.rejected();
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
            let span = traces::inbox_commit(
                self.origin.messaging_system,
                &self.topic,
                &self.subscription,
                &first_received.unwrap_or_else(tracing::Span::none),
                unit.inbox.len(),
            );
            for row in unit.inbox.iter().skip(1) {
                traces::link(&span, &row.envelope.metadata);
            }
            let committed = commit(&self.engine.commits(), unit, false);
            let settlement = match traces::within(&span, committed).await {
                Ok(_) => Settlement::Accept,
                Err(e) => {
                    tracing::warn!(error = %e, deliveries = accepted.len(), "inbox commit failed; deliveries released");
                    Settlement::Release
                }
            };
            let failed = matches!(settlement, Settlement::Release);
            let settled = accepted.len();
            span.record(
                "whizbang.settlement",
                if failed { "released" } else { "accepted" },
            );
            let settle = async {
                for tag in accepted {
                    sub.settle(tag, settlement.clone()).await?;
                }
                Ok::<(), crate::transport::TransportError>(())
            };
            traces::within(&span, settle).await?;
            if failed {
                self.settled.released(settled);
            } else {
                self.settled.accepted(settled);
            }
            if failed {
                return Ok(ReceiveEnd::CommitFailed);
            }
            commit_backoff.reset();
            if let Some(share) = &self.share {
                balance.became_active(share);
                if balance.should_hand_over(share) {
                    return Ok(ReceiveEnd::HandOver);
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn share(shards: u32, live: u32) -> ShardShare {
        ShardShare {
            shards,
            live_instances: Arc::new(AtomicU32::new(live)),
            active: Arc::new(AtomicU32::new(0)),
        }
    }

    #[test]
    fn fair_share_is_rounded_up_and_never_divides_by_zero() {
        assert_eq!(share(4, 1).fair_share(), 4);
        assert_eq!(share(4, 2).fair_share(), 2);
        assert_eq!(share(4, 3).fair_share(), 2);
        assert_eq!(share(4, 8).fair_share(), 1);
        assert_eq!(share(4, 0).fair_share(), 4);
    }

    #[test]
    fn only_the_excess_over_the_share_is_handed_over() {
        let s = share(4, 2);
        let mut receivers: Vec<Balance> = (0..4).map(|_| Balance::default()).collect();
        for b in &mut receivers {
            b.became_active(&s);
        }
        assert_eq!(s.active.load(Ordering::SeqCst), 4);
        let leaving = receivers
            .iter_mut()
            .filter_map(|b| b.should_hand_over(&s).then_some(()))
            .count();
        assert_eq!(leaving, 2, "two of four go when two instances live");
        assert_eq!(s.active.load(Ordering::SeqCst), 2);
        // Alone, an instance keeps every shard.
        let alone = share(4, 1);
        let mut b = Balance::default();
        b.became_active(&alone);
        assert!(!b.should_hand_over(&alone));
        b.left(&alone);
        assert_eq!(alone.active.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_shard_nobody_took_is_kept_for_a_while() {
        let s = share(2, 2);
        let (mut a, mut b) = (Balance::default(), Balance::default());
        a.became_active(&s);
        b.became_active(&s);
        assert!(a.should_hand_over(&s));
        // It came straight back: nobody stood by. It is kept now, though still over the share.
        a.became_active(&s);
        assert_eq!(s.active.load(Ordering::SeqCst), 2);
        assert!(!a.should_hand_over(&s));
        assert!(b.should_hand_over(&s), "the other one may still go");
    }
}
