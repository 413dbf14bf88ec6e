//! Request scopes (`Runtime::scope`): commands decided in a scope are written together when it
//! completes, in one store transaction — all or nothing — and a scope dropped without
//! completing writes nothing. Each case runs on the in-memory store and on Postgres.

use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::*;
use serde::{Deserialize, Serialize};
use whizbang::{
    Command, Config, Decision, DispatchError, ExpectedVersion, Message, ReceiptStatus, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

/// Appends one `Bumped` to `stream`, expecting the stream at `expect` if given; refused when
/// `refuse` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Guarded {
    stream: String,
    seq: u32,
    expect: Option<u64>,
    refuse: bool,
}

impl Message for Guarded {
    const TYPE_NAME: &'static str = "scope.Guarded";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Guarded {}

struct GuardedReceptor;

impl Receptor<Guarded> for GuardedReceptor {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Guarded,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        if cmd.refuse {
            return Err(ReceptorError::Validation(format!("{} refused", cmd.seq)));
        }
        let mut decision = Decision::event(Bumped::new(cmd.stream.clone(), cmd.seq));
        if let Some(v) = cmd.expect {
            let expected = if v == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(v)
            };
            decision = decision.expect_version(cmd.stream, expected);
        }
        Ok(decision)
    }
}

fn guarded(stream: &str, seq: u32, expect: Option<u64>) -> Guarded {
    Guarded {
        stream: stream.into(),
        seq,
        expect,
        refuse: false,
    }
}

async fn start(c: Config) -> (Runtime, Recorder) {
    let seen = Recorder::new();
    let rt = Runtime::builder(c)
        .receptor::<Guarded, _>(GuardedReceptor)
        .perspective::<Bumped, _>("seen", seen.clone())
        .start()
        .await
        .expect("runtime");
    (rt, seen)
}

async fn stored(rt: &Runtime, stream: &str) -> anyhow::Result<Vec<u64>> {
    Ok(rt
        .store()
        .read_stream(stream, 1)
        .await?
        .iter()
        .map(|e| e.version)
        .collect())
}

async fn two_commands_complete_together(c: Config) -> anyhow::Result<()> {
    let (rt, seen) = start(c).await;
    let mut scope = rt.scope();
    let a: Bumped = scope.local_invoke(guarded("sc-a", 1, None)).await?;
    let b: Bumped = scope.local_invoke(guarded("sc-b", 2, Some(0))).await?;
    assert_eq!((a.seq, b.seq), (1, 2), "each receptor answered at once");
    assert_eq!(scope.len(), 2);
    assert!(
        stored(&rt, "sc-a").await?.is_empty(),
        "nothing written before complete"
    );
    assert!(stored(&rt, "sc-b").await?.is_empty());
    let receipt = scope.complete().await?;
    // Read-your-writes: the perspectives ran before complete returned.
    assert_eq!(seen.seqs("sc-a"), vec![1]);
    assert_eq!(seen.seqs("sc-b"), vec![2]);
    assert_eq!(stored(&rt, "sc-a").await?, vec![1]);
    assert_eq!(stored(&rt, "sc-b").await?, vec![1]);
    assert_eq!(receipt.receipts.len(), 2);
    for (r, stream) in receipt.receipts.iter().zip(["sc-a", "sc-b"]) {
        assert_eq!(r.status, ReceiptStatus::Delivered);
        assert_eq!(r.stream_id, stream);
        assert_eq!(r.events.len(), 1, "{r:?}");
        assert_eq!(r.events[0].stream_id, stream);
    }
    // One transaction: the two events hold neighbouring positions.
    let (pa, pb) = (
        receipt.receipts[0].events[0].position,
        receipt.receipts[1].events[0].position,
    );
    assert_eq!(pb, pa + 1);

    // A scope's expectations count its own earlier appends.
    let mut scope = rt.scope();
    let _: Bumped = scope.local_invoke(guarded("sc-c", 1, Some(0))).await?;
    let _: Bumped = scope.local_invoke(guarded("sc-c", 2, Some(1))).await?;
    scope.complete().await?;
    assert_eq!(stored(&rt, "sc-c").await?, vec![1, 2]);
    assert_eq!(seen.seqs("sc-c"), vec![1, 2]);
    rt.shutdown().await?;
    Ok(())
}

async fn a_failing_second_command_writes_nothing_of_either(c: Config) -> anyhow::Result<()> {
    let (rt, seen) = start(c).await;
    let mut scope = rt.scope();
    let _: Bumped = scope.local_invoke(guarded("sf-a", 1, None)).await?;
    let refused = scope
        .local_invoke::<_, Bumped>(Guarded {
            refuse: true,
            ..guarded("sf-b", 2, None)
        })
        .await
        .unwrap_err();
    assert_eq!(refused.http_status(), 400, "{refused:?}");
    // A handler that went on regardless: the scope refuses to complete, naming the command.
    let err = scope.complete().await.unwrap_err();
    match &err {
        DispatchError::ScopeFailed {
            index,
            message_type,
            error,
        } => {
            assert_eq!(*index, 1);
            assert_eq!(message_type, Guarded::TYPE_NAME);
            assert!(
                matches!(**error, DispatchError::Rejected { .. }),
                "{error:?}"
            );
        }
        other => panic!("expected ScopeFailed, got {other:?}"),
    }
    assert_eq!(err.http_status(), 400);

    // A version conflict of one command at complete: nothing of the other is written either.
    let _: Bumped = rt.local_invoke(guarded("sf-c", 1, None)).await?;
    let mut scope = rt.scope();
    let _: Bumped = scope.local_invoke(guarded("sf-d", 1, None)).await?;
    let _: Bumped = scope.local_invoke(guarded("sf-c", 2, Some(0))).await?;
    let err = scope.complete().await.unwrap_err();
    match &err {
        DispatchError::ScopeFailed { index, error, .. } => {
            assert_eq!(*index, 1, "the command whose expectation failed");
            assert!(
                matches!(**error, DispatchError::VersionConflict { ref stream_id, actual: 1, .. }
                    if stream_id == "sf-c"),
                "{error:?}"
            );
        }
        other => panic!("expected ScopeFailed, got {other:?}"),
    }
    assert!(err.is_conflict());
    assert_eq!(err.http_status(), 409);
    for stream in ["sf-a", "sf-b", "sf-d"] {
        assert!(stored(&rt, stream).await?.is_empty(), "{stream} written");
    }
    assert_eq!(
        stored(&rt, "sf-c").await?,
        vec![1],
        "only the command outside the scope"
    );
    // Nothing was applied for the scopes either (the later call's perspective ran).
    assert!(seen.seqs("sf-a").is_empty() && seen.seqs("sf-d").is_empty());
    assert_eq!(seen.seqs("sf-c"), vec![1]);
    rt.shutdown().await?;
    Ok(())
}

async fn a_dropped_scope_writes_nothing(c: Config) -> anyhow::Result<()> {
    let (rt, seen) = start(c).await;
    {
        let mut scope = rt.scope();
        let _: Bumped = scope.local_invoke(guarded("sd-a", 1, None)).await?;
        let _: Bumped = scope.local_invoke(guarded("sd-a", 2, None)).await?;
        // The handler fails here: the scope is dropped.
    }
    // A command after it, on the same stream, is the stream's first.
    let _: Bumped = rt.local_invoke(guarded("sd-a", 3, Some(0))).await?;
    assert_eq!(stored(&rt, "sd-a").await?, vec![1]);
    assert_eq!(seen.seqs("sd-a"), vec![3]);
    // An empty scope completes with nothing to write.
    assert!(rt.scope().complete().await?.receipts.is_empty());
    rt.shutdown().await?;
    Ok(())
}

async fn on_pg(case: impl AsyncFnOnce(Config) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let mut c = on_postgres(config(&unique("scope")), &schema);
    c.store.startup_timeout_ms = 15_000;
    case(c).await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}

#[actix::test]
async fn memory_two_commands_complete_together() -> anyhow::Result<()> {
    two_commands_complete_together(config(&unique("scope"))).await
}

#[actix::test]
async fn postgres_two_commands_complete_together() -> anyhow::Result<()> {
    on_pg(two_commands_complete_together).await
}

#[actix::test]
async fn memory_a_failing_second_command_writes_nothing_of_either() -> anyhow::Result<()> {
    a_failing_second_command_writes_nothing_of_either(config(&unique("scope"))).await
}

#[actix::test]
async fn postgres_a_failing_second_command_writes_nothing_of_either() -> anyhow::Result<()> {
    on_pg(a_failing_second_command_writes_nothing_of_either).await
}

#[actix::test]
async fn memory_a_dropped_scope_writes_nothing() -> anyhow::Result<()> {
    a_dropped_scope_writes_nothing(config(&unique("scope"))).await
}

#[actix::test]
async fn postgres_a_dropped_scope_writes_nothing() -> anyhow::Result<()> {
    on_pg(a_dropped_scope_writes_nothing).await
}
