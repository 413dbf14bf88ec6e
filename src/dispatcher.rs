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
//! Owns envelope creation (UUIDv7 id, correlation, causation, hops) and routing a command to the
//! partition actor of its stream. It must not run handlers or wait inside its own mailbox: each
//! call is a future of its own, so calls on different streams proceed concurrently.

use crate::config::RuntimeConfig;
use crate::coordinator::{Coordinator, commit};
use crate::envelope::{Envelope, MessageKind};
use crate::error::DispatchError;
use crate::message::{self, Command, Event};
use crate::partition::{CommandJob, Job, PartitionDirectory};
use crate::registry::RegistryView;
use crate::routing::{Origin, add_message};
use crate::store::{AppendedEvent, CorrelationStatus, Store, UnitOfWork};
use actix::prelude::*;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// Tracing context and deadline of a dispatch: continue an existing conversation, or start a
/// new one.
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
    /// A caller-chosen key (the HTTP `Idempotency-Key` header): carried to the store; a repeat
    /// with the same key answers the first outcome.
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
    _result: PhantomData<fn() -> R>,
}

impl<C, R> LocalInvoke<C, R> {
    /// A new conversation with default options.
    pub fn new(command: C) -> Self {
        LocalInvoke {
            command,
            options: DispatchOptions::default(),
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
}

impl<C> SendCommand<C> {
    /// A new conversation with default options.
    pub fn new(command: C) -> Self {
        SendCommand {
            command,
            options: DispatchOptions::default(),
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
}

impl<E> PublishEvent<E> {
    /// A new conversation with default options.
    pub fn new(event: E) -> Self {
        PublishEvent {
            event,
            options: DispatchOptions::default(),
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
    partitions: PartitionDirectory,
    coordinator: Addr<Coordinator>,
    store: Arc<dyn Store>,
    admission: Admission,
}

/// The edge's backpressure: at most `runtime.max_in_flight` dispatches at once, each bounded by
/// its caller's deadline. Shared by the dispatcher and the runtime (which drains it on shutdown).
#[derive(Clone)]
pub(crate) struct Admission {
    in_flight: Arc<Semaphore>,
    /// Set by [`Admission::drain`]: new dispatches are refused at once.
    closing: Arc<AtomicBool>,
    max_in_flight: u32,
    default_deadline: Duration,
}

impl Admission {
    pub(crate) fn new(limits: &RuntimeConfig) -> Admission {
        Admission {
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight as usize)),
            closing: Arc::new(AtomicBool::new(false)),
            max_in_flight: limits.max_in_flight,
            default_deadline: Duration::from_millis(limits.dispatch_timeout_ms),
        }
    }

    /// Stops taking new dispatches (answered [`DispatchError::Unavailable`] at once) and waits, up
    /// to `deadline`, for those in flight to end. Answers how many were still in flight then.
    pub(crate) async fn drain(&self, deadline: Duration) -> u32 {
        self.closing.store(true, Ordering::SeqCst);
        let left =
            match tokio::time::timeout(deadline, self.in_flight.acquire_many(self.max_in_flight))
                .await
            {
                Ok(Ok(all)) => {
                    all.forget();
                    0
                }
                _ => self
                    .max_in_flight
                    .saturating_sub(self.in_flight.available_permits() as u32),
            };
        self.in_flight.close();
        left
    }

    /// Runs `start` (which queues the work and returns the future of its answer) once there is
    /// room, and bounds the wait for room and answer by the caller's deadline. With room at
    /// once, `start` runs now, before the handler returns: calls keep their arrival order.
    ///
    /// Past the deadline the caller gets [`DispatchError::Timeout`] and the work goes on in the
    /// background, still holding its place under the limit until it ends; without room by then,
    /// [`DispatchError::Overloaded`] and nothing was started.
    fn admit<T: 'static>(
        &self,
        message_type: &'static str,
        deadline: Option<Duration>,
        start: impl FnOnce() -> ResponseFuture<Result<T, DispatchError>> + 'static,
    ) -> ResponseFuture<Result<T, DispatchError>> {
        if self.closing.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(DispatchError::Unavailable(
                    "the runtime is shutting down".into(),
                ))
            });
        }
        let deadline = deadline.unwrap_or(self.default_deadline);
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Box::pin(answer_within(message_type, deadline, permit, start())),
            Err(_) => {
                let in_flight = self.in_flight.clone();
                let max_in_flight = self.max_in_flight;
                Box::pin(async move {
                    let asked = Instant::now();
                    let permit =
                        match tokio::time::timeout(deadline, in_flight.acquire_owned()).await {
                            Ok(Ok(permit)) => permit,
                            Ok(Err(_)) => {
                                return Err(DispatchError::Unavailable(
                                    "the runtime is shutting down".into(),
                                ));
                            }
                            Err(_) => {
                                return Err(DispatchError::Overloaded {
                                    message_type: message_type.into(),
                                    max_in_flight,
                                });
                            }
                        };
                    let left = deadline.saturating_sub(asked.elapsed());
                    answer_within(message_type, left, permit, start()).await
                })
            }
        }
    }
}

/// Awaits `work` for at most `deadline`; past it, answers [`DispatchError::Timeout`] and lets the
/// work finish in the background on this arbiter, `permit` held until it does.
async fn answer_within<T: 'static>(
    message_type: &'static str,
    deadline: Duration,
    permit: OwnedSemaphorePermit,
    work: ResponseFuture<Result<T, DispatchError>>,
) -> Result<T, DispatchError> {
    let mut work = Box::pin(async move {
        let answer = work.await;
        drop(permit);
        answer
    });
    match tokio::time::timeout(deadline, &mut work).await {
        Ok(answer) => answer,
        Err(_) => {
            actix::spawn(async move {
                let _ = work.await;
            });
            Err(DispatchError::Timeout {
                message_type: message_type.into(),
                deadline_ms: deadline.as_millis() as u64,
            })
        }
    }
}

impl Dispatcher {
    pub(crate) fn new(
        origin: Origin,
        registry: RegistryView,
        partitions: PartitionDirectory,
        coordinator: Addr<Coordinator>,
        store: Arc<dyn Store>,
        admission: Admission,
    ) -> Dispatcher {
        Dispatcher {
            origin,
            registry,
            partitions,
            coordinator,
            store,
            admission,
        }
    }

    fn envelope(
        &self,
        kind: MessageKind,
        message_type: &str,
        stream_id: String,
        payload: Vec<u8>,
        options: DispatchOptions,
    ) -> Envelope {
        let mut envelope = Envelope::new(kind, message_type, stream_id, payload);
        if let Some(c) = options.correlation_id {
            envelope.correlation_id = c;
        }
        envelope.causation_id = options.causation_id;
        envelope.metadata = options.metadata;
        envelope.push_hop(self.origin.hop(&envelope.stream_id, None));
        envelope
    }

    /// A command for its stream's partition actor: the receipt, a `queue` that hands it over
    /// (run once there is room), and the receiver that answers when it is done.
    fn run_locally<C: Command>(
        &self,
        command: C,
        options: DispatchOptions,
        wait: bool,
    ) -> (
        DeliveryReceipt,
        impl FnOnce() + 'static,
        oneshot::Receiver<Result<crate::partition::CommandOutcome, DispatchError>>,
    ) {
        // The payload is encoded only if the command itself must be stored (outbox/inbox):
        // a local receptor gets the typed value.
        let envelope = self.envelope(
            MessageKind::Command,
            C::TYPE_NAME,
            command.stream_id(),
            Vec::new(),
            options,
        );
        let (reply, rx) = oneshot::channel();
        // The receipt is taken now (its events are filled in once committed): the envelope
        // itself moves on to the partition actor, uncopied.
        let receipt = DeliveryReceipt::of(&envelope, ReceiptStatus::Delivered, Vec::new());
        let partitions = self.partitions.clone();
        let partition = self.origin.partition(&envelope.stream_id);
        let queue = move || {
            partitions.enqueue(
                partition,
                Job::Command(CommandJob {
                    envelope,
                    typed: Some(Box::new(command)),
                    wait,
                    reply,
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

fn gone<E>(_: E) -> DispatchError {
    DispatchError::Unavailable("partition actor stopped".into())
}

impl<C: Command, R: Send + 'static> Handler<LocalInvoke<C, R>> for Dispatcher {
    type Result = ResponseFuture<Result<R, DispatchError>>;

    fn handle(&mut self, msg: LocalInvoke<C, R>, _ctx: &mut Self::Context) -> Self::Result {
        if self.registry.current().receptor(C::TYPE_NAME).is_none() {
            return Box::pin(async {
                Err(DispatchError::HandlerNotFound {
                    message_type: C::TYPE_NAME.into(),
                })
            });
        }
        let deadline = msg.options.deadline;
        let (_, queue, rx) = self.run_locally(msg.command, msg.options, true);
        self.admission.admit(C::TYPE_NAME, deadline, move || {
            queue();
            Box::pin(async move {
                let outcome = rx.await.map_err(gone)??;
                for applied in outcome.applied {
                    applied.await.map_err(gone)??;
                }
                outcome
                    .result
                    .downcast::<R>()
                    .map(|r| *r)
                    .map_err(|_| DispatchError::ResultType {
                        message_type: C::TYPE_NAME.into(),
                        expected: std::any::type_name::<R>(),
                    })
            })
        })
    }
}

impl<C: Command> Handler<SendCommand<C>> for Dispatcher {
    type Result = ResponseFuture<Result<DeliveryReceipt, DispatchError>>;

    fn handle(&mut self, msg: SendCommand<C>, _ctx: &mut Self::Context) -> Self::Result {
        let table = self.registry.current();
        let deadline = msg.options.deadline;
        if table.receptor(C::TYPE_NAME).is_some() {
            let (mut receipt, queue, rx) = self.run_locally(msg.command, msg.options, false);
            return self.admission.admit(C::TYPE_NAME, deadline, move || {
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
        );
        self.commit_one_admitted(C::TYPE_NAME, deadline, envelope)
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
        let envelope = self.envelope(
            MessageKind::Event,
            E::TYPE_NAME,
            msg.event.stream_id(),
            payload,
            msg.options,
        );
        self.commit_one_admitted(E::TYPE_NAME, deadline, envelope)
    }
}

impl Dispatcher {
    /// A unit of one message for the outbox (a command for a remote receptor, or an event),
    /// committed once there is room under the in-flight limit.
    fn commit_one_admitted(
        &self,
        message_type: &'static str,
        deadline: Option<Duration>,
        envelope: Envelope,
    ) -> ResponseFuture<Result<DeliveryReceipt, DispatchError>> {
        let origin = self.origin.clone();
        let registry = self.registry.clone();
        let coordinator = self.coordinator.clone();
        self.admission.admit(message_type, deadline, move || {
            commit_one(
                &origin,
                &registry,
                &coordinator,
                envelope,
                ReceiptStatus::Accepted,
            )
        })
    }
}

/// Commits a unit holding one message and answers with its receipt.
fn commit_one(
    origin: &Origin,
    registry: &RegistryView,
    coordinator: &Addr<Coordinator>,
    mut envelope: Envelope,
    status: ReceiptStatus,
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
    let committed = commit(coordinator, unit, false);
    Box::pin(async move {
        receipt.events = committed.await?.appended;
        Ok(receipt)
    })
}

impl Handler<Status> for Dispatcher {
    type Result = ResponseFuture<Result<CorrelationStatus, DispatchError>>;

    fn handle(&mut self, msg: Status, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { Ok(store.correlation_status(msg.0).await?) })
    }
}
