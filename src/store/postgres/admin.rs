//! Dead-letter administration through the store's pool: listing the rows parked after
//! `max_attempts`, putting one back as pending with its attempts reset, or dropping it (an
//! inbox row's dedup record is then marked processed) so its stream moves on. Each change
//! notifies the LISTEN channel, since the stream behind it becomes claimable.
//!
//! It runs the statements of [`super::inspect`] (one text for the CLI and the store) and must
//! not touch rows that are not dead-lettered: a live row's claim and lease belong to the batch
//! functions.

use super::PostgresStore;
use super::inspect::{self, Action, DeadLetterFilter};
use crate::store::{DeadLetter, StoreError};
use uuid::Uuid;

pub(super) async fn dead_letters(store: &PostgresStore) -> Result<Vec<DeadLetter>, StoreError> {
    let (sql, params) = inspect::list_statement(&store.schema, &DeadLetterFilter::default());
    let rows = store.query(&sql, &inspect::params(&params)).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let d = inspect::summary(r);
            DeadLetter {
                queue: d.queue,
                message_id: d.message_id,
                message_type: d.message_type,
                stream_id: d.stream_id,
                attempts: d.attempts,
                error: d.error,
            }
        })
        .collect())
}

pub(super) async fn requeue(store: &PostgresStore, message_id: Uuid) -> Result<(), StoreError> {
    act(store, Action::Requeue, message_id).await
}

pub(super) async fn skip(store: &PostgresStore, message_id: Uuid) -> Result<(), StoreError> {
    act(store, Action::Skip, message_id).await
}

/// One statement: with a single id there is nothing to roll back when it is not a dead letter.
async fn act(store: &PostgresStore, action: Action, message_id: Uuid) -> Result<(), StoreError> {
    let filter = DeadLetterFilter::ids(vec![message_id]);
    let (sql, params) = inspect::action_statement(&store.schema, action, &filter);
    let rows = store.query(&sql, &inspect::params(&params)).await?;
    if rows.is_empty() {
        return Err(StoreError::NotFound(format!("dead letter {message_id}")));
    }
    Ok(())
}
