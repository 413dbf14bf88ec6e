//! Fault injection across processes: proves the delivery contract (lost, duplicated and
//! reordered events, stuck rows, takeover time, dead letters) while instances die and servers
//! restart and hang.
//!
//! `whizbang-chaos run [--short]` (or `scripts/chaos.sh`, which starts private servers)
//!
//! A run starts, as separate processes, three writer instances of one service (they lease the
//! stream partitions among themselves) and two consumer instances of another on one sharded
//! subscription to the writers' topic, whose perspective writes a Postgres read model. The
//! writers drive 200 streams × 100 events (`--short`: 60 × 50) at a fixed rate, each event
//! appended with the expected version of its stream. Every few seconds one process (writers
//! and consumers in turn) gets SIGKILL and is started again half a second later; the broker
//! and the Postgres server are each restarted once and hung once (SIGSTOP / SIGCONT), with a
//! kill during each; poison messages are published, and the perspective fails some events
//! until the run requeues their dead letters with the operator CLI. When everything has
//! drained, the run compares the writers' event store with the read model and prints one
//! `name: value` line per figure (`lost`, `duplicates`, `order_violations`, `stuck_rows`,
//! `takeover_s_max`, `crash_takeover_s_max`, `consumer_kills`, `hang_recovery_s_max`,
//! `dead_lettered`, `requeued`, …), writes them to `target/chaos/results.json`, and exits
//! non-zero when a bound is missed. Which servers it restarts and hangs:
//! `WHIZBANG_CHAOS_PG_CLUSTER` and `WHIZBANG_RABBITMQ_NODE` (see `servers`).
//!
//! Two single-fault scenarios run after it (`scripts/chaos.sh` runs both, in both forms), in
//! this process against the same servers, each checking what its old integration test did:
//! `pg-restart` (the Postgres server restarted under load) and `broker-restart` (the broker
//! stopped and started mid-run). They restart servers the parallel test suite depends on, so
//! they live here, not in `tests/`. Each exits non-zero on any failed check, writes
//! `target/chaos/<scenario>.json`, and leaves its server running however it ends (guards, and
//! Ctrl-C stops the scenario through them). `report [--markdown]` prints the run's figures and
//! bounds, with the scenarios of the same commit, from those files; `report --headline` a few
//! lines for the README.
//!
//! Modules: `orchestrator` (processes, faults, measurements), `node` (the writer and consumer
//! processes, started by the orchestrator as `whizbang-chaos node …`), `verdict` (counting),
//! `servers` (restarting and hanging the broker and Postgres, and the guards), `pg_restart` and
//! `broker_restart` (the scenarios), `scenario` (what a scenario reports), `report` (the table).

mod broker_restart;
mod node;
mod orchestrator;
mod pg_restart;
mod report;
mod scenario;
mod servers;
mod verdict;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use whizbang::{Command, Event, Message};

type ChaosResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

use scenario::Scenario;

#[derive(Parser)]
#[command(
    name = "whizbang-chaos",
    about = "Kills instances and restarts servers mid-run, then checks nothing was lost, doubled or reordered"
)]
struct Cli {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the whole experiment and judge it.
    Run(orchestrator::RunArgs),
    /// The Postgres server restarted under load: every stored event applied exactly once, in
    /// order, here and downstream; every successful send stored exactly once.
    PgRestart(pg_restart::PgRestartArgs),
    /// The broker stopped and started mid-run: nothing lost, nothing applied twice, order kept.
    BrokerRestart(broker_restart::BrokerRestartArgs),
    /// Print the last run's figures with their bounds (and the scenarios of the same commit).
    Report {
        /// Default: target/chaos/results.json.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// One Markdown table (for docs/chaos.md: scripts/readme-figures.sh) instead of
        /// `name: value` lines.
        #[arg(long, conflicts_with = "headline")]
        markdown: bool,
        /// A headline of a few lines (for the README: scripts/readme-figures.sh).
        #[arg(long)]
        headline: bool,
    },
    /// One process of a run (started by `run`).
    #[command(subcommand)]
    Node(NodeKind),
}

#[derive(Subcommand)]
enum NodeKind {
    Writer(node::WriterArgs),
    Consumer(node::ConsumerArgs),
}

/// Append event number `seq` to `stream`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Append {
    stream: String,
    seq: u64,
}

impl Message for Append {
    const TYPE_NAME: &'static str = "ChaosAppend";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Append {}

/// Event number `seq` of `stream`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Appended {
    stream: String,
    seq: u64,
}

impl Message for Appended {
    const TYPE_NAME: &'static str = "ChaosAppended";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Appended {}

whizbang::use_mimalloc!();

fn main() {
    let cli = Cli::parse();
    // The broker-restart scenario reads the runtime's log (it installs its own subscriber);
    // everything else logs to stderr, off unless RUST_LOG asks.
    let logs = match &cli.command {
        Mode::BrokerRestart(args) => Some(broker_restart::capture_logs(args.show_logs)),
        _ => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
            None
        }
    };
    if let Mode::Report {
        file,
        markdown,
        headline,
    } = &cli.command
    {
        let form = if *headline {
            report::Form::Headline
        } else if *markdown {
            report::Form::Markdown
        } else {
            report::Form::Lines
        };
        std::process::exit(report(file.as_deref(), form));
    }
    let system = actix::System::new();
    let result = system.block_on(async move {
        match cli.command {
            // Ctrl-C drops the run, and with it any hang guard (SIGCONT to a stopped server).
            Mode::Run(args) => tokio::select! {
                outcome = orchestrator::run(args) => outcome,
                _ = tokio::signal::ctrl_c() => Err("interrupted (Ctrl-C)".into()),
            },
            Mode::PgRestart(args) => {
                let mut scenario = Scenario::new("pg-restart");
                let outcome = until_interrupted(pg_restart::run(args, &mut scenario)).await;
                Ok(scenario.finish(outcome))
            }
            Mode::BrokerRestart(args) => {
                let mut scenario = Scenario::new("broker-restart");
                let logs = logs.unwrap_or_default();
                let outcome =
                    until_interrupted(broker_restart::run(args, logs, &mut scenario)).await;
                Ok(scenario.finish(outcome))
            }
            Mode::Node(NodeKind::Writer(args)) => node::writer(args).await.map(|()| true),
            Mode::Node(NodeKind::Consumer(args)) => node::consumer(args).await.map(|()| true),
            Mode::Report { .. } => Ok(true),
        }
    });
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("whizbang-chaos: error: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs a scenario until it ends or Ctrl-C: then the scenario is dropped, and with it its
/// guards, which bring the servers back before the process exits.
async fn until_interrupted(scenario: impl Future<Output = ChaosResult<()>>) -> ChaosResult<()> {
    tokio::select! {
        outcome = scenario => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted (Ctrl-C)".into()),
    }
}

/// `whizbang-chaos report`: the exit code.
fn report(file: Option<&std::path::Path>, form: report::Form) -> i32 {
    let dir = whizbang_tools_common::target_dir().join("chaos");
    let path = file.map_or_else(|| dir.join("results.json"), std::path::Path::to_path_buf);
    let results = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()))
    {
        Ok(results) => results,
        Err(e) => {
            eprintln!(
                "whizbang-chaos: cannot read {} ({e}): run scripts/chaos.sh first",
                path.display()
            );
            return 1;
        }
    };
    let scenarios = report::scenarios(path.parent().unwrap_or(&dir), &results["commit"]);
    print!(
        "{}",
        match form {
            report::Form::Markdown => report::table(&results, &scenarios),
            report::Form::Headline => report::headline(&results, &scenarios),
            report::Form::Lines => report::lines(&results, &scenarios),
        }
    );
    0
}
