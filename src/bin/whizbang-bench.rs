//! Benchmarks of the whizbang runtime, each measured against a baseline in the same run.
//!
//! `cargo run --release --bin whizbang-bench -- core` (or `store`, `amqp`)
//!
//! Suites:
//! - `store`: the Postgres store beside raw SQL on the same tables (see `whizbang-bench/store.rs`).
//! - `amqp`: outbox → broker beside a bare fe2o3-amqp sender, broker → inbox → perspective, and
//!   end-to-end latency at a fixed offered rate (see `whizbang-bench/amqp.rs`).
//! - `core`: the cost of a `local_invoke` (receptor → one event → one perspective, in-memory
//!   store and transport, default configuration with the scoped flush strategy) beside a direct
//!   call of the same receptor and perspective (`Receptor::handle`, the event's decode, and
//!   `Perspective::apply`; the event's encode happens inside `handle`, in `Decision::event`,
//!   exactly as in the runtime).
//!
//! Output: one `name: value` line per figure on stdout, so scripts can parse it. Latencies are
//! medians (and 99th percentiles) of individually timed calls after a warm-up, the baseline and
//! the runtime measured in alternating blocks; throughput is completed calls per second with
//! many concurrent callers, each on its own stream.

#[path = "whizbang-bench/amqp.rs"]
mod amqp;
#[path = "whizbang-bench/store.rs"]
mod store;

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

/// Sorted samples in microseconds.
struct Samples(Vec<f64>);

impl Samples {
    fn new(mut durations: Vec<Duration>) -> Samples {
        durations.sort_unstable();
        Samples(
            durations
                .into_iter()
                .map(|d| d.as_secs_f64() * 1e6)
                .collect(),
        )
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.0.len() as f64 - 1.0) * p / 100.0).round() as usize;
        self.0[rank.min(self.0.len() - 1)]
    }
}

fn figure(name: &str, value: impl std::fmt::Display) {
    println!("{name}: {value}");
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
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    config.service.name = "whizbang-bench".into();
    config.coordinator.flush_strategy = FlushStrategy::Scoped;
    let balances = Balances::default();
    let runtime = Runtime::builder(config)
        .receptor::<Deposit, _>(DepositReceptor)
        .perspective::<Deposited, _>("balances", balances.clone())
        .start()
        .await?;
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
    let start = Instant::now();
    let results = futures::future::join_all((0..callers).map(|c| {
        let runtime = &runtime;
        let calls = args.calls_per_caller;
        async move {
            for n in 0..calls {
                let _: Deposited = runtime.local_invoke(deposit(streams + c, n)).await?;
            }
            Ok::<_, whizbang::DispatchError>(())
        }
    }))
    .await;
    let elapsed = start.elapsed();
    for r in results {
        r?;
    }
    let total_calls = callers * args.calls_per_caller;
    let per_s = total_calls as f64 / elapsed.as_secs_f64();

    runtime.shutdown().await?;

    let p50 = invoke.percentile(50.0);
    let direct_p50 = direct.percentile(50.0);
    figure("suite", "core");
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
    Ok(())
}

fn main() {
    // Logs go to stderr, off unless RUST_LOG asks (figures go to stdout).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let system = actix::System::new();
    let result = system.block_on(async move {
        match cli.suite {
            Suite::Core(args) => core(args).await,
            Suite::Store(args) => store::store(args).await,
            Suite::Amqp(args) => amqp::amqp(args).await,
        }
    });
    if let Err(e) = result {
        eprintln!("whizbang-bench: error: {e}");
        std::process::exit(1);
    }
}
