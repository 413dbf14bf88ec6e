//! Exactly-once read models: perspectives whose writes commit in the store transaction that
//! also records their progress.
//!
//! Owns the trait users implement, [`ReadModel`] (an event → writes through the transaction it
//! is handed), the transaction handle [`ReadModelTx`], the choice made at registration,
//! [`Consistency`] (after the command, from the inbox; or inline, inside the command's own
//! transaction), and the hooks through which a store runs them inside its transaction
//! ([`ApplyInTx`], [`InlineApply`], [`OnceWork`]), and the statements prepared per connection
//! for them (`Statements`, with the `postgres` feature). It must not open or commit transactions (the stores do:
//! `Store::apply_once`, `Store::apply_once_many`, `Store::commit_inline`) nor decide ordering
//! (partition actors do) or grouping (`apply_group` does).
//!
//! What "exactly once" means per store:
//! - Postgres: the read model's statements run in the transaction that inserts the row
//!   `(read model, event id)` into `wb_read_model_applied`; both commit or neither. An event
//!   whose row exists is not applied again, whatever crashed where (a second instance applying
//!   the same event waits for the first's transaction on that row, then skips it). The rows are
//!   purged with the inbox dedup records, after `store.dedup_retention_hours`.
//! - Memory: there is no transaction to hand over. The read model stages its effects
//!   ([`ReadModelTx::on_commit`]); the store runs them, under one lock, together with recording
//!   the event as applied, and only if the apply succeeded: exactly once for the life of the
//!   process.
//!
//! Inline ([`Consistency::Inline`]): the read model runs in the transaction that appends the
//! command's events (the command is committed in a transaction of its own, not in the
//! coordinator's group commit); its error, panic or timeout rolls the whole command back and the
//! caller gets [`crate::DispatchError::InlineReadModelFailed`]. Events of the same types that
//! reach the service another way (from the broker, a request scope, a command from the inbox)
//! are applied as [`Consistency::Async`] ones are, still exactly once. See
//! `docs/architecture.md` for the trade-off.

use crate::envelope::Envelope;
use crate::handler::{EventMeta, HandlerFailure, PerspectiveError, guarded, panic_message};
use crate::message::{self, Event};
use crate::supervision::fault;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

/// When a [`ReadModel`] runs, chosen per read model at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// After the command committed, from the inbox, like a plain perspective: the command's
    /// latency and its success do not depend on the read model. Each event is applied once,
    /// in a transaction shared with the events of other partitions applied at the same time
    /// (see `docs/architecture.md`).
    Async,
    /// Inside the command's own transaction: the read model is current when the command
    /// returns, and its failure rolls the command back (nothing written, the caller gets the
    /// error). Costs the command a transaction of its own, and holds the event store's append
    /// lock while the read model runs.
    Inline,
}

/// The transaction a [`ReadModel`] writes through.
///
/// On the Postgres store, [`ReadModelTx::postgres`] is the open transaction in which the
/// runtime also records the read model's progress: statements run there commit with it. On the
/// memory store there is none, and the read model stages its effects with
/// [`ReadModelTx::on_commit`] instead; they run when the progress is recorded, atomically with
/// it. (On Postgres, closures given to `on_commit` run right after the commit: fine for a cache
/// beside the table, not crash-safe.)
pub struct ReadModelTx<'t> {
    #[cfg(feature = "postgres")]
    postgres: Option<&'t tokio_postgres::Transaction<'t>>,
    #[cfg(feature = "postgres")]
    statements: Option<&'t Statements>,
    staged: Vec<Box<dyn FnOnce() + Send>>,
    #[cfg(not(feature = "postgres"))]
    _lifetime: PhantomData<&'t ()>,
}

impl<'t> ReadModelTx<'t> {
    /// A transaction with no database beneath it: effects are staged (the memory store).
    pub fn staged() -> ReadModelTx<'t> {
        ReadModelTx {
            #[cfg(feature = "postgres")]
            postgres: None,
            #[cfg(feature = "postgres")]
            statements: None,
            staged: Vec::new(),
            #[cfg(not(feature = "postgres"))]
            _lifetime: PhantomData,
        }
    }

    /// The open Postgres transaction (the Postgres store).
    #[cfg(feature = "postgres")]
    pub fn with_postgres(tx: &'t tokio_postgres::Transaction<'t>) -> ReadModelTx<'t> {
        ReadModelTx {
            postgres: Some(tx),
            statements: None,
            staged: Vec::new(),
        }
    }

    /// The open Postgres transaction and the prepared statements of its connection (the
    /// Postgres store).
    #[cfg(feature = "postgres")]
    pub fn with_postgres_statements(
        tx: &'t tokio_postgres::Transaction<'t>,
        statements: &'t Statements,
    ) -> ReadModelTx<'t> {
        ReadModelTx {
            postgres: Some(tx),
            statements: Some(statements),
            staged: Vec::new(),
        }
    }

    /// The open Postgres transaction, on the Postgres store; `None` on the memory store.
    #[cfg(feature = "postgres")]
    pub fn postgres(&self) -> Option<&'t tokio_postgres::Transaction<'t>> {
        self.postgres
    }

    /// `sql` prepared (with parameters of `types`) on the transaction's connection: once per
    /// pooled connection, the first use paying a round trip, every later one none, and the
    /// server neither parsing nor planning it again. For the statements a read model runs on
    /// every event. `None` on the memory store.
    /// (The future holds the transaction, not `self`: it is `Send` whatever was staged.)
    #[cfg(feature = "postgres")]
    pub fn prepared<'a>(
        &self,
        sql: &'a str,
        types: &'a [tokio_postgres::types::Type],
    ) -> impl Future<Output = Option<Result<tokio_postgres::Statement, tokio_postgres::Error>>> + Send + 'a
    where
        't: 'a,
    {
        let (tx, statements) = (self.postgres, self.statements);
        async move {
            let tx = tx?;
            Some(match statements {
                Some(statements) => statements.get(tx, sql, types).await,
                None => tx.prepare_typed(sql, types).await,
            })
        }
    }

    /// Stages an effect: run when the transaction commits (see the type's docs), never if it
    /// rolls back.
    pub fn on_commit(&mut self, effect: impl FnOnce() + Send + 'static) {
        self.staged.push(Box::new(effect));
    }

    /// The staged effects, for the store to run at commit.
    pub fn take_staged(&mut self) -> Vec<Box<dyn FnOnce() + Send>> {
        std::mem::take(&mut self.staged)
    }
}

/// The statements prepared on one pooled connection of the Postgres store for read models
/// ([`ReadModelTx::prepared`]), by text and parameter types. Bounded: past
/// [`Statements::MAX`] it starts over (a read model that builds its SQL per event gains nothing
/// from it, and must not grow it without end).
#[cfg(feature = "postgres")]
#[derive(Default)]
pub struct Statements {
    prepared: Mutex<
        std::collections::HashMap<
            (String, Vec<tokio_postgres::types::Type>),
            tokio_postgres::Statement,
        >,
    >,
}

#[cfg(feature = "postgres")]
impl Statements {
    /// Most statements kept per connection.
    pub const MAX: usize = 256;

    /// `sql` prepared on `client`'s connection, from the cache or now.
    pub async fn get(
        &self,
        client: &impl tokio_postgres::GenericClient,
        sql: &str,
        types: &[tokio_postgres::types::Type],
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        let key = (sql.to_string(), types.to_vec());
        if let Some(statement) = self.lock().get(&key) {
            return Ok(statement.clone());
        }
        // Two runs missing at once both prepare it; the second one's is kept. Harmless.
        let statement = client.prepare_typed(sql, types).await?;
        let mut prepared = self.lock();
        if prepared.len() >= Self::MAX {
            prepared.clear();
        }
        prepared.insert(key, statement.clone());
        Ok(statement)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<
            (String, Vec<tokio_postgres::types::Type>),
            tokio_postgres::Statement,
        >,
    > {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Applies one event type to a read model through the transaction the runtime records its
/// progress in: after any crash, the read model shows each event exactly once. Registered with
/// [`crate::RuntimeBuilder::read_model`]; a name may be registered for several event types.
pub trait ReadModel<E: Event>: Send + Sync + 'static {
    /// Applies one event. An error rolls the transaction back: for an [`Consistency::Async`]
    /// read model the event is retried with backoff and dead-lettered after
    /// `store.max_attempts` (its stream waits behind it); for an [`Consistency::Inline`] one the
    /// command is rolled back and its caller gets the error.
    fn apply(
        &self,
        event: E,
        meta: EventMeta,
        tx: &mut ReadModelTx<'_>,
    ) -> impl Future<Output = Result<(), PerspectiveError>> + Send;
}

/// A read model with its event type erased.
pub(crate) trait ErasedReadModel: Send + Sync + 'static {
    fn apply<'a>(
        &'a self,
        envelope: &'a Envelope,
        meta: EventMeta,
        tx: &'a mut ReadModelTx<'_>,
    ) -> BoxFuture<'a, Result<(), HandlerFailure>>;
}

pub(crate) struct ReadModelAdapter<E, R> {
    model: R,
    _event: PhantomData<fn(E)>,
}

impl<E, R> ReadModelAdapter<E, R> {
    pub(crate) fn new(model: R) -> Self {
        ReadModelAdapter {
            model,
            _event: PhantomData,
        }
    }
}

impl<E: Event, R: ReadModel<E>> ErasedReadModel for ReadModelAdapter<E, R> {
    fn apply<'a>(
        &'a self,
        envelope: &'a Envelope,
        meta: EventMeta,
        tx: &'a mut ReadModelTx<'_>,
    ) -> BoxFuture<'a, Result<(), HandlerFailure>> {
        async move {
            let event = message::decode::<E>(&envelope.payload)
                .map_err(|e| HandlerFailure::Decode(e.to_string()))?;
            self.model
                .apply(event, meta, tx)
                .await
                .map_err(HandlerFailure::Perspective)
        }
        .boxed()
    }
}

/// A registered read model, run by a store inside its transaction: user code guarded against
/// panics and bounded by `coordinator.handler_timeout_ms`, as [`crate::handler`]'s handles are.
#[derive(Clone)]
pub(crate) struct ReadModelHandle {
    model: Arc<dyn ErasedReadModel>,
    timeout: Duration,
}

impl ReadModelHandle {
    pub(crate) fn new(model: Arc<dyn ErasedReadModel>, timeout: Duration) -> Self {
        ReadModelHandle { model, timeout }
    }

    /// Applies the event in `envelope` through `tx`.
    pub(crate) async fn apply(
        &self,
        envelope: &Envelope,
        meta: EventMeta,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), HandlerFailure> {
        let model = &self.model;
        match std::panic::catch_unwind(AssertUnwindSafe(|| model.apply(envelope, meta, tx))) {
            Ok(fut) => guarded(fut, self.timeout).await,
            Err(payload) => Err(HandlerFailure::Panicked(panic_message(payload))),
        }
    }
}

/// A store's answer that the work it ran in its transaction refused (the transaction was
/// rolled back); why is kept by the work itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// One read model's run on one event, as a store runs it inside its transaction
/// (`Store::apply_once`).
pub trait ApplyInTx: Send + Sync {
    /// Runs the read model through `tx`; `Err` rolls the transaction back.
    fn apply<'a>(&'a self, tx: &'a mut ReadModelTx<'_>) -> BoxFuture<'a, Result<(), Refused>>;
}

/// The inline read models of one command's events, as a store runs them inside the command's
/// transaction (`Store::commit_inline`).
pub trait InlineApply: Send + Sync {
    /// Runs the read models over the `appended` events through `tx`; answers the (read model,
    /// event id) pairs applied, which the store records as applied in the same transaction.
    /// `Err` rolls the command back.
    fn apply<'a>(
        &'a self,
        tx: &'a mut ReadModelTx<'_>,
        appended: &'a [crate::store::AppendedEvent],
    ) -> BoxFuture<'a, Result<Vec<(String, Uuid)>, Refused>>;
}

/// What `Store::apply_once` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppliedOnce {
    /// Applied and recorded, in one commit.
    Applied,
    /// Recorded before (by an earlier run, perhaps of a process that crashed before reporting
    /// it): not applied again.
    AlreadyApplied,
    /// The read model refused; nothing was written.
    Refused,
}

/// One item of [`crate::store::Store::apply_once_many`]: a read model's run on one event, and
/// the inbox row (if any) whose completion commits with it.
pub struct OnceWork<'a> {
    /// The read model's name (what the applied record is keyed by).
    pub read_model: &'a str,
    /// The event's id.
    pub message_id: Uuid,
    /// The inbox row this run finishes (the event's only perspective): completed in the same
    /// transaction, fenced by its lease generation as the work batch's completions are.
    pub completes: Option<crate::store::WorkRef>,
    /// The read model's run.
    pub apply: &'a dyn ApplyInTx,
}

/// What `Store::apply_once_many` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppliedMany {
    /// Every item committed in one transaction.
    Committed {
        /// Per item, in the order given: [`AppliedOnce::Applied`] or
        /// [`AppliedOnce::AlreadyApplied`].
        outcomes: Vec<AppliedOnce>,
        /// The items' inbox rows ([`OnceWork::completes`]) were completed in it too (a row
        /// whose lease was lost meanwhile is left to its new holder, which finds the event
        /// applied).
        completed: bool,
    },
    /// An item refused (or a statement of one failed): nothing of any item was written. Which
    /// one is not said: the caller runs each alone to find out.
    Refused,
}

/// One event for one read model, run by the partition actor through `Store::apply_once`.
pub(crate) struct OneEvent<'e> {
    pub handle: &'e ReadModelHandle,
    pub envelope: &'e Envelope,
    pub meta: EventMeta,
    /// Why it refused, when it did.
    pub failure: Mutex<Option<HandlerFailure>>,
}

impl ApplyInTx for OneEvent<'_> {
    fn apply<'a>(&'a self, tx: &'a mut ReadModelTx<'_>) -> BoxFuture<'a, Result<(), Refused>> {
        async move {
            match self
                .handle
                .apply(self.envelope, self.meta.clone(), tx)
                .await
            {
                Ok(()) => {
                    fault::read_model_at(&self.meta.stream_id, fault::HoldAt::BeforeCommit).await;
                    Ok(())
                }
                Err(failure) => {
                    *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure);
                    Err(Refused)
                }
            }
        }
        .boxed()
    }
}

/// The inline read models of one command's events.
pub(crate) struct InlineRun {
    /// The unit's events (in the unit's order) with their inline read models (name, handle).
    pub events: Vec<(Envelope, Vec<(String, ReadModelHandle)>)>,
    /// Why it refused, when it did: (read model, event id, failure).
    pub failure: Mutex<Option<(String, Uuid, HandlerFailure)>>,
}

impl InlineApply for InlineRun {
    fn apply<'a>(
        &'a self,
        tx: &'a mut ReadModelTx<'_>,
        appended: &'a [crate::store::AppendedEvent],
    ) -> BoxFuture<'a, Result<Vec<(String, Uuid)>, Refused>> {
        async move {
            let mut applied = Vec::new();
            for (envelope, models) in &self.events {
                let place = appended
                    .iter()
                    .find(|a| a.message_id == envelope.message_id);
                let meta = EventMeta::of(
                    envelope,
                    place.map(|a| a.version),
                    place.map(|a| a.position),
                );
                for (name, handle) in models {
                    if let Err(failure) = handle.apply(envelope, meta.clone(), tx).await {
                        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((name.clone(), envelope.message_id, failure));
                        return Err(Refused);
                    }
                    applied.push((name.clone(), envelope.message_id));
                }
            }
            Ok(applied)
        }
        .boxed()
    }
}
