//! Group apply: the exactly-once read-model runs of many partition actors committed together,
//! one store transaction ([`Store::apply_once_many`]) for as many events as arrived while the
//! transactions before them were committing (the coordinator's group commit, for read models).
//!
//! Why: a read model's event costs a transaction of its own otherwise (BEGIN, the applied
//! record, its writes, COMMIT: four round trips and a WAL flush per event), on top of the
//! command's group-committed batch; under load that transaction was most of the database's
//! work per command. Streams land on partitions spread over many actors, so grouping the
//! queued events of one partition would rarely find two; grouping across partitions does.
//!
//! Owns the queue of runs waiting for a transaction and the transactions in flight (at most
//! `in_flight`, each on a pooled connection of its own). A run that finds a free slot starts a
//! transaction at once with whatever is queued: no wait for a batch to fill, so an idle
//! service pays nothing. It must not decide order: each partition actor hands over one event
//! at a time and awaits it, and a transaction takes at most one event per (read model,
//! stream), so the runs in one transaction are independent. Nor does it report to the
//! coordinator: the partition actor does, from the outcome.
//!
//! A transaction in which a run refuses (or a statement of one fails) is rolled back whole;
//! each of its runs then runs alone ([`Store::apply_once`]), so the runs beside the failing
//! one apply and the failing one fails as it would have alone (retried with backoff,
//! dead-lettered after `store.max_attempts`). The price of sharing a transaction: a slow read
//! model holds the other events of its transaction until it ends or times out
//! (`coordinator.handler_timeout_ms`).

use crate::envelope::Envelope;
use crate::handler::{EventMeta, HandlerFailure};
use crate::read_model::{AppliedMany, AppliedOnce, OnceWork, OneEvent, ReadModelHandle};
use crate::store::{InstanceId, Store, StoreError, WorkRef};
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Runs taken into one transaction at most.
const MAX_RUNS: usize = 256;

/// One read model's run on one event.
pub(crate) struct Run {
    pub name: String,
    pub handle: ReadModelHandle,
    pub envelope: Envelope,
    pub meta: EventMeta,
    /// The event's inbox row, when this is its only perspective: completed in the
    /// transaction that applies it.
    pub completes: Option<WorkRef>,
}

/// What became of a [`Run`].
pub(crate) struct RunOutcome {
    pub applied: Result<AppliedOnce, StoreError>,
    /// Why it refused, when it did.
    pub failure: Option<HandlerFailure>,
    /// Its inbox row ([`Run::completes`]) was completed with it.
    pub completed: bool,
}

type Waiting = (Run, oneshot::Sender<RunOutcome>);

#[derive(Default)]
struct State {
    queue: VecDeque<Waiting>,
    in_flight: usize,
}

/// The runs of one engine's partition actors, committed in shared transactions.
pub(crate) struct GroupApply {
    store: Arc<dyn Store>,
    instance: InstanceId,
    /// Transactions at once: more runs than this wait, and go together into the next one.
    in_flight: usize,
    state: Mutex<State>,
}

impl GroupApply {
    pub(crate) fn new(store: Arc<dyn Store>, instance: InstanceId, in_flight: usize) -> Self {
        GroupApply {
            store,
            instance,
            in_flight: in_flight.max(1),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `run` in the next transaction with room, and answers when it committed (or not).
    pub(crate) async fn run(self: &Arc<Self>, run: Run) -> RunOutcome {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut st = self.state();
            st.queue.push_back((run, tx));
            let free = st.in_flight < self.in_flight;
            if free {
                st.in_flight += 1;
            }
            free
        };
        if lead {
            // On this actor's arbiter, apart from the actor: it goes on while runs are queued.
            actix::spawn(self.clone().lead());
        }
        rx.await.unwrap_or_else(|_| RunOutcome {
            applied: Err(StoreError::unavailable(
                "the read-model transaction was dropped (the engine stopped)",
            )),
            failure: None,
            completed: false,
        })
    }

    /// Commits what is queued, one transaction after another, until nothing is.
    async fn lead(self: Arc<Self>) {
        // If this task ends early (its arbiter stops), the slot is given back and the queued
        // runs are answered (unavailable: their rows are retried) rather than left waiting.
        let mut slot = Slot {
            group: &self,
            armed: true,
        };
        loop {
            let batch = {
                let mut st = self.state();
                let batch = take_batch(&mut st.queue, MAX_RUNS, |(run, _)| {
                    (run.name.clone(), run.envelope.stream_id.clone())
                });
                if batch.is_empty() {
                    // Given back under the lock that saw the queue empty: a run queued after
                    // this finds the slot free and leads.
                    st.in_flight -= 1;
                    slot.armed = false;
                    return;
                }
                batch
            };
            slot.group.commit(batch).await;
        }
    }

    async fn commit(&self, batch: Vec<Waiting>) {
        let ones: Vec<OneEvent<'_>> = batch
            .iter()
            .map(|(r, _)| OneEvent {
                handle: &r.handle,
                envelope: &r.envelope,
                meta: r.meta.clone(),
                failure: Default::default(),
            })
            .collect();
        let work: Vec<OnceWork<'_>> = batch
            .iter()
            .zip(&ones)
            .map(|((r, _), one)| OnceWork {
                read_model: &r.name,
                message_id: r.envelope.message_id,
                completes: r.completes,
                apply: one,
            })
            .collect();
        let answer = self.store.apply_once_many(self.instance, &work).await;
        drop(work);
        match answer {
            Ok(AppliedMany::Committed {
                outcomes,
                completed,
            }) => {
                for ((_, reply), applied) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(RunOutcome {
                        applied: Ok(applied),
                        failure: None,
                        completed,
                    });
                }
            }
            Ok(AppliedMany::Refused) if batch.len() == 1 => {
                let failure = ones
                    .into_iter()
                    .next()
                    .and_then(|one| one.failure.into_inner().unwrap_or_else(|p| p.into_inner()));
                for (_, reply) in batch {
                    let _ = reply.send(RunOutcome {
                        applied: Ok(AppliedOnce::Refused),
                        failure: failure.clone(),
                        completed: false,
                    });
                }
            }
            Ok(AppliedMany::Refused) => {
                drop(ones);
                // Which one refused is not known: each alone, in a transaction of its own.
                let alone = batch.iter().map(|(r, _)| self.alone(r));
                let outcomes = futures::future::join_all(alone).await;
                for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(RunOutcome {
                        applied: Err(e.clone()),
                        failure: None,
                        completed: false,
                    });
                }
            }
        }
    }

    /// `run` in a transaction of its own; its inbox row is left to the coordinator.
    async fn alone(&self, run: &Run) -> RunOutcome {
        let one = OneEvent {
            handle: &run.handle,
            envelope: &run.envelope,
            meta: run.meta.clone(),
            failure: Default::default(),
        };
        let applied = self
            .store
            .apply_once(&run.name, run.envelope.message_id, false, &one)
            .await;
        RunOutcome {
            applied,
            failure: one.failure.into_inner().unwrap_or_else(|p| p.into_inner()),
            completed: false,
        }
    }
}

/// A transaction slot held by a leading task (see [`GroupApply::lead`]); armed until the task
/// gives it back normally.
struct Slot<'g> {
    group: &'g GroupApply,
    armed: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.group.state();
        st.in_flight -= 1;
        if st.in_flight == 0 {
            // No transaction is left to take them: answered now (dropped senders), not never.
            st.queue.clear();
        }
    }
}

/// The next transaction's runs, in arrival order: at most `max`, and at most one per key
/// ((read model, stream): a later one waits for the next transaction).
fn take_batch<T>(
    queue: &mut VecDeque<T>,
    max: usize,
    key: impl Fn(&T) -> (String, String),
) -> Vec<T> {
    let mut batch = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut kept = VecDeque::new();
    while let Some(w) = queue.pop_front() {
        if batch.len() < max && seen.insert(key(&w)) {
            batch.push(w);
        } else {
            kept.push_back(w);
        }
    }
    *queue = kept;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(w: &(&str, &str, u32)) -> (String, String) {
        (w.0.to_string(), w.1.to_string())
    }

    #[test]
    fn a_batch_takes_one_run_per_read_model_and_stream_in_arrival_order() {
        let mut queue: VecDeque<_> = [
            ("summary", "a", 1),
            ("summary", "b", 1),
            ("summary", "a", 2),
            ("other", "a", 1),
            ("summary", "c", 1),
            ("summary", "a", 3),
        ]
        .into();
        let batch = take_batch(&mut queue, 10, key);
        assert_eq!(
            batch,
            [
                ("summary", "a", 1),
                ("summary", "b", 1),
                ("other", "a", 1),
                ("summary", "c", 1)
            ]
        );
        // The later runs of stream a wait, still in their order.
        assert_eq!(queue, [("summary", "a", 2), ("summary", "a", 3)]);
        assert_eq!(take_batch(&mut queue, 10, key), [("summary", "a", 2)]);
        assert_eq!(take_batch(&mut queue, 10, key), [("summary", "a", 3)]);
        assert!(take_batch(&mut queue, 10, key).is_empty());
    }

    #[test]
    fn a_batch_takes_at_most_its_maximum() {
        let mut queue: VecDeque<_> = [("m", "a", 1), ("m", "b", 1), ("m", "c", 1)].into();
        assert_eq!(
            take_batch(&mut queue, 2, key),
            [("m", "a", 1), ("m", "b", 1)]
        );
        assert_eq!(queue, [("m", "c", 1)]);
    }
}
