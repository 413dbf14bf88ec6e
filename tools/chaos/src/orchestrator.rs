//! The orchestrator of a chaos run: starts the consumer and the writer processes, kills one of
//! them with SIGKILL every few seconds and starts it again, restarts and hangs the broker and
//! the Postgres server mid-run (with a kill during each), publishes poison messages, measures
//! how long each dead instance's partitions stay stuck behind its leases, requeues the dead
//! letters with the operator CLI, waits for the run to drain, stops everything gracefully and
//! judges.
//!
//! Writer 0 runs with a lease far longer than the heartbeat (`--crash-lease-s`, 300 s, the
//! default of `partitions.lease_seconds`); the others with the configuration's. A kill of writer
//! 0 can only be taken over in seconds through its liveness lock, so its takeovers are the
//! run's `crash_takeover_s_max`, bound by the heartbeat + 2 s.
//!
//! Each run works in schemas and on a topic of its own (`chaos_<id>_w`, `chaos_<id>_c`,
//! `chaos-<id>`), so runs never see each other's rows or deliveries; they are removed when the
//! run passes and kept for inspection when it fails. Logs of every process go to
//! `target/chaos/<id>/`. The orchestrator only observes the store (read-only queries); it
//! never repairs anything, so whatever the verdict finds is what the runtime did.

use crate::ChaosResult;
use crate::node::{ConsumerArgs, NodeArgs, SUBSCRIPTION, WriterArgs};
use crate::servers::{HangGuard, Servers};
use crate::verdict::{self, Applied, Committed};
use clap::Args;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use uuid::Uuid;
use whizbang::Config;
use whizbang::config::ExposeSecret;
use whizbang_tools_common::amqp_topology;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The configuration every node reads (lease times, endpoints, the transport).
    #[arg(long, default_value = "config/chaos.toml")]
    pub config: PathBuf,
    /// The short form (CI): fewer streams and events, the same faults.
    #[arg(long)]
    pub short: bool,
    /// Streams (default 200; short 60).
    #[arg(long)]
    pub streams: Option<usize>,
    /// Events per stream (default 100; short 50).
    #[arg(long)]
    pub events: Option<u64>,
    /// Commands per second across all writers (default 400; short 80).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Writer processes (instances of one service).
    #[arg(long, default_value_t = 3)]
    pub writers: usize,
    /// Seconds between two kills (default 4; short 3).
    #[arg(long)]
    pub kill_every_s: Option<f64>,
    /// How long a killed writer stays dead before it is started again.
    #[arg(long, default_value_t = 500)]
    pub restart_delay_ms: u64,
    /// The lease of writer 0, in seconds: far longer than the heartbeat, so that its kills
    /// measure takeover after a crash (`crash_takeover_s_max`), not a lease running out.
    #[arg(long, default_value_t = 300)]
    pub crash_lease_s: u64,
    /// Do not restart the broker mid-run.
    #[arg(long)]
    pub no_broker_restart: bool,
    /// Do not restart the Postgres server mid-run.
    #[arg(long)]
    pub no_postgres_restart: bool,
    /// Seconds the run may take to drain once every writer is done.
    #[arg(long, default_value_t = 120)]
    pub drain_timeout_s: u64,
    /// Keep the run's schemas and topic even when it passes.
    #[arg(long)]
    pub keep: bool,
    /// Consumer processes (instances of one service on the sharded subscription).
    #[arg(long, default_value_t = 2)]
    pub consumers: usize,
    /// `coordinator.flush_strategy` of every node: immediate, scoped, interval, or mixed (the
    /// three spread over the processes: writer i and consumer i + 2 take the i-th of
    /// immediate, scoped, interval, so each strategy runs under kills in one run).
    #[arg(long, default_value = "mixed")]
    pub flush_strategy: String,
    /// Poison messages (undecodable payloads) a foreign client publishes on the topic: the
    /// consumers reject them and the broker dead-letters them.
    #[arg(long, default_value_t = 5)]
    pub poison: usize,
    /// The consumers' perspective fails one event of every this-many streams (0: none) until
    /// the run heals it; dead-lettered, then requeued with `whizbang dead-letters requeue`.
    #[arg(long, default_value_t = 15)]
    pub fail_every: usize,
    /// How long each hang (SIGSTOP of the Postgres server, then of the broker) lasts, in
    /// seconds: longer than the statement and send deadlines.
    #[arg(long, default_value_t = 7.0)]
    pub hang_s: f64,
    /// Do not hang the servers (SIGSTOP / SIGCONT) mid-run.
    #[arg(long)]
    pub no_hangs: bool,
}

/// The flush strategies (`coordinator.flush_strategy`).
const STRATEGIES: [&str; 3] = ["immediate", "scoped", "interval"];

/// The run's settings once the form's defaults are applied.
struct Plan {
    streams: usize,
    events: u64,
    rate: f64,
    writers: usize,
    kill_every: Duration,
    restart_delay: Duration,
    lease: Duration,
    takeover_bound_s: f64,
    heartbeat: Duration,
    /// Writer 0's lease.
    crash_lease_s: u64,
    crash_takeover_bound_s: f64,
    /// The broker restarts after this many kills, the Postgres server after that many.
    kills_before_broker: usize,
    kills_before_postgres: usize,
    consumers: usize,
    hang: Duration,
    /// Events the perspective fails until healed (one per `fail_every` streams).
    failing: usize,
}

impl Plan {
    fn new(args: &RunArgs, config: &Config) -> ChaosResult<Plan> {
        // About 40 s (short) and 55 s (full) of writing, so that kills, the broker restart and
        // the Postgres restart all happen while the writers write.
        let (streams, events, rate, kill_every, broker_after, postgres_after) = if args.short {
            (60, 50, 80.0, 3.0, 2, 4)
        } else {
            (200, 100, 400.0, 4.0, 4, 8)
        };
        let plan = Plan {
            streams: args.streams.unwrap_or(streams),
            events: args.events.unwrap_or(events),
            rate: args.rate.unwrap_or(rate),
            writers: args.writers,
            kill_every: Duration::from_secs_f64(args.kill_every_s.unwrap_or(kill_every)),
            restart_delay: Duration::from_millis(args.restart_delay_ms),
            lease: Duration::from_secs(config.partitions.lease_seconds),
            takeover_bound_s: config.partitions.lease_seconds as f64 + 2.0,
            heartbeat: Duration::from_secs(config.partitions.heartbeat_seconds),
            crash_lease_s: args.crash_lease_s,
            crash_takeover_bound_s: config.partitions.heartbeat_seconds as f64 + 2.0,
            kills_before_broker: broker_after,
            kills_before_postgres: postgres_after,
            consumers: args.consumers,
            hang: Duration::from_secs_f64(args.hang_s.max(0.0)),
            failing: 0,
        };
        let mut plan = plan;
        plan.failing = if args.fail_every == 0 {
            0
        } else {
            plan.streams.div_ceil(args.fail_every)
        };
        if plan.writers < 2 || plan.streams == 0 || plan.events == 0 || plan.rate <= 0.0 {
            return Err("need at least 2 writers, 1 stream, 1 event and a positive rate".into());
        }
        if args.flush_strategy != "mixed" && !STRATEGIES.contains(&args.flush_strategy.as_str()) {
            return Err(format!(
                "--flush-strategy {}: one of {}, mixed",
                args.flush_strategy,
                STRATEGIES.join(", ")
            )
            .into());
        }
        if plan.consumers < 2 {
            return Err("need at least 2 consumers (competing on the sharded subscription)".into());
        }
        if config.transport.amqp.shards == 0 {
            return Err(format!(
                "{}: transport.amqp.shards must be set: several consumers keep streams in order \
                 only on a sharded subscription",
                args.config.display()
            )
            .into());
        }
        if plan.crash_lease_s < 10 * config.partitions.heartbeat_seconds {
            return Err(format!(
                "--crash-lease-s {} is not far longer than the heartbeat ({} s): its kills would \
                 not tell takeover by the lock from a lease running out",
                plan.crash_lease_s, config.partitions.heartbeat_seconds
            )
            .into());
        }
        Ok(plan)
    }

    fn total_events(&self) -> u64 {
        self.streams as u64 * self.events
    }

    /// The event of each failing stream the perspective fails: half-way, so that the rest of
    /// the stream waits behind its dead letter.
    fn fail_seq(&self) -> u64 {
        self.events.div_ceil(2)
    }

    /// How long the writers need at the offered rate.
    fn drive_time(&self) -> Duration {
        Duration::from_secs_f64(self.total_events() as f64 / self.rate)
    }
}

/// Names of this run's schemas and topic.
struct Names {
    id: String,
    writer_schema: String,
    consumer_schema: String,
    /// The consumers' read model (`chaos_applied`).
    read_schema: String,
    topic: String,
}

impl Names {
    fn new() -> Names {
        let id = Uuid::now_v7().simple().to_string()[20..].to_string();
        Names {
            writer_schema: format!("chaos_{id}_w"),
            consumer_schema: format!("chaos_{id}_c"),
            read_schema: format!("chaos_{id}_r"),
            topic: format!("chaos-{id}"),
            id,
        }
    }

    fn topology_spec(&self, shards: u32) -> String {
        format!("{}:{SUBSCRIPTION}/{shards}", self.topic)
    }

    /// The broker's dead-letter queue of the subscription.
    fn dead_letter_queue(&self) -> String {
        format!("{}.{SUBSCRIPTION}.dead", self.topic)
    }
}

pub async fn run(args: RunArgs) -> ChaosResult<bool> {
    let config = Config::load(&args.config)?;
    let plan = Plan::new(&args, &config)?;
    let names = Names::new();
    let dir = whizbang_tools_common::target_dir()
        .join("chaos")
        .join(&names.id);
    std::fs::create_dir_all(&dir)?;
    let servers = Servers::find(
        !args.no_broker_restart || !args.no_hangs,
        !args.no_postgres_restart || !args.no_hangs,
        config.store.database_url.expose_secret(),
    )
    .map_err(|e| format!("{e} (or pass --no-broker-restart --no-postgres-restart --no-hangs)"))?;
    let db_url = config.store.database_url.expose_secret().to_string();
    println!(
        "chaos run {}: {} writers, {} consumers on {} shards, {} streams x {} events at {}/s, \
         a kill every {:?}, lease {:?} (writer 0: {} s), heartbeat {:?}, flush {}; logs in {}",
        names.id,
        plan.writers,
        plan.consumers,
        config.transport.amqp.shards,
        plan.streams,
        plan.events,
        plan.rate,
        plan.kill_every,
        plan.lease,
        plan.crash_lease_s,
        plan.heartbeat,
        args.flush_strategy,
        dir.display()
    );
    let shards = config.transport.amqp.shards;
    amqp_topology::topology(&[names.topology_spec(shards)], false)?;
    let mut run = Run {
        plan,
        names,
        dir,
        args: args.clone(),
        db: Db::new(&db_url),
        db_url,
        servers,
        writers: Vec::new(),
        consumers: Vec::new(),
        shards,
        amqp_url: config.transport.amqp_url.expose_secret().to_string(),
        kills: 0,
        consumer_kills: 0,
        overlapping_kills: 0,
        killed_consumers: Vec::new(),
        hangs: Vec::new(),
        poisoned: 0,
        dead: DeadLetters::default(),
        startup_failures: 0,
        trackers: Vec::new(),
        restarts: Vec::new(),
        log: Vec::new(),
    };
    let outcome = run.execute().await;
    run.stop_all().await;
    let passed = match outcome {
        Ok(passed) => passed,
        Err(e) => {
            println!("chaos run failed: {e}");
            false
        }
    };
    if passed && !args.keep {
        run.clean_up().await;
    } else {
        println!(
            "kept for inspection: schemas {}, {} and {}, topic {}, logs in {}",
            run.names.writer_schema,
            run.names.consumer_schema,
            run.names.read_schema,
            run.names.topic,
            run.dir.display()
        );
    }
    Ok(passed)
}

// ---- processes ---------------------------------------------------------------------------

/// What a node has told the orchestrator on its standard output.
#[derive(Default)]
struct Heard {
    instance: Option<Uuid>,
    done: bool,
}

/// One running node process.
struct Node {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    heard: Arc<Mutex<Heard>>,
    stderr_log: PathBuf,
}

impl Node {
    fn start(label: String, args: Vec<String>, dir: &Path) -> ChaosResult<Node> {
        let stderr_log = dir.join(format!("{label}.log"));
        let mut child = Process::new(std::env::current_exe()?)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log)?)
            .spawn()?;
        let heard = Arc::new(Mutex::new(Heard::default()));
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut out_log = std::fs::File::create(dir.join(format!("{label}.out")))?;
        let h = heard.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out_log, "{line}");
                let mut heard = h.lock().unwrap_or_else(|p| p.into_inner());
                match line.split_once(' ') {
                    Some(("instance", id)) => heard.instance = id.parse().ok(),
                    Some(("done", _)) => heard.done = true,
                    _ => {}
                }
            }
        });
        Ok(Node {
            label,
            stdin: child.stdin.take(),
            child,
            heard,
            stderr_log,
        })
    }

    fn heard<R>(&self, f: impl FnOnce(&Heard) -> R) -> R {
        f(&self.heard.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until it has said which instance it is.
    async fn started(&mut self, deadline: Duration) -> ChaosResult<Uuid> {
        let start = Instant::now();
        loop {
            if let Some(id) = self.heard(|h| h.instance) {
                return Ok(id);
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited ({status}) before it started:\n{}",
                    self.label,
                    self.log_tail()
                )
                .into());
            }
            if start.elapsed() > deadline {
                return Err(format!("{} did not start within {deadline:?}", self.label).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Closes its standard input (the stop order) and waits for it to exit.
    async fn stop(&mut self, deadline: Duration) -> Result<(), String> {
        self.stdin.take();
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} exited with {status}:\n{}",
                        self.label,
                        self.log_tail()
                    ))
                };
            }
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "{} did not stop within {deadline:?}; killed",
                    self.label
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A writer or consumer slot: the process now running it (none while it is dead) and its
/// incarnations.
struct Slot {
    node: Option<Node>,
    incarnation: u32,
    restart_at: Option<Instant>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            node: None,
            incarnation: 0,
            restart_at: None,
        }
    }
}

/// Which process a kill hits.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Writer,
    Consumer,
}

/// What the dead-letter phase found and did.
#[derive(Default)]
struct DeadLetters {
    /// Events the perspective failed, dead-lettered in the consumers' inbox.
    store: i64,
    /// Poison messages in the broker's dead-letter queue, as `whizbang dead-letters broker`
    /// counted them.
    broker: i64,
    /// Dead letters `whizbang dead-letters requeue --all` put back.
    requeued: i64,
}

// ---- the run -----------------------------------------------------------------------------

struct Run {
    plan: Plan,
    names: Names,
    dir: PathBuf,
    args: RunArgs,
    db_url: String,
    db: Db,
    servers: Servers,
    writers: Vec<Slot>,
    consumers: Vec<Slot>,
    shards: u32,
    amqp_url: String,
    kills: usize,
    consumer_kills: usize,
    /// Kills while a server restarted or hung (their takeovers are not timed).
    overlapping_kills: usize,
    /// Labels of the consumer processes killed.
    killed_consumers: Vec<String>,
    /// Per hang: what hung, and its recovery time (from SIGCONT to the backlog moving).
    hangs: Vec<(&'static str, JoinHandle<Result<f64, String>>)>,
    poisoned: usize,
    dead: DeadLetters,
    /// Processes started again after their start-up failed during a server fault.
    startup_failures: usize,
    /// Per kill: whether the writer had the long lease (a crash takeover), and its tracker.
    trackers: Vec<(bool, JoinHandle<f64>)>,
    restarts: Vec<(&'static str, JoinHandle<Result<f64, String>>)>,
    log: Vec<String>,
}

impl Run {
    async fn execute(&mut self) -> ChaosResult<bool> {
        let run_started = Instant::now();
        self.db
            .batch(&crate::node::read_model_ddl(&self.names.read_schema))
            .await?;
        for index in 0..self.plan.consumers {
            self.consumers.push(Slot::new());
            self.start_node(Role::Consumer, index)?;
        }
        for index in 0..self.plan.writers {
            self.writers.push(Slot::new());
            self.start_node(Role::Writer, index)?;
        }
        for slot in self.consumers.iter_mut().chain(self.writers.iter_mut()) {
            if let Some(node) = slot.node.as_mut() {
                node.started(Duration::from_secs(90)).await?;
            }
        }
        self.poison().await?;
        self.drive().await?;
        let mut drained = self.dead_letters().await;
        if drained.is_ok() {
            drained = self.drain().await;
        }
        if let Err(e) = &drained {
            println!("drain: {e}");
        }
        let stopped = self.stop_all().await;
        let takeovers = self.takeovers().await;
        let restart_errors = self.restart_results().await;
        let (hang_recovery, hang_errors) = self.hang_results().await;
        let applied = self.applications().await?;
        let committed = self.committed().await?;
        let stuck_rows = self.stuck_rows().await?;
        let killed: std::collections::HashSet<String> =
            self.killed_consumers.iter().cloned().collect();
        let counts = verdict::count(&committed, &applied, &killed);
        let hang_recovery_s_max = hang_recovery.iter().copied().fold(0.0_f64, f64::max);
        let takeover_s_max = takeovers.iter().map(|t| t.1).fold(0.0_f64, f64::max);
        let crash: Vec<f64> = takeovers.iter().filter(|t| t.0).map(|t| t.1).collect();
        let crash_takeover_s_max = crash.iter().copied().fold(0.0_f64, f64::max);
        let each: Vec<String> = takeovers
            .iter()
            .map(|(long, t)| format!("{t:.1}{}", if *long { "*" } else { "" }))
            .collect();
        println!(
            "takeover after each kill (s; * writer 0, lease {} s): {}",
            self.plan.crash_lease_s,
            each.join(" ")
        );
        self.log.push(format!("takeovers_s {}", each.join(" ")));

        let figures: Vec<(&str, String)> = vec![
            ("streams", self.plan.streams.to_string()),
            ("events_per_stream", self.plan.events.to_string()),
            ("writers", self.plan.writers.to_string()),
            ("consumers", self.plan.consumers.to_string()),
            ("shards", self.shards.to_string()),
            ("flush_strategy", self.args.flush_strategy.clone()),
            ("kills", self.kills.to_string()),
            ("consumer_kills", self.consumer_kills.to_string()),
            ("overlapping_kills", self.overlapping_kills.to_string()),
            ("startup_failures", self.startup_failures.to_string()),
            ("hangs", hang_recovery.len().to_string()),
            ("hang_s", format!("{:.1}", self.plan.hang.as_secs_f64())),
            ("hang_recovery_s_max", format!("{hang_recovery_s_max:.1}")),
            ("poison_sent", self.poisoned.to_string()),
            (
                "dead_lettered",
                (self.dead.store + self.dead.broker).to_string(),
            ),
            ("dead_lettered_broker", self.dead.broker.to_string()),
            ("dead_lettered_store", self.dead.store.to_string()),
            ("requeued", self.dead.requeued.to_string()),
            (
                "broker_restarts",
                self.count_restarts("broker", &restart_errors),
            ),
            (
                "postgres_restarts",
                self.count_restarts("postgres", &restart_errors),
            ),
            ("expected_events", self.plan.total_events().to_string()),
            ("committed", committed.len().to_string()),
            ("applications", applied.len().to_string()),
            ("lost", counts.lost.to_string()),
            ("duplicates", counts.duplicates.to_string()),
            (
                "reapplied_after_consumer_kill",
                counts.reapplied_after_kill.to_string(),
            ),
            ("order_violations", counts.order_violations.to_string()),
            ("phantoms", counts.phantoms.to_string()),
            ("stuck_rows", stuck_rows.to_string()),
            ("takeover_s_max", format!("{takeover_s_max:.1}")),
            (
                "takeover_bound_s",
                format!("{:.1}", self.plan.takeover_bound_s),
            ),
            ("crash_lease_s", self.plan.crash_lease_s.to_string()),
            ("crash_kills", crash.len().to_string()),
            ("crash_takeover_s_max", format!("{crash_takeover_s_max:.1}")),
            (
                "crash_takeover_bound_s",
                format!("{:.1}", self.plan.crash_takeover_bound_s),
            ),
            (
                "elapsed_s",
                format!("{:.1}", run_started.elapsed().as_secs_f64()),
            ),
        ];
        for (name, value) in &figures {
            println!("{name}: {value}");
        }
        let mut failures = Vec::new();
        let expected = self.plan.total_events() as usize;
        if committed.len() != expected {
            failures.push(format!(
                "committed {} events, expected {expected}",
                committed.len()
            ));
        }
        for (name, n) in [
            ("lost", counts.lost),
            ("duplicates", counts.duplicates),
            // The consumers' read model is exactly once: a kill between its write and the
            // inbox's completion must not apply an event again either.
            ("reapplied_after_consumer_kill", counts.reapplied_after_kill),
            ("order_violations", counts.order_violations),
            ("phantoms", counts.phantoms),
            ("stuck_rows", stuck_rows as usize),
        ] {
            if n != 0 {
                failures.push(format!("{name} = {n}, must be 0"));
            }
        }
        if takeover_s_max > self.plan.takeover_bound_s {
            failures.push(format!(
                "takeover_s_max = {takeover_s_max:.1} s, bound {:.1} s (lease + 2 s)",
                self.plan.takeover_bound_s
            ));
        }
        if crash_takeover_s_max > self.plan.crash_takeover_bound_s {
            failures.push(format!(
                "crash_takeover_s_max = {crash_takeover_s_max:.1} s, bound {:.1} s (heartbeat + 2 s)",
                self.plan.crash_takeover_bound_s
            ));
        }
        if self.kills == 0 {
            failures.push("no writer was killed: the run was too short to prove takeover".into());
        }
        if self.consumer_kills == 0 {
            failures.push("no consumer was killed: the run was too short".into());
        }
        if self.dead.broker != self.poisoned as i64 {
            failures.push(format!(
                "{} poison messages sent, {} in the broker's dead-letter queue",
                self.poisoned, self.dead.broker
            ));
        }
        if self.dead.store != self.plan.failing as i64 || self.dead.requeued != self.dead.store {
            failures.push(format!(
                "{} failing events: {} dead-lettered in the store, {} requeued",
                self.plan.failing, self.dead.store, self.dead.requeued
            ));
        }
        failures.extend(hang_errors);
        if crash.is_empty() {
            failures.push(
                "writer 0 (the long lease) was never killed: nothing proves takeover after a crash"
                    .into(),
            );
        }
        failures.extend(restart_errors);
        failures.extend(stopped);
        if let Err(e) = drained {
            failures.push(e);
        }
        self.write_results(&figures, &failures)?;
        for f in &failures {
            println!("FAILED: {f}");
        }
        if failures.is_empty() {
            println!("chaos run {}: passed", self.names.id);
        }
        Ok(failures.is_empty())
    }

    fn count_restarts(&self, what: &str, errors: &[String]) -> String {
        let done = self
            .log
            .iter()
            .filter(|l| l.starts_with(&format!("{what} restart at")))
            .count();
        let failed = errors.iter().filter(|e| e.starts_with(what)).count();
        (done - failed.min(done)).to_string()
    }

    /// Starts writer or consumer `index` (again, after a kill).
    fn start_node(&mut self, role: Role, index: usize) -> ChaosResult<()> {
        let strategy = match self.args.flush_strategy.as_str() {
            "mixed" => {
                let offset = if role == Role::Writer { 0 } else { 2 };
                STRATEGIES[(index + offset) % STRATEGIES.len()].to_string()
            }
            one => one.to_string(),
        };
        let node = |schema: &str, lease_seconds| NodeArgs {
            config: self.args.config.clone(),
            schema: schema.to_string(),
            topic: self.names.topic.clone(),
            lease_seconds,
            flush_strategy: Some(strategy.clone()),
        };
        let slot = match role {
            Role::Writer => &self.writers[index],
            Role::Consumer => &self.consumers[index],
        };
        let incarnation = slot.incarnation + 1;
        let (label, args) = match role {
            Role::Writer => {
                let args = WriterArgs {
                    node: node(
                        &self.names.writer_schema,
                        (index == 0).then_some(self.plan.crash_lease_s),
                    ),
                    index,
                    writers: self.plan.writers,
                    streams: self.plan.streams,
                    events: self.plan.events,
                    rate: self.plan.rate / self.plan.writers as f64,
                };
                (format!("writer-{index}.{incarnation}"), args.to_args())
            }
            Role::Consumer => {
                let label = format!("consumer-{index}.{incarnation}");
                let args = ConsumerArgs {
                    node: node(&self.names.consumer_schema, None),
                    label: label.clone(),
                    read_schema: self.names.read_schema.clone(),
                    fail_every: self.args.fail_every,
                    fail_seq: self.plan.fail_seq(),
                    healed: self.healed_file(),
                    max_attempts: 3,
                };
                (label, args.to_args())
            }
        };
        let started = Node::start(label, args, &self.dir)?;
        let slot = match role {
            Role::Writer => &mut self.writers[index],
            Role::Consumer => &mut self.consumers[index],
        };
        slot.incarnation = incarnation;
        slot.node = Some(started);
        slot.restart_at = None;
        Ok(())
    }

    /// The file whose existence heals the consumers' failing perspective.
    fn healed_file(&self) -> PathBuf {
        self.dir.join("healed")
    }

    /// Until every writer has stored all its events: kills, restarts, hangs.
    ///
    /// A kill every `kill_every`, round robin over writers and consumers (w0, c0, w1, c1, …).
    /// After set numbers of kills, in turn: the broker restarts, the Postgres server hangs
    /// (SIGSTOP for `--hang-s`, then SIGCONT), the Postgres server restarts, the broker hangs;
    /// each once the last kill's takeover had time to complete (lease + 2 s), and one second
    /// into each, one more process is killed (an overlapping fault, whose takeover is not
    /// timed: it would measure the server's absence). Kills resume 2 s after the broker is
    /// back, and the heartbeat + 4 s after the Postgres server is (every instance takes its
    /// liveness lock again and heartbeats once, so that the instances see each other alive
    /// again). A fault whose turn has not come when the writers finish happens then.
    async fn drive(&mut self) -> ChaosResult<()> {
        let start = Instant::now();
        let deadline = self.plan.drive_time() * 3 + Duration::from_secs(180);
        let mut pending: Vec<(usize, Fault)> = Vec::new();
        let (broker_after, postgres_after) = (
            self.plan.kills_before_broker,
            self.plan.kills_before_postgres,
        );
        if !self.args.no_broker_restart {
            pending.push((broker_after, Fault::Restart("broker")));
        }
        if !self.args.no_hangs {
            pending.push((broker_after + 1, Fault::Hang("postgres")));
        }
        if !self.args.no_postgres_restart {
            pending.push((postgres_after, Fault::Restart("postgres")));
        }
        if !self.args.no_hangs {
            pending.push((postgres_after + 1, Fault::Hang("broker")));
        }
        let settle = self.plan.lease + Duration::from_secs(2);
        // The first kill once the instances judge each other by their liveness locks: an
        // instance does so once it has held its own lock for 10 s (postgres.md), so a kill
        // before that waits for it, which measures start-up, not takeover after a crash.
        let mut next_kill = start + Duration::from_secs(10) + self.plan.heartbeat * 2;
        let mut last_kill: Option<Instant> = None;
        // The fault under way: which server, when it began, whether its overlapping kill
        // happened, and for a hang the guard and when to resume.
        let mut running: Option<Running> = None;
        // No fault starts before then: faults are apart by their pause and a takeover's time.
        let mut quiet_until = start;
        let mut last_fault_end: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let elapsed = now - start;

            if let Some(r) = running.as_mut() {
                // One kill while the server is away.
                if !r.overlapped && now - r.began >= Duration::from_secs(1) {
                    r.overlapped = true;
                    self.overlapping_kills += 1;
                    self.kill_next(start, false).await?;
                }
                // A hang's time is up: SIGCONT, then time the recovery.
                if let Some(resume_at) = r.resume_at
                    && now >= resume_at
                    && let Some(guard) = r.guard.take()
                {
                    let what = r.what;
                    tokio::task::spawn_blocking(move || guard.resume()).await??;
                    let resumed = Instant::now();
                    println!("resumed {what} at {:.1}s", elapsed.as_secs_f64());
                    self.log
                        .push(format!("{what} resumed at {:.1}s", elapsed.as_secs_f64()));
                    let baseline = if what == "postgres" {
                        r.applied_before
                    } else {
                        None
                    };
                    self.hangs.push((
                        what,
                        tokio::spawn(hang_recovery(
                            Db::new(&self.db_url),
                            (
                                self.names.writer_schema.clone(),
                                self.names.consumer_schema.clone(),
                                self.names.read_schema.clone(),
                            ),
                            resumed,
                            baseline,
                        )),
                    ));
                    r.finished = true;
                }
                let finished =
                    r.finished || r.restart.is_some_and(|i| self.restarts[i].1.is_finished());
                if finished {
                    let pause = if r.what == "postgres" {
                        self.plan.heartbeat + Duration::from_secs(4)
                    } else {
                        Duration::from_secs(2)
                    };
                    next_kill = next_kill.max(now + pause);
                    // Room for two kills after the pause, then a takeover's time.
                    quiet_until = now + pause + self.plan.kill_every * 2 + settle;
                    last_fault_end = Some(now);
                    running = None;
                }
            }

            // Restart processes whose time has come.
            for role in [Role::Writer, Role::Consumer] {
                for index in 0..self.slots(role).len() {
                    if self.slots(role)[index].restart_at.is_some_and(|t| now >= t) {
                        self.start_node(role, index)?;
                    }
                }
            }

            // A process that exited on its own is a failure of the run, but for one that gave
            // up starting while a server was away (the runtime's start-up check fails fast on
            // an unreachable broker): started again, as a supervisor would.
            let in_fault = running.is_some()
                || last_fault_end.is_some_and(|t| now - t < Duration::from_secs(20));
            let restart_delay = self.plan.restart_delay;
            for slot in self.writers.iter_mut().chain(self.consumers.iter_mut()) {
                if let Some(node) = slot.node.as_mut()
                    && let Some(status) = node.exited()
                {
                    if node.heard(|h| h.instance.is_none()) && in_fault {
                        println!(
                            "{} could not start while a server was away ({status}); starting it again",
                            node.label
                        );
                        self.log.push(format!(
                            "{} start-up failed during a server fault",
                            node.label
                        ));
                        self.startup_failures += 1;
                        slot.node = None;
                        slot.restart_at = Some(now + restart_delay);
                        continue;
                    }
                    return Err(format!(
                        "{} exited on its own ({status}):\n{}",
                        node.label,
                        node.log_tail()
                    )
                    .into());
                }
            }

            let all_done = self.writers.iter().all(|s| {
                s.restart_at.is_none() && s.node.as_ref().is_some_and(|n| n.heard(|h| h.done))
            });
            if all_done && pending.is_empty() && running.is_none() {
                return Ok(());
            }
            if elapsed > deadline {
                return Err(
                    format!("the writers did not store their events within {deadline:?}").into(),
                );
            }
            if running.is_some() {
                continue;
            }

            // A fault whose turn has come (or the writers are done), once the last kill's
            // takeover had its time.
            let turn = pending
                .first()
                .is_some_and(|&(after, _)| self.kills >= after || all_done);
            // Kills go on until a takeover's time before the fault may start.
            if turn && now + settle >= quiet_until {
                if last_kill.is_none_or(|t| now - t >= settle) && now >= quiet_until {
                    let (_, fault) = pending.remove(0);
                    running = Some(self.begin(fault, elapsed).await?);
                }
                continue;
            }

            if now >= next_kill && !all_done {
                next_kill = now + self.plan.kill_every;
                last_kill = Some(now);
                self.kill_next(start, true).await?;
            }
        }
    }

    /// Starts a server restart (in the background) or hang (SIGSTOP now).
    async fn begin(&mut self, fault: Fault, elapsed: Duration) -> ChaosResult<Running> {
        let at = elapsed.as_secs_f64();
        let mut running = Running {
            what: "",
            began: Instant::now(),
            overlapped: false,
            restart: None,
            guard: None,
            resume_at: None,
            applied_before: None,
            finished: false,
        };
        match fault {
            Fault::Restart(what) => {
                self.log.push(format!("{what} restart at {at:.1}s"));
                println!("restarting {what} at {at:.1}s");
                let servers = self.servers.clone();
                let handle = tokio::task::spawn_blocking(move || servers.restart(what));
                self.restarts.push((what, handle));
                running.what = what;
                running.restart = Some(self.restarts.len() - 1);
            }
            Fault::Hang(what) => {
                if what == "postgres" {
                    running.applied_before = applied_count(&mut self.db, &self.names.read_schema)
                        .await
                        .ok();
                }
                self.log.push(format!("{what} hang at {at:.1}s"));
                println!("hanging {what} (SIGSTOP) at {at:.1}s");
                let servers = self.servers.clone();
                let guard =
                    tokio::task::spawn_blocking(move || HangGuard::stop(servers, what)).await??;
                running.what = what;
                running.began = Instant::now();
                running.guard = Some(guard);
                running.resume_at = Some(running.began + self.plan.hang);
            }
        }
        Ok(running)
    }

    fn slots(&self, role: Role) -> &[Slot] {
        match role {
            Role::Writer => &self.writers,
            Role::Consumer => &self.consumers,
        }
    }

    /// SIGKILLs the next live process (round robin: w0, c0, w1, c1, …), tracks its takeover
    /// when `timed`, schedules its restart.
    async fn kill_next(&mut self, start: Instant, timed: bool) -> ChaosResult<()> {
        let mut order = Vec::new();
        for i in 0..self.plan.writers.max(self.plan.consumers) {
            if i < self.plan.writers {
                order.push((Role::Writer, i));
            }
            if i < self.plan.consumers {
                order.push((Role::Consumer, i));
            }
        }
        let n = order.len();
        let Some((role, index)) = (0..n)
            .map(|i| order[(self.kills + i) % n])
            .find(|&(role, i)| self.slots(role)[i].node.is_some())
        else {
            return Ok(());
        };
        let restart_delay = self.plan.restart_delay;
        let slot = match role {
            Role::Writer => &mut self.writers[index],
            Role::Consumer => &mut self.consumers[index],
        };
        let Some(mut node) = slot.node.take() else {
            return Ok(());
        };
        let instance = node.heard(|h| h.instance);
        node.child.kill()?;
        let killed_at = Instant::now();
        let _ = node.child.wait();
        slot.restart_at = Some(killed_at + restart_delay);
        self.kills += 1;
        if role == Role::Consumer {
            self.consumer_kills += 1;
            self.killed_consumers.push(node.label.clone());
        }
        let at = (killed_at - start).as_secs_f64();
        println!(
            "killed {} at {at:.1}s{}",
            node.label,
            if timed { "" } else { " (overlapping)" }
        );
        if let Some(dead) = instance
            && timed
        {
            // Writer 0's partitions wait for its 300 s lease unless its lock frees them: watched
            // past the crash bound only long enough to fail it.
            let crash = role == Role::Writer && index == 0;
            let window = if crash {
                Duration::from_secs_f64(self.plan.crash_takeover_bound_s + 10.0)
            } else {
                self.plan.lease + Duration::from_secs(10)
            };
            let (schema, queue) = match role {
                Role::Writer => (self.names.writer_schema.clone(), "wb_outbox"),
                Role::Consumer => (self.names.consumer_schema.clone(), "wb_inbox"),
            };
            self.trackers.push((
                crash,
                tokio::spawn(track_takeover(
                    Db::new(&self.db_url),
                    schema,
                    queue,
                    dead,
                    killed_at,
                    window,
                )),
            ));
        }
        Ok(())
    }

    /// Publishes the poison messages, as a foreign client: events of a type no service here
    /// knows, on the run's topic. Each consumer that receives one rejects it and the broker
    /// moves it to the subscription's dead-letter queue.
    async fn poison(&mut self) -> ChaosResult<()> {
        use fe2o3_amqp::{Connection, Sender, Session};
        if self.args.poison == 0 {
            return Ok(());
        }
        let mut connection = Connection::open("chaos-poison", self.amqp_url.as_str()).await?;
        let mut session = Session::begin(&mut connection).await?;
        let mut sender = Sender::attach(
            &mut session,
            "poison",
            format!("/exchange/{}", self.names.topic),
        )
        .await?;
        for i in 0..self.args.poison {
            let envelope = whizbang::Envelope::new(
                whizbang::envelope::MessageKind::Event,
                "ChaosPoison",
                format!("poison-{i}"),
                vec![0xc1, 0xff, 0x00],
            );
            let message = whizbang::transport::amqp::wire::to_message(&envelope);
            let outcome = tokio::time::timeout(Duration::from_secs(10), sender.send(message))
                .await
                .map_err(|_| "the broker did not take a poison message within 10 s")??;
            if !outcome.is_accepted() {
                return Err(format!("the broker refused a poison message: {outcome:?}").into());
            }
            self.poisoned += 1;
        }
        let _ = sender.close().await;
        let _ = session.end().await;
        let _ = connection.close().await;
        self.log
            .push(format!("{} poison messages sent", self.poisoned));
        Ok(())
    }

    /// The dead-letter phase, once the writers are done: waits until the perspective's
    /// failing events are dead-lettered in the consumers' inbox and the poison messages are in
    /// the broker's dead-letter queue (both counted with the operator CLI), then heals the
    /// perspective and requeues the inbox's dead letters with `whizbang dead-letters requeue`.
    async fn dead_letters(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_timeout_s);
        let c = self.names.consumer_schema.clone();
        let w = self.names.writer_schema.clone();
        let sql = format!(
            "SELECT (SELECT count(*) FROM {c}.wb_inbox WHERE dead)::bigint, \
                    (SELECT count(*) FROM {w}.wb_outbox)::bigint"
        );
        let mut last;
        loop {
            match self.db.pair(&sql).await {
                Ok((dead, outbox)) if dead >= self.plan.failing as i64 && outbox == 0 => {
                    match self.broker_dead_letters().await {
                        Ok(n) if n >= self.poisoned as i64 => {
                            self.dead.broker = n;
                            break;
                        }
                        Ok(n) => last = format!("{n} of {} poison messages", self.poisoned),
                        Err(e) => last = e,
                    }
                }
                Ok((dead, outbox)) => {
                    last = format!(
                        "{dead} of {} dead letters in the inbox, {outbox} outbox rows",
                        self.plan.failing
                    )
                }
                Err(e) => last = e,
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "dead letters not in place within {}s: {last}",
                    self.args.drain_timeout_s
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let listed = self.cli(&[
            "dead-letters",
            "list",
            "--queue",
            "inbox",
            "--output",
            "json",
        ])?;
        self.dead.store = serde_json::from_str::<serde_json::Value>(&listed)
            .map_err(|e| format!("whizbang dead-letters list --output json: {e}: {listed}"))?
            .as_array()
            .map_or(0, |a| a.len() as i64);
        std::fs::write(self.healed_file(), b"healed\n").map_err(|e| e.to_string())?;
        let requeued = self.cli(&["dead-letters", "requeue", "--all", "--queue", "inbox"])?;
        self.dead.requeued = requeued
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("whizbang dead-letters requeue said: {requeued}"))?;
        println!(
            "dead letters: {} in the inbox, {} at the broker; {} requeued",
            self.dead.store, self.dead.broker, self.dead.requeued
        );
        self.log.push(format!(
            "dead letters: {} inbox, {} broker, {} requeued",
            self.dead.store, self.dead.broker, self.dead.requeued
        ));
        Ok(())
    }

    /// The messages in the subscription's dead-letter queue at the broker, as
    /// `whizbang dead-letters broker` counts them.
    async fn broker_dead_letters(&mut self) -> Result<i64, String> {
        let spec = format!("{}:{SUBSCRIPTION}", self.names.topic);
        let out = self.cli(&[
            "dead-letters",
            "broker",
            "--subscription",
            &spec,
            "--output",
            "json",
        ])?;
        let queue = self.names.dead_letter_queue();
        serde_json::from_str::<serde_json::Value>(&out)
            .map_err(|e| format!("whizbang dead-letters broker --output json: {e}: {out}"))?
            .as_array()
            .and_then(|a| a.iter().find(|q| q["queue"] == queue.as_str()))
            .and_then(|q| q["messages"].as_i64())
            .ok_or_else(|| format!("no {queue} in: {out}"))
    }

    /// Runs the operator CLI (`whizbang`, built beside this binary) as the consumer service;
    /// its standard output.
    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let cli = exe.with_file_name("whizbang");
        let out = Process::new(&cli)
            .arg("--config")
            .arg(&self.args.config)
            .args(args)
            .env("WHIZBANG_SCHEMA", &self.names.consumer_schema)
            .env("WHIZBANG_SERVICE_NAME", crate::node::CONSUMER_SERVICE)
            .output()
            .map_err(|e| {
                format!(
                    "cannot run {} ({e}): build it with `cargo build --release --bin whizbang`",
                    cli.display()
                )
            })?;
        if !out.status.success() {
            return Err(format!(
                "whizbang {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the outbox and inbox are empty and the read model holds every event.
    async fn drain(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_timeout_s);
        let (w, c, r) = (
            &self.names.writer_schema,
            &self.names.consumer_schema,
            &self.names.read_schema,
        );
        let sql = format!(
            "SELECT (SELECT count(*) FROM {w}.wb_events)::bigint \
                  - (SELECT count(DISTINCT message_id) FROM {r}.chaos_applied)::bigint, \
                    (SELECT count(*) FROM {w}.wb_outbox)::bigint \
                  + (SELECT count(*) FROM {c}.wb_inbox)::bigint \
                  + (SELECT count(*) FROM {c}.wb_outbox)::bigint"
        );
        let mut last;
        loop {
            match self.db.pair(&sql).await {
                Ok((unapplied, pending)) => {
                    last = format!("{unapplied} events not applied, {pending} rows pending");
                    if pending == 0 && unapplied <= 0 {
                        return Ok(());
                    }
                }
                Err(e) => last = e,
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not drained within {}s: {last}",
                    self.args.drain_timeout_s
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every node that still runs, and resumes a hung server; returns what went wrong.
    async fn stop_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for slot in self.writers.iter_mut().chain(self.consumers.iter_mut()) {
            slot.restart_at = None;
            if let Some(mut node) = slot.node.take()
                && let Err(e) = node.stop(Duration::from_secs(60)).await
            {
                errors.push(e);
            }
        }
        errors
    }

    /// Per kill: whether it was writer 0's (the long lease), and its takeover time.
    async fn takeovers(&mut self) -> Vec<(bool, f64)> {
        let mut out = Vec::new();
        for (crash, t) in self.trackers.drain(..) {
            if let Ok(s) = t.await {
                out.push((crash, s));
            }
        }
        out
    }

    async fn restart_results(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for (what, handle) in self.restarts.drain(..) {
            match handle.await {
                Ok(Ok(s)) => println!("{what} restart took {s:.1}s"),
                Ok(Err(e)) => errors.push(format!("{what} restart failed: {e}")),
                Err(e) => errors.push(format!("{what} restart panicked: {e}")),
            }
        }
        errors
    }

    /// The recovery time of each hang, and what went wrong.
    async fn hang_results(&mut self) -> (Vec<f64>, Vec<String>) {
        let mut times = Vec::new();
        let mut errors = Vec::new();
        for (what, handle) in self.hangs.drain(..) {
            match handle.await {
                Ok(Ok(s)) => {
                    println!("{what} hang: backlog moving {s:.1}s after SIGCONT");
                    times.push(s);
                }
                Ok(Err(e)) => errors.push(format!("{what} hang: {e}")),
                Err(e) => errors.push(format!("{what} hang recovery panicked: {e}")),
            }
        }
        (times, errors)
    }

    /// Every application in the read model, in the order they committed.
    async fn applications(&mut self) -> ChaosResult<Vec<Applied>> {
        let sql = format!(
            "SELECT stream, seq, message_id, label FROM {}.chaos_applied ORDER BY n",
            self.names.read_schema
        );
        let rows = self.db.rows(&sql).await?;
        Ok(rows
            .iter()
            .map(|r| Applied {
                stream: r.get(0),
                seq: r.get::<_, i64>(1) as u64,
                message_id: r.get(2),
                label: r.get(3),
            })
            .collect())
    }

    async fn committed(&mut self) -> ChaosResult<Vec<Committed>> {
        let sql = format!(
            "SELECT stream_id, version, message_id FROM {}.wb_events ORDER BY position",
            self.names.writer_schema
        );
        let rows = self.db.rows(&sql).await?;
        Ok(rows
            .iter()
            .map(|r| Committed {
                stream: r.get(0),
                version: r.get::<_, i64>(1) as u64,
                message_id: r.get(2),
            })
            .collect())
    }

    async fn stuck_rows(&mut self) -> ChaosResult<i64> {
        let (w, c) = (&self.names.writer_schema, &self.names.consumer_schema);
        let sql = format!(
            "SELECT (SELECT count(*) FROM {w}.wb_outbox)::bigint + (SELECT count(*) FROM {w}.wb_inbox)::bigint, \
                    (SELECT count(*) FROM {c}.wb_outbox)::bigint + (SELECT count(*) FROM {c}.wb_inbox)::bigint"
        );
        let (writer, consumer) = self.db.pair(&sql).await?;
        Ok(writer + consumer)
    }

    fn write_results(&self, figures: &[(&str, String)], failures: &[String]) -> ChaosResult<()> {
        let mut map = serde_json::Map::new();
        for (name, value) in figures {
            let v = value
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or_else(|| serde_json::Value::String(value.clone()), Into::into);
            map.insert(name.to_string(), v);
        }
        let commit = Process::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(whizbang_tools_common::workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let results = serde_json::json!({
            "run": self.names.id,
            "form": if self.args.short { "short" } else { "full" },
            "commit": commit,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "figures": map,
            "events": self.log,
            "failures": failures,
        });
        let path = whizbang_tools_common::target_dir()
            .join("chaos")
            .join("results.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
        println!("results written to {}", path.display());
        Ok(())
    }

    async fn clean_up(&mut self) {
        let sql = format!(
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE; \
             DROP SCHEMA IF EXISTS {} CASCADE",
            self.names.writer_schema, self.names.consumer_schema, self.names.read_schema
        );
        if let Err(e) = self.db.batch(&sql).await {
            println!("could not drop the run's schemas: {e}");
        }
        if let Err(e) = amqp_topology::topology(&[self.names.topology_spec(self.shards)], true) {
            println!("could not delete the run's topic: {e}");
        }
    }
}

/// How long partitions leased to the dead instance kept work waiting: the last moment, after
/// the kill, at which one of them still had rows in `queue` (`wb_outbox` of a writer,
/// `wb_inbox` of a consumer; 0 when none ever had). A partition holding a dead letter is left
/// out: its stream waits for the requeue, not for a takeover. Watches for `window`; rows still
/// waiting at its end count the whole window.
async fn track_takeover(
    mut db: Db,
    schema: String,
    queue: &'static str,
    dead: Uuid,
    killed_at: Instant,
    window: Duration,
) -> f64 {
    let sql = format!(
        "SELECT count(*)::bigint, 0::bigint FROM {schema}.wb_partition_leases l \
          WHERE l.instance_id = '{dead}' \
            AND EXISTS (SELECT 1 FROM {schema}.{queue} o WHERE o.partition = l.partition) \
            AND NOT EXISTS (SELECT 1 FROM {schema}.{queue} d \
                             WHERE d.partition = l.partition AND d.dead)"
    );
    let step = Duration::from_millis(100);
    let mut last_waiting: Option<Duration> = None;
    while killed_at.elapsed() < window {
        let asked_at = killed_at.elapsed();
        if let Ok((waiting, _)) = db.pair(&sql).await
            && waiting > 0
        {
            last_waiting = Some(asked_at);
        }
        tokio::time::sleep(step).await;
    }
    last_waiting.map_or(0.0, |t| (t + step).as_secs_f64())
}

/// The events applied at least once (the read model's distinct message ids).
async fn applied_count(db: &mut Db, read_schema: &str) -> Result<i64, String> {
    let sql = format!(
        "SELECT count(DISTINCT message_id)::bigint, 0::bigint FROM {read_schema}.chaos_applied"
    );
    db.pair(&sql).await.map(|(n, _)| n)
}

/// From SIGCONT (`resumed`) until the consumers apply again: the read model grows beyond
/// `baseline` (for a Postgres hang, what it held before the SIGSTOP: nothing can commit while
/// the server is stopped; for a broker hang, what it holds at SIGCONT). Watched for 60 s; a
/// backlog that never moves again is an error. When there is no backlog to move (the writers'
/// outbox and the consumers' inbox empty but for streams waiting behind a dead letter) and the
/// read model did not grow, the recovery is 0: nothing was held up.
async fn hang_recovery(
    mut db: Db,
    names: (String, String, String),
    resumed: Instant,
    baseline: Option<i64>,
) -> Result<f64, String> {
    let (w, c, read_schema) = names;
    let backlog_sql = format!(
        "SELECT (SELECT count(*) FROM {w}.wb_outbox)::bigint \
              + (SELECT count(*) FROM {c}.wb_inbox i WHERE NOT EXISTS \
                   (SELECT 1 FROM {c}.wb_inbox d WHERE d.dead AND d.stream_id = i.stream_id))::bigint, \
                0::bigint"
    );
    let limit = Duration::from_secs(60);
    let mut baseline = baseline;
    loop {
        if let Ok(now) = applied_count(&mut db, &read_schema).await {
            match baseline {
                None => baseline = Some(now),
                Some(b) if now > b => return Ok(resumed.elapsed().as_secs_f64()),
                Some(_) => {
                    if let Ok((0, _)) = db.pair(&backlog_sql).await {
                        return Ok(0.0);
                    }
                }
            }
        }
        if resumed.elapsed() > limit {
            return Err(format!(
                "the read model did not grow within {limit:?} after SIGCONT"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server fault of the run.
#[derive(Clone, Copy)]
enum Fault {
    Restart(&'static str),
    Hang(&'static str),
}

/// The server fault under way.
struct Running {
    what: &'static str,
    began: Instant,
    /// Whether the overlapping kill happened.
    overlapped: bool,
    /// A restart: its index in `Run::restarts`.
    restart: Option<usize>,
    /// A hang: the guard that resumes the server, and when.
    guard: Option<HangGuard>,
    resume_at: Option<Instant>,
    applied_before: Option<i64>,
    finished: bool,
}

// ---- the database, as an observer -----------------------------------------------------

/// A connection that is made again after an error (the server restarts mid-run).
struct Db {
    url: String,
    client: Option<tokio_postgres::Client>,
}

impl Db {
    fn new(url: &str) -> Db {
        Db {
            url: url.into(),
            client: None,
        }
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| "timed out connecting to Postgres".to_string())?
            .map_err(|e| format!("cannot connect to Postgres: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        self.client.as_ref().ok_or_else(|| "no connection".into())
    }

    async fn rows(&mut self, sql: &str) -> Result<Vec<tokio_postgres::Row>, String> {
        let result = {
            let client = self.client().await?;
            tokio::time::timeout(Duration::from_secs(30), client.query(sql, &[])).await
        };
        match result {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                self.client = None;
                Err(format!("query failed: {e}"))
            }
            Err(_) => {
                self.client = None;
                Err("query timed out".into())
            }
        }
    }

    /// A query answering one row of two bigints.
    async fn pair(&mut self, sql: &str) -> Result<(i64, i64), String> {
        let rows = self.rows(sql).await?;
        let row = rows.first().ok_or("no row")?;
        Ok((row.get(0), row.get(1)))
    }

    async fn batch(&mut self, sql: &str) -> Result<(), String> {
        let client = self.client().await?;
        client.batch_execute(sql).await.map_err(|e| e.to_string())
    }
}
