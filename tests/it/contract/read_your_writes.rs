//! Contract 7: `local_invoke` returns only after the perspectives of the returned events have
//! run, so the read model shows the write right after the call — also when a perspective is
//! slow, when the decision has several events on several streams, and under concurrency.

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use whizbang::{
    Command, Decision, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

/// Waits before recording: the read model is written well after the event was committed.
#[derive(Clone, Default)]
struct Slow(Recorder);

impl Perspective<Bumped> for Slow {
    async fn apply(&self, event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.0.apply(event, meta).await
    }
}

async fn start(slow: Option<&Slow>) -> anyhow::Result<(Runtime, Recorder)> {
    let fast = Recorder::new();
    let mut b = Runtime::builder(config("ryw"))
        .receptor::<Bump, _>(BumpReceptor)
        .receptor::<Pair, _>(PairReceptor)
        .perspective::<Bumped, _>("fast", fast.clone());
    if let Some(slow) = slow {
        b = b.perspective::<Bumped, _>("slow", slow.clone());
    }
    Ok((b.start().await?, fast))
}

#[actix::test]
async fn the_read_model_has_the_write_right_after_each_local_invoke() -> anyhow::Result<()> {
    let (rt, fast) = start(None).await?;
    let streams: Vec<String> = (0..10).map(|i| unique(&format!("ryw-{i}"))).collect();
    for seq in 1..=20u32 {
        for stream in &streams {
            let r: Bumped = rt
                .local_invoke(Bump {
                    stream: stream.clone(),
                    seq,
                })
                .await?;
            anyhow::ensure!(r.seq == seq);
            let seen = fast.seqs(stream);
            anyhow::ensure!(
                seen == (1..=seq).collect::<Vec<_>>(),
                "{stream}: right after local_invoke #{seq} the read model has {seen:?}"
            );
        }
    }
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_slow_perspective_is_still_visible_right_after_the_call() -> anyhow::Result<()> {
    let slow = Slow::default();
    let (rt, fast) = start(Some(&slow)).await?;
    let stream = unique("slow");
    for seq in 1..=15u32 {
        let _: Bumped = rt
            .local_invoke(Bump {
                stream: stream.clone(),
                seq,
            })
            .await?;
        let want: Vec<u32> = (1..=seq).collect();
        anyhow::ensure!(
            slow.0.seqs(&stream) == want,
            "slow: {:?}",
            slow.0.seqs(&stream)
        );
        anyhow::ensure!(fast.seqs(&stream) == want, "fast: {:?}", fast.seqs(&stream));
    }

    // Concurrent callers on many streams, each checking its own writes.
    let rt_ref = &rt;
    let slow_ref = &slow;
    let tasks = (0..40).map(|i| async move {
        let stream = unique(&format!("slow-{i}"));
        for seq in 1..=4u32 {
            let _: Bumped = rt_ref
                .local_invoke(Bump {
                    stream: stream.clone(),
                    seq,
                })
                .await?;
            let seen = slow_ref.0.seqs(&stream);
            anyhow::ensure!(
                seen == (1..=seq).collect::<Vec<_>>(),
                "{stream}: right after local_invoke #{seq} the slow read model has {seen:?}"
            );
        }
        Ok(())
    });
    tokio::time::timeout(DEADLINE, futures::future::try_join_all(tasks)).await??;
    rt.shutdown().await?;
    Ok(())
}

// ---- A decision with events on two streams ------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pair {
    left: String,
    right: String,
    seq: u32,
}

impl Message for Pair {
    const TYPE_NAME: &'static str = "ryw.Pair";
    fn stream_id(&self) -> String {
        self.left.clone()
    }
}
impl Command for Pair {}

struct PairReceptor;

impl Receptor<Pair> for PairReceptor {
    type Result = u32;

    async fn handle(
        &self,
        cmd: Pair,
        _ctx: ReceptorContext,
    ) -> Result<Decision<u32>, ReceptorError> {
        Ok(Decision::new(cmd.seq)
            .emit(&Bumped::new(&cmd.left, cmd.seq))
            .emit(&Bumped::new(&cmd.right, cmd.seq))
            .emit(&Bumped::new(&cmd.right, cmd.seq + 1000)))
    }
}

#[actix::test]
async fn every_event_of_the_decision_is_visible_on_every_stream() -> anyhow::Result<()> {
    let slow = Slow::default();
    let (rt, fast) = start(Some(&slow)).await?;
    let (left, right) = (unique("left"), unique("right"));
    for seq in 1..=5u32 {
        let r: u32 = rt
            .local_invoke(Pair {
                left: left.clone(),
                right: right.clone(),
                seq,
            })
            .await?;
        anyhow::ensure!(r == seq);
        let want_left: Vec<u32> = (1..=seq).collect();
        let want_right: Vec<u32> = (1..=seq).flat_map(|s| [s, s + 1000]).collect();
        for (name, rec) in [("fast", &fast), ("slow", &slow.0)] {
            anyhow::ensure!(
                rec.seqs(&left) == want_left,
                "{name} left: {:?}",
                rec.seqs(&left)
            );
            anyhow::ensure!(
                rec.seqs(&right) == want_right,
                "{name} right: {:?}",
                rec.seqs(&right)
            );
        }
    }
    rt.shutdown().await?;
    Ok(())
}
