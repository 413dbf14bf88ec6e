//! The OpenTelemetry side of traces (feature `otel`): W3C trace contexts in and out of an
//! envelope's metadata, the tracing-opentelemetry layer, and [`init_tracing`] for services.
//!
//! Owns parsing and formatting `traceparent` / `tracestate` and building the tracer provider.
//! It must not name spans (the parent module does), and with the layer absent every function
//! here is a no-op: a trace context is read or written only for a span an OpenTelemetry layer
//! records.

use super::traces::{TRACEPARENT, TRACESTATE};
use crate::config::Config;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider, ShouldSample,
};
use std::collections::BTreeMap;
use std::str::FromStr;
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Why [`init_tracing`] could not install tracing.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// `telemetry.tracing.otlp_endpoint` is set, but the crate was built without `otlp`.
    #[error(
        "telemetry.tracing.otlp_endpoint is set but whizbang was built without the `otlp` feature"
    )]
    OtlpNotBuilt,
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter for telemetry.tracing.otlp_endpoint: {0}")]
    Exporter(String),
    /// A filter directive does not parse.
    #[error("invalid filter directive `{directive}` ({key}): {reason}")]
    Filter {
        /// The configuration key or variable it came from.
        key: &'static str,
        /// The directive.
        directive: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A global subscriber was installed before.
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the exporter of [`init_tracing`] running; dropping it flushes the spans still
/// buffered and stops the exporter (drop it after `Runtime::shutdown`).
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans are exported (`telemetry.tracing.otlp_endpoint` is set).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process's global `tracing` subscriber: log lines to stderr, filtered by
/// `RUST_LOG` (or `default_log_filter` when it is unset), and, when
/// `telemetry.tracing.otlp_endpoint` is set (feature `otlp`), every span that
/// `telemetry.tracing.span_filter` selects exported over OTLP/HTTP in batches, under
/// `telemetry.tracing.service_name` (or `service.name`), keeping `sample_ratio` of new traces.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = whizbang::Config::load("config/whizbang.toml")?;
/// let _tracing = whizbang::telemetry::init_tracing(&config, "warn")?;
/// // ... Runtime::builder(config)..., and drop `_tracing` after Runtime::shutdown.
/// # Ok(()) }
/// ```
pub fn init_tracing(
    config: &Config,
    default_log_filter: &str,
) -> Result<TracingGuard, TracingError> {
    let settings = &config.telemetry.tracing;
    let logs = match std::env::var("RUST_LOG") {
        Ok(directive) => filter("RUST_LOG", &directive)?,
        Err(_) => filter("default_log_filter", default_log_filter)?,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(logs);
    let provider = exporter_provider(config)?;
    let otel = match &provider {
        Some(provider) => Some(layer(provider).with_filter(filter(
            "telemetry.tracing.span_filter",
            &settings.span_filter,
        )?)),
        None => None,
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TracingError::AlreadyInstalled(e.to_string()))?;
    Ok(TracingGuard { provider })
}

/// The tracing-opentelemetry layer that records spans through `provider` (for an application
/// that builds its own subscriber or exporter, and for tests with the SDK's in-memory
/// exporter). Add it to a `tracing_subscriber::registry()`.
///
/// Tuned for a span per message step: no busy/idle time per span, no code location or thread
/// attributes (the span names say where), and no OpenTelemetry context made current on every
/// poll of an instrumented future (the runtime propagates contexts itself). An application
/// whose own OpenTelemetry instrumentation reads `Context::current()` builds its layer with
/// `tracing_opentelemetry::layer()` instead.
pub fn layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("whizbang"))
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_context_activation(false)
}

fn filter(key: &'static str, directive: &str) -> Result<EnvFilter, TracingError> {
    EnvFilter::builder()
        .parse(directive)
        .map_err(|e| TracingError::Filter {
            key,
            directive: directive.to_string(),
            reason: e.to_string(),
        })
}

#[cfg(feature = "otlp")]
fn exporter_provider(config: &Config) -> Result<Option<SdkTracerProvider>, TracingError> {
    use opentelemetry_otlp::WithExportConfig;
    let settings = &config.telemetry.tracing;
    if settings.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let endpoint = format!("{}/v1/traces", settings.otlp_endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TracingError::Exporter(e.to_string()))?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler(settings.sample_ratio))
            .with_resource(resource(config))
            .build(),
    ))
}

#[cfg(not(feature = "otlp"))]
fn exporter_provider(config: &Config) -> Result<Option<SdkTracerProvider>, TracingError> {
    if config.telemetry.tracing.otlp_endpoint.is_empty() {
        Ok(None)
    } else {
        Err(TracingError::OtlpNotBuilt)
    }
}

/// Follows the caller's decision for continued traces; of new ones keeps every trace the
/// runtime starts (its spans are named `whizbang.*`; the runtime's own head sampler already
/// applied `sample_ratio` and `max_traces_per_second` where it started them, see
/// `traces::Sampler`) and `ratio` of those the application starts.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
fn sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(RuntimeRoots(Sampler::TraceIdRatioBased(ratio))))
}

/// The root sampler of [`sampler`]: the runtime's roots are kept (sampled once, at the
/// source), others go to the wrapped sampler.
#[derive(Clone, Debug)]
struct RuntimeRoots(Sampler);

impl ShouldSample for RuntimeRoots {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if name.starts_with("whizbang.") {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: parent_context
                    .map(|cx| cx.span().span_context().trace_state().clone())
                    .unwrap_or_default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// `service.name` of exported spans.
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
fn resource(config: &Config) -> opentelemetry_sdk::Resource {
    let name = match config.telemetry.tracing.service_name.as_str() {
        "" => config.service.name.clone(),
        name => name.to_string(),
    };
    opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build()
}

/// The OpenTelemetry span context of `span` (its trace and span ids), `None` when no
/// OpenTelemetry layer records it: to print a trace id, or to tie other telemetry to a span.
pub fn span_context(span: &Span) -> Option<SpanContext> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context().span().span_context().clone();
    context.is_valid().then_some(context)
}

/// The span context a `traceparent` names, `None` if it is absent or malformed (a malformed
/// context starts a new trace, as W3C Trace Context asks, and is never an error).
pub(crate) fn parse(metadata: &BTreeMap<String, String>) -> Option<SpanContext> {
    let value = metadata.get(TRACEPARENT)?;
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    // Version 00 has exactly four parts; a later version may append more (W3C §3.2.4).
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = metadata
        .get(TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        state,
    );
    context.is_valid().then_some(context)
}

/// The `traceparent` of a span context.
pub(crate) fn format(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

pub(super) fn set_remote_parent(span: &Span, context: SpanContext) {
    let _ = span.set_parent(Context::new().with_remote_span_context(context));
}

pub(super) fn stamp(span: &Span, metadata: &mut BTreeMap<String, String>) {
    let Some(span_context) = span_context(span) else {
        return;
    };
    metadata.insert(TRACEPARENT.to_string(), format(&span_context));
    let state = span_context.trace_state().header();
    if state.is_empty() {
        metadata.remove(TRACESTATE);
    } else {
        metadata.insert(TRACESTATE.to_string(), state);
    }
}

pub(super) fn add_link(span: &Span, context: SpanContext) {
    span.add_link(context);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(traceparent: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(TRACEPARENT.to_string(), traceparent.to_string())])
    }

    #[test]
    fn a_traceparent_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut m = meta(text);
        m.insert(TRACESTATE.into(), "congo=t61rcWkgMzE".into());
        let context = parse(&m).unwrap();
        assert!(context.is_remote());
        assert!(context.is_sampled());
        assert_eq!(context.trace_state().header(), "congo=t61rcWkgMzE");
        assert_eq!(format(&context), text);
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse(&meta(bad)).is_none(), "{bad}");
        }
        assert!(parse(&BTreeMap::new()).is_none());
        // A later version may carry more fields; its first four are read.
        assert!(
            parse(&meta(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more"
            ))
            .is_some()
        );
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_written() {
        let span = tracing::info_span!("no subscriber");
        let mut m = BTreeMap::new();
        stamp(&span, &mut m);
        assert!(m.is_empty());
    }
}
