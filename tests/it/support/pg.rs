//! The Postgres server under test (`WHIZBANG_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`): its URL, a schema name per test, a plain
//! client, row counts and the dropping of a test's schemas. A server that cannot be reached
//! fails the test; nothing here skips.
//!
//! Each test works in schemas of its own (`t_<uuid>`), so the cases run in parallel; nothing
//! here may touch a schema a test did not name.

use std::time::Duration;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use whizbang::Config;
use whizbang::config::StoreBackend;

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
    c.store.database_url = database_url();
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
