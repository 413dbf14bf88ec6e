//! `engine`: the runtime under the stresses production brings (issue 26), each phase measured
//! against its own baseline or bound in the same run.
//!
//! - `cpu_receptor_scaling_ratio`: `local_invoke` throughput with a receptor that burns
//!   `--burn-us` of CPU per command, `--callers` callers on as many streams, in-memory store,
//!   `runtime.worker_threads` = 2 against 1 in alternating rounds (median of each).
//! - `heartbeat_under_cpu_hog_lost_leases`: Postgres store with the chaos run's short leases
//!   (3 s, heartbeat 1 s), one worker thread, and a receptor that blocks that thread for twice
//!   the lease: how many of the instance's leases expired while it held them (sampled from the
//!   table every 100 ms).
//! - `overload_*`: Postgres store, callers offered `--overload-factor` × the rate the instance
//!   sustains (measured first, closed loop) for `--overload-secs`, each with a 1 s deadline:
//!   resident memory at the end less after the first 5 s, the accepted calls' p99, how many
//!   were refused `Overloaded`, and `overload_goodput_ratio`: calls accepted per second over
//!   the sustained rate.
//! - `pg_stall_*` (skipped with `--no-stall`): the Postgres server the bench talks to (its
//!   postmaster, found through `data_directory`, and every process it started) stopped
//!   (SIGSTOP) for `--stall-secs` while callers keep calling: the longest any caller waited for
//!   its (retryable) error, and after SIGCONT whether every command answered `Ok` is in the
//!   store. It pauses that server: point `--database-url` at a server of its own (e.g. a second
//!   cluster, `pg_createcluster 15 bench --port 5435 --start`) when anything else uses the
//!   machine's.

use crate::{BenchResult, Samples, figure, raw_client};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::ExposeSecret;
use whizbang::config::StoreBackend;
use whizbang::{
    Command, Config, Decision, DispatchError, DispatchOptions, Event, EventMeta, Message,
    Perspective, PerspectiveError, Receptor, ReceptorContext, ReceptorError, Runtime,
};

/// Arguments of the `engine` suite.
#[derive(Args)]
pub struct EngineArgs {
    /// Concurrent callers (each on its own stream) of the CPU-scaling phase.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// CPU each command's receptor burns, in microseconds.
    #[arg(long, default_value_t = 100)]
    burn_us: u64,
    /// Rounds of each worker count in the CPU-scaling phase (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each CPU-scaling round.
    #[arg(long, default_value_t = 3)]
    round_secs: u64,
    /// Seconds the overload is offered.
    #[arg(long, default_value_t = 60)]
    overload_secs: u64,
    /// The offered rate of the overload phase, as a multiple of the sustained one.
    #[arg(long, default_value_t = 5.0)]
    overload_factor: f64,
    /// Seconds the Postgres server is stopped in the stall phase.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
    /// Skip the stall phase (it pauses the Postgres server at the database URL).
    #[arg(long)]
    no_stall: bool,
    /// Postgres URL (default: WHIZBANG_DATABASE_URL, then the local server).
    #[arg(long)]
    database_url: Option<String>,
}

// ---- The workload ------------------------------------------------------------------------

/// A command whose receptor burns `burn_us` of CPU (or blocks its thread for `block_ms`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Work {
    stream: String,
    burn_us: u64,
    block_ms: u64,
}

impl Message for Work {
    const TYPE_NAME: &'static str = "bench.engine.Work";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Work {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Worked {
    stream: String,
    token: Uuid,
}

impl Message for Worked {
    const TYPE_NAME: &'static str = "bench.engine.Worked";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Worked {}

struct WorkReceptor;

impl Receptor<Work> for WorkReceptor {
    type Result = Uuid;

    async fn handle(
        &self,
        cmd: Work,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Uuid>, ReceptorError> {
        if cmd.burn_us > 0 {
            burn(Duration::from_micros(cmd.burn_us));
        }
        if cmd.block_ms > 0 {
            // Blocks the thread, as code that calls a synchronous API does.
            std::thread::sleep(Duration::from_millis(cmd.block_ms));
        }
        let token = Uuid::now_v7();
        Ok(Decision::new(token).emit(&Worked {
            stream: cmd.stream,
            token,
        }))
    }
}

/// Counts the events it applied.
#[derive(Clone, Default)]
struct Applied(Arc<AtomicU64>);

impl Perspective<Worked> for Applied {
    async fn apply(&self, _e: Worked, _meta: EventMeta) -> Result<(), PerspectiveError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Spins on the CPU for `d` (wall time; the machine is otherwise idle in this phase).
fn burn(d: Duration) -> u64 {
    let start = Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    while start.elapsed() < d {
        for _ in 0..64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        }
    }
    std::hint::black_box(x)
}

fn work(stream: String, burn_us: u64) -> Work {
    Work {
        stream,
        burn_us,
        block_ms: 0,
    }
}

fn memory_config(worker_threads: u32) -> Config {
    let mut c = Config::default();
    c.service.name = "bench-engine".into();
    c.runtime.worker_threads = worker_threads;
    c.partitions.max_partitions_per_instance = c.partitions.partition_count;
    c
}

fn postgres_config(args: &EngineArgs, schema: &str) -> Config {
    let mut c = memory_config(0);
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = crate::database_url(args.database_url.as_deref()).into();
    c.store.schema = schema.into();
    c
}

async fn start(config: Config) -> BenchResult<(Runtime, Applied)> {
    let applied = Applied::default();
    let runtime = Runtime::builder(config)
        .receptor::<Work, _>(WorkReceptor)
        .perspective::<Worked, _>("applied", applied.clone())
        .start()
        .await?;
    Ok((runtime, applied))
}

async fn drop_schema(url: &str, schema: &str) {
    if let Ok(client) = raw_client(url).await {
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await;
    }
}

// ---- The suite ---------------------------------------------------------------------------

pub async fn engine(args: EngineArgs) -> BenchResult<()> {
    cpu_scaling(&args).await?;
    heartbeat_under_hog(&args).await?;
    overload(&args).await?;
    if args.no_stall {
        eprintln!("whizbang-bench: engine: stall phase skipped (--no-stall)");
    } else {
        stall(&args).await?;
    }
    Ok(())
}

/// Completed calls per second with `callers` closed-loop callers for `secs`.
async fn closed_loop(
    runtime: &Runtime,
    callers: usize,
    burn_us: u64,
    secs: u64,
) -> BenchResult<f64> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let counts = futures::future::join_all((0..callers).map(|c| async move {
        let mut n = 0_u64;
        while Instant::now() < deadline {
            let _: Uuid = runtime
                .local_invoke(work(format!("c-{c}"), burn_us))
                .await?;
            n += 1;
        }
        Ok::<_, DispatchError>(n)
    }))
    .await;
    let mut total = 0;
    for n in counts {
        total += n?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn cpu_scaling(args: &EngineArgs) -> BenchResult<()> {
    let mut per_s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds.max(1) {
        // Alternating, so that both see the same machine.
        for (i, workers) in [(0, 1), (1, 2)] {
            let (runtime, _) = start(memory_config(workers)).await?;
            // Warm-up: the partition actors start and the allocator settles.
            closed_loop(&runtime, args.callers, args.burn_us, 1).await?;
            let rate = closed_loop(&runtime, args.callers, args.burn_us, args.round_secs).await?;
            runtime.shutdown().await?;
            eprintln!("engine: round {round}: worker_threads = {workers}: {rate:.0}/s");
            per_s[i].push(rate);
        }
    }
    let one = Samples::of(per_s[0].clone()).percentile(50.0);
    let two = Samples::of(per_s[1].clone()).percentile(50.0);
    figure("cpu_receptor_burn_us", args.burn_us);
    figure("cpu_receptor_per_s_1_worker", format!("{one:.0}"));
    figure("cpu_receptor_per_s_2_workers", format!("{two:.0}"));
    figure("cpu_receptor_scaling_ratio", format!("{:.2}", two / one));
    Ok(())
}

async fn heartbeat_under_hog(args: &EngineArgs) -> BenchResult<()> {
    let schema = format!("bench_engine_{}", Uuid::now_v7().simple());
    let mut config = postgres_config(args, &schema);
    config.partitions.lease_seconds = 3;
    config.partitions.heartbeat_seconds = 1;
    config.runtime.worker_threads = 1;
    let url = config.store.database_url.expose_secret().to_string();
    let lease = Duration::from_secs(config.partitions.lease_seconds);
    let result = async {
        let (runtime, _) = start(config).await?;
        let client = raw_client(&url).await?;
        // The instance takes leases: one command on each of 20 streams.
        for s in 0..20 {
            let _: Uuid = runtime.local_invoke(work(format!("h-{s}"), 0)).await?;
        }
        let me = runtime.instance_id();
        let held: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {schema}.wb_partition_leases WHERE instance_id = $1"
                ),
                &[&me],
            )
            .await?
            .get(0);
        // The hog: its receptor blocks the only worker thread for twice the lease.
        let hog = runtime.dispatcher().send(
            whizbang::LocalInvoke::<Work, Uuid>::new(Work {
                stream: "hog".into(),
                burn_us: 0,
                block_ms: 2 * lease.as_millis() as u64,
            })
            .with_options(DispatchOptions {
                deadline: Some(4 * lease),
                ..DispatchOptions::default()
            }),
        );
        let watch_until = Instant::now() + 2 * lease + Duration::from_secs(1);
        let mut lost = std::collections::BTreeSet::new();
        while Instant::now() < watch_until {
            for row in client
                .query(
                    &format!(
                        "SELECT partition FROM {schema}.wb_partition_leases \
                         WHERE instance_id = $1 AND expires_at < now()"
                    ),
                    &[&me],
                )
                .await?
            {
                lost.insert(row.get::<_, i32>(0));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let hog_answer = hog.await;
        runtime.shutdown().await?;
        figure("heartbeat_hog_block_ms", 2 * lease.as_millis());
        figure("heartbeat_hog_leases_held", held);
        figure("heartbeat_under_cpu_hog_lost_leases", lost.len());
        if let Ok(Err(e)) = hog_answer {
            eprintln!("engine: the hog's own call answered: {e}");
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    drop_schema(&url, &schema).await;
    result
}

/// Resident memory of this process, in MB.
fn rss_mb() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1_048_576.0
}

async fn overload(args: &EngineArgs) -> BenchResult<()> {
    let schema = format!("bench_engine_{}", Uuid::now_v7().simple());
    let mut config = postgres_config(args, &schema);
    let deadline = Duration::from_secs(1);
    config.runtime.dispatch_timeout_ms = deadline.as_millis() as u64;
    let url = config.store.database_url.expose_secret().to_string();
    let result = async {
        let (runtime, _) = start(config).await?;
        let runtime = Arc::new(runtime);
        let sustained = closed_loop(&runtime, 64, 0, 5).await?;
        let offered = sustained * args.overload_factor;
        let interval = Duration::from_secs_f64(1.0 / offered);
        let (accepted, overloaded, timed_out, other) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let end = started + Duration::from_secs(args.overload_secs);
        let mut rss_after_5s = None;
        let mut sent = 0_u64;
        let mut n = 0_u64;
        while Instant::now() < end {
            // Offered on schedule: every call due by now starts, however the earlier ones fare.
            let due = (started.elapsed().as_secs_f64() / interval.as_secs_f64()) as u64;
            while sent < due {
                sent += 1;
                n += 1;
                let (runtime, latencies) = (runtime.clone(), latencies.clone());
                let counters = (
                    accepted.clone(),
                    overloaded.clone(),
                    timed_out.clone(),
                    other.clone(),
                );
                actix::spawn(async move {
                    let t = Instant::now();
                    let answer: Result<Uuid, _> = runtime
                        .local_invoke(work(format!("o-{}", n % 1000), 0))
                        .await;
                    match answer {
                        Ok(_) => {
                            counters.0.fetch_add(1, Ordering::Relaxed);
                            latencies.lock().unwrap().push(t.elapsed());
                        }
                        Err(DispatchError::Overloaded { .. }) => {
                            counters.1.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(DispatchError::Timeout { .. }) => {
                            counters.2.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.3.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            if rss_after_5s.is_none() && started.elapsed() >= Duration::from_secs(5) {
                rss_after_5s = Some(rss_mb());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let rss_end = rss_mb();
        // The calls still in flight end within their deadline.
        tokio::time::sleep(deadline + Duration::from_millis(500)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let accepted_p99 =
            Samples::new(std::mem::take(&mut *latencies.lock().unwrap())).percentile(99.0) / 1000.0;
        figure("overload_sustained_per_s", format!("{sustained:.0}"));
        figure("overload_offered_per_s", format!("{offered:.0}"));
        let accepted_per_s = accepted.load(Ordering::Relaxed) as f64 / elapsed;
        figure("overload_accepted_per_s", format!("{accepted_per_s:.0}"));
        // Goodput: what overloaded callers still get done within their deadlines, against what
        // the instance sustains (closed loop, 64 callers). Far below 1: congestion collapse.
        figure(
            "overload_goodput_ratio",
            format!("{:.2}", accepted_per_s / sustained),
        );
        figure("overload_rejected", overloaded.load(Ordering::Relaxed));
        figure("overload_timed_out", timed_out.load(Ordering::Relaxed));
        figure("overload_other_errors", other.load(Ordering::Relaxed));
        figure("overload_caller_deadline_ms", deadline.as_millis());
        figure("overload_accepted_p99_ms", format!("{accepted_p99:.1}"));
        figure(
            "overload_rss_growth_mb",
            format!("{:.1}", rss_end - rss_after_5s.unwrap_or(rss_end)),
        );
        match Arc::try_unwrap(runtime) {
            Ok(runtime) => runtime.shutdown().await?,
            Err(_) => eprintln!("engine: overload: calls still hold the runtime; not shut down"),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    drop_schema(&url, &schema).await;
    result
}

/// The postmaster of the server at `url`: the first line of `postmaster.pid` in its data
/// directory (read as the bench's user: run it as root or as the server's owner).
async fn postmaster_of(url: &str) -> BenchResult<u32> {
    let client = raw_client(url).await?;
    let dir: String = client.query_one("SHOW data_directory", &[]).await?.get(0);
    let pid_file = std::path::Path::new(&dir).join("postmaster.pid");
    let text = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
    let pid = text.lines().next().unwrap_or_default().trim().parse()?;
    Ok(pid)
}

/// Sends `signal` to the postmaster `pid` and to every process it started (the server the
/// bench talks to, and no other server of the machine). The postmaster first on STOP, so it
/// starts no new backend meanwhile; last on CONT.
fn signal_server(pid: u32, signal: &str) -> BenchResult<()> {
    let run = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
    };
    let (pid, signal) = (pid.to_string(), format!("-{signal}"));
    let postmaster = || run(&["kill", &signal, &pid]);
    let children = || run(&["pkill", &signal, "-P", &pid]);
    let (first, second) = if signal == "-STOP" {
        (postmaster()?, children()?)
    } else {
        (children()?, postmaster()?)
    };
    // pkill exits 1 when it matched nothing (a server with no children): not an error.
    if !first.success() && first.code() != Some(1) || !second.success() && second.code() != Some(1)
    {
        return Err(format!("signalling postmaster {pid} with {signal} failed").into());
    }
    Ok(())
}

/// Continues the server however the phase ends.
struct ContinueOnDrop(u32);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = signal_server(self.0, "CONT");
    }
}

async fn stall(args: &EngineArgs) -> BenchResult<()> {
    let schema = format!("bench_engine_{}", Uuid::now_v7().simple());
    let config = postgres_config(args, &schema);
    let statement_timeout = Duration::from_millis(config.store.statement_timeout_ms);
    let url = config.store.database_url.expose_secret().to_string();
    let postmaster = postmaster_of(&url).await?;
    let result = async {
        let (runtime, _) = start(config).await?;
        let runtime = Arc::new(runtime);
        let stall = Duration::from_secs(args.stall_secs);
        // Callers keep calling through the stall; each call's wait is timed.
        let stop_at = Instant::now() + stall + Duration::from_secs(2);
        let committed = Arc::new(std::sync::Mutex::new(Vec::<Uuid>::new()));
        let waits_for_error = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
        let callers: Vec<_> = (0..8)
            .map(|c| {
                let (runtime, committed, waits) =
                    (runtime.clone(), committed.clone(), waits_for_error.clone());
                actix::spawn(async move {
                    let mut n = 0;
                    while Instant::now() < stop_at {
                        n += 1;
                        let t = Instant::now();
                        let answer: Result<Uuid, _> = runtime
                            .local_invoke(work(format!("st-{c}-{}", n % 50), 0))
                            .await;
                        match answer {
                            Ok(token) => committed.lock().unwrap().push(token),
                            Err(e) => {
                                if !e.is_retryable() {
                                    eprintln!("engine: stall: a non-retryable error: {e}");
                                }
                                waits.lock().unwrap().push(t.elapsed());
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        {
            let _continue = ContinueOnDrop(postmaster);
            signal_server(postmaster, "STOP")?;
            tokio::time::sleep(stall).await;
        }
        let resumed = Instant::now();
        for c in callers {
            let _ = c.await;
        }
        // Everything answered Ok is in the store once it drains.
        let client = raw_client(&url).await?;
        let drained_by = Instant::now() + Duration::from_secs(60);
        loop {
            let pending: i64 = client
                .query_one(
                    &format!(
                        "SELECT (SELECT count(*) FROM {schema}.wb_outbox) + \
                         (SELECT count(*) FROM {schema}.wb_inbox)"
                    ),
                    &[],
                )
                .await?
                .get(0);
            if pending == 0 || Instant::now() > drained_by {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drained_s = resumed.elapsed().as_secs_f64();
        let stored: std::collections::HashSet<Uuid> = runtime
            .store()
            .read_all(0, 1_000_000)
            .await?
            .into_iter()
            .filter_map(|e| whizbang::message::decode::<Worked>(&e.envelope.payload).ok())
            .map(|w| w.token)
            .collect();
        let committed = std::mem::take(&mut *committed.lock().unwrap());
        let lost = committed.iter().filter(|t| !stored.contains(t)).count();
        let waits = std::mem::take(&mut *waits_for_error.lock().unwrap());
        let error_s_max = waits
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .as_secs_f64();
        figure("pg_stall_s", args.stall_secs);
        figure(
            "pg_stall_statement_timeout_ms",
            statement_timeout.as_millis(),
        );
        figure("pg_stall_errors", waits.len());
        figure("pg_stall_error_s_max", format!("{error_s_max:.2}"));
        figure("pg_stall_committed", committed.len());
        figure("pg_stall_lost", lost);
        figure("pg_stall_drained_s", format!("{drained_s:.1}"));
        if let Ok(runtime) = Arc::try_unwrap(runtime) {
            runtime.shutdown().await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    drop_schema(&url, &schema).await;
    result
}
