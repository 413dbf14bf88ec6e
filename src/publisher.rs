//! The publisher actor: claimed outbox rows → transport, in order per stream, pipelined across
//! streams.
//!
//! Owns the send window: up to `publisher_window` sends in flight, at most one per stream (a
//! later message of a stream is sent only once the earlier one was accepted, so a failure can
//! never let it overtake). Every send has a timeout. Accepted rows are reported done, failed
//! rows failed (and the rest of their stream handed back, parked behind the retry). Rows
//! accepted in one turn of the actor go to the coordinator in one report (a message per row was
//! a quarter of the mailbox traffic of a command); a failure sends those first, so reports keep
//! their order. It must not write to the store: the coordinator batches its reports.

use crate::coordinator::{Coordinator, Report};
use crate::routing::Origin;
use crate::store::{Failure, FailureKind, OutboxWork, WorkRef};
use crate::transport::{Transport, TransportError};
use actix::prelude::*;
use foldhash::{HashMap, HashMapExt, HashSet};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// Rows to publish, in commit order.
pub struct PublishRows(pub Vec<OutboxWork>);

impl Message for PublishRows {
    type Result = ();
}

pub struct Publisher {
    transport: Arc<dyn Transport>,
    coordinator: Addr<Coordinator>,
    origin: Origin,
    window: usize,
    send_timeout: Duration,
    in_flight: usize,
    /// Rows waiting per stream; a stream is in `ready` when it has rows and nothing in flight.
    streams: HashMap<String, VecDeque<OutboxWork>>,
    busy: HashSet<String>,
    ready: VecDeque<String>,
    /// The streams in `ready`, so a completion need not scan the queue.
    in_ready: HashSet<String>,
    /// Rows accepted since the last report, sent by [`ReportAccepted`] at the end of the turn.
    accepted: Vec<WorkRef>,
}

impl Publisher {
    pub fn new(
        transport: Arc<dyn Transport>,
        coordinator: Addr<Coordinator>,
        origin: Origin,
        window: usize,
        send_timeout: Duration,
    ) -> Publisher {
        Publisher {
            transport,
            coordinator,
            origin,
            window: window.max(1),
            send_timeout,
            in_flight: 0,
            streams: HashMap::new(),
            busy: Default::default(),
            ready: VecDeque::new(),
            in_ready: Default::default(),
            accepted: Vec::new(),
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.window {
            let Some(stream) = self.ready.pop_front() else {
                return;
            };
            self.in_ready.remove(&stream);
            let Some(row) = self.streams.get_mut(&stream).and_then(VecDeque::pop_front) else {
                continue;
            };
            self.busy.insert(stream.clone());
            self.in_flight += 1;
            let transport = self.transport.clone();
            let timeout = self.send_timeout;
            // The row's envelope goes to the transport as it is (plus this hop), not a copy.
            let OutboxWork {
                mut envelope,
                topic,
                work,
                ..
            } = row;
            let message_id = envelope.message_id;
            envelope.push_hop(self.origin.hop(&envelope.stream_id, Some(&topic)));
            ctx.spawn(
                async move {
                    let result =
                        match tokio::time::timeout(timeout, transport.publish(&topic, &envelope))
                            .await
                        {
                            Ok(result) => result,
                            Err(_) => Err(TransportError::Timeout {
                                topic: topic.clone(),
                            }),
                        };
                    (result, topic)
                }
                .into_actor(self)
                .map(move |(result, topic), act, ctx| {
                    act.in_flight -= 1;
                    act.busy.remove(&stream);
                    match result {
                        Ok(()) => {
                            if act.accepted.is_empty() {
                                // Handled after the sends that finished in this turn.
                                ctx.notify(ReportAccepted);
                            }
                            act.accepted.push(work);
                        }
                        Err(e) => {
                            act.report_accepted();
                            tracing::warn!(message_id = %message_id, topic = %topic, error = %e, "publish failed; stream parked until the retry");
                            let kind = if e.is_transient() {
                                FailureKind::Transient
                            } else {
                                FailureKind::Failed
                            };
                            act.coordinator.do_send(Report::OutboxFailed(Failure {
                                work,
                                kind,
                                error: e.to_string(),
                            }));
                            for later in act.streams.remove(&stream).into_iter().flatten() {
                                act.coordinator.do_send(Report::OutboxReleased(later.work));
                            }
                        }
                    }
                    act.mark_ready(&stream);
                    act.pump(ctx);
                }),
            );
        }
    }

    fn report_accepted(&mut self) {
        if !self.accepted.is_empty() {
            self.coordinator
                .do_send(Report::OutboxDone(std::mem::take(&mut self.accepted)));
        }
    }

    fn mark_ready(&mut self, stream: &str) {
        let has_rows = self.streams.get(stream).is_some_and(|q| !q.is_empty());
        if !has_rows {
            self.streams.remove(stream);
        } else if !self.busy.contains(stream) && self.in_ready.insert(stream.to_string()) {
            self.ready.push_back(stream.to_string());
        }
    }
}

impl Actor for Publisher {
    type Context = Context<Self>;
}

impl Handler<PublishRows> for Publisher {
    type Result = ();

    fn handle(&mut self, msg: PublishRows, ctx: &mut Self::Context) {
        for row in msg.0 {
            let stream = row.envelope.stream_id.clone();
            let queue = self.streams.entry(stream.clone()).or_default();
            let was_empty = queue.is_empty();
            queue.push_back(row);
            if was_empty && !self.busy.contains(&stream) && self.in_ready.insert(stream.clone()) {
                self.ready.push_back(stream);
            }
        }
        self.pump(ctx);
    }
}

/// Sends the rows accepted in this turn to the coordinator.
struct ReportAccepted;

impl Message for ReportAccepted {
    type Result = ();
}

impl Handler<ReportAccepted> for Publisher {
    type Result = ();

    fn handle(&mut self, _msg: ReportAccepted, _ctx: &mut Self::Context) {
        self.report_accepted();
    }
}
