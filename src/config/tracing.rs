//! `[telemetry.tracing]`: where the runtime's spans are exported, under which service name,
//! and how many traces are kept.
//!
//! Owns the keys of trace export and their checks. It must not install a subscriber or open
//! a connection (`whizbang::telemetry::init_tracing` does, with the `otel` / `otlp` features),
//! and never holds a secret: a collector endpoint with a password in it is refused, so nothing
//! here can leak one into a log.

use super::{Checked, ensure};
use serde::Deserialize;

/// `[telemetry.tracing]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingSettings {
    /// The OTLP/HTTP endpoint of a collector (Jaeger, Tempo, the OpenTelemetry Collector), such
    /// as `http://127.0.0.1:4318`; spans go to `{endpoint}/v1/traces`. Empty: spans are not
    /// exported (they still reach the log subscriber, and trace contexts still travel with the
    /// messages). Needs the `otlp` feature.
    pub otlp_endpoint: String,
    /// The `service.name` resource of exported spans; empty: `[service] name`.
    pub service_name: String,
    /// The share of new traces kept, 0.0 to 1.0. A trace continued from a caller or from
    /// another service follows that service's decision (the sampled flag of its `traceparent`).
    pub sample_ratio: f64,
    /// At most this many new traces started per second by one runtime (0: no cap); those
    /// past it are dropped at their source, whole. A trace continued from a caller or another
    /// service is not counted: its source decided. Bounds what tracing costs under load (each
    /// kept `local_invoke` records about three spans) while a lightly loaded service, or one
    /// under test, keeps every trace.
    pub max_traces_per_second: u32,
    /// Which spans are exported, as a `tracing` filter directive (`RUST_LOG` syntax); the
    /// runtime's spans are at level `info` under the target `whizbang`.
    pub span_filter: String,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            otlp_endpoint: String::new(),
            service_name: String::new(),
            sample_ratio: 1.0,
            max_traces_per_second: 100,
            span_filter: "info".into(),
        }
    }
}

impl TracingSettings {
    pub(super) fn validate(&self) -> Checked {
        ensure(
            self.sample_ratio.is_finite() && (0.0..=1.0).contains(&self.sample_ratio),
            "telemetry.tracing.sample_ratio",
            || format!("must be between 0.0 and 1.0, got {}", self.sample_ratio),
        )?;
        ensure(
            !self.span_filter.trim().is_empty(),
            "telemetry.tracing.span_filter",
            || "must not be empty (\"info\" exports the runtime's spans)".into(),
        )?;
        if self.otlp_endpoint.is_empty() {
            return Ok(());
        }
        let key = "telemetry.tracing.otlp_endpoint";
        let rest = self.otlp_endpoint.strip_prefix("http://");
        ensure(rest.is_some(), key, || {
            "must start with http:// (OTLP over HTTP to a collector beside the service; TLS to the \
             collector is not built in)"
                .into()
        })?;
        let authority = rest.unwrap_or_default().split(['/', '?', '#']).next();
        ensure(!authority.unwrap_or_default().contains('@'), key, || {
            "must not hold credentials (user:password@)".into()
        })?;
        ensure(!authority.unwrap_or_default().is_empty(), key, || {
            "names no host".into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut TracingSettings)) -> Checked {
        let mut s = TracingSettings::default();
        f(&mut s);
        s.validate()
    }

    #[test]
    fn defaults_export_nothing_and_pass() {
        assert_eq!(TracingSettings::default().validate(), Ok(()));
        assert!(TracingSettings::default().otlp_endpoint.is_empty());
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let key = |r: Checked| r.unwrap_err().0;
        assert_eq!(
            key(with(|s| s.sample_ratio = 1.5)),
            "telemetry.tracing.sample_ratio"
        );
        assert_eq!(
            key(with(|s| s.sample_ratio = f64::NAN)),
            "telemetry.tracing.sample_ratio"
        );
        assert_eq!(
            key(with(|s| s.span_filter = " ".into())),
            "telemetry.tracing.span_filter"
        );
        for endpoint in [
            "127.0.0.1:4318",
            "https://collector:4318",
            "http://user:S3cret@collector:4318",
            "http:///v1",
        ] {
            let (k, message) = with(|s| s.otlp_endpoint = endpoint.into()).unwrap_err();
            assert_eq!(k, "telemetry.tracing.otlp_endpoint", "{endpoint}");
            assert!(!message.contains("S3cret"), "{message}");
        }
        assert_eq!(
            with(|s| s.otlp_endpoint = "http://127.0.0.1:4318".into()),
            Ok(())
        );
    }
}
