//! The order service over HTTP: the specification's two flows behind an actix-web front door on
//! the runtime's actix system.
//!
//! `cargo run --release --example order_api -- [--config PATH] [--listen ADDR]`
//! (default `config/whizbang.toml`, listening on `127.0.0.1:8080`). On the default configuration
//! it needs no server; with `config/postgres.toml` the order summaries are a table in the
//! service's schema; with `config/amqp.toml` the events go to the broker. `docs/http.md` lists
//! the routes, the statuses and what a client should do with each.
//!
//! SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, then stop the runtime.

// Shared with the order_service example and the HTTP tests; each uses a part of it.
#[allow(dead_code)]
#[path = "orders/mod.rs"]
mod orders;

use clap::Parser;
use orders::{CreateOrder, CreateOrderReceptor, OrderCreated, OrderSummaries};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;
use whizbang::{Config, Consistency, Runtime, StopSignal};

#[derive(Parser)]
#[command(about = "The order API (HTTP) on the whizbang runtime")]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = "config/whizbang.toml")]
    config: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// HTTP worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
}

whizbang::use_mimalloc!();

#[actix::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    // Log lines to stderr (RUST_LOG, else info); spans to an OTLP collector when
    // [telemetry.tracing] otlp_endpoint is set (docs/telemetry.md). Flushed when dropped.
    let _tracing = whizbang::telemetry::init_tracing(&config, "info")?;
    // Listening for signals from the start: one that comes while the runtime starts is kept.
    let mut stop = StopSignal::new()?;
    let summaries = OrderSummaries::for_config(&config).await?;
    let runtime = Runtime::builder(config.clone())
        .receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
        .read_model::<OrderCreated, _>("order-summary", summaries.clone(), Consistency::Async)
        .start()
        .await?;
    let listener = TcpListener::bind(&args.listen)?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let server = orders::api::server(
        listener,
        &runtime,
        summaries,
        workers,
        Duration::from_millis(config.runtime.shutdown_timeout_ms),
    )?;
    println!(
        "order API on http://{} | store: {:?} | transport: {:?} (config {})",
        args.listen,
        config.store.backend,
        config.transport.kind,
        args.config.display()
    );
    orders::api::serve_until(server, runtime, async move { stop.recv().await }).await
}
