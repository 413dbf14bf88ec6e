//! `[coordinator]`: when queued work is written and how it is batched.
//!
//! Owns the flush strategy, the timers and the batch sizes, and their checks. It must not
//! schedule anything (the coordinator does).

use super::{Checked, at_least_one, within};
use serde::Deserialize;

/// When queued work is written to the store (the seed's three strategies). With `Immediate`
/// and `Scoped`, completions of processed rows are written by the `flush_interval_ms` timer
/// rather than with a caller's unit (see the coordinator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushStrategy {
    /// Every unit of work is written in its own round trip as soon as it is queued.
    Immediate,
    /// Written at the end of the unit of work (a dispatch, or an explicit scope); units that end
    /// while a write is in flight are coalesced into the next one (group commit).
    Scoped,
    /// Written by a timer every `flush_interval_ms`: highest throughput, highest latency.
    Interval,
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// When queued work is written.
    pub flush_strategy: FlushStrategy,
    /// Timer of the interval strategy; also how soon completions are written when nothing
    /// else is.
    pub flush_interval_ms: u64,
    /// Fallback poll for claimable work (stores wake the coordinator when work arrives).
    pub poll_interval_ms: u64,
    /// Rows claimed per queue per batch.
    pub claim_batch_size: u32,
    /// Most units (and reports) written in one batch.
    pub max_batch_size: u32,
    /// Batches written at once, each on its own pooled connection.
    pub max_batches_in_flight: u32,
    /// Longest run of one receptor or perspective call. Past it a receptor's command fails
    /// with `DispatchError::HandlerTimedOut` (nothing written), and a perspective's event counts
    /// as a failed attempt (retried with backoff, then dead-lettered). Only a handler that
    /// awaits can be stopped: code that blocks its thread is not interrupted.
    pub handler_timeout_ms: u64,
    /// Most rows of each queue (inbox, outbox) handed to partition actors or the publisher and
    /// not reported back yet. Claims take only what fits under it; the rest waits in the
    /// store, claimed as reports free room.
    pub max_rows_in_flight: u32,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            flush_strategy: FlushStrategy::Scoped,
            flush_interval_ms: 100,
            poll_interval_ms: 5_000,
            claim_batch_size: 100,
            max_batch_size: 1_000,
            max_batches_in_flight: 2,
            handler_timeout_ms: 30_000,
            max_rows_in_flight: 10_000,
        }
    }
}

impl CoordinatorConfig {
    pub(super) fn validate(&self) -> Checked {
        within(
            "coordinator.flush_interval_ms",
            self.flush_interval_ms,
            1,
            60_000,
        )?;
        at_least_one(&[
            ("coordinator.poll_interval_ms", self.poll_interval_ms),
            ("coordinator.handler_timeout_ms", self.handler_timeout_ms),
            (
                "coordinator.max_rows_in_flight",
                self.max_rows_in_flight.into(),
            ),
            ("coordinator.claim_batch_size", self.claim_batch_size.into()),
            ("coordinator.max_batch_size", self.max_batch_size.into()),
            (
                "coordinator.max_batches_in_flight",
                self.max_batches_in_flight.into(),
            ),
        ])
    }
}
