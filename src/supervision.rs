//! Supervision of the instance's long-lived actors, and the health it reports.
//!
//! Owns the restart of every long-lived actor (coordinator, partition actors, publisher,
//! consumers, registry) after a panic or any stop nobody asked for, the count of those restarts
//! against `runtime.max_restarts` per `runtime.restart_window_seconds`, and [`Health`].
//!
//! Each supervised actor owns a [`Lifeline`]; the actor's state is dropped with it however it
//! ends (a panic in a handler ends the actor's task), and the lifeline tells the supervisor.
//! The coordinator, the partition actors and the publisher form one group, the *engine*,
//! restarted together: they hold each other's work in flight, so a survivor would report rows
//! to a coordinator that no longer knows them while the new one hands the same rows out again.
//! The new engine's first batch re-reads from the store every row this instance holds claimed
//! (as after a lost answer), so nothing handed to the old engine is lost; what it had run and
//! not yet recorded runs again (at least once, as documented). A consumer is restarted alone:
//! its link goes with it and the broker redelivers what it had not settled. The registry is
//! restarted from the table it last published.
//!
//! It must not run user code or touch the store itself; it only starts and stops actors.

use crate::coordinator::Coordinator;
use crate::partition::PartitionDirectory;
use crate::protocol::{AwaitProcessed, Commit};
use crate::publisher::Publisher;
use crate::retry::Backoff;
use crate::telemetry::Meters;
use actix::prelude::*;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The kinds of long-lived actor an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// The one writer of work batches.
    Coordinator,
    /// A stream partition's actor (runs receptors and perspectives in order).
    Partition,
    /// Drains claimed outbox rows to the transport.
    Publisher,
    /// One subscription's receive loop.
    Consumer,
    /// Registration of handlers.
    Registry,
}

impl ActorKind {
    /// Whether a stop of this kind restarts the whole engine group.
    fn in_engine(self) -> bool {
        matches!(
            self,
            ActorKind::Coordinator | ActorKind::Partition | ActorKind::Publisher
        )
    }
}

/// An actor's end, as its lifeline reports it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Death {
    kind: ActorKind,
    /// The engine generation (engine kinds) or the consumer's own generation.
    generation: u64,
    /// Which consumer (its index in the configuration); 0 for the others.
    index: usize,
}

/// Owned by a supervised actor: dropped with it however it ends, and then tells the supervisor.
pub(crate) struct Lifeline {
    death: Death,
    tx: mpsc::UnboundedSender<Death>,
    armed: bool,
}

impl Lifeline {
    /// The actor is stopping on purpose (an idle partition actor): its end is not a death.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl std::fmt::Debug for Lifeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lifeline").field(&self.death.kind).finish()
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let death = self.death;
        // The supervisor is gone only when the whole system is stopping.
        let _ = self.tx.send(death);
    }
}

/// Hands out lifelines of one generation.
#[derive(Clone)]
pub(crate) struct LifelineIssuer {
    tx: mpsc::UnboundedSender<Death>,
    generation: u64,
}

impl LifelineIssuer {
    /// A lifeline for an actor of `kind` (consumer `index`).
    pub(crate) fn issue(&self, kind: ActorKind, index: usize) -> Lifeline {
        Lifeline {
            death: Death {
                kind,
                generation: self.generation,
                index,
            },
            tx: self.tx.clone(),
            armed: true,
        }
    }
}

/// The current engine: who the dispatcher and the consumers hand work to. Replaced when the
/// engine is restarted.
#[derive(Clone)]
pub(crate) struct EngineRefs {
    /// Where writers (the dispatcher, the consumers) queue units to commit.
    pub commits: Recipient<Commit>,
    /// Where a replayed idempotent dispatch waits for the first run's perspectives.
    pub awaits: Recipient<AwaitProcessed>,
    /// The actor itself, for the runtime's and the supervisor's own messages (shutdown, stop).
    pub coordinator: Addr<Coordinator>,
    pub partitions: PartitionDirectory,
    pub publisher: Addr<Publisher>,
}

/// The shared, briefly locked slot holding the current [`EngineRefs`].
#[derive(Clone)]
pub(crate) struct EngineCell(Arc<RwLock<EngineRefs>>);

impl EngineCell {
    pub(crate) fn new(refs: EngineRefs) -> EngineCell {
        EngineCell(Arc::new(RwLock::new(refs)))
    }

    /// The current coordinator, for the runtime's shutdown.
    pub(crate) fn coordinator(&self) -> Addr<Coordinator> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .coordinator
            .clone()
    }

    /// Where the current coordinator takes units to commit.
    pub(crate) fn commits(&self) -> Recipient<Commit> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .commits
            .clone()
    }

    /// Where the current coordinator takes waits for processed inbox rows.
    pub(crate) fn awaits(&self) -> Recipient<AwaitProcessed> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .awaits
            .clone()
    }

    /// The current partition directory.
    pub(crate) fn partitions(&self) -> PartitionDirectory {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .partitions
            .clone()
    }

    fn get(&self) -> EngineRefs {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, refs: EngineRefs) -> EngineRefs {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            refs,
        )
    }
}

/// Asks a supervised actor to stop now: its spawned work is dropped with it.
pub(crate) struct StopNow;

impl Message for StopNow {
    type Result = ();
}

/// What the runtime's actors record for [`Health`], shared with the supervisor.
#[derive(Clone)]
pub(crate) struct HealthState(Arc<HealthInner>);

struct HealthInner {
    /// The metrics the actors holding this state record (see [`crate::telemetry`]).
    meters: Meters,
    started: Instant,
    max_restarts: u32,
    restart_window: Duration,
    heartbeat_interval: Duration,
    /// Milliseconds since `started` of the last successful heartbeat; 0: none yet.
    heartbeat_ok_ms: AtomicU64,
    /// Milliseconds since `started` when the store began failing; 0: it answers.
    store_failing_since_ms: AtomicU64,
    /// Milliseconds since `started` when the transport began failing; 0: it answers.
    transport_failing_since_ms: AtomicU64,
    restarts: Mutex<RestartLog>,
    /// Rows handed to partition actors (inbox) and the publisher (outbox), not reported back.
    inbox_rows_in_flight: AtomicUsize,
    outbox_rows_in_flight: AtomicUsize,
    /// `false` once restarts exceeded their budget: the instance should be replaced.
    live: watch::Sender<bool>,
    stopping: AtomicBool,
}

#[derive(Default)]
struct RestartLog {
    recent: VecDeque<(Instant, ActorKind)>,
    total: u64,
}

impl HealthState {
    pub(crate) fn new(config: &crate::Config, meters: Meters) -> HealthState {
        HealthState(Arc::new(HealthInner {
            meters,
            started: Instant::now(),
            max_restarts: config.runtime.max_restarts,
            restart_window: Duration::from_secs(config.runtime.restart_window_seconds),
            heartbeat_interval: Duration::from_secs(config.partitions.heartbeat_seconds),
            heartbeat_ok_ms: AtomicU64::new(0),
            store_failing_since_ms: AtomicU64::new(0),
            transport_failing_since_ms: AtomicU64::new(0),
            restarts: Mutex::new(RestartLog::default()),
            inbox_rows_in_flight: AtomicUsize::new(0),
            outbox_rows_in_flight: AtomicUsize::new(0),
            live: watch::channel(true).0,
            stopping: AtomicBool::new(false),
        }))
    }

    /// The metrics of this instance.
    pub(crate) fn meters(&self) -> &Meters {
        &self.0.meters
    }

    fn now_ms(&self) -> u64 {
        // At least 1: 0 means "never" / "not failing".
        (self.0.started.elapsed().as_millis() as u64).max(1)
    }

    /// A heartbeat was written.
    pub(crate) fn heartbeat_ok(&self) {
        self.0
            .heartbeat_ok_ms
            .store(self.now_ms(), Ordering::Relaxed);
        self.store_ok();
    }

    /// A statement of the store answered.
    pub(crate) fn store_ok(&self) {
        self.0.store_failing_since_ms.store(0, Ordering::Relaxed);
    }

    /// A statement of the store failed (unreachable, timed out, refused).
    pub(crate) fn store_failed(&self) {
        let now = self.now_ms();
        let _ = self.0.store_failing_since_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The rows the coordinator has handed out and not had reported back, per queue.
    pub(crate) fn rows_in_flight(&self, inbox: usize, outbox: usize) {
        self.0.meters.rows_in_flight(inbox, outbox);
        self.0.inbox_rows_in_flight.store(inbox, Ordering::Relaxed);
        self.0
            .outbox_rows_in_flight
            .store(outbox, Ordering::Relaxed);
    }

    /// The transport accepted a send or opened a subscription.
    pub(crate) fn transport_ok(&self) {
        self.0
            .transport_failing_since_ms
            .store(0, Ordering::Relaxed);
    }

    /// A send or a subscription failed at the transport.
    pub(crate) fn transport_failed(&self) {
        let now = self.now_ms();
        let _ = self.0.transport_failing_since_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Counts a restart; answers whether the budget still holds.
    fn restarted(&self, kind: ActorKind) -> bool {
        self.0.meters.restarted(kind);
        let mut log = self.0.restarts.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        log.total += 1;
        log.recent.push_back((now, kind));
        let window = self.0.restart_window;
        while log
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            log.recent.pop_front();
        }
        let within = log.recent.len() as u32 <= self.0.max_restarts;
        if !within {
            self.0.live.send_replace(false);
        }
        within
    }

    fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }

    /// Shutdown begins: actors that stop from now on are not restarted.
    pub(crate) fn begin_stopping(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
    }

    /// Resolves when the instance turns unhealthy for good (restarts over their budget).
    pub(crate) async fn unhealthy(&self) {
        let mut rx = self.0.live.subscribe();
        let _ = rx.wait_for(|live| !*live).await;
    }

    /// The report; `actors_alive` and `partition_actors` come from the caller, which holds the
    /// addresses.
    pub(crate) fn report(&self, actors_alive: bool, partition_actors: usize) -> Health {
        let now = self.now_ms();
        let since = |at: u64| (at != 0).then(|| now.saturating_sub(at));
        let heartbeat_ms = since(self.0.heartbeat_ok_ms.load(Ordering::Relaxed));
        let store_failing = since(self.0.store_failing_since_ms.load(Ordering::Relaxed));
        let transport_failing = since(self.0.transport_failing_since_ms.load(Ordering::Relaxed));
        let (restarts_in_window, restarts_total, last_restarts) = {
            let log = self.0.restarts.lock().unwrap_or_else(|p| p.into_inner());
            let window = self.0.restart_window;
            let recent: Vec<ActorKind> = log
                .recent
                .iter()
                .filter(|(at, _)| at.elapsed() <= window)
                .map(|(_, k)| *k)
                .collect();
            (recent.len() as u32, log.total, recent)
        };
        let live = *self.0.live.borrow();
        // The heartbeat is late after three missed beats (the first one is written at start
        // plus one interval).
        let late_after = self.0.heartbeat_interval.as_millis() as u64 * 3;
        let heartbeat_late = match heartbeat_ms {
            Some(age) => age > late_after,
            None => now > late_after,
        };
        let mut reasons = Vec::new();
        if !live {
            reasons.push(format!(
                "{restarts_in_window} actor restarts within {} s (runtime.max_restarts = {}): \
                 replace this instance",
                self.0.restart_window.as_secs(),
                self.0.max_restarts
            ));
        }
        if self.is_stopping() {
            reasons.push("the instance is shutting down".into());
        } else if !actors_alive {
            reasons.push("an actor stopped and was not restarted yet".into());
        }
        if let Some(ms) = store_failing {
            reasons.push(format!("the store has been failing for {ms} ms"));
        }
        if let Some(ms) = transport_failing {
            reasons.push(format!("the transport has been failing for {ms} ms"));
        }
        if heartbeat_late {
            reasons.push(match heartbeat_ms {
                Some(ms) => format!("the last heartbeat was written {ms} ms ago"),
                None => "no heartbeat written yet".into(),
            });
        }
        Health {
            live,
            ready: reasons.is_empty(),
            reasons,
            database_reachable: store_failing.is_none(),
            transport_connected: transport_failing.is_none(),
            heartbeat_age_ms: heartbeat_ms,
            actors_alive,
            partition_actors,
            inbox_rows_in_flight: self.0.inbox_rows_in_flight.load(Ordering::Relaxed),
            outbox_rows_in_flight: self.0.outbox_rows_in_flight.load(Ordering::Relaxed),
            restarts_in_window,
            restarts_total,
            restarted: last_restarts,
        }
    }
}

/// How an instance is doing, from [`crate::Runtime::health`].
///
/// `live` answers an orchestrator's liveness probe: `false` only when actors kept failing
/// (more than `runtime.max_restarts` restarts within `runtime.restart_window_seconds`), and the
/// instance should be replaced. `ready` answers readiness: live, every actor running, the
/// store and the transport answering, the heartbeat on time; `reasons` says what is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// The instance works; `false`: replace it.
    pub live: bool,
    /// The instance can take work now.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub reasons: Vec<String>,
    /// The store's last statement answered.
    pub database_reachable: bool,
    /// The transport's last send or subscription answered.
    pub transport_connected: bool,
    /// Milliseconds since the last heartbeat was written; `None`: none yet.
    pub heartbeat_age_ms: Option<u64>,
    /// Every supervised actor is running.
    pub actors_alive: bool,
    /// Partition actors running (idle ones stop after `partitions.idle_actor_seconds`).
    pub partition_actors: usize,
    /// Inbox rows handed to partition actors and not finished (at most
    /// `coordinator.max_rows_in_flight`, but for one batch's writer rows).
    pub inbox_rows_in_flight: usize,
    /// Outbox rows handed to the publisher and not sent yet.
    pub outbox_rows_in_flight: usize,
    /// Restarts within `runtime.restart_window_seconds`.
    pub restarts_in_window: u32,
    /// Restarts since start.
    pub restarts_total: u64,
    /// The kinds restarted within the window, oldest first.
    pub restarted: Vec<ActorKind>,
}

impl Health {
    /// The report of an instance still starting (its store not reached yet): live, not ready.
    pub fn starting() -> Health {
        Health {
            live: true,
            ready: false,
            reasons: vec!["the instance is starting".into()],
            database_reachable: false,
            transport_connected: false,
            heartbeat_age_ms: None,
            actors_alive: false,
            partition_actors: 0,
            inbox_rows_in_flight: 0,
            outbox_rows_in_flight: 0,
            restarts_in_window: 0,
            restarts_total: 0,
            restarted: Vec::new(),
        }
    }
}

/// How to build what the supervisor (re)starts.
pub(crate) struct Blueprint {
    /// Starts an engine whose actors hold lifelines of `issuer`; `recovering`: its first batch
    /// re-reads the rows this instance holds claimed.
    pub engine: Box<dyn Fn(LifelineIssuer, bool) -> EngineRefs>,
    /// Starts consumer `index`, committing through the engine in the cell.
    pub consumer: Box<dyn Fn(usize, LifelineIssuer, EngineCell) -> Addr<crate::consumer::Consumer>>,
    /// Starts the registry again from the table it last published.
    pub registry: Box<dyn Fn(LifelineIssuer) -> Addr<crate::registry::Registry>>,
}

/// What the runtime holds of the supervised actors.
#[derive(Clone)]
pub(crate) struct Supervised {
    pub engine: EngineCell,
    pub consumers: Arc<RwLock<Vec<Addr<crate::consumer::Consumer>>>>,
    pub registry: Arc<RwLock<Addr<crate::registry::Registry>>>,
    pub health: HealthState,
}

impl Supervised {
    /// Whether every supervised actor is running.
    pub(crate) fn actors_alive(&self) -> bool {
        let engine = self.engine.get();
        engine.coordinator.connected()
            && engine.publisher.connected()
            && self
                .registry
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .connected()
            && self
                .consumers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .all(|c| c.connected())
    }

    /// The report of [`HealthState::report`] with what the addresses say.
    pub(crate) fn health(&self) -> Health {
        self.health
            .report(self.actors_alive(), self.engine.get().partitions.running())
    }

    /// The current consumers.
    pub(crate) fn consumers(&self) -> Vec<Addr<crate::consumer::Consumer>> {
        self.consumers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current registry.
    pub(crate) fn registry(&self) -> Addr<crate::registry::Registry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The supervisor before it starts: hands out the first lifelines (the registry is started,
/// and handlers registered, before the rest).
pub(crate) struct Supervision {
    tx: mpsc::UnboundedSender<Death>,
    rx: mpsc::UnboundedReceiver<Death>,
}

impl Supervision {
    pub(crate) fn new() -> Supervision {
        let (tx, rx) = mpsc::unbounded_channel();
        Supervision { tx, rx }
    }

    /// Lifelines of the first generation.
    pub(crate) fn issuer(&self) -> LifelineIssuer {
        LifelineIssuer {
            tx: self.tx.clone(),
            generation: 0,
        }
    }

    /// Starts the engine and `consumers` consumers, and the supervisor that restarts them and
    /// `registry`.
    pub(crate) fn start(
        self,
        blueprint: Blueprint,
        registry: Addr<crate::registry::Registry>,
        consumers: usize,
        health: HealthState,
    ) -> Supervised {
        let engine = EngineCell::new((blueprint.engine)(self.issuer(), false));
        let consumer_addrs = (0..consumers)
            .map(|i| (blueprint.consumer)(i, self.issuer(), engine.clone()))
            .collect();
        let supervised = Supervised {
            engine,
            consumers: Arc::new(RwLock::new(consumer_addrs)),
            registry: Arc::new(RwLock::new(registry)),
            health,
        };
        let watcher = Watcher {
            blueprint,
            supervised: supervised.clone(),
            tx: self.tx,
            engine_generation: 0,
            consumer_generations: vec![0; consumers],
            registry_generation: 0,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(10)),
            last_restart: None,
        };
        actix::spawn(watcher.run(self.rx));
        supervised
    }
}

/// The supervisor's loop: one restart per death of a current actor.
struct Watcher {
    blueprint: Blueprint,
    supervised: Supervised,
    tx: mpsc::UnboundedSender<Death>,
    engine_generation: u64,
    consumer_generations: Vec<u64>,
    registry_generation: u64,
    /// Restarts in quick succession wait longer each time, so a fault that recurs at once
    /// (a poisoned row) does not spin.
    backoff: Backoff,
    last_restart: Option<Instant>,
}

impl Watcher {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Death>) {
        while let Some(death) = rx.recv().await {
            if self.supervised.health.is_stopping() || !self.is_current(&death) {
                continue;
            }
            let within_budget = self.supervised.health.restarted(death.kind);
            if !within_budget {
                tracing::error!(
                    actor = ?death.kind,
                    "actors keep stopping: more than runtime.max_restarts restarts within \
                     runtime.restart_window_seconds; the instance is unhealthy (replace it)"
                );
            }
            if self
                .last_restart
                .is_some_and(|at| at.elapsed() > self.supervised.health.0.restart_window)
            {
                self.backoff.reset();
            }
            let delay = self.backoff.next_delay();
            tracing::error!(
                actor = ?death.kind,
                restart_in_ms = delay.as_millis() as u64,
                "actor stopped unexpectedly (a panic in its code, or a stop nobody asked for); \
                 restarting it"
            );
            tokio::time::sleep(delay).await;
            if self.supervised.health.is_stopping() {
                continue;
            }
            self.restart(&death);
            self.last_restart = Some(Instant::now());
        }
    }

    fn issuer(&self, generation: u64) -> LifelineIssuer {
        LifelineIssuer {
            tx: self.tx.clone(),
            generation,
        }
    }

    fn is_current(&self, death: &Death) -> bool {
        match death.kind {
            k if k.in_engine() => death.generation == self.engine_generation,
            ActorKind::Consumer => {
                self.consumer_generations.get(death.index) == Some(&death.generation)
            }
            _ => death.generation == self.registry_generation,
        }
    }

    fn restart(&mut self, death: &Death) {
        match death.kind {
            k if k.in_engine() => {
                // The old group stops before the new one hands anything out: the new
                // coordinator's first batch is a round trip to the store, and the stops are
                // handled on this arbiter before it answers.
                self.engine_generation += 1;
                let fresh = (self.blueprint.engine)(self.issuer(self.engine_generation), true);
                let old = self.supervised.engine.replace(fresh);
                old.partitions.stop_all();
                old.coordinator.do_send(StopNow);
                old.publisher.do_send(StopNow);
                // Consumers commit through the cell, so they use the new coordinator from
                // their next delivery on.
                tracing::warn!(
                    generation = self.engine_generation,
                    "engine restarted: rows this instance held claimed are read again"
                );
            }
            ActorKind::Consumer => {
                let i = death.index;
                self.consumer_generations[i] += 1;
                let addr = (self.blueprint.consumer)(
                    i,
                    self.issuer(self.consumer_generations[i]),
                    self.supervised.engine.clone(),
                );
                self.supervised
                    .consumers
                    .write()
                    .unwrap_or_else(|p| p.into_inner())[i] = addr;
            }
            _ => {
                self.registry_generation += 1;
                let addr = (self.blueprint.registry)(self.issuer(self.registry_generation));
                *self
                    .supervised
                    .registry
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = addr;
            }
        }
    }
}

/// Test-only fault injection: a panic in the next handled message of one actor kind of one
/// instance (`fault-injection` feature; the integration tests turn it on).
#[cfg(feature = "fault-injection")]
pub mod fault {
    use super::ActorKind;
    use std::sync::Mutex;
    use uuid::Uuid;

    static ARMED: Mutex<Vec<(Uuid, ActorKind)>> = Mutex::new(Vec::new());

    /// The next message an actor of `kind` of instance `instance` handles panics.
    pub fn panic_next(instance: Uuid, kind: ActorKind) {
        ARMED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((instance, kind));
    }

    /// Panics if a panic is armed for this actor.
    pub(crate) fn check(instance: Uuid, kind: ActorKind) {
        let fire = {
            let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
            match armed.iter().position(|a| *a == (instance, kind)) {
                Some(i) => {
                    armed.remove(i);
                    true
                }
                None => false,
            }
        };
        if fire {
            panic!("injected panic in the {kind:?} actor (fault-injection)");
        }
    }

    /// Where [`hold_read_models`] holds a read model's run on an event.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum HoldAt {
        /// After the read model applied the event, before its transaction commits.
        BeforeCommit,
        /// After the transaction committed, before the inbox row is reported completed.
        AfterCommit,
    }

    static HOLDS: Mutex<Vec<(String, HoldAt)>> = Mutex::new(Vec::new());
    static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// From now on, every read model of this process that runs an event of `stream_id`
    /// (`crate::read_model`) hangs for ever at `at`: a test kills the process there.
    pub fn hold_read_models(stream_id: &str, at: HoldAt) {
        HOLDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stream_id.to_string(), at));
    }

    /// How many read-model runs hang where [`hold_read_models`] holds them.
    pub fn read_models_held() -> usize {
        HELD.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Called by a read model's run on an event of `stream_id` at `at`.
    pub(crate) async fn read_model_at(stream_id: &str, at: HoldAt) {
        let hold = HOLDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(s, a)| s == stream_id && *a == at);
        if hold {
            HELD.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            futures::future::pending::<()>().await;
        }
    }
}

/// Without the `fault-injection` feature nothing is ever armed.
#[cfg(not(feature = "fault-injection"))]
pub(crate) mod fault {
    use super::ActorKind;

    #[inline(always)]
    pub(crate) fn check(_instance: uuid::Uuid, _kind: ActorKind) {}

    /// Where a read model's run could be held (see the `fault-injection` feature).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum HoldAt {
        BeforeCommit,
        AfterCommit,
    }

    #[inline(always)]
    pub(crate) async fn read_model_at(_stream_id: &str, _at: HoldAt) {}
}
