//! The handles the actors record through, registered once with the runtime's recorder.

use super::{DISPATCH_OUTCOMES, METRICS, MetricKind, QUEUES};
use crate::store::{Backlog, FailureKind, Queue};
use crate::supervision::ActorKind;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics::{SharedString, Unit};
use metrics_exporter_prometheus::PrometheusRecorder;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;
use std::time::Duration;

const META: Metadata<'static> = Metadata::new("whizbang", Level::INFO, Some("whizbang"));

/// Buckets of the `_seconds` histograms: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of `whizbang_work_batch_size`.
const SIZE_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
];

/// The failure kinds of the `kind` label of `whizbang_retries_total`.
const FAILURE_KINDS: [FailureKind; 3] = [
    FailureKind::Failed,
    FailureKind::Panicked,
    FailureKind::Transient,
];
const ACTORS: [ActorKind; 5] = [
    ActorKind::Coordinator,
    ActorKind::Partition,
    ActorKind::Publisher,
    ActorKind::Consumer,
    ActorKind::Registry,
];

fn actor_name(kind: ActorKind) -> &'static str {
    match kind {
        ActorKind::Coordinator => "coordinator",
        ActorKind::Partition => "partition",
        ActorKind::Publisher => "publisher",
        ActorKind::Consumer => "consumer",
        ActorKind::Registry => "registry",
    }
}

/// Where handles are registered: the runtime's own Prometheus recorder, the global recorder
/// of the `metrics` facade, or nowhere.
enum Sink {
    Own(Box<PrometheusRecorder>),
    Global,
    Nowhere,
}

impl Sink {
    fn with<T>(&self, f: impl FnOnce(&dyn Recorder) -> T) -> T {
        match self {
            Sink::Own(r) => f(r.as_ref()),
            Sink::Global => metrics::with_recorder(f),
            Sink::Nowhere => f(&metrics::NoopRecorder),
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, SharedString)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.clone()))
                .collect::<Vec<_>>(),
        )
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, SharedString)]) -> Counter {
        let key = Sink::key(name, labels);
        self.with(|r| r.register_counter(&key, &META))
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, SharedString)]) -> Gauge {
        let key = Sink::key(name, labels);
        self.with(|r| r.register_gauge(&key, &META))
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, SharedString)]) -> Histogram {
        let key = Sink::key(name, labels);
        self.with(|r| r.register_histogram(&key, &META))
    }

    fn describe(&self) {
        self.with(|r| {
            for m in METRICS {
                let name = KeyName::from_const_str(m.name);
                let unit = (m.unit == "seconds").then_some(Unit::Seconds);
                let help = SharedString::const_str(m.help);
                match m.kind {
                    MetricKind::Counter => r.describe_counter(name, unit, help),
                    MetricKind::Gauge => r.describe_gauge(name, unit, help),
                    MetricKind::Histogram => r.describe_histogram(name, unit, help),
                }
            }
        });
    }
}

fn s(value: &'static str) -> SharedString {
    SharedString::const_str(value)
}

fn queue_index(queue: Queue) -> usize {
    match queue {
        Queue::Outbox => 0,
        Queue::Inbox => 1,
    }
}

/// The runtime's metric handles. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub(crate) struct Meters(Arc<Inner>);

struct Inner {
    sink: Sink,
    in_flight: Gauge,
    dispatch_limit: Gauge,
    batch_duration: [Histogram; 2],
    batch_size: [Histogram; 3],
    backlog: [Gauge; 2],
    oldest: [Gauge; 2],
    dead_rows: [Gauge; 2],
    rows_in_flight: [Gauge; 2],
    retries: [[Counter; 3]; 2],
    dead_letters: Counter,
    leases_held: Gauge,
    leases_acquired: Counter,
    leases_released: Counter,
    leases_taken_over: Counter,
    restarts: [Counter; 5],
}

impl Meters {
    /// Handles on a Prometheus recorder of the runtime's own (`serve`), served by its
    /// listener, or else on the recorder the application installed globally.
    pub(crate) fn new(serve: bool) -> Meters {
        let sink = if serve {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("whizbang_work_batch_size".into()),
                        SIZE_BUCKETS,
                    )
                })
                .map(PrometheusBuilder::build_recorder)
                // The buckets are constants: they are never empty.
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            Sink::Own(Box::new(recorder))
        } else {
            Sink::Global
        };
        Meters::on(sink)
    }

    /// Handles that record nothing (a replay without a runtime).
    pub(crate) fn noop() -> Meters {
        Meters::on(Sink::Nowhere)
    }

    fn on(sink: Sink) -> Meters {
        sink.describe();
        let per_queue = |name| QUEUES.map(|q| sink.gauge(name, &[("queue", s(q))]));
        Meters(Arc::new(Inner {
            in_flight: sink.gauge("whizbang_dispatches_in_flight", &[]),
            dispatch_limit: sink.gauge("whizbang_dispatch_limit", &[]),
            batch_duration: ["ok", "failed"].map(|o| {
                sink.histogram("whizbang_work_batch_duration_seconds", &[("outcome", s(o))])
            }),
            batch_size: ["units", "reports", "claimed"]
                .map(|i| sink.histogram("whizbang_work_batch_size", &[("item", s(i))])),
            backlog: per_queue("whizbang_queue_backlog_rows"),
            oldest: per_queue("whizbang_queue_oldest_pending_age_seconds"),
            dead_rows: per_queue("whizbang_queue_dead_letter_rows"),
            rows_in_flight: per_queue("whizbang_rows_in_flight"),
            retries: QUEUES.map(|q| {
                FAILURE_KINDS.map(|k| {
                    sink.counter(
                        "whizbang_retries_total",
                        &[("queue", s(q)), ("kind", s(k.as_str()))],
                    )
                })
            }),
            dead_letters: sink.counter("whizbang_dead_letters_total", &[]),
            leases_held: sink.gauge("whizbang_leases_held", &[]),
            leases_acquired: sink.counter("whizbang_leases_acquired_total", &[]),
            leases_released: sink.counter("whizbang_leases_released_total", &[]),
            leases_taken_over: sink.counter("whizbang_leases_taken_over_total", &[]),
            restarts: ACTORS.map(|a| {
                sink.counter(
                    "whizbang_actor_restarts_total",
                    &[("actor", s(actor_name(a)))],
                )
            }),
            sink,
        }))
    }

    /// What the listener serves: `None` when recording into the application's recorder.
    pub(crate) fn prometheus(&self) -> Option<PrometheusHandle> {
        match &self.0.sink {
            Sink::Own(r) => Some(r.handle()),
            _ => None,
        }
    }

    /// Whether the backlog gauges are worth a query per heartbeat: the runtime serves them.
    pub(crate) fn wants_backlog(&self) -> bool {
        matches!(self.0.sink, Sink::Own(_))
    }

    /// The counters of dispatches of `message_type`, one per outcome.
    pub(crate) fn dispatch(&self, message_type: &'static str) -> DispatchMeters {
        DispatchMeters(Arc::new(DISPATCH_OUTCOMES.map(|o| {
            self.0.sink.counter(
                "whizbang_dispatches_total",
                &[("message_type", s(message_type)), ("outcome", s(o))],
            )
        })))
    }

    /// A dispatch was admitted (`1.0`) or finished (`-1.0`).
    pub(crate) fn in_flight(&self, delta: f64) {
        self.0.in_flight.increment(delta);
    }

    /// The in-flight limit is `limit` now.
    pub(crate) fn dispatch_limit(&self, limit: u32) {
        self.0.dispatch_limit.set(f64::from(limit));
    }

    /// The duration histograms of the receptor of `message_type`.
    pub(crate) fn receptor(&self, message_type: &str) -> HandlerMeters {
        self.handler(
            "whizbang_receptor_duration_seconds",
            "message_type",
            message_type,
        )
    }

    /// The duration histograms of the perspective `name`.
    pub(crate) fn perspective(&self, name: &str) -> HandlerMeters {
        self.handler("whizbang_perspective_duration_seconds", "perspective", name)
    }

    fn handler(&self, metric: &'static str, label: &'static str, value: &str) -> HandlerMeters {
        let value = SharedString::from_owned(value.to_string());
        HandlerMeters(Arc::new(["ok", "failed"].map(|o| {
            self.0
                .sink
                .histogram(metric, &[(label, value.clone()), ("outcome", s(o))])
        })))
    }

    /// The publish counters of `topic`: ok, transient, failed.
    pub(crate) fn publish(&self, topic: &str) -> PublishMeters {
        let topic = SharedString::from_owned(topic.to_string());
        PublishMeters(["ok", "transient", "failed"].map(|o| {
            self.0.sink.counter(
                "whizbang_publish_total",
                &[("topic", topic.clone()), ("outcome", s(o))],
            )
        }))
    }

    /// The settlement counters of the subscription `topic`/`name`.
    pub(crate) fn settle(&self, topic: &str, name: &str) -> SettleMeters {
        let subscription = SharedString::from_owned(format!("{topic}/{name}"));
        SettleMeters(Arc::new(["accepted", "rejected", "released"].map(|o| {
            self.0.sink.counter(
                "whizbang_deliveries_total",
                &[("subscription", subscription.clone()), ("settlement", s(o))],
            )
        })))
    }

    /// A work batch answered (`ok`) or failed after `elapsed`, with its sizes; `claimed` is
    /// `None` for a failed batch.
    pub(crate) fn work_batch(&self, ok: bool, elapsed: Duration, sizes: (usize, usize, usize)) {
        let m = &self.0;
        m.batch_duration[usize::from(!ok)].record(elapsed.as_secs_f64());
        m.batch_size[0].record(sizes.0 as f64);
        m.batch_size[1].record(sizes.1 as f64);
        if ok {
            m.batch_size[2].record(sizes.2 as f64);
        }
    }

    /// The backlog read at a heartbeat.
    pub(crate) fn backlog(&self, backlog: &[Backlog]) {
        for b in backlog {
            let i = queue_index(b.queue);
            self.0.backlog[i].set(b.pending as f64);
            self.0.dead_rows[i].set(b.dead as f64);
            self.0.oldest[i].set(b.oldest_pending_age.unwrap_or_default().as_secs_f64());
        }
    }

    /// Rows handed out and not reported back.
    pub(crate) fn rows_in_flight(&self, inbox: usize, outbox: usize) {
        self.0.rows_in_flight[0].set(outbox as f64);
        self.0.rows_in_flight[1].set(inbox as f64);
    }

    /// A failed attempt of a row of `queue` was reported.
    pub(crate) fn retry(&self, queue: Queue, kind: FailureKind) {
        let k = FAILURE_KINDS.iter().position(|f| *f == kind).unwrap_or(0);
        self.0.retries[queue_index(queue)][k].increment(1);
    }

    /// Rows dead-lettered by a batch.
    pub(crate) fn dead_lettered(&self, rows: usize) {
        self.0.dead_letters.increment(rows as u64);
    }

    /// A heartbeat's leases: held now, newly acquired since the last one, released by it, and
    /// taken over from another instance since the last one.
    pub(crate) fn leases(&self, held: usize, acquired: usize, released: usize, taken_over: usize) {
        self.0.leases_held.set(held as f64);
        self.0.leases_acquired.increment(acquired as u64);
        self.0.leases_released.increment(released as u64);
        self.0.leases_taken_over.increment(taken_over as u64);
    }

    /// A supervised actor of `kind` was restarted.
    pub(crate) fn restarted(&self, kind: ActorKind) {
        let i = ACTORS.iter().position(|a| *a == kind).unwrap_or(0);
        self.0.restarts[i].increment(1);
    }
}

/// The counters of one message type's dispatches, one per outcome.
#[derive(Clone)]
pub(crate) struct DispatchMeters(Arc<[Counter; DISPATCH_OUTCOMES.len()]>);

impl DispatchMeters {
    /// Counts a dispatch's outcome (an index of `DISPATCH_OUTCOMES`).
    pub(crate) fn record(&self, outcome: usize) {
        self.0[outcome].increment(1);
    }
}

/// The duration histograms of one handler: ok, failed.
#[derive(Clone)]
pub(crate) struct HandlerMeters(Arc<[Histogram; 2]>);

impl HandlerMeters {
    /// Records one run.
    pub(crate) fn record(&self, ok: bool, elapsed: Duration) {
        self.0[usize::from(!ok)].record(elapsed.as_secs_f64());
    }
}

/// The publish counters of one topic: ok, transient, failed.
pub(crate) struct PublishMeters([Counter; 3]);

impl PublishMeters {
    /// Counts one send: `Ok`, or its failure's transience.
    pub(crate) fn record(&self, failed: Option<bool>) {
        let i = match failed {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.0[i].increment(1);
    }
}

/// The settlement counters of one subscription: accepted, rejected, released.
#[derive(Clone)]
pub(crate) struct SettleMeters(Arc<[Counter; 3]>);

impl SettleMeters {
    /// `n` deliveries accepted.
    pub(crate) fn accepted(&self, n: usize) {
        self.0[0].increment(n as u64);
    }
    /// One delivery rejected.
    pub(crate) fn rejected(&self) {
        self.0[1].increment(1);
    }
    /// `n` deliveries released.
    pub(crate) fn released(&self, n: usize) {
        self.0[2].increment(n as u64);
    }
}
