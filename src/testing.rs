//! Test support for applications: dispatch a command, wait (with a deadline) until everything it
//! caused has settled, and inspect what was published — what Wolverine's tracked sessions and
//! MassTransit's test harness give.
//!
//! Owns [`RecordingTransport`] (any transport, with a log of what it published) and [`Tracker`]
//! (the wait). Settled means, for the request's correlation id, on every service the tracker
//! watches: no outbox row left to publish, no inbox row left to process (perspectives applied,
//! local commands run, or dead-lettered), and every message published to a topic a watched
//! service subscribes to taken into its inbox and processed. It reads the runtimes' own state
//! (`Runtime::status`, the recorded publications); it must not change anything, and it is not
//! for production paths: a tracker re-checks after each publication and every few milliseconds.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use whizbang::testing::{RecordingTransport, Tracker};
//! use whizbang::{Command, Config, Decision, Event, Message, Receptor, ReceptorContext,
//!     ReceptorError, Runtime};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Open { id: String }
//! impl Message for Open {
//!     const TYPE_NAME: &'static str = "Open";
//!     fn stream_id(&self) -> String { format!("door-{}", self.id) }
//! }
//! impl Command for Open {}
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! struct Opened { id: String }
//! impl Message for Opened {
//!     const TYPE_NAME: &'static str = "Opened";
//!     fn stream_id(&self) -> String { format!("door-{}", self.id) }
//! }
//! impl Event for Opened {}
//! struct Doors;
//! impl Receptor<Open> for Doors {
//!     type Result = Opened;
//!     async fn handle(&self, c: Open, _: ReceptorContext) -> Result<Decision<Opened>, ReceptorError> {
//!         Ok(Decision::event(Opened { id: c.id }))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! actix::System::new().block_on(async {
//!     let mut config = Config::default();
//!     config.routing.topics.insert("Opened".into(), "doors".into());
//!     let transport = RecordingTransport::memory();
//!     let runtime = Runtime::builder(config).transport(transport.clone())
//!         .receptor::<Open, _>(Doors).start().await?;
//!
//!     let tracker = Tracker::new(&transport).service(&runtime).deadline(Duration::from_secs(5));
//!     let (_receipt, settled) = tracker.send(&runtime, Open { id: "1".into() }).await?;
//!     let opened: Vec<Opened> = settled.published_of();
//!     assert_eq!(opened.len(), 1);
//!     runtime.shutdown().await?;
//!     Ok(())
//! })
//! # }
//! ```

use crate::dispatcher::{DeliveryReceipt, DispatchOptions, LocalInvoke, SendCommand};
use crate::envelope::Envelope;
use crate::error::DispatchError;
use crate::message::{self, Command, Message};
use crate::runtime::Runtime;
use crate::store::CorrelationStatus;
use crate::transport::memory::{MemoryBus, MemoryTransport};
use crate::transport::{Subscription, Transport, TransportError};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use uuid::Uuid;

/// How often a tracker re-reads the runtimes' state between publications.
const RECHECK: Duration = Duration::from_millis(5);

/// One message the transport accepted.
#[derive(Debug, Clone)]
pub struct Published {
    /// The topic it was published to.
    pub topic: String,
    /// The message as sent.
    pub envelope: Envelope,
}

impl Published {
    /// The message as `M`, if it is one (by type name) and decodes.
    pub fn decode<M: Message>(&self) -> Option<M> {
        if self.envelope.message_type != M::TYPE_NAME {
            return None;
        }
        message::decode(&self.envelope.payload).ok()
    }
}

/// A transport that forwards to another and records every message it accepted, in order. Give
/// the same one to every runtime of the test.
pub struct RecordingTransport {
    inner: Arc<dyn Transport>,
    log: Mutex<Vec<Published>>,
    changed: watch::Sender<u64>,
}

impl RecordingTransport {
    /// Records what `inner` publishes.
    pub fn new(inner: Arc<dyn Transport>) -> Arc<RecordingTransport> {
        Arc::new(RecordingTransport {
            inner,
            log: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
        })
    }

    /// Over a new in-process bus (the embedded default transport).
    pub fn memory() -> Arc<RecordingTransport> {
        RecordingTransport::new(Arc::new(MemoryTransport::new(MemoryBus::new())))
    }

    /// Everything published so far, in the order the transport accepted it.
    pub fn published(&self) -> Vec<Published> {
        self.lock().clone()
    }

    /// What was published for the request `correlation_id`.
    pub fn published_for(&self, correlation_id: Uuid) -> Vec<Published> {
        self.lock()
            .iter()
            .filter(|p| p.envelope.correlation_id == correlation_id)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Published>> {
        // A panic while holding it cannot leave the log half-written (one push).
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Transport for RecordingTransport {
    async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<(), TransportError> {
        self.inner.publish(topic, envelope).await?;
        self.lock().push(Published {
            topic: topic.to_string(),
            envelope: envelope.clone(),
        });
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        self.inner.subscribe(topic, subscription, prefetch).await
    }

    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError> {
        self.inner.check_topology(topics, subscriptions).await
    }
}

/// One watched service's state for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    /// `service.name` of the runtime.
    pub service: String,
    /// What its store knows of the request.
    pub status: CorrelationStatus,
}

/// Everything a request caused, once settled.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The request.
    pub correlation_id: Uuid,
    /// Each watched service's state, in the order they were added to the tracker.
    pub services: Vec<ServiceStatus>,
    /// What was published for the request, in order.
    pub published: Vec<Published>,
}

impl Settled {
    /// The published messages of type `M`, decoded, in order.
    pub fn published_of<M: Message>(&self) -> Vec<M> {
        self.published
            .iter()
            .filter_map(Published::decode)
            .collect()
    }

    /// Rows dead-lettered on all watched services (0 when everything succeeded).
    pub fn dead_lettered(&self) -> u64 {
        self.services.iter().map(|s| s.status.dead_lettered).sum()
    }

    /// The state of the watched service named `service`.
    pub fn service(&self, service: &str) -> Option<&CorrelationStatus> {
        self.services
            .iter()
            .find(|s| s.service == service)
            .map(|s| &s.status)
    }
}

/// Why a tracked dispatch failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The dispatch itself failed.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// Work was still pending when the deadline passed; `last` is what was seen last.
    #[error(
        "request {correlation_id} not settled within {deadline:?}: {published} published, last \
         seen {last:?}"
    )]
    NotSettled {
        /// The request.
        correlation_id: Uuid,
        /// The deadline that passed.
        deadline: Duration,
        /// Messages published for it so far.
        published: usize,
        /// Each watched service's last state.
        last: Vec<ServiceStatus>,
    },
}

/// Waits until what a request caused has settled on every watched runtime.
pub struct Tracker<'a> {
    transport: Arc<RecordingTransport>,
    services: Vec<&'a Runtime>,
    deadline: Duration,
}

impl<'a> Tracker<'a> {
    /// A tracker over the runtimes that publish through `transport`; add each with
    /// [`Tracker::service`]. The deadline is 10 s unless set.
    pub fn new(transport: &Arc<RecordingTransport>) -> Tracker<'a> {
        Tracker {
            transport: transport.clone(),
            services: Vec::new(),
            deadline: Duration::from_secs(10),
        }
    }

    /// Watches `runtime` too (the sending service, and any in-process receiving service).
    pub fn service(mut self, runtime: &'a Runtime) -> Tracker<'a> {
        self.services.push(runtime);
        self
    }

    /// How long [`Tracker::settle`] waits at most.
    pub fn deadline(mut self, deadline: Duration) -> Tracker<'a> {
        self.deadline = deadline;
        self
    }

    /// `local_invoke` on `origin`, then waits until everything it caused settled.
    pub async fn invoke<C: Command, R: Send + 'static>(
        &self,
        origin: &Runtime,
        command: C,
    ) -> Result<(R, Settled), TrackError> {
        let correlation_id = Uuid::now_v7();
        let options = DispatchOptions {
            correlation_id: Some(correlation_id),
            ..DispatchOptions::default()
        };
        let result = origin
            .dispatcher()
            .send(LocalInvoke::<C, R>::new(command).with_options(options))
            .await
            .map_err(DispatchError::from)??;
        Ok((result, self.settle(correlation_id).await?))
    }

    /// `send` on `origin`, then waits until everything it caused settled.
    pub async fn send<C: Command>(
        &self,
        origin: &Runtime,
        command: C,
    ) -> Result<(DeliveryReceipt, Settled), TrackError> {
        let receipt = origin
            .dispatcher()
            .send(SendCommand::new(command))
            .await
            .map_err(DispatchError::from)??;
        let settled = self.settle(receipt.correlation_id).await?;
        Ok((receipt, settled))
    }

    /// Waits until the request `correlation_id`, whose dispatch has returned, has settled on
    /// every watched runtime (see the module's docs), at most the deadline. A request that left
    /// nothing behind (no event, no message) is settled at once.
    pub async fn settle(&self, correlation_id: Uuid) -> Result<Settled, TrackError> {
        self.wait(correlation_id, false).await
    }

    /// Like [`Tracker::settle`], for a request whose dispatch has not answered (an HTTP 504: it
    /// may still commit): waits until a watched runtime knows of it, then until it settled.
    pub async fn settle_eventually(&self, correlation_id: Uuid) -> Result<Settled, TrackError> {
        self.wait(correlation_id, true).await
    }

    async fn wait(&self, correlation_id: Uuid, must_be_known: bool) -> Result<Settled, TrackError> {
        let started = Instant::now();
        let mut changed = self.transport.changed.subscribe();
        loop {
            let published = self.transport.published_for(correlation_id);
            let mut services = Vec::with_capacity(self.services.len());
            for runtime in &self.services {
                services.push(ServiceStatus {
                    service: runtime.config().service.name.clone(),
                    status: runtime.status(correlation_id).await?,
                });
            }
            let known = services
                .iter()
                .any(|s| s.status != CorrelationStatus::default());
            if (known || !must_be_known) && self.settled(&published, &services) {
                return Ok(Settled {
                    correlation_id,
                    services,
                    published,
                });
            }
            let left = self.deadline.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(TrackError::NotSettled {
                    correlation_id,
                    deadline: self.deadline,
                    published: published.len(),
                    last: services,
                });
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(left.min(RECHECK)) => {}
            }
        }
    }

    fn settled(&self, published: &[Published], services: &[ServiceStatus]) -> bool {
        self.services.iter().zip(services).all(|(runtime, seen)| {
            let s = &seen.status;
            if s.outbox_pending > 0 || s.inbox_pending > 0 {
                return false;
            }
            // Every message published to a topic it subscribes to has reached its inbox and
            // been processed (or dead-lettered).
            let subscribed = &runtime.config().routing.subscriptions;
            let expected = published
                .iter()
                .filter(|p| subscribed.iter().any(|sub| sub.topic == p.topic))
                .count() as u64;
            s.inbox_processed + s.dead_lettered >= expected
        })
    }
}
