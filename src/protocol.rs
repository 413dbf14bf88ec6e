//! The messages between the engine's actors (the coordinator, the partition actors, the
//! publisher, the consumers and the dispatcher) and [`commit`], the call every writer uses.
//!
//! Owns the vocabulary only: no actor, no state. The actors hold [`Recipient`]s of these
//! messages ([`CoordinatorLink`] for the coordinator's children), never another actor's type, so
//! the actor modules do not import each other and are wired once, by the runtime, with no
//! second phase. It must not grow behaviour: what a message does is its handler's business.

use crate::error::DispatchError;
use crate::store::{AppendedEvent, Failure, OutboxWork, UnitOfWork, WorkRef};
use actix::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Told when the perspectives of one inbox row have run (or failed).
pub type AppliedSender = oneshot::Sender<Result<(), DispatchError>>;
pub type AppliedReceiver = oneshot::Receiver<Result<(), DispatchError>>;

/// What a committed unit gives back to its writer.
#[derive(Debug)]
pub struct CommitOutcome {
    pub appended: Vec<AppendedEvent>,
    /// One receiver per new inbox row, resolved when its perspectives have run (only when the
    /// commit asked to wait).
    pub applied: Vec<AppliedReceiver>,
}

/// The coordinator as the actors that work for it see it: where units go to be committed and
/// where handed-out rows are reported.
#[derive(Clone)]
pub struct CoordinatorLink {
    pub commits: Recipient<Commit>,
    pub reports: Recipient<Report>,
    /// Where a unit committed outside the coordinator (with inline read models) waits for its
    /// inbox rows.
    pub awaits: Recipient<AwaitProcessed>,
}

/// Queues a unit; `reply` answers when it is committed (or conflicted, or the batch failed).
/// Sent with [`commit`], which returns the answer to await.
pub struct Commit {
    pub unit: UnitOfWork,
    /// Return receivers that resolve when the unit's inbox rows have been processed.
    pub wait: bool,
    pub reply: oneshot::Sender<Result<CommitOutcome, DispatchError>>,
}

impl Message for Commit {
    type Result = ();
}

/// Puts `unit` in the coordinator's mailbox at once (units are committed in the order they
/// arrive) and returns its answer to await. The answer comes through the message's own channel:
/// a request-response `send` would spawn a task per unit only to pass the answer on.
pub fn commit(coordinator: &Recipient<Commit>, unit: UnitOfWork, wait: bool) -> CommitAnswer {
    let (reply, rx) = oneshot::channel();
    coordinator.do_send(Commit { unit, wait, reply });
    CommitAnswer(rx)
}

/// The answer to a [`commit`]; `Unavailable` if the coordinator stopped without answering.
pub struct CommitAnswer(oneshot::Receiver<Result<CommitOutcome, DispatchError>>);

impl Future for CommitAnswer {
    type Output = Result<CommitOutcome, DispatchError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|answer| {
            answer.unwrap_or_else(|_| Err(DispatchError::Unavailable("coordinator stopped".into())))
        })
    }
}

/// Answers, per inbox message id, when that row has been processed: a replayed idempotent
/// `local_invoke` waits for the perspectives of the first dispatch's events as it did. Looked
/// up at once, then at each fallback poll (or handed over with the row if this instance claims
/// it).
pub struct AwaitProcessed(pub Vec<Uuid>);

impl Message for AwaitProcessed {
    type Result = Vec<AppliedReceiver>;
}

/// What a partition actor or the publisher reports about a row it was handed.
pub enum Report {
    /// Rows the transport accepted (those of one turn of the publisher).
    OutboxDone(Vec<WorkRef>),
    OutboxFailed(Failure),
    OutboxReleased(WorkRef),
    InboxDone(WorkRef),
    InboxFailed(Failure),
    /// Handed back unprocessed (its stream is parked); the waiters go with it.
    InboxReleased(WorkRef, Vec<AppliedSender>),
    /// A row whose completion is committed already (a command from the inbox's with its own
    /// unit, an event's with its read model's transaction): nothing to write, only no longer
    /// in flight.
    InboxCommitted(WorkRef),
}

impl Message for Report {
    type Result = ();
}

/// Rows to publish, in commit order.
pub struct PublishRows(pub Vec<OutboxWork>);

impl Message for PublishRows {
    type Result = ();
}
