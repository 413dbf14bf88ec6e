//! The verdict of a chaos run: what was committed (the writers' event store) against what the
//! consumer applied (its perspective's log, in the order it applied them).
//!
//! Pure counting, no I/O: the orchestrator gathers both sides and the row counts, this module
//! turns them into the figures the run is judged by. It must not decide bounds that belong to
//! the configuration (the takeover bound is computed by the orchestrator from the lease time).

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// One event the writers committed: its stream, version and message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub stream: String,
    pub version: u64,
    pub message_id: Uuid,
}

/// One application of an event by the consumer's perspective, in application order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Applied {
    pub stream: String,
    pub seq: u64,
    pub message_id: Uuid,
}

/// Lost, doubled and out-of-order applications.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Events committed but never applied.
    pub lost: usize,
    /// Applications beyond the first of the same event.
    pub duplicates: usize,
    /// First applications of an event that did not come right after its predecessor in the
    /// stream (an earlier event was skipped or came later).
    pub order_violations: usize,
    /// Applications of events that were never committed (must be impossible).
    pub phantoms: usize,
}

/// Compares the committed events with the applications. `applied` is in the order the
/// consumer applied them; only the relative order within one stream matters.
pub fn count(committed: &[Committed], applied: &[Applied]) -> Counts {
    let committed_ids: HashSet<Uuid> = committed.iter().map(|c| c.message_id).collect();
    let mut seen: HashSet<Uuid> = HashSet::with_capacity(applied.len());
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut counts = Counts::default();
    for a in applied {
        if !committed_ids.contains(&a.message_id) {
            counts.phantoms += 1;
            continue;
        }
        if !seen.insert(a.message_id) {
            counts.duplicates += 1;
            continue;
        }
        let last = last_seq.entry(a.stream.as_str()).or_insert(0);
        if a.seq != *last + 1 {
            counts.order_violations += 1;
        }
        *last = (*last).max(a.seq);
    }
    counts.lost = committed_ids.difference(&seen).count();
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(stream: &str, n: u64) -> Vec<Committed> {
        (1..=n)
            .map(|version| Committed {
                stream: stream.into(),
                version,
                message_id: id(stream, version),
            })
            .collect()
    }

    /// A stable id per (stream, version), so tests can name events.
    fn id(stream: &str, version: u64) -> Uuid {
        let mut bytes = [0u8; 16];
        for (i, b) in stream.bytes().take(8).enumerate() {
            bytes[i] = b;
        }
        bytes[8..].copy_from_slice(&version.to_be_bytes());
        Uuid::from_bytes(bytes)
    }

    fn applied(stream: &str, seqs: &[u64]) -> Vec<Applied> {
        seqs.iter()
            .map(|&seq| Applied {
                stream: stream.into(),
                seq,
                message_id: id(stream, seq),
            })
            .collect()
    }

    #[test]
    fn a_clean_run_counts_nothing() {
        let mut c = committed("a", 3);
        c.extend(committed("b", 2));
        // Streams interleave freely; each stays in order.
        let mut a = applied("a", &[1]);
        a.extend(applied("b", &[1]));
        a.extend(applied("a", &[2, 3]));
        a.extend(applied("b", &[2]));
        assert_eq!(count(&c, &a), Counts::default());
    }

    #[test]
    fn a_missing_event_is_lost_and_its_successor_out_of_order() {
        let c = committed("a", 3);
        let a = applied("a", &[1, 3]);
        let counts = count(&c, &a);
        assert_eq!(counts.lost, 1);
        assert_eq!(counts.order_violations, 1);
        assert_eq!(counts.duplicates, 0);
    }

    #[test]
    fn a_second_application_is_a_duplicate_not_an_order_violation() {
        let c = committed("a", 3);
        let a = applied("a", &[1, 2, 2, 3, 1]);
        let counts = count(&c, &a);
        assert_eq!(counts.duplicates, 2);
        assert_eq!(counts.order_violations, 0);
        assert_eq!(counts.lost, 0);
    }

    #[test]
    fn an_overtaking_event_is_an_order_violation() {
        let c = committed("a", 3);
        let a = applied("a", &[2, 1, 3]);
        let counts = count(&c, &a);
        // 2 came before 1 (violation), then 1 came after 2 (violation); 3 follows the max.
        assert_eq!(counts.order_violations, 2);
        assert_eq!(counts.lost, 0);
    }

    #[test]
    fn an_application_of_something_never_committed_is_a_phantom() {
        let c = committed("a", 1);
        let a = applied("a", &[1, 2]);
        assert_eq!(count(&c, &a).phantoms, 1);
    }
}
