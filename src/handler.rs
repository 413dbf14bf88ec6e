//! User handlers and the actors that run them.
//!
//! Owns the two traits users implement — [`Receptor`] (a command → a decision: a typed result,
//! events, follow-on commands) and [`Perspective`] (an event → a read-model update) — their
//! type-erased adapters, and `ReceptorHandle` / `PerspectiveHandle`, which run user code with
//! every panic caught and turned into a failure of that one message, bounded by
//! `coordinator.handler_timeout_ms`. It must not touch the store or decide ordering: partition
//! actors call these handles one message at a time per stream.

use crate::envelope::{Envelope, MessageKind};
use crate::message::{self, CodecError, Command, Event};
use crate::store::ExpectedVersion;
use futures::FutureExt;
use futures::future::BoxFuture;
use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Why a receptor refused a command. Each maps to one HTTP status. Serializable: the refusal
/// of an idempotent command is recorded and answered again to a retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ReceptorError {
    /// The command is malformed or incomplete (400).
    #[error("validation failed: {0}")]
    Validation(String),
    /// A business rule forbids it in the current state (409).
    #[error("business rule conflict: {0}")]
    Conflict(String),
    /// Something it refers to does not exist (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The receptor itself failed (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReceptorError {
    /// The HTTP status an API answers with for this refusal.
    pub fn http_status(&self) -> u16 {
        match self {
            ReceptorError::Validation(_) => 400,
            ReceptorError::Conflict(_) => 409,
            ReceptorError::NotFound(_) => 404,
            ReceptorError::Internal(_) => 500,
        }
    }
}

/// A perspective could not apply an event; the inbox row is retried with backoff and
/// dead-lettered after `max_attempts`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PerspectiveError(pub String);

/// What a receptor knows about the command it handles.
#[derive(Debug, Clone)]
pub struct ReceptorContext {
    /// The command's message id.
    pub message_id: Uuid,
    /// The conversation it belongs to.
    pub correlation_id: Uuid,
    /// The message that caused it; `None` for an original request.
    pub causation_id: Option<Uuid>,
    /// The stream the command was routed by.
    pub stream_id: String,
    /// The envelope's metadata; events the receptor emits inherit it.
    pub metadata: BTreeMap<String, String>,
}

/// What a perspective knows about the event it applies.
#[derive(Debug, Clone)]
pub struct EventMeta {
    /// The event's message id: the key a perspective can deduplicate by.
    pub message_id: Uuid,
    /// The conversation it belongs to.
    pub correlation_id: Uuid,
    /// The command (or event) that caused it.
    pub causation_id: Option<Uuid>,
    /// The stream the event was appended to.
    pub stream_id: String,
    /// When the event was created, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// The event's version in its stream (1-based), for an event of this service's event store;
    /// `None` for an event received from another service (the wire carries no version).
    pub version: Option<u64>,
    /// The event's position in this service's event store (1-based, gap-free); `None` for an
    /// event received from another service.
    pub position: Option<u64>,
}

impl EventMeta {
    /// The metadata of the event in `envelope`, stored at `version` and `position` (when it is
    /// in this service's event store).
    pub(crate) fn of(
        envelope: &Envelope,
        version: Option<u64>,
        position: Option<u64>,
    ) -> EventMeta {
        EventMeta {
            message_id: envelope.message_id,
            correlation_id: envelope.correlation_id,
            causation_id: envelope.causation_id,
            stream_id: envelope.stream_id.clone(),
            timestamp_us: envelope.timestamp_us,
            version,
            position,
        }
    }
}

/// A message a receptor wants written, already encoded.
#[derive(Debug, Clone)]
pub struct Emitted {
    /// Event (appended and applied) or command (sent to its receptor).
    pub kind: MessageKind,
    /// The stable type name ([`crate::Message::TYPE_NAME`]).
    pub message_type: &'static str,
    /// The stream it goes to.
    pub stream_id: String,
    /// The encoded message, or why encoding failed (the whole decision is then refused).
    pub payload: Result<Vec<u8>, String>,
}

/// A receptor's decision: the typed result for the caller, the events to append (in order),
/// follow-on commands, and optional expected versions. All of it is committed atomically, or
/// none of it.
pub struct Decision<R> {
    /// What `local_invoke` returns to the caller.
    pub result: R,
    /// Events to append, in order.
    pub events: Vec<Emitted>,
    /// Follow-on commands, written to the outbox (or handled here) in the same unit.
    pub commands: Vec<Emitted>,
    /// Expected stream versions; a mismatch refuses the whole decision.
    pub expectations: Vec<(String, ExpectedVersion)>,
}

impl<R> Decision<R> {
    /// A decision with a result and nothing to write yet.
    pub fn new(result: R) -> Decision<R> {
        Decision {
            result,
            events: Vec::new(),
            commands: Vec::new(),
            expectations: Vec::new(),
        }
    }

    /// Appends an event to the decision.
    pub fn emit<E: Event>(mut self, event: &E) -> Decision<R> {
        self.events.push(emitted(MessageKind::Event, event));
        self
    }

    /// Adds a follow-on command, dispatched after this decision commits (its causation id is
    /// the command being handled).
    pub fn then_send<C: Command>(mut self, command: &C) -> Decision<R> {
        self.commands.push(emitted(MessageKind::Command, command));
        self
    }

    /// Requires `stream_id` to be at `expected` when the decision commits.
    pub fn expect_version(
        mut self,
        stream_id: impl Into<String>,
        expected: ExpectedVersion,
    ) -> Self {
        self.expectations.push((stream_id.into(), expected));
        self
    }
}

impl<E: Event + Clone> Decision<E> {
    /// The common case: one event that is also the result.
    pub fn event(event: E) -> Decision<E> {
        let emitted = emitted(MessageKind::Event, &event);
        let mut decision = Decision::new(event);
        decision.events.push(emitted);
        decision
    }
}

fn emitted<M: message::Message>(kind: MessageKind, m: &M) -> Emitted {
    Emitted {
        kind,
        message_type: M::TYPE_NAME,
        stream_id: m.stream_id(),
        payload: message::encode(m).map_err(|e| e.to_string()),
    }
}

/// Handles one command type. Exactly one receptor may be registered per command type.
pub trait Receptor<C: Command>: Send + Sync + 'static {
    /// What `local_invoke` returns to the caller. Serializable: the first outcome of a
    /// command dispatched with an idempotency key is recorded and answered again to a retry.
    type Result: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;

    /// Decides what the command does. Returning an error writes nothing.
    fn handle(
        &self,
        command: C,
        ctx: ReceptorContext,
    ) -> impl Future<Output = Result<Decision<Self::Result>, ReceptorError>> + Send;
}

/// Applies one event type to a read model. Any number may be registered per event type; each
/// sees a stream's events in order.
pub trait Perspective<E: Event>: Send + Sync + 'static {
    /// Applies one event. An error is retried with backoff and dead-lettered after
    /// `store.max_attempts`; the stream's later events wait behind it.
    fn apply(
        &self,
        event: E,
        meta: EventMeta,
    ) -> impl Future<Output = Result<(), PerspectiveError>> + Send;
}

/// A decision with its result type erased, on its way through the actors.
pub(crate) struct ErasedDecision {
    pub result: Box<dyn Any + Send>,
    pub events: Vec<Emitted>,
    pub commands: Vec<Emitted>,
    pub expectations: Vec<(String, ExpectedVersion)>,
}

/// Why running a receptor failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ReceptorFailure {
    #[error(transparent)]
    Rejected(ReceptorError),
    #[error("handler panicked: {0}")]
    Panicked(String),
    #[error("handler timed out after {0} ms (coordinator.handler_timeout_ms)")]
    TimedOut(u64),
    #[error("{0}")]
    Decode(String),
}

/// Why applying an event to a perspective failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HandlerFailure {
    #[error("handler panicked: {0}")]
    Panicked(String),
    #[error("handler timed out after {0} ms (coordinator.handler_timeout_ms)")]
    TimedOut(u64),
    #[error(transparent)]
    Perspective(PerspectiveError),
    #[error("{0}")]
    Decode(String),
}

/// The failures that a panic in user code, or user code past its deadline, becomes.
pub(crate) trait GuardFailure {
    fn panicked(message: String) -> Self;
    fn timed_out(after_ms: u64) -> Self;
}

impl GuardFailure for ReceptorFailure {
    fn panicked(message: String) -> Self {
        ReceptorFailure::Panicked(message)
    }

    fn timed_out(after_ms: u64) -> Self {
        ReceptorFailure::TimedOut(after_ms)
    }
}

impl GuardFailure for HandlerFailure {
    fn panicked(message: String) -> Self {
        HandlerFailure::Panicked(message)
    }

    fn timed_out(after_ms: u64) -> Self {
        HandlerFailure::TimedOut(after_ms)
    }
}

pub(crate) trait ErasedReceptor: Send + Sync + 'static {
    fn invoke(
        &self,
        envelope: &Envelope,
        typed: Option<Box<dyn Any + Send>>,
        ctx: ReceptorContext,
    ) -> BoxFuture<'static, Result<ErasedDecision, ReceptorFailure>>;

    /// Encodes a result this receptor returned (an [`ErasedDecision::result`]).
    fn encode_result(&self, result: &(dyn Any + Send)) -> Result<Vec<u8>, String>;

    /// Decodes a result [`ErasedReceptor::encode_result`] encoded.
    fn decode_result(&self, bytes: &[u8]) -> Result<Box<dyn Any + Send>, String>;
}

pub(crate) struct ReceptorAdapter<C, R> {
    receptor: Arc<R>,
    _command: PhantomData<fn(C)>,
}

impl<C, R> ReceptorAdapter<C, R> {
    pub(crate) fn new(receptor: R) -> Self {
        ReceptorAdapter {
            receptor: Arc::new(receptor),
            _command: PhantomData,
        }
    }
}

impl<C: Command, R: Receptor<C>> ErasedReceptor for ReceptorAdapter<C, R> {
    fn invoke(
        &self,
        envelope: &Envelope,
        typed: Option<Box<dyn Any + Send>>,
        ctx: ReceptorContext,
    ) -> BoxFuture<'static, Result<ErasedDecision, ReceptorFailure>> {
        let command: Result<C, CodecError> = match typed.map(|b| b.downcast::<C>()) {
            Some(Ok(c)) => Ok(*c),
            _ => message::decode::<C>(&envelope.payload),
        };
        let receptor = self.receptor.clone();
        async move {
            let command = command.map_err(|e| ReceptorFailure::Decode(e.to_string()))?;
            let decision = receptor
                .handle(command, ctx)
                .await
                .map_err(ReceptorFailure::Rejected)?;
            Ok(ErasedDecision {
                result: Box::new(decision.result),
                events: decision.events,
                commands: decision.commands,
                expectations: decision.expectations,
            })
        }
        .boxed()
    }

    fn encode_result(&self, result: &(dyn Any + Send)) -> Result<Vec<u8>, String> {
        let result = result
            .downcast_ref::<R::Result>()
            .ok_or_else(|| format!("the result of `{}` is not its receptor's", C::TYPE_NAME))?;
        let mut bytes = Vec::with_capacity(64);
        rmp_serde::encode::write_named(&mut bytes, result)
            .map_err(|e| format!("cannot encode the result of `{}`: {e}", C::TYPE_NAME))?;
        Ok(bytes)
    }

    fn decode_result(&self, bytes: &[u8]) -> Result<Box<dyn Any + Send>, String> {
        rmp_serde::from_slice::<R::Result>(bytes)
            .map(|r| Box::new(r) as Box<dyn Any + Send>)
            .map_err(|e| {
                format!(
                    "cannot decode the recorded result of `{}`: {e}",
                    C::TYPE_NAME
                )
            })
    }
}

pub(crate) trait ErasedPerspective: Send + Sync + 'static {
    fn apply(
        &self,
        envelope: &Envelope,
        meta: EventMeta,
    ) -> BoxFuture<'static, Result<(), HandlerFailure>>;
}

pub(crate) struct PerspectiveAdapter<E, P> {
    perspective: Arc<P>,
    _event: PhantomData<fn(E)>,
}

impl<E, P> PerspectiveAdapter<E, P> {
    pub(crate) fn new(perspective: P) -> Self {
        PerspectiveAdapter {
            perspective: Arc::new(perspective),
            _event: PhantomData,
        }
    }
}

impl<E: Event, P: Perspective<E>> ErasedPerspective for PerspectiveAdapter<E, P> {
    fn apply(
        &self,
        envelope: &Envelope,
        meta: EventMeta,
    ) -> BoxFuture<'static, Result<(), HandlerFailure>> {
        let event = message::decode::<E>(&envelope.payload);
        let perspective = self.perspective.clone();
        async move {
            let event = event.map_err(|e| HandlerFailure::Decode(e.to_string()))?;
            perspective
                .apply(event, meta)
                .await
                .map_err(HandlerFailure::Perspective)
        }
        .boxed()
    }
}

/// Turns a panic payload into its message.
pub(crate) fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".into()
    }
}

/// Runs user code with its panics caught and its run bounded by `timeout` (dropped past it).
pub(crate) async fn guarded<T, F: GuardFailure>(
    fut: BoxFuture<'_, Result<T, F>>,
    timeout: Duration,
) -> Result<T, F> {
    match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(result)) => result,
        Ok(Err(payload)) => Err(F::panicked(panic_message(payload))),
        Err(_) => Err(F::timed_out(timeout.as_millis() as u64)),
    }
}

/// A registered receptor, run by the partition actor of the command's stream. Calls run
/// concurrently (ordering is the partition actor's job); a panic in user code becomes
/// [`ReceptorFailure::Panicked`] for that one call, and a run past the timeout
/// [`ReceptorFailure::TimedOut`]. It is a handle, not an actor: a mailbox hop here would
/// serialize nothing (the partition actor already orders the calls) and cost two hops a command.
#[derive(Clone)]
pub(crate) struct ReceptorHandle {
    receptor: Arc<dyn ErasedReceptor>,
    /// `coordinator.handler_timeout_ms`.
    timeout: Duration,
}

/// The receptor's run on one command, guarded against panics and bounded by the timeout.
pub(crate) type InvokeRun = BoxFuture<'static, Result<ErasedDecision, ReceptorFailure>>;

impl ReceptorHandle {
    pub(crate) fn new(receptor: Arc<dyn ErasedReceptor>, timeout: Duration) -> Self {
        ReceptorHandle { receptor, timeout }
    }

    /// Runs the receptor on `envelope` (`typed`: the command itself when it was never encoded).
    pub(crate) fn invoke(
        &self,
        envelope: &Envelope,
        typed: Option<Box<dyn Any + Send>>,
    ) -> InvokeRun {
        let ctx = ReceptorContext {
            message_id: envelope.message_id,
            correlation_id: envelope.correlation_id,
            causation_id: envelope.causation_id,
            stream_id: envelope.stream_id.clone(),
            metadata: envelope.metadata.clone(),
        };
        // Building the future may run user code too (a non-async `handle`): guard it as well.
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.receptor.invoke(envelope, typed, ctx)
        })) {
            Ok(fut) => Box::pin(guarded(fut, self.timeout)),
            Err(payload) => {
                let message = panic_message(payload);
                Box::pin(async move { Err(ReceptorFailure::Panicked(message)) })
            }
        }
    }
}

/// A registered perspective, run by the partition actor of the event's stream (or by a replay).
/// Calls for different streams run concurrently; a panic becomes [`HandlerFailure::Panicked`]
/// for that one event. A handle, not an actor, for the reason given on [`ReceptorHandle`].
#[derive(Clone)]
pub(crate) struct PerspectiveHandle {
    perspective: Arc<dyn ErasedPerspective>,
    /// `coordinator.handler_timeout_ms`.
    timeout: Duration,
}

/// The perspective's run on one event, guarded against panics and bounded by the timeout.
pub(crate) type ApplyRun = BoxFuture<'static, Result<(), HandlerFailure>>;

impl PerspectiveHandle {
    pub(crate) fn new(perspective: Arc<dyn ErasedPerspective>, timeout: Duration) -> Self {
        PerspectiveHandle {
            perspective,
            timeout,
        }
    }

    /// Applies the event in `envelope`, described by `meta`.
    pub(crate) fn apply(&self, envelope: &Envelope, meta: EventMeta) -> ApplyRun {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.perspective.apply(envelope, meta)))
        {
            Ok(fut) => Box::pin(guarded(fut, self.timeout)),
            Err(payload) => {
                let message = panic_message(payload);
                Box::pin(async move { Err(HandlerFailure::Panicked(message)) })
            }
        }
    }
}
