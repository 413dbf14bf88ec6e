//! `[service]`: who this process is.
//!
//! Owns the service name and its check. It must not read the environment (the loader applies
//! `WHIZBANG_SERVICE_NAME`) nor start anything.

use super::{Checked, ensure};
use serde::Deserialize;

/// `[service]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Name of this service; every instance of it shares the same store schema and
    /// subscriptions.
    pub name: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: "whizbang-service".into(),
        }
    }
}

impl ServiceConfig {
    pub(super) fn validate(&self) -> Checked {
        ensure(!self.name.trim().is_empty(), "service.name", || {
            "must not be empty".into()
        })
    }
}
