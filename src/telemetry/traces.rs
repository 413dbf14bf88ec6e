//! Traces: one `tracing` span per step of a message's life, and the W3C trace context that
//! carries a trace from the service that dispatched a command to every service its messages
//! reach.
//!
//! Owns the span names and their attributes (after the OpenTelemetry messaging conventions),
//! moving a trace context between a span and an envelope's metadata, and the head sampler
//! ([`Sampler`]) that decides, where a trace starts, whether it is kept. It must not decide
//! where spans go: the application's subscriber does, or `init_tracing` (feature `otel`).
//! Span fields are recorded only when a subscriber wants the span (`tracing`'s static
//! filtering), so with no subscriber, or one that does not want level `info` of the target
//! `whizbang`, a span costs a check of a cached flag, builds no string and reads no context.
//!
//! A trace is kept or dropped whole: only a step that starts a trace asks the sampler; every
//! later step records a span only if its message carries a kept (sampled) trace context, so a
//! dropped call pays for no span anywhere.
//!
//! | span | step | `messaging.operation.type` |
//! |---|---|---|
//! | `whizbang.dispatch` | `local_invoke`, `send`, `publish`: the call until its answer | `send` |
//! | `whizbang.receptor` | a receptor deciding a command | `process` |
//! | `whizbang.work_batch` | one store round trip of the coordinator (with a kept unit) | — |
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

use crate::config::TracingSettings;
use crate::envelope::Envelope;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;
use tracing::Span;
use tracing::field::{Empty, display};

/// Metadata key (and AMQP application property) of the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// Metadata key (and AMQP application property) of the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// `messaging.system` of the steps inside one service (dispatch, receptor, perspective).
pub const SYSTEM: &str = "whizbang";

/// An `info` span of a step of one message, with the identity fields every such span has
/// after the given ones, taken from `envelope` when the span is made: one visit of its fields,
/// evaluated only if a subscriber wants the span (the dispatch span, made before its envelope,
/// gets them from [`record_dispatch`]). A macro, not a function: `tracing` needs every span's
/// field names at its call site.
macro_rules! message_span {
    ($parent:expr, $name:literal, envelope: $envelope:expr, $($field:tt)*) => {
        tracing::info_span!(
            target: "whizbang",
            parent: $parent,
            $name,
            $($field)*
            messaging.message.id = display(&$envelope.message_id),
            messaging.message.conversation_id = display(&$envelope.correlation_id),
            whizbang.causation_id = $envelope.causation_id.as_ref().map(display),
            whizbang.message_type = $envelope.message_type.as_str(),
            whizbang.stream_id = $envelope.stream_id.as_str(),
        )
    };
}

/// The span of a dispatch (`local_invoke`, `send`, `publish`), child of `parent` (the caller's
/// span when the call was made). With no caller span the dispatch starts a trace, if `sampler`
/// keeps one now; if not, the call and every step it causes record no span.
pub(crate) fn dispatch(
    parent: &Span,
    sampler: &Sampler,
    operation: &'static str,
    message_type: &'static str,
) -> Span {
    if !wanted() || (parent.is_disabled() && !sampler.keep()) {
        return Span::none();
    }
    tracing::info_span!(
        target: "whizbang",
        parent: parent,
        "whizbang.dispatch",
        otel.kind = "producer",
        messaging.system = SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = operation,
        whizbang.partition = Empty,
        messaging.message.id = Empty,
        messaging.message.conversation_id = Empty,
        whizbang.causation_id = Empty,
        whizbang.message_type = message_type,
        whizbang.stream_id = Empty,
    )
}

/// The span of a receptor deciding `envelope`, child of `parent` (the dispatch span of a
/// command from this process). Without one it continues the kept trace in the envelope (a
/// command from the inbox, or whose caller passed a context); with no trace there, a command
/// of a request scope (`source`) starts one if the sampler keeps it, any other records none.
pub(crate) fn receptor(
    parent: &Span,
    envelope: &Envelope,
    partition: u32,
    source: Option<&Sampler>,
) -> Span {
    let continues = if parent.is_disabled() {
        if !wanted() {
            return Span::none();
        }
        match kept_context(&envelope.metadata) {
            Kept::Trace(context) => Some(context),
            Kept::Dropped => return Span::none(),
            Kept::Absent if source.is_some_and(Sampler::keep) => None,
            Kept::Absent => return Span::none(),
        }
    } else {
        None
    };
    let span = message_span!(
        parent,
        "whizbang.receptor",
        envelope: envelope,
        otel.kind = "consumer",
        messaging.system = SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "receptor",
        whizbang.partition = partition,
    );
    if let Some(context) = continues {
        set_remote_parent(&span, context);
    }
    span
}

/// The span of the perspectives of one event (an inbox row), continuing its trace.
pub(crate) fn perspective(envelope: &Envelope, partition: u32, attempts: u32) -> Span {
    let Some(context) = continued_trace(envelope, None) else {
        return Span::none();
    };
    let span = message_span!(
        None,
        "whizbang.perspective",
        envelope: envelope,
        otel.kind = "consumer",
        messaging.system = SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "perspective",
        whizbang.partition = partition,
        whizbang.attempts = attempts,
    );
    continued(span, context)
}

/// The span of one outbox row sent to `topic`, continuing the trace of the row.
pub(crate) fn publish(
    system: &'static str,
    topic: &str,
    envelope: &Envelope,
    partition: u32,
) -> Span {
    let Some(context) = continued_trace(envelope, None) else {
        return Span::none();
    };
    let span = message_span!(
        None,
        "whizbang.publish",
        envelope: envelope,
        otel.kind = "producer",
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = topic,
        otel.status_code = Empty,
        whizbang.partition = partition,
    );
    continued(span, context)
}

/// The span of one delivery from `subscription` of `topic`, continuing the sender's trace; a
/// delivery without one (from a producer that does not trace) starts a trace if `sampler` keeps
/// one now.
pub(crate) fn receive(
    system: &'static str,
    topic: &str,
    subscription: &str,
    envelope: &Envelope,
    partition: u32,
    sampler: &Sampler,
) -> Span {
    let Some(context) = continued_trace(envelope, Some(sampler)) else {
        return Span::none();
    };
    let span = message_span!(
        None,
        "whizbang.receive",
        envelope: envelope,
        otel.kind = "consumer",
        messaging.system = system,
        messaging.operation.type = "receive",
        messaging.operation.name = "receive",
        messaging.destination.name = topic,
        messaging.destination.subscription.name = subscription,
        otel.status_code = Empty,
        whizbang.partition = partition,
    );
    continued(span, context)
}

/// The span of committing `count` received deliveries to the inbox and settling them, child of
/// the first recorded receive span among them (its trace; the other kept traces are linked);
/// none when no delivery of the commit is in a kept trace.
pub(crate) fn inbox_commit(
    system: &'static str,
    topic: &str,
    subscription: &str,
    first: &Span,
    count: usize,
) -> Span {
    if first.is_disabled() {
        return Span::none();
    }
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

/// The span of one work batch of the coordinator, recorded when the batch writes a unit of a
/// kept trace: a trace of its own (a batch serves many messages), linked to the kept trace of
/// each such unit's first message (`metadata`: those messages' metadata). A batch serving no
/// kept trace records no span.
pub(crate) fn work_batch<'a>(
    units: usize,
    reports: usize,
    claims: bool,
    metadata: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> Span {
    if !wanted() {
        return Span::none();
    }
    let mut links = metadata.filter_map(|m| match kept_context(m) {
        Kept::Trace(context) => Some(context),
        Kept::Dropped | Kept::Absent => None,
    });
    let Some(first) = links.next() else {
        return Span::none();
    };
    let span = tracing::info_span!(
        target: "whizbang",
        parent: None,
        "whizbang.work_batch",
        whizbang.units = units,
        whizbang.reports = reports,
        whizbang.claims = claims,
        whizbang.claimed_outbox = Empty,
        whizbang.claimed_inbox = Empty,
        error.type = Empty,
    );
    for context in std::iter::once(first).chain(links) {
        add_link(&span, context);
    }
    span
}

/// Runs `work` inside `span`; when nobody wants the span, just runs it.
pub(crate) async fn within<F: Future>(span: &Span, work: F) -> F::Output {
    if span.is_disabled() {
        work.await
    } else {
        tracing::Instrument::instrument(work, span.clone()).await
    }
}

/// What a step with no parent span does with the context in `envelope`: `Some`: record a
/// span (continuing that trace, or starting one at a source whose `sampler` keeps it now);
/// `None`: record nothing (nobody wants the span, the trace was dropped at its source, or the
/// message is in no trace and this step does not start one).
fn continued_trace(envelope: &Envelope, source: Option<&Sampler>) -> Option<Option<Remote>> {
    if !wanted() {
        return None;
    }
    match kept_context(&envelope.metadata) {
        Kept::Trace(context) => Some(Some(context)),
        Kept::Dropped => None,
        Kept::Absent => source.is_some_and(Sampler::keep).then_some(None),
    }
}

/// `span` continuing `context` (none: a new trace).
fn continued(span: Span, context: Option<Remote>) -> Span {
    if let Some(context) = context {
        set_remote_parent(&span, context);
    }
    span
}

/// Whether a subscriber wants the runtime's spans at all: one check of a cached interest, so
/// that with telemetry off no trace context is read.
fn wanted() -> bool {
    tracing::enabled!(target: "whizbang", tracing::Level::INFO)
}

/// A trace context read from a message (an OpenTelemetry span context with `otel`).
#[cfg(feature = "otel")]
type Remote = opentelemetry::trace::SpanContext;
/// Without `otel` no context is read: every step with spans wanted records one.
#[cfg(not(feature = "otel"))]
type Remote = ();

/// The trace a message is in, as its metadata says.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
enum Kept {
    /// A trace kept at its source (sampled flag set): its steps record spans.
    Trace(Remote),
    /// A trace dropped at its source (sampled flag clear): its steps record nothing.
    Dropped,
    /// No (well-formed) trace context.
    Absent,
}

#[cfg(feature = "otel")]
fn kept_context(metadata: &BTreeMap<String, String>) -> Kept {
    match super::otel::parse(metadata) {
        Some(context) if context.is_sampled() => Kept::Trace(context),
        Some(_) => Kept::Dropped,
        None => Kept::Absent,
    }
}

/// Without `otel` every step records its span as a trace of its own (no context is read, see
/// the module docs): the sampler decides only where a dispatch starts.
#[cfg(not(feature = "otel"))]
fn kept_context(_: &BTreeMap<String, String>) -> Kept {
    Kept::Trace(())
}

/// Records the identity of `envelope` and its `partition` on the dispatch span (nothing when
/// nobody wants it).
pub(crate) fn record_dispatch(span: &Span, envelope: &Envelope, partition: u32) {
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
    span.record("whizbang.stream_id", envelope.stream_id.as_str());
    span.record("whizbang.partition", partition);
}

/// Makes `context` the parent of `span` (call before the span is first entered).
fn set_remote_parent(span: &Span, context: Remote) {
    #[cfg(feature = "otel")]
    super::otel::set_remote_parent(span, context);
    #[cfg(not(feature = "otel"))]
    let _ = (span, context);
}

/// Links `context` to `span`.
fn add_link(span: &Span, context: Remote) {
    #[cfg(feature = "otel")]
    super::otel::add_link(span, context);
    #[cfg(not(feature = "otel"))]
    let _ = (span, context);
}

/// Writes `span`'s trace context into `metadata`, for the messages that carry the trace on
/// (with `otel`; without, the inherited context stays: see the module docs).
pub(crate) fn stamp(span: &Span, metadata: &mut BTreeMap<String, String>) {
    #[cfg(feature = "otel")]
    super::otel::stamp(span, metadata);
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}

/// Links the kept trace in `metadata` to `span` (with `otel`; nothing without).
pub(crate) fn link(span: &Span, metadata: &BTreeMap<String, String>) {
    if span.is_disabled() {
        return;
    }
    if let Kept::Trace(context) = kept_context(metadata) {
        add_link(span, context);
    }
}

/// The runtime's head sampler: whether a trace the runtime would start now is kept. Asked
/// only where a trace starts (a dispatch with no caller span, a delivery or a request-scope
/// command with no trace context); every later step follows the decision written in the
/// message's `traceparent` (or its absence), so a dropped call records no span anywhere and
/// a kept one records all of its spans, in every service.
///
/// A trace is kept with probability `telemetry.tracing.sample_ratio`, and at most
/// `telemetry.tracing.max_traces_per_second` are started per second by this runtime (0: no
/// cap). Without `otel` there are no traces to sample: every dispatch records its span.
#[derive(Clone, Debug)]
pub(crate) struct Sampler(Arc<SamplerState>);

#[derive(Debug)]
struct SamplerState {
    /// A trace is kept when a random `u64` is below this (`u64::MAX`: always).
    threshold: u64,
    /// The cap per second (0: none).
    per_second: u32,
    /// The start of the seconds counted.
    epoch: Instant,
    /// The second (since `epoch`) that `started` counts.
    second: AtomicU64,
    /// Traces started (or refused for the cap) in `second`.
    started: AtomicU32,
}

impl Sampler {
    /// The sampler of `[telemetry.tracing]`.
    pub(crate) fn new(settings: &TracingSettings) -> Sampler {
        let ratio = settings.sample_ratio.clamp(0.0, 1.0);
        let threshold = if ratio >= 1.0 {
            u64::MAX
        } else {
            // `as` saturates; 0.0 keeps nothing (a random u64 is never below 0).
            (ratio * u64::MAX as f64) as u64
        };
        Sampler(Arc::new(SamplerState {
            threshold,
            per_second: settings.max_traces_per_second,
            epoch: Instant::now(),
            second: AtomicU64::new(0),
            started: AtomicU32::new(0),
        }))
    }

    /// Whether to start a trace now.
    pub(crate) fn keep(&self) -> bool {
        if !cfg!(feature = "otel") {
            return true;
        }
        let state = &*self.0;
        if state.threshold != u64::MAX && random() >= state.threshold {
            return false;
        }
        if state.per_second == 0 {
            return true;
        }
        // A budget per whole second; the reset may race with another thread's count, which
        // costs at most a few traces more or less in that second.
        let now = state.epoch.elapsed().as_secs();
        if state.second.load(Ordering::Relaxed) != now
            && state.second.swap(now, Ordering::Relaxed) != now
        {
            state.started.store(0, Ordering::Relaxed);
        }
        state.started.fetch_add(1, Ordering::Relaxed) < state.per_second
    }
}

/// A random `u64` from a per-thread xorshift generator (sampling needs no cryptographic
/// quality, and a shared generator would be contended).
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let seed = RandomState::new().hash_one(std::thread::current().id());
            seed | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(ratio: f64, per_second: u32) -> Sampler {
        Sampler::new(&TracingSettings {
            sample_ratio: ratio,
            max_traces_per_second: per_second,
            ..TracingSettings::default()
        })
    }

    #[cfg(feature = "otel")]
    #[test]
    fn the_ratio_keeps_about_its_share() {
        let kept = |s: &Sampler| (0..100_000).filter(|_| s.keep()).count();
        assert_eq!(kept(&sampler(1.0, 0)), 100_000);
        assert_eq!(kept(&sampler(0.0, 0)), 0);
        let tenth = kept(&sampler(0.1, 0));
        assert!((9_000..11_000).contains(&tenth), "{tenth}");
    }

    #[cfg(feature = "otel")]
    #[test]
    fn the_cap_bounds_the_traces_started_per_second() {
        let s = sampler(1.0, 50);
        // Well within one second (the count restarts when the second turns).
        let started = Instant::now();
        let kept = (0..1_000).filter(|_| s.keep()).count();
        if started.elapsed() < std::time::Duration::from_millis(900) {
            assert!((50..=100).contains(&kept), "{kept}");
        }
    }
}
