//! Optimistic concurrency: a decision that expects a stream at a version it is not at gets a
//! typed conflict and writes nothing (no event, no outbox row, no perspective run); a correct
//! expectation commits; other work committed alongside is unaffected.

use crate::support::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use whizbang::store::CorrelationStatus;
use whizbang::transport::memory::MemoryBus;
use whizbang::{
    Command, Decision, DispatchError, DispatchOptions, ExpectedVersion, Message, Receptor,
    ReceptorContext, ReceptorError, Runtime, SendCommand,
};

const TOPIC: &str = "appends";

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Expect {
    Any,
    NoStream,
    Exact(u64),
}

impl From<Expect> for ExpectedVersion {
    fn from(e: Expect) -> Self {
        match e {
            Expect::Any => ExpectedVersion::Any,
            Expect::NoStream => ExpectedVersion::NoStream,
            Expect::Exact(v) => ExpectedVersion::Exact(v),
        }
    }
}

/// Appends `Bumped { seq }` to `stream`, expecting `guard` (default: `stream`) at `expect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Append {
    stream: String,
    seq: u32,
    expect: Option<Expect>,
    guard: Option<String>,
}

impl Append {
    fn new(stream: &str, seq: u32, expect: Option<Expect>) -> Append {
        Append {
            stream: stream.into(),
            seq,
            expect,
            guard: None,
        }
    }
}

impl Message for Append {
    const TYPE_NAME: &'static str = "vc.Append";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Append {}

struct AppendReceptor;

impl Receptor<Append> for AppendReceptor {
    type Result = u32;

    async fn handle(
        &self,
        cmd: Append,
        _ctx: ReceptorContext,
    ) -> Result<Decision<u32>, ReceptorError> {
        let mut d = Decision::new(cmd.seq).emit(&Bumped::new(&cmd.stream, cmd.seq));
        if let Some(expect) = cmd.expect {
            d = d.expect_version(cmd.guard.unwrap_or(cmd.stream), expect.into());
        }
        Ok(d)
    }
}

struct Setup {
    rt: Runtime,
    remote_rt: Runtime,
    local: Recorder,
    remote: Recorder,
}

async fn setup() -> anyhow::Result<Setup> {
    let bus = MemoryBus::new();
    let remote = Recorder::new();
    let remote_rt = on_bus(subscribed(config("vc-remote"), TOPIC, "remote"), &bus)
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await?;
    let local = Recorder::new();
    let rt = on_bus(publishing(config("vc"), Bumped::TYPE_NAME, TOPIC), &bus)
        .receptor::<Append, _>(AppendReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;
    Ok(Setup {
        rt,
        remote_rt,
        local,
        remote,
    })
}

fn expect_conflict(
    e: Option<DispatchError>,
    stream: &str,
    expected: ExpectedVersion,
    actual: u64,
) -> anyhow::Result<()> {
    let e = e.ok_or_else(|| anyhow::anyhow!("a stale expectation committed"))?;
    anyhow::ensure!(e.is_conflict(), "is_conflict() of {e}");
    anyhow::ensure!(e.http_status() == 409, "http {} of {e}", e.http_status());
    match &e {
        DispatchError::VersionConflict {
            stream_id,
            expected: exp,
            actual: act,
        } => {
            anyhow::ensure!(
                stream_id == stream && *exp == expected && *act == actual,
                "got {e:?}, wanted {stream} {expected:?} {actual}"
            );
            anyhow::ensure!(e.to_string().contains(stream), "{e}");
            Ok(())
        }
        other => anyhow::bail!("expected VersionConflict, got {other:?}"),
    }
}

fn stored_seqs(events: &[whizbang::store::StoredEvent]) -> anyhow::Result<Vec<u32>> {
    Ok(events
        .iter()
        .map(|e| whizbang::message::decode::<Bumped>(&e.envelope.payload).map(|b| b.seq))
        .collect::<Result<_, _>>()?)
}

#[actix::test]
async fn a_stale_expected_version_conflicts_and_writes_nothing() -> anyhow::Result<()> {
    let s = setup().await?;
    let stream = unique("acct");
    for seq in 1..=2 {
        let _: u32 = s.rt.local_invoke(Append::new(&stream, seq, None)).await?;
    }

    // Stale, by local_invoke and by send, each under a known correlation id.
    let corr = Uuid::now_v7();
    let opts = DispatchOptions {
        correlation_id: Some(corr),
        ..DispatchOptions::default()
    };
    let r =
        s.rt.local_invoke_with::<Append, u32>(
            Append::new(&stream, 98, Some(Expect::Exact(1))),
            opts.clone(),
        )
        .await;
    expect_conflict(r.err(), &stream, ExpectedVersion::Exact(1), 2)?;
    let r = s
        .rt
        .dispatcher()
        .send(SendCommand::new(Append::new(&stream, 99, Some(Expect::NoStream))).with_options(opts))
        .await?;
    expect_conflict(r.err(), &stream, ExpectedVersion::NoStream, 2)?;
    anyhow::ensure!(s.rt.status(corr).await? == CorrelationStatus::default());
    let stored = s.rt.store().read_stream(&stream, 1).await?;
    anyhow::ensure!(
        stored_seqs(&stored)? == vec![1, 2],
        "{:?}",
        stored_seqs(&stored)
    );

    // The right expectation commits, as version 3.
    let receipt =
        s.rt.send(Append::new(&stream, 3, Some(Expect::Exact(2))))
            .await?;
    anyhow::ensure!(
        receipt.events.len() == 1 && receipt.events[0].version == 3,
        "{receipt:?}"
    );
    let r: u32 =
        s.rt.local_invoke(Append::new(&stream, 4, Some(Expect::Exact(3))))
            .await?;
    anyhow::ensure!(r == 4);
    let r: u32 =
        s.rt.local_invoke(Append::new(&stream, 5, Some(Expect::Any)))
            .await?;
    anyhow::ensure!(r == 5);

    // Neither perspective here nor the other service ever saw the refused events.
    wait_until("the other service", || s.remote.seqs(&stream).len() >= 5).await?;
    anyhow::ensure!(
        s.local.seqs(&stream) == vec![1, 2, 3, 4, 5],
        "{:?}",
        s.local.seqs(&stream)
    );
    anyhow::ensure!(
        s.remote.seqs(&stream) == vec![1, 2, 3, 4, 5],
        "{:?}",
        s.remote.seqs(&stream)
    );
    let stored = s.rt.store().read_stream(&stream, 1).await?;
    anyhow::ensure!(stored_seqs(&stored)? == vec![1, 2, 3, 4, 5]);
    anyhow::ensure!(stored.iter().map(|e| e.version).eq(1..=5));
    s.rt.shutdown().await?;
    s.remote_rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn no_stream_and_cross_stream_expectations() -> anyhow::Result<()> {
    let s = setup().await?;
    let fresh = unique("fresh");
    let _: u32 =
        s.rt.local_invoke(Append::new(&fresh, 1, Some(Expect::NoStream)))
            .await?;
    let r =
        s.rt.local_invoke::<Append, u32>(Append::new(&fresh, 2, Some(Expect::NoStream)))
            .await;
    expect_conflict(r.err(), &fresh, ExpectedVersion::NoStream, 1)?;

    // An expectation on another stream guards this stream's write.
    let (target, guard) = (unique("target"), unique("guard"));
    let mut cmd = Append::new(&target, 1, Some(Expect::NoStream));
    cmd.guard = Some(guard.clone());
    let _: u32 = s.rt.local_invoke(cmd.clone()).await?;
    let _: u32 = s.rt.local_invoke(Append::new(&guard, 1, None)).await?;
    cmd.seq = 2;
    let r = s.rt.local_invoke::<Append, u32>(cmd).await;
    expect_conflict(r.err(), &guard, ExpectedVersion::NoStream, 1)?;
    anyhow::ensure!(stored_seqs(&s.rt.store().read_stream(&target, 1).await?)? == vec![1]);
    anyhow::ensure!(s.local.seqs(&target) == vec![1]);
    s.rt.shutdown().await?;
    s.remote_rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn concurrent_writers_with_one_expectation_exactly_one_wins() -> anyhow::Result<()> {
    let s = setup().await?;
    let stream = unique("race");
    for seq in 1..=3 {
        let _: u32 = s.rt.local_invoke(Append::new(&stream, seq, None)).await?;
    }
    // Ten writers expect version 3 at once, while other streams are written alongside.
    let racers = (0..10u32).map(|i| {
        s.rt.send(Append::new(&stream, 100 + i, Some(Expect::Exact(3))))
    });
    let others: Vec<String> = (0..10).map(|i| unique(&format!("bystander-{i}"))).collect();
    let bystanders = others
        .iter()
        .map(|o| s.rt.send(Append::new(o, 1, Some(Expect::NoStream))));
    let (raced, bystood) = futures::join!(
        futures::future::join_all(racers),
        futures::future::join_all(bystanders)
    );
    let winners: Vec<_> = raced.iter().filter(|r| r.is_ok()).collect();
    anyhow::ensure!(
        winners.len() == 1,
        "{} writers won: {raced:?}",
        winners.len()
    );
    for r in raced.iter().filter(|r| r.is_err()) {
        expect_conflict(r.clone().err(), &stream, ExpectedVersion::Exact(3), 4)?;
    }
    for (o, r) in others.iter().zip(bystood) {
        let receipt = r?;
        anyhow::ensure!(
            receipt.events.len() == 1 && receipt.events[0].version == 1,
            "{o}"
        );
    }
    let stored = s.rt.store().read_stream(&stream, 1).await?;
    let seqs = stored_seqs(&stored)?;
    anyhow::ensure!(
        seqs.len() == 4 && seqs[..3] == [1, 2, 3] && seqs[3] >= 100,
        "{seqs:?}"
    );
    wait_until("the perspective", || s.local.seqs(&stream).len() >= 4).await?;
    anyhow::ensure!(s.local.seqs(&stream) == seqs, "{:?}", s.local.seqs(&stream));
    s.rt.shutdown().await?;
    s.remote_rt.shutdown().await?;
    Ok(())
}
