//! Pins the actix behaviours the design depends on (`docs/architecture.md`, "actix facts that
//! bite"). If an actix upgrade changes one of them, this file says which design decision to
//! revisit.

use actix::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Trace = Arc<Mutex<Vec<String>>>;

struct Recorder {
    trace: Trace,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

/// Handled with a plain async response: actix starts the next message while this one awaits.
struct Plain(&'static str);
impl Message for Plain {
    type Result = ();
}

impl Handler<Plain> for Recorder {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: Plain, _ctx: &mut Self::Context) -> Self::Result {
        let trace = self.trace.clone();
        Box::pin(async move {
            trace.lock().unwrap().push(format!("start {}", msg.0));
            tokio::time::sleep(Duration::from_millis(20)).await;
            trace.lock().unwrap().push(format!("end {}", msg.0));
        })
    }
}

/// Handled with `AtomicResponse`: the mailbox waits until this one is done.
struct Atomic(&'static str);
impl Message for Atomic {
    type Result = ();
}

impl Handler<Atomic> for Recorder {
    type Result = AtomicResponse<Self, ()>;
    fn handle(&mut self, msg: Atomic, _ctx: &mut Self::Context) -> Self::Result {
        let trace = self.trace.clone();
        AtomicResponse::new(Box::pin(
            async move {
                trace.lock().unwrap().push(format!("start {}", msg.0));
                tokio::time::sleep(Duration::from_millis(20)).await;
                trace.lock().unwrap().push(format!("end {}", msg.0));
            }
            .into_actor(self),
        ))
    }
}

/// Why partition actors queue jobs and pump them one at a time instead of awaiting in the handler.
#[actix_rt::test]
async fn async_handlers_interleave_unless_atomic() {
    let trace = Trace::default();
    let addr = Recorder {
        trace: trace.clone(),
    }
    .start();
    let (a, b) = (addr.send(Plain("a")), addr.send(Plain("b")));
    let _ = futures::join!(a, b);
    assert_eq!(
        *trace.lock().unwrap(),
        vec!["start a", "start b", "end a", "end b"],
        "plain async handlers overlap"
    );
    trace.lock().unwrap().clear();
    let (a, b) = (addr.send(Atomic("a")), addr.send(Atomic("b")));
    let _ = futures::join!(a, b);
    assert_eq!(
        *trace.lock().unwrap(),
        vec!["start a", "end a", "start b", "end b"],
        "atomic handlers run one after another"
    );
}

struct Stop;
impl Message for Stop {
    type Result = ();
}
impl Handler<Stop> for Recorder {
    type Result = ();
    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Why every path that must not lose work uses `send(..).await`: `do_send` to a stopped actor
/// drops the message without a word, while `send` reports it.
#[actix_rt::test]
async fn do_send_to_a_stopped_actor_is_silent_send_is_not() {
    let trace = Trace::default();
    let addr = Recorder {
        trace: trace.clone(),
    }
    .start();
    addr.send(Stop).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while addr.connected() {
        assert!(std::time::Instant::now() < deadline, "actor did not stop");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    addr.do_send(Plain("lost"));
    assert!(matches!(
        addr.send(Plain("refused")).await,
        Err(MailboxError::Closed)
    ));
    assert!(trace.lock().unwrap().is_empty(), "nothing was handled");
}

struct Restartable {
    starts: Arc<Mutex<u32>>,
}
impl Actor for Restartable {
    type Context = Context<Self>;
    fn started(&mut self, _ctx: &mut Self::Context) {
        *self.starts.lock().unwrap() += 1;
    }
}
impl Supervised for Restartable {}
impl Handler<Stop> for Restartable {
    type Result = ();
    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// Why handler actors catch panics themselves: a `Supervisor` restarts an actor that stops (this
/// test), but a panic is not a stop, so it is turned into a failed message before it escapes.
#[actix_rt::test]
async fn supervisor_restarts_a_stopped_actor() {
    let starts = Arc::new(Mutex::new(0));
    let s = starts.clone();
    let addr = Supervisor::start(move |_| Restartable { starts: s.clone() });
    addr.send(Stop).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while *starts.lock().unwrap() < 2 {
        assert!(std::time::Instant::now() < deadline, "not restarted");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Same address, still serving after the restart.
    addr.send(Stop).await.unwrap();
}
