//! Scenario `broker-restart`: the broker goes away mid-run (`rabbitmqctl stop_app`, then
//! `start_app`) while an order-side runtime keeps producing events (30 streams × 40, one event
//! per stream every 200 ms) and an inventory-side runtime consumes them over AMQP 1.0 (both in
//! this process, each on the in-memory store). Nothing is lost and nothing is applied twice:
//! sends whose outcome was lost are published again (the inbox drops the copies), unsettled
//! deliveries come back (the inbox drops those already stored), per-stream order holds, and
//! both sides really saw the outage (the publisher's and the subscription's warnings).
//!
//! It stops the shared broker, so it runs in the chaos run (`scripts/chaos.sh`), never beside
//! the parallel test suite; it also takes the broker lock file the AMQP tests share
//! (`$TMPDIR/whizbang-amqp-broker.lock`) alone, so a test run on the same machine is not
//! disturbed. A guard starts the broker again however the scenario ends.

use crate::servers::{BrokerGuard, Servers};
use crate::{ChaosResult, Scenario};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::{SubscriptionConfig, TransportKind};
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};
use whizbang_tools_common::amqp_topology;

/// How long any condition may take.
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(5);

#[derive(Args, Debug, Clone)]
pub struct BrokerRestartArgs {
    /// The broker (default: $WHIZBANG_AMQP_URL, else amqp://guest:guest@127.0.0.1:5672). Its
    /// local node is the one stopped and started with rabbitmqctl.
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Streams producing at once.
    #[arg(long, default_value_t = 30)]
    pub streams: usize,
    /// Events per stream.
    #[arg(long, default_value_t = 40)]
    pub events: u32,
    /// Milliseconds between two events of one stream (the run spans the outage).
    #[arg(long, default_value_t = 200)]
    pub pace_ms: u64,
    /// Also print the runtime's log (it is captured either way, to check the outage was seen).
    #[arg(long)]
    pub show_logs: bool,
}

// ---- messages -----------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Bump {
    stream: String,
    seq: u32,
}

impl Message for Bump {
    const TYPE_NAME: &'static str = "restart.Bump";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Bump {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Bumped {
    stream: String,
    seq: u32,
}

impl Message for Bumped {
    const TYPE_NAME: &'static str = "restart.Bumped";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Bumped {}

struct BumpReceptor;

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

#[derive(Default)]
struct RecorderState {
    by_stream: HashMap<String, Vec<(u32, Uuid)>>,
    total: usize,
}

/// Records every `Bumped` it applies, per stream, in application order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<RecorderState>>);

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn total(&self) -> usize {
        self.lock().total
    }

    fn seqs(&self, stream: &str) -> Vec<u32> {
        self.lock()
            .by_stream
            .get(stream)
            .map(|v| v.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default()
    }

    /// Message ids applied more than once.
    fn duplicates(&self) -> usize {
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for (_, id) in self.lock().by_stream.values().flatten() {
            *counts.entry(*id).or_default() += 1;
        }
        counts.values().filter(|n| **n > 1).count()
    }
}

impl Perspective<Bumped> for Recorder {
    async fn apply(&self, event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut st = self.lock();
        st.total += 1;
        st.by_stream
            .entry(meta.stream_id.clone())
            .or_default()
            .push((event.seq, meta.message_id));
        Ok(())
    }
}

// ---- the broker, the topology, the log --------------------------------------------------------

/// The broker lock the AMQP tests share, held alone while the broker is stopped.
fn lock_broker_alone() -> ChaosResult<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("whizbang-amqp-broker.lock"))?;
    file.lock()?;
    Ok(file)
}

/// Fails when the broker does not speak AMQP 1.0 within [`DEADLINE`].
async fn check_broker(url: &str) -> ChaosResult<()> {
    let start = Instant::now();
    loop {
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            fe2o3_amqp::Connection::open("whizbang-chaos-probe", url),
        )
        .await;
        match connected {
            Ok(Ok(mut c)) => {
                let _ = c.close().await;
                return Ok(());
            }
            Ok(Err(e)) if start.elapsed() > DEADLINE => {
                return Err(format!("the AMQP 1.0 broker is unreachable: {e}").into());
            }
            Err(_) if start.elapsed() > DEADLINE => {
                return Err("the AMQP 1.0 broker does not answer".into());
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The run's topic and subscription, deleted when dropped.
struct Topology(Vec<String>);

impl Topology {
    fn declare(spec: String) -> ChaosResult<Topology> {
        amqp_topology::topology(std::slice::from_ref(&spec), false)?;
        Ok(Topology(vec![spec]))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = amqp_topology::topology(&self.0, true) {
            eprintln!("could not delete the topology {:?}: {e}", self.0);
        }
    }
}

/// Installs the process's log subscriber writing into a buffer (and to stderr when `show`),
/// for the check that both sides saw the outage.
pub fn capture_logs(show: bool) -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone(), show))
            .try_init();
        buffer
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>, bool);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        if self.1 {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(logs: &Arc<Mutex<Vec<u8>>>, needle: &str) -> usize {
    String::from_utf8_lossy(&logs.lock().unwrap_or_else(|p| p.into_inner()))
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> ChaosResult<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > DEADLINE {
            return Err(format!("timed out after {DEADLINE:?} waiting for {what}").into());
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

fn amqp_config(service: &str, url: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c.transport.kind = TransportKind::Amqp;
    c.transport.amqp_url = url.into();
    c.transport.amqp.reconnect_backoff_max_ms = 1_000;
    c
}

// ---- the scenario -------------------------------------------------------------------------

pub async fn run(
    args: BrokerRestartArgs,
    logs: Arc<Mutex<Vec<u8>>>,
    scenario: &mut Scenario,
) -> ChaosResult<()> {
    let url = args.amqp_url.clone().unwrap_or_else(|| {
        std::env::var("WHIZBANG_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
    });
    let servers = Servers::find(true, false, "")?;
    let _lock = tokio::task::spawn_blocking(lock_broker_alone).await??;
    check_broker(&url).await?;
    let topic = format!(
        "chaos-broker-{}",
        &Uuid::now_v7().simple().to_string()[16..]
    );
    let _topology = Topology::declare(format!("{topic}:inventory"))?;
    let recorder = Recorder::default();
    let mut inventory = amqp_config("inventory-service", &url);
    inventory.routing.subscriptions.push(SubscriptionConfig {
        topic: topic.clone(),
        name: "inventory".into(),
    });
    let inventory = Runtime::builder(inventory)
        .perspective::<Bumped, _>("inventory", recorder.clone())
        .start()
        .await?;
    let mut orders = amqp_config("order-service", &url);
    orders
        .routing
        .topics
        .insert(Bumped::TYPE_NAME.into(), topic.clone());
    let orders = Arc::new(
        Runtime::builder(orders)
            .receptor::<Bump, _>(BumpReceptor)
            .start()
            .await?,
    );

    let run = Uuid::now_v7().simple().to_string();
    let streams: Vec<String> = (0..args.streams)
        .map(|i| format!("order-{run}-{i}"))
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = streams
        .iter()
        .cloned()
        .map(|stream| {
            let (orders, sent) = (orders.clone(), sent.clone());
            let (events, pace) = (args.events, Duration::from_millis(args.pace_ms));
            actix::spawn(async move {
                let mut pace = tokio::time::interval(pace);
                for seq in 1..=events {
                    pace.tick().await;
                    orders
                        .send(Bump {
                            stream: stream.clone(),
                            seq,
                        })
                        .await
                        .map_err(|e| format!("{stream} seq {seq}: send failed: {e}"))?;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let total = args.streams * args.events as usize;

    let mut broker = BrokerGuard::new(servers);
    wait_until("a quarter of the events to be applied", || {
        recorder.total() >= total / 4
    })
    .await?;
    let stop_started = Instant::now();
    let sent_before = sent.load(Ordering::Relaxed);
    broker.stop().await?;
    // Production goes on into the store while the broker is down.
    wait_until("more events to be sent during the outage", || {
        sent.load(Ordering::Relaxed) >= sent_before + args.streams * 3
    })
    .await?;
    let applied_during = recorder.total();
    broker.start().await?;
    let outage = stop_started.elapsed();

    for p in producers {
        p.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while recorder.total() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    scenario.check(
        recorder.total() >= total,
        format!(
            "all {total} events applied within 120 s of the broker's return (applied {})",
            recorder.total()
        ),
    );
    // Nothing applied twice shows within a bounded time after the last application.
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(500) && recorder.total() <= total {
        tokio::time::sleep(POLL).await;
    }
    let out_of_order = streams
        .iter()
        .filter(|s| recorder.seqs(s) != (1..=args.events).collect::<Vec<_>>())
        .count();
    let publish_failures = log_lines_with(&logs, "publish failed");
    let consumer_losses = log_lines_with(&logs, "subscription lost")
        + log_lines_with(&logs, "cannot open subscription");
    scenario.figure("events", total);
    scenario.figure("outage_s", format!("{:.1}", outage.as_secs_f64()));
    scenario.figure("applied_before_restart", applied_during);
    scenario.figure("publish_failures_logged", publish_failures);
    scenario.figure("subscription_losses_logged", consumer_losses);
    scenario.bound(
        "applied_beyond_events",
        recorder.total().saturating_sub(total),
        0,
    );
    scenario.bound("duplicates", recorder.duplicates(), 0);
    scenario.bound("streams_out_of_order_or_incomplete", out_of_order, 0);
    scenario.check(
        publish_failures > 0 && consumer_losses > 0,
        "the outage was seen by both sides (publish failures and subscription losses logged)",
    );
    drop(broker);
    match Arc::try_unwrap(orders) {
        Ok(orders) => orders.shutdown().await?,
        Err(_) => return Err("a producer still holds the runtime".into()),
    }
    inventory.shutdown().await?;
    Ok(())
}
