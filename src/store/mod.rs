//! The store seam: the work coordinator contract that the in-memory and the Postgres stores both
//! implement, with the same semantics.
//!
//! Owns the vocabulary of durable work: units of work (event-store appends, outbox rows, inbox
//! rows with dedup, all or nothing per unit), completions, failures with backoff and dead
//! letters, releases, claims of pending work in leased partitions, heartbeats and leases.
//! It must not know about actors or handlers: the coordinator drives it.
//!
//! Rules every implementation keeps (the conformance tests in `tests/store_conformance.rs` pin
//! them):
//! - One [`WorkBatch`] is applied in one atomic step; inside it each [`UnitOfWork`] either
//!   commits whole or comes back as [`UnitOutcome::Conflict`] while the rest commits.
//! - Versions are 1..n per stream with no gaps; positions are global and increasing.
//! - An inbox row whose message id was seen before is reported as a duplicate and has no effect.
//! - A partition is leased to at most one live instance; every row claim and every completion
//!   carries the lease's generation (fencing token) and a stale one is refused.
//! - A stream's rows are claimed in order, never past a row that is waiting for a retry or is
//!   dead-lettered (the stream is parked).
//! - Lease times come from the store's own clock.
//! - An idempotency key is recorded at most once: a unit carrying a key that is already
//!   recorded (by an earlier batch, or an earlier unit of the same batch) comes back as
//!   [`UnitOutcome::KeyTaken`] and writes nothing; the record is written with the unit's other
//!   rows, in the same atomic step, and is purged after the dedup retention.

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;

use crate::envelope::Envelope;
pub use crate::read_model::{AppliedMany, AppliedOnce, ApplyInTx, InlineApply, OnceWork};
use async_trait::async_trait;
use std::time::Duration;
use uuid::Uuid;

/// Identifies one running instance of a service.
pub type InstanceId = Uuid;

/// The knobs a store needs from the configuration.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// How many partitions streams are hashed into (`partitions.partition_count`). Rows come
    /// with their partition already computed; the stores read this only to tell whether
    /// `max_partitions_per_instance` can bind (the Postgres store skips counting an
    /// instance's leases when it cannot).
    pub partition_count: u32,
    /// Most partitions one instance leases at once (`partitions.max_partitions_per_instance`).
    pub max_partitions_per_instance: u32,
    /// How long a partition lease, and an instance's liveness, lasts without a heartbeat
    /// (`partitions.lease_seconds`).
    pub lease: Duration,
    /// Counted attempts after which a failing row is dead-lettered (`store.max_attempts`, at
    /// least 1).
    pub max_attempts: u32,
    /// The delay before the first retry, and after every transient failure
    /// (`store.backoff_base_ms`).
    pub backoff_base: Duration,
    /// The cap of the retry delay (`store.backoff_max_ms`).
    pub backoff_max: Duration,
    /// How long a processed inbox message id is remembered for deduplication, counted from
    /// when its row was written (`store.dedup_retention_hours`).
    pub dedup_retention: Duration,
}

impl StoreSettings {
    /// The settings of `[partitions]` and `[store]`, converted to durations.
    pub fn from_config(config: &crate::config::Config) -> StoreSettings {
        StoreSettings {
            partition_count: config.partitions.partition_count,
            max_partitions_per_instance: config.partitions.max_partitions_per_instance,
            lease: Duration::from_secs(config.partitions.lease_seconds),
            max_attempts: config.store.max_attempts,
            backoff_base: Duration::from_millis(config.store.backoff_base_ms),
            backoff_max: Duration::from_millis(config.store.backoff_max_ms),
            dedup_retention: Duration::from_secs(config.store.dedup_retention_hours * 3600),
        }
    }

    /// The delay before retry number `attempts` (1-based): base · 2^(attempts-1), capped. A
    /// failed message's schedule, the same on every backend (no jitter: the Postgres store
    /// computes it in SQL too).
    pub fn backoff(&self, attempts: u32) -> Duration {
        crate::retry::Backoff::new(self.backoff_base, self.backoff_max).ceiling(attempts)
    }
}

/// What a writer expects of a stream before appending to it (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's current version must be exactly this.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at version `current` (0: no stream yet) meets this expectation.
    pub fn matches(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

/// A row for the outbox: `envelope` is to be published to `topic`.
#[derive(Debug, Clone)]
pub struct NewOutboxRow {
    /// The message to publish; its message id keys the row.
    pub envelope: Envelope,
    /// The transport topic it goes to.
    pub topic: String,
    /// The partition of the envelope's stream (`routing::partition_of`); rows are claimed and
    /// ordered per partition.
    pub partition: u32,
}

/// A row for the inbox: `envelope` is to be processed by this service (perspectives of an
/// event, or the receptor of a command).
#[derive(Debug, Clone)]
pub struct NewInboxRow {
    /// The message to process; its message id keys the row and its dedup record.
    pub envelope: Envelope,
    /// The partition of the envelope's stream (`routing::partition_of`).
    pub partition: u32,
}

/// All or nothing: the writes of one command (or one delivery).
#[derive(Debug, Clone, Default)]
pub struct UnitOfWork {
    /// Checked before anything of the unit is written.
    pub expectations: Vec<(String, ExpectedVersion)>,
    /// Appended to the event store in this order.
    pub events: Vec<Envelope>,
    /// Queued for publishing; a message id already in the outbox is not queued again.
    pub outbox: Vec<NewOutboxRow>,
    /// Inserted with dedup by message id.
    pub inbox: Vec<NewInboxRow>,
    /// Inbox rows this unit finishes (a command taken from the inbox): completed only if the
    /// unit commits, so the command's effects and its completion are one atomic step.
    pub completes_inbox: Vec<WorkRef>,
    /// Lease the new rows to the writer at once where it can hold their partition, so they are
    /// processed without waiting for a claim.
    pub claim_for_writer: bool,
    /// The idempotency key of the command this unit is the outcome of, recorded with the unit
    /// (see [`NewIdempotencyRecord`]); `None` for a command dispatched without a key.
    pub idempotency: Option<NewIdempotencyRecord>,
}

/// The record of an idempotent command's first outcome, written in the same atomic step as the
/// command's events and queue rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewIdempotencyRecord {
    /// The caller's idempotency key ([`crate::DispatchOptions::idempotency_key`]).
    pub key: String,
    /// The hash of the command's type name and encoded body: a later dispatch with the same key
    /// and another hash is refused.
    pub request_hash: Vec<u8>,
    /// The outcome as the dispatcher encoded it (its result, its receipt, or its refusal),
    /// opaque to the store.
    pub outcome: Vec<u8>,
}

/// A recorded idempotency key, as [`Store::idempotency_record`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The key, the hash and the encoded outcome, as written.
    pub record: NewIdempotencyRecord,
    /// The events the unit that wrote the record appended, in the unit's order.
    pub appended: Vec<AppendedEvent>,
}

/// Where an appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendedEvent {
    /// The event's message id.
    pub message_id: Uuid,
    /// The stream it was appended to.
    pub stream_id: String,
    /// Its version in the stream (1-based).
    pub version: u64,
    /// Its position in the global log (1-based, gap-free).
    pub position: u64,
}

/// A claimed outbox row: this instance must publish it, then report it.
#[derive(Debug, Clone)]
pub struct OutboxWork {
    /// The message to publish.
    pub envelope: Envelope,
    /// The transport topic to publish it to.
    pub topic: String,
    /// The claim, to quote when reporting the row.
    pub work: WorkRef,
    /// Counted failed attempts before this claim (0 the first time); transient failures do
    /// not count.
    pub attempts: u32,
}

/// A claimed inbox row: this instance must process it, then report it.
#[derive(Debug, Clone)]
pub struct InboxWork {
    /// The message to process.
    pub envelope: Envelope,
    /// The claim, to quote when reporting the row.
    pub work: WorkRef,
    /// Counted failed attempts before this claim (0 the first time); transient failures do
    /// not count.
    pub attempts: u32,
    /// The event's version in its stream, when it is in this service's event store (`None`
    /// for a command, or an event received from another service).
    pub version: Option<u64>,
    /// The event's position in this service's event store (`None` as for `version`).
    pub position: Option<u64>,
}

/// Names a claimed row and the lease it was claimed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkRef {
    /// The row's message id, its key within its queue.
    pub message_id: Uuid,
    /// The row's partition.
    pub partition: u32,
    /// The partition lease's fencing token at claim time.
    pub generation: u64,
}

/// Why processing a row failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The handler returned an error or the broker refused the message: counts as an attempt.
    Failed,
    /// User code panicked: counts as an attempt.
    Panicked,
    /// The infrastructure was unavailable (broker down, timeout): retried after the base
    /// backoff without counting an attempt, so an outage never dead-letters messages.
    Transient,
}

impl FailureKind {
    /// The kind's name (`failed`, `panicked`, `transient`), the prefix of a row's last error.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Failed => "failed",
            FailureKind::Panicked => "panicked",
            FailureKind::Transient => "transient",
        }
    }
}

/// A report that processing a claimed row failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The row, with the lease it was claimed under.
    pub work: WorkRef,
    /// Whether the failure counts as an attempt, and the backoff it gets.
    pub kind: FailureKind,
    /// What went wrong; stored as the row's last error, prefixed with the kind.
    pub error: String,
}

/// How much pending work to claim in this batch.
#[derive(Debug, Clone, Copy)]
pub struct ClaimBudget {
    /// Most outbox rows to claim.
    pub outbox: u32,
    /// Most inbox rows to claim.
    pub inbox: u32,
}

/// One atomic round trip to the store.
#[derive(Debug, Clone, Default)]
pub struct WorkBatch {
    /// Units of work, applied in order, each all or nothing.
    pub units: Vec<UnitOfWork>,
    /// Outbox rows published: deleted.
    pub outbox_completions: Vec<WorkRef>,
    /// Outbox rows that failed to publish: retried after a backoff, or dead-lettered.
    pub outbox_failures: Vec<Failure>,
    /// Rows handed back unprocessed (their stream was parked behind a failure): no attempt.
    pub outbox_releases: Vec<WorkRef>,
    /// Inbox rows processed: deleted, their dedup records marked processed.
    pub inbox_completions: Vec<WorkRef>,
    /// Inbox rows whose processing failed: retried after a backoff, or dead-lettered.
    pub inbox_failures: Vec<Failure>,
    /// Inbox rows handed back unprocessed: no attempt.
    pub inbox_releases: Vec<WorkRef>,
    /// Claim pending rows, up to this budget, after the rest of the batch is applied, leasing
    /// free partitions with work first. `None`: claim nothing.
    pub claim: Option<ClaimBudget>,
    /// After a batch whose outcome is unknown (its reply was lost), the rows this instance
    /// really has in flight. A row claimed by this instance under its current lease but not in
    /// this list was claimed by a batch whose answer never arrived: the claim treats it as
    /// pending again, so it is neither stranded nor overtaken. `None`: trust every claim.
    pub in_flight: Option<InFlight>,
}

/// The rows an instance has handed out and not yet reported, per queue. Per queue because an
/// event that is both published and applied locally has an outbox row and an inbox row with
/// the same message id: one can be finished while the other is still running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Message ids of outbox rows being published.
    pub outbox: Vec<Uuid>,
    /// Message ids of inbox rows being processed.
    pub inbox: Vec<Uuid>,
}

impl WorkBatch {
    /// No units, no reports and no claim: nothing to send (`in_flight` alone does nothing).
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
            && self.outbox_completions.is_empty()
            && self.outbox_failures.is_empty()
            && self.outbox_releases.is_empty()
            && self.inbox_completions.is_empty()
            && self.inbox_failures.is_empty()
            && self.inbox_releases.is_empty()
            && self.claim.is_none()
    }

    /// Completions (published outbox rows, processed inbox rows) among the reports.
    pub fn completions(&self) -> usize {
        self.outbox_completions.len() + self.inbox_completions.len()
    }

    /// Number of row-level items, used to cap batch size.
    pub fn reports(&self) -> usize {
        self.outbox_completions.len()
            + self.outbox_failures.len()
            + self.outbox_releases.len()
            + self.inbox_completions.len()
            + self.inbox_failures.len()
            + self.inbox_releases.len()
    }
}

/// What became of one unit.
#[derive(Debug, Clone)]
pub enum UnitOutcome {
    /// The whole unit was written.
    Committed {
        /// Where each of the unit's events landed, in the unit's order.
        appended: Vec<AppendedEvent>,
        /// New outbox rows leased to the writer: publish them now.
        claimed_outbox: Vec<OutboxWork>,
        /// New inbox rows leased to the writer: process them now.
        claimed_inbox: Vec<InboxWork>,
        /// Inbox rows of this unit that were seen before and were not stored again.
        duplicate_inbox: Vec<Uuid>,
    },
    /// An expected version did not match: nothing of this unit was written.
    Conflict {
        /// A stream whose version did not match.
        stream_id: String,
        /// What the unit expected of it.
        expected: ExpectedVersion,
        /// Its version when the unit was checked (0: no stream).
        actual: u64,
    },
    /// The unit's idempotency key was already recorded: nothing of this unit was written.
    /// The record there ([`Store::idempotency_record`]) holds the first outcome.
    KeyTaken {
        /// The key.
        key: String,
    },
}

impl UnitOutcome {
    /// Rows of a committed unit leased to its writer (0 for a unit not written).
    pub fn rows_claimed(&self) -> usize {
        match self {
            UnitOutcome::Committed {
                claimed_outbox,
                claimed_inbox,
                ..
            } => claimed_outbox.len() + claimed_inbox.len(),
            _ => 0,
        }
    }
}

/// The answer to one [`WorkBatch`], units in the order they were given.
#[derive(Debug, Clone, Default)]
pub struct WorkBatchResult {
    /// One outcome per unit.
    pub units: Vec<UnitOutcome>,
    /// Outbox rows claimed for [`WorkBatch::claim`]: publish them, then report them.
    pub claimed_outbox: Vec<OutboxWork>,
    /// Inbox rows claimed for [`WorkBatch::claim`]: process them, then report them.
    pub claimed_inbox: Vec<InboxWork>,
    /// Reports refused because the lease they were claimed under is gone (fencing).
    pub stale: Vec<Uuid>,
    /// Rows that reached `max_attempts` in this batch.
    pub dead_lettered: Vec<Uuid>,
    /// The soonest a row failed in this batch becomes claimable again: the coordinator claims
    /// then instead of waiting for the slow fallback poll.
    pub next_retry_in: Option<Duration>,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its position in the global log (1-based, gap-free).
    pub position: u64,
    /// Its version in its stream (1-based).
    pub version: u64,
    /// The event as it was appended.
    pub envelope: Envelope,
}

/// What [`Store::commit_inline`] did with a unit.
#[derive(Debug, Clone)]
pub enum InlineOutcome {
    /// The unit's outcome: committed with its inline read models, or a conflict or a taken
    /// key (nothing written).
    Unit(UnitOutcome),
    /// An inline read model refused: nothing of the unit was written.
    Refused,
}

/// Which queue a row lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Messages to publish to the transport.
    Outbox,
    /// Messages for this service to process.
    Inbox,
}

impl Queue {
    /// The queue's name: `outbox` or `inbox`.
    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Outbox => "outbox",
            Queue::Inbox => "inbox",
        }
    }
}

/// A row parked after `max_attempts`; its stream waits behind it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The queue the row is in.
    pub queue: Queue,
    /// The row's message id: what requeue and skip take.
    pub message_id: Uuid,
    /// The message's type name.
    pub message_type: String,
    /// The stream that waits behind it.
    pub stream_id: String,
    /// Counted attempts made.
    pub attempts: u32,
    /// The last failure, as `<kind>: <error>` (see [`FailureKind::as_str`]); empty if none
    /// was recorded.
    pub error: String,
}

/// What the store knows about everything one request caused (status lookup by correlation id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorrelationStatus {
    /// Events stored, in position order: (type, stream, version).
    pub events: Vec<(String, String, u64)>,
    /// Outbox rows not yet published and not dead-lettered (waiting, retrying or in flight).
    pub outbox_pending: u64,
    /// Inbox rows not yet processed and not dead-lettered (waiting, retrying or in flight).
    pub inbox_pending: u64,
    /// Inbox messages processed (or skipped as dead letters) whose dedup records are still
    /// kept: they are purged after the dedup retention.
    pub inbox_processed: u64,
    /// Outbox and inbox rows dead-lettered.
    pub dead_lettered: u64,
}

/// The size of one work queue, for the backlog gauges (read once per heartbeat, never per
/// message).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// The outbox or the inbox.
    pub queue: Queue,
    /// Rows waiting or in flight (not dead-lettered).
    pub pending: u64,
    /// Dead-lettered rows.
    pub dead: u64,
    /// Age of the oldest pending row; `None` when nothing is pending.
    pub oldest_pending_age: Option<Duration>,
}

/// How an inbox row a caller waits for was settled ([`Store::inbox_settled`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxSettled {
    /// Its perspectives ran.
    Processed,
    /// It reached `store.max_attempts` and was dead-lettered.
    DeadLettered {
        /// The failure recorded with its last attempt.
        last_error: String,
    },
}

/// A heartbeat's answer.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    /// Instances seen within the last lease, this one included (at least 1).
    pub live_instances: u32,
    /// Partitions this instance leases after the heartbeat.
    pub held_partitions: Vec<u32>,
    /// Partitions given up in this heartbeat (idle, or above this instance's fair share).
    pub released: Vec<u32>,
    /// Partitions this instance took over from another since its previous heartbeat: leased
    /// while that instance still held them on paper (its lease had run out, or it was found
    /// dead by its liveness lock), as opposed to free ones or ones given up.
    pub taken_over: Vec<u32>,
}

/// The error beneath a [`StoreError`] (the database driver's, say), shared so that errors
/// carrying it stay cheap to clone.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the store layer. Each keeps its cause as its `source()`; whether retrying may
/// help is [`StoreError::is_retryable`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached, or the connection broke (a pool timeout, a closed
    /// connection). Retryable.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What failed, with the driver's text.
        message: String,
        /// The driver's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The database turned the connection down for a reason waiting will not change: the
    /// credentials, the database name, or the server's certificate. Not retried.
    #[error("database refused the connection: {message}")]
    Refused {
        /// The database URL (password masked) and why it refused.
        message: String,
        /// The driver's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// A statement failed; `code` is the SQLSTATE the server answered with.
    #[error("store query failed: {message}")]
    Query {
        /// The five-character SQLSTATE; `None` when the failure carried none.
        code: Option<String>,
        /// The server's message, prefixed with the SQLSTATE.
        message: String,
        /// The driver's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The schema could not be brought to what this build expects.
    #[error("migration error: {message}")]
    Migration {
        /// The step or file that failed, and why.
        message: String,
        /// The driver's error; `None` when the migration itself refused (a changed file, a bad
        /// schema name).
        #[source]
        source: Option<Cause>,
    },
    /// The schema was made by the numbered migrations of the versions before the schema was
    /// squashed into one baseline; they cannot be upgraded in place, and nothing was changed.
    #[error(
        "schema `{schema}` was created by the pre-squash migrations (it records {}); this \
         version cannot upgrade it in place and left it untouched: keep what you need of it \
         (pg_dump -n {schema}), then drop it (DROP SCHEMA {schema} CASCADE) or set \
         store.schema to a new schema, and start again",
        applied.join(", ")
    )]
    PreSquashSchema {
        /// The configured schema (`store.schema`).
        schema: String,
        /// The pre-squash file names its `wb_migrations` records.
        applied: Vec<String>,
    },
    /// The schema lacks tables this build reads: it was never migrated, or only by an older
    /// build. Read-only operator commands answer this instead of migrating.
    #[error(
        "schema `{schema}` is not migrated (missing {}): run `whizbang migrate` first",
        missing.join(", ")
    )]
    NotMigrated {
        /// The configured schema (`store.schema`).
        schema: String,
        /// The baseline files it has not recorded.
        missing: Vec<String>,
    },
    /// A row the caller named does not exist (a dead letter to requeue or skip, say).
    #[error("no such row: {0}")]
    NotFound(String),
    /// The database answered with something this build cannot read (a malformed row or
    /// answer, functions returning other columns). Not retried.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// An unavailable store, with no cause beneath the message.
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// The SQLSTATE the database answered with, when it did.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Query { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Worth retrying the same call later: the store was unreachable, or the statement failed
    /// for a reason of the moment (see [`retryable_sqlstate`]), not a bug or bad data.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Query { code, .. } => code.as_deref().is_some_and(retryable_sqlstate),
            StoreError::Refused { .. }
            | StoreError::Migration { .. }
            | StoreError::PreSquashSchema { .. }
            | StoreError::NotMigrated { .. }
            | StoreError::NotFound(_)
            | StoreError::Corrupt(_) => false,
        }
    }
}

/// Whether a statement that failed with SQLSTATE `code` may pass when run again: a connection
/// exception (class 08); a serialization failure or deadlock (40001, 40P01), which rolled the
/// whole transaction back; a server shutting down, crashed or starting (57P01, 57P02, 57P03);
/// a cancelled statement (57014: a statement timeout, an operator's cancel); too many
/// connections (53300). Constraint, syntax and data errors are not.
pub fn retryable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "57014" | "53300"
        )
}

/// The work coordinator contract.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Registers (or re-registers) an instance of a service, before it takes any lease (the
    /// Postgres store takes the instance's liveness lock here, and gives it up with a release
    /// of all its partitions).
    async fn register_instance(
        &self,
        instance: InstanceId,
        service: &str,
        host: &str,
    ) -> Result<(), StoreError>;

    /// Renews this instance's leases and liveness; gives up idle partitions and, gradually,
    /// partitions above its fair share; purges expired dedup records and idempotency records. A store shared by several
    /// processes also looks for instances that died (the Postgres store: their liveness lock is
    /// free) and expires their leases at once, as if they had run out.
    async fn heartbeat(&self, instance: InstanceId) -> Result<Heartbeat, StoreError>;

    /// Applies one batch atomically (see the module docs).
    async fn process_work_batch(
        &self,
        instance: InstanceId,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError>;

    /// Runs `apply` (one read model on one event) in one transaction that also records the
    /// event `message_id` as applied by `read_model`: both commit, or neither. An event already
    /// recorded is not applied again ([`AppliedOnce::AlreadyApplied`]) unless `replay` (a
    /// rebuild of the read model) is set. Records are purged after the dedup retention. The
    /// memory store has no transaction: it runs the effects `apply` staged, under one lock,
    /// with the record.
    async fn apply_once(
        &self,
        read_model: &str,
        message_id: Uuid,
        replay: bool,
        apply: &dyn ApplyInTx,
    ) -> Result<AppliedOnce, StoreError>;

    /// Runs several read-model runs ([`OnceWork`]) in ONE transaction, as
    /// [`Store::apply_once`] runs one: each event recorded as applied by its read model, an
    /// event recorded before not applied again, and the inbox rows the items complete
    /// completed in it. All commit, or nothing does ([`AppliedMany::Refused`] when an item
    /// refused). The items may run concurrently on the transaction: the caller gives at most
    /// one event per stream. The memory store has no inbox rows to complete
    /// (`completed: false`).
    async fn apply_once_many(
        &self,
        instance: InstanceId,
        work: &[OnceWork<'_>],
    ) -> Result<AppliedMany, StoreError>;

    /// Commits `unit` alone, in a transaction of its own in which `apply` then runs the inline
    /// read models over the unit's appended events, and every (read model, event) pair it
    /// answers is recorded as applied (as by [`Store::apply_once`]). If `apply` refuses,
    /// nothing of the unit is written ([`InlineOutcome::Refused`]). The unit's new rows are not
    /// leased to the writer: they wait, pending, for a claim.
    async fn commit_inline(
        &self,
        instance: InstanceId,
        unit: UnitOfWork,
        apply: &dyn InlineApply,
    ) -> Result<InlineOutcome, StoreError>;

    /// Gives up the given partitions, or all of them (graceful shutdown): their pending work
    /// becomes claimable by other instances at once.
    async fn release_partitions(
        &self,
        instance: InstanceId,
        partitions: Option<&[u32]>,
    ) -> Result<(), StoreError>;

    /// A stream's events from `from_version` (inclusive), in version order.
    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// All events after `after_position`, in position order, at most `limit`.
    async fn read_all(
        &self,
        after_position: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// The position of the newest stored event (0 when the event store is empty): where a
    /// replay that starts now will have read to once it catches up.
    async fn last_position(&self) -> Result<u64, StoreError>;

    /// Of the given inbox message ids, those that are settled: processed, or dead-lettered
    /// (a caller waiting for one is answered with the dead-letter error rather than waiting on).
    async fn inbox_settled(
        &self,
        message_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, InboxSettled)>, StoreError>;

    /// What a request caused, by correlation id.
    async fn correlation_status(
        &self,
        correlation_id: Uuid,
    ) -> Result<CorrelationStatus, StoreError>;

    /// Every dead-lettered row, outbox first, each queue in the order its rows were written.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError>;

    /// Puts a dead-lettered row back as pending with its attempts reset.
    async fn requeue_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError>;

    /// Drops a dead-lettered row so its stream moves on.
    async fn skip_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError>;

    /// The event-store position a perspective has been replayed up to, if it has a checkpoint.
    async fn load_checkpoint(&self, perspective: &str) -> Result<Option<u64>, StoreError>;

    /// Records the position a perspective has been replayed up to.
    async fn save_checkpoint(&self, perspective: &str, position: u64) -> Result<(), StoreError>;

    /// The record of an idempotency key, if one was committed and not yet purged.
    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Bumped whenever work becomes claimable (new pending rows, released partitions); the
    /// coordinator waits on it instead of polling.
    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The backlog of the outbox and the inbox, in that order: one cheap read for the metrics
    /// (`whizbang_queue_*`), taken once per heartbeat. A store that cannot tell answers none.
    async fn backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(code: &str) -> StoreError {
        StoreError::Query {
            code: Some(code.into()),
            message: format!("{code}: x"),
            source: None,
        }
    }

    #[test]
    fn retryable_errors_are_told_from_bugs_and_bad_data() {
        for code in [
            "08000", "08006", "08003", "40001", "40P01", "57P01", "57P02", "57P03", "57014",
            "53300",
        ] {
            assert!(query(code).is_retryable(), "{code}");
            assert_eq!(query(code).sqlstate(), Some(code));
        }
        // Unique and foreign key violations, a syntax error, an undefined function, bad text
        // encoding, division by zero, a disk full: running them again fails the same way.
        for code in [
            "23505", "23503", "42601", "42883", "22021", "22012", "53100", "XX000",
        ] {
            assert!(!query(code).is_retryable(), "{code}");
        }
        let no_code = StoreError::Query {
            code: None,
            message: "x".into(),
            source: None,
        };
        assert!(!no_code.is_retryable());
        assert!(StoreError::unavailable("down").is_retryable());
        let refused = StoreError::Refused {
            message: "28P01: password authentication failed".into(),
            source: None,
        };
        assert!(!refused.is_retryable());
        assert!(!StoreError::NotFound("x".into()).is_retryable());
        assert!(!StoreError::Corrupt("x".into()).is_retryable());
        let old = StoreError::PreSquashSchema {
            schema: "svc".into(),
            applied: vec!["0001_tables.sql".into()],
        };
        assert!(!old.is_retryable());
        assert!(old.to_string().contains("pre-squash"), "{old}");
    }

    #[test]
    fn the_cause_is_kept_as_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = StoreError::Unavailable {
            message: "connection lost".into(),
            source: Some(std::sync::Arc::new(io)),
        };
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(source.to_string(), "reset by peer");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = StoreSettings {
            partition_count: 1,
            max_partitions_per_instance: 1,
            lease: Duration::from_secs(1),
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            dedup_retention: Duration::from_secs(1),
        };
        assert_eq!(s.backoff(1), Duration::from_millis(100));
        assert_eq!(s.backoff(2), Duration::from_millis(200));
        assert_eq!(s.backoff(4), Duration::from_millis(800));
        assert_eq!(s.backoff(5), Duration::from_millis(1000));
        assert_eq!(s.backoff(100), Duration::from_millis(1000));
    }
}
