//! The Postgres server under test (`WHIZBANG_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`): its URL, a schema name per test, a plain
//! client, row counts and the dropping of a test's schemas. A server that cannot be reached
//! fails the test; nothing here skips.
//!
//! Each test works in schemas of its own (`t_<uuid>`), so the cases run in parallel; nothing
//! here may touch a schema a test did not name. Every test that opens connections holds a
//! [`slot`] while it runs, which bounds the connections the process holds at once.

use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use whizbang::Config;
use whizbang::config::StoreBackend;

/// Postgres tests that run at once, whatever the number of test threads (one per core by
/// default). One case holds up to 13 connections at its peak (two runtimes' pools, their
/// LISTEN and liveness lock connections and the test's own clients), so 6 at once stay under
/// 80: below the 100 a fresh server allows, with room for the operator tools and other
/// clients. A thread count cap would bound it too, but only where the cap is set
/// (`scripts/test.sh`), not under a plain `cargo test` on a machine with many cores; the memory
/// and broker tests need no slot.
const AT_ONCE: usize = 6;

/// Held by a test for as long as it uses the database; see [`AT_ONCE`].
pub struct Slot {
    _permit: SemaphorePermit<'static>,
}

/// Waits for one of the [`AT_ONCE`] slots (the semaphore is not tied to a runtime: each test
/// has its own).
pub async fn slot() -> Slot {
    static SLOTS: Semaphore = Semaphore::const_new(AT_ONCE);
    Slot {
        _permit: SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed"),
    }
}

pub fn database_url() -> String {
    std::env::var("WHIZBANG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A schema name of its own for one test (`t_<uuid>`; `scripts/test.sh` clears leftovers).
pub fn new_schema() -> String {
    format!("t_{}", Uuid::now_v7().simple())
}

/// `c` on the Postgres store under test, in `schema`.
pub fn on_postgres(mut c: Config, schema: &str) -> Config {
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = database_url().into();
    c.store.schema = schema.into();
    c
}

/// A plain client of the test database; panics, naming the URL, when it cannot connect.
pub async fn connect() -> Client {
    let url = database_url();
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&url, NoTls),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out connecting to the test database {url}"))
    .unwrap_or_else(|e| {
        panic!("cannot reach the test database {url} (set WHIZBANG_TEST_DATABASE_URL): {e}")
    });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Drops `schemas` (those that exist) with everything in them.
pub async fn drop_schemas(schemas: &[&str]) -> anyhow::Result<()> {
    let client = connect().await;
    for s in schemas {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
            .await
            .map_err(|e| anyhow::anyhow!("DROP SCHEMA {s}: {e}"))?;
    }
    Ok(())
}

/// Rows of `schema.table`, all of them or those of one stream.
pub async fn rows(schema: &str, table: &str, stream: Option<&str>) -> anyhow::Result<i64> {
    let client = connect().await;
    let row = match stream {
        Some(stream) => {
            client
                .query_one(
                    &format!("SELECT count(*) FROM {schema}.{table} WHERE stream_id = $1"),
                    &[&stream],
                )
                .await?
        }
        None => {
            client
                .query_one(&format!("SELECT count(*) FROM {schema}.{table}"), &[])
                .await?
        }
    };
    Ok(row.get(0))
}
