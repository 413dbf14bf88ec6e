//! Without the cargo feature `metrics`: the same handles, recording nothing (no field, no
//! code behind any call).

use crate::store::{Backlog, FailureKind, Queue};
use crate::supervision::ActorKind;
use std::time::Duration;

/// Records nothing.
#[derive(Clone)]
pub(crate) struct Meters;

impl Meters {
    pub(crate) fn new(_serve: bool) -> Meters {
        Meters
    }
    pub(crate) fn noop() -> Meters {
        Meters
    }
    pub(crate) fn wants_backlog(&self) -> bool {
        false
    }
    pub(crate) fn dispatch(&self, _message_type: &'static str) -> DispatchMeters {
        DispatchMeters
    }
    pub(crate) fn in_flight(&self, _delta: f64) {}
    pub(crate) fn dispatch_limit(&self, _limit: u32) {}
    pub(crate) fn receptor(&self, _message_type: &str) -> HandlerMeters {
        HandlerMeters
    }
    pub(crate) fn perspective(&self, _name: &str) -> HandlerMeters {
        HandlerMeters
    }
    pub(crate) fn publish(&self, _topic: &str) -> PublishMeters {
        PublishMeters
    }
    pub(crate) fn settle(&self, _topic: &str, _name: &str) -> SettleMeters {
        SettleMeters
    }
    pub(crate) fn work_batch(&self, _ok: bool, _elapsed: Duration, _sizes: (usize, usize, usize)) {}
    pub(crate) fn backlog(&self, _backlog: &[Backlog]) {}
    pub(crate) fn rows_in_flight(&self, _inbox: usize, _outbox: usize) {}
    pub(crate) fn retry(&self, _queue: Queue, _kind: FailureKind) {}
    pub(crate) fn dead_lettered(&self, _rows: usize) {}
    pub(crate) fn leases(
        &self,
        _held: usize,
        _acquired: usize,
        _released: usize,
        _taken_over: usize,
    ) {
    }
    pub(crate) fn restarted(&self, _kind: ActorKind) {}
}

/// Records nothing.
#[derive(Clone)]
pub(crate) struct DispatchMeters;

impl DispatchMeters {
    pub(crate) fn record(&self, _outcome: usize) {}
}

/// Records nothing.
#[derive(Clone)]
pub(crate) struct HandlerMeters;

impl HandlerMeters {
    pub(crate) fn record(&self, _ok: bool, _elapsed: Duration) {}
}

/// Records nothing.
pub(crate) struct PublishMeters;

impl PublishMeters {
    pub(crate) fn record(&self, _failed: Option<bool>) {}
}

/// Records nothing.
#[derive(Clone)]
pub(crate) struct SettleMeters;

impl SettleMeters {
    pub(crate) fn accepted(&self, _n: usize) {}
    pub(crate) fn rejected(&self) {}
    pub(crate) fn released(&self, _n: usize) {}
}
