//! Idempotent commands: a command dispatched with a caller-chosen key
//! ([`DispatchOptions::idempotency_key`](crate::DispatchOptions::idempotency_key)) runs once;
//! a repeat with the same key answers the first outcome again.
//!
//! Owns what is recorded of a first outcome ([`Outcome`]: the receipt, the receptor's encoded
//! result and the inbox rows its events caused, or the receptor's refusal), the request hash
//! that tells a repeat from another command reusing the key, and the single flight of one key
//! in this process ([`KeyLocks`]). The record travels in the command's unit of work
//! ([`crate::store::UnitOfWork::idempotency`]) and is written in the same store transaction as
//! the command's events and queue rows, so a crash can never leave effects without their record
//! or a record without its effects.
//!
//! How a keyed dispatch runs: it takes the key's lock in this process (a concurrent dispatch
//! with the same key waits for it), looks the key up in the store, and either answers the
//! recorded outcome (same hash) or [`DispatchError::IdempotencyKeyReused`] (another hash), or
//! runs the receptor and commits its unit with the record. Another instance may run the same
//! key at the same time: the store's unique key lets exactly one unit commit, and the other
//! comes back [`crate::store::UnitOutcome::KeyTaken`], writes nothing, and answers the
//! winner's outcome. So in one process the receptor runs once per key; across instances it may
//! run on both, but only one decision is ever committed and both callers get it.
//!
//! Only business refusals ([`DispatchError::Rejected`]) are recorded as outcomes: a version
//! conflict, a timeout, a panic or a store failure writes no record, and a retry with the same
//! key runs the command again. It must not know about actors.

use crate::dispatcher::{DeliveryReceipt, ReceiptStatus};
use crate::error::DispatchError;
use crate::handler::ReceptorError;
use crate::store::{AppendedEvent, IdempotencyRecord, NewIdempotencyRecord};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

/// The first outcome of a keyed command, as recorded (MessagePack, opaque to the store).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) enum Outcome {
    /// The command's effects were committed.
    Done {
        /// The receipt's message id.
        message_id: Uuid,
        /// The receipt's correlation id.
        correlation_id: Uuid,
        /// The receipt's stream.
        stream_id: String,
        /// The receipt's timestamp.
        timestamp_us: i64,
        /// Queued for a remote receptor (`Accepted`) rather than handled here.
        accepted: bool,
        /// The receptor's result, encoded by the receptor's adapter; `None` for a command sent
        /// to a remote receptor.
        result: Option<Vec<u8>>,
        /// The inbox rows the unit wrote (the events' perspectives here): a replayed
        /// `local_invoke` waits for them as the first one did.
        inbox: Vec<Uuid>,
    },
    /// The receptor refused the command; nothing but the record was written.
    Rejected {
        /// The command's type name.
        message_type: String,
        /// The refusal.
        error: ReceptorError,
    },
}

impl Outcome {
    /// The receipt the first dispatch answered (the events from the store's record), or the
    /// refusal it answered.
    pub(crate) fn receipt(
        &self,
        appended: Vec<AppendedEvent>,
    ) -> Result<DeliveryReceipt, DispatchError> {
        match self {
            Outcome::Done {
                message_id,
                correlation_id,
                stream_id,
                timestamp_us,
                accepted,
                ..
            } => Ok(DeliveryReceipt {
                message_id: *message_id,
                correlation_id: *correlation_id,
                stream_id: stream_id.clone(),
                timestamp_us: *timestamp_us,
                status: if *accepted {
                    ReceiptStatus::Accepted
                } else {
                    ReceiptStatus::Delivered
                },
                events: appended,
            }),
            Outcome::Rejected {
                message_type,
                error,
            } => Err(DispatchError::Rejected {
                message_type: message_type.clone(),
                error: error.clone(),
            }),
        }
    }
}

/// The hash that tells a repeat of a command from another command under the same key: SHA-256
/// of the type name, a NUL, and the encoded body. (A body whose encoding is not deterministic,
/// a `HashMap` field say, hashes differently on each dispatch: use ordered maps in commands
/// sent with keys.)
pub(crate) fn request_hash(message_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(message_type.as_bytes());
    hash.update([0u8]);
    hash.update(payload);
    hash.finalize().to_vec()
}

/// A keyed dispatch: its key and its request's hash, carried to where its outcome is known.
#[derive(Debug, Clone)]
pub(crate) struct Keyed {
    pub key: String,
    pub hash: Vec<u8>,
}

impl Keyed {
    /// The key of `options`, with the hash of the command `payload` of type `message_type`.
    pub(crate) fn new(key: String, message_type: &str, payload: &[u8]) -> Keyed {
        Keyed {
            key,
            hash: request_hash(message_type, payload),
        }
    }

    /// The record of `outcome` under this key, for the command's unit.
    pub(crate) fn record(&self, outcome: &Outcome) -> Result<NewIdempotencyRecord, DispatchError> {
        let mut bytes = Vec::with_capacity(128);
        rmp_serde::encode::write_named(&mut bytes, outcome)
            .map_err(|e| DispatchError::Codec(format!("cannot encode an outcome: {e}")))?;
        Ok(NewIdempotencyRecord {
            key: self.key.clone(),
            request_hash: self.hash.clone(),
            outcome: bytes,
        })
    }

    /// The first outcome a stored record holds, if it was recorded for this same request;
    /// [`DispatchError::IdempotencyKeyReused`] if it was recorded for another.
    pub(crate) fn replay(
        &self,
        record: IdempotencyRecord,
    ) -> Result<(Outcome, Vec<AppendedEvent>), DispatchError> {
        if record.record.request_hash != self.hash {
            return Err(DispatchError::IdempotencyKeyReused {
                key: self.key.clone(),
            });
        }
        let outcome = rmp_serde::from_slice(&record.record.outcome).map_err(|e| {
            DispatchError::Codec(format!(
                "the recorded outcome of idempotency key `{}` cannot be read: {e}",
                self.key
            ))
        })?;
        Ok((outcome, record.appended))
    }
}

/// The first outcome of a keyed request scope ([`crate::Scope::with_idempotency_key`]): what
/// each of its commands answered, in order, and the inbox rows its unit wrote. Recorded only
/// when the scope completed; a scope that failed writes nothing, so a retry runs it again.
/// Encoded as a map whose only member is `scope_commands`, which no [`Outcome`] has: a key
/// recorded by a single dispatch does not read as a scope, and the other way round the request
/// hashes differ ([`scope_hash`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ScopeRecord {
    pub scope_commands: Vec<RecordedCommand>,
    /// The inbox rows the scope's unit wrote: a replay waits for them as the first completion
    /// did.
    pub inbox: Vec<Uuid>,
}

/// One command of a recorded scope.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RecordedCommand {
    /// [`request_hash`] of the command.
    pub hash: Vec<u8>,
    pub message_id: Uuid,
    pub correlation_id: Uuid,
    pub stream_id: String,
    pub timestamp_us: i64,
    /// The receptor's result, encoded by the receptor's adapter.
    pub result: Vec<u8>,
    /// The events it appended (their message ids).
    pub events: Vec<Uuid>,
}

impl ScopeRecord {
    /// The record of this scope under `key`.
    pub(crate) fn record(&self, key: &str) -> Result<NewIdempotencyRecord, DispatchError> {
        let mut bytes = Vec::with_capacity(256);
        rmp_serde::encode::write_named(&mut bytes, self)
            .map_err(|e| DispatchError::Codec(format!("cannot encode a scope's outcome: {e}")))?;
        let hashes: Vec<&[u8]> = self
            .scope_commands
            .iter()
            .map(|c| c.hash.as_slice())
            .collect();
        Ok(NewIdempotencyRecord {
            key: key.to_string(),
            request_hash: scope_hash(&hashes),
            outcome: bytes,
        })
    }

    /// The scope recorded under `key`, or [`DispatchError::IdempotencyKeyReused`] if the key
    /// was recorded for a single command.
    pub(crate) fn read(
        key: &str,
        record: &IdempotencyRecord,
    ) -> Result<ScopeRecord, DispatchError> {
        rmp_serde::from_slice(&record.record.outcome).map_err(|_| {
            DispatchError::IdempotencyKeyReused {
                key: key.to_string(),
            }
        })
    }

    /// The receipt of command `index`, with its events among `appended`.
    pub(crate) fn receipt(&self, index: usize, appended: &[AppendedEvent]) -> DeliveryReceipt {
        let c = &self.scope_commands[index];
        DeliveryReceipt {
            message_id: c.message_id,
            correlation_id: c.correlation_id,
            stream_id: c.stream_id.clone(),
            timestamp_us: c.timestamp_us,
            status: ReceiptStatus::Delivered,
            events: appended
                .iter()
                .filter(|e| c.events.contains(&e.message_id))
                .cloned()
                .collect(),
        }
    }
}

/// The request hash of a scope: of its commands' hashes, in order, under a type name no command
/// has.
pub(crate) fn scope_hash(commands: &[&[u8]]) -> Vec<u8> {
    request_hash("whizbang.scope", &commands.concat())
}

/// One lock per idempotency key in use in this process: the dispatches of one key run one
/// after another, so the receptor runs once and the later ones find the first one's record.
/// Entries live while someone holds or waits for them.
#[derive(Clone, Default)]
pub(crate) struct KeyLocks(Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl KeyLocks {
    /// Waits until no other dispatch of this process holds `key`.
    pub(crate) async fn lock(&self, key: &str) -> KeyGuard {
        let mutex = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = mutex.lock_owned().await;
        KeyGuard {
            locks: self.clone(),
            key: key.to_string(),
            guard: Some(guard),
        }
    }

    /// Keys with a holder or a waiter (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Holds one key of [`KeyLocks`]; dropping it lets the next dispatch of the key run.
pub(crate) struct KeyGuard {
    locks: KeyLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.0.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own reference left: nobody holds or waits for the key.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_hash_covers_the_type_and_the_body() {
        let a = request_hash("Open", b"\x01\x02");
        assert_eq!(a, request_hash("Open", b"\x01\x02"));
        assert_ne!(a, request_hash("Open", b"\x01\x03"));
        assert_ne!(a, request_hash("Close", b"\x01\x02"));
        // The separator: the type's end is not confused with the body's start.
        assert_ne!(request_hash("ab", b"c"), request_hash("a", b"bc"));
    }

    #[test]
    fn a_record_replays_for_its_request_only() {
        let keyed = Keyed::new("k".into(), "Open", b"body");
        let outcome = Outcome::Rejected {
            message_type: "Open".into(),
            error: ReceptorError::Conflict("already open".into()),
        };
        let record = IdempotencyRecord {
            record: keyed.record(&outcome).unwrap(),
            appended: Vec::new(),
        };
        let (replayed, _) = keyed.replay(record.clone()).unwrap();
        assert_eq!(replayed, outcome);
        let err = replayed.receipt(Vec::new()).unwrap_err();
        assert_eq!(err.http_status(), 409);
        let other = Keyed::new("k".into(), "Open", b"another body");
        assert!(matches!(
            other.replay(record),
            Err(DispatchError::IdempotencyKeyReused { key }) if key == "k"
        ));
    }

    #[tokio::test]
    async fn one_key_runs_one_dispatch_at_a_time_and_is_forgotten_after() {
        let locks = KeyLocks::default();
        let first = locks.lock("k").await;
        let other_key = tokio::time::timeout(Duration::from_secs(5), locks.lock("j"))
            .await
            .expect("another key does not wait");
        drop(other_key);
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock("k").await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the second holder of `k` must wait");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiter runs once the first lets go")
            .unwrap();
        drop(second);
        assert_eq!(locks.len(), 0, "keys nobody holds are forgotten");
    }
}
