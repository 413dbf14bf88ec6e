//! Fault injection across processes: proves the delivery contract (lost, duplicated and
//! reordered events, stuck rows, takeover time) while instances die and servers restart.
//!
//! `cargo run --release --bin whizbang-chaos -- run [--short]` (or `scripts/chaos.sh`)
//!
//! A run starts, as separate processes sharing the local Postgres and the AMQP broker, three
//! writer instances of one service (they lease the stream partitions among themselves) and one
//! consumer service subscribed to the writers' topic. The writers drive 200 streams × 100
//! events (`--short`: 60 × 40) at a fixed rate, each event appended with the expected version
//! of its stream. Every few seconds one writer gets SIGKILL and is started again half a second
//! later (it resumes its streams from the event store); the broker is restarted once and the
//! Postgres server once mid-run. When the writers are done and everything has drained, the
//! run compares the writers' event store with the consumer perspective's log of applications
//! and prints one `name: value` line per figure (`lost`, `duplicates`, `order_violations`,
//! `stuck_rows`, `takeover_s_max`, …), writes them to `target/chaos/results.json`, and exits
//! non-zero when a bound is missed. Lease times come from `config/chaos.toml`.
//!
//! Modules: `orchestrator` (processes, faults, measurements), `node` (the writer and consumer
//! processes, started by the orchestrator as `whizbang-chaos node …`), `verdict` (counting).

mod node;
mod orchestrator;
mod verdict;

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use whizbang::{Command, Event, Message};

type ChaosResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let system = actix::System::new();
    let result = system.block_on(async move {
        match cli.command {
            Mode::Run(args) => orchestrator::run(args).await,
            Mode::Node(NodeKind::Writer(args)) => node::writer(args).await.map(|()| true),
            Mode::Node(NodeKind::Consumer(args)) => node::consumer(args).await.map(|()| true),
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
