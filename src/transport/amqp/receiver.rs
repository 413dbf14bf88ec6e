//! The subscription: one receiver link per subscription, its credit, and settlement.
//!
//! A subscription is a receiver with `prefetch` credit, replenished as deliveries are settled.
//! A delivery that cannot be rebuilt into an envelope arrives as `Err(MalformedDelivery)` so the
//! consumer rejects it with the reason. `Accept`, `Reject(reason)` (condition
//! `whizbang:rejected`, the reason as description — Service Bus dead-letters it with both) and
//! `Release` map to the AMQP outcomes of the same names. A receive or settle error ends the
//! subscription; the consumer opens a new one, and the broker redelivers what was unsettled.
//!
//! It must not reconnect by itself nor decide what to settle: both belong to the consumer.

use super::AmqpSettings;
use super::links::{LinkConnection, LinkGuard, connection_error, link_name};
use super::wire;
use crate::transport::{Delivery, Settlement, Subscription, TransportError};
use async_trait::async_trait;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{CreditMode, Receiver};
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use futures::FutureExt as _;
use std::collections::HashMap;

/// The error condition of a rejected delivery (its description is the consumer's reason).
pub const REJECT_CONDITION: &str = "whizbang:rejected";

/// A receiver link with its credit window and the deliveries not yet settled.
pub(super) struct AmqpSubscription {
    // Field order is drop order: the link goes before its session and connection.
    receiver: Receiver,
    guard: LinkGuard,
    address: String,
    unsettled: HashMap<u64, DeliveryInfo>,
    next_tag: u64,
    /// A receive error met after a delivery was already in hand: reported by the next call.
    failed: Option<TransportError>,
    /// Credit granted per window (the prefetch), and what is left of the current window.
    window: u32,
    credit_left: u32,
}

impl AmqpSubscription {
    /// Attaches a receiver to `address` (`name` names the link) on a connection of its own and
    /// grants the first window of `prefetch` credit.
    pub(super) async fn open(
        settings: &AmqpSettings,
        address: String,
        name: &str,
        prefetch: u32,
    ) -> Result<AmqpSubscription, TransportError> {
        let mut connection = LinkConnection::open(settings, &address).await?;
        let attach = Receiver::builder()
            .name(link_name("receive", name))
            .source(address.as_str())
            // Credit is granted by hand, a whole window at a time and only once the previous
            // window is used up (see `AmqpSubscription::receive`). fe2o3's automatic mode
            // renews credit while transfers are still on the wire, and RabbitMQ's next transfer
            // then counts as one more than allowed: the link fails with "The peer sent more
            // message transfers than currently allowed".
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut connection.session);
        let mut receiver = match tokio::time::timeout(settings.send_timeout, attach).await {
            Ok(Ok(receiver)) => receiver,
            Ok(Err(e)) => return Err(connection_error(&address, "attach failed", e)),
            Err(_) => return Err(connection_error(&address, "attach", "timed out")),
        };
        let window = prefetch.max(1);
        receiver
            .set_credit(window)
            .await
            .map_err(|e| connection_error(&address, "granting credit failed", e))?;
        Ok(AmqpSubscription {
            receiver,
            guard: connection.watch(),
            address,
            unsettled: HashMap::new(),
            next_tag: 0,
            failed: None,
            window,
            credit_left: window,
        })
    }

    fn admit(&mut self, delivery: fe2o3_amqp::link::delivery::Delivery<Body<Value>>) -> Delivery {
        let (info, message) = delivery.into_parts();
        self.next_tag += 1;
        let tag = self.next_tag;
        self.unsettled.insert(tag, info);
        Delivery {
            tag,
            message: wire::from_message(message),
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let first = tokio::select! {
            delivery = self.receiver.recv::<Body<Value>>() => {
                delivery.map_err(|e| connection_error(&self.address, "receive failed", e))?
            }
            reason = &mut self.guard.closed => {
                let reason = reason.unwrap_or_else(|_| "the connection watcher stopped".into());
                return Err(connection_error(&self.address, "link lost", reason));
            }
        };
        let mut out = vec![self.admit(first)];
        // Whatever else has already arrived. For a single-frame delivery (auto-accept off) the
        // receiver's only await is its channel, so an unready `recv` is dropped before it took
        // a frame. An error after the first delivery is not swallowed: it is the answer of the
        // next call (once swallowed, a delivery that failed stayed unsettled on the link and
        // never came back while the link lived).
        while out.len() < max.max(1).min(self.credit_left as usize) {
            match self.receiver.recv::<Body<Value>>().now_or_never() {
                Some(Ok(delivery)) => out.push(self.admit(delivery)),
                Some(Err(e)) => {
                    self.failed = Some(connection_error(&self.address, "receive failed", e));
                    break;
                }
                None => break,
            }
        }
        self.credit_left = self.credit_left.saturating_sub(out.len() as u32);
        if self.credit_left == 0 {
            // The window is used up, so nothing is in flight: the new credit cannot overlap
            // transfers the broker already sent.
            self.receiver
                .set_credit(self.window)
                .await
                .map_err(|e| connection_error(&self.address, "granting credit failed", e))?;
            self.credit_left = self.window;
        }
        Ok(out)
    }

    async fn settle(&mut self, tag: u64, settlement: Settlement) -> Result<(), TransportError> {
        let Some(info) = self.unsettled.remove(&tag) else {
            return Ok(()); // settling twice is harmless
        };
        let result = match settlement {
            Settlement::Accept => self.receiver.accept(info).await,
            Settlement::Reject(reason) => {
                let error = definitions::Error::new(
                    ErrorCondition::Custom(Symbol::from(REJECT_CONDITION)),
                    Some(reason),
                    None,
                );
                self.receiver.reject(info, error).await
            }
            Settlement::Release => self.receiver.release(info).await,
        };
        result.map_err(|e| connection_error(&self.address, "settle failed", e))
    }
}
