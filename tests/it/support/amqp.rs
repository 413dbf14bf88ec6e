//! Helpers of the AMQP integration tests: the broker under test (RabbitMQ with AMQP 1.0 on
//! `WHIZBANG_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672`), per-test topology
//! declared with `scripts/amqp-topology.sh` (and deleted afterwards), and queue depths read
//! with `rabbitmqctl`. A broker that cannot be reached fails the test.
//!
//! Tests share the broker; each declares topics of its own (`super::unique`). Nothing here may
//! stop or restart the broker.

use super::DEADLINE;
use std::path::Path;
use std::process::Command as Process;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use whizbang::Config;
use whizbang::config::{TransportConfig, TransportKind};
use whizbang::transport::amqp::AmqpTransport;

pub fn amqp_url() -> String {
    std::env::var("WHIZBANG_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// `[transport]` for the broker under test.
pub fn amqp_transport_config() -> TransportConfig {
    let mut t = Config::default().transport;
    t.kind = TransportKind::Amqp;
    t.amqp_url = amqp_url().into();
    t.amqp.reconnect_backoff_max_ms = 1_000;
    t
}

/// A configuration for `service` on the broker under test (memory store).
pub fn amqp_config(service: &str) -> Config {
    let mut c = super::config(service);
    c.transport = amqp_transport_config();
    c
}

/// The AMQP transport on the broker under test.
pub fn amqp_transport() -> Arc<AmqpTransport> {
    Arc::new(AmqpTransport::from_config(&amqp_transport_config(), "whizbang-test").unwrap())
}

/// Held by a test while it uses the broker. Tests share it; a test that restarts the broker
/// (the chaos tool's) takes it alone, so that stopping the broker never disturbs a test of
/// another `cargo test` process on the same machine (a lock file in the temp directory, the
/// same file for every program that uses it).
pub struct BrokerLease {
    _lock: std::fs::File,
}

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
    Ok(BrokerLease { _lock: file })
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
