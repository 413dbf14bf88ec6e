//! The coordinator actor: the one writer of work batches for this instance.
//!
//! Owns the flush strategy (immediate, scoped, interval), the queue of units waiting to be
//! committed, the reports (completions, failures, releases) waiting to be written, claims of
//! pending work, the heartbeat, and the hand-off of committed or claimed rows to partition
//! actors and the publisher. Units that arrive while a batch is in flight go into the next one
//! (group commit).
//!
//! Several batches may be in flight at once (`coordinator.max_batches_in_flight`, each on its
//! own pooled connection), but only batches that cannot race each other: their units touch
//! distinct streams (a unit whose stream is in flight waits, and so do the later units of that
//! stream, so a stream's units commit in the order they arrived), and they carry nothing but
//! units and completions. A batch that claims pending work, reports a failure or a release, or
//! recovers after a lost answer runs alone: it waits for the batches in flight, and none starts
//! beside it. So the rows a batch hands off are never overtaken by rows of the same stream from
//! another batch, which is what keeps each stream in order from the store to the handlers, and
//! the recovery after a lost answer still sees every row this instance has in flight.
//!
//! Completions do not ride with the units of the immediate and scoped strategies: a writer
//! waiting for its unit would pay for deleting the rows of earlier calls. They are written by
//! the flush timer (or with whatever batch goes then), at once when a full batch of them is
//! queued, when they may free room for a claim of rows still waiting, and on shutdown.
//!
//! It must not run user code and must never wait on a partition actor (they wait on it).

use crate::config::{Config, FlushStrategy};
use crate::error::DispatchError;
use crate::partition::{InboxJob, PartitionDirectory};
use crate::protocol::{AppliedSender, AwaitProcessed, Commit, CommitOutcome, PublishRows, Report};
use crate::retry::Backoff;
use crate::store::{
    ClaimBudget, Heartbeat, InFlight, InboxSettled, InboxWork, InstanceId, OutboxWork, Queue,
    Store, UnitOfWork, UnitOutcome, WorkBatch, WorkBatchResult, WorkRef,
};
use crate::supervision::{ActorKind, HealthState, Lifeline, StopNow, fault};
use actix::prelude::*;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use uuid::Uuid;

struct PendingUnit {
    unit: UnitOfWork,
    wait: bool,
    reply: oneshot::Sender<Result<CommitOutcome, DispatchError>>,
}

/// What is kept of a unit while its batch is in flight (the unit itself moves into the batch).
struct SentUnit {
    inbox_ids: Vec<Uuid>,
    outbox_rows: usize,
    wait: bool,
    reply: oneshot::Sender<Result<CommitOutcome, DispatchError>>,
}

/// Settings the coordinator needs.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub strategy: FlushStrategy,
    pub flush_interval: Duration,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub claim_budget: ClaimBudget,
    pub max_batch: usize,
    /// Batches written at once (see the module docs for which may overlap).
    pub max_in_flight: usize,
    /// Most rows per queue handed out and not reported back (`coordinator.max_rows_in_flight`).
    pub max_rows_in_flight: usize,
}

impl CoordinatorSettings {
    pub fn from_config(config: &Config) -> CoordinatorSettings {
        let c = &config.coordinator;
        CoordinatorSettings {
            strategy: c.flush_strategy,
            flush_interval: Duration::from_millis(c.flush_interval_ms),
            poll_interval: Duration::from_millis(c.poll_interval_ms),
            heartbeat_interval: Duration::from_secs(config.partitions.heartbeat_seconds),
            claim_budget: ClaimBudget {
                outbox: c.claim_batch_size,
                inbox: c.claim_batch_size,
            },
            max_batch: c.max_batch_size as usize,
            max_in_flight: c.max_batches_in_flight.min(config.store.pool_size).max(1) as usize,
            max_rows_in_flight: c.max_rows_in_flight as usize,
        }
    }
}

pub struct Coordinator {
    store: Arc<dyn Store>,
    instance: InstanceId,
    settings: CoordinatorSettings,
    pending: VecDeque<PendingUnit>,
    reports: WorkBatch,
    /// Waiters parked with released rows, handed back when the rows are claimed again.
    released_waiters: HashMap<Uuid, Vec<AppliedSender>>,
    /// Waiters of rows this instance could not claim (another instance holds the partition).
    remote_waiters: HashMap<Uuid, Vec<AppliedSender>>,
    /// Batches sent and not answered yet.
    in_flight: usize,
    /// The batch in flight runs alone (a claim, failure or release reports, a recovery).
    exclusive_in_flight: bool,
    /// Streams touched by the units of the batches in flight, with how many units each.
    busy_streams: HashMap<String, usize>,
    claim_wanted: bool,
    /// The flush timer fired since completions were last written: they go with the next batch.
    completions_due: bool,
    /// There may be rows this instance has not claimed yet: a committed unit left rows it could
    /// not lease (at its partition maximum, or another instance holds them), or the last claim
    /// found work (a backlog is drained claim after claim, not one claim per poll). Claim again
    /// as soon as completions may have freed room.
    unclaimed_rows: bool,
    /// Rows handed to partition actors or the publisher and not yet reported back.
    /// Per queue: an event published and applied locally has an outbox and an inbox row with
    /// one message id, and either may finish first.
    outbox_in_flight: HashSet<Uuid>,
    inbox_in_flight: HashSet<Uuid>,
    /// A batch failed without an answer: it may have committed claims nobody knows about.
    /// The next claim passes `in_flight` so the store can hand those rows out again.
    claims_in_doubt: bool,
    /// Set while batches fail: the delay before the next attempt.
    error_backoff: Option<Duration>,
    /// Rows (inbox, outbox) the batches in flight may hand out, counted against
    /// `max_rows_in_flight` until they answer.
    reserved_rows: (usize, usize),
    /// Consecutive failed batches, timing the retries (the runtime's one retry policy).
    store_failures: Backoff,
    partitions: PartitionDirectory,
    publisher: Recipient<PublishRows>,
    stopped: bool,
    health: HealthState,
    /// Tells the supervisor when this actor ends (see `supervision`).
    _lifeline: Lifeline,
    shutdown_reply: Option<oneshot::Sender<Result<(), DispatchError>>>,
    /// A heartbeat is running: the next beat is skipped rather than started beside it. Beats
    /// that overlap (a heartbeat slower than its interval, on a loaded server) queue on the
    /// instance's liveness lock, each holding a pooled connection, until no batch gets one.
    beating: bool,
    /// Instances of this service the last heartbeat saw alive (this one included), read by the
    /// consumers that balance shard queues over the instances.
    live_instances: Arc<AtomicU32>,
    /// The partitions held at the last heartbeat, ascending (`whizbang_leases_acquired_total`
    /// counts those a heartbeat holds beyond them).
    held_partitions: Vec<u32>,
}

/// What a coordinator is started with besides its store and settings.
pub(crate) struct CoordinatorLinks {
    pub partitions: PartitionDirectory,
    pub publisher: Recipient<PublishRows>,
    pub health: HealthState,
    pub lifeline: Lifeline,
    /// Started by the supervisor after an engine restart: the first batch re-reads the rows
    /// this instance holds claimed (they were handed to the engine that stopped).
    pub recovering: bool,
    /// The live-instance count the heartbeat keeps up to date (1 until the first heartbeat);
    /// shared with the consumers of sharded subscriptions, and kept across engine restarts.
    pub live_instances: Arc<AtomicU32>,
}

impl Coordinator {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        instance: InstanceId,
        settings: CoordinatorSettings,
        links: CoordinatorLinks,
    ) -> Self {
        Coordinator {
            store,
            instance,
            settings,
            pending: VecDeque::new(),
            reports: WorkBatch::default(),
            released_waiters: HashMap::new(),
            remote_waiters: HashMap::new(),
            in_flight: 0,
            exclusive_in_flight: false,
            busy_streams: HashMap::new(),
            unclaimed_rows: false,
            outbox_in_flight: HashSet::new(),
            inbox_in_flight: HashSet::new(),
            claims_in_doubt: links.recovering,
            error_backoff: None,
            reserved_rows: (0, 0),
            store_failures: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            // Claim once at start: work left by an earlier run of this service.
            claim_wanted: true,
            completions_due: false,
            partitions: links.partitions,
            publisher: links.publisher,
            stopped: false,
            shutdown_reply: None,
            beating: false,
            live_instances: links.live_instances,
            held_partitions: Vec::new(),
            health: links.health,
            _lifeline: links.lifeline,
        }
    }

    fn wants_flush(&self) -> bool {
        let draining = self.stopped && (!self.pending.is_empty() || self.reports.reports() > 0);
        draining
            || self.claim_wanted
            || (!self.pending.is_empty() && self.settings.strategy != FlushStrategy::Interval)
            // Interval: a full batch does not wait for the timer.
            || self.pending.len() >= self.settings.max_batch
            || self.reports.reports() >= self.settings.max_batch
            || (self.completions_due && self.completions_queued())
    }

    /// What a claim may take: the configured batch, cut to the room left under
    /// `coordinator.max_rows_in_flight` per queue. Rows beyond it stay in the store; the
    /// completions that free room set `unclaimed_rows`, and the claim comes again.
    fn claim_budget(&self) -> ClaimBudget {
        let (inbox_room, outbox_room) = self.rows_room();
        let full = self.settings.claim_budget;
        ClaimBudget {
            outbox: full.outbox.min(outbox_room.min(u32::MAX as usize) as u32),
            inbox: full.inbox.min(inbox_room.min(u32::MAX as usize) as u32),
        }
    }

    /// Rows per queue (inbox, outbox) that may still be handed out: the limit less the rows
    /// handed out and those the batches in flight may hand out.
    fn rows_room(&self) -> (usize, usize) {
        let max = self.settings.max_rows_in_flight;
        (
            max.saturating_sub(self.inbox_in_flight.len() + self.reserved_rows.0),
            max.saturating_sub(self.outbox_in_flight.len() + self.reserved_rows.1),
        )
    }

    fn completions_queued(&self) -> bool {
        self.reports.completions() > 0
    }

    /// Whether the queued completions go with the next batch (see the module docs): always
    /// with the interval strategy, whose batches all wait for the timer anyway.
    fn completions_go_now(&self) -> bool {
        self.settings.strategy == FlushStrategy::Interval
            || self.completions_due
            || self.stopped
            || self.claims_in_doubt
            // Rows wait to be claimed: completions free the room the next claim needs, and
            // a backlog is drained claim after claim, not one claim per timer tick.
            || self.unclaimed_rows
            || self.reports.reports() >= self.settings.max_batch
    }

    /// Starts batches while there is room and something to write; the completion of a batch
    /// calls this again.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        while self.flush_one(ctx) {}
    }

    /// Whether the next batch must run alone: it claims (and so must see every row this
    /// instance has in flight as in flight, and hand out nothing a concurrent batch could
    /// overtake), or carries failures or releases (the rows of their streams must not be
    /// handed out by a batch running beside it before the store has parked them).
    fn next_is_exclusive(&self) -> bool {
        let r = &self.reports;
        let completes = self.completions_queued() && self.completions_go_now();
        let claim = !self.stopped
            && (self.claim_wanted || self.claims_in_doubt || (self.unclaimed_rows && completes));
        claim
            || self.claims_in_doubt
            || !r.outbox_failures.is_empty()
            || !r.outbox_releases.is_empty()
            || !r.inbox_failures.is_empty()
            || !r.inbox_releases.is_empty()
    }

    /// The streams a unit writes to or checks.
    fn unit_streams(unit: &UnitOfWork) -> Vec<String> {
        // Deduplicated before they are copied: an event and its queue rows share a stream.
        let mut streams: Vec<&str> = unit
            .expectations
            .iter()
            .map(|(s, _)| s.as_str())
            .chain(unit.events.iter().map(|e| e.stream_id.as_str()))
            .chain(unit.outbox.iter().map(|r| r.envelope.stream_id.as_str()))
            .chain(unit.inbox.iter().map(|r| r.envelope.stream_id.as_str()))
            .collect();
        streams.sort_unstable();
        streams.dedup();
        streams.into_iter().map(str::to_string).collect()
    }

    /// Takes up to `take` pending units, in order, skipping those that touch a stream of a
    /// batch in flight (and every later unit of a skipped one's streams, so that no unit
    /// overtakes an earlier one of its stream).
    fn take_units(&mut self, take: usize) -> (Vec<PendingUnit>, Vec<String>) {
        let mut taken = Vec::new();
        let mut streams = Vec::new();
        if take == 0 {
            return (taken, streams);
        }
        if self.busy_streams.is_empty() {
            taken = (0..take).map_while(|_| self.pending.pop_front()).collect();
            for p in &taken {
                streams.extend(Self::unit_streams(&p.unit));
            }
            return (taken, streams);
        }
        let mut blocked: HashSet<String> = HashSet::new();
        let mut kept = VecDeque::with_capacity(self.pending.len());
        while let Some(p) = self.pending.pop_front() {
            if taken.len() >= take {
                kept.push_back(p);
                kept.extend(self.pending.drain(..));
                break;
            }
            let unit_streams = Self::unit_streams(&p.unit);
            if unit_streams
                .iter()
                .any(|s| self.busy_streams.contains_key(s) || blocked.contains(s))
            {
                blocked.extend(unit_streams);
                kept.push_back(p);
            } else {
                streams.extend(unit_streams);
                taken.push(p);
            }
        }
        self.pending = kept;
        (taken, streams)
    }

    /// Starts one batch if there is room and something to write; whether it did.
    fn flush_one(&mut self, ctx: &mut Context<Self>) -> bool {
        if self.exclusive_in_flight {
            return false;
        }
        if self.in_flight >= self.settings.max_in_flight {
            return false;
        }
        let exclusive = self.next_is_exclusive();
        if exclusive && self.in_flight > 0 {
            // Waits for the batches in flight; their completion calls `flush` again.
            return false;
        }
        if self.in_flight > 0 && !self.wants_flush() {
            // Beside a batch in flight only what is due now goes: with the interval strategy,
            // a full batch; completions otherwise wait for the next one.
            return false;
        }
        let take = match self.settings.strategy {
            FlushStrategy::Immediate => 1,
            _ => self.settings.max_batch,
        };
        // After a batch lost its answer, first a recovery batch with no new units: the rows it
        // may have claimed come back before anything newer of their streams is handed out.
        let take = if self.claims_in_doubt { 0 } else { take };
        let (pending, streams) = self.take_units(take);
        let completions_go = self.completions_go_now();
        let mut batch = std::mem::take(&mut self.reports);
        if completions_go {
            self.completions_due = false;
        } else {
            self.reports.outbox_completions = std::mem::take(&mut batch.outbox_completions);
            self.reports.inbox_completions = std::mem::take(&mut batch.inbox_completions);
        }
        let mut units = Vec::with_capacity(pending.len());
        // Rows a unit would hand out at once count against `max_rows_in_flight`: a unit that
        // does not fit (nor any after it) leaves its rows pending in the store, claimed later.
        let (mut inbox_room, mut outbox_room) = self.rows_room();
        let mut reserved = (0, 0);
        batch.units = pending
            .into_iter()
            .map(|mut p| {
                if p.unit.claim_for_writer {
                    let (i, o) = (p.unit.inbox.len(), p.unit.outbox.len());
                    if i <= inbox_room && o <= outbox_room {
                        inbox_room -= i;
                        outbox_room -= o;
                        reserved.0 += i;
                        reserved.1 += o;
                    } else {
                        p.unit.claim_for_writer = false;
                        (inbox_room, outbox_room) = (0, 0);
                    }
                }
                units.push(SentUnit {
                    inbox_ids: p.unit.inbox.iter().map(|r| r.envelope.message_id).collect(),
                    outbox_rows: p.unit.outbox.len(),
                    wait: p.wait,
                    reply: p.reply,
                });
                p.unit
            })
            .collect();
        let completes = batch.completions() > 0;
        if self.unclaimed_rows && completes {
            self.claim_wanted = true;
        }
        if self.claims_in_doubt {
            self.claim_wanted = true;
        }
        // The claim was cut to the room left: rows may wait in the store beyond it.
        let mut claim_cut = false;
        if self.claim_wanted && !self.stopped {
            let budget = self.claim_budget();
            let full = self.settings.claim_budget;
            claim_cut = budget.outbox < full.outbox || budget.inbox < full.inbox;
            batch.claim = Some(budget);
            if self.claims_in_doubt {
                batch.in_flight = Some(InFlight {
                    outbox: self.outbox_in_flight.iter().copied().collect(),
                    inbox: self.inbox_in_flight.iter().copied().collect(),
                });
            }
        }
        self.claim_wanted = false;
        if batch.is_empty() {
            return false;
        }
        self.in_flight += 1;
        self.exclusive_in_flight = exclusive;
        for stream in &streams {
            *self.busy_streams.entry(stream.clone()).or_default() += 1;
        }
        let store = self.store.clone();
        let instance = self.instance;
        // The reports are kept until the batch answers (written again if it fails); the units
        // are not cloned: a failed unit is answered with the error instead.
        let batch_units = std::mem::take(&mut batch.units);
        let reports = WorkBatch {
            claim: None,
            in_flight: None,
            ..batch.clone()
        };
        batch.units = batch_units;
        let claimed = batch.claim.is_some();
        if let Some(budget) = batch.claim {
            reserved.0 += budget.inbox as usize;
            reserved.1 += budget.outbox as usize;
        }
        self.reserved_rows.0 += reserved.0;
        self.reserved_rows.1 += reserved.1;
        let resolves_doubt = batch.in_flight.is_some();
        let (n_units, n_reports) = (batch.units.len(), batch.reports());
        let started = std::time::Instant::now();
        let meters = self.health.meters().clone();
        let span = crate::telemetry::traces::work_batch(
            n_units,
            n_reports,
            claimed,
            batch.units.iter().filter_map(|unit| {
                let first = unit.inbox.first().map(|r| &r.envelope);
                first
                    .or(unit.outbox.first().map(|r| &r.envelope))
                    .map(|e| &e.metadata)
            }),
        );
        let batch_span = span.clone();
        ctx.spawn(
            async move {
                let batch = store.process_work_batch(instance, batch);
                crate::telemetry::traces::within(&batch_span, batch).await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.in_flight -= 1;
                act.exclusive_in_flight = false;
                act.reserved_rows.0 -= reserved.0;
                act.reserved_rows.1 -= reserved.1;
                for stream in streams {
                    if let Entry::Occupied(mut e) = act.busy_streams.entry(stream) {
                        *e.get_mut() -= 1;
                        if *e.get() == 0 {
                            e.remove();
                        }
                    }
                }
                tracing::trace!(
                    units = n_units,
                    reports = n_reports,
                    claimed,
                    ok = result.is_ok(),
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "work batch"
                );
                let rows_claimed = result.as_ref().map_or(0, |r| {
                    r.claimed_inbox.len()
                        + r.claimed_outbox.len()
                        + r.units.iter().map(UnitOutcome::rows_claimed).sum::<usize>()
                });
                meters.work_batch(
                    result.is_ok(),
                    started.elapsed(),
                    (n_units, n_reports, rows_claimed),
                );
                match &result {
                    Ok(result) => {
                        span.record("whizbang.claimed_outbox", result.claimed_outbox.len());
                        span.record("whizbang.claimed_inbox", result.claimed_inbox.len());
                    }
                    Err(e) => {
                        let class = if e.is_retryable() {
                            "store_retryable"
                        } else {
                            "store"
                        };
                        span.record("error.type", class);
                    }
                }
                drop(span);
                match result {
                    Ok(result) => {
                        act.health.store_ok();
                        act.error_backoff = None;
                        act.store_failures.reset();
                        if resolves_doubt {
                            act.claims_in_doubt = false;
                        }
                        act.processed_rows_written(&reports.inbox_completions, &result.stale);
                        act.distribute(result, units, claimed, ctx);
                        act.health
                            .rows_in_flight(act.inbox_in_flight.len(), act.outbox_in_flight.len());
                        if claim_cut {
                            act.unclaimed_rows = true;
                        }
                    }
                    Err(e) => {
                        act.health.store_failed();
                        act.claims_in_doubt = true;
                        act.error_backoff = Some(act.store_failures.next_delay());
                        tracing::warn!(
                            error = %e,
                            failures = act.store_failures.failures(),
                            retry_in_ms = act.error_backoff.unwrap_or_default().as_millis() as u64,
                            "work batch failed; reports kept for the next batch"
                        );
                        act.restore_reports(reports);
                        let err = DispatchError::from(e);
                        for unit in units {
                            let _ = unit.reply.send(Err(err.clone()));
                        }
                        // The units queued behind it would wait for a store that is failing
                        // (the next batch is a recovery with no units): their writers are
                        // answered now, retryable, within one batch's deadline of the fault.
                        for pending in act.pending.drain(..) {
                            let _ = pending.reply.send(Err(err.clone()));
                        }
                    }
                }
                if act.error_backoff.is_some() {
                    // The store is failing: try again later, not in a tight loop.
                    let delay = act.error_backoff.unwrap_or_default();
                    ctx.run_later(delay, |act, ctx| act.flush(ctx));
                } else if act.wants_flush() {
                    act.flush(ctx);
                }
                act.finish_shutdown_when_drained(ctx);
            }),
        );
        true
    }

    /// After `Shutdown`: once nothing is queued or in flight (no batch, and no row still with a
    /// partition actor or the publisher), release every partition at once (so other instances
    /// take over without waiting for expiry) and answer.
    fn finish_shutdown_when_drained(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight > 0
            || !self.pending.is_empty()
            || self.reports.reports() > 0
            || !self.inbox_in_flight.is_empty()
            || !self.outbox_in_flight.is_empty()
        {
            return;
        }
        let Some(reply) = self.shutdown_reply.take() else {
            return;
        };
        let store = self.store.clone();
        let instance = self.instance;
        ctx.spawn(
            async move {
                let result = store
                    .release_partitions(instance, None)
                    .await
                    .map_err(DispatchError::from);
                let _ = reply.send(result);
            }
            .into_actor(self),
        );
    }

    fn restore_reports(&mut self, old: WorkBatch) {
        let r = &mut self.reports;
        r.outbox_completions.extend(old.outbox_completions);
        r.outbox_failures.extend(old.outbox_failures);
        r.outbox_releases.extend(old.outbox_releases);
        r.inbox_completions.extend(old.inbox_completions);
        r.inbox_failures.extend(old.inbox_failures);
        r.inbox_releases.extend(old.inbox_releases);
    }

    /// Hands committed and claimed rows on, in commit order, and answers the writers.
    fn distribute(
        &mut self,
        result: WorkBatchResult,
        units: Vec<SentUnit>,
        claimed: bool,
        ctx: &mut Context<Self>,
    ) {
        if let Some(delay) = result.next_retry_in {
            // A failed row is due then: claim it without waiting for the fallback poll.
            ctx.run_later(delay + Duration::from_millis(1), |act, ctx| {
                act.claim_wanted = true;
                act.flush(ctx);
            });
        }
        for (pending, outcome) in units.into_iter().zip(result.units) {
            match outcome {
                UnitOutcome::Committed {
                    appended,
                    claimed_outbox,
                    claimed_inbox,
                    duplicate_inbox,
                } => {
                    let mut applied = Vec::new();
                    if claimed_inbox.len() + duplicate_inbox.len() < pending.inbox_ids.len()
                        || claimed_outbox.len() < pending.outbox_rows
                    {
                        self.unclaimed_rows = true;
                    }
                    let mut claimed_ids = Vec::with_capacity(claimed_inbox.len());
                    for work in claimed_inbox {
                        claimed_ids.push(work.envelope.message_id);
                        let mut done = Vec::new();
                        if pending.wait {
                            let (tx, rx) = oneshot::channel();
                            done.push(tx);
                            applied.push(rx);
                        }
                        self.hand_inbox(work, done);
                    }
                    if pending.wait {
                        for &id in &pending.inbox_ids {
                            if !claimed_ids.contains(&id) && !duplicate_inbox.contains(&id) {
                                let (tx, rx) = oneshot::channel();
                                self.remote_waiters.entry(id).or_default().push(tx);
                                applied.push(rx);
                            }
                        }
                    }
                    self.hand_outbox(claimed_outbox);
                    let _ = pending.reply.send(Ok(CommitOutcome { appended, applied }));
                }
                UnitOutcome::KeyTaken { key } => {
                    // The dispatcher reads the record there and answers its outcome (or this
                    // error, if the key was recorded for another command).
                    let _ = pending
                        .reply
                        .send(Err(DispatchError::IdempotencyKeyReused { key }));
                }
                UnitOutcome::Conflict {
                    stream_id,
                    expected,
                    actual,
                } => {
                    let _ = pending.reply.send(Err(DispatchError::VersionConflict {
                        stream_id,
                        expected,
                        actual,
                    }));
                }
            }
        }
        if claimed {
            // Work found: there may be more behind it. Nothing found: nothing left to catch up
            // on (or nothing this instance can take yet).
            self.unclaimed_rows =
                !result.claimed_inbox.is_empty() || !result.claimed_outbox.is_empty();
        }
        self.hand_outbox(result.claimed_outbox);
        for work in result.claimed_inbox {
            let id = work.envelope.message_id;
            let mut done = self.released_waiters.remove(&id).unwrap_or_default();
            done.extend(self.remote_waiters.remove(&id).unwrap_or_default());
            self.hand_inbox(work, done);
        }
        self.health
            .meters()
            .dead_lettered(result.dead_lettered.len());
        for id in &result.dead_lettered {
            tracing::warn!(message_id = %id, "message dead-lettered after max attempts; its stream is parked");
            let waiters = self.released_waiters.remove(id).into_iter().flatten();
            for tx in waiters.chain(self.remote_waiters.remove(id).into_iter().flatten()) {
                let _ = tx.send(Err(dead_lettered(*id, "")));
            }
        }
        if !result.stale.is_empty() {
            tracing::debug!(
                count = result.stale.len(),
                "reports refused: lease lost (fencing)"
            );
        }
    }

    /// Inbox rows whose completion a batch just wrote: whoever waits for them as rows of
    /// another dispatch ([`AwaitProcessed`]) is answered now rather than at the next poll.
    fn processed_rows_written(&mut self, completed: &[WorkRef], stale: &[Uuid]) {
        if self.remote_waiters.is_empty() {
            return;
        }
        for w in completed {
            if stale.contains(&w.message_id) {
                continue;
            }
            for tx in self
                .remote_waiters
                .remove(&w.message_id)
                .into_iter()
                .flatten()
            {
                let _ = tx.send(Ok(()));
            }
        }
    }

    fn hand_inbox(&mut self, work: InboxWork, done: Vec<AppliedSender>) {
        // A row of this partition failed after the batch that claimed `work` was sent (its
        // report is still queued): `work` may be a later row of the failed row's stream, claimed
        // while that row was in flight, and arriving after the partition actor parked the
        // stream. Hand it back so that it cannot overtake the retry.
        let partition = work.work.partition;
        if self
            .reports
            .inbox_failures
            .iter()
            .any(|f| f.work.partition == partition)
        {
            self.reports.inbox_releases.push(work.work);
            if !done.is_empty() {
                self.released_waiters
                    .entry(work.envelope.message_id)
                    .or_default()
                    .extend(done);
            }
            return;
        }
        self.inbox_in_flight.insert(work.envelope.message_id);
        self.partitions.enqueue(
            work.work.partition,
            crate::partition::Job::Inbox(InboxJob { work, done }),
        );
    }

    fn hand_outbox(&mut self, rows: Vec<OutboxWork>) {
        // As in `hand_inbox`: rows of a partition whose publish failed after this batch was sent
        // go back, so that none overtakes the failed row of its stream.
        let (rows, back): (Vec<OutboxWork>, Vec<OutboxWork>) = rows.into_iter().partition(|r| {
            !self
                .reports
                .outbox_failures
                .iter()
                .any(|f| f.work.partition == r.work.partition)
        });
        self.reports
            .outbox_releases
            .extend(back.into_iter().map(|r| r.work));
        if rows.is_empty() {
            return;
        }
        self.outbox_in_flight
            .extend(rows.iter().map(|r| r.envelope.message_id));
        // do_send: the publisher must not make the coordinator wait (see the module docs); if
        // it stopped, the supervisor restarts the engine and the rows are read again.
        self.publisher.do_send(PublishRows(rows));
    }

    fn arm_work_signal(&self, ctx: &mut Context<Self>, mut rx: tokio::sync::watch::Receiver<u64>) {
        ctx.spawn(
            async move {
                let changed = rx.changed().await.is_ok();
                (changed, rx)
            }
            .into_actor(self)
            .map(|(changed, rx), act, ctx| {
                if changed && !act.stopped {
                    act.claim_wanted = true;
                    act.flush(ctx);
                    act.arm_work_signal(ctx, rx);
                }
            }),
        );
    }

    /// Records a heartbeat's leases and, when they are served, reads the backlog gauges (one
    /// cheap query per heartbeat, never one per message).
    fn heartbeat_seen(&mut self, hb: &Heartbeat, ctx: &mut Context<Self>) {
        let mut held = hb.held_partitions.clone();
        held.sort_unstable();
        // Leased since the last heartbeat (by a claim): held now, or held until this heartbeat
        // released them.
        let acquired = held
            .iter()
            .chain(&hb.released)
            .filter(|p| self.held_partitions.binary_search(p).is_err())
            .count();
        let meters = self.health.meters().clone();
        meters.leases(held.len(), acquired, hb.released.len(), hb.taken_over.len());
        self.held_partitions = held;
        if meters.wants_backlog() {
            let store = self.store.clone();
            ctx.spawn(
                async move {
                    match store.backlog().await {
                        Ok(backlog) => meters.backlog(&backlog),
                        Err(e) => tracing::debug!(error = %e, "backlog read failed"),
                    }
                }
                .into_actor(self),
            );
        }
    }

    fn check_remote_waiters(&mut self, ctx: &mut Context<Self>) {
        if self.remote_waiters.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = self.remote_waiters.keys().copied().collect();
        let store = self.store.clone();
        ctx.spawn(
            async move { store.inbox_settled(&ids).await }
                .into_actor(self)
                .map(|result, act, _ctx| {
                    for (id, settled) in result.unwrap_or_default() {
                        let answer = match settled {
                            InboxSettled::Processed => Ok(()),
                            InboxSettled::DeadLettered { last_error } => {
                                Err(dead_lettered(id, &last_error))
                            }
                        };
                        for tx in act.remote_waiters.remove(&id).into_iter().flatten() {
                            let _ = tx.send(answer.clone());
                        }
                    }
                }),
        );
    }
}

/// The answer to whoever waits for an inbox row that was dead-lettered: a perspective failure
/// with the last recorded error, when the store has it.
fn dead_lettered(message_id: Uuid, last_error: &str) -> DispatchError {
    let error = if last_error.is_empty() {
        "dead-lettered".to_string()
    } else {
        format!("dead-lettered after its last attempt failed: {last_error}")
    };
    DispatchError::PerspectiveFailed { message_id, error }
}

impl Actor for Coordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
        let s = self.settings.clone();
        ctx.run_interval(s.flush_interval, |act, ctx| {
            if !act.pending.is_empty() || act.reports.reports() > 0 {
                act.completions_due = act.completions_queued();
                act.flush(ctx);
            }
        });
        ctx.run_interval(s.poll_interval, |act, ctx| {
            act.claim_wanted = true;
            act.flush(ctx);
            act.check_remote_waiters(ctx);
        });
        ctx.run_interval(s.heartbeat_interval, |act, ctx| {
            if act.beating {
                return;
            }
            act.beating = true;
            let store = act.store.clone();
            let instance = act.instance;
            ctx.spawn(
                async move { store.heartbeat(instance).await }
                    .into_actor(act)
                    .map(|result, act, ctx| {
                        act.beating = false;
                        act.heartbeat_done(result, ctx)
                    }),
            );
        });
        self.arm_work_signal(ctx, self.store.work_signal());
        self.flush(ctx);
    }
}

impl Coordinator {
    /// Takes in what a heartbeat answered.
    fn heartbeat_done(
        &mut self,
        result: Result<Heartbeat, crate::store::StoreError>,
        ctx: &mut Context<Self>,
    ) {
        match result {
            Ok(hb) => {
                self.heartbeat_seen(&hb, ctx);
                self.health.heartbeat_ok();
                self.live_instances
                    .store(hb.live_instances.max(1), Ordering::Relaxed);
                if !hb.released.is_empty() {
                    tracing::debug!(
                        released = hb.released.len(),
                        held = hb.held_partitions.len(),
                        live = hb.live_instances,
                        "heartbeat released partitions"
                    );
                }
            }
            Err(e) => {
                self.health.store_failed();
                tracing::warn!(error = %e, "heartbeat failed")
            }
        }
    }
}

impl Handler<StopNow> for Coordinator {
    type Result = ();

    fn handle(&mut self, _msg: StopNow, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Commit> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: Commit, ctx: &mut Self::Context) {
        fault::check(self.instance, ActorKind::Coordinator);
        if self.stopped {
            let _ = msg
                .reply
                .send(Err(DispatchError::Unavailable("runtime stopped".into())));
            return;
        }
        if self.error_backoff.is_some() {
            // The last batch failed and no batch has succeeded since: the store is failing.
            // Refused at once (retryable, nothing written) rather than held until it recovers.
            let _ = msg.reply.send(Err(DispatchError::Unavailable(
                "the store is failing (the last work batch failed); nothing was written, retry"
                    .into(),
            )));
            return;
        }
        self.pending.push_back(PendingUnit {
            unit: msg.unit,
            wait: msg.wait,
            reply: msg.reply,
        });
        if self.wants_flush() {
            self.flush(ctx);
        }
    }
}

impl Handler<AwaitProcessed> for Coordinator {
    type Result = MessageResult<AwaitProcessed>;

    fn handle(&mut self, msg: AwaitProcessed, ctx: &mut Self::Context) -> Self::Result {
        let mut receivers = Vec::with_capacity(msg.0.len());
        for id in msg.0 {
            let (tx, rx) = oneshot::channel();
            self.remote_waiters.entry(id).or_default().push(tx);
            receivers.push(rx);
        }
        self.check_remote_waiters(ctx);
        MessageResult(receivers)
    }
}

impl Handler<Report> for Coordinator {
    type Result = ();

    fn handle(&mut self, msg: Report, ctx: &mut Self::Context) {
        fault::check(self.instance, ActorKind::Coordinator);
        match &msg {
            Report::OutboxDone(done) => {
                for w in done {
                    self.outbox_in_flight.remove(&w.message_id);
                }
            }
            Report::OutboxReleased(w) => _ = self.outbox_in_flight.remove(&w.message_id),
            Report::OutboxFailed(f) => {
                self.health.meters().retry(Queue::Outbox, f.kind);
                self.outbox_in_flight.remove(&f.work.message_id);
            }
            Report::InboxDone(w) | Report::InboxReleased(w, _) | Report::InboxCommitted(w) => {
                _ = self.inbox_in_flight.remove(&w.message_id)
            }
            Report::InboxFailed(f) => {
                self.health.meters().retry(Queue::Inbox, f.kind);
                self.inbox_in_flight.remove(&f.work.message_id);
            }
        }
        let r = &mut self.reports;
        match msg {
            Report::OutboxDone(done) => r.outbox_completions.extend(done),
            Report::OutboxFailed(f) => r.outbox_failures.push(f),
            Report::OutboxReleased(w) => r.outbox_releases.push(w),
            Report::InboxDone(w) => r.inbox_completions.push(w),
            Report::InboxFailed(f) => r.inbox_failures.push(f),
            Report::InboxCommitted(w) => {
                // Its completion is committed already: whoever waits for it as a row of
                // another dispatch is answered now rather than at the next poll.
                for tx in self
                    .remote_waiters
                    .remove(&w.message_id)
                    .into_iter()
                    .flatten()
                {
                    let _ = tx.send(Ok(()));
                }
            }
            Report::InboxReleased(w, waiters) => {
                r.inbox_releases.push(w);
                if !waiters.is_empty() {
                    self.released_waiters
                        .entry(w.message_id)
                        .or_default()
                        .extend(waiters);
                }
            }
        }
        if self.wants_flush() {
            self.flush(ctx);
        }
        self.health
            .rows_in_flight(self.inbox_in_flight.len(), self.outbox_in_flight.len());
        // A report that wrote nothing (a command completed with its own unit) may be the last
        // row a shutdown waits for.
        self.finish_shutdown_when_drained(ctx);
    }
}

/// Rows handed out and not reported back yet, per queue (what a shutdown past its deadline
/// leaves to the next holder).
pub struct RowsInFlight;

impl Message for RowsInFlight {
    type Result = (usize, usize);
}

impl Handler<RowsInFlight> for Coordinator {
    type Result = MessageResult<RowsInFlight>;

    fn handle(&mut self, _msg: RowsInFlight, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult((self.inbox_in_flight.len(), self.outbox_in_flight.len()))
    }
}

/// Writes everything still queued, waits for the rows handed to partition actors and the
/// publisher to be reported and writes their completions, then gives up this instance's
/// partitions. Answered when done; the coordinator accepts no new units afterwards.
pub struct Shutdown;

impl Message for Shutdown {
    type Result = Result<(), DispatchError>;
}

impl Handler<Shutdown> for Coordinator {
    type Result = ResponseFuture<Result<(), DispatchError>>;

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) -> Self::Result {
        self.stopped = true;
        let (tx, rx) = oneshot::channel();
        self.shutdown_reply = Some(tx);
        self.flush(ctx);
        self.finish_shutdown_when_drained(ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(DispatchError::Unavailable("coordinator stopped".into())))
        })
    }
}
