//! Deadlines on the database: a stalled database answers callers with a retryable error within
//! `store.statement_timeout_ms` + 1 s instead of holding them, and once it moves again the same
//! command goes through, stored once.
//!
//! The stall is a lock held by another session on this test's own schema (never the shared
//! server itself: stopping or pausing the server belongs in the chaos run or a benchmark).

use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::{Bump, BumpReceptor, Bumped, DEADLINE, config};
use std::time::{Duration, Instant};
use whizbang::Runtime;

const STATEMENT_TIMEOUT_MS: u64 = 400;

#[actix::test]
async fn a_locked_store_answers_with_a_retryable_error_within_the_statement_timeout()
-> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let schema = new_schema();
    let mut c = on_postgres(config("deadlines"), &schema);
    c.store.statement_timeout_ms = STATEMENT_TIMEOUT_MS;
    let rt = Runtime::builder(c)
        .receptor::<Bump, _>(BumpReceptor)
        .start()
        .await?;
    let stream = format!("deadline-{schema}");
    let first: Bumped = rt
        .local_invoke(Bump {
            stream: stream.clone(),
            seq: 1,
        })
        .await?;
    anyhow::ensure!(first.seq == 1);

    // Another session takes the stream-version table and keeps it: every append waits on it.
    let mut holder = pg::connect().await;
    let lock = holder.transaction().await?;
    lock.batch_execute(&format!(
        "LOCK TABLE {schema}.wb_streams IN ACCESS EXCLUSIVE MODE"
    ))
    .await?;

    let started = Instant::now();
    // Bounded here too: without the deadlines the call would wait as long as the lock is held.
    let stalled = tokio::time::timeout(
        Duration::from_millis(STATEMENT_TIMEOUT_MS) + Duration::from_secs(10),
        rt.local_invoke::<_, Bumped>(Bump {
            stream: stream.clone(),
            seq: 2,
        }),
    )
    .await;
    let waited = started.elapsed();
    let error = match stalled {
        Err(_) => anyhow::bail!("the caller was still waiting after {waited:?}: no deadline"),
        Ok(Ok(_)) => anyhow::bail!("a command went through a locked stream table"),
        Ok(Err(e)) => e,
    };
    anyhow::ensure!(
        error.is_retryable() && error.http_status() == 503,
        "a stalled store is a retryable 503, got {error:?}"
    );
    // The server cancels the statement at the timeout; the runtime never waits past it + 1 s.
    anyhow::ensure!(
        waited < Duration::from_millis(STATEMENT_TIMEOUT_MS) + Duration::from_secs(1),
        "the caller waited {waited:?} (statement timeout {STATEMENT_TIMEOUT_MS} ms)"
    );
    anyhow::ensure!(
        waited >= Duration::from_millis(STATEMENT_TIMEOUT_MS),
        "answered after {waited:?}, before the lock could have timed out: not the lock's error ({error})"
    );

    lock.rollback().await?;

    // The database moves again: the same command is retried and stored once, after the first.
    let retry_until = Instant::now() + DEADLINE;
    let second = loop {
        match rt
            .local_invoke::<_, Bumped>(Bump {
                stream: stream.clone(),
                seq: 2,
            })
            .await
        {
            Ok(done) => break done,
            Err(e) if e.is_retryable() && Instant::now() < retry_until => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => anyhow::bail!("the retry after the stall failed: {e}"),
        }
    };
    anyhow::ensure!(second.seq == 2);
    let versions: Vec<i64> = holder
        .query(
            &format!(
                "SELECT version FROM {schema}.wb_events WHERE stream_id = $1 ORDER BY version"
            ),
            &[&stream],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    anyhow::ensure!(
        versions == vec![1, 2],
        "the stalled command left nothing behind, its retry was stored once: {versions:?}"
    );

    rt.shutdown().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}
