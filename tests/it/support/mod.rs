//! What the integration tests share, defined once: deadline-bound waits, unique names, the
//! `Bump`/`Bumped` messages with a recording perspective, runtime configurations on the
//! in-memory bus, and (in the submodules) the Postgres, AMQP broker, TLS and log-capture
//! helpers. Nothing here skips a case: a server that cannot be reached fails the test that needs
//! it. Nothing here may hold state that ties one test to another, except what is named as
//! shared (the log capture, the broker lease).

pub mod amqp;
mod hooked;
mod logs;
pub mod pg;
pub mod proxy;
pub mod scrape;
pub mod tls;

pub use hooked::{BatchHook, HookedStore};
pub use logs::{captured_logs, log_lines_with};

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

/// How long any condition may take before a test fails: a bound on a hang, not a latency
/// assertion (a test that asserts speed names its own bound). Generous, because every case of
/// the crate shares one process, the servers and the machine's cores with the others.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Poll period of [`wait_until`] / [`wait_for`].
pub const POLL: Duration = Duration::from_millis(5);

/// Polls `done` every few ms until it holds; fails after [`DEADLINE`] naming `what`.
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

/// Waits until `message_id` is dead-lettered in `store`; fails after [`DEADLINE`].
pub async fn wait_dead_lettered(
    store: &Arc<dyn whizbang::store::Store>,
    message_id: Uuid,
) -> anyhow::Result<()> {
    wait_for(&format!("{message_id} to be dead-lettered"), || {
        let store = store.clone();
        async move {
            store
                .dead_letters()
                .await
                .is_ok_and(|d| d.iter().any(|d| d.message_id == message_id))
        }
    })
    .await
}

/// Checks that `ok` keeps holding for `window` (polled): how a test shows that something does
/// not happen (a duplicate, a redelivery) within a bounded time.
pub async fn holds_for(
    what: &str,
    window: Duration,
    mut ok: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < window {
        anyhow::ensure!(ok(), "{what} stopped holding after {:?}", start.elapsed());
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// A name unique to this test run (letters, digits and '-': valid in every address form, and
/// short enough for broker entity names): the random half of a UUIDv7.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::now_v7().simple().to_string()[16..])
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

    /// How many times each message id was applied, for ids applied more than once.
    pub fn duplicates(&self) -> Vec<(Uuid, usize)> {
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for seen in self.0.lock().unwrap().by_stream.values().flatten() {
            *counts.entry(seen.meta.message_id).or_default() += 1;
        }
        counts.into_iter().filter(|(_, n)| *n > 1).collect()
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

/// The default configuration with a service name. `WHIZBANG_TEST_WORKER_THREADS` sets
/// `runtime.worker_threads` (default: one per core), so `scripts/test.sh` runs the ordering,
/// read-your-writes, failure and contract tests again on a single worker thread.
pub fn config(service: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    if let Ok(threads) = std::env::var("WHIZBANG_TEST_WORKER_THREADS") {
        c.runtime.worker_threads = threads
            .parse()
            .expect("WHIZBANG_TEST_WORKER_THREADS is a number of threads");
    }
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
