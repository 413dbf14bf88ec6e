//! What the instance admits from its callers: at most `runtime.max_in_flight` dispatches at
//! once, or fewer under the adaptive limit (a caller beyond it waits up to half its deadline,
//! then gets `Overloaded`, and nothing of its command runs), and a deadline on every dispatch
//! (past it `Timeout`, which says the work may still commit; the work goes on, holding its place
//! under the limit until it ends).
//! In-memory store: the limits live at the edge, before any store.

use crate::support::{Bump, Bumped, DEADLINE, config, holds_for, unique, wait_until};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use whizbang::{
    Decision, DispatchError, DispatchOptions, LocalInvoke, Receptor, ReceptorContext,
    ReceptorError, Runtime,
};

/// A receptor that holds every command at a gate until the test opens it.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    entered: Arc<AtomicUsize>,
}

impl Gated {
    fn new() -> Gated {
        Gated {
            gate: Arc::new(Semaphore::new(0)),
            entered: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn entered(&self) -> usize {
        self.entered.load(Ordering::SeqCst)
    }
}

impl Receptor<Bump> for Gated {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Bump,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _pass = self
            .gate
            .acquire()
            .await
            .map_err(|e| ReceptorError::Internal(e.to_string()))?;
        Ok(Decision::event(Bumped::new(cmd.stream, cmd.seq)))
    }
}

async fn start(max_in_flight: u32, gated: &Gated) -> anyhow::Result<Runtime> {
    let mut c = config("admission");
    c.runtime.max_in_flight = max_in_flight;
    Ok(Runtime::builder(c)
        .receptor::<Bump, _>(gated.clone())
        .start()
        .await?)
}

fn within(deadline: Duration) -> DispatchOptions {
    DispatchOptions {
        deadline: Some(deadline),
        ..DispatchOptions::default()
    }
}

fn bump(stream: &str) -> Bump {
    Bump {
        stream: stream.into(),
        seq: 1,
    }
}

#[actix::test]
async fn a_caller_beyond_the_in_flight_limit_is_refused_after_its_deadline_and_nothing_runs()
-> anyhow::Result<()> {
    let gated = Gated::new();
    let rt = start(2, &gated).await?;
    let (a, b, c) = (unique("adm-a"), unique("adm-b"), unique("adm-c"));

    // Two callers take the two places and wait at the gate.
    let dispatcher = rt.dispatcher();
    let held: Vec<_> = [a.clone(), b.clone()]
        .into_iter()
        .map(|stream| {
            let d = dispatcher.clone();
            actix::spawn(async move {
                d.send(LocalInvoke::<Bump, Bumped>::new(bump(&stream)))
                    .await
            })
        })
        .collect();
    wait_until("both held commands at the gate", || gated.entered() == 2).await?;

    let asked = Instant::now();
    let refused = rt
        .local_invoke_with::<_, Bumped>(bump(&c), within(Duration::from_millis(200)))
        .await;
    let waited = asked.elapsed();
    match refused {
        Err(e @ DispatchError::Overloaded { .. }) => {
            anyhow::ensure!(e.http_status() == 503 && e.is_retryable(), "{e}");
            anyhow::ensure!(e.retry_after().is_some(), "a retry hint: {e}");
            anyhow::ensure!(e.to_string().contains("runtime.max_in_flight"), "{e}");
        }
        other => anyhow::bail!("expected Overloaded, got {other:?}"),
    }
    anyhow::ensure!(
        waited >= Duration::from_millis(100) && waited < Duration::from_secs(5),
        "waited half its deadline for room, no longer: {waited:?}"
    );
    anyhow::ensure!(
        gated.entered() == 2,
        "the refused command never reached its receptor"
    );

    gated.open();
    for call in held {
        let done: Bumped = call.await??.map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(done.seq == 1);
    }
    // Room again: the same command goes through.
    let later: Bumped = rt.local_invoke_with(bump(&c), within(DEADLINE)).await?;
    anyhow::ensure!(later.stream == c);
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn past_its_deadline_a_caller_is_told_the_work_may_still_commit_and_it_does()
-> anyhow::Result<()> {
    let gated = Gated::new();
    let rt = start(1, &gated).await?;
    let stream = unique("adm-late");

    let late = rt
        .local_invoke_with::<_, Bumped>(bump(&stream), within(Duration::from_millis(200)))
        .await;
    match late {
        Err(e @ DispatchError::Timeout { .. }) => {
            anyhow::ensure!(e.http_status() == 504, "{e}");
            anyhow::ensure!(!e.is_retryable(), "a blind retry could run it twice: {e}");
            anyhow::ensure!(e.to_string().contains("may still commit"), "{e}");
        }
        other => anyhow::bail!("expected Timeout, got {other:?}"),
    }

    // The timed-out work still holds the only place: the next caller is refused.
    let next = rt
        .local_invoke_with::<_, Bumped>(
            bump(&unique("adm-next")),
            within(Duration::from_millis(100)),
        )
        .await;
    anyhow::ensure!(
        matches!(next, Err(DispatchError::Overloaded { .. })),
        "the late work keeps its place until it ends: {next:?}"
    );

    // Once the receptor goes on, the late command commits, and its place is free again.
    gated.open();
    let stored = || async {
        rt.store()
            .read_stream(&stream, 0)
            .await
            .map(|events| events.len())
            .unwrap_or(0)
    };
    let started = Instant::now();
    while stored().await != 1 {
        anyhow::ensure!(
            started.elapsed() < DEADLINE,
            "the late command never committed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after: Bumped = rt
        .local_invoke_with(bump(&unique("adm-after")), within(DEADLINE))
        .await?;
    anyhow::ensure!(after.seq == 1);
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn shutdown_lets_the_dispatches_in_flight_finish_and_takes_no_new_ones() -> anyhow::Result<()>
{
    let gated = Gated::new();
    let rt = start(4, &gated).await?;
    let dispatcher = rt.dispatcher();
    let stream = unique("adm-stop");
    let held = {
        let d = dispatcher.clone();
        let stream = stream.clone();
        actix::spawn(async move {
            d.send(LocalInvoke::<Bump, Bumped>::new(bump(&stream)))
                .await
        })
    };
    wait_until("the held command at the gate", || gated.entered() == 1).await?;

    let stopping = actix::spawn(rt.shutdown());
    // While the held command runs, shutdown waits for it...
    holds_for(
        "shutdown waiting for the dispatch in flight",
        Duration::from_millis(200),
        || !stopping.is_finished(),
    )
    .await?;
    // ...and takes nothing new.
    let refused = tokio::time::timeout(
        DEADLINE,
        dispatcher.send(LocalInvoke::<Bump, Bumped>::new(bump(&unique("adm-new")))),
    )
    .await??;
    anyhow::ensure!(
        matches!(refused, Err(DispatchError::Unavailable(_))),
        "a dispatch during shutdown is refused: {refused:?}"
    );
    anyhow::ensure!(gated.entered() == 1, "the refused command never ran");

    gated.open();
    let done = held.await??.map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        done.stream == stream,
        "the command in flight finished: {done:?}"
    );
    tokio::time::timeout(DEADLINE, stopping).await???;
    Ok(())
}

#[actix::test]
async fn shutdown_stops_waiting_for_stuck_work_at_its_deadline() -> anyhow::Result<()> {
    let gated = Gated::new();
    let mut c = config("admission-stop");
    c.runtime.shutdown_timeout_ms = 300;
    let rt = Runtime::builder(c)
        .receptor::<Bump, _>(gated.clone())
        .start()
        .await?;
    let d = rt.dispatcher();
    let _held = actix::spawn(async move {
        d.send(LocalInvoke::<Bump, Bumped>::new(bump(&unique("adm-stuck"))))
            .await
    });
    wait_until("the held command at the gate", || gated.entered() == 1).await?;
    // The command never ends: shutdown waits for it up to its deadline, then writes what is
    // queued and releases the leases anyway (the next holder re-runs what was left).
    let asked = Instant::now();
    rt.shutdown().await?;
    let took = asked.elapsed();
    anyhow::ensure!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "gave up waiting at its deadline, not before or long after: {took:?}"
    );
    Ok(())
}

#[actix::test]
async fn a_command_whose_caller_gave_up_before_it_ran_is_not_run() -> anyhow::Result<()> {
    let gated = Gated::new();
    let rt = start(100, &gated).await?;
    let stream = unique("adm-gave-up");
    // The first command of the stream waits at the gate; the second queues behind it on the
    // same partition actor, with a short deadline.
    let dispatcher = rt.dispatcher();
    let first = {
        let (d, stream) = (dispatcher.clone(), stream.clone());
        actix::spawn(async move {
            d.send(LocalInvoke::<Bump, Bumped>::new(bump(&stream)))
                .await
        })
    };
    wait_until("the first command at the gate", || gated.entered() == 1).await?;
    let second = rt
        .local_invoke_with::<_, Bumped>(
            Bump {
                stream: stream.clone(),
                seq: 2,
            },
            within(Duration::from_millis(200)),
        )
        .await;
    anyhow::ensure!(
        matches!(second, Err(DispatchError::Timeout { .. })),
        "expected Timeout, got {second:?}"
    );
    gated.open();
    let first: Bumped = first.await??.map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(first.seq == 1);
    // The second command's receptor never runs: its caller was gone when its turn came.
    holds_for(
        "the abandoned command not run",
        Duration::from_millis(500),
        || gated.entered() == 1,
    )
    .await?;
    let stored = rt.store().read_all(0, 100).await?;
    anyhow::ensure!(stored.len() == 1, "one event stored: {}", stored.len());
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn the_adaptive_limit_comes_down_when_dispatches_finish_late_and_grows_when_it_binds()
-> anyhow::Result<()> {
    let gated = Gated::new();
    let rt = start(10_000, &gated).await?;
    anyhow::ensure!(rt.dispatch_limit() == 512, "it starts at 512");

    // Dispatches held past a quarter of their deadline finish late: the limit is cut.
    let dispatcher = rt.dispatcher();
    let held: Vec<_> = (0..32)
        .map(|_| {
            let d = dispatcher.clone();
            let command = LocalInvoke::<Bump, Bumped>::new(bump(&unique("adm-slow")))
                .with_options(within(Duration::from_millis(800)));
            actix::spawn(async move { d.send(command).await })
        })
        .collect();
    wait_until("a held command at the gate", || gated.entered() >= 1).await?;
    // Held on purpose: a quarter of their deadline is 200 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gated.open();
    for call in held {
        call.await??.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let cut = rt.dispatch_limit();
    anyhow::ensure!(cut < 512, "late dispatches cut the limit: {cut}");

    // Quick dispatches while every place is taken (more callers than the limit) grow it.
    let calls: Vec<_> = (0..cut as usize + 200)
        .map(|_| {
            let d = dispatcher.clone();
            let command = LocalInvoke::<Bump, Bumped>::new(bump(&unique("adm-quick")))
                .with_options(within(DEADLINE * 4));
            actix::spawn(async move { d.send(command).await })
        })
        .collect();
    for call in calls {
        call.await??.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let grown = rt.dispatch_limit();
    anyhow::ensure!(
        grown > cut,
        "quick dispatches that waited for room grew it: {cut} -> {grown}"
    );
    rt.shutdown().await?;
    Ok(())
}
