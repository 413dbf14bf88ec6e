//! The AMQP 1.0 transport (fe2o3-amqp): Azure Service Bus in production, RabbitMQ 3.x with its
//! `rabbitmq_amqp1_0` plugin in development and CI.
//!
//! Owns the links to the broker and what happens when they break. Each link — one sender per
//! topic, one receiver per subscription, one probe per topology check — has a connection and a
//! session of its own, so an error that ends a session or a connection can never take a sibling
//! link down. It must not know about the store or handlers, and it reads the configuration
//! ([`crate::config::TransportConfig`]) without defining any of it.
//!
//! | module | owns |
//! |---|---|
//! | `settings` | [`AmqpSettings`]: `[transport]` resolved into endpoint, SASL, CBS, TLS, timeouts |
//! | `links` | a link's connection and session: opening, watching, dropping; the topology probe |
//! | `sender` | the sender task of a topic: pipelined transfers, outcomes, reconnect backoff |
//! | `receiver` | the subscription: credit windows, deliveries, settlement |
//! | [`wire`] | the envelope ↔ AMQP message mapping |
//! | [`servicebus`] | SAS tokens and CBS put-token with renewal |
//!
//! This file holds [`AmqpTransport`] and its [`Transport`] implementation, which only routes
//! each call to the parts above.
//!
//! ## Addresses
//!
//! Topic and subscription names become broker addresses through the `[transport.amqp]` address
//! map (templates per flavour, overrides per name), so neither broker's form is hard-coded:
//! Service Bus `orders` / `orders/Subscriptions/inventory`, RabbitMQ `/exchange/orders` /
//! `/amq/queue/orders.inventory`. RabbitMQ routes a message sent to `/exchange/T` by its subject
//! (the message type); the subscription queues are bound with `#`. [`Transport::check_topology`]
//! attaches to every address at start-up and names the first one that does not exist, because
//! RabbitMQ accepts and silently drops what is sent to a missing `/amq/queue/…`.
//!
//! ## Several instances on one subscription
//!
//! With `shards` > 0 (RabbitMQ) a subscription is that many single-active-consumer shard
//! queues fed by a consistent-hash exchange that keeps each stream on one shard; with
//! `sessions` (Service Bus) it is a session-enabled subscription read by session receivers.
//! Either way [`Transport::receivers`] tells the runtime how many receive loops to run, and
//! [`Transport::subscribe_receiver`] opens each: a stream is read by one receiver of one
//! instance at a time, in order, and another takes over when it goes.

mod links;
mod receiver;
mod sender;
pub mod servicebus;
mod settings;
pub mod wire;

pub use receiver::REJECT_CONDITION;
pub use settings::AmqpSettings;

use super::{Envelope, Subscription, Transport, TransportError};
use crate::config::TransportConfig;
use async_trait::async_trait;
use receiver::AmqpSubscription;
use sender::SendRequest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// The AMQP 1.0 transport. Cheap to share (`Arc`); dropping it closes every sender link.
pub struct AmqpTransport {
    settings: Arc<AmqpSettings>,
    senders: Mutex<HashMap<String, mpsc::Sender<SendRequest>>>,
}

impl AmqpTransport {
    /// A transport over resolved settings; nothing connects until the first call.
    pub fn new(settings: AmqpSettings) -> AmqpTransport {
        AmqpTransport {
            settings: Arc::new(settings),
            senders: Mutex::new(HashMap::new()),
        }
    }

    /// The transport `[transport]` describes; `service` names its connections.
    pub fn from_config(
        config: &TransportConfig,
        service: &str,
    ) -> Result<AmqpTransport, TransportError> {
        Ok(AmqpTransport::new(AmqpSettings::from_config(
            config, service,
        )?))
    }

    /// The resolved settings (endpoint, SASL, timeouts, address map).
    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// The broker address `topic` is sent to.
    pub fn topic_address(&self, topic: &str) -> String {
        self.settings.addresses.topic_address_of(topic)
    }

    /// The broker address `subscription` of `topic` is received from.
    pub fn subscription_address(&self, topic: &str, subscription: &str) -> String {
        self.settings
            .addresses
            .subscription_address_of(topic, subscription)
    }

    /// The broker address receiver `index` of `subscription` reads: its shard queue when
    /// `shards` > 0, else the subscription's own address.
    pub fn receiver_address(&self, topic: &str, subscription: &str, index: u32) -> String {
        if self.settings.addresses.shards > 0 {
            self.settings
                .addresses
                .shard_address_of(topic, subscription, index)
        } else {
            self.subscription_address(topic, subscription)
        }
    }

    /// The queue of the sender task of `topic`, started on first use.
    fn sender(&self, topic: &str) -> mpsc::Sender<SendRequest> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = senders.get(topic)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let tx = sender::spawn(self.settings.clone(), topic, self.topic_address(topic));
        senders.insert(topic.to_string(), tx.clone());
        tx
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<(), TransportError> {
        let message = wire::to_message(envelope);
        let (reply, outcome) = oneshot::channel();
        let timeout = self.settings.send_timeout;
        let queue = self.sender(topic);
        let wait = async {
            queue
                .send(SendRequest { message, reply })
                .await
                .map_err(|_| TransportError::Connection(format!("sender of {topic} stopped")))?;
            outcome
                .await
                .map_err(|_| TransportError::Connection(format!("sender of {topic} stopped")))?
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                topic: topic.to_string(),
            }),
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let address = self.subscription_address(topic, subscription);
        let name = format!("{topic}.{subscription}");
        let subscription = AmqpSubscription::open(&self.settings, address, &name, prefetch).await?;
        Ok(Box::new(subscription))
    }

    fn receivers(&self, _topic: &str, _subscription: &str) -> u32 {
        self.settings.addresses.receivers_per_subscription()
    }

    fn receivers_are_shards(&self) -> bool {
        self.settings.addresses.shards > 0 && !self.settings.addresses.sessions
    }

    async fn subscribe_receiver(
        &self,
        topic: &str,
        subscription: &str,
        index: u32,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let address = self.receiver_address(topic, subscription, index);
        let name = format!("{topic}.{subscription}.{index}");
        let subscription = if self.settings.addresses.sessions {
            AmqpSubscription::open_session(&self.settings, address, &name, prefetch).await?
        } else {
            AmqpSubscription::open(&self.settings, address, &name, prefetch).await?
        };
        Ok(Box::new(subscription))
    }

    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError> {
        let mut probes = Vec::new();
        for topic in topics {
            let address = self.topic_address(topic);
            // RabbitMQ accepts a sender on a missing /amq/queue/… (and drops what is sent): a
            // receiver attach is what proves a queue exists.
            let as_receiver = address.starts_with("/amq/queue/");
            probes.push((format!("topic `{topic}`"), address, as_receiver));
        }
        for (topic, subscription) in subscriptions {
            if self.settings.addresses.sessions {
                // A plain receiver cannot attach to a session-enabled entity: its management
                // node answers for the entity instead.
                let address =
                    servicebus::management_address(&self.subscription_address(topic, subscription));
                probes.push((
                    format!("subscription `{subscription}` of topic `{topic}`"),
                    address,
                    false,
                ));
                continue;
            }
            let shards = self.settings.addresses.shards;
            for index in 0..shards.max(1) {
                let what = if shards > 0 {
                    format!("shard {index} of subscription `{subscription}` of topic `{topic}`")
                } else {
                    format!("subscription `{subscription}` of topic `{topic}`")
                };
                probes.push((
                    what,
                    self.receiver_address(topic, subscription, index),
                    true,
                ));
            }
        }
        let results =
            futures::future::join_all(probes.iter().map(|(_, address, as_receiver)| {
                links::probe(&self.settings, address, *as_receiver)
            }))
            .await;
        let missing: Vec<String> = probes
            .iter()
            .zip(results)
            .filter_map(|((what, address, _), result)| {
                result
                    .err()
                    .map(|e| format!("{what} at address `{address}`: {e}"))
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Topology(format!(
                "missing or unreachable on {}: {}",
                self.settings.url,
                missing.join("; ")
            )))
        }
    }
}
