//! The dispatcher actor: the public entry point, with the seed's three patterns.
//!
//! - [`SendCommand`]: handle a command and return a [`DeliveryReceipt`] once its effects are
//!   committed (`Delivered`), or once it is stored in the outbox for a remote receptor
//!   (`Accepted`). Perspectives run afterwards, asynchronously.
//! - [`LocalInvoke`]: handle a command and return the receptor's typed result only after its
//!   events are committed (event store + outbox, atomically) and every perspective registered
//!   for them has run: read-your-writes.
//! - [`PublishEvent`]: append an event and send it to its perspectives and the outbox.
//!
//! A command dispatched with [`DispatchOptions::idempotency_key`] runs once: a repeat answers
//! the recorded first outcome (see `idempotency`). The commands of a request scope
//! ([`crate::Scope`]) are decided here too, their units collected by the scope and committed
//! as one when it completes.
//!
//! Owns envelope creation (UUIDv7 id, correlation, causation, hops) and routing a command to the
//! partition actor of its stream. It must not run handlers or wait inside its own mailbox: each
//! call is a future of its own, so calls on different streams proceed concurrently.

use crate::admission::Admission;
use crate::envelope::{Envelope, MessageKind};
use crate::error::DispatchError;
use crate::idempotency::{KeyGuard, KeyLocks, Keyed, Outcome};
use crate::message::{self, Command, Event};
use crate::partition::{CommandJob, CommandOutcome, Decided, Job, ScopedJob};
use crate::protocol::{AwaitProcessed, Commit, commit};
use crate::registry::RegistryView;
use crate::routing::{Origin, add_message};
use crate::scope::{
    AwaitRecorded, CompleteScope, DecodeResult, HoldKey, ScopeReceipt, ScopedCommand, ScopedInvoke,
};
use crate::store::{
    AppendedEvent, CorrelationStatus, ExpectedVersion, IdempotencyRecord, NewIdempotencyRecord,
    Store, UnitOfWork,
};
use crate::supervision::EngineCell;
use crate::telemetry::DispatchMeters;
use crate::telemetry::traces;
use actix::prelude::*;
use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Span;
use uuid::Uuid;

/// Tracing context, deadline and idempotency key of a dispatch: continue an existing
/// conversation, or start a new one.
#[derive(Debug, Clone, Default)]
pub struct DispatchOptions {
    /// How long the caller waits, for room under `runtime.max_in_flight` and for the answer;
    /// `None`: `runtime.dispatch_timeout_ms`.
    pub deadline: Option<Duration>,
    /// The conversation to continue; a new one (the message's own id) when `None`.
    pub correlation_id: Option<Uuid>,
    /// The message that caused this one; `None` for an original request.
    pub causation_id: Option<Uuid>,
    /// Free-form key/value pairs carried in the envelope to every message this one causes.
    pub metadata: BTreeMap<String, String>,
    /// A caller-chosen key that makes a command idempotent (`local_invoke` and `send`; an
    /// HTTP service maps its `Idempotency-Key` header here). The first dispatch with a key
    /// runs and its outcome is recorded with its effects, in the same store transaction: its
    /// result and receipt, or the receptor's refusal. A later dispatch with the same key and
    /// the same command (type and body) answers that outcome again without running the
    /// receptor (a replayed `local_invoke` still waits for the first one's perspectives); with
    /// another command it is refused with [`DispatchError::IdempotencyKeyReused`] (HTTP 422;
    /// commands are compared by a SHA-256 of their type and encoded body, so a command sent
    /// with keys should not hold fields whose encoding varies, such as a `HashMap`).
    /// Dispatches of one key run one after another in this process. Keys are kept for
    /// `store.dedup_retention_hours` (durably on Postgres, for the life of the process in
    /// memory). A version conflict, timeout, panic or store failure records nothing: retrying
    /// with the same key is safe after any error, a lost commit answer included. `None`: no
    /// key, every dispatch runs.
    pub idempotency_key: Option<String>,
}

impl DispatchOptions {
    /// Continue the conversation of `cause`: same correlation id, `cause` as the causation.
    ///
    /// ```
    /// use uuid::Uuid;
    /// use whizbang::DispatchOptions;
    ///
    /// let (conversation, cause) = (Uuid::now_v7(), Uuid::now_v7());
    /// let options = DispatchOptions::caused_by(conversation, cause);
    /// assert_eq!(options.correlation_id, Some(conversation));
    /// assert_eq!(options.causation_id, Some(cause));
    /// // runtime.local_invoke_with(command, options) or SendCommand::new(command).with_options(options)
    /// ```
    pub fn caused_by(correlation_id: Uuid, causation_id: Uuid) -> DispatchOptions {
        DispatchOptions {
            correlation_id: Some(correlation_id),
            causation_id: Some(causation_id),
            ..DispatchOptions::default()
        }
    }

    /// Options with this idempotency key (see [`DispatchOptions::idempotency_key`]).
    ///
    /// ```
    /// use whizbang::DispatchOptions;
    ///
    /// let options = DispatchOptions::idempotent("order-7-create");
    /// assert_eq!(options.idempotency_key.as_deref(), Some("order-7-create"));
    /// // runtime.local_invoke_with(command, options): a retry with the same key answers the
    /// // first outcome without running the receptor again.
    /// ```
    pub fn idempotent(key: impl Into<String>) -> DispatchOptions {
        DispatchOptions {
            idempotency_key: Some(key.into()),
            ..DispatchOptions::default()
        }
    }
}

/// Whether the receipt means "handled here and committed" or "queued for a remote receptor".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// A local receptor handled the command and its events are committed.
    Delivered,
    /// The message is committed to the outbox and will reach its destination.
    Accepted,
}

/// What `send` and `publish` return.
#[derive(Debug, Clone)]
pub struct DeliveryReceipt {
    /// The id of the dispatched message (UUIDv7).
    pub message_id: Uuid,
    /// The conversation it belongs to; [`crate::Runtime::status`] reports on it.
    pub correlation_id: Uuid,
    /// The stream the message was written to.
    pub stream_id: String,
    /// When the envelope was created, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// Handled here, or queued in the outbox for a remote receptor.
    pub status: ReceiptStatus,
    /// Events committed by this dispatch.
    pub events: Vec<AppendedEvent>,
}

impl DeliveryReceipt {
    fn of(envelope: &Envelope, status: ReceiptStatus, events: Vec<AppendedEvent>) -> Self {
        DeliveryReceipt {
            message_id: envelope.message_id,
            correlation_id: envelope.correlation_id,
            stream_id: envelope.stream_id.clone(),
            timestamp_us: envelope.timestamp_us,
            status,
            events,
        }
    }
}

/// Handle a command and wait for its typed result and its perspectives.
pub struct LocalInvoke<C, R> {
    /// The command to handle.
    pub command: C,
    /// Correlation, causation and metadata.
    pub options: DispatchOptions,
    /// The caller's span when the message was made: the dispatch span's parent.
    parent: Span,
    _result: PhantomData<fn() -> R>,
}

impl<C, R> LocalInvoke<C, R> {
    /// A new conversation with default options.
    pub fn new(command: C) -> Self {
        LocalInvoke {
            command,
            options: DispatchOptions::default(),
            parent: Span::current(),
            _result: PhantomData,
        }
    }

    /// Dispatches with these options (e.g. [`DispatchOptions::caused_by`]).
    pub fn with_options(mut self, options: DispatchOptions) -> Self {
        self.options = options;
        self
    }
}

impl<C: Command, R: Send + 'static> Message for LocalInvoke<C, R> {
    type Result = Result<R, DispatchError>;
}

/// Handle (or forward) a command and return a receipt.
pub struct SendCommand<C> {
    /// The command to handle or forward.
    pub command: C,
    /// Correlation, causation and metadata.
    pub options: DispatchOptions,
    /// The caller's span when the message was made: the dispatch span's parent.
    parent: Span,
}

impl<C> SendCommand<C> {
    /// A new conversation with default options.
    pub fn new(command: C) -> Self {
        SendCommand {
            command,
            options: DispatchOptions::default(),
            parent: Span::current(),
        }
    }

    /// Dispatches with these options (e.g. [`DispatchOptions::caused_by`]).
    pub fn with_options(mut self, options: DispatchOptions) -> Self {
        self.options = options;
        self
    }
}

impl<C: Command> Message for SendCommand<C> {
    type Result = Result<DeliveryReceipt, DispatchError>;
}

/// Append an event and send it to its perspectives and the outbox.
pub struct PublishEvent<E> {
    /// The event to append to its stream.
    pub event: E,
    /// Correlation, causation and metadata.
    pub options: DispatchOptions,
    /// The caller's span when the message was made: the dispatch span's parent.
    parent: Span,
}

impl<E> PublishEvent<E> {
    /// A new conversation with default options.
    pub fn new(event: E) -> Self {
        PublishEvent {
            event,
            options: DispatchOptions::default(),
            parent: Span::current(),
        }
    }
}

impl<E: Event> Message for PublishEvent<E> {
    type Result = Result<DeliveryReceipt, DispatchError>;
}

/// Everything the store knows about what one request caused.
pub struct Status(pub Uuid);

impl Message for Status {
    type Result = Result<CorrelationStatus, DispatchError>;
}

/// The dispatcher actor: the public entry for [`SendCommand`], [`LocalInvoke`],
/// [`PublishEvent`] and [`Status`]. It builds the envelope (UUIDv7 message id, correlation,
/// causation, first hop), looks the message type up in the registry and hands the work to the
/// partition of its stream. Get its address from [`crate::Runtime::dispatcher`].
pub struct Dispatcher {
    origin: Origin,
    registry: RegistryView,
    /// Read when the work is handed over: the engine may have been restarted meanwhile.
    engine: EngineCell,
    store: Arc<dyn Store>,
    admission: Admission,
    /// One dispatch at a time per idempotency key.
    keys: KeyLocks,
    /// `whizbang_dispatches_total` per message type, registered the first time it is seen.
    dispatched: HashMap<&'static str, DispatchMeters>,
}

impl Dispatcher {
    pub(crate) fn new(
        origin: Origin,
        registry: RegistryView,
        engine: EngineCell,
        store: Arc<dyn Store>,
        admission: Admission,
    ) -> Dispatcher {
        Dispatcher {
            origin,
            registry,
            engine,
            store,
            admission,
            keys: KeyLocks::default(),
            dispatched: HashMap::new(),
        }
    }

    /// [`Admission::admit`], counting the dispatch under `message_type` (its counters are
    /// registered the first time the type is dispatched; afterwards a look-up in this actor's
    /// own map: no lock, no allocation).
    fn admit<T: 'static>(
        &mut self,
        message_type: &'static str,
        deadline: Option<Duration>,
        start: impl FnOnce() -> ResponseFuture<Result<T, DispatchError>> + 'static,
    ) -> ResponseFuture<Result<T, DispatchError>> {
        let meters = &self.admission.meters;
        let counted = self
            .dispatched
            .entry(message_type)
            .or_insert_with(|| meters.dispatch(message_type))
            .clone();
        self.admission.admit(message_type, counted, deadline, start)
    }

    /// The envelope of a dispatched message, with the dispatch span's context written into
    /// its metadata when `carries_trace` (it is stored or sent, and the next step continues
    /// from there). A command for a local receptor does not: the receptor span is the dispatch
    /// span's child in this process, and writes its own context (see `partition`).
    #[allow(clippy::too_many_arguments)]
    fn envelope(
        &self,
        kind: MessageKind,
        message_type: &str,
        stream_id: String,
        payload: Vec<u8>,
        options: DispatchOptions,
        span: &Span,
        carries_trace: bool,
    ) -> Envelope {
        let mut envelope = Envelope::new(kind, message_type, stream_id, payload);
        if let Some(c) = options.correlation_id {
            envelope.correlation_id = c;
        }
        envelope.causation_id = options.causation_id;
        envelope.metadata = options.metadata;
        envelope.push_hop(self.origin.hop(&envelope.stream_id, None));
        if !span.is_disabled() {
            traces::record_dispatch(span, &envelope, self.origin.partition(&envelope.stream_id));
            if carries_trace {
                traces::stamp(span, &mut envelope.metadata);
            }
        }
        envelope
    }

    /// A command for its stream's partition actor: the receipt, a `queue` that hands it over
    /// (run once there is room), and the receiver that answers when it is done.
    fn run_locally<C: Command>(
        &self,
        command: C,
        options: DispatchOptions,
        wait: bool,
        keyed: Option<Keyed>,
        span: &Span,
    ) -> (
        DeliveryReceipt,
        impl FnOnce() + 'static,
        oneshot::Receiver<Result<CommandOutcome, DispatchError>>,
    ) {
        let deadline = options.deadline.unwrap_or(self.admission.default_deadline);
        let give_up_at = Instant::now() + deadline;
        // The payload is encoded only if the command itself must be stored (outbox/inbox):
        // a local receptor gets the typed value.
        let envelope = self.envelope(
            MessageKind::Command,
            C::TYPE_NAME,
            command.stream_id(),
            Vec::new(),
            options,
            span,
            false,
        );
        let (reply, rx) = oneshot::channel();
        // The receipt is taken now (its events are filled in once committed): the envelope
        // itself moves on to the partition actor, uncopied.
        let receipt = DeliveryReceipt::of(&envelope, ReceiptStatus::Delivered, Vec::new());
        let engine = self.engine.clone();
        let partition = self.origin.partition(&envelope.stream_id);
        let span = span.clone();
        let queue = move || {
            engine.partitions().enqueue(
                partition,
                Job::Command(CommandJob {
                    envelope,
                    typed: Some(Box::new(command)),
                    wait,
                    keyed,
                    give_up_at,
                    deadline,
                    reply,
                    span,
                }),
            )
        };
        (receipt, queue, rx)
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(4096);
    }
}

/// `work` inside `span` (as it is when nobody wants the span: no wrapper, no allocation).
fn traced<T: 'static>(span: Span, work: ResponseFuture<T>) -> ResponseFuture<T> {
    if span.is_disabled() {
        work
    } else {
        Box::pin(tracing::Instrument::instrument(work, span))
    }
}

fn gone<E>(_: E) -> DispatchError {
    DispatchError::Unavailable("partition actor stopped".into())
}

impl<C: Command, R: Send + 'static> Handler<LocalInvoke<C, R>> for Dispatcher {
    type Result = ResponseFuture<Result<R, DispatchError>>;

    fn handle(&mut self, msg: LocalInvoke<C, R>, _ctx: &mut Self::Context) -> Self::Result {
        let span = traces::dispatch(
            &msg.parent,
            &self.origin.sampler,
            "local_invoke",
            C::TYPE_NAME,
        );
        traced(span.clone(), self.local_invoke(msg, &span))
    }
}

impl Dispatcher {
    fn local_invoke<C: Command, R: Send + 'static>(
        &mut self,
        msg: LocalInvoke<C, R>,
        span: &Span,
    ) -> ResponseFuture<Result<R, DispatchError>> {
        if self.registry.current().receptor(C::TYPE_NAME).is_none() {
            return Box::pin(async {
                Err(DispatchError::HandlerNotFound {
                    message_type: C::TYPE_NAME.into(),
                })
            });
        }
        let deadline = msg.options.deadline;
        if let Some(key) = msg.options.idempotency_key.clone() {
            let keyed = match keyed_command(key, &msg.command) {
                Ok(k) => k,
                Err(e) => return Box::pin(async move { Err(e) }),
            };
            let (_, queue, rx) =
                self.run_locally(msg.command, msg.options, true, Some(keyed.clone()), span);
            let (keys, store) = (self.keys.clone(), self.store.clone());
            let (registry, engine) = (self.registry.clone(), self.engine.clone());
            return self.admit(C::TYPE_NAME, deadline, move || {
                Box::pin(async move {
                    let run = async move {
                        queue();
                        rx.await.map_err(gone)?
                    };
                    match once_per_key(keys, store, keyed, run).await? {
                        KeyedAnswer::Ran(outcome) => typed_result::<C, R>(outcome),
                        KeyedAnswer::Replayed(outcome, _) => {
                            replayed_result::<C, R>(&registry, &engine.awaits(), outcome).await
                        }
                    }
                })
            });
        }
        let (_, queue, rx) = self.run_locally(msg.command, msg.options, true, None, span);
        self.admit(C::TYPE_NAME, deadline, move || {
            queue();
            Box::pin(async move { typed_result::<C, R>(rx.await.map_err(gone)??) })
        })
    }
}

/// The key of a keyed dispatch with the hash of its command.
fn keyed_command<C: Command>(key: String, command: &C) -> Result<Keyed, DispatchError> {
    let payload = message::encode(command).map_err(|e| DispatchError::Codec(e.to_string()))?;
    Ok(Keyed::new(key, C::TYPE_NAME, &payload))
}

/// A handled command's typed result. The partition answers once the perspectives of its
/// events have run (see `partition::applied`), so nothing is left to wait for here.
fn typed_result<C: Command, R: 'static>(outcome: CommandOutcome) -> Result<R, DispatchError> {
    downcast_result::<C, R>(outcome.result)
}

/// A receptor's result as the type its caller asked for.
pub(crate) fn downcast_result<C: Command, R: 'static>(
    result: Box<dyn std::any::Any + Send>,
) -> Result<R, DispatchError> {
    result
        .downcast::<R>()
        .map(|r| *r)
        .map_err(|_| DispatchError::ResultType {
            message_type: C::TYPE_NAME.into(),
            expected: std::any::type_name::<R>(),
        })
}

/// The typed result a keyed `local_invoke` answered the first time, once the perspectives of
/// the first dispatch's events have run (read-your-writes, as the first answer promised); or
/// the refusal it answered.
async fn replayed_result<C: Command, R: 'static>(
    registry: &RegistryView,
    coordinator: &Recipient<AwaitProcessed>,
    outcome: Outcome,
) -> Result<R, DispatchError> {
    let (result, inbox) = match outcome {
        Outcome::Done { result, inbox, .. } => (result, inbox),
        Outcome::Rejected {
            message_type,
            error,
        } => {
            return Err(DispatchError::Rejected {
                message_type,
                error,
            });
        }
    };
    let Some(bytes) = result else {
        return Err(DispatchError::ResultType {
            message_type: C::TYPE_NAME.into(),
            expected: std::any::type_name::<R>(),
        });
    };
    let value = decode_result(registry, C::TYPE_NAME, &bytes)?;
    await_processed(coordinator, inbox).await?;
    downcast_result::<C, R>(value)
}

/// What a keyed dispatch ends with.
enum KeyedAnswer<T> {
    /// It ran: its own answer.
    Ran(T),
    /// A dispatch of the same key and command ran before: its recorded outcome, with the
    /// events its unit appended.
    Replayed(Outcome, Vec<AppendedEvent>),
}

/// Runs `run` (the dispatch, started when first polled) under the key's lock unless the key is
/// recorded; answers the record if it is, or if a concurrent dispatch elsewhere recorded it
/// first (the unit comes back with the key taken and wrote nothing).
async fn once_per_key<T>(
    keys: KeyLocks,
    store: Arc<dyn Store>,
    keyed: Keyed,
    run: impl Future<Output = Result<T, DispatchError>>,
) -> Result<KeyedAnswer<T>, DispatchError> {
    let _one_at_a_time = keys.lock(&keyed.key).await;
    if let Some(record) = store.idempotency_record(&keyed.key).await? {
        let (outcome, appended) = keyed.replay(record)?;
        return Ok(KeyedAnswer::Replayed(outcome, appended));
    }
    match run.await {
        Err(DispatchError::IdempotencyKeyReused { .. }) => {
            match store.idempotency_record(&keyed.key).await? {
                Some(record) => {
                    let (outcome, appended) = keyed.replay(record)?;
                    Ok(KeyedAnswer::Replayed(outcome, appended))
                }
                // Taken by a unit that then gave it back (a version conflict in the same batch):
                // nothing is recorded, so sending again runs the command.
                None => Err(DispatchError::Unavailable(format!(
                    "idempotency key `{}` was held by a dispatch that did not commit; send again",
                    keyed.key
                ))),
            }
        }
        answer => answer.map(KeyedAnswer::Ran),
    }
}

impl<C: Command> Handler<SendCommand<C>> for Dispatcher {
    type Result = ResponseFuture<Result<DeliveryReceipt, DispatchError>>;

    fn handle(&mut self, msg: SendCommand<C>, _ctx: &mut Self::Context) -> Self::Result {
        let span = traces::dispatch(&msg.parent, &self.origin.sampler, "send", C::TYPE_NAME);
        traced(span.clone(), self.send_command(msg, &span))
    }
}

impl Dispatcher {
    fn send_command<C: Command>(
        &mut self,
        msg: SendCommand<C>,
        span: &Span,
    ) -> ResponseFuture<Result<DeliveryReceipt, DispatchError>> {
        let table = self.registry.current();
        let deadline = msg.options.deadline;
        let keyed = match msg.options.idempotency_key.clone() {
            Some(key) => match keyed_command(key, &msg.command) {
                Ok(k) => Some(k),
                Err(e) => return Box::pin(async move { Err(e) }),
            },
            None => None,
        };
        if table.receptor(C::TYPE_NAME).is_some() {
            let (mut receipt, queue, rx) =
                self.run_locally(msg.command, msg.options, false, keyed.clone(), span);
            if let Some(keyed) = keyed {
                let (keys, store) = (self.keys.clone(), self.store.clone());
                return self.admit(C::TYPE_NAME, deadline, move || {
                    Box::pin(async move {
                        let run = async move {
                            queue();
                            rx.await.map_err(gone)?
                        };
                        match once_per_key(keys, store, keyed, run).await? {
                            KeyedAnswer::Ran(outcome) => {
                                receipt.events = outcome.appended;
                                Ok(receipt)
                            }
                            KeyedAnswer::Replayed(outcome, appended) => outcome.receipt(appended),
                        }
                    })
                });
            }
            return self.admit(C::TYPE_NAME, deadline, move || {
                queue();
                Box::pin(async move {
                    receipt.events = rx.await.map_err(gone)??.appended;
                    Ok(receipt)
                })
            });
        }
        if table.topic(C::TYPE_NAME).is_none() {
            return Box::pin(async {
                Err(DispatchError::HandlerNotFound {
                    message_type: C::TYPE_NAME.into(),
                })
            });
        }
        // A remote receptor: the command itself goes to the outbox.
        let payload = match message::encode(&msg.command) {
            Ok(p) => p,
            Err(e) => return Box::pin(async move { Err(DispatchError::Codec(e.to_string())) }),
        };
        let envelope = self.envelope(
            MessageKind::Command,
            C::TYPE_NAME,
            msg.command.stream_id(),
            payload,
            msg.options,
            span,
            true,
        );
        match keyed {
            Some(keyed) => self.commit_keyed_admitted(C::TYPE_NAME, deadline, envelope, keyed),
            None => self.commit_one_admitted(C::TYPE_NAME, deadline, envelope),
        }
    }
}

impl<E: Event> Handler<PublishEvent<E>> for Dispatcher {
    type Result = ResponseFuture<Result<DeliveryReceipt, DispatchError>>;

    fn handle(&mut self, msg: PublishEvent<E>, _ctx: &mut Self::Context) -> Self::Result {
        let payload = match message::encode(&msg.event) {
            Ok(p) => p,
            Err(e) => return Box::pin(async move { Err(DispatchError::Codec(e.to_string())) }),
        };
        let deadline = msg.options.deadline;
        let span = traces::dispatch(&msg.parent, &self.origin.sampler, "publish", E::TYPE_NAME);
        let envelope = self.envelope(
            MessageKind::Event,
            E::TYPE_NAME,
            msg.event.stream_id(),
            payload,
            msg.options,
            &span,
            true,
        );
        traced(
            span,
            self.commit_one_admitted(E::TYPE_NAME, deadline, envelope),
        )
    }
}

impl Dispatcher {
    /// A unit of one message for the outbox (a command for a remote receptor, or an event),
    /// committed once there is room under the in-flight limit.
    fn commit_one_admitted(
        &mut self,
        message_type: &'static str,
        deadline: Option<Duration>,
        envelope: Envelope,
    ) -> ResponseFuture<Result<DeliveryReceipt, DispatchError>> {
        let origin = self.origin.clone();
        let registry = self.registry.clone();
        let engine = self.engine.clone();
        self.admit(message_type, deadline, move || {
            commit_one(
                &origin,
                &registry,
                &engine.commits(),
                envelope,
                ReceiptStatus::Accepted,
                None,
            )
        })
    }

    /// [`Dispatcher::commit_one_admitted`] for a command with an idempotency key: its unit
    /// records the receipt, and a repeat answers the first receipt.
    fn commit_keyed_admitted(
        &mut self,
        message_type: &'static str,
        deadline: Option<Duration>,
        envelope: Envelope,
        keyed: Keyed,
    ) -> ResponseFuture<Result<DeliveryReceipt, DispatchError>> {
        let origin = self.origin.clone();
        let registry = self.registry.clone();
        let engine = self.engine.clone();
        let (keys, store) = (self.keys.clone(), self.store.clone());
        self.admit(message_type, deadline, move || {
            Box::pin(async move {
                let record = keyed.clone();
                // Built (and the unit sent) only once the key is held and found free.
                let run = async move {
                    commit_one(
                        &origin,
                        &registry,
                        &engine.commits(),
                        envelope,
                        ReceiptStatus::Accepted,
                        Some(record),
                    )
                    .await
                };
                match once_per_key(keys, store, keyed, run).await? {
                    KeyedAnswer::Ran(receipt) => Ok(receipt),
                    KeyedAnswer::Replayed(outcome, appended) => outcome.receipt(appended),
                }
            })
        })
    }
}

/// Commits a unit holding one message and answers with its receipt.
fn commit_one(
    origin: &Origin,
    registry: &RegistryView,
    coordinator: &Recipient<Commit>,
    mut envelope: Envelope,
    status: ReceiptStatus,
    keyed: Option<Keyed>,
) -> ResponseFuture<Result<DeliveryReceipt, DispatchError>> {
    let mut unit = UnitOfWork {
        claim_for_writer: true,
        ..UnitOfWork::default()
    };
    // `add_message` stamps its own hop: drop the dispatcher's to keep one per step.
    envelope.hops.pop();
    // The receipt is taken now (its events are filled in once committed): the envelope itself
    // moves into the unit, uncopied.
    let mut receipt = DeliveryReceipt::of(&envelope, status, Vec::new());
    if let Err(e) = add_message(origin, &registry.current(), &mut unit, envelope) {
        return Box::pin(async move { Err(e) });
    }
    if let Some(keyed) = keyed {
        let outcome = Outcome::Done {
            message_id: receipt.message_id,
            correlation_id: receipt.correlation_id,
            stream_id: receipt.stream_id.clone(),
            timestamp_us: receipt.timestamp_us,
            accepted: status == ReceiptStatus::Accepted,
            result: None,
            inbox: unit.inbox.iter().map(|r| r.envelope.message_id).collect(),
        };
        match keyed.record(&outcome) {
            Ok(record) => unit.idempotency = Some(record),
            Err(e) => return Box::pin(async move { Err(e) }),
        }
    }
    let committed = commit(coordinator, unit, false);
    Box::pin(async move {
        receipt.events = committed.await?.appended;
        Ok(receipt)
    })
}

impl<C: Command> Handler<ScopedInvoke<C>> for Dispatcher {
    type Result =
        ResponseFuture<Result<(Box<dyn std::any::Any + Send>, ScopedCommand), DispatchError>>;

    fn handle(&mut self, msg: ScopedInvoke<C>, _ctx: &mut Self::Context) -> Self::Result {
        if self.registry.current().receptor(C::TYPE_NAME).is_none() {
            return Box::pin(async {
                Err(DispatchError::HandlerNotFound {
                    message_type: C::TYPE_NAME.into(),
                })
            });
        }
        if msg.options.idempotency_key.is_some() {
            return Box::pin(async {
                Err(DispatchError::InvalidMessage {
                    message_type: C::TYPE_NAME.into(),
                    reason: "an idempotency key cannot be given to a command of a scope: the \
                             scope's commands are written as one unit"
                        .into(),
                })
            });
        }
        let deadline = msg.options.deadline;
        let envelope = self.envelope(
            MessageKind::Command,
            C::TYPE_NAME,
            msg.command.stream_id(),
            Vec::new(),
            msg.options,
            &Span::none(),
            true,
        );
        let receipt = DeliveryReceipt::of(&envelope, ReceiptStatus::Delivered, Vec::new());
        let partition = self.origin.partition(&envelope.stream_id);
        let (reply, rx) = oneshot::channel();
        let job = Job::Scoped(ScopedJob {
            envelope,
            typed: Some(Box::new(msg.command)),
            reply,
        });
        let engine = self.engine.clone();
        let registry = self.registry.clone();
        self.admit(C::TYPE_NAME, deadline, move || {
            engine.partitions().enqueue(partition, job);
            Box::pin(async move {
                let Decided { result, unit } = rx.await.map_err(gone)??;
                let encoded = if msg.encode {
                    let table = registry.current();
                    let entry = table.receptor(C::TYPE_NAME).ok_or_else(|| {
                        DispatchError::HandlerNotFound {
                            message_type: C::TYPE_NAME.into(),
                        }
                    })?;
                    Some(
                        entry
                            .receptor
                            .encode_result(&*result)
                            .map_err(DispatchError::Codec)?,
                    )
                } else {
                    None
                };
                Ok((
                    result,
                    ScopedCommand {
                        message_type: C::TYPE_NAME,
                        receipt,
                        unit,
                        encoded,
                    },
                ))
            })
        })
    }
}

impl Handler<HoldKey> for Dispatcher {
    type Result = ResponseFuture<Result<(KeyGuard, Option<IdempotencyRecord>), DispatchError>>;

    fn handle(&mut self, msg: HoldKey, _ctx: &mut Self::Context) -> Self::Result {
        let (keys, store) = (self.keys.clone(), self.store.clone());
        Box::pin(async move {
            let held = keys.lock(&msg.0).await;
            let record = store.idempotency_record(&msg.0).await?;
            Ok((held, record))
        })
    }
}

impl Handler<DecodeResult> for Dispatcher {
    type Result = Result<Box<dyn std::any::Any + Send>, DispatchError>;

    fn handle(&mut self, msg: DecodeResult, _ctx: &mut Self::Context) -> Self::Result {
        decode_result(&self.registry, msg.message_type, &msg.bytes)
    }
}

impl Handler<AwaitRecorded> for Dispatcher {
    type Result = ResponseFuture<Result<(), DispatchError>>;

    fn handle(&mut self, msg: AwaitRecorded, _ctx: &mut Self::Context) -> Self::Result {
        let awaits = self.engine.awaits();
        Box::pin(async move { await_processed(&awaits, msg.0).await })
    }
}

/// Decodes a result a receptor of `message_type` returned and its adapter encoded.
fn decode_result(
    registry: &RegistryView,
    message_type: &str,
    bytes: &[u8],
) -> Result<Box<dyn std::any::Any + Send>, DispatchError> {
    let table = registry.current();
    let Some(entry) = table.receptor(message_type) else {
        return Err(DispatchError::HandlerNotFound {
            message_type: message_type.into(),
        });
    };
    entry
        .receptor
        .decode_result(bytes)
        .map_err(DispatchError::Codec)
}

/// Waits until the inbox rows `inbox` are processed here (their perspectives applied).
async fn await_processed(
    coordinator: &Recipient<AwaitProcessed>,
    inbox: Vec<Uuid>,
) -> Result<(), DispatchError> {
    for applied in coordinator.send(AwaitProcessed(inbox)).await? {
        applied.await.map_err(gone)??;
    }
    Ok(())
}

impl Handler<CompleteScope> for Dispatcher {
    type Result = ResponseFuture<Result<ScopeReceipt, DispatchError>>;

    fn handle(&mut self, msg: CompleteScope, _ctx: &mut Self::Context) -> Self::Result {
        let engine = self.engine.clone();
        self.admit("scope", None, move || {
            Box::pin(complete_scope(
                engine.commits(),
                msg.commands,
                msg.idempotency,
            ))
        })
    }
}

/// A scoped command's expectation, as written into the scope's one unit.
struct ScopedExpectation {
    command: usize,
    stream_id: String,
    /// As the command's receptor gave it.
    expected: ExpectedVersion,
    /// Relative to the stream before the scope: less the appends of the scope's earlier
    /// commands.
    written: ExpectedVersion,
    /// Appends of the scope's earlier commands to the stream.
    before: u64,
}

/// Commits the commands of a scope as one unit (all or nothing), then waits for the
/// perspectives of its events. A version conflict is answered as the failure of the command
/// whose expectation did not hold.
async fn complete_scope(
    coordinator: Recipient<Commit>,
    mut commands: Vec<ScopedCommand>,
    idempotency: Option<NewIdempotencyRecord>,
) -> Result<ScopeReceipt, DispatchError> {
    let mut unit = UnitOfWork {
        claim_for_writer: true,
        idempotency,
        ..UnitOfWork::default()
    };
    let mut appended: HashMap<String, u64> = HashMap::new();
    let mut expectations = Vec::new();
    let mut event_of: HashMap<Uuid, usize> = HashMap::new();
    for (index, command) in commands.iter_mut().enumerate() {
        let failed = |error: DispatchError| DispatchError::ScopeFailed {
            index,
            message_type: command.message_type.into(),
            error: Box::new(error),
        };
        let own = std::mem::take(&mut command.unit);
        for (stream_id, expected) in own.expectations {
            let before = appended.get(&stream_id).copied().unwrap_or(0);
            let written = match expected {
                _ if before == 0 => expected,
                ExpectedVersion::Any => ExpectedVersion::Any,
                ExpectedVersion::Exact(v) if v >= before => ExpectedVersion::Exact(v - before),
                // The scope's own earlier commands already took the stream past it.
                _ => {
                    return Err(failed(DispatchError::VersionConflict {
                        stream_id,
                        expected,
                        actual: before,
                    }));
                }
            };
            unit.expectations.push((stream_id.clone(), written));
            expectations.push(ScopedExpectation {
                command: index,
                stream_id,
                expected,
                written,
                before,
            });
        }
        for event in &own.events {
            *appended.entry(event.stream_id.clone()).or_default() += 1;
            event_of.insert(event.message_id, index);
        }
        unit.events.extend(own.events);
        unit.outbox.extend(own.outbox);
        unit.inbox.extend(own.inbox);
        unit.completes_inbox.extend(own.completes_inbox);
    }
    match commit(&coordinator, unit, true).await {
        Ok(outcome) => {
            for applied in outcome.applied {
                applied.await.map_err(gone)??;
            }
            let mut receipts: Vec<DeliveryReceipt> =
                commands.into_iter().map(|c| c.receipt).collect();
            for event in outcome.appended {
                if let Some(&index) = event_of.get(&event.message_id) {
                    receipts[index].events.push(event);
                }
            }
            Ok(ScopeReceipt { receipts })
        }
        Err(DispatchError::VersionConflict {
            stream_id,
            expected,
            actual,
        }) => {
            let blamed = expectations
                .iter()
                .find(|x| x.stream_id == stream_id && !x.written.matches(actual));
            match blamed {
                Some(x) => Err(DispatchError::ScopeFailed {
                    index: x.command,
                    message_type: commands[x.command].message_type.into(),
                    error: Box::new(DispatchError::VersionConflict {
                        stream_id,
                        expected: x.expected,
                        actual: actual + x.before,
                    }),
                }),
                None => Err(DispatchError::VersionConflict {
                    stream_id,
                    expected,
                    actual,
                }),
            }
        }
        Err(e) => Err(e),
    }
}

impl Handler<Status> for Dispatcher {
    type Result = ResponseFuture<Result<CorrelationStatus, DispatchError>>;

    fn handle(&mut self, msg: Status, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { Ok(store.correlation_status(msg.0).await?) })
    }
}
