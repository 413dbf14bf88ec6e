//! The inventory service as a process of its own: it consumes the order service's
//! `OrderCreated` events from its subscription on an AMQP 1.0 broker and reserves stock.
//!
//! ```text
//! scripts/amqp-topology.sh                      # exchange `orders`, queue `orders.inventory`
//! cargo run --release --example inventory_service -- --config config/amqp.toml &
//! cargo run --release --example order_service -- --config config/amqp.toml
//! ```
//!
//! It reads the same configuration file as the order service and runs as service
//! `inventory-service` in schema `<store.schema>_inventory`, consuming subscription `inventory`
//! of the topic `OrderCreated` is routed to. Each event arrives through broker → consumer →
//! inbox (deduplicated) → perspective, in order per order stream. It runs until Ctrl-C, or
//! until `--orders N` orders were applied (then it prints the reservations and exits 0), or
//! fails when `--timeout-secs` pass first.
//!
//! It embeds the operator commands (`whizbang::operator`): `... --example inventory_service --
//! --config config/amqp.toml replay inventory --from scratch` rebuilds the reservations from
//! its event store with its progress, without consuming anything.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use whizbang::config::{SubscriptionConfig, TransportKind};
use whizbang::{Config, EventMeta, Message, Perspective, PerspectiveError, Runtime};

#[derive(Parser)]
#[command(about = "Inventory service: consumes OrderCreated over the configured transport")]
struct Args {
    /// Configuration file (the order service's; its transport must be amqp).
    #[arg(long, default_value = "config/amqp.toml")]
    config: PathBuf,
    /// Subscription name on the orders topic.
    #[arg(long, default_value = "inventory")]
    subscription: String,
    /// Exit after this many orders were applied.
    #[arg(long)]
    orders: Option<usize>,
    /// With --orders: fail if they were not all applied within this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Without a command: consume and apply orders.
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Operator(whizbang::operator::OperatorCommand),
}

// ---- The event it consumes (same type name and fields as the order service's) ------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderLine {
    sku: String,
    quantity: i32,
    unit_price_cents: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    order_id: String,
    customer_id: String,
    lines: Vec<OrderLine>,
    total_cents: i64,
}

impl Message for OrderCreated {
    const TYPE_NAME: &'static str = "OrderCreated";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order_id)
    }
}
impl whizbang::Event for OrderCreated {}

// ---- The perspective --------------------------------------------------------------------

#[derive(Default)]
struct Reservations {
    by_sku: BTreeMap<String, i64>,
    orders: usize,
}

#[derive(Clone, Default)]
struct Inventory(Arc<Mutex<Reservations>>);

impl Perspective<OrderCreated> for Inventory {
    async fn apply(&self, e: OrderCreated, meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for line in &e.lines {
            *r.by_sku.entry(line.sku.clone()).or_default() += i64::from(line.quantity);
        }
        r.orders += 1;
        println!(
            "applied OrderCreated {} (customer {}, {} lines) | message {} correlation {}",
            e.order_id,
            e.customer_id,
            e.lines.len(),
            meta.message_id,
            meta.correlation_id
        );
        Ok(())
    }
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
    let mut config = Config::load(&args.config)?;
    // Its own name in logs and traces (the configuration file is the order service's).
    config.service.name = "inventory-service".into();
    // Log lines to stderr (RUST_LOG, else warn); spans to an OTLP collector when
    // [telemetry.tracing] otlp_endpoint is set (docs/telemetry.md). Flushed when dropped.
    let _tracing = whizbang::telemetry::init_tracing(&config, "warn")?;
    if let Some(Cmd::Operator(command)) = args.command {
        // Its own schema, as when it runs; nothing is consumed.
        config.store.schema = format!("{}_inventory", config.store.schema);
        config.routing.subscriptions.clear();
        let inventory = Inventory::default();
        command
            .run(
                Runtime::builder(config)
                    .perspective::<OrderCreated, _>("inventory", inventory.clone()),
            )
            .await?;
        let r = inventory.0.lock().unwrap_or_else(|p| p.into_inner());
        println!("inventory now holds {} order(s)", r.orders);
        return Ok(());
    }
    anyhow::ensure!(
        config.transport.kind == TransportKind::Amqp,
        "{} uses transport.kind = {:?}: a separate inventory process needs \"amqp\" (the memory transport lives inside one process; order_service runs its own inventory then)",
        args.config.display(),
        config.transport.kind
    );
    let topic = config
        .routing
        .topics
        .get(OrderCreated::TYPE_NAME)
        .cloned()
        .context("config routing.topics must name a topic for OrderCreated")?;
    config.store.schema = format!("{}_inventory", config.store.schema);
    config.routing.topics.clear();
    config.routing.subscriptions = vec![SubscriptionConfig {
        topic: topic.clone(),
        name: args.subscription.clone(),
    }];

    let inventory = Inventory::default();
    let runtime = Runtime::builder(config.clone())
        .perspective::<OrderCreated, _>("inventory", inventory.clone())
        .start()
        .await?;
    println!(
        "inventory-service {} | store {:?} schema {} | consuming `{topic}/{}` at {}",
        runtime.instance_id(),
        config.store.backend,
        config.store.schema,
        args.subscription,
        whizbang::transport::amqp::AmqpTransport::from_config(&config.transport, "show")
            .map(|t| t.subscription_address(&topic, &args.subscription))
            .unwrap_or_default(),
    );

    // Listening from now on: a SIGTERM from an orchestrator (or Ctrl-C) stops the service
    // cleanly, the runtime writing what it holds and releasing its leases.
    let mut stop = whizbang::StopSignal::new()?;
    // Actors that keep failing (more than runtime.max_restarts restarts within the window) make
    // the instance unhealthy: exit non-zero, so that an orchestrator replaces it.
    let mut unhealthy = std::pin::pin!(runtime.unhealthy());
    match args.orders {
        None => {
            println!("waiting for orders; SIGTERM or Ctrl-C to stop");
            tokio::select! {
                _ = stop.recv() => println!("stop requested: shutting down"),
                _ = &mut unhealthy => {
                    let health = runtime.health();
                    runtime.shutdown().await?;
                    anyhow::bail!("unhealthy, exiting: {}", health.reasons.join("; "));
                }
            }
        }
        Some(expected) => {
            let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
            let mut ticker = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.recv() => break,
                    _ = &mut unhealthy => {
                        let health = runtime.health();
                        runtime.shutdown().await?;
                        anyhow::bail!("unhealthy, exiting: {}", health.reasons.join("; "));
                    }
                }
                let applied = inventory.0.lock().unwrap_or_else(|p| p.into_inner()).orders;
                if applied >= expected {
                    break;
                }
                if Instant::now() > deadline {
                    runtime.shutdown().await?;
                    anyhow::bail!(
                        "only {applied} of {expected} orders applied within {}s",
                        args.timeout_secs
                    );
                }
            }
        }
    }
    {
        let r = inventory.0.lock().unwrap_or_else(|p| p.into_inner());
        println!("{} orders applied; reserved:", r.orders);
        for (sku, qty) in &r.by_sku {
            println!("   {qty:>4} x {sku}");
        }
    }
    runtime.shutdown().await?;
    Ok(())
}
