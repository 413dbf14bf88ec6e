//! Schema migrations: the numbered `schema/*.sql` files, embedded in the binary.
//!
//! Owns applying them to one schema: under a transaction-scoped advisory lock (so instances
//! starting together apply each file once), recorded with a SHA-256 checksum of the file,
//! idempotent, and refusing to run when an applied file has changed since. Files use the
//! placeholder `{{schema}}`, replaced by the configured schema name (validated as a plain
//! identifier); the checksum is taken over the file as shipped, so it does not depend on the
//! schema name. It must not touch any other schema.

use crate::store::StoreError;
use sha2::{Digest, Sha256};

/// One embedded migration.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_tables.sql",
        sql: include_str!("../../../schema/0001_tables.sql"),
    },
    Migration {
        version: 2,
        name: "0002_work_batch.sql",
        sql: include_str!("../../../schema/0002_work_batch.sql"),
    },
    Migration {
        version: 3,
        name: "0003_work_batch_v2.sql",
        sql: include_str!("../../../schema/0003_work_batch_v2.sql"),
    },
    Migration {
        version: 4,
        name: "0004_work_batch_v3.sql",
        sql: include_str!("../../../schema/0004_work_batch_v3.sql"),
    },
    Migration {
        version: 5,
        name: "0005_claims.sql",
        sql: include_str!("../../../schema/0005_claims.sql"),
    },
    Migration {
        version: 6,
        name: "0006_one_message.sql",
        sql: include_str!("../../../schema/0006_one_message.sql"),
    },
    Migration {
        version: 7,
        name: "0007_dedup_hot.sql",
        sql: include_str!("../../../schema/0007_dedup_hot.sql"),
    },
    Migration {
        version: 8,
        name: "0008_claim_once.sql",
        sql: include_str!("../../../schema/0008_claim_once.sql"),
    },
    Migration {
        version: 9,
        name: "0009_batch_numbering.sql",
        sql: include_str!("../../../schema/0009_batch_numbering.sql"),
    },
    Migration {
        version: 10,
        name: "0010_claim_probe.sql",
        sql: include_str!("../../../schema/0010_claim_probe.sql"),
    },
    Migration {
        version: 11,
        name: "0011_streams_fillfactor.sql",
        sql: include_str!("../../../schema/0011_streams_fillfactor.sql"),
    },
    Migration {
        version: 12,
        name: "0012_pin_index_plans.sql",
        sql: include_str!("../../../schema/0012_pin_index_plans.sql"),
    },
    Migration {
        version: 13,
        name: "0013_lean_batch.sql",
        sql: include_str!("../../../schema/0013_lean_batch.sql"),
    },
    Migration {
        version: 14,
        name: "0014_packed_answer.sql",
        sql: include_str!("../../../schema/0014_packed_answer.sql"),
    },
];

pub fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies the pending migrations of `migrations` to `schema`; returns the names applied.
pub async fn migrate_with(
    client: &mut tokio_postgres::Client,
    schema: &str,
    migrations: &[Migration],
) -> Result<Vec<String>, StoreError> {
    if !crate::config::is_identifier(schema) {
        return Err(StoreError::Migration(format!(
            "schema name `{schema}` is not a plain SQL identifier"
        )));
    }
    let q = |e: tokio_postgres::Error| StoreError::Migration(e.to_string());
    let tx = client.transaction().await.map_err(q)?;
    // The lock key is per schema, so tests on separate schemas do not wait for each other.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('whizbang-migrate:' || $1, 0))",
        &[&schema],
    )
    .await
    .map_err(q)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.wb_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(q)?;
    let applied = tx
        .query(
            &format!("SELECT version, name, checksum FROM {schema}.wb_migrations"),
            &[],
        )
        .await
        .map_err(q)?;
    let mut done = Vec::new();
    for m in migrations {
        let sum = checksum(m.sql);
        if let Some(row) = applied.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            let recorded: String = row.get(2);
            if recorded != sum {
                return Err(StoreError::Migration(format!(
                    "migration {} was changed after it was applied to schema {schema} \
                     (recorded checksum {recorded}, file now {sum}); add a new numbered file instead",
                    m.name
                )));
            }
            continue;
        }
        tx.batch_execute(&m.sql.replace("{{schema}}", schema))
            .await
            .map_err(|e| StoreError::Migration(format!("{}: {}", m.name, describe(&e))))?;
        tx.execute(
            &format!(
                "INSERT INTO {schema}.wb_migrations (version, name, checksum) VALUES ($1, $2, $3)"
            ),
            &[&m.version, &m.name, &sum],
        )
        .await
        .map_err(q)?;
        done.push(m.name.to_string());
    }
    tx.commit().await.map_err(q)?;
    Ok(done)
}

/// Applies the embedded migrations to `schema`.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<Vec<String>, StoreError> {
    migrate_with(client, schema, MIGRATIONS).await
}

/// A Postgres error with its server message, which `Display` leaves out.
/// Errors of the connection itself (a TLS handshake, say) carry their reason as the source.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            for cause in causes(e) {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text = format!("{text}: {cause_text}");
                }
            }
            text
        }
    }
}

/// The errors beneath `e`, nearest first.
pub(crate) fn causes(
    e: &tokio_postgres::Error,
) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(std::error::Error::source(e), |cause| cause.source())
}
