//! The Postgres server restarted under load: while sends flow, the server is restarted
//! (`pg_ctlcluster <version> main restart`); afterwards every event that was stored is applied
//! exactly once, in order, here and downstream, and every send that succeeded has its event
//! stored exactly once.
//!
//! Its own test binary, so no other test of this crate runs against the server while it
//! restarts. It needs `pg_ctlcluster` (Debian's postgresql-common) and the right to run it (root
//! on our machines); without them it fails with a message saying so. Whatever happens, the
//! server is running again when the test ends (a guard waits for it, and starts it if needed).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command as Process;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use whizbang::config::{StoreBackend, SubscriptionConfig};
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

const TOPIC: &str = "restart-bumps";
const DEADLINE: Duration = Duration::from_secs(90);

fn database_url() -> String {
    std::env::var("WHIZBANG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn new_schema() -> String {
    format!("t_{}", Uuid::now_v7().simple())
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn connect() -> Client {
    let url = database_url();
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&url, NoTls),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out connecting to the test database {url}"))
    .unwrap_or_else(|e| {
        panic!("cannot reach the test database {url} (set WHIZBANG_TEST_DATABASE_URL): {e}")
    });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

// ---- the server ---------------------------------------------------------------------------

/// The local cluster `pg_ctlcluster` manages: `/etc/postgresql/<version>/main`.
struct Cluster {
    version: String,
}

impl Cluster {
    fn find() -> Cluster {
        let ctl = ["/usr/bin/pg_ctlcluster", "/usr/sbin/pg_ctlcluster"]
            .iter()
            .any(|p| PathBuf::from(p).exists());
        assert!(
            ctl,
            "pg_ctlcluster not found: this test restarts the local Postgres server with \
             Debian's postgresql-common tools (apt-get install postgresql)"
        );
        let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
            .unwrap_or_else(|e| {
                panic!("/etc/postgresql unreadable ({e}): no local cluster to restart")
            })
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().join("main").is_dir())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        versions.sort();
        let version = versions
            .pop()
            .expect("no /etc/postgresql/<version>/main cluster to restart");
        Cluster { version }
    }

    fn ctl(&self, action: &str) -> Result<(), String> {
        let out = Process::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, "main", action])
            .output()
            .map_err(|e| format!("cannot run pg_ctlcluster: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctlcluster {} main {action} failed ({}): {}{}",
                self.version,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn is_ready() -> bool {
        Process::new("pg_isready")
            .args(["-h", "127.0.0.1", "-p", "5432", "-t", "1"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Waits up to `limit` for the server to accept connections.
    fn wait_ready(limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if Cluster::is_ready() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

/// Leaves the server running, whatever the test did.
struct ServerGuard(Cluster);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if Cluster::wait_ready(Duration::from_secs(30)) {
            return;
        }
        eprintln!("the server is not up after the test: starting it");
        if let Err(e) = self.0.ctl("start") {
            eprintln!("{e}");
        }
        if !Cluster::wait_ready(Duration::from_secs(60)) {
            eprintln!("the Postgres server did not come back: start it by hand");
        }
    }
}

// ---- messages -----------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Bump {
    stream: String,
    seq: u32,
    token: Uuid,
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
    token: Uuid,
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
            token: cmd.token,
        }))
    }
}

/// Per stream, the message ids in the order they were applied.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<String, Vec<Uuid>>>>);

impl Recorder {
    fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }

    fn stream(&self, stream: &str) -> Vec<Uuid> {
        self.0
            .lock()
            .unwrap()
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }
}

impl Perspective<Bumped> for Recorder {
    async fn apply(&self, _event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        self.0
            .lock()
            .unwrap()
            .entry(meta.stream_id)
            .or_default()
            .push(meta.message_id);
        Ok(())
    }
}

fn pg_config(service: &str, schema: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = database_url();
    c.store.schema = schema.into();
    c.store.startup_timeout_ms = 15_000;
    c
}

/// Events as stored, per stream, in version order: (version, message id, token).
async fn stored_events(client: &Client, schema: &str) -> BTreeMap<String, Vec<(i64, Uuid, Uuid)>> {
    let rows = client
        .query(
            &format!(
                "SELECT stream_id, version, message_id, payload FROM {schema}.wb_events
                  ORDER BY stream_id, version"
            ),
            &[],
        )
        .await
        .expect("read wb_events");
    let mut out: BTreeMap<String, Vec<(i64, Uuid, Uuid)>> = BTreeMap::new();
    for row in rows {
        let payload: Vec<u8> = row.get(3);
        let event: Bumped = whizbang::message::decode(&payload).expect("decode a stored event");
        out.entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2), event.token));
    }
    out
}

async fn queued(client: &Client, schema: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.wb_outbox) + (SELECT count(*) FROM {schema}.wb_inbox)"
            ),
            &[],
        )
        .await
        .expect("count queued rows")
        .get(0)
}

/// Connects, retrying while the server is still starting after the restart.
async fn connect_when_up() -> Client {
    let start = Instant::now();
    loop {
        let url = database_url();
        match tokio_postgres::connect(&url, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                return client;
            }
            Err(e) if start.elapsed() < DEADLINE => {
                eprintln!("waiting for the server: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the server did not come back after the restart: {e}"),
        }
    }
}

#[actix_rt::test]
async fn server_restart_mid_run_loses_and_duplicates_nothing() {
    const STREAMS: usize = 30;
    /// Sends that succeed before the restart is triggered, and after it has completed before
    /// the senders stop.
    const RESTART_AFTER: usize = 200;
    const AFTER_RESTART: usize = 300;
    init_logs();
    let cluster = Cluster::find();
    let guard = ServerGuard(Cluster {
        version: cluster.version.clone(),
    });
    assert!(
        Cluster::wait_ready(Duration::from_secs(30)),
        "the Postgres server at 127.0.0.1:5432 is not accepting connections"
    );
    let client = connect().await;
    let started_at: std::time::SystemTime = client
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .unwrap()
        .get(0);
    let (schema, down_schema) = (new_schema(), new_schema());

    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let mut down_config = pg_config("restart-downstream", &down_schema);
    down_config.routing.subscriptions.push(SubscriptionConfig {
        topic: TOPIC.into(),
        name: "downstream".into(),
    });
    let down = Runtime::builder(down_config)
        .transport(Arc::new(MemoryTransport::new(bus.clone())))
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await
        .expect("start the downstream service");
    let mut config = pg_config("restart-orders", &schema);
    config
        .routing
        .topics
        .insert(Bumped::TYPE_NAME.into(), TOPIC.into());
    let local = Recorder::default();
    let rt = Runtime::builder(config)
        .transport(Arc::new(MemoryTransport::new(bus.clone())))
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("summary", local.clone())
        .start()
        .await
        .expect("start the service");

    let successes = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let retried = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Restarts the server once sends flow, and stops the senders once sends flow again.
    let restart = {
        let (successes, stop) = (successes.clone(), stop.clone());
        let version = cluster.version.clone();
        tokio::spawn(async move {
            let count = || successes.lock().unwrap().len();
            while count() < RESTART_AFTER {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let at = count();
            let began = Instant::now();
            let result = tokio::task::spawn_blocking(move || Cluster { version }.ctl("restart"))
                .await
                .expect("restart task");
            let took = began.elapsed();
            let done = count();
            let until = Instant::now() + DEADLINE;
            while result.is_ok() && count() < done + AFTER_RESTART && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (result, took, at, done)
        })
    };

    let began = Instant::now();
    let calls = (0..STREAMS).map(|s| {
        let (rt, successes, retried, stop) =
            (&rt, successes.clone(), retried.clone(), stop.clone());
        async move {
            let stream = format!("restart-{s}");
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let call_started = Instant::now();
                loop {
                    let token = Uuid::now_v7();
                    let cmd = Bump {
                        stream: stream.clone(),
                        seq,
                        token,
                    };
                    match rt.send(cmd).await {
                        Ok(_) => {
                            successes.lock().unwrap().push(token);
                            break;
                        }
                        Err(e) if e.is_retryable() => {
                            retried.fetch_add(1, Ordering::SeqCst);
                            assert!(
                                call_started.elapsed() < DEADLINE,
                                "{stream} seq {seq}: still failing after {DEADLINE:?}: {e}"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("{stream} seq {seq}: not retryable: {e:?}"),
                    }
                }
            }
        }
    });
    futures::future::join_all(calls).await;
    let (restarted, restart_took, at, done) = restart.await.expect("restart task");
    restarted.expect("restart the server");
    let sent = successes.lock().unwrap().len();
    eprintln!(
        "{sent} sends in {:?}; restart began after {at} and ended after {done} successes \
         (pg_ctlcluster took {restart_took:?}); {} retried calls",
        began.elapsed(),
        retried.load(Ordering::SeqCst)
    );
    assert!(
        sent >= done + AFTER_RESTART,
        "sends flowed again after the restart: {sent} successes, {done} when it ended"
    );

    // The test's own connection died with the restart.
    let client = {
        drop(client);
        connect_when_up().await
    };
    let restarted_at: std::time::SystemTime = client
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(restarted_at > started_at, "the server was restarted");
    let settle = Instant::now();
    loop {
        let stored: usize = stored_events(&client, &schema)
            .await
            .values()
            .map(Vec::len)
            .sum();
        let q = queued(&client, &schema).await + queued(&client, &down_schema).await;
        if local.total() >= stored && remote.total() >= stored && q == 0 {
            break;
        }
        assert!(
            settle.elapsed() < DEADLINE,
            "timed out: local {} remote {} of {stored} stored; {q} rows still queued",
            local.total(),
            remote.total()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("all applied {:?} after the last send", settle.elapsed());

    let stored = stored_events(&client, &schema).await;
    let mut tokens: HashMap<Uuid, usize> = HashMap::new();
    let mut total = 0;
    for (stream, events) in &stored {
        for (i, (version, _, token)) in events.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1, "{stream}: gapless versions");
            *tokens.entry(*token).or_default() += 1;
        }
        let ids: Vec<Uuid> = events.iter().map(|(_, id, _)| *id).collect();
        total += ids.len();
        assert_eq!(
            local.stream(stream),
            ids,
            "{stream}: applied here exactly once, in stored order"
        );
        assert_eq!(
            remote.stream(stream),
            ids,
            "{stream}: applied downstream exactly once, in stored order"
        );
    }
    assert_eq!(local.total(), total, "nothing applied that is not stored");
    assert_eq!(
        remote.total(),
        total,
        "nothing applied downstream that is not stored"
    );
    assert!(tokens.values().all(|n| *n == 1), "no attempt stored twice");
    let successes = successes.lock().unwrap().clone();
    for token in &successes {
        assert_eq!(
            tokens.get(token),
            Some(&1),
            "the event of successful send {token} is stored exactly once"
        );
    }
    eprintln!(
        "{total} stored ({} from failed attempts that had committed)",
        total - successes.len()
    );

    rt.shutdown().await.expect("shutdown");
    down.shutdown().await.expect("shutdown");
    for s in [&schema, &down_schema] {
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
            .await;
    }
    drop(guard);
}
