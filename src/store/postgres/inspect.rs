//! What an operator reads and steers in one service's schema, on a plain connection of their
//! own: whether the schema is migrated, the instances with their heartbeats and leases, the
//! backlog of each work queue, perspective checkpoints, the dead letters (filtered, one in
//! full), and requeueing or skipping many dead letters at once.
//!
//! It owns the SQL of these views and actions, nothing else. Its reads run on any connection
//! that may `SELECT` the schema's tables, so the `whizbang` CLI gives them one opened with
//! [`read_only`]; they never migrate, create or lock anything, and on a schema that is not
//! migrated they answer [`StoreError::NotMigrated`] instead of failing on a missing table.
//! The store's own dead-letter methods (`admin`) run the same statements. The actions
//! ([`requeue`], [`skip`]) change dead-lettered rows only: a live row's claim and
//! lease belong to the batch functions. Times are the database's clock, rendered in UTC.

use super::connect::query_error;
use super::migrate::MIGRATIONS;
use crate::envelope::Hop;
use crate::store::{Queue, StoreError};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row};
use uuid::Uuid;

/// `config` with `default_transaction_read_only=on` added to any `options` it has: every
/// transaction of a connection made from it is read-only, so a read command cannot write even
/// through a role that may.
pub fn read_only(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut read_only = config.clone();
    let option = "-c default_transaction_read_only=on";
    let options = match config.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} {option}"),
        _ => option.to_string(),
    };
    read_only.options(options);
    read_only
}

/// A timestamp column as ISO 8601 text in UTC, to the second.
fn iso(expr: &str) -> String {
    format!("to_char(({expr}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")
}

/// Seconds from a timestamp column to the database's `now()`.
fn age(expr: &str) -> String {
    format!("extract(epoch FROM now() - ({expr}))::float8")
}

fn seconds(s: Option<f64>) -> Option<Duration> {
    s.map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// Fails with [`StoreError::NotMigrated`] unless `schema` has every baseline migration this
/// build ships, reading only the catalog and `wb_migrations`.
pub async fn check_migrated(client: &impl GenericClient, schema: &str) -> Result<(), StoreError> {
    if !crate::config::is_identifier(schema) {
        return Err(StoreError::Migration {
            message: format!("schema name `{schema}` is not a plain SQL identifier"),
            source: None,
        });
    }
    let table = format!("{schema}.wb_migrations");
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(query_error)?
        .get(0);
    let applied: Vec<i32> = if exists {
        client
            .query(&format!("SELECT version FROM {table}"), &[])
            .await
            .map_err(query_error)?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    let missing: Vec<String> = MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| m.name.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StoreError::NotMigrated {
            schema: schema.to_string(),
            missing,
        })
    }
}

/// One service instance as its row in `wb_instances` says.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    /// The instance's id (its leases are held under it).
    pub instance_id: Uuid,
    /// The service it runs (`service.name`).
    pub service: String,
    /// The host it registered from (`HOSTNAME`).
    pub host: String,
    /// When it registered, ISO 8601 UTC.
    pub started_at: String,
    /// Time since its last heartbeat, by the database's clock.
    pub heartbeat_age: Duration,
    /// The partitions it holds an unexpired lease on, ascending.
    pub partitions: Vec<u32>,
}

/// The backlog of one work queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStatus {
    /// `outbox` (to publish) or `inbox` (to process here).
    pub queue: Queue,
    /// Rows waiting or in flight (not dead-lettered).
    pub pending: u64,
    /// Of those, rows claimed by an instance right now.
    pub in_flight: u64,
    /// Of those, rows that failed at least once (a counted or a transient failure) and wait
    /// for, or are in, another attempt; a requeued row starts afresh.
    pub retrying: u64,
    /// Dead-lettered rows (each parks its stream).
    pub dead: u64,
    /// Age of the oldest pending row; `None` when nothing is pending.
    pub oldest_pending_age: Option<Duration>,
}

/// How far a perspective has been replayed through the event store.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointStatus {
    /// The perspective's name.
    pub perspective: String,
    /// The last event-store position it has applied in a replay.
    pub position: u64,
    /// Events stored after it: the event store's last position minus `position`.
    pub behind: u64,
    /// When it was last saved, ISO 8601 UTC.
    pub updated_at: String,
}

/// Everything `whizbang status` shows, read in one read-only transaction (one snapshot).
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The schema read.
    pub schema: String,
    /// The database's clock when it was read, ISO 8601 UTC.
    pub read_at: String,
    /// Registered instances, oldest first (rows are purged ten lease periods after their last
    /// heartbeat).
    pub instances: Vec<InstanceStatus>,
    /// Partitions with an unexpired lease.
    pub leased_partitions: u64,
    /// Partitions whose lease expired without being released (their holder stopped
    /// heartbeating; any instance may take them).
    pub expired_leases: u64,
    /// The outbox, then the inbox.
    pub queues: Vec<QueueStatus>,
    /// The event store's last position (0 when empty).
    pub last_position: u64,
    /// Every perspective checkpoint, by name.
    pub checkpoints: Vec<CheckpointStatus>,
}

/// Reads [`Status`] of `schema` in one transaction; [`StoreError::NotMigrated`] on a schema
/// that is not migrated.
pub async fn status(client: &mut Client, schema: &str) -> Result<Status, StoreError> {
    let tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(query_error)?;
    check_migrated(&tx, schema).await?;
    let s = schema;
    let head = tx
        .query_one(
            &format!(
                "SELECT {}, (SELECT last FROM {s}.wb_position),
                        (SELECT count(*) FROM {s}.wb_partition_leases
                          WHERE instance_id IS NOT NULL AND expires_at > now()),
                        (SELECT count(*) FROM {s}.wb_partition_leases
                          WHERE instance_id IS NOT NULL AND expires_at <= now())",
                iso("now()")
            ),
            &[],
        )
        .await
        .map_err(query_error)?;
    let last_position = head.get::<_, Option<i64>>(1).unwrap_or(0).max(0) as u64;
    let instances = tx
        .query(
            &format!(
                "SELECT i.instance_id, i.service, i.host, {}, {},
                        coalesce(array_agg(l.partition ORDER BY l.partition)
                                   FILTER (WHERE l.partition IS NOT NULL), '{{}}')
                   FROM {s}.wb_instances i
                   LEFT JOIN {s}.wb_partition_leases l
                          ON l.instance_id = i.instance_id AND l.expires_at > now()
                  GROUP BY i.instance_id
                  ORDER BY i.started_at, i.instance_id",
                iso("i.started_at"),
                age("i.last_seen")
            ),
            &[],
        )
        .await
        .map_err(query_error)?
        .iter()
        .map(|r| InstanceStatus {
            instance_id: r.get(0),
            service: r.get(1),
            host: r.get(2),
            started_at: r.get(3),
            heartbeat_age: seconds(r.get(4)).unwrap_or_default(),
            partitions: r
                .get::<_, Vec<i32>>(5)
                .into_iter()
                .map(|p| p.max(0) as u32)
                .collect(),
        })
        .collect();
    let queue_sql = |table: &str, name: &str| {
        format!(
            "SELECT '{name}', count(*) FILTER (WHERE NOT dead),
                    count(*) FILTER (WHERE NOT dead AND claimed_by IS NOT NULL),
                    count(*) FILTER (WHERE NOT dead AND (attempts > 0 OR next_attempt_at IS NOT NULL)),
                    count(*) FILTER (WHERE dead),
                    {}
               FROM {s}.{table}",
            age("min(created_at) FILTER (WHERE NOT dead)")
        )
    };
    let queues = tx
        .query(
            &format!(
                "{} UNION ALL {}",
                queue_sql("wb_outbox", "outbox"),
                queue_sql("wb_inbox", "inbox")
            ),
            &[],
        )
        .await
        .map_err(query_error)?
        .iter()
        .map(|r| QueueStatus {
            queue: queue_of(r.get(0)),
            pending: count(r, 1),
            in_flight: count(r, 2),
            retrying: count(r, 3),
            dead: count(r, 4),
            oldest_pending_age: seconds(r.get(5)),
        })
        .collect();
    let checkpoints = tx
        .query(
            &format!(
                "SELECT perspective, position, {} FROM {s}.wb_perspective_checkpoints
                  ORDER BY perspective",
                iso("updated_at")
            ),
            &[],
        )
        .await
        .map_err(query_error)?
        .iter()
        .map(|r| {
            let position = r.get::<_, i64>(1).max(0) as u64;
            CheckpointStatus {
                perspective: r.get(0),
                position,
                behind: last_position.saturating_sub(position),
                updated_at: r.get(2),
            }
        })
        .collect();
    tx.commit().await.map_err(query_error)?;
    Ok(Status {
        schema: schema.to_string(),
        read_at: head.get(0),
        instances,
        leased_partitions: count(&head, 2),
        expired_leases: count(&head, 3),
        queues,
        last_position,
        checkpoints,
    })
}

fn count(row: &Row, i: usize) -> u64 {
    row.get::<_, i64>(i).max(0) as u64
}

fn queue_of(name: &str) -> Queue {
    if name == "outbox" {
        Queue::Outbox
    } else {
        Queue::Inbox
    }
}

/// From when a dead letter's row was stored, for [`DeadLetterFilter::stored_since`].
#[derive(Debug, Clone, PartialEq)]
pub enum Since {
    /// Stored at most this long ago, by the database's clock.
    Ago(Duration),
    /// Stored at or after this time: any text Postgres reads as a `timestamptz`
    /// (`2026-12-07T15:00:00Z`, `2026-12-07 15:00+01`).
    At(String),
}

/// Which dead letters a read or an action covers; every field left `None` covers them all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    /// Only rows of this queue.
    pub queue: Option<Queue>,
    /// Only messages of this type name.
    pub message_type: Option<String>,
    /// Only rows of this stream.
    pub stream_id: Option<String>,
    /// Only rows stored since then.
    pub stored_since: Option<Since>,
    /// Only these message ids.
    pub message_ids: Option<Vec<Uuid>>,
}

impl DeadLetterFilter {
    /// The dead letters with these message ids.
    pub fn ids(ids: Vec<Uuid>) -> DeadLetterFilter {
        DeadLetterFilter {
            message_ids: Some(ids),
            ..DeadLetterFilter::default()
        }
    }

    /// `AND …` conditions on the columns of [`DEAD_ROWS`], numbered from `$first`, and their
    /// parameters.
    fn conditions(&self, first: usize) -> (String, Vec<Box<dyn ToSql + Sync + Send>>) {
        let mut sql = String::new();
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut add = |condition: &str, param: Box<dyn ToSql + Sync + Send>| {
            let n = first + params.len();
            sql.push_str(&format!(
                " AND {}",
                condition.replace('$', &format!("${n}"))
            ));
            params.push(param);
        };
        if let Some(queue) = self.queue {
            add("q = $", Box::new(queue.as_str().to_string()));
        }
        if let Some(t) = &self.message_type {
            add("message_type = $", Box::new(t.clone()));
        }
        if let Some(stream) = &self.stream_id {
            add("stream_id = $", Box::new(stream.clone()));
        }
        match &self.stored_since {
            Some(Since::Ago(d)) => add(
                "created_at >= now() - $::float8 * interval '1 second'",
                Box::new(d.as_secs_f64()),
            ),
            Some(Since::At(t)) => add("created_at >= $::text::timestamptz", Box::new(t.clone())),
            None => {}
        }
        if let Some(ids) = &self.message_ids {
            add("message_id = ANY ($::uuid[])", Box::new(ids.clone()));
        }
        (sql, params)
    }
}

/// The dead-lettered rows of both queues, with the columns every view of them reads.
const DEAD_ROWS: &str =
    "(SELECT 'outbox' AS q, seq, message_id, message_kind, stream_id, partition,
            topic, correlation_id, causation_id, message_type, timestamp_us, meta, payload,
            attempts, last_error, created_at
       FROM {s}.wb_outbox WHERE dead
     UNION ALL
     SELECT 'inbox', seq, message_id, message_kind, stream_id, partition, NULL::text,
            correlation_id, causation_id, message_type, timestamp_us, meta, payload, attempts,
            last_error, created_at
       FROM {s}.wb_inbox WHERE dead) d";

fn dead_rows(schema: &str) -> String {
    DEAD_ROWS.replace("{s}", schema)
}

/// The parameters of a [`Statement`] as the driver takes them.
pub(super) fn params(boxed: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    boxed
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// One dead letter in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterSummary {
    /// The queue the row is in.
    pub queue: Queue,
    /// The row's message id.
    pub message_id: Uuid,
    /// The message's type name.
    pub message_type: String,
    /// The stream that waits behind it.
    pub stream_id: String,
    /// Counted attempts made.
    pub attempts: u32,
    /// The last failure, as `<kind>: <error>`; empty if none was recorded.
    pub error: String,
    /// When the row was stored, ISO 8601 UTC.
    pub stored_at: String,
}

/// A SQL statement with its parameters.
pub(super) type Statement = (String, Vec<Box<dyn ToSql + Sync + Send>>);

/// The statement listing the dead letters `filter` selects: `queue, message_id, message_type,
/// stream_id, attempts, error, stored_at`, outbox first, each queue in the order its rows were
/// written. The store's [`crate::store::Store::dead_letters`] runs it too.
pub(super) fn list_statement(schema: &str, filter: &DeadLetterFilter) -> Statement {
    let (conditions, params) = filter.conditions(1);
    (
        format!(
            "SELECT q, message_id, message_type, stream_id, attempts, coalesce(last_error, ''), {}
               FROM {} WHERE true{conditions}
              ORDER BY q DESC, seq",
            iso("created_at"),
            dead_rows(schema)
        ),
        params,
    )
}

/// A row of [`list_statement`].
pub(super) fn summary(r: &Row) -> DeadLetterSummary {
    DeadLetterSummary {
        queue: queue_of(r.get(0)),
        message_id: r.get(1),
        message_type: r.get(2),
        stream_id: r.get(3),
        attempts: r.get::<_, i32>(4).max(0) as u32,
        error: r.get(5),
        stored_at: r.get(6),
    }
}

/// The dead letters `filter` selects, outbox first, each queue in the order its rows were
/// written; [`StoreError::NotMigrated`] on a schema that is not migrated.
pub async fn dead_letters(
    client: &impl GenericClient,
    schema: &str,
    filter: &DeadLetterFilter,
) -> Result<Vec<DeadLetterSummary>, StoreError> {
    check_migrated(client, schema).await?;
    let (sql, boxed) = list_statement(schema, filter);
    let rows = client
        .query(&sql, &params(&boxed))
        .await
        .map_err(query_error)?;
    Ok(rows.iter().map(summary).collect())
}

/// One dead letter in full: its envelope, its error and its payload as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterDetail {
    /// The queue the row is in.
    pub queue: Queue,
    /// The message id.
    pub message_id: Uuid,
    /// `command` or `event`.
    pub kind: String,
    /// The message's type name.
    pub message_type: String,
    /// The stream that waits behind it.
    pub stream_id: String,
    /// The stream's partition.
    pub partition: u32,
    /// The topic it was to be published to (outbox rows only).
    pub topic: Option<String>,
    /// The correlation id of the request that caused it.
    pub correlation_id: Uuid,
    /// The message that caused it; `None` for an original request.
    pub causation_id: Option<Uuid>,
    /// When the message was created (its envelope's timestamp), ISO 8601 UTC to the
    /// microsecond.
    pub created_at: String,
    /// When the row was stored, ISO 8601 UTC.
    pub stored_at: String,
    /// Counted attempts made.
    pub attempts: u32,
    /// The last failure, as `<kind>: <error>`; empty if none was recorded.
    pub error: String,
    /// The service instances it passed through, oldest first.
    pub hops: Vec<Hop>,
    /// Its metadata.
    pub metadata: BTreeMap<String, String>,
    /// The payload as stored: the message encoded with rmp-serde (MessagePack, named fields).
    pub payload: Vec<u8>,
}

/// The dead letter `message_id` in full; [`StoreError::NotFound`] when no dead-lettered row
/// has that id.
pub async fn dead_letter(
    client: &impl GenericClient,
    schema: &str,
    message_id: Uuid,
) -> Result<DeadLetterDetail, StoreError> {
    check_migrated(client, schema).await?;
    let rows = client
        .query(
            &format!(
                "SELECT q, message_id, message_kind, message_type, stream_id, partition, topic,
                        correlation_id, causation_id,
                        to_char(to_timestamp(timestamp_us / 1e6) AT TIME ZONE 'UTC',
                                'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                        {}, attempts, coalesce(last_error, ''), meta, payload
                   FROM {} WHERE message_id = $1",
                iso("created_at"),
                dead_rows(schema)
            ),
            &[&message_id],
        )
        .await
        .map_err(query_error)?;
    let Some(r) = rows.first() else {
        return Err(StoreError::NotFound(format!("dead letter {message_id}")));
    };
    let meta: Vec<u8> = r.get(13);
    let (hops, metadata): (Vec<Hop>, BTreeMap<String, String>) = rmp_serde::from_slice(&meta)
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "hops and metadata of dead letter {message_id}: {e}"
            ))
        })?;
    Ok(DeadLetterDetail {
        queue: queue_of(r.get(0)),
        message_id: r.get(1),
        kind: r.get(2),
        message_type: r.get(3),
        stream_id: r.get(4),
        partition: r.get::<_, i32>(5).max(0) as u32,
        topic: r.get(6),
        correlation_id: r.get(7),
        causation_id: r.get(8),
        created_at: r.get(9),
        stored_at: r.get(10),
        attempts: r.get::<_, i32>(11).max(0) as u32,
        error: r.get(12),
        hops,
        metadata,
        payload: r.get(14),
    })
}

/// A dead letter an action changed: its queue and message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acted {
    /// The queue the row was in.
    pub queue: Queue,
    /// Its message id.
    pub message_id: Uuid,
}

/// What [`requeue`] and [`skip`] do to each dead letter they select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    /// Pending again, attempts reset, unclaimed.
    Requeue,
    /// Deleted; an inbox row's dedup record marked processed.
    Skip,
}

/// The statement applying `action` to the dead letters `filter` selects; it answers one row
/// `(queue, message_id)` per row changed, and notifies the schema's work channel when it
/// changed any (delivered at commit: a rolled-back action wakes nobody). The store's
/// [`crate::store::Store::requeue_dead_letter`] and `skip_dead_letter` run it too.
pub(super) fn action_statement(
    schema: &str,
    action: Action,
    filter: &DeadLetterFilter,
) -> Statement {
    let s = schema;
    let changes = match action {
        Action::Requeue => format!(
            "o AS (UPDATE {s}.wb_outbox SET dead = false, attempts = 0, next_attempt_at = NULL,
                          claimed_by = NULL, claimed_generation = NULL
                    WHERE dead AND message_id IN (SELECT message_id FROM sel WHERE q = 'outbox')
                RETURNING message_id),
             i AS (UPDATE {s}.wb_inbox SET dead = false, attempts = 0, next_attempt_at = NULL,
                          claimed_by = NULL, claimed_generation = NULL
                    WHERE dead AND message_id IN (SELECT message_id FROM sel WHERE q = 'inbox')
                RETURNING message_id)"
        ),
        Action::Skip => format!(
            "o AS (DELETE FROM {s}.wb_outbox
                    WHERE dead AND message_id IN (SELECT message_id FROM sel WHERE q = 'outbox')
                RETURNING message_id),
             i AS (DELETE FROM {s}.wb_inbox
                    WHERE dead AND message_id IN (SELECT message_id FROM sel WHERE q = 'inbox')
                RETURNING message_id),
             dd AS (UPDATE {s}.wb_dedup SET processed_at = now()
                     WHERE message_id IN (SELECT message_id FROM i) RETURNING 1)"
        ),
    };
    let (conditions, params) = filter.conditions(1);
    (
        format!(
            "WITH sel AS (SELECT q, message_id FROM {} WHERE true{conditions}),
                  {changes},
                  acted AS (SELECT 'outbox' AS q, message_id FROM o
                            UNION ALL SELECT 'inbox', message_id FROM i),
                  woken AS (SELECT pg_notify('wb_work_{s}', '') AS n
                             WHERE EXISTS (SELECT 1 FROM acted))
             SELECT q, message_id FROM acted LEFT JOIN woken ON true",
            dead_rows(s)
        ),
        params,
    )
}

/// A row of [`action_statement`].
pub(super) fn acted(r: &Row) -> Acted {
    Acted {
        queue: queue_of(r.get(0)),
        message_id: r.get(1),
    }
}

/// Puts every dead letter `filter` selects back as pending with its attempts reset, in one
/// transaction, and wakes the instances (their streams become claimable). When the filter
/// names message ids, each must be a dead letter, or nothing changes and the answer is
/// [`StoreError::NotFound`] naming those that are not.
pub async fn requeue(
    client: &mut Client,
    schema: &str,
    filter: &DeadLetterFilter,
) -> Result<Vec<Acted>, StoreError> {
    act(client, schema, Action::Requeue, filter).await
}

/// Drops every dead letter `filter` selects (an inbox row's dedup record is marked processed,
/// so a redelivery stays a duplicate), in one transaction, and wakes the instances (the rest of
/// each stream moves on). Message ids in the filter are checked as for [`requeue`].
pub async fn skip(
    client: &mut Client,
    schema: &str,
    filter: &DeadLetterFilter,
) -> Result<Vec<Acted>, StoreError> {
    act(client, schema, Action::Skip, filter).await
}

/// Runs [`action_statement`] in a transaction that is rolled back when a named id was not
/// changed.
async fn act(
    client: &mut Client,
    schema: &str,
    action: Action,
    filter: &DeadLetterFilter,
) -> Result<Vec<Acted>, StoreError> {
    let tx = client.transaction().await.map_err(query_error)?;
    check_migrated(&tx, schema).await?;
    let (sql, boxed) = action_statement(schema, action, filter);
    let done: Vec<Acted> = tx
        .query(&sql, &params(&boxed))
        .await
        .map_err(query_error)?
        .iter()
        .map(acted)
        .collect();
    if let Some(ids) = &filter.message_ids {
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !done.iter().any(|a| a.message_id == **id))
            .map(Uuid::to_string)
            .collect();
        if !missing.is_empty() {
            // Nothing is changed, nobody woken: `tx` rolls back when dropped.
            return Err(StoreError::NotFound(format!(
                "dead letter {}",
                missing.join(", ")
            )));
        }
    }
    tx.commit().await.map_err(query_error)?;
    Ok(done)
}
