//! `[telemetry]`: what the runtime tells the outside about itself.
//!
//! Owns the section and its checks; each part of it lives in a table of its own
//! (`[telemetry.tracing]`: `tracing.rs`). It must not install anything (the `telemetry`
//! module of the crate does).

use super::Checked;
use super::tracing::TracingSettings;
use serde::Deserialize;

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `[telemetry.tracing]`: trace export.
    pub tracing: TracingSettings,
}

impl TelemetryConfig {
    pub(super) fn validate(&self) -> Checked {
        self.tracing.validate()
    }
}
