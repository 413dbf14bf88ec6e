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
//! kept in the application data and hand it to the handler by value:
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

use crate::dispatcher::{DeliveryReceipt, DispatchOptions, Dispatcher};
use crate::error::DispatchError;
use crate::message::Command;
use crate::store::UnitOfWork;
use actix::prelude::*;
use std::any::Any;

/// A request scope: commands decided now, written together by [`Scope::complete`]. See the
/// module docs for the intended use.
pub struct Scope {
    dispatcher: Addr<Dispatcher>,
    commands: Vec<ScopedCommand>,
    /// The first dispatch of the scope that failed: the scope can no longer complete.
    failed: Option<DispatchError>,
}

/// One decided command of a scope.
pub(crate) struct ScopedCommand {
    pub message_type: &'static str,
    /// Its receipt, whose events are filled in when the scope completes.
    pub receipt: DeliveryReceipt,
    pub unit: UnitOfWork,
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
        }
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
    /// refused here (`InvalidMessage`): a scope's commands are written as one unit, and a key
    /// belongs to one command's own.
    pub async fn local_invoke_with<C: Command, R: Send + 'static>(
        &mut self,
        command: C,
        options: DispatchOptions,
    ) -> Result<R, DispatchError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let answer = match self
            .dispatcher
            .send(ScopedInvoke { command, options })
            .await
        {
            Ok(answer) => answer,
            Err(mailbox) => Err(mailbox.into()),
        };
        let decided = answer.and_then(|(result, command)| {
            let result =
                result
                    .downcast::<R>()
                    .map(|r| *r)
                    .map_err(|_| DispatchError::ResultType {
                        message_type: C::TYPE_NAME.into(),
                        expected: std::any::type_name::<R>(),
                    })?;
            Ok((result, command))
        });
        match decided {
            Ok((result, command)) => {
                self.commands.push(command);
                Ok(result)
            }
            Err(e) => {
                let failed = DispatchError::ScopeFailed {
                    index: self.commands.len(),
                    message_type: C::TYPE_NAME.into(),
                    error: Box::new(e.clone()),
                };
                self.failed = Some(failed);
                Err(e)
            }
        }
    }

    /// How many commands the scope holds, decided and waiting to be written.
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether no command was decided in the scope yet.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Writes the events and messages of every command of the scope in one store transaction,
    /// then waits for this service's perspectives to apply the events. All or nothing: if a
    /// command of the scope failed when it was dispatched, or one's expected version does not
    /// hold, or the store fails, nothing of the scope is written, and the error
    /// ([`DispatchError::ScopeFailed`]) names the command when one is to blame.
    pub async fn complete(self) -> Result<ScopeReceipt, DispatchError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.commands.is_empty() {
            return Ok(ScopeReceipt {
                receipts: Vec::new(),
            });
        }
        self.dispatcher
            .send(CompleteScope {
                commands: self.commands,
            })
            .await?
    }
}

/// Decides one command of a scope (see [`Scope::local_invoke`]); answered with the receptor's
/// result and the command's planned unit.
pub(crate) struct ScopedInvoke<C> {
    pub command: C,
    pub options: DispatchOptions,
}

impl<C: Command> Message for ScopedInvoke<C> {
    type Result = Result<(Box<dyn Any + Send>, ScopedCommand), DispatchError>;
}

/// Commits the commands of a scope as one unit (see [`Scope::complete`]).
pub(crate) struct CompleteScope {
    pub commands: Vec<ScopedCommand>,
}

impl Message for CompleteScope {
    type Result = Result<ScopeReceipt, DispatchError>;
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
