//! `[telemetry]`: what the instance exposes about itself to operators.
//!
//! Owns the telemetry keys and their checks: today `metrics_listen`, the address of the
//! listener that serves `/metrics` (Prometheus text), `/health/live` and `/health/ready`. It is
//! a plain struct so that further telemetry keys (tracing export, say) sit beside it. It must
//! not bind or record anything (the runtime and [`crate::telemetry`] do).

use super::{Checked, ensure};
use serde::Deserialize;
use std::net::SocketAddr;

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `HOST:PORT` the runtime serves `/metrics`, `/health/live` and `/health/ready` on
    /// (`127.0.0.1:9464`; port 0 picks a free port, see `Runtime::metrics_addr`). Empty: no
    /// listener (the default); the runtime still records through the `metrics` facade into
    /// whatever recorder the application installed. Needs the cargo feature `metrics`.
    pub metrics_listen: String,
}

impl TelemetryConfig {
    /// The listener's address; `None` when `metrics_listen` is empty.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen.trim().parse().ok()
    }

    pub(super) fn validate(&self) -> Checked {
        let listen = self.metrics_listen.trim();
        if listen.is_empty() {
            return Ok(());
        }
        ensure(
            listen.parse::<SocketAddr>().is_ok(),
            "telemetry.metrics_listen",
            || format!("`{listen}` is not an IP:PORT address (e.g. 127.0.0.1:9464)"),
        )?;
        ensure(
            cfg!(feature = "metrics"),
            "telemetry.metrics_listen",
            || {
                "needs whizbang's cargo feature `metrics`, which this build was compiled without \
             (enable it, or leave metrics_listen empty)"
                    .to_string()
            },
        )
    }
}
