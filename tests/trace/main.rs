//! One trace across two services (`cargo test --test trace`): the order service's `CreateOrder`
//! command, its receptor, the `OrderCreated` event through the Postgres outbox and RabbitMQ's
//! AMQP 1.0, into the inventory service's inbox (Postgres) and its perspective. Spans are
//! recorded with OpenTelemetry's in-memory exporter; every step must be in the trace of the
//! caller's span, each a child of the step before it.
//!
//! A test binary of its own: the OpenTelemetry layer is the process's global subscriber, and
//! with it the runtime writes trace contexts into the metadata of every message, which the
//! cases of `tests/it` (sharing one process) must not see.

#[allow(dead_code, unused_imports)]
#[path = "../it/support/mod.rs"]
mod support;

#[allow(dead_code)]
#[path = "../../examples/orders/mod.rs"]
mod orders;

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orders::{CreateOrder, CreateOrderReceptor, Inventory, OrderCreated, OrderSummaries, line};
use std::sync::OnceLock;
use support::amqp::*;
use support::pg::{self, drop_schemas, on_postgres};
use support::*;
use tracing::Instrument;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use uuid::Uuid;
use whizbang::{Message, Runtime};

/// The exporter behind the process's one subscriber, installed on first use.
fn exporter() -> InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let spans = Targets::new()
                .with_target("whizbang", tracing::Level::INFO)
                .with_target("trace", tracing::Level::INFO);
            tracing_subscriber::registry()
                .with(whizbang::telemetry::layer(&provider).with_filter(spans))
                .init();
            exporter
        })
        .clone()
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> String {
    attr(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

/// The finished spans of `trace`.
fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter answers")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// The one span of `spans` named `name` whose parent is `parent`.
fn child<'a>(spans: &'a [SpanData], name: &str, parent: SpanId) -> &'a SpanData {
    let found: Vec<_> = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name} span under {parent}; the trace: {:#?}",
        spans
            .iter()
            .map(|s| (&s.name, s.span_context.span_id(), s.parent_span_id))
            .collect::<Vec<_>>()
    );
    found[0]
}

#[actix::test]
async fn one_trace_runs_from_the_order_command_through_the_broker_into_the_inventory_perspective()
-> anyhow::Result<()> {
    let exporter = exporter();
    let _pg = pg::slot().await;
    let _broker = require_broker().await?;
    let topic = unique("trace");
    let _topology = Topology::declare(&[(&topic, &["inventory"])])?;
    let id = Uuid::now_v7().simple().to_string();
    let (orders_schema, inventory_schema) = (format!("t_{id}_o"), format!("t_{id}_i"));
    let order_config = on_postgres(
        publishing(
            amqp_config("order-service"),
            OrderCreated::TYPE_NAME,
            &topic,
        ),
        &orders_schema,
    );
    let inventory_config = on_postgres(
        subscribed(amqp_config("inventory-service"), &topic, "inventory"),
        &inventory_schema,
    );
    let result = async {
        let reserved = Inventory::default();
        let inventory = Runtime::builder(inventory_config)
            .perspective::<OrderCreated, _>("inventory", reserved.clone())
            .start()
            .await?;
        let order_service = Runtime::builder(order_config)
            .receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
            .read_model::<OrderCreated, _>(
                "order-summaries",
                OrderSummaries::memory(),
                whizbang::Consistency::Async,
            )
            .start()
            .await?;

        // The caller's span (an HTTP request, say): the root of the trace.
        let request = tracing::info_span!(target: "trace", "POST /orders");
        let root = whizbang::telemetry::span_context(&request)
            .ok_or_else(|| anyhow::anyhow!("the root span is not recorded"))?;
        let (trace, root_id) = (root.trace_id(), root.span_id());
        let order_id = format!("trace-{id}");
        let created: OrderCreated = order_service
            .local_invoke::<CreateOrder, OrderCreated>(CreateOrder {
                order_id: order_id.clone(),
                customer_id: "c-1".into(),
                lines: vec![line("GIZMO", 3, 450)],
            })
            .instrument(request.clone())
            .await?;
        drop(request);
        wait_until("the inventory perspective to apply the order", || {
            reserved.0.lock().unwrap().get("GIZMO") == Some(&3)
        })
        .await?;
        // Spans end (and are exported) once their work and every clone of them is done.
        wait_until("the inventory perspective span to be exported", || {
            let spans = spans_of(trace);
            spans
                .iter()
                .filter(|s| s.name == "whizbang.perspective")
                .count()
                == 2
                && spans.iter().any(|s| s.name == "POST /orders")
                && spans.iter().any(|s| s.name == "whizbang.inbox_commit")
        })
        .await?;
        let spans = spans_of(trace);

        // Order service: request → dispatch → receptor → (its local perspective, the publish).
        let dispatch = child(&spans, "whizbang.dispatch", root_id);
        assert_eq!(text(dispatch, "messaging.operation.type"), "send");
        assert_eq!(text(dispatch, "messaging.operation.name"), "local_invoke");
        assert_eq!(text(dispatch, "whizbang.message_type"), "CreateOrder");
        assert_eq!(
            text(dispatch, "whizbang.stream_id"),
            format!("order-{order_id}")
        );
        let command_id = text(dispatch, "messaging.message.id");
        assert!(Uuid::parse_str(&command_id).is_ok(), "{command_id}");
        let receptor = child(&spans, "whizbang.receptor", dispatch.span_context.span_id());
        assert_eq!(text(receptor, "messaging.operation.type"), "process");
        assert_eq!(text(receptor, "messaging.message.id"), command_id);
        let local = child(
            &spans,
            "whizbang.perspective",
            receptor.span_context.span_id(),
        );
        assert_eq!(text(local, "whizbang.message_type"), "OrderCreated");
        let event_id = text(local, "messaging.message.id");
        assert_eq!(text(local, "whizbang.causation_id"), command_id);
        assert_eq!(
            text(local, "messaging.message.conversation_id"),
            command_id,
            "the correlation id of an original request is its own message id"
        );
        let publish = child(&spans, "whizbang.publish", receptor.span_context.span_id());
        assert_eq!(text(publish, "messaging.system"), "rabbitmq");
        assert_eq!(text(publish, "messaging.destination.name"), topic);
        assert_eq!(text(publish, "messaging.message.id"), event_id);

        // Over the wire: inventory service's receive → inbox commit, receive → perspective.
        let receive = child(&spans, "whizbang.receive", publish.span_context.span_id());
        assert!(
            receive.parent_span_is_remote,
            "the parent came from the broker message"
        );
        assert_eq!(text(receive, "messaging.operation.type"), "receive");
        assert_eq!(
            text(receive, "messaging.destination.subscription.name"),
            "inventory"
        );
        assert_eq!(text(receive, "messaging.message.id"), event_id);
        assert_eq!(
            text(receive, "messaging.message.conversation_id"),
            command_id
        );
        let commit = child(
            &spans,
            "whizbang.inbox_commit",
            receive.span_context.span_id(),
        );
        assert_eq!(text(commit, "messaging.operation.type"), "settle");
        assert_eq!(text(commit, "whizbang.settlement"), "accepted");
        let remote = child(
            &spans,
            "whizbang.perspective",
            receive.span_context.span_id(),
        );
        assert_eq!(text(remote, "messaging.message.id"), event_id);
        assert_eq!(text(remote, "whizbang.causation_id"), command_id);
        assert!(
            attr(remote, "whizbang.partition").is_some(),
            "the partition is recorded"
        );
        assert_eq!(created.order_id, order_id);

        order_service.shutdown().await?;
        inventory.shutdown().await?;
        anyhow::Ok(())
    }
    .await;
    drop_schemas(&[&orders_schema, &inventory_schema]).await?;
    drop(exporter);
    result
}

/// The exported spans whose `whizbang.stream_id` is `stream`.
fn spans_of_stream(stream: &str) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter answers")
        .into_iter()
        .filter(|s| text(s, "whizbang.stream_id") == stream)
        .collect()
}

/// A `local_invoke` of `CreateOrder` for `order_id` with no caller span; answers its stream.
async fn order(runtime: &Runtime, order_id: String) -> anyhow::Result<String> {
    let created: OrderCreated = runtime
        .local_invoke::<CreateOrder, OrderCreated>(CreateOrder {
            order_id: order_id.clone(),
            customer_id: "c-1".into(),
            lines: vec![line("GIZMO", 1, 450)],
        })
        .await?;
    assert_eq!(created.order_id, order_id);
    Ok(format!("order-{order_id}"))
}

/// Head sampling (`telemetry.tracing.sample_ratio`, `max_traces_per_second`) is decided once,
/// where the trace starts: a dropped call records no span at any step, a kept one all of them,
/// and a call inside a caller's recorded span follows the caller whatever the sampler says.
#[actix::test]
async fn a_trace_is_kept_or_dropped_whole_where_it_starts() -> anyhow::Result<()> {
    exporter();
    let id = Uuid::now_v7().simple().to_string();
    let start = |ratio: f64, per_second: u32| {
        let mut config = config("sampled-service");
        config.telemetry.tracing.sample_ratio = ratio;
        config.telemetry.tracing.max_traces_per_second = per_second;
        Runtime::builder(config)
            .receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
            .perspective::<OrderCreated, _>("inventory", Inventory::default())
            .start()
    };
    let full_trace = |stream: &str| {
        let spans = spans_of_stream(stream);
        let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
        [
            "whizbang.dispatch",
            "whizbang.receptor",
            "whizbang.perspective",
        ]
        .iter()
        .all(|n| names.iter().any(|m| m == n))
            && spans
                .iter()
                .all(|s| s.span_context.trace_id() == spans[0].span_context.trace_id())
    };

    // sample_ratio 0: a call on its own starts no trace; inside a caller's span it follows it.
    let never = start(0.0, 0).await?;
    let dropped = order(&never, format!("dropped-{id}")).await?;
    let request = tracing::info_span!(target: "trace", "POST /orders");
    let followed = order(&never, format!("followed-{id}"))
        .instrument(request.clone())
        .await?;
    drop(request);
    // The calls run one after the other, so once the second's spans are exported the first's
    // would have been too.
    wait_until("the followed call's spans to be exported", || {
        full_trace(&followed)
    })
    .await?;
    assert!(
        spans_of_stream(&dropped).is_empty(),
        "a dropped call recorded spans: {:?}",
        spans_of_stream(&dropped)
            .iter()
            .map(|s| &s.name)
            .collect::<Vec<_>>()
    );
    never.shutdown().await?;

    // max_traces_per_second 3: of 30 calls in a row at most 3 a second start a trace, each
    // with all its spans; the others record none.
    let capped = start(1.0, 3).await?;
    let started = std::time::Instant::now();
    let mut streams = Vec::new();
    for n in 0..30 {
        streams.push(order(&capped, format!("capped-{n}-{id}")).await?);
    }
    let seconds = started.elapsed().as_secs() + 1;
    capped.shutdown().await?;
    let kept: Vec<_> = streams
        .iter()
        .filter(|s| !spans_of_stream(s).is_empty())
        .collect();
    assert!(
        !kept.is_empty() && kept.len() as u64 <= 3 * seconds,
        "{} of 30 calls kept in {seconds} s",
        kept.len()
    );
    for stream in kept {
        wait_until("a kept call's trace to be whole", || full_trace(stream)).await?;
    }
    Ok(())
}
