//! Handlers past `coordinator.handler_timeout_ms`: a receptor's command fails with
//! `HandlerTimedOut` and nothing of it is written; a perspective's event counts as a failed
//! attempt, retried and then dead-lettered with the timeout as its error. The runtime keeps
//! serving throughout.

use crate::support::{Bump, BumpReceptor, Bumped, DEADLINE, config, unique, wait_dead_lettered};
use std::time::{Duration, Instant};
use whizbang::{
    Command, Decision, DispatchError, Event, EventMeta, Message, Perspective, PerspectiveError,
    Receptor, ReceptorContext, ReceptorError, Runtime,
};

const TIMEOUT_MS: u64 = 150;

/// A command whose receptor never decides.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Stall {
    stream: String,
}

impl Message for Stall {
    const TYPE_NAME: &'static str = "test.Stall";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Stall {}

/// The event whose perspective never finishes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Stalled {
    stream: String,
}

impl Message for Stalled {
    const TYPE_NAME: &'static str = "test.Stalled";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Stalled {}

struct Forever;

impl Receptor<Stall> for Forever {
    type Result = ();

    async fn handle(
        &self,
        _cmd: Stall,
        _ctx: ReceptorContext,
    ) -> Result<Decision<()>, ReceptorError> {
        std::future::pending::<()>().await;
        Ok(Decision::new(()))
    }
}

impl Perspective<Stalled> for Forever {
    async fn apply(&self, _event: Stalled, _meta: EventMeta) -> Result<(), PerspectiveError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

async fn start() -> anyhow::Result<Runtime> {
    let mut c = config("handler-timeout");
    c.coordinator.handler_timeout_ms = TIMEOUT_MS;
    c.store.max_attempts = 2;
    c.store.backoff_base_ms = 10;
    c.store.backoff_max_ms = 20;
    Ok(Runtime::builder(c)
        .receptor::<Stall, _>(Forever)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Stalled, _>("forever", Forever)
        .start()
        .await?)
}

#[actix::test]
async fn a_receptor_past_its_timeout_fails_its_command_and_writes_nothing() -> anyhow::Result<()> {
    let rt = start().await?;
    let stream = unique("stall");
    let asked = Instant::now();
    let r = rt
        .local_invoke::<_, ()>(Stall {
            stream: stream.clone(),
        })
        .await;
    let waited = asked.elapsed();
    match r {
        Err(e @ DispatchError::HandlerTimedOut { .. }) => {
            anyhow::ensure!(e.http_status() == 503 && e.is_retryable(), "{e}");
            anyhow::ensure!(e.to_string().contains("nothing was written"), "{e}");
        }
        other => anyhow::bail!("expected HandlerTimedOut, got {other:?}"),
    }
    anyhow::ensure!(
        waited >= Duration::from_millis(TIMEOUT_MS) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );
    anyhow::ensure!(rt.store().read_stream(&stream, 0).await?.is_empty());

    // The stream and the instance go on serving.
    let next: Bumped = rt
        .local_invoke(Bump {
            stream: stream.clone(),
            seq: 1,
        })
        .await?;
    anyhow::ensure!(next.seq == 1);
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_perspective_past_its_timeout_is_retried_then_dead_lettered() -> anyhow::Result<()> {
    let rt = start().await?;
    let stream = unique("stalled");
    let receipt = rt
        .publish(Stalled {
            stream: stream.clone(),
        })
        .await?;
    let dead = receipt.message_id;
    wait_dead_lettered(rt.store(), dead).await?;
    let letters = rt.store().dead_letters().await?;
    let letter = letters
        .iter()
        .find(|d| d.message_id == dead)
        .ok_or_else(|| anyhow::anyhow!("no dead letter"))?;
    anyhow::ensure!(letter.attempts == 2, "{letter:?}");
    anyhow::ensure!(letter.error.contains("timed out"), "{letter:?}");

    // Other streams are not held behind it.
    let other: Bumped = tokio::time::timeout(
        DEADLINE,
        rt.local_invoke(Bump {
            stream: unique("other"),
            seq: 1,
        }),
    )
    .await??;
    anyhow::ensure!(other.seq == 1);
    rt.shutdown().await?;
    Ok(())
}
