//! The main job: an order service and an inventory service exchanging events.
//!
//! `cargo run --release --example order_service [-- --config PATH]`
//!
//! On the default configuration (`config/whizbang.toml`: in-memory store, in-process transport)
//! it needs no servers. It walks through the message lifecycle and prints each step:
//! `local_invoke` with read-your-writes, `send` with a receipt and a status lookup by correlation
//! id, the event travelling outbox → publisher → transport → consumer → inbox → perspective of
//! the inventory service, and rejected commands that leave nothing behind.
//!
//! With `transport.kind = "amqp"` (`config/amqp.toml`) the inventory service is a separate
//! process (`examples/inventory_service.rs`): this one checks that its events were accepted by
//! the broker, and the other process shows them applied.
//!
//! It embeds the operator commands (`whizbang::operator`), as a service's own binary does:
//! `cargo run --example order_service -- --config config/postgres.toml replay order-summary
//! --from scratch` rebuilds the order summaries from the event store with a progress bar (plain
//! lines when stderr is not a terminal), without starting the service.

// Shared with the order_api example and the HTTP tests; each uses a part of it.
#[allow(dead_code)]
#[path = "orders/mod.rs"]
mod orders;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use orders::{
    CreateOrder, CreateOrderReceptor, Inventory, OrderCreated, OrderSummaries, cents, line,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use whizbang::config::{SubscriptionConfig, TransportKind};
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::{Config, Consistency, DispatchError, Message, ReceiptStatus, Runtime};

#[derive(Parser)]
#[command(about = "Order service scenario on the whizbang runtime")]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = "config/whizbang.toml")]
    config: PathBuf,
    /// Without a command: run the scenario.
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Operator(whizbang::operator::OperatorCommand),
}

/// The order service's runtime with its receptor; the caller adds the read model.
fn order_service(config: Config) -> whizbang::RuntimeBuilder {
    Runtime::builder(config).receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
}

async fn wait_until(
    what: &str,
    deadline: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
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
    // Log lines to stderr (RUST_LOG, else warn); spans to an OTLP collector when
    // [telemetry.tracing] otlp_endpoint is set (docs/telemetry.md). Flushed when dropped.
    let _tracing = whizbang::telemetry::init_tracing(&config, "warn")?;
    if let Some(Cmd::Operator(command)) = args.command {
        // The same registrations as the service below, without starting it.
        let summaries = OrderSummaries::for_config(&config).await?;
        command
            .run(order_service(config).read_model::<OrderCreated, _>(
                "order-summary",
                summaries.clone(),
                Consistency::Async,
            ))
            .await?;
        println!(
            "order-summary now holds {} order(s)",
            summaries.count().await?
        );
        return Ok(());
    }

    // The two services share one transport: the in-process bus by default.
    let transport: Option<Arc<dyn whizbang::transport::Transport>> = match config.transport.kind {
        TransportKind::Memory => Some(Arc::new(MemoryTransport::new(MemoryBus::new()))),
        TransportKind::Amqp => None,
    };
    let with_transport = |b: whizbang::RuntimeBuilder| match &transport {
        Some(t) => b.transport(t.clone()),
        None => b,
    };

    let orders_topic = config
        .routing
        .topics
        .get(OrderCreated::TYPE_NAME)
        .cloned()
        .context("config routing.topics must name a topic for OrderCreated")?;

    // Inventory service: consumes the order events from its own subscription.
    let mut inventory_config = config.clone();
    inventory_config.service.name = "inventory-service".into();
    inventory_config.store.schema = format!("{}_inventory", config.store.schema);
    inventory_config.routing.topics.clear();
    inventory_config.routing.subscriptions = vec![SubscriptionConfig {
        topic: orders_topic.clone(),
        name: "inventory".into(),
    }];
    let inventory = Inventory::default();
    // Over AMQP the inventory service is a process of its own (examples/inventory_service.rs).
    let inventory_service = match config.transport.kind {
        TransportKind::Memory => Some(
            with_transport(Runtime::builder(inventory_config))
                .perspective::<OrderCreated, _>("inventory", inventory.clone())
                .start()
                .await?,
        ),
        TransportKind::Amqp => None,
    };

    // Order service: the receptor and the order-summary read model (exactly once: a table
    // written in the runtime's transaction on the Postgres store, a map in memory).
    let summaries = OrderSummaries::for_config(&config).await?;
    let order_service = with_transport(order_service(config.clone()))
        .read_model::<OrderCreated, _>("order-summary", summaries.clone(), Consistency::Async)
        .start()
        .await?;

    println!("== whizbang order service ==");
    println!(
        "config {} | store: {:?} | transport: {:?} | partitions: {} (at most {} per instance) | flush: {:?}",
        args.config.display(),
        config.store.backend,
        config.transport.kind,
        config.partitions.partition_count,
        config.partitions.max_partitions_per_instance,
        config.coordinator.flush_strategy,
    );
    println!(
        "order-service instance {} publishes OrderCreated to topic `{orders_topic}`; inventory-service {} consumes `{orders_topic}/inventory`",
        order_service.instance_id(),
        inventory_service.as_ref().map_or_else(
            || "(the separate inventory_service process)".to_string(),
            |s| format!("instance {}", s.instance_id())
        )
    );

    // SIGTERM (what an orchestrator sends) or Ctrl-C stops the walk-through between steps: both
    // services then shut down cleanly, writing what they hold and releasing their leases.
    let mut stop = whizbang::StopSignal::new()?;
    let walk_through = async {
        // 1. LocalInvoke: typed result, and the read model already shows it.
        println!(
            "\n1. local_invoke(CreateOrder A-1001): waits for the event store, outbox and perspectives"
        );
        let created: OrderCreated = order_service
            .local_invoke(CreateOrder {
                order_id: "A-1001".into(),
                customer_id: "alice".into(),
                lines: vec![line("WIDGET", 2, 2_500), line("GIZMO", 10, 450)],
            })
            .await?;
        println!(
            "   -> OrderCreated {{ order_id: {}, total: {} }}",
            created.order_id,
            cents(created.total_cents)
        );
        let summary = summaries
            .get("A-1001")
            .await?
            .context("read-your-writes broken: order summary missing right after local_invoke")?;
        println!(
            "   read model right after the call: customer {}, {} lines, total {}",
            summary.customer_id,
            summary.lines,
            cents(summary.total_cents)
        );

        // 2. Send: a receipt now, perspectives asynchronously, status by correlation id.
        println!(
            "\n2. send(CreateOrder B-2002): returns a delivery receipt once the events are committed"
        );
        let receipt = order_service
            .send(CreateOrder {
                order_id: "B-2002".into(),
                customer_id: "bob".into(),
                lines: vec![line("GADGET", 3, 9_900)],
            })
            .await?;
        println!(
            "   -> receipt: message {} | correlation {} | {:?} | {} event(s), stream {} version {}",
            receipt.message_id,
            receipt.correlation_id,
            receipt.status,
            receipt.events.len(),
            receipt.events[0].stream_id,
            receipt.events[0].version
        );
        anyhow::ensure!(
            receipt.status == ReceiptStatus::Delivered,
            "expected a Delivered receipt"
        );
        let start = Instant::now();
        let status = loop {
            let status = order_service.status(receipt.correlation_id).await?;
            if status.inbox_processed > 0 && status.outbox_pending == 0 {
                break status;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("order B-2002 not processed in time: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "   status lookup by correlation id: events {:?}, perspectives applied {}, outbox pending {}",
            status.events, status.inbox_processed, status.outbox_pending
        );

        // 3. The events crossed the transport into the inventory service.
        if inventory_service.is_some() {
            println!(
                "\n3. inventory-service: OrderCreated travelled outbox -> publisher -> transport -> consumer -> inbox -> perspective"
            );
            wait_until(
                "the inventory perspective to see both orders",
                Duration::from_secs(10),
                || {
                    inventory.0.lock().unwrap().get("GADGET") == Some(&3)
                        && inventory.0.lock().unwrap().get("WIDGET") == Some(&2)
                },
            )
            .await?;
            for (sku, qty) in inventory.0.lock().unwrap().iter() {
                println!("   reserved {qty:>3} x {sku}");
            }
        } else {
            // Step 2 waited for B-2002's outbox row to be published, i.e. accepted by the broker.
            println!(
                "\n3. inventory-service (separate process): OrderCreated was accepted by the broker on topic `{orders_topic}` (outbox pending 0); the inventory_service example applies it from `{orders_topic}/inventory`"
            );
        }

        // 4. Rejected commands leave nothing behind.
        println!("\n4. rejected commands: typed errors, nothing stored");
        let rejected = [
            (
                "empty order",
                CreateOrder {
                    order_id: "C-1".into(),
                    customer_id: "carol".into(),
                    lines: vec![],
                },
            ),
            (
                "unknown product",
                CreateOrder {
                    order_id: "C-2".into(),
                    customer_id: "carol".into(),
                    lines: vec![line("DOODAD", 1, 100)],
                },
            ),
            (
                "over the credit limit",
                CreateOrder {
                    order_id: "C-3".into(),
                    customer_id: "carol".into(),
                    lines: vec![line("GADGET", 20, 9_900)],
                },
            ),
        ];
        for (what, cmd) in rejected {
            let stream = cmd.stream_id();
            match order_service
                .local_invoke::<CreateOrder, OrderCreated>(cmd)
                .await
            {
                Err(e @ DispatchError::Rejected { .. }) => {
                    let stored = order_service.store().read_stream(&stream, 1).await?;
                    anyhow::ensure!(stored.is_empty(), "a rejected command stored events");
                    println!(
                        "   {what:<22} -> HTTP {} {e}; events stored: {}",
                        e.http_status(),
                        stored.len()
                    );
                }
                other => bail!("{what}: expected a rejection, got {other:?}"),
            }
        }
        anyhow::ensure!(
            summaries.count().await? == 2,
            "rejected orders reached the read model"
        );
        Ok::<(), anyhow::Error>(())
    };
    let finished = tokio::select! {
        walked = walk_through => {
            walked?;
            true
        }
        _ = stop.recv() => {
            println!("\nstop requested (SIGTERM or Ctrl-C): shutting down");
            false
        }
    };

    order_service.shutdown().await?;
    if let Some(inventory_service) = inventory_service {
        inventory_service.shutdown().await?;
    }
    if finished {
        println!(
            "\nDone: 2 orders accepted, 3 rejected, every perspective up to date. Shut down cleanly."
        );
    } else {
        println!("Stopped before the end of the walk-through. Shut down cleanly.");
    }
    Ok(())
}
