//! Telemetry: what the runtime tells the outside about itself.
//!
//! Owns the runtime's traces: `traces` names the spans of a message's life and moves the W3C
//! trace context between spans and envelopes (always built); `otel` (feature `otel`) records
//! those spans through OpenTelemetry and exports them ([`init_tracing`], [`layer`]). It must
//! not decide anything the runtime does: it only reports.

#[cfg(feature = "otel")]
mod otel;
pub mod traces;

#[cfg(feature = "otel")]
pub use otel::{TracingError, TracingGuard, init_tracing, layer, span_context};
pub use traces::{SYSTEM, TRACEPARENT, TRACESTATE};
