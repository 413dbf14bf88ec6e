//! Partition actors: one per active stream partition, each running its jobs strictly one after
//! another.
//!
//! Owns per-partition ordering. A job is either a command from the dispatcher (receptor →
//! commit) or an inbox row (an event → its perspectives, or a command from the inbox → its
//! receptor). The actor never lets two jobs overlap: actix would start the next message while
//! an async handler awaits, so the handler only queues, and a pump runs one job at a time. A
//! command from the dispatcher counts as done once its unit is queued at the coordinator (which
//! commits units in the order they arrive); its commit is awaited beside the next jobs, but the
//! next command of the same stream waits for it. When
//! an inbox row fails, the later queued rows of the same stream are handed back (the stream is
//! parked until the retry). It must not write to the store itself: it reports to the
//! coordinator.

use crate::apply_group::{GroupApply, Run};
use crate::envelope::{Envelope, MessageKind};
use crate::error::DispatchError;
use crate::handler::EventMeta;
use crate::handler::HandlerFailure;
use crate::idempotency::{Keyed, Outcome};
use crate::protocol::{
    AppliedReceiver, AppliedSender, AwaitProcessed, CommitAnswer, CommitOutcome, CoordinatorLink,
    Report, commit,
};
use crate::read_model::{AppliedOnce, InlineRun};
use crate::registry::RegistryView;
use crate::registry::{PerspectiveRun, RegistryTable};
use crate::routing::{Origin, plan_unit};
use crate::store::{
    AppendedEvent, Failure, FailureKind, InboxWork, InlineOutcome, Store, UnitOfWork, UnitOutcome,
    WorkRef,
};
use crate::supervision::{ActorKind, Lifeline, LifelineIssuer, StopNow, fault};
use crate::telemetry::traces;
use crate::workers::Placement;
use actix::prelude::*;
use foldhash::{HashMap, HashMapExt};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Span;
use uuid::Uuid;

/// What a handled command gives back.
pub struct CommandOutcome {
    pub result: Box<dyn Any + Send>,
    pub appended: Vec<AppendedEvent>,
    pub applied: Vec<AppliedReceiver>,
}

/// A command from the dispatcher.
pub struct CommandJob {
    pub envelope: Envelope,
    pub typed: Option<Box<dyn Any + Send>>,
    /// Wait for the perspectives of the resulting events (local_invoke).
    pub wait: bool,
    /// The idempotency key it was dispatched with: its outcome is recorded in its unit.
    pub keyed: Option<Keyed>,
    /// The caller's deadline: a command still queued past it is answered `Timeout` without
    /// running its receptor (its caller has given up; under overload, running it would only
    /// delay the commands whose callers still wait).
    pub give_up_at: Instant,
    /// The deadline that `give_up_at` ends (for the error's text).
    pub deadline: Duration,
    pub reply: oneshot::Sender<Result<CommandOutcome, DispatchError>>,
    /// The dispatch span: the receptor span's parent.
    pub span: Span,
}

/// A command of a request scope: the receptor decides and the unit is planned, but nothing is
/// committed; the unit goes back to the scope, which commits all of its units at once.
pub struct ScopedJob {
    pub envelope: Envelope,
    pub typed: Option<Box<dyn Any + Send>>,
    pub reply: oneshot::Sender<Result<Decided, DispatchError>>,
}

/// A scoped command's decision: the receptor's result and the unit planned from it.
pub struct Decided {
    pub result: Box<dyn Any + Send>,
    pub unit: UnitOfWork,
}

/// An inbox row, with whoever waits for it to be processed.
pub struct InboxJob {
    pub work: InboxWork,
    pub done: Vec<AppliedSender>,
}

pub enum Job {
    Command(CommandJob),
    Scoped(ScopedJob),
    Inbox(InboxJob),
}

impl Job {
    fn inbox_stream(&self) -> Option<&str> {
        match self {
            Job::Inbox(j) => Some(&j.work.envelope.stream_id),
            Job::Command(_) | Job::Scoped(_) => None,
        }
    }

    /// The stream of a command from the dispatcher (scoped or not).
    fn command_stream(&self) -> Option<&str> {
        match self {
            Job::Command(j) => Some(&j.envelope.stream_id),
            Job::Scoped(j) => Some(&j.envelope.stream_id),
            Job::Inbox(_) => None,
        }
    }
}

struct Enqueue(Job);

impl Message for Enqueue {
    type Result = ();
}

/// What every partition actor shares.
#[derive(Clone)]
pub(crate) struct PartitionDeps {
    /// Inline read models run their transactions on it (`Store::commit_inline`); everything
    /// else goes through the coordinator (and `group`).
    pub store: Arc<dyn Store>,
    pub origin: Origin,
    pub registry: RegistryView,
    pub coordinator: CoordinatorLink,
    /// Lifelines of the engine generation these actors belong to.
    pub lifelines: LifelineIssuer,
    /// The worker arbiter of each partition.
    pub placement: Placement,
    /// An actor with nothing to do for this long stops (`partitions.idle_actor_seconds`);
    /// `None`: never.
    pub idle_after: Option<Duration>,
    /// Where an inbox event's read models run: in transactions shared with other partitions'.
    pub group: Arc<GroupApply>,
}

/// A live partition actor as the directory knows it.
struct Slot {
    addr: Addr<PartitionActor>,
    /// Jobs sent to it: an idle actor stops only once it has received every one.
    sent: u64,
}

type Slots = Arc<Mutex<HashMap<u32, Slot>>>;

/// The live partition actors of this instance, started on first use.
#[derive(Clone)]
pub struct PartitionDirectory {
    // Shared, not copied: every job of every partition uses them.
    deps: Arc<PartitionDeps>,
    actors: Slots,
}

impl PartitionDirectory {
    pub fn new(deps: PartitionDeps) -> PartitionDirectory {
        PartitionDirectory {
            deps: Arc::new(deps),
            actors: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// How many partition actors are running.
    pub fn running(&self) -> usize {
        self.actors.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops every partition actor now (an engine restart): the jobs they hold are dropped,
    /// their callers answered `Unavailable`, and their rows read again by the next engine.
    pub fn stop_all(&self) {
        let actors = std::mem::take(&mut *self.actors.lock().unwrap_or_else(|p| p.into_inner()));
        for slot in actors.into_values() {
            slot.addr.do_send(StopNow);
        }
    }

    /// Queues a job on its partition's actor, starting it on its worker if it is not running.
    /// Queuing never waits and never drops: an actor stops only when idle and after it received
    /// every job sent to it (see `PartitionActor::retire_if_idle`), and its handler only
    /// appends to a queue.
    pub fn enqueue(&self, partition: u32, job: Job) {
        // Sent under the lock (sending never waits): an address clone costs two allocations.
        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        let slot = actors.entry(partition).or_insert_with(|| {
            let deps = self.deps.clone();
            let slots = self.actors.clone();
            let lifeline = deps.lifelines.issue(ActorKind::Partition, 0);
            let worker = deps.placement.partition(partition).clone();
            let addr = PartitionActor::start_in_arbiter(&worker, move |_| PartitionActor {
                partition,
                lifeline,
                deps,
                slots,
                received: 0,
                unacknowledged_failures: HashMap::new(),
                last_active: Instant::now(),
                queue: VecDeque::new(),
                busy: false,
                partial: HashMap::new(),
                committing: HashMap::new(),
            });
            Slot { addr, sent: 0 }
        });
        slot.sent += 1;
        slot.addr.do_send(Enqueue(job));
    }
}

pub struct PartitionActor {
    partition: u32,
    /// Tells the supervisor when this actor ends (see `supervision`); disarmed when it stops
    /// because it was idle.
    lifeline: Lifeline,
    /// The directory's slots, to leave them when idle.
    slots: Slots,
    /// Jobs received (compared with the slot's `sent` before stopping).
    received: u64,
    /// Streams whose row (the id) failed here and whose failure the coordinator has not
    /// acknowledged yet.
    unacknowledged_failures: HashMap<String, Uuid>,
    /// When it last received or finished a job.
    last_active: Instant,
    deps: Arc<PartitionDeps>,
    queue: VecDeque<Job>,
    busy: bool,
    /// Perspectives that already applied a row whose other perspectives failed: skipped on the
    /// retry so each perspective applies each event once.
    partial: HashMap<Uuid, Vec<String>>,
    /// Streams with a command whose unit is queued for commit. The next command of another
    /// stream runs at once (its unit joins the same batch); the next command of the same stream
    /// waits for the commit, so it runs after its predecessor's effects are stored.
    committing: HashMap<String, usize>,
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(idle) = self.deps.idle_after {
            ctx.run_interval(idle / 2, move |act, ctx| act.retire_if_idle(idle, ctx));
        }
    }
}

impl Handler<Enqueue> for PartitionActor {
    type Result = ();

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) {
        fault::check(self.deps.origin.instance, ActorKind::Partition);
        self.received += 1;
        self.last_active = Instant::now();
        self.queue.push_back(msg.0);
        self.pump(ctx);
    }
}

/// Runs the next job (after one was handed back without running).
struct Pump;

impl Message for Pump {
    type Result = ();
}

impl Handler<Pump> for PartitionActor {
    type Result = ();

    fn handle(&mut self, _msg: Pump, ctx: &mut Self::Context) {
        self.pump(ctx);
    }
}

impl Handler<StopNow> for PartitionActor {
    type Result = ();

    fn handle(&mut self, _msg: StopNow, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

enum InboxResult {
    Done,
    /// Its completion is committed already: a command from the inbox's with its unit, an
    /// event's with its only perspective, a read model (see `apply_group`).
    CommittedWithUnit,
    Failed(FailureKind, String, Vec<String>),
}

impl PartitionActor {
    /// Stops this actor if it has had nothing to do for `idle` and holds nothing: no job, no
    /// commit awaited, no partly applied row. Decided under the directory's lock, and only once
    /// every job sent to it has arrived, so no job can be sent to a stopped actor; the next job
    /// of the partition starts a new one.
    fn retire_if_idle(&mut self, idle: Duration, ctx: &mut Context<Self>) {
        if self.busy
            || !self.queue.is_empty()
            || !self.committing.is_empty()
            || !self.partial.is_empty()
            || !self.unacknowledged_failures.is_empty()
            || self.last_active.elapsed() < idle
        {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let me = ctx.address();
        match slots.get(&self.partition) {
            Some(slot) if slot.addr == me && slot.sent == self.received => {
                slots.remove(&self.partition);
            }
            // A job is on its way (it resets `last_active`), or the directory was replaced.
            _ => return,
        }
        drop(slots);
        self.lifeline.disarm();
        ctx.stop();
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        self.last_active = Instant::now();
        if self.busy {
            return;
        }
        if let Some(stream) = self.queue.front().and_then(Job::command_stream)
            && self.committing.contains_key(stream)
        {
            // Its stream's previous command is still committing: wait for it (the commit's
            // completion pumps again).
            return;
        }
        let Some(job) = self.queue.pop_front() else {
            return;
        };
        self.busy = true;
        let deps = self.deps.clone();
        match job {
            Job::Command(job) => {
                // The receptor runs and its unit is queued at the coordinator in the busy part;
                // the commit itself is awaited outside it, so the next command of another stream
                // does not wait a whole flush for it.
                ctx.spawn(
                    async move {
                        let CommandJob {
                            envelope,
                            typed,
                            wait,
                            keyed,
                            give_up_at,
                            deadline,
                            reply,
                            span,
                        } = job;
                        let stream = envelope.stream_id.clone();
                        let queued = if Instant::now() > give_up_at {
                            Err(DispatchError::Timeout {
                                message_type: envelope.message_type,
                                deadline_ms: deadline.as_millis() as u64,
                            })
                        } else {
                            queue_command(&deps, envelope, typed, None, wait, keyed, &span).await
                        };
                        (stream, queued, reply)
                    }
                    .into_actor(self)
                    .map(|(stream, queued, reply), act, ctx| {
                        act.busy = false;
                        match queued {
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                            Ok(queued) => {
                                *act.committing.entry(stream.clone()).or_default() += 1;
                                ctx.spawn(queued.committed().into_actor(act).map(
                                    move |outcome, act, ctx| {
                                        if let Some(n) = act.committing.get_mut(&stream) {
                                            *n -= 1;
                                            if *n == 0 {
                                                act.committing.remove(&stream);
                                            }
                                        }
                                        act.pump(ctx);
                                        // The caller hears once, when the perspectives of the
                                        // events have run (they run here, in this actor's
                                        // queue): one wake-up of its thread, not one for the
                                        // commit and another for the perspectives.
                                        ctx.spawn(
                                            async move {
                                                let _ = reply.send(applied(outcome).await);
                                            }
                                            .into_actor(act),
                                        );
                                    },
                                ));
                            }
                        }
                        act.pump(ctx);
                    }),
                );
            }
            Job::Scoped(job) => {
                ctx.spawn(
                    async move {
                        let decided = decide(&deps, job.envelope, job.typed).await;
                        let _ = job.reply.send(decided);
                    }
                    .into_actor(self)
                    .map(|_, act, ctx| {
                        act.busy = false;
                        act.pump(ctx);
                    }),
                );
            }
            Job::Inbox(job) => {
                if let Some(failed) = self
                    .unacknowledged_failures
                    .get(&job.work.envelope.stream_id)
                    && *failed != job.work.envelope.message_id
                {
                    // A later row of a stream whose row failed, handed out by the coordinator
                    // before it had the failure: back it goes, behind the retry.
                    self.busy = false;
                    self.deps
                        .coordinator
                        .reports
                        .do_send(Report::InboxReleased(job.work.work, job.done));
                    ctx.notify(Pump);
                    return;
                }
                let skip = self
                    .partial
                    .remove(&job.work.envelope.message_id)
                    .unwrap_or_default();
                ctx.spawn(
                    async move {
                        let result = process_inbox(&deps, &job.work, skip).await;
                        (job, result)
                    }
                    .into_actor(self)
                    .map(|(job, result), act, ctx| {
                        act.finish_inbox(job, result, ctx);
                        act.busy = false;
                        act.pump(ctx);
                    }),
                );
            }
        }
    }

    fn finish_inbox(&mut self, job: InboxJob, result: InboxResult, ctx: &mut Context<Self>) {
        let coordinator = &self.deps.coordinator.reports;
        let id = job.work.envelope.message_id;
        match result {
            InboxResult::Done => {
                coordinator.do_send(Report::InboxDone(job.work.work));
                for tx in job.done {
                    let _ = tx.send(Ok(()));
                }
            }
            InboxResult::CommittedWithUnit => {
                coordinator.do_send(Report::InboxCommitted(job.work.work));
                for tx in job.done {
                    let _ = tx.send(Ok(()));
                }
            }
            InboxResult::Failed(kind, error, applied) => {
                tracing::warn!(
                    partition = self.partition,
                    message_id = %id,
                    message_type = %job.work.envelope.message_type,
                    attempts = job.work.attempts + 1,
                    %error,
                    "inbox message failed; its stream waits for the retry"
                );
                if !applied.is_empty() {
                    self.partial.insert(id, applied);
                }
                // Until the coordinator has the failure, it may still hand out later rows of
                // this stream (the partition actor runs on a thread of its own): those are
                // handed back, and the failed row alone may come next.
                let stream = job.work.envelope.stream_id.clone();
                self.unacknowledged_failures.insert(stream.clone(), id);
                let report = coordinator.send(Report::InboxFailed(Failure {
                    work: job.work.work,
                    kind,
                    error: error.clone(),
                }));
                ctx.spawn(report.into_actor(self).map(move |_, act, _| {
                    if act.unacknowledged_failures.get(&stream) == Some(&id) {
                        act.unacknowledged_failures.remove(&stream);
                    }
                }));
                for tx in job.done {
                    let _ = tx.send(Err(DispatchError::PerspectiveFailed {
                        message_id: id,
                        error: error.clone(),
                    }));
                }
                self.park_stream(&job.work.envelope.stream_id);
            }
        }
    }

    /// Hands back the queued rows of a stream whose earlier row failed.
    fn park_stream(&mut self, stream_id: &str) {
        let (parked, kept): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|j| j.inbox_stream() == Some(stream_id));
        self.queue = kept;
        for job in parked {
            if let Job::Inbox(job) = job {
                self.deps
                    .coordinator
                    .reports
                    .do_send(Report::InboxReleased(job.work.work, job.done));
            }
        }
    }
}

/// `outcome` once the perspectives of its events have run: its receivers all resolved (none
/// left to wait for), or the first perspective failure.
async fn applied(
    outcome: Result<CommandOutcome, DispatchError>,
) -> Result<CommandOutcome, DispatchError> {
    let mut outcome = outcome?;
    for applied in std::mem::take(&mut outcome.applied) {
        applied
            .await
            .map_err(|_| DispatchError::Unavailable("partition actor stopped".into()))??;
    }
    Ok(outcome)
}

/// A command whose receptor has run and whose unit is queued at the coordinator.
struct QueuedCommand {
    result: Box<dyn Any + Send>,
    commit: PendingCommit,
    /// The receptor refused a keyed command: the unit records the refusal only, and the
    /// refusal is the answer once it is committed.
    refused: Option<DispatchError>,
}

impl QueuedCommand {
    /// Waits for the unit's commit.
    async fn committed(self) -> Result<CommandOutcome, DispatchError> {
        let committed = match self.commit {
            PendingCommit::Queued(answer) => answer.await,
            PendingCommit::Inline(run) => run.await,
        };
        if let Some(refusal) = self.refused {
            return match committed {
                // The key was recorded by another dispatch: the dispatcher answers that one.
                Err(e @ DispatchError::IdempotencyKeyReused { .. }) => Err(e),
                // Recorded, or not (a retry then runs the command again): the refusal stands.
                _ => Err(refusal),
            };
        }
        let CommitOutcome {
            appended, applied, ..
        } = committed?;
        Ok(CommandOutcome {
            result: self.result,
            appended,
            applied,
        })
    }
}

/// How a command's unit gets committed.
enum PendingCommit {
    /// Queued at the coordinator, in its group commit.
    Queued(CommitAnswer),
    /// In a store transaction of its own, with its inline read models (run when awaited).
    Inline(BoxFuture<'static, Result<CommitOutcome, DispatchError>>),
}

/// The inline read models of the unit's events, if any. An event whose perspectives are all
/// inline loses its inbox row: they apply it with the command.
fn inline_run(table: &RegistryTable, unit: &mut UnitOfWork) -> Option<InlineRun> {
    let events: Vec<_> = unit
        .events
        .iter()
        .filter_map(|e| {
            let models: Vec<_> = table
                .perspectives(&e.message_type)
                .iter()
                .filter_map(|p| match &p.run {
                    PerspectiveRun::Once { handle, .. } if p.inline() => {
                        Some((p.name.clone(), handle.clone()))
                    }
                    _ => None,
                })
                .collect();
            (!models.is_empty()).then(|| (e.clone(), models))
        })
        .collect();
    if events.is_empty() {
        return None;
    }
    unit.inbox.retain(|row| {
        row.envelope.kind != MessageKind::Event
            || !table
                .perspectives(&row.envelope.message_type)
                .iter()
                .all(|p| p.inline())
    });
    Some(InlineRun {
        events,
        failure: Default::default(),
    })
}

/// Commits a unit with its inline read models in one store transaction (not in the
/// coordinator's group commit, so a read model's failure rolls back this command alone).
fn commit_inline(
    deps: &PartitionDeps,
    unit: UnitOfWork,
    run: InlineRun,
    wait: bool,
) -> BoxFuture<'static, Result<CommitOutcome, DispatchError>> {
    let (store, coordinator, instance) = (
        deps.store.clone(),
        deps.coordinator.clone(),
        deps.origin.instance,
    );
    async move {
        let inbox: Vec<Uuid> = unit.inbox.iter().map(|r| r.envelope.message_id).collect();
        match store.commit_inline(instance, unit, &run).await? {
            InlineOutcome::Refused => {
                let failure = run.failure.into_inner().unwrap_or_else(|p| p.into_inner());
                Err(match failure {
                    Some((read_model, message_id, failure)) => {
                        DispatchError::InlineReadModelFailed {
                            message_id,
                            read_model,
                            error: failure.to_string(),
                        }
                    }
                    None => DispatchError::InlineReadModelFailed {
                        message_id: Uuid::nil(),
                        read_model: String::new(),
                        error: "refused without a reason".into(),
                    },
                })
            }
            InlineOutcome::Unit(UnitOutcome::Committed { appended, .. }) => {
                // The unit's other rows wait, pending, for a claim; a caller who waits for the
                // perspectives waits for them as for rows another instance holds.
                let applied = if wait && !inbox.is_empty() {
                    coordinator
                        .awaits
                        .send(AwaitProcessed(inbox))
                        .await
                        .map_err(|e| DispatchError::Unavailable(e.to_string()))?
                } else {
                    Vec::new()
                };
                Ok(CommitOutcome { appended, applied })
            }
            InlineOutcome::Unit(UnitOutcome::Conflict {
                stream_id,
                expected,
                actual,
            }) => Err(DispatchError::VersionConflict {
                stream_id,
                expected,
                actual,
            }),
            InlineOutcome::Unit(UnitOutcome::KeyTaken { key }) => {
                Err(DispatchError::IdempotencyKeyReused { key })
            }
        }
    }
    .boxed()
}

/// Receptor → unit → queued for commit (the coordinator keeps the order units arrive in).
async fn queue_command(
    deps: &PartitionDeps,
    envelope: Envelope,
    typed: Option<Box<dyn Any + Send>>,
    completes: Option<WorkRef>,
    wait: bool,
    keyed: Option<Keyed>,
    parent: &Span,
) -> Result<QueuedCommand, DispatchError> {
    let table = deps.registry.current();
    let Some(receptor) = table.receptor(&envelope.message_type) else {
        return Err(DispatchError::HandlerNotFound {
            message_type: envelope.message_type,
        });
    };
    let mut envelope = envelope;
    let span = traces::receptor(
        parent,
        &envelope,
        deps.origin.partition(&envelope.stream_id),
        None,
    );
    let started = Instant::now();
    let decided = traces::within(&span, receptor.handle.invoke(&envelope, typed)).await;
    receptor.meters.record(decided.is_ok(), started.elapsed());
    // The messages it causes inherit the envelope's metadata: they continue the receptor's
    // trace (or the dispatch span's, should a filter want that one and not the receptor's: the
    // dispatcher left the command's metadata to this step).
    traces::stamp(
        if span.is_disabled() { parent } else { &span },
        &mut envelope.metadata,
    );
    let decision = match decided {
        Ok(decision) => decision,
        Err(failure) => {
            let refusal = DispatchError::from_handler(&envelope.message_type, failure);
            return match (keyed, &refusal) {
                // A business refusal of a keyed command is its outcome: recorded, so a retry
                // answers it again rather than deciding anew.
                (
                    Some(keyed),
                    DispatchError::Rejected {
                        message_type,
                        error,
                    },
                ) => {
                    let record = keyed.record(&Outcome::Rejected {
                        message_type: message_type.clone(),
                        error: error.clone(),
                    })?;
                    let unit = UnitOfWork {
                        idempotency: Some(record),
                        ..UnitOfWork::default()
                    };
                    Ok(QueuedCommand {
                        result: Box::new(()),
                        commit: PendingCommit::Queued(commit(
                            &deps.coordinator.commits,
                            unit,
                            false,
                        )),
                        refused: Some(refusal),
                    })
                }
                _ => Err(refusal),
            };
        }
    };
    let mut unit = plan_unit(
        &deps.origin,
        &table,
        &envelope,
        decision.events,
        decision.commands,
        decision.expectations,
        completes,
    )?;
    if let Some(keyed) = keyed {
        let result = receptor
            .receptor
            .encode_result(&*decision.result)
            .map_err(DispatchError::Codec)?;
        unit.idempotency = Some(keyed.record(&Outcome::Done {
            message_id: envelope.message_id,
            correlation_id: envelope.correlation_id,
            stream_id: envelope.stream_id.clone(),
            timestamp_us: envelope.timestamp_us,
            accepted: false,
            result: Some(result),
            inbox: unit.inbox.iter().map(|r| r.envelope.message_id).collect(),
        })?);
    }
    // The unit goes into the coordinator's mailbox now; only the answer is awaited later. One
    // with inline read models is committed on its own instead.
    let commit = match inline_run(&table, &mut unit) {
        Some(run) => PendingCommit::Inline(commit_inline(deps, unit, run, wait)),
        None => PendingCommit::Queued(commit(&deps.coordinator.commits, unit, wait)),
    };
    Ok(QueuedCommand {
        result: decision.result,
        commit,
        refused: None,
    })
}

/// Receptor → unit, not committed: a command of a request scope.
async fn decide(
    deps: &PartitionDeps,
    envelope: Envelope,
    typed: Option<Box<dyn Any + Send>>,
) -> Result<Decided, DispatchError> {
    let table = deps.registry.current();
    let Some(receptor) = table.receptor(&envelope.message_type) else {
        return Err(DispatchError::HandlerNotFound {
            message_type: envelope.message_type,
        });
    };
    let mut envelope = envelope;
    let span = traces::receptor(
        &Span::none(),
        &envelope,
        deps.origin.partition(&envelope.stream_id),
        Some(&deps.origin.sampler),
    );
    let started = Instant::now();
    let decided = traces::within(&span, receptor.handle.invoke(&envelope, typed)).await;
    receptor.meters.record(decided.is_ok(), started.elapsed());
    let decision = decided.map_err(|f| DispatchError::from_handler(&envelope.message_type, f))?;
    traces::stamp(&span, &mut envelope.metadata);
    let unit = plan_unit(
        &deps.origin,
        &table,
        &envelope,
        decision.events,
        decision.commands,
        decision.expectations,
        None,
    )?;
    Ok(Decided {
        result: decision.result,
        unit,
    })
}

/// Receptor → unit → commit, awaited: commands from the inbox, whose outcome decides their row.
async fn run_command(
    deps: &PartitionDeps,
    envelope: Envelope,
    typed: Option<Box<dyn Any + Send>>,
    completes: Option<WorkRef>,
    wait: bool,
) -> Result<CommandOutcome, DispatchError> {
    queue_command(deps, envelope, typed, completes, wait, None, &Span::none())
        .await?
        .committed()
        .await
}

async fn process_inbox(deps: &PartitionDeps, work: &InboxWork, skip: Vec<String>) -> InboxResult {
    match work.envelope.kind {
        MessageKind::Command => {
            match run_command(deps, work.envelope.clone(), None, Some(work.work), false).await {
                Ok(_) => InboxResult::CommittedWithUnit,
                Err(e) => {
                    let kind = match &e {
                        DispatchError::Panicked { .. } => FailureKind::Panicked,
                        e if e.is_retryable() && !e.is_conflict() => FailureKind::Transient,
                        _ => FailureKind::Failed,
                    };
                    InboxResult::Failed(kind, e.to_string(), Vec::new())
                }
            }
        }
        MessageKind::Event => {
            let table = deps.registry.current();
            let envelope = &work.envelope;
            let meta = EventMeta::of(envelope, work.version, work.position);
            let perspectives: Vec<_> = table
                .perspectives(&envelope.message_type)
                .iter()
                .filter(|p| !skip.contains(&p.name))
                .collect();
            // The perspectives of one event run in parallel; the next event waits for all. A
            // read model runs in a store transaction of its own (an inline one too: an event
            // it applied with its command is recorded, and skipped here).
            let span = traces::perspective(
                envelope,
                deps.origin.partition(&envelope.stream_id),
                work.attempts,
            );
            let meta = &meta;
            // An event with one perspective to run, a read model, has its inbox row completed
            // in the read model's transaction.
            let completes = (perspectives.len() == 1).then_some(work.work);
            let runs = perspectives.iter().map(|p| async move {
                let started = Instant::now();
                let result = match &p.run {
                    PerspectiveRun::Plain(handle) => handle
                        .apply(envelope, meta.clone())
                        .await
                        .map(|()| false)
                        .map_err(Fail::Handler),
                    PerspectiveRun::Once { handle, .. } => {
                        apply_once(deps, &p.name, handle, envelope, meta.clone(), completes).await
                    }
                };
                p.meters.record(result.is_ok(), started.elapsed());
                result
            });
            let results = traces::within(&span, futures::future::join_all(runs)).await;
            let mut applied = skip;
            let mut failure: Option<(FailureKind, String)> = None;
            let mut completed = false;
            for (p, result) in perspectives.iter().zip(results) {
                match result {
                    Ok(row_completed) => {
                        completed |= row_completed;
                        applied.push(p.name.clone());
                    }
                    Err(Fail::Handler(HandlerFailure::Panicked(m))) => {
                        failure.get_or_insert((
                            FailureKind::Panicked,
                            format!("{}: panicked: {m}", p.name),
                        ));
                    }
                    Err(Fail::Handler(other)) => {
                        failure
                            .get_or_insert((FailureKind::Failed, format!("{}: {other}", p.name)));
                    }
                    Err(Fail::Store(e)) => {
                        let kind = if e.is_retryable() {
                            FailureKind::Transient
                        } else {
                            FailureKind::Failed
                        };
                        failure.get_or_insert((kind, format!("{}: {e}", p.name)));
                    }
                }
            }
            match failure {
                None if completed => InboxResult::CommittedWithUnit,
                None => InboxResult::Done,
                Some((kind, error)) => InboxResult::Failed(kind, error, applied),
            }
        }
    }
}

/// Why one perspective of an inbox event did not apply it.
enum Fail {
    Handler(HandlerFailure),
    /// A read model's transaction failed (its effects were rolled back with it).
    Store(crate::store::StoreError),
}

/// Runs one read model on one event in a store transaction (shared with other partitions'
/// runs, see `apply_group`) that also records the event as applied by it, and completes
/// `completes` (its inbox row) when given; an event recorded before is not applied again.
/// Answers whether the row was completed with it.
async fn apply_once(
    deps: &PartitionDeps,
    name: &str,
    handle: &crate::read_model::ReadModelHandle,
    envelope: &Envelope,
    meta: EventMeta,
    completes: Option<WorkRef>,
) -> Result<bool, Fail> {
    let outcome = deps
        .group
        .run(Run {
            name: name.to_string(),
            handle: handle.clone(),
            envelope: envelope.clone(),
            meta,
            completes,
        })
        .await;
    match outcome.applied {
        Ok(AppliedOnce::Applied | AppliedOnce::AlreadyApplied) => {
            fault::read_model_at(&envelope.stream_id, fault::HoldAt::AfterCommit).await;
            Ok(outcome.completed)
        }
        Ok(AppliedOnce::Refused) => {
            Err(Fail::Handler(outcome.failure.unwrap_or_else(|| {
                HandlerFailure::Decode("refused without a reason".into())
            })))
        }
        Err(e) => Err(Fail::Store(e)),
    }
}
