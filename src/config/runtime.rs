//! `[runtime]`: what the instance admits from its callers.
//!
//! Owns the in-flight limit, the default deadline of a dispatch, the shutdown deadline and the
//! restart budget of supervised actors, and their checks. It must not enforce them (the
//! dispatcher, the runtime and the supervisor do).

use super::{Checked, at_least_one};
use serde::Deserialize;

/// `[runtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Most dispatches (`local_invoke`, `send`, `publish`) in the instance at once, from the call
    /// until its work is done; a caller beyond it waits for room up to half its deadline, then
    /// gets `DispatchError::Overloaded`.
    pub max_in_flight: u32,
    /// The in-flight limit adapts below `max_in_flight` (from 512, between 16 and it) to the time
    /// dispatches take once admitted: cut when they take more than a quarter of their deadline,
    /// grown while quick ones wait for room. Off: the limit is `max_in_flight`.
    pub adaptive_in_flight: bool,
    /// A dispatch's deadline when its `DispatchOptions` name none: past it the caller gets
    /// `DispatchError::Timeout` (the work may still commit).
    pub dispatch_timeout_ms: u64,
    /// How long `Runtime::shutdown` lets the dispatches in flight finish and the store write
    /// what is queued before it gives up; past it the leases are left to expire and the next
    /// holder re-runs what was left (at least once, as documented).
    pub shutdown_timeout_ms: u64,
    /// Restarts of supervised actors (after a panic or an unexpected stop) tolerated within
    /// `restart_window_seconds`; one more turns `Runtime::health` not live, and the instance
    /// should be replaced.
    pub max_restarts: u32,
    /// The window over which `max_restarts` is counted.
    pub restart_window_seconds: u64,
    /// Threads (actix arbiters) running the partition actors, and so the receptors and
    /// perspectives; 0: one per core the process may use. The coordinator and the publisher run
    /// on a thread of their own besides these.
    pub worker_threads: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_in_flight: 10_000,
            adaptive_in_flight: true,
            dispatch_timeout_ms: 30_000,
            shutdown_timeout_ms: 10_000,
            max_restarts: 5,
            restart_window_seconds: 60,
            worker_threads: 0,
        }
    }
}

impl RuntimeConfig {
    pub(super) fn validate(&self) -> Checked {
        at_least_one(&[
            ("runtime.max_in_flight", self.max_in_flight.into()),
            ("runtime.dispatch_timeout_ms", self.dispatch_timeout_ms),
            ("runtime.shutdown_timeout_ms", self.shutdown_timeout_ms),
            (
                "runtime.restart_window_seconds",
                self.restart_window_seconds,
            ),
        ])
    }
}
