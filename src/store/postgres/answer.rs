//! The rows of the batch functions back into a [`WorkBatchResult`]: the answer rows by kind
//! (stale, dead, retry, conflict, taken, appended, the packed `appended_v` and `wclaims_o`, dup,
//! writer and pending claims), envelopes decoded from their columns, and the start-up check
//! that the functions still return [`BATCH_ROW_COLUMNS`] in that order.
//!
//! It must not run queries: it reads rows it is handed, by position where the answer is hot.

use super::batch::PackedAppends;
use super::connect::PgConnection;
use crate::envelope::{Envelope, Hop, MessageKind};
use crate::store::{
    AppendedEvent, ExpectedVersion, InboxWork, OutboxWork, StoreError, StoredEvent, UnitOutcome,
    WorkBatch, WorkBatchResult, WorkRef,
};
use foldhash::HashMap;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, Type};
use uuid::Uuid;

pub(super) fn decode_envelope(row: &Row, kind_col: &str) -> Result<Envelope, StoreError> {
    let meta: Vec<u8> = row.get("meta");
    let (hops, metadata): (Vec<Hop>, BTreeMap<String, String>) = rmp_serde::from_slice(&meta)
        .map_err(|e| StoreError::Corrupt(format!("meta column: {e}")))?;
    let kind: String = row.get(kind_col);
    Ok(Envelope {
        message_id: row.get("message_id"),
        correlation_id: row.get("correlation_id"),
        causation_id: row.get("causation_id"),
        timestamp_us: row.get("timestamp_us"),
        message_type: row.get("message_type"),
        kind: MessageKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("message kind `{kind}`")))?,
        stream_id: row.get("stream_id"),
        hops,
        metadata,
        payload: row.get("payload"),
    })
}

pub(super) fn stored_event(row: &Row) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        position: row.get::<_, i64>("position") as u64,
        version: row.get::<_, i64>("version") as u64,
        envelope: decode_envelope(row, "message_kind")?,
    })
}

/// The columns of `wb_batch_row`, in order: the rows of a batch are read by position (a
/// look-up by name is a scan of the column list, per value). Start-up checks the functions
/// still return them so ([`check_batch_columns`]).
pub(super) const BATCH_ROW_COLUMNS: [&str; 17] = [
    "kind",
    "unit",
    "message_id",
    "stream_id",
    "version",
    "position",
    "partition",
    "generation",
    "attempts",
    "topic",
    "correlation_id",
    "causation_id",
    "message_type",
    "message_kind",
    "timestamp_us",
    "meta",
    "payload",
];
/// Positions in [`BATCH_ROW_COLUMNS`] of the columns [`read_answer`] reads by position.
mod column {
    pub const KIND: usize = 0;
    pub const UNIT: usize = 1;
    pub const MESSAGE_ID: usize = 2;
    pub const STREAM_ID: usize = 3;
    pub const VERSION: usize = 4;
    pub const POSITION: usize = 5;
    pub const PARTITION: usize = 6;
    pub const GENERATION: usize = 7;
    pub const META: usize = 15;
    pub const PAYLOAD: usize = 16;
}

/// Fails start-up when a batch function's rows are not [`BATCH_ROW_COLUMNS`] in that order.
pub(super) fn check_batch_columns(conn: &PgConnection, schema: &str) -> Result<(), StoreError> {
    for (function, statement) in [
        ("wb_process_work_batch", &conn.batch),
        ("wb_process_one_message", &conn.one_message),
    ] {
        let names: Vec<&str> = statement.columns().iter().map(|c| c.name()).collect();
        if names != BATCH_ROW_COLUMNS {
            return Err(StoreError::Corrupt(format!(
                "{schema}.{function} returns columns {names:?}, expected {BATCH_ROW_COLUMNS:?}"
            )));
        }
    }
    Ok(())
}

/// Where the batch's messages went in the arrays, for reading the answer.
pub(super) struct MessagePlaces {
    pub(super) m_unit: Vec<i32>,
    pub(super) m_part: Vec<i32>,
    /// Message id → its first index in the arrays.
    pub(super) positions: HashMap<Uuid, usize>,
    pub(super) appends: PackedAppends,
}

/// A binary array (`array_send`) the packed answer rows carry in a bytea column.
pub(super) fn packed<'a, T: FromSql<'a>>(
    row: &'a Row,
    column: usize,
    array_type: &Type,
) -> Result<Vec<T>, StoreError> {
    let raw: &[u8] = row
        .try_get(column)
        .map_err(|e| StoreError::Corrupt(format!("packed answer column {column}: {e}")))?;
    Vec::<T>::from_sql(array_type, raw)
        .map_err(|e| StoreError::Corrupt(format!("packed answer column {column}: {e}")))
}

/// The place in the batch's arrays of a row the answer says was claimed for the writer.
pub(super) fn claimed_index(
    positions: &HashMap<Uuid, usize>,
    id: Uuid,
) -> Result<usize, StoreError> {
    positions
        .get(&id)
        .copied()
        .ok_or_else(|| StoreError::Corrupt(format!("claimed unknown row {id}")))
}

/// The 'appended_v' row: each append's version and position from the batch's last position
/// and its streams' new versions (see `schema/functions/work_batch.sql`).
pub(super) fn read_packed_appends(
    row: &Row,
    appends: &mut PackedAppends,
    outcomes: &mut [UnitOutcome],
) -> Result<(), StoreError> {
    let last: i64 = row.get(column::POSITION);
    let versions: Vec<i64> = packed(row, column::PAYLOAD, &Type::INT8_ARRAY)?;
    if versions.len() != appends.streams.len() {
        return Err(StoreError::Corrupt(format!(
            "{} stream versions for {} appended streams",
            versions.len(),
            appends.streams.len()
        )));
    }
    let count = appends.places.len() as i64;
    for place in &appends.places {
        let version = versions[place.sidx - 1] - place.vback;
        // The stream's last append takes its name; earlier ones copy it.
        let stream = &mut appends.streams[place.sidx - 1];
        let stream_id = if place.vback == 0 {
            std::mem::take(stream)
        } else {
            stream.clone()
        };
        if let Some(UnitOutcome::Committed { appended, .. }) = outcomes.get_mut(place.unit) {
            appended.push(AppendedEvent {
                message_id: place.message_id,
                stream_id,
                version: version as u64,
                position: (last - count + place.apos) as u64,
            });
        }
    }
    Ok(())
}

/// Turns the rows of `wb_process_work_batch` (or `wb_process_one_message`) back into a
/// [`WorkBatchResult`].
pub(super) fn read_answer(
    mut batch: WorkBatch,
    places: MessagePlaces,
    rows: Vec<Row>,
) -> Result<WorkBatchResult, StoreError> {
    let MessagePlaces {
        m_unit,
        m_part,
        positions,
        mut appends,
    } = places;
    let mut result = WorkBatchResult::default();
    let mut outcomes: Vec<UnitOutcome> = batch
        .units
        .iter()
        .map(|_| UnitOutcome::Committed {
            appended: Vec::new(),
            claimed_outbox: Vec::new(),
            claimed_inbox: Vec::new(),
            duplicate_inbox: Vec::new(),
        })
        .collect();
    // Writer claims come back unordered: collected, then sorted by position in the batch.
    let mut wclaims: Vec<(usize, bool, WorkRef)> = Vec::new();
    for row in rows {
        let kind: &str = row.get(column::KIND);
        let unit = row.get::<_, Option<i32>>(column::UNIT).map(|u| u as usize);
        let message_id: Option<Uuid> = row.get(column::MESSAGE_ID);
        match kind {
            "stale" => result.stale.extend(message_id),
            "dead" => result.dead_lettered.extend(message_id),
            "retry" => {
                let ms: i64 = row.get(column::VERSION);
                result.next_retry_in = Some(Duration::from_millis(ms.max(0) as u64));
            }
            "conflict" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("conflict without unit".into()))?;
                let stream: String = row.get(column::STREAM_ID);
                let actual: i64 = row.get(column::POSITION);
                let expected = batch.units[u]
                    .expectations
                    .iter()
                    .find(|(s, _)| *s == stream)
                    .map_or(ExpectedVersion::Any, |(_, e)| *e);
                outcomes[u] = UnitOutcome::Conflict {
                    stream_id: stream,
                    expected,
                    actual: actual as u64,
                };
            }
            "taken" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("taken without unit".into()))?;
                outcomes[u] = UnitOutcome::KeyTaken {
                    key: row.get(column::STREAM_ID),
                };
            }
            "appended" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("append without unit".into()))?;
                if let UnitOutcome::Committed { appended, .. } = &mut outcomes[u] {
                    appended.push(AppendedEvent {
                        message_id: message_id.unwrap_or_default(),
                        stream_id: row.get(column::STREAM_ID),
                        version: row.get::<_, i64>(column::VERSION) as u64,
                        position: row.get::<_, i64>(column::POSITION) as u64,
                    });
                }
            }
            "appended_v" => read_packed_appends(&row, &mut appends, &mut outcomes)?,
            "wclaims_o" => {
                let ids: Vec<Uuid> = packed(&row, column::PAYLOAD, &Type::UUID_ARRAY)?;
                let generations: Vec<i64> = packed(&row, column::META, &Type::INT8_ARRAY)?;
                if ids.len() != generations.len() {
                    return Err(StoreError::Corrupt(format!(
                        "{} claimed rows with {} generations",
                        ids.len(),
                        generations.len()
                    )));
                }
                for (id, generation) in ids.into_iter().zip(generations) {
                    let index = claimed_index(&positions, id)?;
                    wclaims.push((
                        index,
                        true,
                        WorkRef {
                            message_id: id,
                            partition: m_part[index] as u32,
                            generation: generation as u64,
                        },
                    ));
                }
            }
            "dup" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("dup without unit".into()))?;
                if let UnitOutcome::Committed {
                    duplicate_inbox, ..
                } = &mut outcomes[u]
                {
                    duplicate_inbox.extend(message_id);
                }
            }
            "wclaim_o" | "wclaim_i" => {
                let id = message_id.unwrap_or_default();
                let index = claimed_index(&positions, id)?;
                wclaims.push((
                    index,
                    kind == "wclaim_o",
                    WorkRef {
                        message_id: id,
                        partition: row.get::<_, i32>(column::PARTITION) as u32,
                        generation: row.get::<_, i64>(column::GENERATION) as u64,
                    },
                ));
            }
            "claim_o" | "claim_i" => {
                let envelope = decode_envelope(&row, "message_kind")?;
                let work = WorkRef {
                    message_id: envelope.message_id,
                    partition: row.get::<_, i32>("partition") as u32,
                    generation: row.get::<_, i64>("generation") as u64,
                };
                let attempts = row.get::<_, i32>("attempts") as u32;
                if kind == "claim_o" {
                    result.claimed_outbox.push(OutboxWork {
                        envelope,
                        topic: row.get("topic"),
                        work,
                        attempts,
                    });
                } else {
                    // The event's place in the event store (NULL for a command or an event
                    // received from another service).
                    let place = |column: usize| row.get::<_, Option<i64>>(column).map(|v| v as u64);
                    result.claimed_inbox.push(InboxWork {
                        envelope,
                        work,
                        attempts,
                        version: place(column::VERSION),
                        position: place(column::POSITION),
                    });
                }
            }
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown batch row kind {other}"
                )));
            }
        }
    }
    wclaims.sort_by_key(|(index, _, _)| *index);
    for (index, outbox, work) in wclaims {
        let u = m_unit[index] as usize;
        let unit = &mut batch.units[u];
        if let UnitOutcome::Committed {
            appended,
            claimed_outbox,
            claimed_inbox,
            ..
        } = &mut outcomes[u]
        {
            // Each row is claimed once: moved out, not cloned.
            if outbox {
                if let Some(i) = unit
                    .outbox
                    .iter()
                    .position(|r| r.envelope.message_id == work.message_id)
                {
                    let row = unit.outbox.swap_remove(i);
                    claimed_outbox.push(OutboxWork {
                        envelope: row.envelope,
                        topic: row.topic,
                        work,
                        attempts: 0,
                    });
                }
            } else if let Some(i) = unit
                .inbox
                .iter()
                .position(|r| r.envelope.message_id == work.message_id)
            {
                let place = appended.iter().find(|a| a.message_id == work.message_id);
                claimed_inbox.push(InboxWork {
                    envelope: unit.inbox.swap_remove(i).envelope,
                    work,
                    attempts: 0,
                    version: place.map(|a| a.version),
                    position: place.map(|a| a.position),
                });
            }
        }
    }
    result.units = outcomes;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::{BATCH_ROW_COLUMNS, column};

    #[test]
    fn column_positions_name_the_columns_read_there() {
        for (position, name) in [
            (column::KIND, "kind"),
            (column::UNIT, "unit"),
            (column::MESSAGE_ID, "message_id"),
            (column::STREAM_ID, "stream_id"),
            (column::VERSION, "version"),
            (column::POSITION, "position"),
            (column::PARTITION, "partition"),
            (column::GENERATION, "generation"),
        ] {
            assert_eq!(BATCH_ROW_COLUMNS[position], name);
        }
    }
}
