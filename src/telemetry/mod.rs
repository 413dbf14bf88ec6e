//! Telemetry: the metrics the runtime records and the listener that serves them with health,
//! and the runtime's traces.
//!
//! Owns the list of metrics ([`METRICS`]: name, type, unit, labels, meaning — the reference in
//! `docs/metrics.md` and the Grafana dashboard are checked against it), the pre-registered
//! handles the actors record through (`Meters`), and, with `telemetry.metrics_listen` set, the
//! HTTP listener serving `GET /metrics`, `GET /health/live` and `GET /health/ready`.
//!
//! Recording goes through the `metrics` facade: with a listener, into a Prometheus recorder of
//! this runtime's own (several runtimes in one process each serve their own figures); without
//! one, into the recorder the application installed globally before starting the runtime, if
//! any. Handles are registered once (at start, at handler registration, or the first time a
//! message type, topic or subscription is seen by its one actor), so a message costs an atomic
//! add per metric: no lock, no allocation, no query. Labels are bounded: message type,
//! outcome, queue, topic, subscription, perspective, actor kind — never a stream id or a
//! message id. The backlog gauges come from one cheap query per heartbeat.
//!
//! Traces: `traces` names the spans of a message's life and moves the W3C trace context
//! between spans and envelopes (always built); `otel` (feature `otel`) records those spans
//! through OpenTelemetry and exports them ([`init_tracing`], [`layer`]); see docs/telemetry.md.
//!
//! It must not decide anything: it records what the actors report. Built without the cargo
//! feature `metrics`, the handles are empty structs and every record compiles to nothing.

#[cfg(feature = "metrics")]
mod meters;
#[cfg(not(feature = "metrics"))]
mod meters_off;
#[cfg(feature = "otel")]
mod otel;
#[cfg(feature = "metrics")]
mod server;
pub mod traces;

#[cfg(feature = "metrics")]
pub(crate) use meters::{DispatchMeters, HandlerMeters, Meters, PublishMeters, SettleMeters};
#[cfg(not(feature = "metrics"))]
pub(crate) use meters_off::{DispatchMeters, HandlerMeters, Meters, PublishMeters, SettleMeters};
#[cfg(feature = "otel")]
pub use otel::{TracingError, TracingGuard, init_tracing, layer, span_context};
#[cfg(feature = "metrics")]
pub(crate) use server::MetricsServer;
pub use traces::{SYSTEM, TRACEPARENT, TRACESTATE};

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down: a level sampled when scraped.
    Gauge,
    /// A distribution in buckets (`_bucket`, `_sum`, `_count` series).
    Histogram,
}

/// One metric the runtime exports.
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    /// Its name, as Prometheus shows it.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// Its unit (`seconds`, `rows`, ...), or `""` for a plain count.
    pub unit: &'static str,
    /// Its label names (each with a bounded set of values).
    pub labels: &'static [&'static str],
    /// What it means.
    pub help: &'static str,
}

/// The outcome of a dispatch, the `outcome` label of `whizbang_dispatches_total`.
#[cfg(feature = "metrics")]
pub(crate) const DISPATCH_OUTCOMES: [&str; 8] = [
    "ok",
    "rejected",
    "conflict",
    "timeout",
    "overloaded",
    "unavailable",
    "invalid",
    "failed",
];

/// The index in [`DISPATCH_OUTCOMES`] of a dispatch's result.
pub(crate) fn dispatch_outcome<T>(result: &Result<T, crate::DispatchError>) -> usize {
    use crate::DispatchError as E;
    match result {
        Ok(_) => 0,
        Err(E::Rejected { .. }) => 1,
        Err(E::VersionConflict { .. } | E::IdempotencyKeyReused { .. }) => 2,
        Err(E::Timeout { .. } | E::HandlerTimedOut { .. }) => 3,
        Err(E::Overloaded { .. }) => 4,
        Err(E::Unavailable(_) | E::Store(_)) => 5,
        Err(
            E::HandlerNotFound { .. }
            | E::Codec(_)
            | E::InvalidMessage { .. }
            | E::ResultType { .. },
        ) => 6,
        Err(
            E::Panicked { .. }
            | E::PerspectiveFailed { .. }
            | E::InlineReadModelFailed { .. }
            | E::ScopeFailed { .. },
        ) => 7,
    }
}

/// The queues of the `queue` label, in the order of the gauges' arrays.
#[cfg(feature = "metrics")]
pub(crate) const QUEUES: [&str; 2] = ["outbox", "inbox"];

/// Every metric the runtime exports; `docs/metrics.md` documents each and the Grafana
/// dashboard (`docs/grafana/whizbang.json`) queries only these (both checked by tests).
pub const METRICS: &[MetricInfo] = &[
    MetricInfo {
        name: "whizbang_dispatches_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &["message_type", "outcome"],
        help: "Dispatches (local_invoke, send, publish) answered, by message type and outcome \
               (ok, rejected, conflict, timeout, overloaded, unavailable, invalid, failed).",
    },
    MetricInfo {
        name: "whizbang_dispatches_in_flight",
        kind: MetricKind::Gauge,
        unit: "",
        labels: &[],
        help: "Dispatches admitted and not yet finished (counted against the in-flight limit).",
    },
    MetricInfo {
        name: "whizbang_dispatch_limit",
        kind: MetricKind::Gauge,
        unit: "",
        labels: &[],
        help: "The in-flight limit now: runtime.max_in_flight, or below it the adaptive limit \
               (runtime.adaptive_in_flight).",
    },
    MetricInfo {
        name: "whizbang_receptor_duration_seconds",
        kind: MetricKind::Histogram,
        unit: "seconds",
        labels: &["message_type", "outcome"],
        help: "Time a receptor took to decide one command, by command type and outcome (ok, failed).",
    },
    MetricInfo {
        name: "whizbang_perspective_duration_seconds",
        kind: MetricKind::Histogram,
        unit: "seconds",
        labels: &["perspective", "outcome"],
        help: "Time a perspective took to apply one event, by perspective and outcome (ok, failed).",
    },
    MetricInfo {
        name: "whizbang_work_batch_duration_seconds",
        kind: MetricKind::Histogram,
        unit: "seconds",
        labels: &["outcome"],
        help: "Round trip of one work batch to the store, by outcome (ok, failed).",
    },
    MetricInfo {
        name: "whizbang_work_batch_size",
        kind: MetricKind::Histogram,
        unit: "",
        labels: &["item"],
        help: "Items in one work batch: units of work written (units), completions and failures \
               reported (reports), rows claimed (claimed).",
    },
    MetricInfo {
        name: "whizbang_queue_backlog_rows",
        kind: MetricKind::Gauge,
        unit: "rows",
        labels: &["queue"],
        help: "Rows waiting or in flight in the outbox or inbox (not dead-lettered), read once per \
               heartbeat.",
    },
    MetricInfo {
        name: "whizbang_queue_oldest_pending_age_seconds",
        kind: MetricKind::Gauge,
        unit: "seconds",
        labels: &["queue"],
        help: "Age of the oldest pending row of the queue (0 when none), read once per heartbeat.",
    },
    MetricInfo {
        name: "whizbang_queue_dead_letter_rows",
        kind: MetricKind::Gauge,
        unit: "rows",
        labels: &["queue"],
        help: "Dead-lettered rows of the queue (each parks its stream), read once per heartbeat.",
    },
    MetricInfo {
        name: "whizbang_rows_in_flight",
        kind: MetricKind::Gauge,
        unit: "rows",
        labels: &["queue"],
        help: "Rows this instance handed to partition actors (inbox) or the publisher (outbox) \
               and not yet reported back.",
    },
    MetricInfo {
        name: "whizbang_retries_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &["queue", "kind"],
        help: "Failed attempts reported for a retry (or a dead letter), by queue and kind \
               (failed, panicked, transient; transient ones do not count towards max_attempts).",
    },
    MetricInfo {
        name: "whizbang_dead_letters_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &[],
        help: "Rows this instance dead-lettered after store.max_attempts.",
    },
    MetricInfo {
        name: "whizbang_leases_held",
        kind: MetricKind::Gauge,
        unit: "",
        labels: &[],
        help: "Partitions this instance leases, as of its last heartbeat.",
    },
    MetricInfo {
        name: "whizbang_leases_acquired_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &[],
        help: "Partitions newly held at a heartbeat that the previous heartbeat did not hold: \
               free partitions taken, and partitions taken over from an instance whose lease \
               expired.",
    },
    MetricInfo {
        name: "whizbang_leases_released_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &[],
        help: "Partitions given up at a heartbeat (idle, or above this instance's fair share).",
    },
    MetricInfo {
        name: "whizbang_leases_taken_over_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &[],
        help: "Partitions this instance took over from another one without its consent (that \
               instance's lease ran out, or its liveness lock was found free), reported at the \
               heartbeat after; also counted in whizbang_leases_acquired_total.",
    },
    MetricInfo {
        name: "whizbang_publish_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &["topic", "outcome"],
        help: "Outbox rows sent to the transport, by topic and outcome (ok, transient, failed).",
    },
    MetricInfo {
        name: "whizbang_deliveries_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &["subscription", "settlement"],
        help: "Broker deliveries settled, by subscription (topic/name) and settlement (accepted: \
               in the inbox; rejected: malformed or unknown; released: the inbox commit failed \
               and the broker redelivers).",
    },
    MetricInfo {
        name: "whizbang_actor_restarts_total",
        kind: MetricKind::Counter,
        unit: "",
        labels: &["actor"],
        help: "Restarts of supervised actors after a panic or an unexpected stop, by actor kind \
               (coordinator, partition, publisher, consumer, registry).",
    },
];
