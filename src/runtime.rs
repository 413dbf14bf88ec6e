//! Starting and stopping the actor system of one service instance.
//!
//! Owns the wiring: it builds the store and transport named by the configuration (or takes the
//! ones given), starts the registry, coordinator, partition directory, publisher, dispatcher and
//! one consumer per subscription, registers the handlers before any delivery can arrive, and on
//! shutdown stops consuming, writes what is queued and releases the partition leases at once.
//! It must be called inside a running actix system (`#[actix::main]`). It must not hold
//! business logic.

use crate::config::{Config, StoreBackend, TransportKind};
use crate::consumer::{Consumer, ShardShare, StopConsumer};
use crate::coordinator::{Attach, Coordinator, CoordinatorSettings, Shutdown};
use crate::dispatcher::{
    Admission, DeliveryReceipt, DispatchOptions, Dispatcher, LocalInvoke, PublishEvent,
    SendCommand, Status,
};
use crate::error::{DispatchError, StartError};
use crate::handler::{Perspective, Receptor};
use crate::message::{Command, Event};
use crate::partition::{PartitionDeps, PartitionDirectory};
use crate::publisher::Publisher;
use crate::registry::{RegisterPerspective, RegisterReceptor, Registry, RegistryView};
use crate::routing::Origin;
use crate::store::memory::MemoryStore;
use crate::store::{CorrelationStatus, InstanceId, Store, StoreSettings};
use crate::transport::Transport;
use crate::transport::memory::{MemoryBus, MemoryTransport};
use actix::prelude::*;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;
use uuid::Uuid;

/// Collects handlers and overrides, then starts the runtime.
pub struct RuntimeBuilder {
    config: Config,
    store: Option<Arc<dyn Store>>,
    transport: Option<Arc<dyn Transport>>,
    receptors: Vec<RegisterReceptor>,
    perspectives: Vec<RegisterPerspective>,
    instance: Option<InstanceId>,
}

impl RuntimeBuilder {
    /// Registers the receptor of command type `C`.
    pub fn receptor<C: Command, R: Receptor<C>>(mut self, receptor: R) -> Self {
        self.receptors.push(RegisterReceptor::new::<C, R>(receptor));
        self
    }

    /// Registers a perspective of event type `E` under `name`.
    pub fn perspective<E: Event, P: Perspective<E>>(
        mut self,
        name: impl Into<String>,
        perspective: P,
    ) -> Self {
        self.perspectives
            .push(RegisterPerspective::new::<E, P>(name, perspective));
        self
    }

    /// Uses this store instead of the one the configuration names (tests share one store
    /// between instances this way).
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses this transport instead of the one the configuration names.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Uses this instance id instead of a new one (a restarted process may keep its id).
    pub fn instance_id(mut self, instance: InstanceId) -> Self {
        self.instance = Some(instance);
        self
    }

    /// Starts every actor. On error nothing is left consuming or publishing.
    pub async fn start(self) -> Result<Runtime, StartError> {
        let config = self.config;
        config.validate(std::path::Path::new("(runtime config)"))?;
        let instance = self.instance.unwrap_or_else(Uuid::now_v7);
        let store: Arc<dyn Store> = match self.store {
            Some(s) => s,
            None => match config.store.backend {
                StoreBackend::Memory => {
                    Arc::new(MemoryStore::new(StoreSettings::from_config(&config)))
                }
                #[cfg(feature = "postgres")]
                StoreBackend::Postgres => {
                    Arc::new(crate::store::postgres::PostgresStore::connect(&config).await?)
                }
                // `validate` above refuses it, naming the missing feature.
                #[cfg(not(feature = "postgres"))]
                StoreBackend::Postgres => return Err(missing_feature("store.backend", "postgres")),
            },
        };
        let transport: Arc<dyn Transport> = match self.transport {
            Some(t) => t,
            None => match config.transport.kind {
                TransportKind::Memory => Arc::new(MemoryTransport::new(MemoryBus::new())),
                #[cfg(feature = "amqp")]
                TransportKind::Amqp => {
                    Arc::new(crate::transport::amqp::AmqpTransport::from_config(
                        &config.transport,
                        &config.service.name,
                    )?)
                }
                // `validate` above refuses it, naming the missing feature.
                #[cfg(not(feature = "amqp"))]
                TransportKind::Amqp => return Err(missing_feature("transport.kind", "amqp")),
            },
        };
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        store
            .register_instance(instance, &config.service.name, &host)
            .await?;

        let origin = Origin {
            service: config.service.name.clone(),
            instance,
            partition_count: config.partitions.partition_count,
            max_message_bytes: config.transport.max_message_bytes as usize,
        };
        let view = RegistryView::default();
        let registry = Registry::new(
            config.routing.topics.clone(),
            view.clone(),
            Duration::from_millis(config.coordinator.handler_timeout_ms),
        )
        .start();
        for r in self.receptors {
            registry
                .send(r)
                .await
                .map_err(|e| StartError::Actor(e.to_string()))??;
        }
        for p in self.perspectives {
            registry
                .send(p)
                .await
                .map_err(|e| StartError::Actor(e.to_string()))??;
        }

        let mut topics: Vec<String> = config.routing.topics.values().cloned().collect();
        topics.sort();
        topics.dedup();
        let subscriptions: Vec<(String, String)> = config
            .routing
            .subscriptions
            .iter()
            .map(|s| (s.topic.clone(), s.name.clone()))
            .collect();
        transport.check_topology(&topics, &subscriptions).await?;

        let coordinator = Coordinator::new(
            store.clone(),
            instance,
            CoordinatorSettings::from_config(&config),
        );
        let live_instances = coordinator.live_instances();
        let coordinator = coordinator.start();
        let partitions = PartitionDirectory::new(PartitionDeps {
            origin: origin.clone(),
            registry: view.clone(),
            coordinator: coordinator.clone(),
        });
        let publisher = Publisher::new(
            transport.clone(),
            coordinator.clone(),
            origin.clone(),
            config.transport.publisher_window as usize,
            Duration::from_millis(config.transport.send_timeout_ms),
        )
        .start();
        coordinator
            .send(Attach {
                partitions: partitions.clone(),
                publisher: Some(publisher),
            })
            .await
            .map_err(|e| StartError::Actor(e.to_string()))?;
        let admission = Admission::new(&config.runtime);
        let dispatcher = Dispatcher::new(
            origin.clone(),
            view.clone(),
            partitions.clone(),
            coordinator.clone(),
            store.clone(),
            admission.clone(),
        )
        .start();

        let mut consumers = Vec::new();
        let mut shard_shares = Vec::new();
        for s in &config.routing.subscriptions {
            // One consumer per receiver of the subscription: each shard queue (RabbitMQ) or
            // session receiver (Service Bus) has its own receive loop, so a slow stream holds
            // up only its own shard or session.
            let receivers = transport.receivers(&s.topic, &s.name);
            let share = (receivers > 1 && transport.receivers_are_shards()).then(|| ShardShare {
                shards: receivers,
                live_instances: live_instances.clone(),
                active: Arc::new(AtomicU32::new(0)),
            });
            shard_shares.extend(share.clone());
            for receiver in 0..receivers {
                consumers.push(
                    Consumer {
                        topic: s.topic.clone(),
                        subscription: s.name.clone(),
                        receiver,
                        share: share.clone(),
                        transport: transport.clone(),
                        coordinator: coordinator.clone(),
                        registry: view.clone(),
                        origin: origin.clone(),
                        prefetch: config.transport.prefetch,
                        max_message_bytes: config.transport.max_message_bytes as usize,
                    }
                    .start(),
                );
            }
        }
        tracing::info!(service = %config.service.name, %instance, store = ?config.store.backend, transport = ?config.transport.kind, "runtime started");
        Ok(Runtime {
            config,
            instance,
            store,
            transport,
            registry,
            dispatcher,
            coordinator,
            consumers,
            shard_shares,
            view,
            admission,
        })
    }
}

/// A backend this build was compiled without: `Config::validate` refuses it first; answered the
/// same way here rather than assumed unreachable.
#[cfg(not(all(feature = "postgres", feature = "amqp")))]
fn missing_feature(key: &str, feature: &str) -> StartError {
    StartError::Config(crate::config::ConfigError::Invalid {
        file: "(runtime config)".into(),
        key: key.into(),
        message: format!("needs whizbang's cargo feature `{feature}`, which this build lacks"),
    })
}

/// A running instance of a service.
pub struct Runtime {
    config: Config,
    instance: InstanceId,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    registry: Addr<Registry>,
    dispatcher: Addr<Dispatcher>,
    coordinator: Addr<Coordinator>,
    consumers: Vec<Addr<Consumer>>,
    shard_shares: Vec<ShardShare>,
    view: RegistryView,
    admission: Admission,
}

impl Runtime {
    /// How many shard queues (sharded subscriptions, `transport.amqp.shards`) this instance is
    /// the active consumer of right now; 0 without sharded subscriptions.
    pub fn active_shards(&self) -> u32 {
        self.shard_shares
            .iter()
            .map(|s| s.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Starts configuring a runtime; see [`RuntimeBuilder::start`].
    pub fn builder(config: Config) -> RuntimeBuilder {
        RuntimeBuilder {
            config,
            store: None,
            transport: None,
            receptors: Vec::new(),
            perspectives: Vec::new(),
            instance: None,
        }
    }

    /// The dispatcher actor: send it [`LocalInvoke`], [`SendCommand`], [`PublishEvent`],
    /// [`Status`].
    pub fn dispatcher(&self) -> Addr<Dispatcher> {
        self.dispatcher.clone()
    }

    /// The registry actor: handlers can be registered after start too.
    pub fn registry(&self) -> Addr<Registry> {
        self.registry.clone()
    }

    /// The store this instance writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The transport this instance publishes to and consumes from.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// This instance's id (its leases are held under it).
    pub fn instance_id(&self) -> InstanceId {
        self.instance
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `LocalInvoke`: the typed result, after the events are stored and perspectives ran.
    pub async fn local_invoke<C: Command, R: Send + 'static>(
        &self,
        command: C,
    ) -> Result<R, DispatchError> {
        self.dispatcher
            .send(LocalInvoke::<C, R>::new(command))
            .await?
    }

    /// `LocalInvoke` continuing a conversation.
    pub async fn local_invoke_with<C: Command, R: Send + 'static>(
        &self,
        command: C,
        options: DispatchOptions,
    ) -> Result<R, DispatchError> {
        self.dispatcher
            .send(LocalInvoke::<C, R>::new(command).with_options(options))
            .await?
    }

    /// `Send`: a receipt once the command's effects are committed.
    pub async fn send<C: Command>(&self, command: C) -> Result<DeliveryReceipt, DispatchError> {
        self.dispatcher.send(SendCommand::new(command)).await?
    }

    /// `Publish`: append an event, then perspectives and outbox.
    pub async fn publish<E: Event>(&self, event: E) -> Result<DeliveryReceipt, DispatchError> {
        self.dispatcher.send(PublishEvent::new(event)).await?
    }

    /// What one request caused, by correlation id.
    pub async fn status(&self, correlation_id: Uuid) -> Result<CorrelationStatus, DispatchError> {
        self.dispatcher.send(Status(correlation_id)).await?
    }

    /// Replays the event store through the perspective `name` (rebuild from scratch, or resume
    /// from its checkpoint), saving its checkpoint as it goes.
    pub async fn replay_perspective(
        &self,
        name: &str,
        from: crate::replay::ReplayFrom,
    ) -> Result<crate::replay::ReplayReport, DispatchError> {
        crate::replay::replay(&self.store, &self.view, name, from, 500).await
    }

    /// Stops consuming and taking new dispatches, lets those in flight finish, writes everything
    /// queued and releases this instance's partitions, all within `runtime.shutdown_timeout_ms`;
    /// past it the leases are left to expire (the next holder re-runs what was left).
    pub async fn shutdown(self) -> Result<(), DispatchError> {
        let deadline = Duration::from_millis(self.config.runtime.shutdown_timeout_ms);
        let started = std::time::Instant::now();
        for consumer in &self.consumers {
            let _ = consumer.send(StopConsumer).await;
        }
        // No new dispatches; those in flight finish first, so their rows are written and
        // completed here rather than re-run by the next holder of their partitions.
        let left = self.admission.drain(deadline).await;
        if left > 0 {
            tracing::warn!(
                left,
                "shutdown deadline passed with dispatches in flight; their callers were answered \
                 or will be, and the next holder of their partitions re-runs what did not commit"
            );
        }
        let remaining = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, self.coordinator.send(Shutdown)).await {
            Ok(answer) => answer?,
            Err(_) => {
                tracing::warn!(
                    deadline_ms = deadline.as_millis() as u64,
                    "shutdown deadline passed before the store took what was queued and the \
                     leases were released: another instance takes the partitions over when \
                     their leases expire and re-runs what was left (at least once)"
                );
                Err(DispatchError::Unavailable(format!(
                    "shutdown did not finish within runtime.shutdown_timeout_ms ({} ms); the \
                     leases expire and the next holder re-runs what was left",
                    deadline.as_millis()
                )))
            }
        }
    }
}
