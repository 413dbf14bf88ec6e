//! The sender task: one per topic, owning that topic's sender link.
//!
//! `publish` hands the encoded message to the topic's sender task over a channel and waits for
//! the broker's outcome, never longer than `transport.send_timeout_ms`. The task writes
//! transfers one after another (`send_batchable`) without waiting for their outcomes, and
//! collects outcomes as they come, each with the same timeout: many concurrent `publish` calls
//! become one pipelined stream of transfers on one link, the way the broker is fastest. Only an
//! `accepted` outcome resolves `Ok`; `rejected` is a [`TransportError::Rejected`] (counted as an
//! attempt by the store); `released`, `modified`, a link error or a timeout are transient. On a
//! timeout or a link, session or connection error the link, session and connection are dropped
//! and every send still waiting on them fails at once (fe2o3-amqp 0.18 may otherwise wait for
//! an outcome forever). The next `publish` reconnects; while reconnecting fails, further
//! attempts are spaced by a capped exponential backoff and calls in between fail fast. Messages
//! whose outcome was lost are sent again by the publisher's retry: the receiving inbox
//! deduplicates them by message id.
//!
//! It must not encode envelopes (that is [`super::wire`], before the message reaches the task)
//! nor check sizes (`transport.max_message_bytes` is enforced with `Envelope::check_size` when a
//! message is routed to the outbox, and by the consumer on receipt), and it must not retry a
//! send itself: a failed send is reported, and the publisher decides.

use super::AmqpSettings;
use super::links::{LinkConnection, LinkGuard, connection_error, link_name};
use crate::retry::Backoff;
use crate::transport::TransportError;
use fe2o3_amqp::link::{SendError, Sender};
use fe2o3_amqp::types::definitions::{self, ErrorCondition, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Data, Message, Outcome};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Sends queued per topic before `publish` callers wait for room.
const SEND_QUEUE: usize = 4096;

/// Starts the sender task of `topic` (sending to `address`) and returns its queue. The task
/// ends when every handle to the queue is dropped.
pub(super) fn spawn(
    settings: Arc<AmqpSettings>,
    topic: &str,
    address: String,
) -> mpsc::Sender<SendRequest> {
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let task = SenderTask {
        reconnect: settings.reconnect_backoff(),
        settings,
        topic: topic.to_string(),
        address,
        link: None,
        retry_at: None,
        last_error: String::new(),
        next_seq: 0,
        waiting: HashMap::new(),
        outcomes: FuturesUnordered::new(),
    };
    tokio::spawn(task.run(rx));
    tx
}

struct SenderLink {
    // Field order is drop order: the link goes before its session and connection.
    sender: Sender,
    guard: LinkGuard,
}

/// One message for the sender task, and where its outcome goes.
pub(super) struct SendRequest {
    pub(super) message: Message<Data>,
    pub(super) reply: oneshot::Sender<Result<(), TransportError>>,
}

enum Settled {
    Outcome(Result<Outcome, SendError>),
    TimedOut,
}

/// Owns the sender link of one topic; see the module docs.
struct SenderTask {
    settings: Arc<AmqpSettings>,
    topic: String,
    address: String,
    link: Option<SenderLink>,
    /// Consecutive failed connection attempts (timing the next), and when the next may start.
    reconnect: Backoff,
    retry_at: Option<Instant>,
    last_error: String,
    next_seq: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<(), TransportError>>>,
    outcomes: FuturesUnordered<BoxFuture<'static, (u64, Settled)>>,
}

impl SenderTask {
    async fn run(mut self, mut requests: mpsc::Receiver<SendRequest>) {
        loop {
            tokio::select! {
                Some((seq, settled)) = self.outcomes.next(), if !self.outcomes.is_empty() => {
                    self.finish(seq, settled);
                }
                reason = closed(&mut self.link), if self.link.is_some() => {
                    self.reset(TransportError::Connection(format!("{}: {reason}", self.address)));
                }
                request = requests.recv() => match request {
                    Some(request) => self.start(request).await,
                    None => break,
                },
            }
        }
        // The transport was dropped: nobody waits for the remaining outcomes.
    }

    async fn connect(&mut self) -> Result<(), TransportError> {
        if let Some(at) = self.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(TransportError::Connection(format!(
                    "{}: not connected ({}); next attempt in {} ms",
                    self.address,
                    self.last_error,
                    (at - now).as_millis()
                )));
            }
        }
        let attempt = async {
            let mut connection = LinkConnection::open(&self.settings, &self.address).await?;
            let attach = Sender::builder()
                .name(link_name("send", &self.topic))
                .target(self.address.as_str())
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .attach(&mut connection.session);
            let sender = match tokio::time::timeout(self.settings.send_timeout, attach).await {
                Ok(Ok(sender)) => sender,
                Ok(Err(e)) => return Err(connection_error(&self.address, "attach failed", e)),
                Err(_) => return Err(connection_error(&self.address, "attach", "timed out")),
            };
            Ok(SenderLink {
                sender,
                guard: connection.watch(),
            })
        };
        match attempt.await {
            Ok(link) => {
                if self.reconnect.failures() > 0 {
                    tracing::info!(address = %self.address, "sender reconnected");
                }
                self.link = Some(link);
                self.reconnect.reset();
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                let delay = self.reconnect.next_delay();
                self.retry_at = Some(Instant::now() + delay);
                self.last_error = e.to_string();
                tracing::warn!(address = %self.address, error = %e, retry_in_ms = delay.as_millis() as u64, "sender cannot connect");
                Err(e)
            }
        }
    }

    async fn start(&mut self, request: SendRequest) {
        if request.reply.is_closed() {
            return; // the caller gave up (timeout): do not send a stale copy
        }
        if self.link.is_none()
            && let Err(e) = self.connect().await
        {
            let _ = request.reply.send(Err(e));
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let timeout = self.settings.send_timeout;
        match tokio::time::timeout(timeout, link.sender.send_batchable(request.message)).await {
            Ok(Ok(outcome)) => {
                self.next_seq += 1;
                let seq = self.next_seq;
                self.waiting.insert(seq, request.reply);
                self.outcomes.push(Box::pin(async move {
                    match tokio::time::timeout(timeout, outcome).await {
                        Ok(result) => (seq, Settled::Outcome(result)),
                        Err(_) => (seq, Settled::TimedOut),
                    }
                }));
            }
            Ok(Err(e)) => {
                let e = connection_error(&self.address, "send failed", e);
                let _ = request.reply.send(Err(e.clone_for_waiters()));
                self.reset(e);
            }
            Err(_) => {
                let _ = request.reply.send(Err(TransportError::Timeout {
                    topic: self.topic.clone(),
                }));
                self.reset(connection_error(
                    &self.address,
                    "no link credit",
                    format!("within {timeout:?}"),
                ));
            }
        }
    }

    fn finish(&mut self, seq: u64, settled: Settled) {
        let Some(reply) = self.waiting.remove(&seq) else {
            return;
        };
        let result = match settled {
            Settled::Outcome(Ok(Outcome::Accepted(_))) => Ok(()),
            Settled::Outcome(Ok(Outcome::Rejected(rejected))) => Err(TransportError::Rejected {
                topic: self.topic.clone(),
                reason: describe(rejected.error.as_ref()),
            }),
            Settled::Outcome(Ok(Outcome::Released(_))) => Err(TransportError::Connection(format!(
                "{}: the broker released the message",
                self.address
            ))),
            Settled::Outcome(Ok(Outcome::Modified(_))) => {
                let e = TransportError::Connection(format!(
                    "{}: the broker returned a modified outcome",
                    self.address
                ));
                let _ = reply.send(Err(e.clone_for_waiters()));
                self.reset(e);
                return;
            }
            Settled::Outcome(Err(e)) => {
                let e = connection_error(&self.address, "link lost", e);
                let _ = reply.send(Err(e.clone_for_waiters()));
                self.reset(e);
                return;
            }
            Settled::TimedOut => {
                let _ = reply.send(Err(TransportError::Timeout {
                    topic: self.topic.clone(),
                }));
                self.reset(TransportError::Timeout {
                    topic: self.topic.clone(),
                });
                return;
            }
        };
        let _ = reply.send(result);
    }

    /// Drops the link, its session and connection; every send waiting on them fails now.
    fn reset(&mut self, cause: TransportError) {
        if self.link.take().is_some() {
            tracing::warn!(address = %self.address, error = %cause, in_flight = self.waiting.len(), "sender link dropped; reconnecting on the next send");
        }
        self.outcomes = FuturesUnordered::new();
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(TransportError::Connection(format!(
                "{}: link dropped before the outcome arrived ({cause})",
                self.address
            ))));
        }
        self.last_error = cause.to_string();
    }
}

/// Resolves when the link's session or connection is gone (never when there is no link).
async fn closed(link: &mut Option<SenderLink>) -> String {
    match link {
        Some(link) => (&mut link.guard.closed)
            .await
            .unwrap_or_else(|_| "the connection watcher stopped".into()),
        None => std::future::pending().await,
    }
}

fn describe(error: Option<&definitions::Error>) -> String {
    match error {
        Some(e) => {
            let condition = match &e.condition {
                ErrorCondition::Custom(symbol) => symbol.0.clone(),
                other => format!("{other:?}"),
            };
            match &e.description {
                Some(d) => format!("{condition}: {d}"),
                None => condition,
            }
        }
        None => "rejected without an error".into(),
    }
}

impl TransportError {
    fn clone_for_waiters(&self) -> TransportError {
        match self {
            TransportError::Connection(m) => TransportError::Connection(m.clone()),
            TransportError::Rejected { topic, reason } => TransportError::Rejected {
                topic: topic.clone(),
                reason: reason.clone(),
            },
            TransportError::Timeout { topic } => TransportError::Timeout {
                topic: topic.clone(),
            },
            TransportError::Topology(m) => TransportError::Topology(m.clone()),
            TransportError::Closed => TransportError::Closed,
            TransportError::SessionIdle(m) => TransportError::SessionIdle(m.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::primitives::Symbol;

    #[test]
    fn rejections_are_described() {
        let e = definitions::Error::new(
            ErrorCondition::Custom(Symbol::from("x:y")),
            Some("too big".to_string()),
            None,
        );
        assert_eq!(describe(Some(&e)), "x:y: too big");
        assert_eq!(describe(None), "rejected without an error");
    }
}
