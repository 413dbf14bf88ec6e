//! Shared message types, handlers and helpers of the integration tests (in-memory store and
//! in-memory transport, no servers).

#![allow(dead_code)]

pub mod amqp;
pub mod tls;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::SubscriptionConfig;
use whizbang::envelope::MessageKind;
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::{
    Command, Config, Decision, Envelope, Event, EventMeta, Message, Perspective, PerspectiveError,
    Receptor, ReceptorContext, ReceptorError, Runtime, RuntimeBuilder,
};

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Poll period of [`wait_until`] / [`wait_for`].
pub const POLL: Duration = Duration::from_millis(5);

/// Polls `done` every few ms until it holds; fails after [`DEADLINE`] with `what` and the last
/// `describe()`.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > DEADLINE {
            anyhow::bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Like [`wait_until`], with an async condition (store reads).
pub async fn wait_for<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        if start.elapsed() > DEADLINE {
            anyhow::bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

// ---- Messages ---------------------------------------------------------------------------

/// A command that asks for one `Bumped` event on `stream` carrying `seq`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bump {
    pub stream: String,
    pub seq: u32,
}

impl Message for Bump {
    const TYPE_NAME: &'static str = "test.Bump";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Bump {}

/// The event of a [`Bump`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bumped {
    pub stream: String,
    pub seq: u32,
    /// Padding (for size limits); empty normally.
    #[serde(default)]
    pub pad: String,
}

impl Bumped {
    pub fn new(stream: impl Into<String>, seq: u32) -> Bumped {
        Bumped {
            stream: stream.into(),
            seq,
            pad: String::new(),
        }
    }
}

impl Message for Bumped {
    const TYPE_NAME: &'static str = "test.Bumped";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Bumped {}

/// Events that carry a sequence number the recorders can log.
pub trait Seq {
    fn seq(&self) -> u32;
}

impl Seq for Bumped {
    fn seq(&self) -> u32 {
        self.seq
    }
}

/// `Bump` → `Bumped` (also the result).
pub struct BumpReceptor;

impl Receptor<Bump> for BumpReceptor {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Bump,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        Ok(Decision::event(Bumped::new(cmd.stream, cmd.seq)))
    }
}

// ---- A recording perspective ------------------------------------------------------------

/// One event as a perspective saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub seq: u32,
    pub meta: EventMeta,
}

#[derive(Default)]
struct RecorderState {
    by_stream: HashMap<String, Vec<Seen>>,
    total: usize,
}

/// A perspective that records every event it applies, per stream, in application order.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<RecorderState>>);

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    pub fn total(&self) -> usize {
        self.0.lock().unwrap().total
    }

    pub fn stream(&self, stream: &str) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .by_stream
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }

    pub fn seqs(&self, stream: &str) -> Vec<u32> {
        self.stream(stream).iter().map(|s| s.seq).collect()
    }

    pub fn ids(&self, stream: &str) -> Vec<Uuid> {
        self.stream(stream)
            .iter()
            .map(|s| s.meta.message_id)
            .collect()
    }

    pub fn count_of(&self, message_id: Uuid) -> usize {
        self.0
            .lock()
            .unwrap()
            .by_stream
            .values()
            .flatten()
            .filter(|s| s.meta.message_id == message_id)
            .count()
    }

    pub fn streams(&self) -> Vec<String> {
        self.0.lock().unwrap().by_stream.keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Seen> {
        self.0
            .lock()
            .unwrap()
            .by_stream
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    fn record(&self, seq: u32, meta: EventMeta) {
        let mut st = self.0.lock().unwrap();
        st.total += 1;
        st.by_stream
            .entry(meta.stream_id.clone())
            .or_default()
            .push(Seen { seq, meta });
    }
}

impl<E: Event + Seq> Perspective<E> for Recorder {
    async fn apply(&self, event: E, meta: EventMeta) -> Result<(), PerspectiveError> {
        self.record(event.seq(), meta);
        Ok(())
    }
}

// ---- Runtimes ---------------------------------------------------------------------------

/// The default configuration with a service name.
pub fn config(service: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c
}

/// `config` that publishes `message_type` to `topic`.
pub fn publishing(mut c: Config, message_type: &str, topic: &str) -> Config {
    c.routing.topics.insert(message_type.into(), topic.into());
    c
}

/// `config` that consumes `topic` under `subscription`.
pub fn subscribed(mut c: Config, topic: &str, subscription: &str) -> Config {
    c.routing.subscriptions.push(SubscriptionConfig {
        topic: topic.into(),
        name: subscription.into(),
    });
    c
}

/// A builder on the given bus.
pub fn on_bus(config: Config, bus: &Arc<MemoryBus>) -> RuntimeBuilder {
    Runtime::builder(config).transport(Arc::new(MemoryTransport::new(bus.clone())))
}

/// An event envelope for `MemoryBus::inject`.
pub fn event_envelope<E: Event>(event: &E) -> Envelope {
    Envelope::new(
        MessageKind::Event,
        E::TYPE_NAME,
        event.stream_id(),
        whizbang::message::encode(event).expect("encodes"),
    )
}

/// A command envelope for `MemoryBus::inject`.
pub fn command_envelope<C: Command>(command: &C) -> Envelope {
    Envelope::new(
        MessageKind::Command,
        C::TYPE_NAME,
        command.stream_id(),
        whizbang::message::encode(command).expect("encodes"),
    )
}

/// A stream name unique to this test run.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::now_v7().simple())
}

// ---- A memory store with a hook on the work batch ----------------------------------------

/// Decides how a [`HookedStore`] runs each work batch (delay it, lose its answer, …); every
/// other call goes straight to the memory store.
#[async_trait::async_trait]
pub trait BatchHook: Send + Sync + 'static {
    async fn process(
        &self,
        inner: &whizbang::store::memory::MemoryStore,
        instance: Uuid,
        batch: whizbang::store::WorkBatch,
    ) -> Result<whizbang::store::WorkBatchResult, whizbang::store::StoreError>;
}

/// A memory store whose work batches go through `hook`: a stand-in for a database whose
/// replies are slow or lost.
pub struct HookedStore<H> {
    pub inner: whizbang::store::memory::MemoryStore,
    pub hook: H,
}

impl<H: BatchHook> HookedStore<H> {
    pub fn new(config: &Config, hook: H) -> HookedStore<H> {
        HookedStore {
            inner: whizbang::store::memory::MemoryStore::new(
                whizbang::store::StoreSettings::from_config(config),
            ),
            hook,
        }
    }
}

#[async_trait::async_trait]
impl<H: BatchHook> whizbang::store::Store for HookedStore<H> {
    async fn register_instance(
        &self,
        instance: Uuid,
        service: &str,
        host: &str,
    ) -> Result<(), whizbang::store::StoreError> {
        self.inner.register_instance(instance, service, host).await
    }
    async fn heartbeat(
        &self,
        instance: Uuid,
    ) -> Result<whizbang::store::Heartbeat, whizbang::store::StoreError> {
        self.inner.heartbeat(instance).await
    }
    async fn process_work_batch(
        &self,
        instance: Uuid,
        batch: whizbang::store::WorkBatch,
    ) -> Result<whizbang::store::WorkBatchResult, whizbang::store::StoreError> {
        self.hook.process(&self.inner, instance, batch).await
    }
    async fn release_partitions(
        &self,
        instance: Uuid,
        partitions: Option<&[u32]>,
    ) -> Result<(), whizbang::store::StoreError> {
        self.inner.release_partitions(instance, partitions).await
    }
    async fn read_stream(
        &self,
        stream_id: &str,
        from: u64,
    ) -> Result<Vec<whizbang::store::StoredEvent>, whizbang::store::StoreError> {
        self.inner.read_stream(stream_id, from).await
    }
    async fn read_all(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<whizbang::store::StoredEvent>, whizbang::store::StoreError> {
        self.inner.read_all(after, limit).await
    }
    async fn inbox_processed(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<Uuid>, whizbang::store::StoreError> {
        self.inner.inbox_processed(ids).await
    }
    async fn correlation_status(
        &self,
        id: Uuid,
    ) -> Result<whizbang::store::CorrelationStatus, whizbang::store::StoreError> {
        self.inner.correlation_status(id).await
    }
    async fn dead_letters(
        &self,
    ) -> Result<Vec<whizbang::store::DeadLetter>, whizbang::store::StoreError> {
        self.inner.dead_letters().await
    }
    async fn requeue_dead_letter(&self, id: Uuid) -> Result<(), whizbang::store::StoreError> {
        self.inner.requeue_dead_letter(id).await
    }
    async fn skip_dead_letter(&self, id: Uuid) -> Result<(), whizbang::store::StoreError> {
        self.inner.skip_dead_letter(id).await
    }
    async fn load_checkpoint(
        &self,
        perspective: &str,
    ) -> Result<Option<u64>, whizbang::store::StoreError> {
        self.inner.load_checkpoint(perspective).await
    }
    async fn save_checkpoint(
        &self,
        perspective: &str,
        position: u64,
    ) -> Result<(), whizbang::store::StoreError> {
        self.inner.save_checkpoint(perspective, position).await
    }
    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.work_signal()
    }
}
