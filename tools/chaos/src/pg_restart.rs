//! Scenario `pg-restart`: the Postgres server restarted under load (`pg_ctlcluster <version>
//! main restart`) while 30 streams send commands to a service on the Postgres store that
//! publishes to a downstream service (both in this process, over the in-memory transport).
//! Afterwards every stored event is applied exactly once, in stored order, here and
//! downstream; every stream's versions are gapless; no attempt is stored twice; and every send
//! that succeeded has its event stored exactly once. A send that fails with a retryable error
//! is retried (for at most 90 s); any other error fails the scenario.
//!
//! It restarts the shared server, so it runs in the chaos run (`scripts/chaos.sh`), never
//! beside the parallel test suite. A guard leaves the server running however the scenario
//! ends. The scenario only observes the store (read-only queries, and dropping its own schemas
//! when it passes).

use crate::servers::{PostgresGuard, Servers};
use crate::{ChaosResult, Scenario};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use whizbang::config::{StoreBackend, SubscriptionConfig};
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

const TOPIC: &str = "restart-bumps";
/// How long a send may keep failing, the server take to come back, or the run take to settle.
const DEADLINE: Duration = Duration::from_secs(90);

#[derive(Args, Debug, Clone)]
pub struct PgRestartArgs {
    /// The Postgres server (default: $WHIZBANG_DATABASE_URL, else
    /// postgres://postgres@127.0.0.1:5432/postgres). Its local cluster is the one restarted.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Streams sending at once, each on its own stream.
    #[arg(long, default_value_t = 30)]
    pub streams: usize,
    /// Successful sends before the restart is triggered.
    #[arg(long, default_value_t = 200)]
    pub restart_after: usize,
    /// Successful sends after the restart completed before the senders stop.
    #[arg(long, default_value_t = 300)]
    pub after_restart: usize,
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
    /// The send attempt that stored it: tells a successful send's event from the event of an
    /// attempt that failed after it committed.
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Uuid>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn total(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn stream(&self, stream: &str) -> Vec<Uuid> {
        self.lock().get(stream).cloned().unwrap_or_default()
    }
}

impl Perspective<Bumped> for Recorder {
    async fn apply(&self, _event: Bumped, meta: EventMeta) -> Result<(), PerspectiveError> {
        self.lock()
            .entry(meta.stream_id)
            .or_default()
            .push(meta.message_id);
        Ok(())
    }
}

// ---- the database, as an observer ----------------------------------------------------------

fn pg_config(service: &str, url: &str, schema: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = url.into();
    c.store.schema = schema.into();
    c.store.startup_timeout_ms = 15_000;
    c
}

/// Connects, retrying while the server is (re)starting, for at most [`DEADLINE`].
async fn connect(url: &str) -> ChaosResult<Client> {
    let start = Instant::now();
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls));
        match attempt.await {
            Ok(Ok((client, connection))) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                return Ok(client);
            }
            failed if start.elapsed() < DEADLINE => {
                if let Ok(Err(e)) = failed {
                    eprintln!("waiting for the server: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => {
                return Err(format!("cannot reach Postgres within {DEADLINE:?}: {e}").into());
            }
            Err(_) => return Err(format!("Postgres did not answer within {DEADLINE:?}").into()),
        }
    }
}

/// Events as stored, per stream, in version order: (version, message id, token).
async fn stored_events(
    client: &Client,
    schema: &str,
) -> ChaosResult<BTreeMap<String, Vec<(i64, Uuid, Uuid)>>> {
    let rows = client
        .query(
            &format!(
                "SELECT stream_id, version, message_id, payload FROM {schema}.wb_events
                  ORDER BY stream_id, version"
            ),
            &[],
        )
        .await?;
    let mut out: BTreeMap<String, Vec<(i64, Uuid, Uuid)>> = BTreeMap::new();
    for row in rows {
        let payload: Vec<u8> = row.get(3);
        let event: Bumped = whizbang::message::decode(&payload)?;
        out.entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2), event.token));
    }
    Ok(out)
}

async fn queued(client: &Client, schema: &str) -> ChaosResult<i64> {
    Ok(client
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.wb_outbox) + (SELECT count(*) FROM {schema}.wb_inbox)"
            ),
            &[],
        )
        .await?
        .get(0))
}

async fn started_at(client: &Client) -> ChaosResult<SystemTime> {
    Ok(client
        .query_one("SELECT pg_postmaster_start_time()", &[])
        .await?
        .get(0))
}

// ---- the scenario -------------------------------------------------------------------------

pub async fn run(args: PgRestartArgs, scenario: &mut Scenario) -> ChaosResult<()> {
    let url = args.database_url.clone().unwrap_or_else(|| {
        std::env::var("WHIZBANG_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
    });
    let servers = Servers::find(false, true, &url)?;
    let _guard = PostgresGuard(servers.clone());
    servers
        .wait_for_postgres(Duration::from_secs(30))
        .map_err(|e| format!("before the restart: {e}"))?;
    let client = connect(&url).await?;
    let first_start = started_at(&client).await?;
    let id = Uuid::now_v7().simple().to_string();
    let (schema, down_schema) = (
        format!("chaos_{}_pg", &id[20..]),
        format!("chaos_{}_pgd", &id[20..]),
    );
    println!("pg-restart: schemas {schema} and {down_schema}");

    let bus = MemoryBus::new();
    let remote = Recorder::default();
    let mut down_config = pg_config("restart-downstream", &url, &down_schema);
    down_config.routing.subscriptions.push(SubscriptionConfig {
        topic: TOPIC.into(),
        name: "downstream".into(),
    });
    let down = Runtime::builder(down_config)
        .transport(Arc::new(MemoryTransport::new(bus.clone())))
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await?;
    let mut config = pg_config("restart-orders", &url, &schema);
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
        .await?;

    let successes = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let count = {
        let successes = successes.clone();
        move || successes.lock().unwrap_or_else(|p| p.into_inner()).len()
    };
    let retried = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Restarts the server once sends flow, and stops the senders once sends flow again.
    let restart = {
        let (count, stop, servers) = (count.clone(), stop.clone(), servers.clone());
        let (restart_after, after_restart) = (args.restart_after, args.after_restart);
        tokio::spawn(async move {
            while count() < restart_after {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let at = count();
            let result = tokio::task::spawn_blocking(move || servers.restart("postgres"))
                .await
                .unwrap_or_else(|e| Err(format!("the restart task failed: {e}")));
            let done = count();
            let until = Instant::now() + DEADLINE;
            while result.is_ok() && count() < done + after_restart && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stop.store(true, Ordering::SeqCst);
            (result, at, done)
        })
    };

    let began = Instant::now();
    let calls = (0..args.streams).map(|s| {
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
                            successes
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(token);
                            break;
                        }
                        Err(e) if e.is_retryable() => {
                            retried.fetch_add(1, Ordering::SeqCst);
                            if call_started.elapsed() >= DEADLINE {
                                stop.store(true, Ordering::SeqCst);
                                return Err(format!(
                                    "{stream} seq {seq}: still failing after {DEADLINE:?}: {e}"
                                ));
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => {
                            stop.store(true, Ordering::SeqCst);
                            return Err(format!("{stream} seq {seq}: not retryable: {e:?}"));
                        }
                    }
                }
            }
            Ok(())
        }
    });
    let sent_results = futures::future::join_all(calls).await;
    let (restarted, at, done) = restart.await?;
    let restart_s = restarted.map_err(|e| format!("restart the server: {e}"))?;
    let send_errors: Vec<String> = sent_results.into_iter().filter_map(Result::err).collect();
    if let Some(first) = send_errors.first() {
        return Err(format!("{} streams failed; first: {first}", send_errors.len()).into());
    }
    let sent = count();
    scenario.figure("sends_ok", sent);
    scenario.figure("retried_calls", retried.load(Ordering::SeqCst));
    scenario.figure("restart_s", format!("{restart_s:.1}"));
    println!(
        "{sent} sends in {:.1}s; the restart began after {at} and ended after {done} successes",
        began.elapsed().as_secs_f64()
    );
    scenario.check(
        sent >= done + args.after_restart,
        format!("sends flowed again after the restart: {sent} successes, {done} when it ended"),
    );

    // The scenario's own connection died with the restart.
    drop(client);
    let client = connect(&url).await?;
    scenario.check(
        started_at(&client).await? > first_start,
        "the server was restarted (pg_postmaster_start_time moved)",
    );
    let settle = Instant::now();
    loop {
        let stored: usize = stored_events(&client, &schema)
            .await?
            .values()
            .map(Vec::len)
            .sum();
        let q = queued(&client, &schema).await? + queued(&client, &down_schema).await?;
        if local.total() >= stored && remote.total() >= stored && q == 0 {
            break;
        }
        if settle.elapsed() > DEADLINE {
            scenario.check(
                false,
                format!(
                    "settled within {DEADLINE:?}: local {} remote {} of {stored} stored; {q} rows still queued",
                    local.total(),
                    remote.total()
                ),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "all applied {:.1}s after the last send",
        settle.elapsed().as_secs_f64()
    );

    let stored = stored_events(&client, &schema).await?;
    let mut tokens: HashMap<Uuid, usize> = HashMap::new();
    let mut total = 0;
    let (mut gaps, mut local_wrong, mut remote_wrong) = (0, 0, 0);
    for (stream, events) in &stored {
        for (i, (version, _, token)) in events.iter().enumerate() {
            if *version != i as i64 + 1 {
                gaps += 1;
            }
            *tokens.entry(*token).or_default() += 1;
        }
        let ids: Vec<Uuid> = events.iter().map(|(_, id, _)| *id).collect();
        total += ids.len();
        if local.stream(stream) != ids {
            local_wrong += 1;
        }
        if remote.stream(stream) != ids {
            remote_wrong += 1;
        }
    }
    let stored_twice = tokens.values().filter(|n| **n > 1).count();
    let successes = successes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let sends_not_stored_once = successes
        .iter()
        .filter(|token| tokens.get(token) != Some(&1))
        .count();
    scenario.figure("stored", total);
    scenario.figure(
        "stored_from_failed_attempts",
        total.saturating_sub(successes.len()),
    );
    scenario.bound("version_gaps", gaps, 0);
    scenario.bound("streams_applied_wrong_here", local_wrong, 0);
    scenario.bound("streams_applied_wrong_downstream", remote_wrong, 0);
    scenario.bound(
        "applied_here_minus_stored",
        local.total().abs_diff(total),
        0,
    );
    scenario.bound(
        "applied_downstream_minus_stored",
        remote.total().abs_diff(total),
        0,
    );
    scenario.bound("attempts_stored_twice", stored_twice, 0);
    scenario.bound("sends_not_stored_once", sends_not_stored_once, 0);

    rt.shutdown().await?;
    down.shutdown().await?;
    if scenario.passed() {
        for s in [&schema, &down_schema] {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
                .await;
        }
    } else {
        println!("kept for inspection: schemas {schema} and {down_schema}");
    }
    Ok(())
}
