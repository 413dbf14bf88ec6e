//! Admission at the edge: how many dispatches (`local_invoke`, `send`, `publish`, scopes) an
//! instance takes at once, how long a caller waits for room, and the caller's deadline.
//!
//! Owns the in-flight limit and the deadline of each admitted dispatch. The limit adapts
//! (`runtime.adaptive_in_flight`, on by default) between [`FLOOR`] and `runtime.max_in_flight`,
//! additive increase and multiplicative decrease on the time dispatches take once admitted: a
//! dispatch that took more than a quarter of its deadline cuts the limit, quick ones grow it
//! while it is what holds callers back. Offered more than the store or broker can take, the
//! instance then keeps about as much in flight as it finishes well within the deadlines, and
//! refuses the rest with [`DispatchError::Overloaded`], instead of admitting everything up to
//! a fixed ceiling where every dispatch waits out most of its deadline in queues, answers too
//! late, and the instance does work nobody waits for any more (goodput collapse). A caller
//! waits for room at most half its deadline, so an admitted dispatch has the other half.
//!
//! It must not know what a dispatch does: the dispatcher hands it a closure that queues the
//! work and returns the future of its answer.

use crate::config::RuntimeConfig;
use crate::error::DispatchError;
use crate::telemetry::{DispatchMeters, Meters, dispatch_outcome};
use actix::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The lowest the adaptive limit goes (or `runtime.max_in_flight`, if lower).
pub const FLOOR: u32 = 16;
/// Where the adaptive limit starts (or `runtime.max_in_flight`, if lower): it grows from there
/// as soon as callers wait for room while dispatches finish quickly.
const START: u32 = 512;
/// At most one cut per this long: the dispatches admitted before a cut still finish late for a
/// while, and each of them must not cut again.
const CUT_EVERY: Duration = Duration::from_millis(100);
/// The factor of a cut.
const CUT: f64 = 0.8;

/// The edge's backpressure: at most the in-flight limit of dispatches at once, each bounded by
/// its caller's deadline. Shared by the dispatcher and the runtime (which drains it on shutdown).
#[derive(Clone)]
pub(crate) struct Admission {
    in_flight: Arc<Semaphore>,
    /// The limit and the permits it owes the semaphore; `None` with a fixed limit.
    limit: Option<Arc<Mutex<Limit>>>,
    /// Set by [`Admission::drain`]: new dispatches are refused at once.
    closing: Arc<AtomicBool>,
    max_in_flight: u32,
    /// A dispatch's deadline when its options name none.
    pub(crate) default_deadline: Duration,
    /// `whizbang_dispatches_in_flight`.
    pub(crate) meters: Meters,
}

impl Admission {
    pub(crate) fn new(limits: &RuntimeConfig, meters: Meters) -> Admission {
        let max = limits.max_in_flight.max(1);
        let limit = limits
            .adaptive_in_flight
            .then(|| Arc::new(Mutex::new(Limit::new(max))));
        let permits = limit
            .as_ref()
            .map_or(max, |l| l.lock().unwrap_or_else(|p| p.into_inner()).granted);
        meters.dispatch_limit(permits);
        Admission {
            meters,
            in_flight: Arc::new(Semaphore::new(permits as usize)),
            limit,
            closing: Arc::new(AtomicBool::new(false)),
            max_in_flight: max,
            default_deadline: Duration::from_millis(limits.dispatch_timeout_ms),
        }
    }

    /// The in-flight limit now.
    pub(crate) fn limit(&self) -> u32 {
        match &self.limit {
            Some(l) => l.lock().unwrap_or_else(|p| p.into_inner()).target(),
            None => self.max_in_flight,
        }
    }

    /// Stops taking new dispatches (answered [`DispatchError::Unavailable`] at once) and waits, up
    /// to `deadline`, for those in flight to end. Answers how many were still in flight then.
    pub(crate) async fn drain(&self, deadline: Duration) -> u32 {
        self.closing.store(true, Ordering::SeqCst);
        // No dispatch is admitted from here on, and the limit no longer moves: once every
        // dispatch in flight has ended (paying what the limit owes on the way), the semaphore
        // holds `granted - owed` permits.
        let all = match &self.limit {
            Some(l) => {
                let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
                l.frozen = true;
                l.granted - l.owed
            }
            None => self.max_in_flight,
        };
        let left = match tokio::time::timeout(deadline, self.in_flight.acquire_many(all)).await {
            Ok(Ok(permits)) => {
                permits.forget();
                0
            }
            _ => all.saturating_sub(self.in_flight.available_permits() as u32),
        };
        self.in_flight.close();
        left
    }

    /// Runs `start` (which queues the work and returns the future of its answer) once there is
    /// room, and bounds the wait for room and answer by the caller's deadline. With room at
    /// once, `start` runs now, before the handler returns: calls keep their arrival order.
    ///
    /// Past the deadline the caller gets [`DispatchError::Timeout`] and the work goes on in the
    /// background, still holding its place under the limit until it ends. Without room within
    /// half the deadline, [`DispatchError::Overloaded`] and nothing was started.
    pub(crate) fn admit<T: 'static>(
        &self,
        message_type: &'static str,
        counted: DispatchMeters,
        deadline: Option<Duration>,
        start: impl FnOnce() -> ResponseFuture<Result<T, DispatchError>> + 'static,
    ) -> ResponseFuture<Result<T, DispatchError>> {
        if self.closing.load(Ordering::SeqCst) {
            return Box::pin(async move {
                let refused = Err(DispatchError::Unavailable(
                    "the runtime is shutting down".into(),
                ));
                counted.record(dispatch_outcome(&refused));
                refused
            });
        }
        let deadline = deadline.unwrap_or(self.default_deadline);
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Box::pin(answer_within(
                message_type,
                deadline,
                self.admitted(permit, counted, deadline),
                start(),
            )),
            Err(_) => {
                let this = self.clone();
                Box::pin(async move {
                    let asked = Instant::now();
                    let wait = this.in_flight.clone().acquire_owned();
                    let refused = match tokio::time::timeout(deadline / 2, wait).await {
                        Ok(Ok(permit)) => {
                            let left = deadline.saturating_sub(asked.elapsed());
                            let admitted = this.admitted(permit, counted, left);
                            return answer_within(message_type, left, admitted, start()).await;
                        }
                        Ok(Err(_)) => Err(DispatchError::Unavailable(
                            "the runtime is shutting down".into(),
                        )),
                        Err(_) => Err(DispatchError::Overloaded {
                            message_type: message_type.into(),
                            max_in_flight: this.limit(),
                        }),
                    };
                    counted.record(dispatch_outcome(&refused));
                    refused
                })
            }
        }
    }

    fn admitted(
        &self,
        permit: OwnedSemaphorePermit,
        counted: DispatchMeters,
        deadline: Duration,
    ) -> Admitted {
        self.meters.in_flight(1.0);
        Admitted {
            permit: Some(permit),
            at: Instant::now(),
            deadline,
            admission: self.clone(),
            counted,
        }
    }

    /// A dispatch admitted at `at` with `deadline` has ended: the limit learns from it, and its
    /// permit goes back (or is forgotten, when the limit owes one).
    fn ended(&self, permit: OwnedSemaphorePermit, at: Instant, deadline: Duration) {
        self.meters.in_flight(-1.0);
        let Some(limit) = &self.limit else {
            drop(permit);
            return;
        };
        let now = Instant::now();
        let mut l = limit.lock().unwrap_or_else(|p| p.into_inner());
        // Dispatches holding a permit now, the one ending included.
        let in_flight = l
            .granted
            .saturating_sub(self.in_flight.available_permits() as u32);
        match l.learn(now - at, deadline, in_flight, now) {
            Change::Grow(n) => {
                self.in_flight.add_permits(n as usize);
                self.meters.dispatch_limit(l.target());
            }
            Change::Cut(n) => {
                // Available permits go at once; the rest as dispatches in flight end.
                let forgotten = self.in_flight.forget_permits(n as usize) as u32;
                l.cut(n, forgotten);
                self.meters.dispatch_limit(l.target());
            }
            Change::None => {}
        }
        if l.pay_back() {
            permit.forget();
        } else {
            drop(permit);
        }
    }
}

/// A dispatch's place under the limit, counted in `whizbang_dispatches_in_flight` until it is
/// dropped with the work.
pub(crate) struct Admitted {
    permit: Option<OwnedSemaphorePermit>,
    at: Instant,
    deadline: Duration,
    admission: Admission,
    counted: DispatchMeters,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.admission.ended(permit, self.at, self.deadline);
        }
    }
}

/// Awaits `work` for at most `deadline`; past it, answers [`DispatchError::Timeout`] and lets the
/// work finish in the background on this arbiter, its place under the limit held until it does.
async fn answer_within<T: 'static>(
    message_type: &'static str,
    deadline: Duration,
    admitted: Admitted,
    work: ResponseFuture<Result<T, DispatchError>>,
) -> Result<T, DispatchError> {
    let counted = admitted.counted.clone();
    let mut work = Box::pin(async move {
        let answer = work.await;
        drop(admitted);
        answer
    });
    let answer = match tokio::time::timeout(deadline, &mut work).await {
        Ok(answer) => answer,
        Err(_) => {
            actix::spawn(async move {
                let _ = work.await;
            });
            Err(DispatchError::Timeout {
                message_type: message_type.into(),
                deadline_ms: deadline.as_millis() as u64,
            })
        }
    };
    counted.record(dispatch_outcome(&answer));
    answer
}

/// What one ended dispatch changes in the limit.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    /// Grant this many more permits.
    Grow(u32),
    /// Take this many permits back.
    Cut(u32),
}

/// The adaptive in-flight limit: additive increase, multiplicative decrease.
#[derive(Debug)]
struct Limit {
    /// The limit as a real number (increases are fractions of a permit).
    value: f64,
    floor: f64,
    ceiling: f64,
    /// Permits that exist: available or held by a dispatch.
    granted: u32,
    /// Permits cut while they were held: forgotten as the dispatches holding them end.
    owed: u32,
    last_cut: Option<Instant>,
    /// Set while the runtime drains: the limit stays where it is.
    frozen: bool,
}

impl Limit {
    fn new(ceiling: u32) -> Limit {
        let start = START.min(ceiling);
        Limit {
            value: f64::from(start),
            floor: f64::from(FLOOR.min(ceiling)),
            ceiling: f64::from(ceiling),
            granted: start,
            owed: 0,
            last_cut: None,
            frozen: false,
        }
    }

    /// The limit the permits are heading for.
    fn target(&self) -> u32 {
        self.granted - self.owed
    }

    /// A dispatch took `took` of its `deadline`, with `in_flight` dispatches in flight.
    fn learn(
        &mut self,
        took: Duration,
        deadline: Duration,
        in_flight: u32,
        now: Instant,
    ) -> Change {
        if self.frozen {
            return Change::None;
        }
        if took > deadline / 4 {
            // Late: the queues ahead of dispatches are too long for their deadlines.
            if self.last_cut.is_some_and(|t| now - t < CUT_EVERY) {
                return Change::None;
            }
            self.last_cut = Some(now);
            self.value = (self.value * CUT).max(self.floor);
        } else if took <= deadline / 8 && f64::from(in_flight) >= 0.9 * self.value {
            // Quick while the limit is what holds callers back: room for one more (about
            // doubling per round of dispatches, as a slow start).
            self.value = (self.value + 1.0).min(self.ceiling);
        } else {
            return Change::None;
        }
        let target = self.value as u32;
        let now_target = self.target();
        if target > now_target {
            // Pay back what is owed first: the permits still out are as good as granted.
            let mut grow = target - now_target;
            let repaid = grow.min(self.owed);
            self.owed -= repaid;
            grow -= repaid;
            self.granted += grow;
            if grow == 0 {
                Change::None
            } else {
                Change::Grow(grow)
            }
        } else if target < now_target {
            Change::Cut(now_target - target)
        } else {
            Change::None
        }
    }

    /// `cut` permits were taken back, of which `forgotten` were available and are gone; the
    /// rest are owed.
    fn cut(&mut self, cut: u32, forgotten: u32) {
        self.granted -= forgotten;
        self.owed += cut - forgotten;
    }

    /// A permit came back: true when it is to be forgotten (the limit owes one).
    fn pay_back(&mut self) -> bool {
        if self.owed == 0 {
            return false;
        }
        self.owed -= 1;
        self.granted -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn it_starts_at_its_start_or_the_ceiling() {
        assert_eq!(Limit::new(10_000).target(), START);
        assert_eq!(Limit::new(100).target(), 100);
        assert_eq!(Limit::new(100).floor, f64::from(FLOOR));
        assert_eq!(Limit::new(4).floor, 4.0);
    }

    #[test]
    fn late_dispatches_cut_it_at_most_once_per_interval_down_to_the_floor() {
        let mut l = Limit::new(10_000);
        let t0 = Instant::now();
        let late = SECOND / 2;
        assert_eq!(l.learn(late, SECOND, 512, t0), Change::Cut(103));
        l.cut(103, 103);
        assert_eq!(l.target(), 409);
        // Others admitted before the cut end late too: no second cut right away.
        assert_eq!(l.learn(late, SECOND, 512, t0 + CUT_EVERY / 2), Change::None);
        let mut now = t0;
        for _ in 0..100 {
            now += CUT_EVERY;
            if let Change::Cut(n) = l.learn(late, SECOND, 512, now) {
                l.cut(n, n);
            }
        }
        assert_eq!(l.target(), FLOOR);
    }

    #[test]
    fn quick_dispatches_grow_it_only_while_it_holds_callers_back() {
        let mut l = Limit::new(10_000);
        let now = Instant::now();
        let quick = SECOND / 100;
        // Far under the limit: nothing to learn.
        assert_eq!(l.learn(quick, SECOND, 10, now), Change::None);
        assert_eq!(l.learn(quick, SECOND, 512, now), Change::Grow(1));
        assert_eq!(l.target(), 513);
        // In between (an eighth to a quarter of the deadline): held.
        assert_eq!(l.learn(SECOND / 5, SECOND, 513, now), Change::None);
        // Never past the ceiling.
        let mut small = Limit::new(20);
        for _ in 0..50 {
            let _ = small.learn(quick, SECOND, 20, now);
        }
        assert_eq!(small.target(), 20);
    }

    #[test]
    fn growth_repays_what_a_cut_still_owes_before_granting_more() {
        let mut l = Limit::new(10_000);
        let now = Instant::now();
        assert_eq!(l.learn(SECOND, SECOND, 512, now), Change::Cut(103));
        // None of the 103 was available: all owed, forgotten as dispatches end.
        l.cut(103, 0);
        assert_eq!((l.target(), l.granted, l.owed), (409, 512, 103));
        assert_eq!(l.learn(SECOND / 100, SECOND, 409, now), Change::None);
        assert_eq!((l.target(), l.owed), (410, 102));
        assert!(l.pay_back());
        assert_eq!((l.target(), l.granted, l.owed), (410, 511, 101));
    }

    #[test]
    fn a_frozen_limit_does_not_move() {
        let mut l = Limit::new(10_000);
        l.frozen = true;
        assert_eq!(l.learn(SECOND, SECOND, 512, Instant::now()), Change::None);
        assert_eq!(l.target(), START);
    }
}
