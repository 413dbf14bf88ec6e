//! The orchestrator of a chaos run: starts the consumer and the writer processes, kills a
//! writer with SIGKILL every few seconds and starts it again, restarts the broker once and the
//! Postgres server once mid-run, measures how long each dead writer's partitions stay stuck
//! behind its leases, waits for the run to drain, stops everything gracefully and judges.
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
use crate::servers::Servers;
use crate::verdict::{self, Applied, Committed};
use clap::Args;
use serde::Deserialize;
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
}

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
        };
        if plan.writers < 2 || plan.streams == 0 || plan.events == 0 || plan.rate <= 0.0 {
            return Err("need at least 2 writers, 1 stream, 1 event and a positive rate".into());
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
    topic: String,
}

impl Names {
    fn new() -> Names {
        let id = Uuid::now_v7().simple().to_string()[20..].to_string();
        Names {
            writer_schema: format!("chaos_{id}_w"),
            consumer_schema: format!("chaos_{id}_c"),
            topic: format!("chaos-{id}"),
            id,
        }
    }

    fn topology_spec(&self) -> String {
        format!("{}:{SUBSCRIPTION}", self.topic)
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
        !args.no_broker_restart,
        !args.no_postgres_restart,
        config.store.database_url.expose_secret(),
    )
    .map_err(|e| format!("{e} (or pass --no-broker-restart --no-postgres-restart)"))?;
    let db_url = config.store.database_url.expose_secret().to_string();
    println!(
        "chaos run {}: {} writers, {} streams x {} events at {}/s, a kill every {:?}, lease {:?} \
         (writer 0: {} s), heartbeat {:?}; logs in {}",
        names.id,
        plan.writers,
        plan.streams,
        plan.events,
        plan.rate,
        plan.kill_every,
        plan.lease,
        plan.crash_lease_s,
        plan.heartbeat,
        dir.display()
    );
    amqp_topology::topology(&[names.topology_spec()], false)?;
    let mut run = Run {
        plan,
        names,
        dir,
        args: args.clone(),
        db: Db::new(&db_url),
        db_url,
        servers,
        writers: Vec::new(),
        consumer: None,
        kills: 0,
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
            "kept for inspection: schemas {} and {}, topic {}, logs in {}",
            run.names.writer_schema,
            run.names.consumer_schema,
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
    applied: u64,
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
                    Some(("applied", n)) => heard.applied = n.parse().unwrap_or(heard.applied),
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

/// A writer slot: the process now running it (none while it is dead) and its incarnations.
struct WriterSlot {
    node: Option<Node>,
    incarnation: u32,
    restart_at: Option<Instant>,
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
    writers: Vec<WriterSlot>,
    consumer: Option<Node>,
    kills: usize,
    /// Per kill: whether the writer had the long lease (a crash takeover), and its tracker.
    trackers: Vec<(bool, JoinHandle<f64>)>,
    restarts: Vec<(&'static str, JoinHandle<Result<f64, String>>)>,
    log: Vec<String>,
}

impl Run {
    async fn execute(&mut self) -> ChaosResult<bool> {
        let run_started = Instant::now();
        self.start_consumer().await?;
        for index in 0..self.plan.writers {
            self.writers.push(WriterSlot {
                node: None,
                incarnation: 0,
                restart_at: None,
            });
            self.start_writer(index)?;
        }
        for slot in &mut self.writers {
            if let Some(node) = slot.node.as_mut() {
                node.started(Duration::from_secs(90)).await?;
            }
        }
        self.drive().await?;
        let drained = self.drain().await;
        if let Err(e) = &drained {
            println!("drain: {e}");
        }
        // Stop gracefully first: the consumer writes its applications as it stops.
        let stopped = self.stop_all().await;
        let takeovers = self.takeovers().await;
        let restart_errors = self.restart_results().await;
        let applied = self.applications()?;
        let committed = self.committed().await?;
        let stuck_rows = self.stuck_rows().await?;
        let counts = verdict::count(&committed, &applied);
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
            ("kills", self.kills.to_string()),
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
        let done = self.log.iter().filter(|l| l.starts_with(what)).count();
        let failed = errors.iter().filter(|e| e.starts_with(what)).count();
        (done - failed.min(done)).to_string()
    }

    async fn start_consumer(&mut self) -> ChaosResult<()> {
        let args = ConsumerArgs {
            node: NodeArgs {
                config: self.args.config.clone(),
                schema: self.names.consumer_schema.clone(),
                topic: self.names.topic.clone(),
                lease_seconds: None,
            },
            out: self.dir.join("applied.json"),
        };
        let mut node = Node::start("consumer".into(), args.to_args(), &self.dir)?;
        node.started(Duration::from_secs(90)).await?;
        self.consumer = Some(node);
        Ok(())
    }

    fn start_writer(&mut self, index: usize) -> ChaosResult<()> {
        let args = WriterArgs {
            node: NodeArgs {
                config: self.args.config.clone(),
                schema: self.names.writer_schema.clone(),
                topic: self.names.topic.clone(),
                lease_seconds: (index == 0).then_some(self.plan.crash_lease_s),
            },
            index,
            writers: self.plan.writers,
            streams: self.plan.streams,
            events: self.plan.events,
            rate: self.plan.rate / self.plan.writers as f64,
        };
        let slot = &mut self.writers[index];
        slot.incarnation += 1;
        let label = format!("writer-{index}.{}", slot.incarnation);
        let node = Node::start(label, args.to_args(), &self.dir)?;
        slot.node = Some(node);
        slot.restart_at = None;
        Ok(())
    }

    /// Until every writer has stored all its events: kills, restarts and server restarts.
    ///
    /// The faults take turns: a kill every `kill_every`; after a set number of kills the
    /// broker restarts, after more the Postgres server, each once the last kill's takeover had
    /// time to complete (lease + 2 s); kills resume 2 s after the broker is back, and the
    /// heartbeat + 4 s after the Postgres server is (every instance takes its liveness lock
    /// again and heartbeats once, so that the instances see each other alive again). So a
    /// takeover time measures leases and locks, never a server's absence. A restart whose turn
    /// has not come when the writers finish happens then, before the drain.
    async fn drive(&mut self) -> ChaosResult<()> {
        let start = Instant::now();
        let deadline = self.plan.drive_time() * 3 + Duration::from_secs(120);
        let mut pending: Vec<(usize, &'static str)> = Vec::new();
        if !self.args.no_broker_restart {
            pending.push((self.plan.kills_before_broker, "broker"));
        }
        if !self.args.no_postgres_restart {
            pending.push((self.plan.kills_before_postgres, "postgres"));
        }
        let settle = self.plan.lease + Duration::from_secs(2);
        let mut next_kill = start + Duration::from_secs(2).min(self.plan.kill_every);
        let mut last_kill: Option<Instant> = None;
        let mut restart_running: Option<usize> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let elapsed = now - start;

            // A server restart finished: kills resume a little later.
            if let Some(i) = restart_running
                && self.restarts[i].1.is_finished()
            {
                restart_running = None;
                let pause = if self.restarts[i].0 == "postgres" {
                    self.plan.heartbeat + Duration::from_secs(4)
                } else {
                    Duration::from_secs(2)
                };
                next_kill = next_kill.max(now + pause);
            }

            // Restart writers whose time has come.
            for index in 0..self.writers.len() {
                if self.writers[index].restart_at.is_some_and(|t| now >= t) {
                    self.start_writer(index)?;
                }
            }

            // A writer that exited on its own is a failure of the run.
            for slot in &mut self.writers {
                if let Some(node) = slot.node.as_mut()
                    && let Some(status) = node.exited()
                {
                    return Err(format!(
                        "{} exited on its own ({status}):\n{}",
                        node.label,
                        node.log_tail()
                    )
                    .into());
                }
            }
            if let Some(node) = self.consumer.as_mut()
                && let Some(status) = node.exited()
            {
                return Err(format!("the consumer exited ({status}):\n{}", node.log_tail()).into());
            }

            let all_done = self.writers.iter().all(|s| {
                s.restart_at.is_none() && s.node.as_ref().is_some_and(|n| n.heard(|h| h.done))
            });
            if all_done && pending.is_empty() && restart_running.is_none() {
                return Ok(());
            }
            if elapsed > deadline {
                return Err(
                    format!("the writers did not store their events within {deadline:?}").into(),
                );
            }
            if restart_running.is_some() {
                continue;
            }

            // A server restart whose turn has come (or the writers are done), once the last
            // kill's takeover had its time.
            let turn = pending
                .first()
                .is_some_and(|&(after, _)| self.kills >= after || all_done);
            if turn {
                if last_kill.is_none_or(|t| now - t >= settle) {
                    let (_, what) = pending.remove(0);
                    self.log
                        .push(format!("{what} restart at {:.1}s", elapsed.as_secs_f64()));
                    println!("restarting {what} at {:.1}s", elapsed.as_secs_f64());
                    let servers = self.servers.clone();
                    let handle = tokio::task::spawn_blocking(move || servers.restart(what));
                    self.restarts.push((what, handle));
                    restart_running = Some(self.restarts.len() - 1);
                }
                continue;
            }

            if now >= next_kill && !all_done {
                next_kill = now + self.plan.kill_every;
                last_kill = Some(now);
                self.kill_next(start).await?;
            }
        }
    }

    /// SIGKILLs the next live writer (round robin), tracks its takeover, schedules its restart.
    async fn kill_next(&mut self, start: Instant) -> ChaosResult<()> {
        let n = self.writers.len();
        let Some(index) = (0..n)
            .map(|i| (self.kills + i) % n)
            .find(|&i| self.writers[i].node.is_some())
        else {
            return Ok(());
        };
        let slot = &mut self.writers[index];
        let Some(mut node) = slot.node.take() else {
            return Ok(());
        };
        let instance = node.heard(|h| h.instance);
        node.child.kill()?;
        let killed_at = Instant::now();
        let _ = node.child.wait();
        slot.restart_at = Some(killed_at + self.plan.restart_delay);
        self.kills += 1;
        let at = (killed_at - start).as_secs_f64();
        println!("killed {} at {at:.1}s", node.label);
        if let Some(dead) = instance {
            // Writer 0's partitions wait for its 300 s lease unless its lock frees them: watched
            // past the crash bound only long enough to fail it.
            let crash = index == 0;
            let window = if crash {
                Duration::from_secs_f64(self.plan.crash_takeover_bound_s + 10.0)
            } else {
                self.plan.lease + Duration::from_secs(10)
            };
            self.trackers.push((
                crash,
                tokio::spawn(track_takeover(
                    Db::new(&self.db_url),
                    self.names.writer_schema.clone(),
                    dead,
                    killed_at,
                    window,
                )),
            ));
        }
        Ok(())
    }

    /// Waits until the outbox and inbox are empty and the consumer applied every event.
    async fn drain(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(self.args.drain_timeout_s);
        let w = self.names.writer_schema.clone();
        let c = self.names.consumer_schema.clone();
        let sql = format!(
            "SELECT (SELECT count(*) FROM {w}.wb_events)::bigint, \
                    (SELECT count(*) FROM {w}.wb_outbox)::bigint \
                  + (SELECT count(*) FROM {c}.wb_inbox)::bigint \
                  + (SELECT count(*) FROM {c}.wb_outbox)::bigint"
        );
        let mut last;
        loop {
            let applied = self.consumer.as_ref().map_or(0, |n| n.heard(|h| h.applied));
            match self.db.pair(&sql).await {
                Ok((committed, pending)) => {
                    last =
                        format!("{committed} committed, {applied} applied, {pending} rows pending");
                    if pending == 0 && applied >= committed as u64 {
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

    /// Stops every node that still runs; returns what went wrong.
    async fn stop_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for slot in &mut self.writers {
            slot.restart_at = None;
            if let Some(mut node) = slot.node.take()
                && let Err(e) = node.stop(Duration::from_secs(60)).await
            {
                errors.push(e);
            }
        }
        if let Some(mut node) = self.consumer.take()
            && let Err(e) = node.stop(Duration::from_secs(60)).await
        {
            errors.push(e);
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

    fn applications(&self) -> ChaosResult<Vec<Applied>> {
        #[derive(Deserialize)]
        struct Report {
            applied: Vec<Applied>,
        }
        let path = self.dir.join("applied.json");
        let text = std::fs::read(&path)
            .map_err(|e| format!("the consumer left no {}: {e}", path.display()))?;
        Ok(serde_json::from_slice::<Report>(&text)?.applied)
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
            "DROP SCHEMA IF EXISTS {} CASCADE; DROP SCHEMA IF EXISTS {} CASCADE",
            self.names.writer_schema, self.names.consumer_schema
        );
        if let Err(e) = self.db.batch(&sql).await {
            println!("could not drop the run's schemas: {e}");
        }
        if let Err(e) = amqp_topology::topology(&[self.names.topology_spec()], true) {
            println!("could not delete the run's topic: {e}");
        }
    }
}

/// How long partitions leased to the dead instance kept work waiting: the last moment, after
/// the kill, at which one of them still had outbox rows (0 when none ever had). Watches for
/// `window`; rows still waiting at its end count the whole window.
async fn track_takeover(
    mut db: Db,
    schema: String,
    dead: Uuid,
    killed_at: Instant,
    window: Duration,
) -> f64 {
    let sql = format!(
        "SELECT count(*)::bigint, 0::bigint FROM {schema}.wb_partition_leases l \
          WHERE l.instance_id = '{dead}' \
            AND EXISTS (SELECT 1 FROM {schema}.wb_outbox o WHERE o.partition = l.partition)"
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
