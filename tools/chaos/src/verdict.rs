//! The verdict of a chaos run: what was committed (the writers' event store) against what the
//! consumers applied (their read model's rows, in the order they committed).
//!
//! Pure counting, no I/O: the orchestrator gathers both sides and the row counts, this module
//! turns them into the figures the run is judged by. It must not decide bounds that belong to
//! the configuration (the takeover bound is computed by the orchestrator from the lease time).

use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// One event the writers committed: its stream, version and message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub stream: String,
    pub version: u64,
    pub message_id: Uuid,
}

/// One application of an event by a consumer's perspective, in application order, with the
/// label of the process that applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub stream: String,
    pub seq: u64,
    pub message_id: Uuid,
    pub label: String,
}

/// Lost, doubled and out-of-order applications.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Events committed but never applied.
    pub lost: usize,
    /// Applications beyond the first of the same event that no kill explains: the inbox's
    /// dedup failed.
    pub duplicates: usize,
    /// Applications beyond the first of an event whose earlier application was made by a
    /// process that was then SIGKILLed. The consumers' read model commits its write with the
    /// record of the event (exactly once), so this must be 0 too; it is counted apart to say
    /// which gap failed.
    pub reapplied_after_kill: usize,
    /// First applications of an event that did not come right after its predecessor in the
    /// stream (an earlier event was skipped or came later).
    pub order_violations: usize,
    /// Applications of events that were never committed (must be impossible).
    pub phantoms: usize,
}

/// Compares the committed events with the applications. `applied` is in the order the
/// consumers applied them; only the relative order within one stream matters. `killed` names
/// the consumer processes that were SIGKILLed.
pub fn count(committed: &[Committed], applied: &[Applied], killed: &HashSet<String>) -> Counts {
    let committed_ids: HashSet<Uuid> = committed.iter().map(|c| c.message_id).collect();
    // Each event's latest applier so far.
    let mut seen: HashMap<Uuid, &str> = HashMap::with_capacity(applied.len());
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut counts = Counts::default();
    for a in applied {
        if !committed_ids.contains(&a.message_id) {
            counts.phantoms += 1;
            continue;
        }
        if let Some(before) = seen.insert(a.message_id, &a.label) {
            if killed.contains(before) && before != a.label {
                counts.reapplied_after_kill += 1;
            } else {
                counts.duplicates += 1;
            }
            continue;
        }
        let last = last_seq.entry(a.stream.as_str()).or_insert(0);
        if a.seq != *last + 1 {
            counts.order_violations += 1;
        }
        *last = (*last).max(a.seq);
    }
    counts.lost = committed_ids
        .iter()
        .filter(|id| !seen.contains_key(id))
        .count();
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
                label: "c0.1".into(),
            })
            .collect()
    }

    fn count(c: &[Committed], a: &[Applied]) -> Counts {
        super::count(c, a, &HashSet::new())
    }

    #[test]
    fn a_second_application_after_a_kill_of_the_first_applier_is_counted_apart() {
        let c = committed("a", 2);
        let mut a = applied("a", &[1, 2]);
        let mut again = applied("a", &[2]);
        again[0].label = "c1.1".into();
        a.extend(again.clone());
        let killed: HashSet<String> = ["c0.1".to_string()].into();
        let counts = super::count(&c, &a, &killed);
        assert_eq!(counts.reapplied_after_kill, 1);
        assert_eq!(counts.duplicates, 0);
        // Without the kill the same rows are a duplicate.
        assert_eq!(count(&c, &a).duplicates, 1);
        // A second application by the process that made the first is a duplicate, killed or not.
        a.extend(again);
        assert_eq!(super::count(&c, &a, &killed).duplicates, 1);
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
