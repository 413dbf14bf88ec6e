//! The transport seam: how messages leave one service and reach another. The in-process bus and
//! the AMQP 1.0 transport both implement it, with the same semantics.
//!
//! Owns the vocabulary of the wire: publishing an envelope to a topic (resolved only once the
//! broker has accepted it), receiving deliveries from a subscription with credit, and settling
//! each delivery (accept, reject with a reason, release). A delivery that could not be turned
//! back into an envelope arrives as [`Delivery::message`] = `Err(..)` so the consumer can reject
//! it with its reason. It must not know about the store or handlers.

#[cfg(feature = "amqp")]
pub mod amqp;
pub mod memory;

use crate::envelope::Envelope;
use async_trait::async_trait;

/// A delivery the transport could not decode into an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedDelivery {
    /// The broker message id, when there was one.
    pub message_id: Option<String>,
    /// Why it could not be decoded (also the reason it is rejected with).
    pub reason: String,
}

/// One message received from a subscription, to be settled by its tag.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The handle to settle it by ([`Subscription::settle`]).
    pub tag: u64,
    /// The decoded envelope, or why it could not be decoded.
    pub message: Result<Envelope, MalformedDelivery>,
}

/// What the consumer decided about a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Stored (or a duplicate): the broker may forget it.
    Accept,
    /// Poison: never deliver again; dead-lettered where the broker supports it.
    Reject(String),
    /// Not processed (shutting down): deliver again later.
    Release,
}

/// Why the transport could not send, receive or check its topology.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The broker could not be reached or the connection dropped; retried.
    #[error("transport connection failed: {0}")]
    Connection(String),
    /// The broker refused a message on `topic` (e.g. over its size limit).
    #[error("send to {topic} not accepted: {reason}")]
    Rejected {
        /// The topic it was sent to.
        topic: String,
        /// The broker's reason.
        reason: String,
    },
    /// No outcome arrived within `transport.send_timeout_ms`; the message is sent again.
    #[error("send to {topic} timed out")]
    Timeout {
        /// The topic it was sent to.
        topic: String,
    },
    /// A configured topic or subscription does not exist at start.
    #[error("topology check failed: {0}")]
    Topology(String),
    /// The subscription was closed (shutting down).
    #[error("subscription closed")]
    Closed,
    /// A session receiver gave its session back after it went idle, or found no session
    /// available: the consumer opens the next one at once (not a failure).
    #[error("session receiver on {0} is idle")]
    SessionIdle(String),
}

impl TransportError {
    /// True for failures of the infrastructure rather than of the message.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransportError::Connection(_)
                | TransportError::Timeout { .. }
                | TransportError::Closed
                | TransportError::SessionIdle(_)
        )
    }
}

/// Sends envelopes to topics and opens subscriptions.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes one envelope; resolves once the broker has accepted it. Callers may keep many
    /// of these futures in flight (pipelining).
    async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<(), TransportError>;

    /// Opens a receiver on `subscription` of `topic` with `prefetch` credit.
    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError>;

    /// How many receivers one instance runs on `subscription` of `topic`, each opened with
    /// [`Transport::subscribe_receiver`]: one, unless the broker splits the subscription so
    /// that several instances keep each stream in order (RabbitMQ shard queues, Service Bus
    /// session receivers).
    fn receivers(&self, _topic: &str, _subscription: &str) -> u32 {
        1
    }

    /// True when the receivers of a subscription are shard queues, each delivered to one
    /// consumer of all instances at a time (single active consumer): the runtime then spreads
    /// the active shards over the live instances.
    fn receivers_are_shards(&self) -> bool {
        false
    }

    /// Opens receiver `index` (below [`Transport::receivers`]) of `subscription`: the
    /// subscription itself unless the transport splits it.
    async fn subscribe_receiver(
        &self,
        topic: &str,
        subscription: &str,
        index: u32,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let _ = index;
        self.subscribe(topic, subscription, prefetch).await
    }

    /// Verifies that the topics and subscriptions exist before anything is sent.
    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError>;
}

/// An open receiver.
#[async_trait]
pub trait Subscription: Send {
    /// Waits for at least one delivery, returns at most `max`.
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError>;

    /// Settles one delivery; called only after its inbox row is committed (or for poison).
    async fn settle(&mut self, tag: u64, settlement: Settlement) -> Result<(), TransportError>;

    /// Gives the subscription up: the deliveries it has not settled go back to the broker. A
    /// transport overrides it when it can promise they go back ahead of everything after
    /// them, before another receiver (a standby of the same shard) is handed anything. The
    /// default drops the subscription, without that promise: the AMQP transport's drop sends
    /// the link's detach before its session ends, and RabbitMQ activates the standby at the
    /// detach but returns the unsettled deliveries only at the session's end.
    async fn close(self: Box<Self>) {}
}
