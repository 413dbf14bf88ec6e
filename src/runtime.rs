//! Starting and stopping the actor system of one service instance.
//!
//! Owns the wiring: it builds the store and transport named by the configuration (or takes the
//! ones given), starts the registry, coordinator, partition directory, publisher, dispatcher and
//! one consumer per subscription, registers the handlers before any delivery can arrive, and on
//! shutdown stops consuming, writes what is queued and releases the partition leases at once.
//! It must be called inside a running actix system (`#[actix::main]`). It must not hold
//! business logic.

use crate::admission::Admission;
use crate::apply_group::GroupApply;
use crate::config::{Config, StoreBackend, TransportKind};
use crate::consumer::{Consumer, ShardShare, StopConsumer};
use crate::coordinator::{Coordinator, CoordinatorLinks, CoordinatorSettings, Shutdown};
use crate::dispatcher::{
    DeliveryReceipt, DispatchOptions, Dispatcher, LocalInvoke, PublishEvent, SendCommand, Status,
};
use crate::error::{DispatchError, StartError};
use crate::handler::{Perspective, Receptor};
use crate::message::{Command, Event};
use crate::partition::{PartitionDeps, PartitionDirectory};
use crate::protocol::CoordinatorLink;
use crate::publisher::Publisher;
use crate::registry::{RegisterPerspective, RegisterReceptor, Registry, RegistryView};
use crate::routing::Origin;
use crate::store::memory::MemoryStore;
use crate::store::{CorrelationStatus, InstanceId, Store, StoreSettings};
use crate::supervision::{
    ActorKind, Blueprint, EngineCell, EngineRefs, Health, HealthState, LifelineIssuer, Supervised,
    Supervision,
};
use crate::telemetry::Meters;
use crate::transport::Transport;
use crate::transport::memory::{MemoryBus, MemoryTransport};
use crate::workers::{Placement, Workers};
use actix::prelude::*;
use std::future::Future;
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

    /// Registers the read model `model` of event type `E` under `name`: its writes commit in the
    /// store transaction that records its progress, so it shows each event exactly once (see
    /// [`crate::read_model`]); `consistency` chooses whether it runs after the command (from
    /// the inbox) or inline, inside the command's own transaction.
    pub fn read_model<E: Event, R: crate::ReadModel<E>>(
        mut self,
        name: impl Into<String>,
        model: R,
        consistency: crate::Consistency,
    ) -> Self {
        self.perspectives
            .push(RegisterPerspective::read_model::<E, R>(
                name,
                model,
                consistency,
            ));
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
        let meters = Meters::new(config.telemetry.metrics_addr().is_some());
        // Bound first: an address in use fails the start before anything else is started, and
        // probes get an answer (not ready) while the store is being reached.
        #[cfg(feature = "metrics")]
        let metrics_server = match (config.telemetry.metrics_addr(), meters.prometheus()) {
            (Some(addr), Some(prometheus)) => Some(
                crate::telemetry::MetricsServer::start(addr, prometheus)
                    .map_err(|source| StartError::MetricsListen { addr, source })?,
            ),
            _ => None,
        };
        let store = open_store(&config, self.store).await?;
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
            messaging_system: match config.transport.kind {
                TransportKind::Memory => "whizbang.memory",
                TransportKind::Amqp => match config.transport.amqp.flavour {
                    crate::config::AmqpFlavour::RabbitMq => "rabbitmq",
                    crate::config::AmqpFlavour::ServiceBus => "servicebus",
                },
            },
            sampler: crate::telemetry::traces::Sampler::new(&config.telemetry.tracing),
        };
        let view = RegistryView::default();
        let handler_timeout = Duration::from_millis(config.coordinator.handler_timeout_ms);
        let supervision = Supervision::new();
        let health = HealthState::new(&config, meters.clone());
        health.heartbeat_ok();
        let registry = Registry::new(
            config.routing.topics.clone(),
            view.clone(),
            handler_timeout,
            instance,
            meters.clone(),
            supervision.issuer().issue(ActorKind::Registry, 0),
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

        // One consumer per receiver of each subscription: each shard queue (RabbitMQ) or
        // session receiver (Service Bus) has its own receive loop, so a slow stream holds up
        // only its own shard or session.
        let live_instances = Arc::new(AtomicU32::new(1));
        let mut receivers = Vec::new();
        let mut shard_shares = Vec::new();
        for s in &config.routing.subscriptions {
            let n = transport.receivers(&s.topic, &s.name);
            let share = (n > 1 && transport.receivers_are_shards()).then(|| ShardShare {
                shards: n,
                live_instances: live_instances.clone(),
                active: Arc::new(AtomicU32::new(0)),
            });
            shard_shares.extend(share.clone());
            for receiver in 0..n {
                receivers.push(Receiver {
                    topic: s.topic.clone(),
                    subscription: s.name.clone(),
                    receiver,
                    share: share.clone(),
                });
            }
        }
        let workers = Workers::start(config.runtime.worker_threads)
            .map_err(|e| StartError::Actor(format!("cannot start the worker threads: {e}")))?;
        let consumers = receivers.len();
        let blueprint = blueprint(
            &config,
            workers.placement(),
            &store,
            &transport,
            &origin,
            &view,
            &health,
            receivers,
            &live_instances,
        );
        let supervised = supervision.start(blueprint, registry, consumers, health);
        #[cfg(feature = "metrics")]
        if let Some(server) = &metrics_server {
            server.serve(supervised.clone());
        }
        let admission = Admission::new(&config.runtime, meters);
        let dispatcher = Dispatcher::new(
            origin.clone(),
            view.clone(),
            supervised.engine.clone(),
            store.clone(),
            admission.clone(),
        )
        .start();
        tracing::info!(service = %config.service.name, %instance, store = ?config.store.backend, transport = ?config.transport.kind, "runtime started");
        Ok(Runtime {
            config,
            instance,
            store,
            transport,
            dispatcher,
            supervised,
            workers,
            shard_shares,
            view,
            admission,
            #[cfg(feature = "metrics")]
            metrics_server,
        })
    }
}

/// One receive loop of a subscription: its shard queue (RabbitMQ) or session receiver (Service
/// Bus), or the subscription itself.
struct Receiver {
    topic: String,
    subscription: String,
    receiver: u32,
    share: Option<ShardShare>,
}

/// How the supervisor builds the engine, a consumer and the registry (at start and again after
/// a stop).
#[allow(clippy::too_many_arguments)]
fn blueprint(
    config: &Config,
    placement: Placement,
    store: &Arc<dyn Store>,
    transport: &Arc<dyn Transport>,
    origin: &Origin,
    view: &RegistryView,
    health: &HealthState,
    receivers: Vec<Receiver>,
    live_instances: &Arc<AtomicU32>,
) -> Blueprint {
    let engine = {
        let (store, transport, origin, view, health) = (
            store.clone(),
            transport.clone(),
            origin.clone(),
            view.clone(),
            health.clone(),
        );
        let settings = CoordinatorSettings::from_config(config);
        let window = config.transport.publisher_window as usize;
        let send_timeout = Duration::from_millis(config.transport.send_timeout_ms);
        let live_instances = live_instances.clone();
        // A quarter of the store's connections for read-model transactions at once: the
        // rest stay for work batches, inline commits and replies (see `apply_group`).
        let read_model_transactions = (config.store.pool_size as usize / 4).max(1);
        let idle_after = (config.partitions.idle_actor_seconds > 0)
            .then(|| Duration::from_secs(config.partitions.idle_actor_seconds));
        move |lifelines: LifelineIssuer, recovering: bool| {
            // The coordinator's address exists before it starts, so the partitions and the
            // publisher it hands work to are built with it and given to it whole.
            let (tx, rx) = dev::channel::channel::<Coordinator>(16);
            let coordinator = Addr::new(tx);
            let link = CoordinatorLink {
                commits: coordinator.clone().recipient(),
                reports: coordinator.clone().recipient(),
                awaits: coordinator.clone().recipient(),
            };
            let partitions = PartitionDirectory::new(PartitionDeps {
                store: store.clone(),
                origin: origin.clone(),
                registry: view.clone(),
                coordinator: link.clone(),
                lifelines: lifelines.clone(),
                placement: placement.clone(),
                idle_after,
                group: Arc::new(GroupApply::new(
                    store.clone(),
                    origin.instance,
                    read_model_transactions,
                )),
            });
            let publisher = {
                let (transport, origin, health) =
                    (transport.clone(), origin.clone(), health.clone());
                let lifeline = lifelines.issue(ActorKind::Publisher, 0);
                Publisher::new(
                    transport,
                    link.reports.clone(),
                    origin,
                    window,
                    send_timeout,
                    health,
                    lifeline,
                )
                .start()
            };
            let actor = Coordinator::new(
                store.clone(),
                origin.instance,
                settings.clone(),
                CoordinatorLinks {
                    partitions: partitions.clone(),
                    publisher: publisher.clone().recipient(),
                    health: health.clone(),
                    lifeline: lifelines.issue(ActorKind::Coordinator, 0),
                    recovering,
                    live_instances: live_instances.clone(),
                },
            );
            Context::with_receiver(rx).run(actor);
            EngineRefs {
                commits: link.commits,
                awaits: coordinator.clone().recipient(),
                coordinator,
                partitions,
                publisher,
            }
        }
    };
    let consumer = {
        let (transport, origin, view, health) = (
            transport.clone(),
            origin.clone(),
            view.clone(),
            health.clone(),
        );
        let (prefetch, max_message_bytes) = (
            config.transport.prefetch,
            config.transport.max_message_bytes as usize,
        );
        move |index: usize, lifelines: LifelineIssuer, engine: EngineCell| {
            let r = &receivers[index];
            Consumer {
                topic: r.topic.clone(),
                subscription: r.subscription.clone(),
                receiver: r.receiver,
                share: r.share.clone(),
                transport: transport.clone(),
                engine,
                registry: view.clone(),
                origin: origin.clone(),
                prefetch,
                max_message_bytes,
                health: health.clone(),
                _lifeline: lifelines.issue(ActorKind::Consumer, index),
            }
            .start()
        }
    };
    let registry = {
        let view = view.clone();
        let instance = origin.instance;
        let handler_timeout = Duration::from_millis(config.coordinator.handler_timeout_ms);
        let meters = health.meters().clone();
        move |lifelines: LifelineIssuer| {
            Registry::resume(
                view.clone(),
                handler_timeout,
                instance,
                meters.clone(),
                lifelines.issue(ActorKind::Registry, 0),
            )
            .start()
        }
    };
    Blueprint {
        engine: Box::new(engine),
        consumer: Box::new(consumer),
        registry: Box::new(registry),
    }
}

impl RuntimeBuilder {
    /// Replays the event store through the registered perspective `name` without starting the
    /// instance: it opens the store (as [`RuntimeBuilder::start`] would), starts the registered
    /// perspectives' actors (receptors are not started), and runs the replay, `page_size`
    /// events per read, calling `progress` before the first page and after every page. No
    /// instance is registered, no partition leased, nothing consumed or published: it is what
    /// a service's `replay` command runs (see the `operator` feature), beside or instead of
    /// the running service. Must be called inside a running actix system.
    pub async fn replay(
        self,
        name: &str,
        from: crate::replay::ReplayFrom,
        page_size: u32,
        progress: &mut (dyn FnMut(&crate::replay::ReplayProgress) + Send),
    ) -> Result<crate::replay::ReplayReport, crate::replay::ReplayError> {
        let never = crate::replay::ReplayStop::new();
        self.replay_until(name, from, page_size, progress, &never)
            .await
    }

    /// [`RuntimeBuilder::replay`] that stops after the page it is applying once `stop` is
    /// asked for (its checkpoint saved; the report says `stopped`).
    pub async fn replay_until(
        self,
        name: &str,
        from: crate::replay::ReplayFrom,
        page_size: u32,
        progress: &mut (dyn FnMut(&crate::replay::ReplayProgress) + Send),
        stop: &crate::replay::ReplayStop,
    ) -> Result<crate::replay::ReplayReport, crate::replay::ReplayError> {
        let config = self.config;
        config.validate(std::path::Path::new("(runtime config)"))?;
        let store = open_store(&config, self.store).await?;
        let view = RegistryView::default();
        // A registry of its own, unsupervised: it lives as long as the replay.
        let registry = Registry::new(
            config.routing.topics.clone(),
            view.clone(),
            Duration::from_millis(config.coordinator.handler_timeout_ms),
            Uuid::now_v7(),
            Meters::noop(),
            Supervision::new().issuer().issue(ActorKind::Registry, 0),
        )
        .start();
        for p in self.perspectives {
            registry
                .send(p)
                .await
                .map_err(|e| StartError::Actor(e.to_string()))?
                .map_err(StartError::from)?;
        }
        Ok(crate::replay::replay(&store, &view, name, from, page_size, progress, stop).await?)
    }
}

/// The store given to the builder, or else the one the configuration names (connected, and
/// for Postgres migrated).
async fn open_store(
    config: &Config,
    given: Option<Arc<dyn Store>>,
) -> Result<Arc<dyn Store>, StartError> {
    Ok(match given {
        Some(s) => s,
        None => match config.store.backend {
            StoreBackend::Memory => Arc::new(MemoryStore::new(StoreSettings::from_config(config))),
            #[cfg(feature = "postgres")]
            StoreBackend::Postgres => {
                Arc::new(crate::store::postgres::PostgresStore::connect(config).await?)
            }
            // `validate` refuses it first, naming the missing feature.
            #[cfg(not(feature = "postgres"))]
            StoreBackend::Postgres => return Err(missing_feature("store.backend", "postgres")),
        },
    })
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

/// How long a shutdown past its deadline still waits for the store to release the leases.
const STOP_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running instance of a service.
pub struct Runtime {
    config: Config,
    instance: InstanceId,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    dispatcher: Addr<Dispatcher>,
    supervised: Supervised,
    workers: Workers,
    shard_shares: Vec<ShardShare>,
    view: RegistryView,
    admission: Admission,
    /// The listener of `telemetry.metrics_listen`, if set.
    #[cfg(feature = "metrics")]
    metrics_server: Option<crate::telemetry::MetricsServer>,
}

impl Runtime {
    /// The address `/metrics`, `/health/live` and `/health/ready` are served on
    /// (`telemetry.metrics_listen`, with the port chosen when it named port 0); `None` without
    /// a listener.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "metrics")]
        return self.metrics_server.as_ref().map(|s| s.addr());
        #[cfg(not(feature = "metrics"))]
        None
    }

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
        self.supervised.registry()
    }

    /// How the instance is doing: see [`Health`]. Cheap (no round trip): it reads what the
    /// actors recorded.
    pub fn health(&self) -> Health {
        self.supervised.health()
    }

    /// Resolves when the instance turns unhealthy for good (its actors restarted more than
    /// `runtime.max_restarts` times within `runtime.restart_window_seconds`): a service's
    /// `main` waits on it beside its stop signal and exits non-zero, so that its orchestrator
    /// replaces it.
    pub fn unhealthy(&self) -> impl Future<Output = ()> + 'static {
        let health = self.supervised.health.clone();
        async move { health.unhealthy().await }
    }

    /// The in-flight limit now: `runtime.max_in_flight`, or below it the adaptive limit
    /// (`runtime.adaptive_in_flight`), which follows how long dispatches take once admitted.
    pub fn dispatch_limit(&self) -> u32 {
        self.admission.limit()
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

    /// `LocalInvoke` with options: a conversation to continue, a deadline, an idempotency key
    /// (see [`DispatchOptions::idempotency_key`]).
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

    /// `Send` with options: a conversation to continue, a deadline, an idempotency key.
    pub async fn send_with<C: Command>(
        &self,
        command: C,
        options: DispatchOptions,
    ) -> Result<DeliveryReceipt, DispatchError> {
        self.dispatcher
            .send(SendCommand::new(command).with_options(options))
            .await?
    }

    /// `Publish`: append an event, then perspectives and outbox.
    pub async fn publish<E: Event>(&self, event: E) -> Result<DeliveryReceipt, DispatchError> {
        self.dispatcher.send(PublishEvent::new(event)).await?
    }

    /// A request scope: commands dispatched in it are decided at once and written together,
    /// in one store transaction, by [`crate::Scope::complete`]; dropped, it writes nothing.
    pub fn scope(&self) -> crate::Scope {
        crate::Scope::new(self.dispatcher.clone())
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
        let never = crate::replay::ReplayStop::new();
        crate::replay::replay(
            &self.store,
            &self.view,
            name,
            from,
            500,
            &mut |_| {},
            &never,
        )
        .await
    }

    /// [`Runtime::replay_perspective`], reading `page_size` events at a time and calling
    /// `progress` before the first page and after every page.
    pub async fn replay_perspective_with_progress(
        &self,
        name: &str,
        from: crate::replay::ReplayFrom,
        page_size: u32,
        progress: &mut (dyn FnMut(&crate::replay::ReplayProgress) + Send),
    ) -> Result<crate::replay::ReplayReport, DispatchError> {
        let never = crate::replay::ReplayStop::new();
        crate::replay::replay(
            &self.store,
            &self.view,
            name,
            from,
            page_size,
            progress,
            &never,
        )
        .await
    }

    /// Stops consuming and taking new dispatches, lets those in flight and the rows handed to
    /// partition actors and the publisher finish, writes their completions and releases this
    /// instance's partitions, all within `runtime.shutdown_timeout_ms`. Past it, the work still
    /// running is stopped (logged with what was left) and the leases are released anyway: the
    /// next holder re-runs what was left (at least once). An error only if the store could not
    /// be told: then the leases expire.
    pub async fn shutdown(self) -> Result<(), DispatchError> {
        let deadline = Duration::from_millis(self.config.runtime.shutdown_timeout_ms);
        let started = std::time::Instant::now();
        // Actors stopped from here on are not restarted.
        self.supervised.health.begin_stopping();
        for consumer in self.supervised.consumers() {
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
        let coordinator = self.supervised.engine.coordinator();
        let outcome = match tokio::time::timeout(remaining, coordinator.send(Shutdown)).await {
            Ok(answer) => answer.map_err(DispatchError::from).and_then(|done| done),
            Err(_) => {
                // Past the deadline: the handlers still running are stopped with their threads,
                // and the leases released anyway, so the next holder starts at once; it re-runs
                // what was left (at least once).
                let (inbox, outbox) = tokio::time::timeout(
                    Duration::from_millis(200),
                    coordinator.send(crate::coordinator::RowsInFlight),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
                self.workers.stop();
                let released = tokio::time::timeout(
                    STOP_RELEASE_TIMEOUT,
                    self.store.release_partitions(self.instance, None),
                )
                .await;
                let released = matches!(released, Ok(Ok(())));
                tracing::warn!(
                    deadline_ms = deadline.as_millis() as u64,
                    inbox_rows_left = inbox,
                    outbox_rows_left = outbox,
                    released,
                    "shutdown deadline passed with work still running: it was stopped, the \
                     leases were released anyway (or, if the store did not answer, expire), and \
                     the next holder re-runs what was left (at least once)"
                );
                if released {
                    Ok(())
                } else {
                    Err(DispatchError::Unavailable(format!(
                        "shutdown did not finish within runtime.shutdown_timeout_ms ({} ms) and \
                         the store did not take the release of the leases: they expire, and the \
                         next holder re-runs what was left",
                        deadline.as_millis()
                    )))
                }
            }
        };
        self.workers.stop();
        #[cfg(feature = "metrics")]
        if let Some(server) = self.metrics_server {
            server.stop().await;
        }
        outcome
    }
}
