//! The subscription: one receiver link per subscription, its credit, and settlement.
//!
//! A subscription is a receiver with `prefetch` credit, replenished as deliveries are settled.
//! A delivery that cannot be rebuilt into an envelope arrives as `Err(MalformedDelivery)` so the
//! consumer rejects it with the reason. `Accept`, `Reject(reason)` (condition
//! `whizbang:rejected`, the reason as description — Service Bus dead-letters it with both) and
//! `Release` map to the AMQP outcomes of the same names. A receive or settle error ends the
//! subscription; the consumer opens a new one, and the broker redelivers what was unsettled.
//!
//! A session receiver (Service Bus, `transport.amqp.sessions`) attaches with the session filter
//! asking for the next available session, keeps that session's lock renewed on the entity's
//! `$management` node while it holds it, and answers [`TransportError::SessionIdle`] once it
//! has had nothing for `session_idle_timeout_ms` with nothing unsettled (or when no session
//! was available): the consumer then opens the next one. Dropping it gives the session back.
//!
//! It must not reconnect by itself nor decide what to settle: both belong to the consumer.

use super::AmqpSettings;
use super::links::{AbortOnDrop, LinkConnection, LinkGuard, connection_error, link_name};
use super::servicebus::{self, RenewSessionLock};
use super::wire;
use crate::transport::{Delivery, Settlement, Subscription, TransportError};
use async_trait::async_trait;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{CreditMode, Receiver};
use fe2o3_amqp::types::definitions::{self, ErrorCondition};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::messaging::Source;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp_management::client::MgmtClient;
use futures::FutureExt as _;
use std::collections::HashMap;
use std::time::Duration;

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
    /// The Service Bus session this receiver holds (session receivers only).
    session: Option<HeldSession>,
}

/// A session held by a session receiver: its id, how long it may stay idle, and the task
/// renewing its lock (aborted when the receiver is dropped).
struct HeldSession {
    id: String,
    idle_timeout: Duration,
    _renewal: AbortOnDrop,
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
            session: None,
        })
    }

    /// Attaches a session receiver to `address` that accepts the next available session (the
    /// service waits up to half the send timeout for one), starts renewing its lock, and
    /// grants the first window of credit. No session available: [`TransportError::SessionIdle`].
    pub(super) async fn open_session(
        settings: &AmqpSettings,
        address: String,
        name: &str,
        prefetch: u32,
    ) -> Result<AmqpSubscription, TransportError> {
        let mut connection = LinkConnection::open(settings, &address).await?;
        let wait = settings.send_timeout / 2;
        let source = Source::builder()
            .address(address.as_str())
            .filter(servicebus::session_filter(None))
            .build();
        let attach = Receiver::builder()
            .name(link_name("session", name))
            .source(source)
            .properties(servicebus::session_link_properties(wait))
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut connection.session);
        let mut receiver = match tokio::time::timeout(settings.send_timeout, attach).await {
            Ok(Ok(receiver)) => receiver,
            // Service Bus refuses the attach (com.microsoft:timeout) when no session became
            // available within the wait: not a failure, the consumer asks again.
            Ok(Err(e)) if e.to_string().contains("timeout") => {
                return Err(TransportError::SessionIdle(format!("{address}: {e}")));
            }
            Ok(Err(e)) => return Err(connection_error(&address, "session attach failed", e)),
            Err(_) => return Err(connection_error(&address, "session attach", "timed out")),
        };
        let Some(session_id) = servicebus::accepted_session_id(receiver.source().as_ref()) else {
            return Err(TransportError::SessionIdle(format!(
                "{address}: no session available"
            )));
        };
        let mut management = MgmtClient::builder()
            .management_node_address(servicebus::management_address(&address))
            .client_node_addr(link_name("mgmt", name))
            .attach(&mut connection.extra_session(&address).await?)
            .await
            .map_err(|e| connection_error(&address, "management link attach failed", e))?;
        let renew_every = Duration::from_secs(settings.addresses.session_lock_renew_seconds);
        let (renewed_id, renewed_address, timeout) =
            (session_id.clone(), address.clone(), settings.send_timeout);
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(renew_every).await;
                let request = RenewSessionLock {
                    session_id: renewed_id.clone(),
                    server_timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
                };
                match tokio::time::timeout(timeout, management.call(request)).await {
                    Ok(Ok(renewed)) => {
                        tracing::debug!(address = %renewed_address, session = %renewed_id, expiration_ms = ?renewed.expiration_ms, "session lock renewed");
                    }
                    // The service ends the link when the lock is lost; the consumer then
                    // reopens and the unsettled deliveries come back in order.
                    Ok(Err(e)) => {
                        tracing::warn!(address = %renewed_address, session = %renewed_id, error = %e, "session lock renewal failed");
                    }
                    Err(_) => {
                        tracing::warn!(address = %renewed_address, session = %renewed_id, "session lock renewal timed out");
                    }
                }
            }
        });
        let window = prefetch.max(1);
        receiver
            .set_credit(window)
            .await
            .map_err(|e| connection_error(&address, "granting credit failed", e))?;
        tracing::debug!(%address, session = %session_id, "session accepted");
        Ok(AmqpSubscription {
            receiver,
            guard: connection.watch(),
            address,
            unsettled: HashMap::new(),
            next_tag: 0,
            failed: None,
            window,
            credit_left: window,
            session: Some(HeldSession {
                id: session_id,
                idle_timeout: Duration::from_millis(settings.addresses.session_idle_timeout_ms),
                _renewal: AbortOnDrop(renewal),
            }),
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
        // A session receiver with nothing unsettled gives its session back once it has been
        // idle this long, so that a drained stream does not hold the receiver.
        let idle = match &self.session {
            Some(held) if self.unsettled.is_empty() => Some(held.idle_timeout),
            _ => None,
        };
        let idle_wait = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            delivery = self.receiver.recv::<Body<Value>>() => {
                delivery.map_err(|e| connection_error(&self.address, "receive failed", e))?
            }
            reason = &mut self.guard.closed => {
                let reason = reason.unwrap_or_else(|_| "the connection watcher stopped".into());
                return Err(connection_error(&self.address, "link lost", reason));
            }
            () = idle_wait => {
                let session = self.session.as_ref().map(|s| s.id.as_str()).unwrap_or_default();
                return Err(TransportError::SessionIdle(format!(
                    "{}: session {session} idle",
                    self.address
                )));
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
