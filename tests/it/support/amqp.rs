//! Helpers of the AMQP integration tests: the broker under test (RabbitMQ with AMQP 1.0 on
//! `WHIZBANG_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672`), per-test topology
//! declared with `scripts/amqp-topology.sh` (and deleted afterwards), message types, a recording
//! perspective and deadline-bound waits. A broker that cannot be reached fails the test.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::process::Command as Process;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::{SubscriptionConfig, TransportConfig, TransportKind};
use whizbang::envelope::MessageKind;
use whizbang::transport::amqp::AmqpTransport;
use whizbang::{
    Command, Config, Decision, Envelope, Event, EventMeta, Message, Perspective, PerspectiveError,
    Receptor, ReceptorContext, ReceptorError,
};

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(5);

pub fn amqp_url() -> String {
    std::env::var("WHIZBANG_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

pub fn database_url() -> String {
    std::env::var("WHIZBANG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Polls `done` until it holds; fails after [`DEADLINE`] naming `what`.
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

/// Like [`wait_until`] with an async condition.
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

/// `[transport]` for the broker under test.
pub fn amqp_transport_config() -> TransportConfig {
    let mut t = Config::default().transport;
    t.kind = TransportKind::Amqp;
    t.amqp_url = amqp_url();
    t.amqp.reconnect_backoff_max_ms = 1_000;
    t
}

/// A configuration for `service` on the broker under test (memory store).
pub fn amqp_config(service: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c.transport = amqp_transport_config();
    c
}

pub fn publishing(mut c: Config, message_type: &str, topic: &str) -> Config {
    c.routing.topics.insert(message_type.into(), topic.into());
    c
}

pub fn subscribed(mut c: Config, topic: &str, subscription: &str) -> Config {
    c.routing.subscriptions.push(SubscriptionConfig {
        topic: topic.into(),
        name: subscription.into(),
    });
    c
}

/// The AMQP transport on the broker under test.
pub fn amqp_transport() -> Arc<AmqpTransport> {
    Arc::new(AmqpTransport::from_config(&amqp_transport_config(), "whizbang-test").unwrap())
}

/// Held by a test while it uses the broker. Tests share it; the broker-restart test takes it
/// alone, so that stopping the broker never disturbs a test in another test binary or another
/// `cargo test` process on the same machine (a lock file in the temp directory).
pub struct BrokerLease(std::fs::File);

fn broker_lock_file() -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("whizbang-amqp-broker.lock"))?)
}

/// Fails (never skips) when the broker does not speak AMQP 1.0 within the deadline; returns the
/// shared lease to hold for the rest of the test.
pub async fn require_broker() -> anyhow::Result<BrokerLease> {
    let file = broker_lock_file()?;
    let file = tokio::task::spawn_blocking(move || file.lock_shared().map(|()| file)).await??;
    check_broker().await?;
    Ok(BrokerLease(file))
}

/// Like [`require_broker`], alone: waits until no other test uses the broker.
pub async fn require_broker_alone() -> anyhow::Result<BrokerLease> {
    let file = broker_lock_file()?;
    let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file)).await??;
    check_broker().await?;
    Ok(BrokerLease(file))
}

async fn check_broker() -> anyhow::Result<()> {
    static READY: OnceLock<()> = OnceLock::new();
    if READY.get().is_some() {
        return Ok(());
    }
    let start = Instant::now();
    loop {
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            fe2o3_amqp::Connection::open("whizbang-probe", amqp_url().as_str()),
        )
        .await;
        match connected {
            Ok(Ok(mut c)) => {
                let _ = c.close().await;
                let _ = READY.set(());
                return Ok(());
            }
            Ok(Err(e)) if start.elapsed() > DEADLINE => anyhow::bail!(
                "the AMQP 1.0 broker at {} is unreachable: {e}. Start RabbitMQ with the rabbitmq_amqp1_0 plugin (scripts/test.sh does)",
                amqp_url()
            ),
            Err(_) if start.elapsed() > DEADLINE => {
                anyhow::bail!("the AMQP 1.0 broker at {} does not answer", amqp_url())
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Topics and subscriptions declared for one test, deleted when dropped.
pub struct Topology {
    specs: Vec<String>,
}

impl Topology {
    /// Declares `topic → subscriptions` on the broker (names are used as given: make them
    /// unique with [`unique`]).
    pub fn declare(topics: &[(&str, &[&str])]) -> anyhow::Result<Topology> {
        let specs: Vec<String> = topics
            .iter()
            .map(|(topic, subs)| format!("{topic}:{}", subs.join(",")))
            .collect();
        run_script(&specs, false)?;
        Ok(Topology { specs })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = run_script(&self.specs, true) {
            eprintln!("could not delete test topology {:?}: {e}", self.specs);
        }
    }
}

fn run_script(specs: &[String], delete: bool) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/amqp-topology.sh");
    let mut cmd = Process::new("bash");
    cmd.arg(script);
    if delete {
        cmd.arg("--delete");
    }
    let out = cmd.args(specs).output()?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/amqp-topology.sh {}{} failed: {}{}",
        if delete { "--delete " } else { "" },
        specs.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A name unique to this test run (letters, digits and '-': valid in every address form).
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bumped {
    pub stream: String,
    pub seq: u32,
}

impl Message for Bumped {
    const TYPE_NAME: &'static str = "test.Bumped";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Bumped {}

pub struct BumpReceptor;

impl Receptor<Bump> for BumpReceptor {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Bump,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        Ok(Decision::event(Bumped {
            stream: cmd.stream,
            seq: cmd.seq,
        }))
    }
}

/// An event envelope of `Bumped`.
pub fn bumped_envelope(stream: &str, seq: u32) -> Envelope {
    let event = Bumped {
        stream: stream.into(),
        seq,
    };
    Envelope::new(
        MessageKind::Event,
        Bumped::TYPE_NAME,
        event.stream_id(),
        whizbang::message::encode(&event).expect("encodes"),
    )
}

// ---- A recording perspective ------------------------------------------------------------

#[derive(Default)]
struct RecorderState {
    by_stream: HashMap<String, Vec<(u32, Uuid)>>,
    total: usize,
}

/// Records every `Bumped` it applies, per stream, in application order.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<RecorderState>>);

impl Recorder {
    pub fn total(&self) -> usize {
        self.0.lock().unwrap().total
    }

    pub fn seqs(&self, stream: &str) -> Vec<u32> {
        self.0
            .lock()
            .unwrap()
            .by_stream
            .get(stream)
            .map(|v| v.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default()
    }

    pub fn streams(&self) -> Vec<String> {
        self.0.lock().unwrap().by_stream.keys().cloned().collect()
    }

    /// How many times each message id was applied, for ids applied more than once.
    pub fn duplicates(&self) -> Vec<(Uuid, usize)> {
        let st = self.0.lock().unwrap();
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for (_, id) in st.by_stream.values().flatten() {
            *counts.entry(*id).or_default() += 1;
        }
        counts.into_iter().filter(|(_, n)| *n > 1).collect()
    }
}

impl Perspective<Bumped> for Recorder {
    async fn apply(&self, event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut st = self.0.lock().unwrap();
        st.total += 1;
        st.by_stream
            .entry(meta.stream_id.clone())
            .or_default()
            .push((event.seq, meta.message_id));
        Ok(())
    }
}

// ---- Broker inspection ------------------------------------------------------------------

/// Runs `rabbitmqctl ARGS` (as root, or through sudo) and returns its standard output.
pub fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let is_root = Process::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if is_root {
        Process::new("rabbitmqctl")
    } else {
        let mut c = Process::new("sudo");
        c.arg("rabbitmqctl");
        c
    };
    let out = cmd.args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Messages in `queue` (ready + unacknowledged), or `None` when it does not exist.
pub fn queue_depth(queue: &str) -> anyhow::Result<Option<u64>> {
    let listing = rabbitmqctl(&[
        "list_queues",
        "--quiet",
        "--no-table-headers",
        "name",
        "messages",
    ])?;
    Ok(listing.lines().find_map(|line| {
        let mut cols = line.split('\t');
        (cols.next() == Some(queue)).then(|| cols.next()?.trim().parse().ok())?
    }))
}

// ---- Log capture ------------------------------------------------------------------------

/// Everything the runtime logged (at warn and above, plus `RUST_LOG`), for assertions on the
/// reasons it gives. Installed once per test binary.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("WHIZBANG_TEST_SHOW_LOGS").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log lines that contain `needle`.
pub fn log_lines_with(logs: &Arc<Mutex<Vec<u8>>>, needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
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
