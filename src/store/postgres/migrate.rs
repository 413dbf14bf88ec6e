//! Schema migrations: the numbered files of `schema/` (`0001_baseline.sql`,
//! `0002_liveness_lock.sql`, `0003_idempotency.sql`, `0004_read_models.sql`,
//! `0005_lease_takeovers.sql`) and `schema/functions/*.sql`, embedded in
//! the binary.
//!
//! Owns bringing one schema to what this build expects, under a transaction-scoped advisory
//! lock per schema (so instances starting together do the work once) and in one transaction:
//! - baseline files (tables, indexes, types) are applied once, in version order, and recorded
//!   in `wb_migrations` with a SHA-256 checksum of the file as shipped; a recorded file whose
//!   text has changed since is refused (a change to tables needs a new numbered file);
//! - function files are re-applied whenever their checksum differs from the one recorded in
//!   `wb_functions`, so editing a function upgrades a running fleet's database at its next
//!   start. A file's functions are created with `CREATE OR REPLACE` (callers' prepared
//!   statements keep working); one whose signature changed is dropped first, and the
//!   overloads of its names the file no longer creates are dropped after;
//! - a schema made by the numbered migrations of earlier versions (`0001_tables.sql` to
//!   `0014_packed_answer.sql`) is refused with [`StoreError::PreSquashSchema`], untouched.
//!
//! Files use the placeholder `{{schema}}`, replaced by the configured schema name (validated as
//! a plain identifier); checksums are taken over the files as shipped, so they do not depend
//! on the schema name. It must not touch any other schema.

use crate::store::StoreError;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// One embedded baseline file: applied once, never changed after.
pub struct Migration {
    /// Its number in `wb_migrations`; files are applied in ascending order.
    pub version: i32,
    /// The file name, recorded beside the version and named in errors.
    pub name: &'static str,
    /// The file's text as shipped, with `{{schema}}` placeholders.
    pub sql: &'static str,
}

/// Every baseline file, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_baseline.sql",
        sql: include_str!("../../../schema/0001_baseline.sql"),
    },
    Migration {
        version: 2,
        name: "0002_liveness_lock.sql",
        sql: include_str!("../../../schema/0002_liveness_lock.sql"),
    },
    Migration {
        version: 3,
        name: "0003_idempotency.sql",
        sql: include_str!("../../../schema/0003_idempotency.sql"),
    },
    Migration {
        version: 4,
        name: "0004_read_models.sql",
        sql: include_str!("../../../schema/0004_read_models.sql"),
    },
    Migration {
        version: 5,
        name: "0005_lease_takeovers.sql",
        sql: include_str!("../../../schema/0005_lease_takeovers.sql"),
    },
];

/// One embedded function file: re-applied whenever its text changes.
pub struct FunctionFile {
    /// The file name under `schema/functions/`: its key in `wb_functions`.
    pub name: &'static str,
    /// The file's text as shipped, with `{{schema}}` placeholders.
    pub sql: &'static str,
}

/// Every function file, in the order they are applied (the batch functions call the lease and
/// claim functions, but plpgsql resolves calls when they run, so the order is only for reading).
pub const FUNCTIONS: &[FunctionFile] = &[
    FunctionFile {
        name: "partition_of.sql",
        sql: include_str!("../../../schema/functions/partition_of.sql"),
    },
    FunctionFile {
        name: "leases.sql",
        sql: include_str!("../../../schema/functions/leases.sql"),
    },
    FunctionFile {
        name: "claims.sql",
        sql: include_str!("../../../schema/functions/claims.sql"),
    },
    FunctionFile {
        name: "one_message.sql",
        sql: include_str!("../../../schema/functions/one_message.sql"),
    },
    FunctionFile {
        name: "work_batch.sql",
        sql: include_str!("../../../schema/functions/work_batch.sql"),
    },
];

/// The numbered files of the versions before the schema was squashed, as `wb_migrations`
/// recorded them.
pub const PRE_SQUASH_MIGRATIONS: [&str; 14] = [
    "0001_tables.sql",
    "0002_work_batch.sql",
    "0003_work_batch_v2.sql",
    "0004_work_batch_v3.sql",
    "0005_claims.sql",
    "0006_one_message.sql",
    "0007_dedup_hot.sql",
    "0008_claim_once.sql",
    "0009_batch_numbering.sql",
    "0010_claim_probe.sql",
    "0011_streams_fillfactor.sql",
    "0012_pin_index_plans.sql",
    "0013_lean_batch.sql",
    "0014_packed_answer.sql",
];

/// The SHA-256 of `sql` in lowercase hex, as `wb_migrations` and `wb_functions` record it.
pub fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The names of the functions `sql` creates (`CREATE [OR REPLACE] FUNCTION {{schema}}.name(`).
pub fn function_names(sql: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in sql.lines() {
        let line = line.trim_start();
        let rest = line
            .strip_prefix("CREATE OR REPLACE FUNCTION {{schema}}.")
            .or_else(|| line.strip_prefix("CREATE FUNCTION {{schema}}."));
        if let Some(rest) = rest {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// A failed statement of the migration run, with its SQLSTATE and cause.
fn failed(context: impl std::fmt::Display, e: tokio_postgres::Error) -> StoreError {
    StoreError::Migration {
        message: format!("{context}: {}", describe(&e)),
        source: Some(Arc::new(e)),
    }
}

fn refused(message: String) -> StoreError {
    StoreError::Migration {
        message,
        source: None,
    }
}

/// Brings `schema` to `migrations` and `functions`; returns the names of the files applied.
pub async fn migrate_with(
    client: &mut tokio_postgres::Client,
    schema: &str,
    migrations: &[Migration],
    functions: &[FunctionFile],
) -> Result<Vec<String>, StoreError> {
    if !crate::config::is_identifier(schema) {
        return Err(refused(format!(
            "schema name `{schema}` is not a plain SQL identifier"
        )));
    }
    // CREATE OR REPLACE refuses a new return type or renamed parameters (42P13), and the
    // failure aborts the transaction: the run starts again with that file's old definitions
    // dropped first. Each file is retried so at most once.
    let mut redefine: Vec<&str> = Vec::new();
    loop {
        match run(client, schema, migrations, functions, &redefine).await {
            Ok(done) => return Ok(done),
            Err(Attempt::Redefine(name, _)) if !redefine.contains(&name) => redefine.push(name),
            Err(Attempt::Redefine(name, e)) => return Err(failed(format!("functions/{name}"), e)),
            Err(Attempt::Failed(e)) => return Err(e),
        }
    }
}

/// Why one run of [`migrate_with`] stopped.
enum Attempt {
    /// The function file could not replace its functions in place.
    Redefine(&'static str, tokio_postgres::Error),
    Failed(StoreError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Attempt::Failed(e)
    }
}

async fn run(
    client: &mut tokio_postgres::Client,
    schema: &str,
    migrations: &[Migration],
    functions: &[FunctionFile],
    redefine: &[&str],
) -> Result<Vec<String>, Attempt> {
    let tx = client.transaction().await.map_err(|e| failed("begin", e))?;
    // The lock key is per schema, so tests on separate schemas do not wait for each other.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('whizbang-migrate:' || $1, 0))",
        &[&schema],
    )
    .await
    .map_err(|e| failed("migration lock", e))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.wb_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS {schema}.wb_functions (
             name       text PRIMARY KEY,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(|e| failed("migration tables", e))?;
    let applied = tx
        .query(
            &format!("SELECT version, name, checksum FROM {schema}.wb_migrations ORDER BY version"),
            &[],
        )
        .await
        .map_err(|e| failed("reading wb_migrations", e))?;
    let old: Vec<String> = applied
        .iter()
        .map(|r| r.get::<_, String>(1))
        .filter(|name| PRE_SQUASH_MIGRATIONS.contains(&name.as_str()))
        .collect();
    if !old.is_empty() {
        // Nothing is written: the transaction (whose CREATE IF NOT EXISTS found their objects)
        // is rolled back when `tx` is dropped.
        return Err(StoreError::PreSquashSchema {
            schema: schema.to_string(),
            applied: old,
        }
        .into());
    }
    let mut done = Vec::new();
    for m in migrations {
        let sum = checksum(m.sql);
        if let Some(row) = applied.iter().find(|r| r.get::<_, i32>(0) == m.version) {
            let recorded: String = row.get(2);
            if recorded != sum {
                return Err(refused(format!(
                    "migration {} was changed after it was applied to schema {schema} \
                     (recorded checksum {recorded}, file now {sum}); add a new numbered file instead",
                    m.name
                ))
                .into());
            }
            continue;
        }
        tx.batch_execute(&m.sql.replace("{{schema}}", schema))
            .await
            .map_err(|e| failed(m.name, e))?;
        tx.execute(
            &format!(
                "INSERT INTO {schema}.wb_migrations (version, name, checksum) VALUES ($1, $2, $3)"
            ),
            &[&m.version, &m.name, &sum],
        )
        .await
        .map_err(|e| failed("recording a migration", e))?;
        done.push(m.name.to_string());
    }
    let recorded = tx
        .query(
            &format!("SELECT name, checksum FROM {schema}.wb_functions"),
            &[],
        )
        .await
        .map_err(|e| failed("reading wb_functions", e))?;
    for f in functions {
        let sum = checksum(f.sql);
        if recorded
            .iter()
            .any(|r| r.get::<_, &str>(0) == f.name && r.get::<_, &str>(1) == sum)
        {
            continue;
        }
        let names = function_names(f.sql);
        if redefine.contains(&f.name) {
            drop_overloads(&tx, schema, &names, false).await?;
        }
        if let Err(e) = tx.batch_execute(&f.sql.replace("{{schema}}", schema)).await {
            return Err(
                if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_FUNCTION_DEFINITION) {
                    Attempt::Redefine(f.name, e)
                } else {
                    failed(format!("functions/{}", f.name), e).into()
                },
            );
        }
        // Signatures the file no longer has.
        drop_overloads(&tx, schema, &names, true).await?;
        tx.execute(
            &format!(
                "INSERT INTO {schema}.wb_functions (name, checksum) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()"
            ),
            &[&f.name, &sum],
        )
        .await
        .map_err(|e| failed("recording a function file", e))?;
        done.push(format!("functions/{}", f.name));
    }
    tx.commit().await.map_err(|e| failed("commit", e))?;
    Ok(done)
}

/// Drops the functions of `schema` named `names`; with `stale_only`, only those this
/// transaction has not (re)created: CREATE OR REPLACE rewrites a function's catalog row, so a
/// row this transaction did not write is a signature the file no longer defines.
async fn drop_overloads(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
    names: &[String],
    stale_only: bool,
) -> Result<(), StoreError> {
    let rows = tx
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = $1::text::regnamespace AND p.proname = ANY ($2)
                AND NOT ($3 AND p.xmin = pg_current_xact_id()::xid)",
            &[&schema, &names, &stale_only],
        )
        .await
        .map_err(|e| failed("listing functions", e))?;
    for row in rows {
        let signature: String = row.get(0);
        tx.batch_execute(&format!("DROP FUNCTION {signature}"))
            .await
            .map_err(|e| failed(format_args!("dropping {signature}"), e))?;
    }
    Ok(())
}

/// Applies the embedded baseline and function files to `schema`.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<Vec<String>, StoreError> {
    migrate_with(client, schema, MIGRATIONS, FUNCTIONS).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_read_from_the_create_statements() {
        assert_eq!(
            function_names(FUNCTIONS[2].sql),
            [
                "wb_unheld_partitions_search",
                "wb_claim_outbox_walk",
                "wb_claim_inbox_walk",
                "wb_unheld_partitions_with_work",
                "wb_claim_outbox",
                "wb_claim_inbox"
            ]
        );
        assert_eq!(function_names(FUNCTIONS[4].sql), ["wb_process_work_batch"]);
    }

    #[test]
    fn no_function_is_defined_twice_or_in_the_baseline() {
        let mut all: Vec<String> = FUNCTIONS
            .iter()
            .flat_map(|f| function_names(f.sql))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a function defined in two files");
        for m in MIGRATIONS {
            assert!(
                function_names(m.sql).is_empty(),
                "{} defines a function",
                m.name
            );
            assert!(!m.sql.contains("FUNCTION"), "{} defines a function", m.name);
        }
    }
}
