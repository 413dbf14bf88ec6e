//! Traces: one `tracing` span per step of a message's life, and the W3C trace context that
//! carries a trace from the service that dispatched a command to every service its messages
//! reach.
//!
//! Owns the span names and their attributes (after the OpenTelemetry messaging conventions),
//! and moving a trace context between a span and an envelope's metadata. It must not decide
//! where spans go: the application's subscriber does, or `init_tracing` (feature `otel`).
//! Span fields are recorded only when a subscriber wants the span (`tracing`'s static
//! filtering), so with no subscriber, or one that does not want level `info` of the target
//! `whizbang`, a span costs a check of a cached flag and builds no string.
//!
//! | span | step | `messaging.operation.type` |
//! |---|---|---|
//! | `whizbang.dispatch` | `local_invoke`, `send`, `publish`: the call until its answer | `send` |
//! | `whizbang.receptor` | a receptor deciding a command | `process` |
//! | `whizbang.work_batch` | one store round trip of the coordinator | — |
//! | `whizbang.perspective` | the perspectives of one event (inbox row) | `process` |
//! | `whizbang.publish` | one outbox row sent to the broker | `send` |
//! | `whizbang.receive` | one broker delivery admitted (decoded and checked) | `receive` |
//! | `whizbang.inbox_commit` | the received deliveries committed to the inbox and settled | `settle` |
//!
//! # Propagation
//!
//! The trace context travels in the envelope's metadata under the keys [`TRACEPARENT`] and
//! [`TRACESTATE`] (W3C Trace Context), so it is stored with the outbox and inbox rows (in
//! Postgres too) and, on AMQP, sent as the application properties `traceparent` and
//! `tracestate`. With the `otel` feature each step writes its own span's context there (the
//! dispatch span into the command, the receptor span into its events, the publish span onto
//! the wire, the receive span into the inbox row) and the next step continues from it, so the
//! perspective in the receiving service is in the trace of the command that caused it.
//! Without `otel`, `tracing` spans have no trace ids: the runtime then neither reads nor
//! writes the context, but a context already in the metadata (from a caller's
//! `DispatchOptions::metadata` or an upstream service) is inherited by every message caused,
//! like all metadata, so a trace passes unbroken through a service built without the feature.

use crate::envelope::Envelope;
use std::collections::BTreeMap;
use std::future::Future;
use tracing::Span;
use tracing::field::{Empty, display};

/// Metadata key (and AMQP application property) of the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// Metadata key (and AMQP application property) of the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// `messaging.system` of the steps inside one service (dispatch, receptor, perspective).
pub const SYSTEM: &str = "whizbang";

/// An `info` span of a step of one message, with the identity fields every such span has
/// (recorded later by [`record_envelope`]) after the given ones. A macro, not a function:
/// `tracing` needs every span's field names at its call site.
macro_rules! message_span {
    ($parent:expr, $name:literal, $($field:tt)*) => {
        tracing::info_span!(
            target: "whizbang",
            parent: $parent,
            $name,
            $($field)*
            messaging.message.id = Empty,
            messaging.message.conversation_id = Empty,
            whizbang.causation_id = Empty,
            whizbang.message_type = Empty,
            whizbang.stream_id = Empty,
        )
    };
}

/// The span of a dispatch (`local_invoke`, `send`, `publish`), child of `parent` (the caller's
/// span when the call was made; none: a new trace).
pub(crate) fn dispatch(parent: &Span, operation: &'static str, message_type: &'static str) -> Span {
    let span = message_span!(
        parent,
        "whizbang.dispatch",
        otel.kind = "producer",
        messaging.system = SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = operation,
        whizbang.partition = Empty,
    );
    span.record("whizbang.message_type", message_type);
    span
}

/// The span of a receptor deciding `envelope`, child of `parent` (the dispatch span of a
/// command from this process; none: the context in the envelope, for a command from the inbox).
pub(crate) fn receptor(parent: &Span, envelope: &Envelope, partition: u32) -> Span {
    let span = message_span!(
        parent,
        "whizbang.receptor",
        otel.kind = "consumer",
        messaging.system = SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "receptor",
        whizbang.partition = partition,
    );
    if parent.is_none() {
        continue_trace(&span, &envelope.metadata);
    }
    record_envelope(&span, envelope);
    span
}

/// The span of the perspectives of one event (an inbox row), continuing its trace.
pub(crate) fn perspective(envelope: &Envelope, partition: u32, attempts: u32) -> Span {
    let span = message_span!(
        None,
        "whizbang.perspective",
        otel.kind = "consumer",
        messaging.system = SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "perspective",
        whizbang.partition = partition,
        whizbang.attempts = attempts,
    );
    continued(span, envelope)
}

/// The span of one outbox row sent to `topic`, continuing the trace of the row.
pub(crate) fn publish(
    system: &'static str,
    topic: &str,
    envelope: &Envelope,
    partition: u32,
) -> Span {
    let span = message_span!(
        None,
        "whizbang.publish",
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = topic,
        otel.status_code = Empty,
        whizbang.partition = partition,
    );
    continued(span, envelope)
}

/// The span of one delivery from `subscription` of `topic`, continuing the sender's trace.
pub(crate) fn receive(
    system: &'static str,
    topic: &str,
    subscription: &str,
    envelope: &Envelope,
    partition: u32,
) -> Span {
    let span = message_span!(
        None,
        "whizbang.receive",
        otel.kind = "consumer",
        messaging.system = system,
        messaging.operation.type = "receive",
        messaging.operation.name = "receive",
        messaging.destination.name = topic,
        messaging.destination.subscription.name = subscription,
        otel.status_code = Empty,
        whizbang.partition = partition,
    );
    continued(span, envelope)
}

/// The span of committing `count` received deliveries to the inbox and settling them, child of
/// the receive span of the first of them (its trace; the others' traces are linked).
pub(crate) fn inbox_commit(
    system: &'static str,
    topic: &str,
    subscription: &str,
    first: &Span,
    count: usize,
) -> Span {
    tracing::info_span!(
        target: "whizbang",
        parent: first,
        "whizbang.inbox_commit",
        otel.kind = "consumer",
        messaging.system = system,
        messaging.operation.type = "settle",
        messaging.operation.name = "inbox_commit",
        messaging.destination.name = topic,
        messaging.destination.subscription.name = subscription,
        messaging.batch.message_count = count,
        whizbang.settlement = Empty,
    )
}

/// The span of one work batch of the coordinator (its own trace: a batch serves many
/// messages; with `otel` it links the trace of each unit's first message).
pub(crate) fn work_batch(units: usize, reports: usize, claims: bool) -> Span {
    tracing::info_span!(
        target: "whizbang",
        parent: None,
        "whizbang.work_batch",
        whizbang.units = units,
        whizbang.reports = reports,
        whizbang.claims = claims,
        whizbang.claimed_outbox = Empty,
        whizbang.claimed_inbox = Empty,
        error.type = Empty,
    )
}

/// Runs `work` inside `span`; when nobody wants the span, just runs it.
pub(crate) async fn within<F: Future>(span: &Span, work: F) -> F::Output {
    if span.is_disabled() {
        work.await
    } else {
        tracing::Instrument::instrument(work, span.clone()).await
    }
}

/// `span` continuing the trace in `envelope`'s metadata, with its identity recorded.
fn continued(span: Span, envelope: &Envelope) -> Span {
    continue_trace(&span, &envelope.metadata);
    record_envelope(&span, envelope);
    span
}

/// Records the identity of `envelope` on `span` (nothing when nobody wants the span).
pub(crate) fn record_envelope(span: &Span, envelope: &Envelope) {
    if span.is_disabled() {
        return;
    }
    span.record("messaging.message.id", display(&envelope.message_id));
    span.record(
        "messaging.message.conversation_id",
        display(&envelope.correlation_id),
    );
    if let Some(cause) = &envelope.causation_id {
        span.record("whizbang.causation_id", display(cause));
    }
    span.record("whizbang.message_type", envelope.message_type.as_str());
    span.record("whizbang.stream_id", envelope.stream_id.as_str());
}

/// Makes the trace context in `metadata` the parent of `span` (with `otel`; nothing without:
/// see the module docs). Call before the span is first entered.
pub(crate) fn continue_trace(span: &Span, metadata: &BTreeMap<String, String>) {
    #[cfg(feature = "otel")]
    super::otel::continue_trace(span, metadata);
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}

/// Writes `span`'s trace context into `metadata`, for the messages that carry the trace on
/// (with `otel`; without, the inherited context stays: see the module docs).
pub(crate) fn stamp(span: &Span, metadata: &mut BTreeMap<String, String>) {
    #[cfg(feature = "otel")]
    super::otel::stamp(span, metadata);
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}

/// Links the trace context in `metadata` to `span` (with `otel`; nothing without).
pub(crate) fn link(span: &Span, metadata: &BTreeMap<String, String>) {
    #[cfg(feature = "otel")]
    super::otel::link(span, metadata);
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}
