//! What the read commands print: `status` and the dead letters as aligned tables for a person,
//! or as JSON documents for a script (the keys are listed in `docs/operations.md`, and only
//! ever added to).
//!
//! Owns formatting only: it gets what the library's `store::postgres::inspect` read and must
//! not query anything itself. Nothing it renders holds a secret: the database is named by the
//! endpoint rendered from the parsed configuration, which has no password.

use crate::payload;
use serde_json::{Value, json};
use std::time::Duration;
use whizbang::store::postgres::inspect::{DeadLetterDetail, DeadLetterSummary, Status};

/// What `status` renders beside what it read: from the configuration and the connection.
pub struct StatusContext<'a> {
    /// The database, as `connect::endpoint` renders it.
    pub endpoint: &'a str,
    /// `partitions.partition_count`.
    pub partition_count: u32,
    /// `partitions.lease_seconds`: an instance whose heartbeat is older is taken for dead.
    pub lease: Duration,
}

/// A duration as a person reads it: `850ms`, `12.3s`, `4m 05s`, `2h 07m`, `3d 04h`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1_000 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 3_600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h {:02}m", s / 3_600, s % 3_600 / 60)
    } else {
        format!("{}d {:02}h", s / 86_400, s % 86_400 / 3_600)
    }
}

/// Ascending partition numbers as ranges: `0-3,7,9-10`; `-` for none.
pub fn ranges(partitions: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < partitions.len() {
        let start = partitions[i];
        let mut end = start;
        while i + 1 < partitions.len() && partitions[i + 1] == end + 1 {
            i += 1;
            end = partitions[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

/// Rows as columns padded to their widest cell, two spaces apart; the last column is not
/// padded. Line breaks in a cell become spaces, so a row stays one line.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |cell: &str| cell.replace(['\n', '\r'], " ");
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn alive(age: Duration, lease: Duration) -> bool {
    age < lease
}

/// `status` as tables.
pub fn status_table(s: &Status, cx: &StatusContext) -> String {
    let mut out = format!(
        "schema {} at {}, read {}\n\n",
        s.schema, cx.endpoint, s.read_at
    );
    if s.instances.is_empty() {
        out.push_str("INSTANCES: none registered\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .instances
            .iter()
            .map(|i| {
                vec![
                    i.instance_id.to_string(),
                    i.service.clone(),
                    i.host.clone(),
                    format!("{} ago", duration(i.heartbeat_age)),
                    if alive(i.heartbeat_age, cx.lease) {
                        "alive".into()
                    } else {
                        "silent".into()
                    },
                    i.partitions.len().to_string(),
                    ranges(&i.partitions),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "INSTANCE",
                "SERVICE",
                "HOST",
                "HEARTBEAT",
                "STATE",
                "LEASES",
                "PARTITIONS",
            ],
            &rows,
        ));
    }
    out.push_str(&format!(
        "partitions: {} configured, {} leased, {} with an expired lease\n\n",
        cx.partition_count, s.leased_partitions, s.expired_leases
    ));
    let rows: Vec<Vec<String>> = s
        .queues
        .iter()
        .map(|q| {
            vec![
                q.queue.as_str().to_string(),
                q.pending.to_string(),
                q.in_flight.to_string(),
                q.retrying.to_string(),
                q.dead.to_string(),
                q.oldest_pending_age.map_or_else(|| "-".into(), duration),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "QUEUE",
            "PENDING",
            "IN FLIGHT",
            "RETRYING",
            "DEAD",
            "OLDEST PENDING",
        ],
        &rows,
    ));
    out.push_str(&format!(
        "\nevent store: last position {}\n",
        s.last_position
    ));
    if s.checkpoints.is_empty() {
        out.push_str("perspective checkpoints: none saved (no replay has run)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .checkpoints
            .iter()
            .map(|c| {
                vec![
                    c.perspective.clone(),
                    c.position.to_string(),
                    c.behind.to_string(),
                    c.updated_at.clone(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["PERSPECTIVE", "CHECKPOINT", "BEHIND", "SAVED"],
            &rows,
        ));
    }
    out
}

/// `status` as one JSON document.
pub fn status_json(s: &Status, cx: &StatusContext) -> Value {
    json!({
        "schema": s.schema,
        "database": cx.endpoint,
        "read_at": s.read_at,
        "instances": s.instances.iter().map(|i| json!({
            "instance_id": i.instance_id,
            "service": i.service,
            "host": i.host,
            "started_at": i.started_at,
            "heartbeat_age_seconds": i.heartbeat_age.as_secs_f64(),
            "alive": alive(i.heartbeat_age, cx.lease),
            "leases": i.partitions.len(),
            "partitions": i.partitions,
        })).collect::<Vec<_>>(),
        "partitions": {
            "configured": cx.partition_count,
            "leased": s.leased_partitions,
            "expired": s.expired_leases,
        },
        "queues": s.queues.iter().map(|q| json!({
            "queue": q.queue.as_str(),
            "pending": q.pending,
            "in_flight": q.in_flight,
            "retrying": q.retrying,
            "dead": q.dead,
            "oldest_pending_age_seconds": q.oldest_pending_age.map(|d| d.as_secs_f64()),
        })).collect::<Vec<_>>(),
        "event_store": { "last_position": s.last_position },
        "perspectives": s.checkpoints.iter().map(|c| json!({
            "perspective": c.perspective,
            "position": c.position,
            "behind": c.behind,
            "updated_at": c.updated_at,
        })).collect::<Vec<_>>(),
    })
}

/// A dead-letter listing as a table, with a closing count; one line when there are none.
pub fn dead_letters_table(letters: &[DeadLetterSummary], schema: &str, filtered: bool) -> String {
    let matching = if filtered {
        " matching the filters"
    } else {
        ""
    };
    if letters.is_empty() {
        return format!("no dead letters{matching} in schema {schema}\n");
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.queue.as_str().to_string(),
                d.message_id.to_string(),
                d.message_type.clone(),
                d.stream_id.clone(),
                d.attempts.to_string(),
                d.stored_at.clone(),
                d.error.clone(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "QUEUE",
            "MESSAGE ID",
            "TYPE",
            "STREAM",
            "ATTEMPTS",
            "STORED",
            "ERROR",
        ],
        &rows,
    );
    out.push_str(&format!(
        "{} dead letter(s){matching} in schema {schema}\n",
        letters.len()
    ));
    out
}

/// A dead-letter listing as a JSON array.
pub fn dead_letters_json(letters: &[DeadLetterSummary]) -> Value {
    Value::Array(
        letters
            .iter()
            .map(|d| {
                json!({
                    "queue": d.queue.as_str(),
                    "message_id": d.message_id,
                    "message_type": d.message_type,
                    "stream_id": d.stream_id,
                    "attempts": d.attempts,
                    "last_error": d.error,
                    "stored_at": d.stored_at,
                })
            })
            .collect(),
    )
}

/// One dead letter as a JSON document; the payload decoded from MessagePack, or (when it does
/// not decode) `null` with the reason and the bytes in base64.
pub fn dead_letter_json(d: &DeadLetterDetail) -> Value {
    let (payload, payload_error) = match payload::to_json(&d.payload) {
        Ok(v) => (v, Value::Null),
        Err(e) => (Value::Null, Value::String(e)),
    };
    let mut doc = json!({
        "queue": d.queue.as_str(),
        "message_id": d.message_id,
        "kind": d.kind,
        "message_type": d.message_type,
        "stream_id": d.stream_id,
        "partition": d.partition,
        "topic": d.topic,
        "correlation_id": d.correlation_id,
        "causation_id": d.causation_id,
        "created_at": d.created_at,
        "stored_at": d.stored_at,
        "attempts": d.attempts,
        "last_error": d.error,
        "hops": d.hops,
        "metadata": d.metadata,
        "payload_bytes": d.payload.len(),
        "payload": payload,
    });
    if !payload_error.is_null() {
        use base64::Engine as _;
        doc["payload_error"] = payload_error;
        doc["payload_base64"] =
            Value::String(base64::engine::general_purpose::STANDARD.encode(&d.payload));
    }
    doc
}

/// One dead letter for a person: the envelope field by field, then the payload as JSON.
pub fn dead_letter_text(d: &DeadLetterDetail, schema: &str) -> String {
    let doc = dead_letter_json(d);
    let mut fields: Vec<(&str, String)> = vec![
        ("queue", format!("{} (schema {schema})", d.queue.as_str())),
        ("message id", d.message_id.to_string()),
        ("type", format!("{} ({})", d.message_type, d.kind)),
        (
            "stream",
            format!("{} (partition {})", d.stream_id, d.partition),
        ),
    ];
    if let Some(topic) = &d.topic {
        fields.push(("topic", topic.clone()));
    }
    fields.extend([
        ("correlation id", d.correlation_id.to_string()),
        (
            "causation id",
            d.causation_id
                .map_or_else(|| "- (an original request)".into(), |c| c.to_string()),
        ),
        ("created at", d.created_at.clone()),
        ("stored at", d.stored_at.clone()),
        ("attempts", d.attempts.to_string()),
        (
            "last error",
            if d.error.is_empty() {
                "-".into()
            } else {
                d.error.replace(['\n', '\r'], " ")
            },
        ),
    ]);
    if d.metadata.is_empty() {
        fields.push(("metadata", "-".into()));
    }
    for (k, v) in &d.metadata {
        fields.push(("metadata", format!("{k}={v}")));
    }
    if d.hops.is_empty() {
        fields.push(("hops", "-".into()));
    }
    for h in &d.hops {
        fields.push((
            "hop",
            format!(
                "{} {}{} stream {} partition {}",
                h.service,
                h.instance,
                h.topic
                    .as_deref()
                    .map(|t| format!(" via {t}"))
                    .unwrap_or_default(),
                h.stream_id,
                h.partition
            ),
        ));
    }
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in &fields {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    match doc.get("payload_error").and_then(Value::as_str) {
        None => {
            out.push_str(&format!(
                "payload ({} bytes of MessagePack, as JSON):\n{}\n",
                d.payload.len(),
                serde_json::to_string_pretty(&doc["payload"]).unwrap_or_default()
            ));
        }
        Some(e) => {
            out.push_str(&format!(
                "payload ({} bytes) is not MessagePack: {e}\nbase64: {}\n",
                d.payload.len(),
                doc["payload_base64"].as_str().unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_partition_ranges_read_well() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(duration(Duration::from_secs(245)), "4m 05s");
        assert_eq!(duration(Duration::from_secs(2 * 3600 + 7 * 60)), "2h 07m");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 04h"
        );
        assert_eq!(ranges(&[]), "-");
        assert_eq!(ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(ranges(&[5]), "5");
    }

    #[test]
    fn tables_align_and_keep_each_row_on_one_line() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["xyz".into(), "1".into(), "multi\nline".into()],
                vec!["".into(), "22".into(), "z".into()],
            ],
        );
        assert_eq!(
            t,
            "A    LONG HEADER  C\nxyz  1            multi line\n     22           z\n"
        );
    }
}
