//! Request scopes: the specification's *scoped* strategy ("batches operations per HTTP request,
//! flushes on disposal") as a value a request handler holds.
//!
//! Owns [`Scope`] (from [`crate::Runtime::scope`]): each command dispatched in it runs its
//! receptor at once and answers its typed result, but nothing is written until
//! [`Scope::complete`], which commits the units of every command of the scope as one unit of
//! work — one store transaction, all or nothing: a version conflict of any command, a failed
//! command, or a store failure writes nothing of any. Dropping a scope without completing it
//! writes nothing. `complete` returns once the events are committed and the perspectives of
//! this service have applied them (read-your-writes, as `local_invoke`).
//!
//! The intended use is one scope per request: a handler takes a scope, dispatches the
//! request's commands, and completes the scope when it has succeeded (an error path simply
//! drops it). A `Scope` is an owned, `Send` value (no lifetime, no reference to the runtime's
//! internals beyond actor addresses), so an actix-web extractor can build it from the runtime
//! kept in the application data and hand it to the handler by value (`whizbang::web::RequestScope`
//! does, and its middleware completes it when the handler succeeded). A scope may carry an
//! idempotency key ([`Scope::with_idempotency_key`]): the scope then runs once per key, and a
//! repeat answers the recorded results. By hand:
//!
//! ```no_run
//! # use whizbang::{Runtime, DispatchError};
//! # async fn handler<C: whizbang::Command, R: Send + 'static>(runtime: &Runtime, a: C, b: C)
//! # -> Result<(R, R), DispatchError> {
//! let mut scope = runtime.scope();
//! let first: R = scope.local_invoke(a).await?;   // decided, not written
//! let second: R = scope.local_invoke(b).await?;  // decided, not written
//! scope.complete().await?;                       // both written at once, perspectives applied
//! Ok((first, second))
//! # }
//! ```
//!
//! What the commands of a scope see: receptors run one after another per stream as usual, but
//! none of the scope's writes is in the store before `complete`, so a receptor that reads the
//! store (or a read model) does not see the scope's earlier commands. Expected versions are
//! checked as if the commands ran in their order: a command's expectation on a stream an
//! earlier command of the scope appended to counts those appends. It must not write anything
//! itself: the dispatcher and the coordinator do.

use crate::dispatcher::{DeliveryReceipt, DispatchOptions, Dispatcher, downcast_result};
use crate::error::DispatchError;
use crate::idempotency::{KeyGuard, RecordedCommand, ScopeRecord, request_hash};
use crate::message::{self, Command};
use crate::store::{AppendedEvent, IdempotencyRecord, NewIdempotencyRecord, UnitOfWork};
use actix::prelude::*;
use std::any::Any;

/// A request scope: commands decided now, written together by [`Scope::complete`]. See the
/// module docs for the intended use.
pub struct Scope {
    dispatcher: Addr<Dispatcher>,
    commands: Vec<ScopedCommand>,
    /// The first dispatch of the scope that failed: the scope can no longer complete.
    failed: Option<DispatchError>,
    key: Keying,
}

/// Where a scope stands with its idempotency key.
enum Keying {
    /// No key: every completion writes.
    None,
    /// A key, not yet looked up (at the first dispatch).
    Given(String),
    /// The key is held in this process and was not recorded: the scope runs, and its
    /// completion records it.
    Fresh {
        key: String,
        _held: KeyGuard,
        hashes: Vec<Vec<u8>>,
    },
    /// The key was recorded by a scope that completed: each dispatch answers the recorded
    /// result of the same command at the same place, and completing writes nothing.
    Replay {
        key: String,
        _held: KeyGuard,
        record: ScopeRecord,
        appended: Vec<AppendedEvent>,
        next: usize,
    },
}

/// One decided command of a scope.
pub(crate) struct ScopedCommand {
    pub message_type: &'static str,
    /// Its receipt, whose events are filled in when the scope completes.
    pub receipt: DeliveryReceipt,
    pub unit: UnitOfWork,
    /// The receptor's result, encoded, when the scope has an idempotency key to record it.
    pub encoded: Option<Vec<u8>>,
}

/// What a completed scope wrote: one receipt per command, in the order they were dispatched.
#[derive(Debug, Clone)]
pub struct ScopeReceipt {
    /// The commands' receipts, with the events each appended.
    pub receipts: Vec<DeliveryReceipt>,
}

impl Scope {
    pub(crate) fn new(dispatcher: Addr<Dispatcher>) -> Scope {
        Scope {
            dispatcher,
            commands: Vec::new(),
            failed: None,
            key: Keying::None,
        }
    }

    /// The scope with a caller-chosen idempotency key (the request's `Idempotency-Key`): the
    /// scope as a whole runs once per key. The first scope of a key that completes records
    /// what each of its commands answered; a later scope with the same key, dispatching the
    /// same commands in the same order, gets those answers again without running the
    /// receptors, and its completion writes nothing and waits for the first one's perspectives
    /// (read-your-writes). A later scope with the same key and another command at some place,
    /// or another number of commands, fails with [`DispatchError::IdempotencyKeyReused`]. A
    /// scope that failed records nothing: a retry runs it again. Within one process the key
    /// is held from the scope's first dispatch until it is completed or dropped, so concurrent
    /// scopes of one key run one after another. Retention follows
    /// `store.dedup_retention_hours`, as for single commands.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Scope {
        self.key = Keying::Given(key.into());
        self
    }

    /// Runs `command`'s receptor and answers its typed result; its events and messages are
    /// written when the scope completes.
    pub async fn local_invoke<C: Command, R: Send + 'static>(
        &mut self,
        command: C,
    ) -> Result<R, DispatchError> {
        self.local_invoke_with(command, DispatchOptions::default())
            .await
    }

    /// [`Scope::local_invoke`] with options (conversation, deadline). An idempotency key is
    /// refused here (`InvalidMessage`): a scope's commands are written as one unit; give the
    /// scope its key ([`Scope::with_idempotency_key`]).
    pub async fn local_invoke_with<C: Command, R: Send + 'static>(
        &mut self,
        command: C,
        options: DispatchOptions,
    ) -> Result<R, DispatchError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let decided = self.dispatch::<C, R>(command, options).await;
        match decided {
            Ok((result, command)) => {
                if let Some(command) = command {
                    self.commands.push(command);
                }
                Ok(result)
            }
            Err(e) => {
                let failed = DispatchError::ScopeFailed {
                    index: self.len(),
                    message_type: C::TYPE_NAME.into(),
                    error: Box::new(e.clone()),
                };
                self.failed = Some(failed);
                Err(e)
            }
        }
    }

    /// Decides `command` (or answers it from the scope's record): its result, and the decided
    /// command to write unless it is a replay.
    async fn dispatch<C: Command, R: Send + 'static>(
        &mut self,
        command: C,
        options: DispatchOptions,
    ) -> Result<(R, Option<ScopedCommand>), DispatchError> {
        if let Keying::Given(key) = &self.key {
            let key = key.clone();
            let (held, record) = self.dispatcher.send(HoldKey(key.clone())).await??;
            self.key = match record {
                None => Keying::Fresh {
                    key,
                    _held: held,
                    hashes: Vec::new(),
                },
                Some(record) => Keying::Replay {
                    record: ScopeRecord::read(&key, &record)?,
                    key,
                    _held: held,
                    appended: record.appended,
                    next: 0,
                },
            };
        }
        let hash = match &self.key {
            Keying::None | Keying::Given(_) => None,
            Keying::Fresh { .. } | Keying::Replay { .. } => {
                let payload =
                    message::encode(&command).map_err(|e| DispatchError::Codec(e.to_string()))?;
                Some(request_hash(C::TYPE_NAME, &payload))
            }
        };
        if let Keying::Replay {
            key, record, next, ..
        } = &mut self.key
        {
            let recorded = record.scope_commands.get(*next);
            let Some(recorded) = recorded.filter(|r| Some(&r.hash) == hash.as_ref()) else {
                return Err(DispatchError::IdempotencyKeyReused { key: key.clone() });
            };
            let result = self
                .dispatcher
                .send(DecodeResult {
                    message_type: C::TYPE_NAME,
                    bytes: recorded.result.clone(),
                })
                .await??;
            *next += 1;
            return Ok((downcast_result::<C, R>(result)?, None));
        }
        let encode = hash.is_some();
        let (result, command) = self
            .dispatcher
            .send(ScopedInvoke {
                command,
                options,
                encode,
            })
            .await??;
        if let (Keying::Fresh { hashes, .. }, Some(hash)) = (&mut self.key, hash) {
            hashes.push(hash);
        }
        Ok((downcast_result::<C, R>(result)?, Some(command)))
    }

    /// The dispatcher the scope dispatches to.
    #[cfg(feature = "web")]
    pub(crate) fn dispatcher(&self) -> &Addr<Dispatcher> {
        &self.dispatcher
    }

    /// How many commands the scope holds, decided (or answered from its record) and waiting to
    /// be written.
    pub fn len(&self) -> usize {
        match &self.key {
            Keying::Replay { next, .. } => *next,
            _ => self.commands.len(),
        }
    }

    /// Whether no command was decided in the scope yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the events and messages of every command of the scope in one store transaction,
    /// then waits for this service's perspectives to apply the events. All or nothing: if a
    /// command of the scope failed when it was dispatched, or one's expected version does not
    /// hold, or the store fails, nothing of the scope is written, and the error
    /// ([`DispatchError::ScopeFailed`]) names the command when one is to blame. A scope with an
    /// idempotency key records its answers in the same transaction; one that replays a
    /// recorded scope writes nothing and answers the recorded receipts.
    pub async fn complete(self) -> Result<ScopeReceipt, DispatchError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let idempotency = match &self.key {
            Keying::Replay {
                key,
                record,
                appended,
                next,
                ..
            } => {
                if *next != record.scope_commands.len() {
                    return Err(DispatchError::IdempotencyKeyReused { key: key.clone() });
                }
                self.dispatcher
                    .send(AwaitRecorded(record.inbox.clone()))
                    .await??;
                let receipts = (0..*next).map(|i| record.receipt(i, appended)).collect();
                return Ok(ScopeReceipt { receipts });
            }
            Keying::Fresh { key, hashes, .. } if !self.commands.is_empty() => {
                Some(record_of(key, hashes, &self.commands)?)
            }
            _ => None,
        };
        if self.commands.is_empty() {
            return Ok(ScopeReceipt {
                receipts: Vec::new(),
            });
        }
        let completed = self
            .dispatcher
            .send(CompleteScope {
                commands: self.commands,
                idempotency,
            })
            .await?;
        match (completed, &self.key) {
            // Another instance recorded the key meanwhile (this process held it): nothing of
            // this scope was written, and a retry answers the other's outcome.
            (Err(DispatchError::IdempotencyKeyReused { .. }), Keying::Fresh { key, .. }) => {
                Err(DispatchError::Unavailable(format!(
                    "idempotency key `{key}` was recorded by another instance while this scope \
                     ran; nothing of it was written: send again"
                )))
            }
            (completed, _) => completed,
        }
    }
}

/// The record of a keyed scope's first outcome.
fn record_of(
    key: &str,
    hashes: &[Vec<u8>],
    commands: &[ScopedCommand],
) -> Result<NewIdempotencyRecord, DispatchError> {
    let scope_commands = commands
        .iter()
        .zip(hashes)
        .map(|(c, hash)| {
            Ok(RecordedCommand {
                hash: hash.clone(),
                message_id: c.receipt.message_id,
                correlation_id: c.receipt.correlation_id,
                stream_id: c.receipt.stream_id.clone(),
                timestamp_us: c.receipt.timestamp_us,
                result: c.encoded.clone().ok_or_else(|| {
                    DispatchError::Codec(format!(
                        "the result of `{}` was not encoded",
                        c.message_type
                    ))
                })?,
                events: c.unit.events.iter().map(|e| e.message_id).collect(),
            })
        })
        .collect::<Result<Vec<_>, DispatchError>>()?;
    let inbox = commands
        .iter()
        .flat_map(|c| c.unit.inbox.iter().map(|r| r.envelope.message_id))
        .collect();
    ScopeRecord {
        scope_commands,
        inbox,
    }
    .record(key)
}

/// Decides one command of a scope (see [`Scope::local_invoke`]); answered with the receptor's
/// result and the command's planned unit (with the result encoded if `encode`).
pub(crate) struct ScopedInvoke<C> {
    pub command: C,
    pub options: DispatchOptions,
    pub encode: bool,
}

impl<C: Command> Message for ScopedInvoke<C> {
    type Result = Result<(Box<dyn Any + Send>, ScopedCommand), DispatchError>;
}

/// Commits the commands of a scope as one unit (see [`Scope::complete`]), with the scope's
/// idempotency record if it has a key.
pub(crate) struct CompleteScope {
    pub commands: Vec<ScopedCommand>,
    pub idempotency: Option<NewIdempotencyRecord>,
}

impl Message for CompleteScope {
    type Result = Result<ScopeReceipt, DispatchError>;
}

/// Holds an idempotency key in this process and looks it up in the store.
pub(crate) struct HoldKey(pub String);

impl Message for HoldKey {
    type Result = Result<(KeyGuard, Option<IdempotencyRecord>), DispatchError>;
}

/// Decodes a recorded result of a receptor of `message_type`.
pub(crate) struct DecodeResult {
    pub message_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Message for DecodeResult {
    type Result = Result<Box<dyn Any + Send>, DispatchError>;
}

/// Waits until the recorded inbox rows of a replayed scope are processed (its perspectives
/// applied).
pub(crate) struct AwaitRecorded(pub Vec<uuid::Uuid>);

impl Message for AwaitRecorded {
    type Result = Result<(), DispatchError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_and_send<T: Send + 'static>() {}

    #[test]
    fn a_scope_is_an_owned_send_value_for_extractors() {
        owned_and_send::<Scope>();
        owned_and_send::<ScopeReceipt>();
    }
}
