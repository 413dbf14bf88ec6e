//! What the Postgres store's queue tables need from the server to stay small: autovacuum.
//!
//! Every published outbox row and every processed inbox row is deleted, and dedup keys expire,
//! so `wb_outbox`, `wb_inbox` and `wb_dedup` churn for as long as the service runs. The runtime
//! relies on the server's autovacuum to reclaim their dead rows; where it cannot run (switched
//! off for the server or for one of these tables, or blind because `track_counts` is off) the
//! tables and their indexes only grow, and every order probe and claim slows down with them.
//! This module finds those gaps so that start-up can say so. It must not change settings or
//! vacuum anything itself: maintenance belongs to the operator.

use tokio_postgres::Client;

/// The tables whose rows are deleted as the service runs.
pub const CHURNING_TABLES: [&str; 3] = ["wb_outbox", "wb_inbox", "wb_dedup"];

/// Why autovacuum will not reclaim the churning tables of `schema`, one sentence per gap;
/// empty when it will.
pub async fn autovacuum_gaps(
    client: &Client,
    schema: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let server = client
        .query_one(
            "SELECT current_setting('autovacuum')::boolean, current_setting('track_counts')::boolean",
            &[],
        )
        .await?;
    let mut gaps = Vec::new();
    if !server.get::<_, bool>(0) {
        gaps.push("autovacuum is off on this server".to_string());
    }
    if !server.get::<_, bool>(1) {
        gaps.push("track_counts is off on this server, so autovacuum cannot see dead rows".into());
    }
    let tables: Vec<String> = CHURNING_TABLES.iter().map(|t| t.to_string()).collect();
    let switched_off = client
        .query(
            "SELECT c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = ANY ($2)
                AND EXISTS (SELECT 1 FROM pg_options_to_table(c.reloptions) o
                             WHERE o.option_name = 'autovacuum_enabled'
                               AND NOT o.option_value::boolean)
              ORDER BY c.relname",
            &[&schema, &tables],
        )
        .await?;
    for row in switched_off {
        let table: String = row.get(0);
        gaps.push(format!("autovacuum_enabled is false on {schema}.{table}"));
    }
    Ok(gaps)
}
