//! Telemetry on and off in one process, for the core suite's `telemetry_overhead_ratio`.
//!
//! Owns the process's global `tracing` subscriber and `metrics` recorder, and the switch
//! between the two states. Off: the OpenTelemetry layer's filter is `OFF` (as for a service
//! with no span subscriber: each span site is one check of a cached level) and the recorder
//! hands out no-op handles. On: every `info` span of the runtime is recorded by
//! tracing-opentelemetry and goes through the SDK's batch span processor (its own thread, as in
//! a service) to an exporter that counts and drops it, and metric handles registered meanwhile
//! record into a Prometheus recorder. It must not measure anything (the suite does).

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Turns telemetry on and off for the whole process.
pub struct Switch {
    spans: reload::Handle<LevelFilter, Registry>,
    metrics_on: Arc<AtomicBool>,
    exported: Arc<AtomicU64>,
    prometheus: PrometheusHandle,
    provider: SdkTracerProvider,
}

static SWITCH: OnceLock<Switch> = OnceLock::new();

/// Installs the global subscriber (log lines to stderr as `RUST_LOG` asks, and the switched
/// OpenTelemetry layer) and the global metrics recorder, with telemetry off.
pub fn install() {
    SWITCH.get_or_init(|| {
        let exported = Arc::new(AtomicU64::new(0));
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(Dropping(exported.clone()))
            .build();
        let (filter, spans) = reload::Layer::new(LevelFilter::OFF);
        let otel = whizbang::telemetry::layer(&provider).with_filter(filter);
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(EnvFilter::from_default_env());
        let _ = tracing_subscriber::registry()
            .with(otel)
            .with(logs)
            .try_init();
        let recorder = PrometheusBuilder::new().build_recorder();
        let prometheus = recorder.handle();
        let metrics_on = Arc::new(AtomicBool::new(false));
        let _ = metrics::set_global_recorder(Switched {
            on: metrics_on.clone(),
            prometheus: recorder,
        });
        Switch {
            spans,
            metrics_on,
            exported,
            prometheus,
            provider,
        }
    });
}

/// The switch of [`install`] (installing it first if needed).
pub fn switch() -> &'static Switch {
    install();
    SWITCH.get().expect("installed above")
}

impl Switch {
    /// Telemetry on or off from now on (metric handles keep what they were registered with).
    pub fn set(&self, on: bool) -> Result<(), String> {
        self.metrics_on.store(on, Ordering::SeqCst);
        let level = if on {
            LevelFilter::INFO
        } else {
            LevelFilter::OFF
        };
        self.spans.reload(level).map_err(|e| e.to_string())
    }

    /// Hands the spans buffered in the batch processor to the exporter.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }

    /// Spans the exporter has been handed so far (the batch processor exports with a delay).
    pub fn spans_exported(&self) -> u64 {
        self.exported.load(Ordering::SeqCst)
    }

    /// Lines of the Prometheus text the recorder would serve now.
    pub fn metric_lines(&self) -> usize {
        self.prometheus.render().lines().count()
    }
}

/// An exporter that counts the spans it is handed and drops them.
#[derive(Debug)]
struct Dropping(Arc<AtomicU64>);

impl SpanExporter for Dropping {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

/// The Prometheus recorder while on, no-op handles while off.
struct Switched {
    on: Arc<AtomicBool>,
    prometheus: PrometheusRecorder,
}

impl Recorder for Switched {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::Relaxed) {
            self.prometheus.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::Relaxed) {
            self.prometheus.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::Relaxed) {
            self.prometheus.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}
