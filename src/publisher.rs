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

use crate::protocol::{PublishRows, Report};
use crate::routing::Origin;
use crate::store::{Failure, FailureKind, OutboxWork, WorkRef};
use crate::supervision::{ActorKind, HealthState, Lifeline, StopNow, fault};
use crate::telemetry::PublishMeters;
use crate::transport::{Transport, TransportError};
use actix::prelude::*;
use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

pub struct Publisher {
    transport: Arc<dyn Transport>,
    coordinator: Recipient<Report>,
    origin: Origin,
    window: usize,
    send_timeout: Duration,
    in_flight: usize,
    /// Streams with rows waiting or one in flight.
    streams: HashMap<String, StreamQueue>,
    /// Streams with rows waiting and nothing in flight, in the order they became so.
    ready: VecDeque<String>,
    /// Rows accepted since the last report, sent by [`ReportAccepted`] at the end of the turn.
    accepted: Vec<WorkRef>,
    health: HealthState,
    /// `whizbang_publish_total` per topic, registered the first time the topic is sent to.
    published: HashMap<String, PublishMeters>,
    /// Tells the supervisor when this actor ends (see `supervision`).
    _lifeline: Lifeline,
}

/// One stream's state in the publisher.
#[derive(Default)]
struct StreamQueue {
    rows: VecDeque<OutboxWork>,
    /// A row of the stream is in flight.
    sending: bool,
    /// The stream is in `ready`.
    queued: bool,
}

impl Publisher {
    pub fn new(
        transport: Arc<dyn Transport>,
        coordinator: Recipient<Report>,
        origin: Origin,
        window: usize,
        send_timeout: Duration,
        health: HealthState,
        lifeline: Lifeline,
    ) -> Publisher {
        Publisher {
            transport,
            coordinator,
            origin,
            window: window.max(1),
            send_timeout,
            in_flight: 0,
            streams: HashMap::new(),
            ready: VecDeque::new(),
            accepted: Vec::new(),
            published: HashMap::new(),
            health,
            _lifeline: lifeline,
        }
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.window {
            let Some(stream) = self.ready.pop_front() else {
                return;
            };
            let Some(queue) = self.streams.get_mut(&stream) else {
                continue;
            };
            queue.queued = false;
            let Some(row) = queue.rows.pop_front() else {
                continue;
            };
            queue.sending = true;
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
                    act.count_publish(&topic, result.as_ref().err().map(|e| e.is_transient()));
                    if let Some(queue) = act.streams.get_mut(&stream) {
                        queue.sending = false;
                    }
                    match result {
                        Ok(()) => {
                            act.health.transport_ok();
                            if act.accepted.is_empty() {
                                // Handled after the sends that finished in this turn.
                                ctx.notify(ReportAccepted);
                            }
                            act.accepted.push(work);
                        }
                        Err(e) => {
                            if e.is_transient() {
                                act.health.transport_failed();
                            }
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
                            let handed_back = act.streams.remove(&stream).map(|q| q.rows);
                            for later in handed_back.into_iter().flatten() {
                                act.coordinator.do_send(Report::OutboxReleased(later.work));
                            }
                        }
                    }
                    act.mark_ready(stream);
                    act.pump(ctx);
                }),
            );
        }
    }

    /// Counts one send to `topic`: `None` when accepted, else whether its failure was
    /// transient.
    fn count_publish(&mut self, topic: &str, failed: Option<bool>) {
        match self.published.get(topic) {
            Some(m) => m.record(failed),
            None => {
                let m = self.health.meters().publish(topic);
                m.record(failed);
                self.published.insert(topic.to_string(), m);
            }
        }
    }

    fn report_accepted(&mut self) {
        if !self.accepted.is_empty() {
            self.coordinator
                .do_send(Report::OutboxDone(std::mem::take(&mut self.accepted)));
        }
    }

    /// After a send of `stream` finished: it goes back in line if it has rows, and is
    /// forgotten if it has none.
    fn mark_ready(&mut self, stream: String) {
        let Some(queue) = self.streams.get_mut(&stream) else {
            return;
        };
        if queue.rows.is_empty() {
            if !queue.sending {
                self.streams.remove(&stream);
            }
        } else if !queue.sending && !queue.queued {
            queue.queued = true;
            self.ready.push_back(stream);
        }
    }
}

impl Actor for Publisher {
    type Context = Context<Self>;
}

impl Handler<StopNow> for Publisher {
    type Result = ();

    fn handle(&mut self, _msg: StopNow, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<PublishRows> for Publisher {
    type Result = ();

    fn handle(&mut self, msg: PublishRows, ctx: &mut Self::Context) {
        fault::check(self.origin.instance, ActorKind::Publisher);
        for row in msg.0 {
            let queue = self
                .streams
                .entry(row.envelope.stream_id.clone())
                .or_default();
            if !queue.sending && !queue.queued {
                queue.queued = true;
                self.ready.push_back(row.envelope.stream_id.clone());
            }
            queue.rows.push_back(row);
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
