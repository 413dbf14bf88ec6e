//! A [`WorkBatch`] as the arguments of the batch functions: the parallel arrays of
//! `wb_process_work_batch` (reports, units, expected versions, messages, inbox completions,
//! idempotency records),
//! the numbering of the batch's appends the caller computes (see
//! `schema/functions/work_batch.sql`), and the scalars of `wb_process_one_message` for a batch of one message.
//!
//! It must not run queries or read answers (`answer` does): it only lays the batch out, borrowing
//! it rather than copying its payloads.

use crate::envelope::Envelope;
use crate::store::{ExpectedVersion, Failure, FailureKind, UnitOfWork, WorkBatch, WorkRef};
use foldhash::HashMap;
use uuid::Uuid;

/// Hops and metadata travel in one column.
fn encode_meta(envelope: &Envelope) -> Vec<u8> {
    // Room for a few hops up front: grown from empty, the buffer was reallocated four or five
    // times per message.
    let mut meta = Vec::with_capacity(192);
    match rmp_serde::encode::write(&mut meta, &(&envelope.hops, &envelope.metadata)) {
        Ok(()) => meta,
        Err(_) => Vec::new(),
    }
}

/// The batch as the arrays `wb_process_work_batch` takes.
#[derive(Default)]
pub(super) struct BatchArrays<'a> {
    pub(super) r_queue: Vec<&'static str>,
    pub(super) r_op: Vec<&'static str>,
    pub(super) r_id: Vec<Uuid>,
    pub(super) r_part: Vec<i32>,
    pub(super) r_gen: Vec<i64>,
    pub(super) r_error: Vec<Option<String>>,
    pub(super) u_claim: Vec<bool>,
    pub(super) x_unit: Vec<i32>,
    pub(super) x_stream: Vec<&'a str>,
    pub(super) x_expected: Vec<i64>,
    pub(super) m_unit: Vec<i32>,
    pub(super) m_id: Vec<Uuid>,
    pub(super) m_kind: Vec<&'static str>,
    pub(super) m_stream: Vec<&'a str>,
    pub(super) m_part: Vec<i32>,
    pub(super) m_corr: Vec<Uuid>,
    pub(super) m_cause: Vec<Option<Uuid>>,
    pub(super) m_type: Vec<&'a str>,
    pub(super) m_ts: Vec<i64>,
    pub(super) m_meta: Vec<Vec<u8>>,
    pub(super) m_payload: Vec<&'a [u8]>,
    pub(super) m_append: Vec<bool>,
    pub(super) m_topic: Vec<Option<&'a str>>,
    pub(super) m_inbox: Vec<bool>,
    pub(super) c_unit: Vec<i32>,
    pub(super) c_id: Vec<Uuid>,
    pub(super) c_part: Vec<i32>,
    pub(super) c_gen: Vec<i64>,
    pub(super) k_unit: Vec<i32>,
    pub(super) k_key: Vec<&'a str>,
    pub(super) k_hash: Vec<&'a [u8]>,
    pub(super) k_outcome: Vec<&'a [u8]>,
}

impl<'a> BatchArrays<'a> {
    /// Lays out `batch`; records message id → first array index in `positions` for reading
    /// the answer.
    pub(super) fn of(
        batch: &'a WorkBatch,
        positions: &mut HashMap<Uuid, usize>,
    ) -> BatchArrays<'a> {
        let mut a = BatchArrays::default();
        for w in &batch.outbox_completions {
            a.report("o", "done", w, None);
        }
        for f in &batch.outbox_failures {
            a.failure("o", f);
        }
        for w in &batch.outbox_releases {
            a.report("o", "release", w, None);
        }
        for w in &batch.inbox_completions {
            a.report("i", "done", w, None);
        }
        for f in &batch.inbox_failures {
            a.failure("i", f);
        }
        for w in &batch.inbox_releases {
            a.report("i", "release", w, None);
        }
        for (i, unit) in batch.units.iter().enumerate() {
            a.unit(i as i32, unit, positions);
        }
        a
    }

    fn report(
        &mut self,
        queue: &'static str,
        op: &'static str,
        w: &WorkRef,
        error: Option<String>,
    ) {
        self.r_queue.push(queue);
        self.r_op.push(op);
        self.r_id.push(w.message_id);
        self.r_part.push(w.partition as i32);
        self.r_gen.push(w.generation as i64);
        // Error texts come from user code: a NUL (which `text` cannot hold) must not fail the
        // batch, or the report would be retried forever.
        self.r_error
            .push(error.map(|e| e.replace('\0', "\u{FFFD}")));
    }

    fn failure(&mut self, queue: &'static str, f: &Failure) {
        let op = if f.kind == FailureKind::Transient {
            "transient"
        } else {
            "fail"
        };
        self.report(
            queue,
            op,
            &f.work,
            Some(format!("{}: {}", f.kind.as_str(), f.error)),
        );
    }

    /// Adds a unit's messages; records message id → first array index for reading the answer.
    fn unit(&mut self, index: i32, unit: &'a UnitOfWork, positions: &mut HashMap<Uuid, usize>) {
        self.u_claim.push(unit.claim_for_writer);
        for (stream, expected) in &unit.expectations {
            let v = match expected {
                ExpectedVersion::Any => continue,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Exact(v) => *v as i64,
            };
            self.x_unit.push(index);
            self.x_stream.push(stream);
            self.x_expected.push(v);
        }
        // One slot per message of this unit (its event, outbox and inbox rows share it); the
        // same message in another unit (a second delivery) gets a slot of its own.
        // A unit holds a message or a few: a list, not a map.
        let mut here: Vec<(Uuid, usize)> = Vec::new();
        let mut slot =
            |arrays: &mut BatchArrays<'a>, envelope: &'a Envelope, partition: u32| -> usize {
                if let Some((_, i)) = here.iter().find(|(id, _)| *id == envelope.message_id) {
                    return *i;
                }
                let i = arrays.m_id.len();
                here.push((envelope.message_id, i));
                positions.entry(envelope.message_id).or_insert(i);
                arrays.m_unit.push(index);
                arrays.m_id.push(envelope.message_id);
                arrays.m_kind.push(envelope.kind.as_str());
                arrays.m_stream.push(&envelope.stream_id);
                arrays.m_part.push(partition as i32);
                arrays.m_corr.push(envelope.correlation_id);
                arrays.m_cause.push(envelope.causation_id);
                arrays.m_type.push(&envelope.message_type);
                arrays.m_ts.push(envelope.timestamp_us);
                arrays.m_meta.push(encode_meta(envelope));
                arrays.m_payload.push(&envelope.payload);
                arrays.m_append.push(false);
                arrays.m_topic.push(None);
                arrays.m_inbox.push(false);
                i
            };
        for e in &unit.events {
            // An event only appended has no queue row, so its partition is never read; an
            // outbox or inbox row of the same message sets it below.
            let i = slot(self, e, 0);
            self.m_append[i] = true;
        }
        for row in &unit.outbox {
            let i = slot(self, &row.envelope, row.partition);
            self.m_part[i] = row.partition as i32;
            self.m_topic[i] = Some(&row.topic);
        }
        for row in &unit.inbox {
            let i = slot(self, &row.envelope, row.partition);
            self.m_part[i] = row.partition as i32;
            self.m_inbox[i] = true;
        }
        if let Some(record) = &unit.idempotency {
            self.k_unit.push(index);
            self.k_key.push(&record.key);
            self.k_hash.push(&record.request_hash);
            self.k_outcome.push(&record.outcome);
        }
        for w in &unit.completes_inbox {
            self.c_unit.push(index);
            self.c_id.push(w.message_id);
            self.c_part.push(w.partition as i32);
            self.c_gen.push(w.generation as i64);
        }
    }
}

impl BatchArrays<'_> {
    /// Whether `wb_process_one_message` can write this batch: completions only as reports, at
    /// most one unit with at most one message, no expected versions, no inbox rows completed
    /// by the unit, no idempotency record, no claim. Most batches of `local_invoke` and of scoped flushes are such;
    /// that function writes them row by row at about two thirds of the general one's cost.
    pub(super) fn one_message(&self, batch: &WorkBatch) -> bool {
        batch.claim.is_none()
            && batch.in_flight.is_none()
            && self.r_op.iter().all(|op| *op == "done")
            && self.u_claim.len() <= 1
            && self.m_id.len() <= 1
            && self.x_unit.is_empty()
            && self.c_id.is_empty()
            && self.k_unit.is_empty()
    }
}

/// What `wb_process_work_batch` (`schema/functions/work_batch.sql`) needs to number a batch's
/// appends without sorting it:
/// the appended streams, distinct and in byte order (the order their rows are locked in), with
/// how many appends each; and per message (zero where it is not appended) its stream's place in
/// that list (1-based), how many appends of its stream come after it in the batch, and its
/// place among the batch's appends (1-based). The function uses them only when no unit of the
/// batch conflicted, so they count every append.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Numbering<'a> {
    pub(super) s_stream: Vec<&'a str>,
    pub(super) s_count: Vec<i64>,
    pub(super) m_sidx: Vec<i32>,
    pub(super) m_vback: Vec<i64>,
    pub(super) m_apos: Vec<i64>,
}

impl<'a> Numbering<'a> {
    pub(super) fn of(m_stream: &[&'a str], m_append: &[bool]) -> Numbering<'a> {
        let appended = || {
            m_stream
                .iter()
                .zip(m_append)
                .filter(|(_, a)| **a)
                .map(|(s, _)| *s)
        };
        let mut s_stream: Vec<&str> = appended().collect();
        s_stream.sort_unstable();
        s_stream.dedup();
        let place = |stream: &str| s_stream.binary_search(&stream).unwrap_or_default();
        let mut s_count = vec![0i64; s_stream.len()];
        for stream in appended() {
            s_count[place(stream)] += 1;
        }
        // Walking the batch in order, the appends of a stream still to come.
        let mut left = s_count.clone();
        let (mut m_sidx, mut m_vback, mut m_apos) = (
            Vec::with_capacity(m_stream.len()),
            Vec::with_capacity(m_stream.len()),
            Vec::with_capacity(m_stream.len()),
        );
        let mut apos = 0;
        for (stream, a) in m_stream.iter().zip(m_append) {
            if *a {
                let i = place(stream);
                left[i] -= 1;
                apos += 1;
                m_sidx.push(i as i32 + 1);
                m_vback.push(left[i]);
                m_apos.push(apos);
            } else {
                m_sidx.push(0);
                m_vback.push(0);
                m_apos.push(0);
            }
        }
        Numbering {
            s_stream,
            s_count,
            m_sidx,
            m_vback,
            m_apos,
        }
    }
}

/// What the packed 'appended_v' answer row needs to give each append of the batch its
/// version and position: the appended streams (in [`Numbering`]'s order) and, per append in
/// batch order, its unit, id and numbering.
#[derive(Default)]
pub(super) struct PackedAppends {
    pub(super) streams: Vec<String>,
    pub(super) places: Vec<AppendPlace>,
}

pub(super) struct AppendPlace {
    pub(super) unit: usize,
    pub(super) message_id: Uuid,
    /// 1-based place of its stream in `streams`.
    pub(super) sidx: usize,
    /// Appends of its stream after this one in the batch (0: the stream's last).
    pub(super) vback: i64,
    /// 1-based place among the batch's appends.
    pub(super) apos: i64,
}

impl PackedAppends {
    pub(super) fn of(a: &BatchArrays, numbering: &Numbering) -> PackedAppends {
        let places = (0..a.m_id.len())
            .filter(|&i| a.m_append[i])
            .map(|i| AppendPlace {
                unit: a.m_unit[i] as usize,
                message_id: a.m_id[i],
                sidx: numbering.m_sidx[i] as usize,
                vback: numbering.m_vback[i],
                apos: numbering.m_apos[i],
            })
            .collect();
        PackedAppends {
            streams: numbering.s_stream.iter().map(|s| s.to_string()).collect(),
            places,
        }
    }
}

/// The one message of a batch [`BatchArrays::one_message`] accepts, as the scalar parameters
/// of `wb_process_one_message` (all NULL when the batch has no message).
pub(super) struct OneMessage<'a> {
    pub(super) id: Option<Uuid>,
    pub(super) kind: Option<&'static str>,
    pub(super) stream: Option<&'a str>,
    pub(super) part: Option<i32>,
    pub(super) corr: Option<Uuid>,
    pub(super) cause: Option<Uuid>,
    pub(super) typ: Option<&'a str>,
    pub(super) ts: Option<i64>,
    pub(super) meta: Option<&'a [u8]>,
    pub(super) payload: Option<&'a [u8]>,
    pub(super) append: Option<bool>,
    pub(super) topic: Option<&'a str>,
    pub(super) inbox: Option<bool>,
}

impl<'a> OneMessage<'a> {
    pub(super) fn of(a: &'a BatchArrays<'_>) -> OneMessage<'a> {
        OneMessage {
            id: a.m_id.first().copied(),
            kind: a.m_kind.first().copied(),
            stream: a.m_stream.first().copied(),
            part: a.m_part.first().copied(),
            corr: a.m_corr.first().copied(),
            cause: a.m_cause.first().copied().flatten(),
            typ: a.m_type.first().copied(),
            ts: a.m_ts.first().copied(),
            meta: a.m_meta.first().map(Vec::as_slice),
            payload: a.m_payload.first().copied(),
            append: a.m_append.first().copied(),
            topic: a.m_topic.first().copied().flatten(),
            inbox: a.m_inbox.first().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Numbering;

    #[test]
    fn numbering_counts_each_streams_appends_in_byte_order_and_places_each_message() {
        // Batch order: b, a, (not appended) a, b, B, b.
        let streams = ["b", "a", "a", "b", "B", "b"];
        let appended = [true, true, false, true, true, true];
        let n = Numbering::of(&streams, &appended);
        assert_eq!(n.s_stream, ["B", "a", "b"], "byte order, upper case first");
        assert_eq!(n.s_count, [1, 1, 3]);
        assert_eq!(n.m_sidx, [3, 2, 0, 3, 1, 3]);
        // A stream at version v before the batch ends at v + count: the first "b" gets
        // v + 3 - 2 = v + 1, the last v + 3.
        assert_eq!(n.m_vback, [2, 0, 0, 1, 0, 0]);
        assert_eq!(n.m_apos, [1, 2, 0, 3, 4, 5]);
        assert_eq!(Numbering::of(&["x"], &[false]).s_stream, Vec::<&str>::new());
    }
}
