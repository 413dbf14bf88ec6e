//! The in-memory store: the embedded default, with the same semantics as the Postgres store.
//!
//! Owns an in-process event store, outbox, inbox, dedup records and partition leases behind one
//! mutex, so every [`WorkBatch`] is atomic. Its clock is the process clock, which plays the part
//! of the database clock. It must not be used where durability matters: everything is lost when
//! the process exits. A read model's effects ([`Store::apply_once`], [`Store::commit_inline`])
//! are staged closures, run under that mutex together with the record that the event was
//! applied: exactly once for the life of the process.

use super::*;
use crate::read_model::ReadModelTx;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

struct Lease {
    instance: InstanceId,
    generation: u64,
    expires: Instant,
}

struct Row {
    seq: u64,
    envelope: Envelope,
    topic: String,
    partition: u32,
    attempts: u32,
    next_attempt: Option<Instant>,
    last_error: Option<String>,
    claimed: Option<(InstanceId, u64)>,
    dead: bool,
    /// When the row was written: a dedup record's retention counts from it.
    received: Instant,
}

/// The outbox or the inbox: rows by id, ordered per stream, streams grouped per partition.
#[derive(Default)]
struct RowQueue {
    rows: HashMap<Uuid, Row>,
    streams: HashMap<String, BTreeMap<u64, Uuid>>,
    partitions: HashMap<u32, HashSet<String>>,
}

impl RowQueue {
    fn insert(&mut self, row: Row) {
        let stream = row.envelope.stream_id.clone();
        self.partitions
            .entry(row.partition)
            .or_default()
            .insert(stream.clone());
        self.streams
            .entry(stream)
            .or_default()
            .insert(row.seq, row.envelope.message_id);
        self.rows.insert(row.envelope.message_id, row);
    }

    fn remove(&mut self, id: &Uuid) -> Option<Row> {
        let row = self.rows.remove(id)?;
        let stream = &row.envelope.stream_id;
        if let Some(seqs) = self.streams.get_mut(stream) {
            seqs.remove(&row.seq);
            if seqs.is_empty() {
                self.streams.remove(stream);
                if let Some(set) = self.partitions.get_mut(&row.partition) {
                    set.remove(stream);
                    if set.is_empty() {
                        self.partitions.remove(&row.partition);
                    }
                }
            }
        }
        Some(row)
    }

    /// True when every row of `stream` before `seq` is in flight at (instance, generation):
    /// only then may a new row be handed straight to the writer without overtaking anything.
    fn only_in_flight_before(&self, stream: &str, seq: u64, holder: (InstanceId, u64)) -> bool {
        self.streams.get(stream).is_none_or(|seqs| {
            seqs.range(..seq)
                .all(|(_, id)| self.rows[id].claimed == Some(holder) && !self.rows[id].dead)
        })
    }

    /// True when `partition` has a row that is not dead-lettered.
    fn has_live_rows_in(&self, partition: u32) -> bool {
        self.partitions.get(&partition).is_some_and(|streams| {
            streams
                .iter()
                .any(|s| self.streams[s].values().any(|id| !self.rows[id].dead))
        })
    }

    fn has_claims_in(&self, partition: u32, holder: (InstanceId, u64)) -> bool {
        self.partitions.get(&partition).is_some_and(|streams| {
            streams.iter().any(|s| {
                self.streams[s]
                    .values()
                    .any(|id| self.rows[id].claimed == Some(holder))
            })
        })
    }
}

#[derive(Default)]
struct State {
    next_seq: u64,
    versions: HashMap<String, u64>,
    events: Vec<StoredEvent>,
    by_stream: HashMap<String, Vec<usize>>,
    by_correlation: HashMap<Uuid, Vec<usize>>,
    /// Event message id → index in `events` (an inbox row's version and position).
    by_id: HashMap<Uuid, usize>,
    outbox: RowQueue,
    inbox: RowQueue,
    /// Dedup records of processed messages: message id → (received at, correlation id); a
    /// pending message's record is its inbox row.
    processed: HashMap<Uuid, (Instant, Uuid)>,
    leases: HashMap<u32, Lease>,
    generations: HashMap<u32, u64>,
    held: HashMap<InstanceId, BTreeSet<u32>>,
    /// Partitions each instance took over from another since its last heartbeat.
    taken_over: HashMap<InstanceId, BTreeSet<u32>>,
    instances: HashMap<InstanceId, Instant>,
    checkpoints: HashMap<String, u64>,
    /// Idempotency records by key, with when they were written (purged after the dedup
    /// retention).
    idempotency: HashMap<String, (Instant, IdempotencyRecord)>,
    /// (read model, event id) → when it was applied ([`Store::apply_once`]); purged after the
    /// dedup retention.
    read_models: HashMap<(String, Uuid), Instant>,
}

/// The embedded store. Cheap to create; share it behind an `Arc` between instances to simulate
/// several processes on one database.
pub struct MemoryStore {
    settings: StoreSettings,
    state: Mutex<State>,
    signal: tokio::sync::watch::Sender<u64>,
    /// Held by a batch with units, and by an inline unit from before its read models run until
    /// it is applied.
    inline_gate: tokio::sync::Mutex<()>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(settings: StoreSettings) -> MemoryStore {
        MemoryStore {
            settings,
            state: Mutex::new(State::default()),
            signal: tokio::sync::watch::channel(0).0,
            inline_gate: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave half a batch: batches are applied only
        // after all their checks passed. Recover the guard rather than poison every caller.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.signal.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Applies one batch to the locked state (see [`Store::process_work_batch`]).
    fn apply_batch(
        &self,
        st: &mut State,
        instance: InstanceId,
        batch: WorkBatch,
    ) -> WorkBatchResult {
        let now = Instant::now();
        let settings = &self.settings;
        let mut left_pending = false;
        let mut result = WorkBatchResult::default();

        // Reports first: they free the streams that new work may queue behind.
        let mut completed = false;
        for w in &batch.outbox_completions {
            if st.complete(Queue::Outbox, instance, w) {
                completed = true;
            } else {
                result.stale.push(w.message_id);
            }
        }
        for w in &batch.inbox_completions {
            if st.complete(Queue::Inbox, instance, w) {
                completed = true;
            } else {
                result.stale.push(w.message_id);
            }
        }
        for f in &batch.outbox_failures {
            if !st.fail(Queue::Outbox, instance, f, now, settings, &mut result) {
                result.stale.push(f.work.message_id);
            }
        }
        for f in &batch.inbox_failures {
            if !st.fail(Queue::Inbox, instance, f, now, settings, &mut result) {
                result.stale.push(f.work.message_id);
            }
        }
        for w in &batch.outbox_releases {
            if st.release_row(Queue::Outbox, instance, w) {
                left_pending = true;
            }
        }
        for w in &batch.inbox_releases {
            if st.release_row(Queue::Inbox, instance, w) {
                left_pending = true;
            }
        }

        for unit in batch.units {
            // The key first, as on Postgres: a unit whose key is taken writes nothing.
            if let Some(record) = &unit.idempotency
                && st.idempotency.contains_key(&record.key)
            {
                result.units.push(UnitOutcome::KeyTaken {
                    key: record.key.clone(),
                });
                continue;
            }
            let conflict = unit.expectations.iter().find_map(|(stream, expected)| {
                let actual = st.versions.get(stream).copied().unwrap_or(0);
                (!expected.matches(actual)).then(|| UnitOutcome::Conflict {
                    stream_id: stream.clone(),
                    expected: *expected,
                    actual,
                })
            });
            if let Some(conflict) = conflict {
                result.units.push(conflict);
                continue;
            }
            for w in &unit.completes_inbox {
                if st.complete(Queue::Inbox, instance, w) {
                    completed = true;
                } else {
                    result.stale.push(w.message_id);
                }
            }
            let mut appended = Vec::with_capacity(unit.events.len());
            for envelope in unit.events {
                let version = st.versions.entry(envelope.stream_id.clone()).or_default();
                *version += 1;
                let version = *version;
                let position = st.events.len() as u64 + 1;
                let index = st.events.len();
                st.by_stream
                    .entry(envelope.stream_id.clone())
                    .or_default()
                    .push(index);
                st.by_correlation
                    .entry(envelope.correlation_id)
                    .or_default()
                    .push(index);
                st.by_id.insert(envelope.message_id, index);
                appended.push(AppendedEvent {
                    message_id: envelope.message_id,
                    stream_id: envelope.stream_id.clone(),
                    version,
                    position,
                });
                st.events.push(StoredEvent {
                    position,
                    version,
                    envelope,
                });
            }
            if let Some(record) = unit.idempotency {
                st.idempotency.insert(
                    record.key.clone(),
                    (
                        now,
                        IdempotencyRecord {
                            record,
                            appended: appended.clone(),
                        },
                    ),
                );
            }
            let mut claimed_outbox = Vec::new();
            for row in unit.outbox {
                if st.outbox.rows.contains_key(&row.envelope.message_id) {
                    continue; // the same message queued twice: already on its way
                }
                st.next_seq += 1;
                let seq = st.next_seq;
                let id = row.envelope.message_id;
                let stream = row.envelope.stream_id.clone();
                st.outbox.insert(Row {
                    seq,
                    envelope: row.envelope,
                    topic: row.topic,
                    partition: row.partition,
                    attempts: 0,
                    next_attempt: None,
                    last_error: None,
                    claimed: None,
                    dead: false,
                    received: now,
                });
                let claim = if unit.claim_for_writer {
                    st.try_acquire(row.partition, instance, now, settings)
                } else {
                    None
                };
                match claim {
                    Some(generation)
                        if st.outbox.only_in_flight_before(
                            &stream,
                            seq,
                            (instance, generation),
                        ) =>
                    {
                        let r = st.outbox.rows.get_mut(&id).expect("just inserted");
                        r.claimed = Some((instance, generation));
                        claimed_outbox.push(OutboxWork {
                            envelope: r.envelope.clone(),
                            topic: r.topic.clone(),
                            work: WorkRef {
                                message_id: id,
                                partition: row.partition,
                                generation,
                            },
                            attempts: 0,
                        });
                    }
                    _ => left_pending = true,
                }
            }
            let mut claimed_inbox = Vec::new();
            let mut duplicate_inbox = Vec::new();
            for row in unit.inbox {
                let id = row.envelope.message_id;
                if st.is_duplicate_inbox(&id) {
                    duplicate_inbox.push(id);
                    continue;
                }
                st.next_seq += 1;
                let seq = st.next_seq;
                let stream = row.envelope.stream_id.clone();
                st.inbox.insert(Row {
                    seq,
                    envelope: row.envelope,
                    topic: String::new(),
                    partition: row.partition,
                    attempts: 0,
                    next_attempt: None,
                    last_error: None,
                    claimed: None,
                    dead: false,
                    received: now,
                });
                let claim = if unit.claim_for_writer {
                    st.try_acquire(row.partition, instance, now, settings)
                } else {
                    None
                };
                match claim {
                    Some(generation)
                        if st
                            .inbox
                            .only_in_flight_before(&stream, seq, (instance, generation)) =>
                    {
                        let (version, position) = st.place_of(&id);
                        let r = st.inbox.rows.get_mut(&id).expect("just inserted");
                        r.claimed = Some((instance, generation));
                        claimed_inbox.push(InboxWork {
                            envelope: r.envelope.clone(),
                            work: WorkRef {
                                message_id: id,
                                partition: row.partition,
                                generation,
                            },
                            attempts: 0,
                            version,
                            position,
                        });
                    }
                    _ => left_pending = true,
                }
            }
            result.units.push(UnitOutcome::Committed {
                appended,
                claimed_outbox,
                claimed_inbox,
                duplicate_inbox,
            });
        }

        if let Some(budget) = batch.claim {
            st.acquire_partitions_with_work(instance, now, settings);
            let (known_outbox, known_inbox): (Option<HashSet<Uuid>>, Option<HashSet<Uuid>>) =
                match &batch.in_flight {
                    Some(f) => (
                        Some(f.outbox.iter().copied().collect()),
                        Some(f.inbox.iter().copied().collect()),
                    ),
                    None => (None, None),
                };
            for (id, work) in st.claim(
                Queue::Outbox,
                instance,
                budget.outbox,
                now,
                known_outbox.as_ref(),
            ) {
                let row = &st.outbox.rows[&id];
                result.claimed_outbox.push(OutboxWork {
                    envelope: row.envelope.clone(),
                    topic: row.topic.clone(),
                    work,
                    attempts: row.attempts,
                });
            }
            for (id, work) in st.claim(
                Queue::Inbox,
                instance,
                budget.inbox,
                now,
                known_inbox.as_ref(),
            ) {
                let row = &st.inbox.rows[&id];
                let (version, position) = st.place_of(&id);
                result.claimed_inbox.push(InboxWork {
                    envelope: row.envelope.clone(),
                    work,
                    attempts: row.attempts,
                    version,
                    position,
                });
            }
        }
        // A completion may leave a held partition idle while rows wait in a partition nobody
        // holds (written while this instance was at max_partitions_per_instance): wake the
        // coordinators so that a claim trades the idle partition for it, rather than leaving
        // those rows to the fallback poll.
        let starved = completed && st.has_unleased_rows(now);
        if left_pending || starved || !result.dead_lettered.is_empty() {
            self.bump();
        }
        result
    }
}

impl State {
    fn queue_mut(&mut self, queue: Queue) -> &mut RowQueue {
        match queue {
            Queue::Outbox => &mut self.outbox,
            Queue::Inbox => &mut self.inbox,
        }
    }

    fn current_holder(&self, partition: u32) -> Option<(InstanceId, u64)> {
        self.leases
            .get(&partition)
            .map(|l| (l.instance, l.generation))
    }

    /// Fencing: a report is accepted only while the lease it was claimed under is still the
    /// partition's lease (expired but not taken over still counts).
    fn fenced(&self, instance: InstanceId, work: &WorkRef) -> bool {
        self.current_holder(work.partition) == Some((instance, work.generation))
    }

    fn held_by_other_live(&self, partition: u32, instance: InstanceId, now: Instant) -> bool {
        self.leases
            .get(&partition)
            .is_some_and(|l| l.instance != instance && l.expires > now)
    }

    fn release(&mut self, partition: u32) {
        if let Some(lease) = self.leases.remove(&partition)
            && let Some(set) = self.held.get_mut(&lease.instance)
        {
            set.remove(&partition);
        }
    }

    fn partition_has_rows(&self, partition: u32) -> bool {
        self.outbox.partitions.contains_key(&partition)
            || self.inbox.partitions.contains_key(&partition)
    }

    fn partition_in_flight(&self, partition: u32) -> bool {
        match self.current_holder(partition) {
            Some(holder) => {
                self.outbox.has_claims_in(partition, holder)
                    || self.inbox.has_claims_in(partition, holder)
            }
            None => false,
        }
    }

    /// Leases `partition` to `instance` if it is free, expired or already its own; at the
    /// per-instance maximum it first gives up one of its partitions with nothing in flight.
    fn try_acquire(
        &mut self,
        partition: u32,
        instance: InstanceId,
        now: Instant,
        settings: &StoreSettings,
    ) -> Option<u64> {
        let mut taken_from_another = false;
        if let Some(lease) = self.leases.get_mut(&partition) {
            if lease.instance == instance {
                lease.expires = now + settings.lease;
                return Some(lease.generation);
            }
            if lease.expires > now {
                return None;
            }
            taken_from_another = true;
        }
        let held = self.held.get(&instance).map_or(0, |s| s.len());
        if held >= settings.max_partitions_per_instance as usize {
            let idle = self.held.get(&instance).and_then(|set| {
                set.iter()
                    .copied()
                    .find(|p| !self.partition_in_flight(*p) && !self.partition_has_rows(*p))
            });
            self.release(idle?);
        }
        self.release(partition);
        let generation = self.generations.entry(partition).or_default();
        *generation += 1;
        let generation = *generation;
        self.leases.insert(
            partition,
            Lease {
                instance,
                generation,
                expires: now + settings.lease,
            },
        );
        self.held.entry(instance).or_default().insert(partition);
        if taken_from_another {
            self.taken_over
                .entry(instance)
                .or_default()
                .insert(partition);
        }
        Some(generation)
    }

    /// The version and position of an event of this store (`None`s for anything else).
    fn place_of(&self, id: &Uuid) -> (Option<u64>, Option<u64>) {
        match self.by_id.get(id).map(|&i| &self.events[i]) {
            Some(e) => (Some(e.version), Some(e.position)),
            None => (None, None),
        }
    }

    fn is_duplicate_inbox(&self, id: &Uuid) -> bool {
        self.processed.contains_key(id) || self.inbox.rows.contains_key(id)
    }

    fn complete(&mut self, queue: Queue, instance: InstanceId, work: &WorkRef) -> bool {
        if !self.fenced(instance, work) {
            return false;
        }
        let q = self.queue_mut(queue);
        match q.rows.get(&work.message_id) {
            Some(row) if row.claimed == Some((instance, work.generation)) => {}
            _ => return false,
        }
        if let Some(row) = q.remove(&work.message_id)
            && queue == Queue::Inbox
        {
            self.processed
                .insert(work.message_id, (row.received, row.envelope.correlation_id));
        }
        true
    }

    fn fail(
        &mut self,
        queue: Queue,
        instance: InstanceId,
        failure: &Failure,
        now: Instant,
        settings: &StoreSettings,
        result: &mut WorkBatchResult,
    ) -> bool {
        if !self.fenced(instance, &failure.work) {
            return false;
        }
        let q = self.queue_mut(queue);
        let Some(row) = q.rows.get_mut(&failure.work.message_id) else {
            return false;
        };
        if row.claimed != Some((instance, failure.work.generation)) {
            return false;
        }
        row.claimed = None;
        row.last_error = Some(format!("{}: {}", failure.kind.as_str(), failure.error));
        let delay = if failure.kind == FailureKind::Transient {
            Some(settings.backoff_base)
        } else {
            row.attempts += 1;
            (row.attempts < settings.max_attempts).then(|| settings.backoff(row.attempts))
        };
        match delay {
            Some(delay) => {
                row.next_attempt = Some(now + delay);
                result.next_retry_in = Some(
                    result
                        .next_retry_in
                        .map_or(delay, |d: Duration| d.min(delay)),
                );
            }
            None => {
                row.dead = true;
                row.next_attempt = None;
                result.dead_lettered.push(failure.work.message_id);
            }
        }
        true
    }

    fn release_row(&mut self, queue: Queue, instance: InstanceId, work: &WorkRef) -> bool {
        if !self.fenced(instance, work) {
            return false;
        }
        let q = self.queue_mut(queue);
        match q.rows.get_mut(&work.message_id) {
            Some(row) if row.claimed == Some((instance, work.generation)) => {
                row.claimed = None;
                true
            }
            _ => false,
        }
    }

    /// Claims rows of `queue` in the partitions `instance` holds, in stream order, never past
    /// a parked row.
    fn claim(
        &mut self,
        queue: Queue,
        instance: InstanceId,
        mut budget: u32,
        now: Instant,
        in_flight: Option<&HashSet<Uuid>>,
    ) -> Vec<(Uuid, WorkRef)> {
        let mut out = Vec::new();
        let held: Vec<u32> = self
            .held
            .get(&instance)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        // Field by field (not `queue_mut`): the loop below also reads `self.leases`.
        let q = match queue {
            Queue::Outbox => &mut self.outbox,
            Queue::Inbox => &mut self.inbox,
        };
        if let Some(in_flight) = in_flight {
            // Rows claimed for this instance that it does not have (their batch's answer was
            // lost) are given up first: the loop below hands out what the budget allows, in
            // order, and the rest stay claimable instead of counting as in flight, which would
            // let a newer row of their stream be handed out ahead of them.
            for (id, row) in q.rows.iter_mut() {
                if row.claimed.is_some_and(|(i, _)| i == instance) && !in_flight.contains(id) {
                    row.claimed = None;
                }
            }
        }
        for partition in held {
            let Some(holder) = self
                .leases
                .get(&partition)
                .filter(|l| l.instance == instance && l.expires > now)
                .map(|l| (l.instance, l.generation))
            else {
                continue;
            };
            let Some(streams) = q.partitions.get(&partition) else {
                continue;
            };
            let mut streams: Vec<&String> = streams.iter().collect();
            streams.sort();
            for stream in streams {
                for id in q.streams[stream].values() {
                    if budget == 0 {
                        return out;
                    }
                    let row = q.rows.get_mut(id).expect("indexed row exists");
                    if row.dead {
                        break;
                    }
                    if row.claimed == Some(holder) && in_flight.is_none_or(|f| f.contains(id)) {
                        continue;
                    }
                    if row.next_attempt.is_some_and(|t| t > now) {
                        break;
                    }
                    row.claimed = Some(holder);
                    budget -= 1;
                    out.push((
                        *id,
                        WorkRef {
                            message_id: *id,
                            partition,
                            generation: holder.1,
                        },
                    ));
                }
            }
        }
        out
    }

    /// True when a lease ran out (its holder died or hung) with live work behind it.
    fn has_expired_leases_with_rows(&self, now: Instant) -> bool {
        self.leases.iter().any(|(p, l)| {
            l.expires <= now
                && (self.outbox.has_live_rows_in(*p) || self.inbox.has_live_rows_in(*p))
        })
    }

    /// True when some partition with rows is not leased to a live instance.
    fn has_unleased_rows(&self, now: Instant) -> bool {
        self.outbox
            .partitions
            .keys()
            .chain(self.inbox.partitions.keys())
            .any(|p| self.leases.get(p).is_none_or(|l| l.expires <= now))
    }

    /// Leases free or expired partitions that have claimable rows, up to the maximum.
    fn acquire_partitions_with_work(
        &mut self,
        instance: InstanceId,
        now: Instant,
        settings: &StoreSettings,
    ) {
        let mut candidates: Vec<u32> = self
            .outbox
            .partitions
            .keys()
            .chain(self.inbox.partitions.keys())
            .copied()
            .filter(|p| !self.held_by_other_live(*p, instance, now))
            .filter(|p| {
                !self
                    .leases
                    .get(p)
                    .is_some_and(|l| l.instance == instance && l.expires > now)
            })
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        // At the maximum, `try_acquire` gives up one of this instance's idle partitions to
        // make room; without that, work in an unheld partition would wait for a heartbeat to
        // release the idle ones. `None` means none is idle: stop.
        for p in candidates {
            if self.try_acquire(p, instance, now, settings).is_none() {
                break;
            }
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn register_instance(
        &self,
        instance: InstanceId,
        _service: &str,
        _host: &str,
    ) -> Result<(), StoreError> {
        self.lock().instances.insert(instance, Instant::now());
        Ok(())
    }

    async fn heartbeat(&self, instance: InstanceId) -> Result<Heartbeat, StoreError> {
        let now = Instant::now();
        let settings = &self.settings;
        let mut st = self.lock();
        st.instances.insert(instance, now);
        let lease = settings.lease;
        st.instances.retain(|_, seen| *seen + lease > now);
        let live = st.instances.len().max(1) as u32;
        let mine: Vec<u32> = st
            .held
            .get(&instance)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for p in &mine {
            if let Some(l) = st.leases.get_mut(p) {
                l.expires = now + lease;
            }
        }
        // Idle partitions go back at once; beyond the fair share, a few per heartbeat.
        let total: usize = st
            .held
            .iter()
            .filter(|(i, _)| st.instances.contains_key(i))
            .map(|(_, s)| s.len())
            .sum();
        let fair = total.div_ceil(live as usize);
        let mut released = Vec::new();
        let mut excess = mine.len().saturating_sub(fair).min(10);
        for p in &mine {
            if st.partition_in_flight(*p) {
                continue;
            }
            if !st.partition_has_rows(*p) {
                st.release(*p);
                released.push(*p);
                excess = excess.saturating_sub(1);
            } else if excess > 0 {
                st.release(*p);
                released.push(*p);
                excess -= 1;
            }
        }
        let retention = settings.dedup_retention;
        st.processed.retain(|_, (at, _)| *at + retention > now);
        st.idempotency.retain(|_, (at, _)| *at + retention > now);
        st.read_models.retain(|_, at| *at + retention > now);
        let held_partitions: Vec<u32> = st
            .held
            .get(&instance)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let taken_over = st
            .taken_over
            .remove(&instance)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| mine.contains(p))
            .collect();
        // Work behind a lease that ran out: wake every instance so one takes it over now
        // rather than at its next fallback poll.
        let orphaned = st.has_expired_leases_with_rows(now);
        drop(st);
        if !released.is_empty() || orphaned {
            self.bump();
        }
        Ok(Heartbeat {
            live_instances: live,
            held_partitions,
            released,
            taken_over,
        })
    }

    async fn process_work_batch(
        &self,
        instance: InstanceId,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        // Units wait while an inline unit's read models run (as they wait for the append lock
        // on Postgres): the versions and positions those were given must stay the ones written.
        let _gate = if batch.units.is_empty() {
            None
        } else {
            Some(self.inline_gate.lock().await)
        };
        Ok(self.apply_batch(&mut self.lock(), instance, batch))
    }

    async fn apply_once(
        &self,
        read_model: &str,
        message_id: Uuid,
        replay: bool,
        apply: &dyn ApplyInTx,
    ) -> Result<AppliedOnce, StoreError> {
        let key = (read_model.to_string(), message_id);
        if !replay && self.lock().read_models.contains_key(&key) {
            return Ok(AppliedOnce::AlreadyApplied);
        }
        let mut tx = ReadModelTx::staged();
        if apply.apply(&mut tx).await.is_err() {
            return Ok(AppliedOnce::Refused);
        }
        let effects = tx.take_staged();
        let mut st = self.lock();
        // Another run of the same event may have recorded it meanwhile: its effects stand.
        if !replay && st.read_models.contains_key(&key) {
            return Ok(AppliedOnce::AlreadyApplied);
        }
        st.read_models.insert(key, Instant::now());
        for effect in effects {
            effect();
        }
        Ok(AppliedOnce::Applied)
    }

    async fn commit_inline(
        &self,
        instance: InstanceId,
        mut unit: UnitOfWork,
        apply: &dyn InlineApply,
    ) -> Result<InlineOutcome, StoreError> {
        unit.claim_for_writer = false;
        // No other unit is applied until this one is (see `process_work_batch`): the versions
        // and positions foreseen here are the ones it gets.
        let _gate = self.inline_gate.lock().await;
        let foreseen = {
            let st = self.lock();
            if let Some(record) = &unit.idempotency
                && st.idempotency.contains_key(&record.key)
            {
                return Ok(InlineOutcome::Unit(UnitOutcome::KeyTaken {
                    key: record.key.clone(),
                }));
            }
            for (stream, expected) in &unit.expectations {
                let actual = st.versions.get(stream).copied().unwrap_or(0);
                if !expected.matches(actual) {
                    return Ok(InlineOutcome::Unit(UnitOutcome::Conflict {
                        stream_id: stream.clone(),
                        expected: *expected,
                        actual,
                    }));
                }
            }
            let mut versions: HashMap<&str, u64> = HashMap::new();
            let mut position = st.events.len() as u64;
            unit.events
                .iter()
                .map(|e| {
                    let version = versions
                        .entry(&e.stream_id)
                        .or_insert_with(|| st.versions.get(&e.stream_id).copied().unwrap_or(0));
                    *version += 1;
                    position += 1;
                    AppendedEvent {
                        message_id: e.message_id,
                        stream_id: e.stream_id.clone(),
                        version: *version,
                        position,
                    }
                })
                .collect::<Vec<_>>()
        };
        let mut tx = ReadModelTx::staged();
        let Ok(applied) = apply.apply(&mut tx, &foreseen).await else {
            return Ok(InlineOutcome::Refused);
        };
        let effects = tx.take_staged();
        let mut st = self.lock();
        let mut result = self.apply_batch(
            &mut st,
            instance,
            WorkBatch {
                units: vec![unit],
                ..WorkBatch::default()
            },
        );
        let outcome = result.units.pop().ok_or_else(|| {
            StoreError::Corrupt("the batch answered nothing for the inline unit".into())
        })?;
        if let UnitOutcome::Committed { appended, .. } = &outcome {
            if *appended != foreseen {
                return Err(StoreError::Corrupt(format!(
                    "an inline unit was appended at {appended:?}, not at {foreseen:?}"
                )));
            }
            let now = Instant::now();
            for key in applied {
                st.read_models.insert(key, now);
            }
            for effect in effects {
                effect();
            }
        }
        drop(st);
        self.bump();
        Ok(InlineOutcome::Unit(outcome))
    }

    async fn release_partitions(
        &self,
        instance: InstanceId,
        partitions: Option<&[u32]>,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        let mine: Vec<u32> = match partitions {
            Some(list) => list.to_vec(),
            None => st
                .held
                .get(&instance)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
        };
        for p in mine {
            if st.leases.get(&p).is_some_and(|l| l.instance == instance) {
                st.release(p);
            }
        }
        if partitions.is_none() {
            st.instances.remove(&instance);
        }
        drop(st);
        self.bump();
        Ok(())
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let st = self.lock();
        Ok(st
            .by_stream
            .get(stream_id)
            .map(|idx| {
                idx.iter()
                    .map(|i| &st.events[*i])
                    .filter(|e| e.version >= from_version)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let st = self.lock();
        let start = (after_position as usize).min(st.events.len());
        Ok(st.events[start..]
            .iter()
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn last_position(&self) -> Result<u64, StoreError> {
        // Positions are 1..n in append order (see `read_all`).
        Ok(self.lock().events.len() as u64)
    }

    async fn inbox_settled(
        &self,
        message_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, InboxSettled)>, StoreError> {
        let st = self.lock();
        Ok(message_ids
            .iter()
            .filter_map(|id| {
                if st.processed.contains_key(id) {
                    return Some((*id, InboxSettled::Processed));
                }
                let row = st.inbox.rows.get(id).filter(|r| r.dead)?;
                let last_error = row.last_error.clone().unwrap_or_default();
                Some((*id, InboxSettled::DeadLettered { last_error }))
            })
            .collect())
    }

    async fn backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        let st = self.lock();
        let now = Instant::now();
        Ok([(Queue::Outbox, &st.outbox), (Queue::Inbox, &st.inbox)]
            .into_iter()
            .map(|(queue, q)| {
                let pending = q.rows.values().filter(|r| !r.dead);
                Backlog {
                    queue,
                    pending: pending.clone().count() as u64,
                    dead: q.rows.values().filter(|r| r.dead).count() as u64,
                    oldest_pending_age: pending
                        .map(|r| r.received)
                        .min()
                        .map(|at| now.saturating_duration_since(at)),
                }
            })
            .collect())
    }

    async fn correlation_status(
        &self,
        correlation_id: Uuid,
    ) -> Result<CorrelationStatus, StoreError> {
        let st = self.lock();
        let mut status = CorrelationStatus::default();
        if let Some(idx) = st.by_correlation.get(&correlation_id) {
            for i in idx {
                let e = &st.events[*i];
                status.events.push((
                    e.envelope.message_type.clone(),
                    e.envelope.stream_id.clone(),
                    e.version,
                ));
            }
        }
        for row in st.outbox.rows.values() {
            if row.envelope.correlation_id == correlation_id {
                if row.dead {
                    status.dead_lettered += 1;
                } else {
                    status.outbox_pending += 1;
                }
            }
        }
        for row in st.inbox.rows.values() {
            if row.envelope.correlation_id == correlation_id {
                if row.dead {
                    status.dead_lettered += 1;
                } else {
                    status.inbox_pending += 1;
                }
            }
        }
        status.inbox_processed = st
            .processed
            .values()
            .filter(|(_, c)| *c == correlation_id)
            .count() as u64;
        Ok(status)
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let st = self.lock();
        let mut out = Vec::new();
        for (queue, q) in [(Queue::Outbox, &st.outbox), (Queue::Inbox, &st.inbox)] {
            let mut rows: Vec<&Row> = q.rows.values().filter(|r| r.dead).collect();
            rows.sort_by_key(|r| r.seq);
            out.extend(rows.into_iter().map(|r| DeadLetter {
                queue,
                message_id: r.envelope.message_id,
                message_type: r.envelope.message_type.clone(),
                stream_id: r.envelope.stream_id.clone(),
                attempts: r.attempts,
                error: r.last_error.clone().unwrap_or_default(),
            }));
        }
        Ok(out)
    }

    async fn requeue_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError> {
        let mut st = self.lock();
        let in_outbox = st.outbox.rows.get(&message_id).is_some_and(|r| r.dead);
        let row = if in_outbox {
            st.outbox.rows.get_mut(&message_id)
        } else {
            st.inbox.rows.get_mut(&message_id).filter(|r| r.dead)
        };
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!("dead letter {message_id}")));
        };
        row.dead = false;
        row.attempts = 0;
        row.next_attempt = None;
        row.claimed = None;
        drop(st);
        self.bump();
        Ok(())
    }

    async fn skip_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError> {
        let mut st = self.lock();
        if st.outbox.rows.get(&message_id).is_some_and(|r| r.dead) {
            st.outbox.remove(&message_id);
        } else if st.inbox.rows.get(&message_id).is_some_and(|r| r.dead) {
            if let Some(row) = st.inbox.remove(&message_id) {
                // Still a dedup record: a redelivery of a skipped message stays skipped.
                st.processed
                    .insert(message_id, (row.received, row.envelope.correlation_id));
            }
        } else {
            return Err(StoreError::NotFound(format!("dead letter {message_id}")));
        }
        drop(st);
        self.bump();
        Ok(())
    }

    async fn load_checkpoint(&self, perspective: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.lock().checkpoints.get(perspective).copied())
    }

    async fn save_checkpoint(&self, perspective: &str, position: u64) -> Result<(), StoreError> {
        self.lock()
            .checkpoints
            .insert(perspective.to_string(), position);
        Ok(())
    }

    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self.lock().idempotency.get(key).map(|(_, r)| r.clone()))
    }

    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signal.subscribe()
    }
}
