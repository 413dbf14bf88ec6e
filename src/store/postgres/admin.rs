//! Dead-letter administration of the Postgres store: listing the rows parked after
//! `max_attempts`, putting one back as pending with its attempts reset, or dropping it (an
//! inbox row's dedup record is then marked processed) so its stream moves on. Each change
//! notifies the LISTEN channel, since the stream behind it becomes claimable.
//!
//! It must not touch rows that are not dead-lettered: a live row's claim and lease belong to
//! the batch functions.

use super::PostgresStore;
use crate::store::{DeadLetter, Queue, StoreError};
use uuid::Uuid;

pub(super) async fn dead_letters(store: &PostgresStore) -> Result<Vec<DeadLetter>, StoreError> {
    let s = &store.schema;
    let rows = store
            .query(
                &format!(
                    "SELECT 'outbox' AS q, message_id, message_type, stream_id, attempts, coalesce(last_error, '') AS err, seq
                       FROM {s}.wb_outbox WHERE dead
                     UNION ALL
                     SELECT 'inbox', message_id, message_type, stream_id, attempts, coalesce(last_error, ''), seq
                       FROM {s}.wb_inbox WHERE dead
                     ORDER BY q DESC, seq"
                ),
                &[],
            )
            .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            queue: if r.get::<_, &str>(0) == "outbox" {
                Queue::Outbox
            } else {
                Queue::Inbox
            },
            message_id: r.get(1),
            message_type: r.get(2),
            stream_id: r.get(3),
            attempts: r.get::<_, i32>(4) as u32,
            error: r.get(5),
        })
        .collect())
}

pub(super) async fn requeue(store: &PostgresStore, message_id: Uuid) -> Result<(), StoreError> {
    let s = &store.schema;
    let rows = store
            .query(
                &format!(
                    "WITH o AS (UPDATE {s}.wb_outbox SET dead = false, attempts = 0, next_attempt_at = NULL,
                                    claimed_by = NULL, claimed_generation = NULL
                                 WHERE message_id = $1 AND dead RETURNING 1),
                          i AS (UPDATE {s}.wb_inbox SET dead = false, attempts = 0, next_attempt_at = NULL,
                                    claimed_by = NULL, claimed_generation = NULL
                                 WHERE message_id = $1 AND dead RETURNING 1),
                          n AS (SELECT (SELECT count(*) FROM o) + (SELECT count(*) FROM i) AS c)
                     SELECT c, pg_notify('wb_work_{s}', '') FROM n"
                ),
                &[&message_id],
            )
            .await?;
    if rows[0].get::<_, i64>(0) == 0 {
        return Err(StoreError::NotFound(format!("dead letter {message_id}")));
    }
    Ok(())
}

pub(super) async fn skip(store: &PostgresStore, message_id: Uuid) -> Result<(), StoreError> {
    let s = &store.schema;
    let rows = store
            .query(
                &format!(
                    "WITH o AS (DELETE FROM {s}.wb_outbox WHERE message_id = $1 AND dead RETURNING 1),
                          i AS (DELETE FROM {s}.wb_inbox WHERE message_id = $1 AND dead RETURNING message_id),
                          d AS (UPDATE {s}.wb_dedup SET processed_at = now()
                                 WHERE message_id IN (SELECT message_id FROM i) RETURNING 1),
                          n AS (SELECT (SELECT count(*) FROM o) + (SELECT count(*) FROM i)
                                     + 0 * (SELECT count(*) FROM d) AS c)
                     SELECT c, pg_notify('wb_work_{s}', '') FROM n"
                ),
                &[&message_id],
            )
            .await?;
    if rows[0].get::<_, i64>(0) == 0 {
        return Err(StoreError::NotFound(format!("dead letter {message_id}")));
    }
    Ok(())
}
