//! Benchmarks of the whizbang runtime, each measured against a baseline in the same run.
//!
//! `cargo run --release --bin whizbang-bench -- core` (or `store`, `amqp`, `e2e`, `engine`, `http`, or
//! `all` for the six in a row with their default settings)
//!
//! Suites:
//! - `store`: the Postgres store beside raw SQL on the same tables (see `store.rs`).
//! - `amqp`: outbox → broker beside a bare fe2o3-amqp sender, broker → inbox → perspective, and
//!   end-to-end latency at a fixed offered rate (see `amqp.rs`).
//! - `e2e`: that end-to-end latency at several offered rates (`--rates`, default 100,1000),
//!   p50 / p95 / p99, each timed from the intended send time.
//! - `engine`: the runtime under stress: CPU-bound receptors on 1 and 2 worker threads, the
//!   heartbeat under a receptor that blocks its thread, memory under overload, a stopped
//!   Postgres server (see `engine.rs`).
//! - `http`: the order API over HTTP on the Postgres store beside a bare actix-web handler
//!   inserting the same event and outbox row with one raw statement (see `http.rs`).
//! - `core`: the cost of a `local_invoke` (receptor → one event → one perspective, in-memory
//!   store and transport, default configuration with the scoped flush strategy) beside a direct
//!   call of the same receptor and perspective (`Receptor::handle`, the event's decode, and
//!   `Perspective::apply`; the event's encode happens inside `handle`, in `Decision::event`,
//!   exactly as in the runtime). Then the same throughput with telemetry off and on, in
//!   alternating blocks (`telemetry_overhead_ratio`: median throughput off / on; on = the
//!   runtime's spans recorded by tracing-opentelemetry into a batch span processor, and a
//!   Prometheus recorder installed as the `metrics` recorder; see `telemetry.rs`).
//!
//! Output: one `name: value` line per figure on stdout, so scripts can parse it; the same
//! figures, with the machine, the Postgres settings that matter and the commit, go to
//! `target/bench/results.json` (`$CARGO_TARGET_DIR/bench/results.json`), and a Markdown table
//! of them with each figure's goal ends the output (`whizbang-bench report` prints it again
//! from the file; see `report.rs`). Latencies are
//! medians (and 99th percentiles) of individually timed calls after a warm-up, the baseline and
//! the runtime measured in alternating blocks; throughput is completed calls per second with
//! many concurrent callers, each on its own stream.

mod amqp;
mod cpu;
mod engine;
mod http;
mod report;
mod store;
mod telemetry;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::FlushStrategy;
use whizbang::message::{decode, encode};
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

#[derive(Parser)]
#[command(
    name = "whizbang-bench",
    about = "Benchmarks of the whizbang runtime against a baseline measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand)]
enum Suite {
    /// local_invoke on the in-memory store and transport vs. a direct call of the same
    /// receptor and perspective.
    Core(CoreArgs),
    /// The Postgres store beside raw SQL on the same tables: empty batch, throughput with the
    /// interval strategy, local_invoke latency, idle queries.
    Store(store::StoreArgs),
    /// The AMQP transport on the local RabbitMQ with the Postgres store: outbox → broker beside
    /// a bare sender, broker → inbox → perspective, end-to-end latency at a fixed rate.
    Amqp(amqp::AmqpArgs),
    /// End-to-end latency (local_invoke on one runtime → the perspective of another, over
    /// Postgres and the broker) at several offered rates, with p50 / p95 / p99.
    E2e(amqp::AmqpArgs),
    /// The runtime under stress: CPU-bound receptors on 1 and 2 worker threads, the heartbeat
    /// under a receptor that blocks its thread, memory under 5x overload, and a stopped Postgres
    /// server (SIGSTOP; skipped with --no-stall).
    Engine(engine::EngineArgs),
    /// The order API over HTTP on the Postgres store beside a bare actix-web handler that
    /// inserts the same event and outbox row with one raw statement; `/orders/async` alone.
    Http(http::HttpArgs),
    /// core, store, amqp, e2e, http and engine in a row, each with its default settings
    /// (engine's stall phase pauses the machine's Postgres server).
    All,
    /// Print the Markdown table of a results file written earlier (with each figure's goal).
    Report {
        /// Default: target/bench/results.json.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// For the README (scripts/readme-figures.sh): the same table, refused (exit 1) when
        /// the run recorded errors, since a suite that failed left no figures to show.
        #[arg(long)]
        markdown: bool,
        /// Only the figures with goals and the main throughputs (the README's table).
        #[arg(long)]
        headline: bool,
    },
}

/// A suite's arguments as if given none.
fn defaults<T: Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&command.get_matches_from(["defaults"])).expect("defaults parse")
}

#[derive(Args)]
struct CoreArgs {
    /// Timed calls per latency figure (after the warm-up).
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// Untimed calls before measuring.
    #[arg(long, default_value_t = 5_000)]
    warmup: usize,
    /// Blocks the samples are split into, alternating baseline and runtime.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Concurrent callers of the throughput figure, each on its own stream. With more streams
    /// in flight than `partitions.max_partitions_per_instance` (100 by default) the instance
    /// trades partitions between calls, which costs throughput.
    #[arg(long, default_value_t = 64)]
    callers: usize,
    /// Calls per caller in the throughput figure.
    #[arg(long, default_value_t = 500)]
    calls_per_caller: usize,
    /// Rounds of the telemetry comparison, each a throughput block with telemetry off and one
    /// with it on (in alternating order), `callers` callers each.
    #[arg(long, default_value_t = 10)]
    telemetry_rounds: usize,
    /// Calls per caller in each block of the telemetry comparison.
    #[arg(long, default_value_t = 300)]
    telemetry_calls_per_caller: usize,
    /// Distinct streams the sequential latency loop cycles through.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Configuration file to start from instead of the built-in defaults (the flush strategy
    /// is set to scoped either way; store and transport must be memory).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

// ---- The workload: one command, one event, one perspective ------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deposit {
    account_id: String,
    amount_cents: i64,
    reference: String,
}

impl Message for Deposit {
    const TYPE_NAME: &'static str = "BenchDeposit";
    fn stream_id(&self) -> String {
        format!("account-{}", self.account_id)
    }
}
impl Command for Deposit {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deposited {
    account_id: String,
    amount_cents: i64,
    reference: String,
}

impl Message for Deposited {
    const TYPE_NAME: &'static str = "BenchDeposited";
    fn stream_id(&self) -> String {
        format!("account-{}", self.account_id)
    }
}
impl Event for Deposited {}

/// Validates the command and decides one event, which is also the result.
struct DepositReceptor;

impl Receptor<Deposit> for DepositReceptor {
    type Result = Deposited;

    async fn handle(
        &self,
        cmd: Deposit,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Deposited>, ReceptorError> {
        if cmd.amount_cents <= 0 {
            return Err(ReceptorError::Validation("amount must be positive".into()));
        }
        // Encodes the event (whizbang::message::encode), as every receptor's decision does.
        Ok(Decision::event(Deposited {
            account_id: cmd.account_id,
            amount_cents: cmd.amount_cents,
            reference: cmd.reference,
        }))
    }
}

/// A read model: balance per account.
#[derive(Clone, Default)]
struct Balances(Arc<Mutex<HashMap<String, i64>>>);

impl Perspective<Deposited> for Balances {
    async fn apply(&self, e: Deposited, _meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut balances = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *balances.entry(e.account_id).or_default() += e.amount_cents;
        Ok(())
    }
}

impl Balances {
    fn get(&self, account: &str) -> i64 {
        let balances = self.0.lock().unwrap_or_else(|p| p.into_inner());
        balances.get(account).copied().unwrap_or_default()
    }
}

fn deposit(account: usize, n: usize) -> Deposit {
    Deposit {
        account_id: format!("acc-{account}"),
        amount_cents: 100,
        reference: format!("ref-{n}"),
    }
}

// ---- Measuring -----------------------------------------------------------------------

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A plain client of the database at `url` (no TLS), for the baselines' raw SQL and clean-up;
/// its connection runs on the current arbiter.
async fn raw_client(url: &str) -> BenchResult<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    actix::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Sorted samples: microseconds when made from durations.
struct Samples(Vec<f64>);

impl Samples {
    fn new(durations: Vec<Duration>) -> Samples {
        Samples::of(
            durations
                .into_iter()
                .map(|d| d.as_secs_f64() * 1e6)
                .collect(),
        )
    }

    /// Samples of any unit (rates, ratios).
    fn of(mut values: Vec<f64>) -> Samples {
        values.sort_by(f64::total_cmp);
        Samples(values)
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.0.len() as f64 - 1.0) * p / 100.0).round() as usize;
        self.0[rank.min(self.0.len() - 1)]
    }
}

/// The suite running now, and every figure printed so far: (suite, name, value).
static SUITE: Mutex<&str> = Mutex::new("");
static FIGURES: Mutex<Vec<(&str, String, String)>> = Mutex::new(Vec::new());

fn figure(name: &str, value: impl std::fmt::Display) {
    let value = value.to_string();
    println!("{name}: {value}");
    let suite = *SUITE.lock().unwrap_or_else(|p| p.into_inner());
    FIGURES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((suite, name.to_string(), value));
}

/// Runs one suite with its figures filed under `name`.
async fn run_suite(
    name: &'static str,
    suite: impl Future<Output = BenchResult<()>>,
) -> BenchResult<()> {
    *SUITE.lock().unwrap_or_else(|p| p.into_inner()) = name;
    figure("suite", name);
    suite.await
}

/// Writes the figures of this run with what they were measured on.
fn results_dir() -> std::path::PathBuf {
    whizbang_tools_common::target_dir().join("bench")
}

async fn write_results(
    suites: &[&str],
    errors: &[String],
) -> BenchResult<(std::path::PathBuf, serde_json::Value)> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let mut figures = serde_json::Map::new();
    for (suite, name, value) in FIGURES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let entry = figures
            .entry(suite.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if let serde_json::Value::Object(map) = entry {
            // Numbers as numbers, everything else as text.
            let v = value
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or_else(|| serde_json::Value::String(value.clone()), Into::into);
            map.insert(name.clone(), v);
        }
    }
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mem_total_kb = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    let machine = serde_json::json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_mb": mem_total_kb.map(|kb| kb / 1024),
        "load_average": read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>(),
    });
    let postgres = if suites.iter().any(|s| *s != "core") {
        postgres_settings()
            .await
            .unwrap_or_else(|e| serde_json::json!({ "error": format!("settings not read: {e}") }))
    } else {
        serde_json::Value::Null
    };
    let results = serde_json::json!({
        "commit": commit,
        "finished_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "suites": suites,
        "machine": machine,
        "postgres": postgres,
        "figures": figures,
        "errors": errors,
    });
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    Ok((path, results))
}

/// The database a suite works in: `given` (`--database-url`), else `WHIZBANG_DATABASE_URL`, else
/// the local server.
pub(crate) fn database_url(given: Option<&str>) -> String {
    given
        .map(str::to_string)
        .or_else(|| std::env::var("WHIZBANG_DATABASE_URL").ok())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Postgres settings that move the store's figures.
async fn postgres_settings() -> BenchResult<serde_json::Value> {
    let url = database_url(None);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    actix_rt::spawn(async move {
        let _ = conn.await;
    });
    let rows = client
        .query(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings
              WHERE name IN ('server_version', 'shared_buffers', 'synchronous_commit', 'fsync',
                             'wal_level', 'max_connections', 'work_mem', 'commit_delay')
              ORDER BY name",
            &[],
        )
        .await?;
    Ok(serde_json::Value::Object(
        rows.iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1).into()))
            .collect(),
    ))
}

const COMMAND_ID: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
const EVENT_ID: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002);

/// The baseline: what the runtime does for one call minus the runtime. The receptor decides
/// (encoding the event in `Decision::event`), the event is decoded, and the perspective
/// applies it. Context and metadata are filled in as the handlers see them, but with fixed ids:
/// making message ids is the runtime's work, not the handlers'.
async fn direct_call(
    receptor: &DepositReceptor,
    perspective: &Balances,
    cmd: Deposit,
) -> BenchResult<Deposited> {
    let stream_id = cmd.stream_id();
    let ctx = ReceptorContext {
        message_id: COMMAND_ID,
        correlation_id: COMMAND_ID,
        causation_id: None,
        stream_id: stream_id.clone(),
        metadata: Default::default(),
    };
    let decision = receptor.handle(cmd, ctx.clone()).await?;
    for emitted in decision.events {
        let bytes = emitted.payload?;
        let event: Deposited = decode(&bytes)?;
        let meta = EventMeta {
            message_id: EVENT_ID,
            correlation_id: ctx.correlation_id,
            causation_id: Some(ctx.message_id),
            stream_id: emitted.stream_id,
            timestamp_us: 0,
            version: Some(1),
            position: Some(1),
        };
        perspective.apply(event, meta).await?;
    }
    Ok(decision.result)
}

async fn core(args: CoreArgs) -> BenchResult<()> {
    let streams = args.streams.max(1);

    // Sanity: the codec round-trips the event (the baseline depends on it).
    let probe = Deposited {
        account_id: "probe".into(),
        amount_cents: 1,
        reference: "probe".into(),
    };
    let round_trip: Deposited = decode(&encode(&probe)?)?;
    if round_trip.amount_cents != 1 {
        return Err("codec round trip changed the event".into());
    }

    // The runtime: default configuration, scoped flush, in-memory store and transport.
    // Telemetry is off (see `telemetry`) until the comparison at the end.
    let telemetry = telemetry::switch();
    telemetry.set(false)?;
    let balances = Balances::default();
    let runtime = core_runtime(&args, balances.clone()).await?;
    let direct_receptor = DepositReceptor;
    let direct_balances = Balances::default();

    // Baseline and runtime are measured in alternating blocks, so that both see the same
    // machine (on a shared machine the speed of the CPU drifts between and within runs).
    let rounds = args.rounds.clamp(1, args.samples.max(1));
    let mut direct = Vec::with_capacity(args.samples);
    let mut invoke = Vec::with_capacity(args.samples);
    let mut expected = vec![0_i64; streams];
    let mut n = 0_usize;
    for round in 0..=rounds {
        // Round 0 is the warm-up; rounds 1..=rounds split the samples.
        let (calls, timed) = if round == 0 {
            (args.warmup, false)
        } else {
            let base = args.samples / rounds;
            (base + usize::from(round <= args.samples % rounds), true)
        };

        for i in n..n + calls {
            let cmd = deposit(i % streams, i);
            let start = Instant::now();
            let result = direct_call(&direct_receptor, &direct_balances, cmd).await?;
            let elapsed = start.elapsed();
            if timed {
                direct.push(elapsed);
            }
            std::hint::black_box(result);
        }

        for i in n..n + calls {
            let account = i % streams;
            let cmd = deposit(account, i);
            let start = Instant::now();
            let result: Deposited = runtime.local_invoke(cmd).await?;
            let elapsed = start.elapsed();
            if timed {
                invoke.push(elapsed);
            }
            // Read-your-writes (contract item 7), checked outside the timed region: the read
            // model shows the deposit as soon as local_invoke has returned.
            expected[account] += result.amount_cents;
            let seen = balances.get(&result.account_id);
            if seen != expected[account] {
                return Err(format!(
                    "read-your-writes broken: balance of {} is {seen} right after local_invoke, expected {}",
                    result.account_id, expected[account]
                )
                .into());
            }
        }
        n += calls;
    }
    let direct = Samples::new(direct);
    let invoke = Samples::new(invoke);

    // Throughput: concurrent callers, each on its own stream (distinct from the ones above).
    let callers = args.callers.max(1);
    let per_s = throughput(&runtime, streams, callers, args.calls_per_caller).await?;

    runtime.shutdown().await?;

    // Telemetry off / on: the same throughput, in alternating blocks, on two fresh runtimes
    // with the same history: one started, warmed up and measured with telemetry off, the other
    // with it on (metric handles are registered when first used, with what the recorder was
    // then).
    let plain = core_runtime(&args, Balances::default()).await?;
    throughput(&plain, streams, callers, args.warmup.div_ceil(callers)).await?;
    telemetry.set(true)?;
    if !tracing::enabled!(target: "whizbang", tracing::Level::INFO) {
        return Err("telemetry on, yet the runtime's info spans are not enabled".into());
    }
    let traced = core_runtime(&args, Balances::default()).await?;
    let tracing_settings = traced.config().telemetry.tracing.clone();
    throughput(&traced, streams, callers, args.warmup.div_ceil(callers)).await?;
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.telemetry_rounds.max(1) {
        let mut rates = [0.0_f64; 2];
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_telemetry in order {
            telemetry.set(with_telemetry)?;
            if !with_telemetry && tracing::enabled!(target: "whizbang", tracing::Level::INFO) {
                return Err("telemetry off, yet the runtime's info spans are enabled".into());
            }
            let measured = if with_telemetry { &traced } else { &plain };
            let calls = args.telemetry_calls_per_caller;
            rates[usize::from(with_telemetry)] =
                throughput(measured, streams, callers, calls).await?;
        }
        off.push(rates[0]);
        on.push(rates[1]);
        ratios.push(rates[0] / rates[1]);
    }
    telemetry.flush();
    if telemetry.spans_exported() == 0 {
        return Err("telemetry on, yet no span reached the exporter".into());
    }
    telemetry.set(false)?;
    let (off, on, ratios) = (Samples::of(off), Samples::of(on), Samples::of(ratios));
    plain.shutdown().await?;
    traced.shutdown().await?;

    let p50 = invoke.percentile(50.0);
    let direct_p50 = direct.percentile(50.0);
    figure("samples", args.samples);
    figure("local_invoke_us_p50", format!("{p50:.2}"));
    figure(
        "local_invoke_us_p99",
        format!("{:.2}", invoke.percentile(99.0)),
    );
    figure("direct_call_us_p50", format!("{direct_p50:.3}"));
    figure(
        "direct_call_us_p99",
        format!("{:.3}", direct.percentile(99.0)),
    );
    figure(
        "local_invoke_ratio_vs_direct",
        format!("{:.1}", p50 / direct_p50),
    );
    figure("throughput_callers", callers);
    figure("local_invoke_per_s", format!("{per_s:.0}"));
    figure("telemetry_rounds", ratios.0.len());
    figure(
        "telemetry_off_per_s",
        format!("{:.0}", off.percentile(50.0)),
    );
    figure("telemetry_on_per_s", format!("{:.0}", on.percentile(50.0)));
    figure(
        "telemetry_overhead_ratio",
        format!("{:.3}", off.percentile(50.0) / on.percentile(50.0)),
    );
    figure(
        "telemetry_round_ratio_min",
        format!("{:.3}", ratios.percentile(0.0)),
    );
    figure(
        "telemetry_round_ratio_max",
        format!("{:.3}", ratios.percentile(100.0)),
    );
    figure("telemetry_spans_exported", telemetry.spans_exported());
    // The head sampler the "on" side ran with ([telemetry.tracing] of the configuration).
    figure("telemetry_sample_ratio", tracing_settings.sample_ratio);
    figure(
        "telemetry_max_traces_per_second",
        tracing_settings.max_traces_per_second,
    );
    figure("telemetry_metric_lines", telemetry.metric_lines());
    Ok(())
}

/// The core suite's runtime: default configuration (or `--config`), scoped flush, in-memory
/// store and transport, the deposit receptor and the balances perspective.
async fn core_runtime(args: &CoreArgs, balances: Balances) -> BenchResult<Runtime> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.service.name = "whizbang-bench".into();
    config.coordinator.flush_strategy = FlushStrategy::Scoped;
    Ok(Runtime::builder(config)
        .receptor::<Deposit, _>(DepositReceptor)
        .perspective::<Deposited, _>("balances", balances)
        .start()
        .await?)
}

/// Completed `local_invoke`s per second of `callers` concurrent callers making `calls` each,
/// caller `c` on the stream of account `first_stream + c`.
async fn throughput(
    runtime: &Runtime,
    first_stream: usize,
    callers: usize,
    calls: usize,
) -> BenchResult<f64> {
    let start = Instant::now();
    let results = futures::future::join_all((0..callers).map(|c| async move {
        for n in 0..calls {
            let _: Deposited = runtime.local_invoke(deposit(first_stream + c, n)).await?;
        }
        Ok::<_, whizbang::DispatchError>(())
    }))
    .await;
    let elapsed = start.elapsed();
    for r in results {
        r?;
    }
    Ok((callers * calls) as f64 / elapsed.as_secs_f64())
}

whizbang::use_mimalloc!();

fn main() {
    // Logs go to stderr, off unless RUST_LOG asks (figures go to stdout); spans and metrics
    // are recorded only in the core suite's telemetry-on blocks.
    telemetry::install();
    let cli = Cli::parse();
    if let Suite::Report {
        file,
        markdown,
        headline,
    } = &cli.suite
    {
        let path = file
            .clone()
            .unwrap_or_else(|| results_dir().join("results.json"));
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
            }) {
            Ok(results) => {
                let errors = results["errors"].as_array().filter(|e| !e.is_empty());
                if let (true, Some(errors)) = (*markdown, errors) {
                    eprintln!(
                        "whizbang-bench: {} records errors ({errors:?}): run the suites again",
                        path.display()
                    );
                    std::process::exit(1);
                }
                let rows = if *headline {
                    report::Rows::Headline
                } else {
                    report::Rows::All
                };
                print!("{}", report::table(&results, rows));
            }
            Err(e) => {
                eprintln!(
                    "whizbang-bench: cannot read {} ({e}): run `cargo run --release --bin whizbang-bench -- all` first",
                    path.display()
                );
                std::process::exit(1);
            }
        }
        return;
    }
    let system = actix::System::new();
    let failed = system.block_on(async move {
        let mut suites = Vec::new();
        let mut errors = Vec::new();
        let mut record = |name: &'static str, result: BenchResult<()>| {
            suites.push(name);
            if let Err(e) = result {
                eprintln!("whizbang-bench: {name}: error: {e}");
                errors.push(format!("{name}: {e}"));
            }
        };
        match cli.suite {
            Suite::Core(args) => record("core", run_suite("core", core(args)).await),
            Suite::Store(args) => record("store", run_suite("store", store::store(args)).await),
            Suite::Amqp(args) => record("amqp", run_suite("amqp", amqp::amqp(args)).await),
            Suite::E2e(args) => record("e2e", run_suite("e2e", amqp::e2e(args)).await),
            Suite::Engine(args) => {
                record("engine", run_suite("engine", engine::engine(args)).await)
            }
            Suite::Http(args) => record("http", run_suite("http", http::http(args)).await),
            Suite::All => {
                record("core", run_suite("core", core(defaults())).await);
                record("store", run_suite("store", store::store(defaults())).await);
                record("amqp", run_suite("amqp", amqp::amqp(defaults())).await);
                record("e2e", run_suite("e2e", amqp::e2e(defaults())).await);
                record("http", run_suite("http", http::http(defaults())).await);
                // Last: its stall phase pauses the machine's Postgres server.
                record(
                    "engine",
                    run_suite("engine", engine::engine(defaults())).await,
                );
            }
            // Printed before the actor system starts.
            Suite::Report { .. } => {}
        }
        match write_results(&suites, &errors).await {
            Ok((path, results)) => {
                println!("\n{}", report::table(&results, report::Rows::All));
                eprintln!("whizbang-bench: results written to {}", path.display());
            }
            Err(e) => {
                eprintln!("whizbang-bench: results.json not written: {e}");
                errors.push(format!("results.json: {e}"));
            }
        }
        !errors.is_empty()
    });
    if failed {
        std::process::exit(1);
    }
}
