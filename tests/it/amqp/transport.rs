//! The AMQP transport's own behaviour on a real RabbitMQ broker: the topology check names what
//! is missing (and the runtime refuses to start without it), a send to a missing exchange
//! fails instead of hanging, an unreachable broker fails fast with capped reconnect backoff,
//! concurrent publishes are pipelined on one link, and the publish rate is measured beside a
//! bare fe2o3-amqp sender in the same run.

use crate::support::amqp::*;
use crate::support::*;
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::{Connection, Sender, Session};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use std::sync::Arc;
use std::time::{Duration, Instant};
use whizbang::transport::amqp::{AmqpTransport, wire};
use whizbang::transport::{Settlement, Transport, TransportError};
use whizbang::{Message, Runtime, StartError};

#[tokio::test]
async fn topology_check_names_what_is_missing() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("topo");
    let _topology = Topology::declare(&[(&topic, &["present"])])?;
    let t = amqp_transport();
    t.check_topology(
        std::slice::from_ref(&topic),
        &[(topic.clone(), "present".into())],
    )
    .await?;

    let missing_topic = unique("nosuch");
    let err = t
        .check_topology(
            &[topic.clone(), missing_topic.clone()],
            &[
                (topic.clone(), "present".into()),
                (topic.clone(), "absent".into()),
            ],
        )
        .await
        .expect_err("missing topology must be reported");
    let TransportError::Topology(message) = &err else {
        anyhow::bail!("expected a Topology error, got {err:?}");
    };
    assert!(
        message.contains(&format!("/exchange/{missing_topic}")),
        "{message}"
    );
    assert!(
        message.contains(&format!("/amq/queue/{topic}.absent")),
        "{message}"
    );
    assert!(!message.contains("present"), "{message}");
    assert!(!err.is_transient());
    Ok(())
}

#[actix::test]
async fn runtime_refuses_to_start_without_its_topology() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("nostart");
    let config = subscribed(
        publishing(amqp_config("nostart"), Bumped::TYPE_NAME, &topic),
        &topic,
        "inventory",
    );
    match Runtime::builder(config).start().await {
        Err(StartError::Transport(TransportError::Topology(message))) => {
            assert!(message.contains(&format!("/exchange/{topic}")), "{message}");
            assert!(
                message.contains(&format!("/amq/queue/{topic}.inventory")),
                "{message}"
            );
            Ok(())
        }
        Err(other) => anyhow::bail!("expected a topology error, got {other}"),
        Ok(_) => anyhow::bail!("the runtime started without its topology"),
    }
}

#[tokio::test]
async fn send_to_a_missing_exchange_fails_without_hanging() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let t = amqp_transport();
    let start = Instant::now();
    let err = t
        .publish(&unique("nosuch"), &event_envelope(&Bumped::new("s", 1)))
        .await
        .expect_err("the exchange does not exist");
    assert!(err.is_transient(), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn unreachable_broker_fails_fast_and_backs_off() -> anyhow::Result<()> {
    // A port on which nothing listens: connections are refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let mut config = amqp_transport_config();
    config.amqp_url = format!("amqp://guest:guest@127.0.0.1:{port}").into();
    config.amqp.reconnect_backoff_base_ms = 2_000;
    config.amqp.reconnect_backoff_max_ms = 2_000;
    let t = AmqpTransport::from_config(&config, "unreachable")?;
    let start = Instant::now();
    let first = t
        .publish("orders", &event_envelope(&Bumped::new("s", 1)))
        .await;
    let second = t
        .publish("orders", &event_envelope(&Bumped::new("s", 2)))
        .await;
    assert!(
        matches!(&first, Err(TransportError::Connection(m)) if m.contains("cannot connect")),
        "{first:?}"
    );
    // Within the backoff the next call does not even try: it says when the next attempt is.
    assert!(
        matches!(&second, Err(TransportError::Connection(m)) if m.contains("next attempt in")),
        "{second:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    let err = t
        .subscribe("orders", "inventory", 10)
        .await
        .err()
        .expect("no broker");
    assert!(err.is_transient());
    Ok(())
}

/// Builds `n` encoded envelopes (what the publisher would send).
fn envelopes(n: usize) -> Vec<whizbang::Envelope> {
    (0..n)
        .map(|i| event_envelope(&Bumped::new(format!("stream-{}", i % 64), i as u32)))
        .collect()
}

/// Publishes `n` envelopes with up to `window` in flight; returns msg/s.
async fn transport_rate(
    t: &Arc<AmqpTransport>,
    topic: &str,
    n: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let batch = envelopes(n);
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for e in &batch {
        if in_flight.len() >= window
            && let Some(r) = in_flight.next().await
        {
            r?;
        }
        in_flight.push(t.publish(topic, e));
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A bare fe2o3-amqp sender: `send_batchable` with up to `window` unsettled; returns msg/s.
async fn bare_rate(topic: &str, n: usize, window: usize) -> anyhow::Result<f64> {
    let mut connection = Connection::open("bare-sender", amqp_url().as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut sender = Sender::attach(&mut session, "bare", format!("/exchange/{topic}")).await?;
    let batch: Vec<_> = envelopes(n).iter().map(wire::to_message).collect();
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for message in batch {
        if in_flight.len() >= window
            && let Some(outcome) = in_flight.next().await
        {
            anyhow::ensure!(matches!(outcome?, Outcome::Accepted(_)), "not accepted");
        }
        in_flight.push(sender.send_batchable(message).await?);
    }
    while let Some(outcome) = in_flight.next().await {
        anyhow::ensure!(matches!(outcome?, Outcome::Accepted(_)), "not accepted");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(sender);
    drop(session);
    let _ = connection.close().await;
    Ok(rate)
}

#[tokio::test]
async fn concurrent_publishes_are_pipelined_and_all_accepted() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("rate");
    let _topology = Topology::declare(&[(&topic, &["s"])])?;
    let t = amqp_transport();
    let n = 3_000;
    // Warm up (connection, attach, JIT of the broker's queue process).
    transport_rate(&t, &topic, 200, 256).await?;
    bare_rate(&topic, 200, 256).await?;

    let one_at_a_time = transport_rate(&t, &topic, 500, 1).await?;
    let pipelined = transport_rate(&t, &topic, n, 256).await?;
    let bare = bare_rate(&topic, n, 256).await?;
    println!(
        "publish rate ({n} messages, ~{} bytes each): whizbang publish window 256 = {pipelined:.0} msg/s, one at a time = {one_at_a_time:.0} msg/s, bare fe2o3-amqp sender window 256 = {bare:.0} msg/s, ratio {:.2}",
        wire::to_message(&event_envelope(&Bumped::new("stream-1", 1)))
            .body
            .0
            .len(),
        pipelined / bare
    );
    assert!(
        pipelined > one_at_a_time,
        "pipelining must beat one send at a time: {pipelined:.0} vs {one_at_a_time:.0} msg/s"
    );

    // Everything sent reached the subscription queue exactly once per send.
    let total = 200 + 500 + n + 200 + n;
    let mut sub = t.subscribe(&topic, "s", 500).await?;
    let mut received = 0;
    let start = Instant::now();
    while received < total {
        anyhow::ensure!(start.elapsed() < DEADLINE, "received {received} of {total}");
        let batch = tokio::time::timeout(DEADLINE, sub.receive(500)).await??;
        for d in batch {
            anyhow::ensure!(d.message.is_ok(), "{:?}", d.message);
            sub.settle(d.tag, Settlement::Accept).await?;
            received += 1;
        }
    }
    let rate = received as f64 / start.elapsed().as_secs_f64();
    println!("receive rate (prefetch 500, accept each): {rate:.0} msg/s");
    Ok(())
}

#[test]
fn shipped_configs_carry_the_amqp_section_at_its_defaults() -> anyhow::Result<()> {
    use whizbang::Config;
    use whizbang::config::{AmqpAuth, AmqpFlavour, StoreBackend, TransportKind};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let defaults = Config::default().transport.amqp;
    for file in [
        "config/whizbang.toml",
        "config/postgres.toml",
        "config/amqp.toml",
    ] {
        let text = std::fs::read_to_string(root.join(file))?;
        let c = Config::parse(&text, std::path::Path::new(file))?;
        let a = &c.transport.amqp;
        assert_eq!(a.flavour, AmqpFlavour::RabbitMq, "{file}");
        assert_eq!(a.auth, AmqpAuth::Plain, "{file}");
        assert_eq!(format!("{a:?}"), format!("{defaults:?}"), "{file}");
        assert_eq!(a.connect_timeout_ms, defaults.connect_timeout_ms, "{file}");
        assert_eq!(a.idle_timeout_ms, defaults.idle_timeout_ms, "{file}");
        assert_eq!(
            (a.reconnect_backoff_base_ms, a.reconnect_backoff_max_ms),
            (
                defaults.reconnect_backoff_base_ms,
                defaults.reconnect_backoff_max_ms
            ),
            "{file}"
        );
        assert_eq!(
            (a.token_ttl_seconds, a.token_renew_before_seconds),
            (
                defaults.token_ttl_seconds,
                defaults.token_renew_before_seconds
            ),
            "{file}"
        );
    }
    let text = std::fs::read_to_string(root.join("config/amqp.toml"))?;
    let c = Config::parse(&text, std::path::Path::new("config/amqp.toml"))?;
    assert_eq!(c.transport.kind, TransportKind::Amqp);
    assert_eq!(c.store.backend, StoreBackend::Postgres);
    assert_eq!(
        c.routing.topics.get("OrderCreated").map(String::as_str),
        Some("orders")
    );
    let t = AmqpTransport::from_config(&c.transport, "check")?;
    assert_eq!(t.topic_address("orders"), "/exchange/orders");
    assert_eq!(
        t.subscription_address("orders", "inventory"),
        "/amq/queue/orders.inventory"
    );
    Ok(())
}

#[tokio::test]
async fn unsettled_deliveries_come_back_when_a_subscription_is_dropped() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("unsettled");
    let _topology = Topology::declare(&[(&topic, &["s"])])?;
    let t = amqp_transport();
    let sent: Vec<_> = (1..=5)
        .map(|i| event_envelope(&Bumped::new("s", i)))
        .collect();
    for e in &sent {
        t.publish(&topic, e).await?;
    }
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let mut got = Vec::new();
    while got.len() < sent.len() {
        got.extend(tokio::time::timeout(DEADLINE, sub.receive(10)).await??);
    }
    // Accept the first two only, then lose the subscription (a consumer that stops or dies).
    for d in &got[..2] {
        sub.settle(d.tag, Settlement::Accept).await?;
    }
    drop(sub);
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let mut again = Vec::new();
    while again.len() < 3 {
        again.extend(tokio::time::timeout(DEADLINE, sub.receive(10)).await??);
    }
    let ids: Vec<_> = again
        .iter()
        .map(|d| d.message.as_ref().map(|e| e.message_id).ok())
        .collect();
    let expected: Vec<_> = sent[2..].iter().map(|e| Some(e.message_id)).collect();
    assert_eq!(ids, expected, "the unsettled three come back, in order");
    for d in &again {
        sub.settle(d.tag, Settlement::Accept).await?;
    }
    Ok(())
}

/// A Service Bus-style configuration pointed at the local broker: the connection string in its
/// emulator form (plain AMQP on 127.0.0.1:5672) and RabbitMQ's address forms.
fn connection_string_config(auth: whizbang::config::AmqpAuth) -> whizbang::config::TransportConfig {
    let mut config = amqp_transport_config();
    config.amqp.flavour = whizbang::config::AmqpFlavour::ServiceBus;
    config.amqp.auth = auth;
    config.amqp.connection_string = "Endpoint=sb://127.0.0.1:5672/;SharedAccessKeyName=guest;SharedAccessKey=guest;UseDevelopmentEmulator=true".into();
    config.amqp.topic_address = Some("/exchange/{topic}".into());
    config.amqp.subscription_address = Some("/amq/queue/{topic}.{subscription}".into());
    config
}

#[tokio::test]
async fn connection_string_with_sasl_plain_carries_messages() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("connstr");
    let _topology = Topology::declare(&[(&topic, &["s"])])?;
    let t = AmqpTransport::from_config(
        &connection_string_config(whizbang::config::AmqpAuth::Plain),
        "connstr",
    )?;
    assert_eq!(t.settings().url, "amqp://127.0.0.1:5672");
    let e = event_envelope(&Bumped::new("s", 1));
    t.publish(&topic, &e).await?;
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let got = tokio::time::timeout(DEADLINE, sub.receive(10)).await??;
    assert_eq!(got[0].message.as_ref().ok(), Some(&e));
    sub.settle(got[0].tag, Settlement::Accept).await?;
    Ok(())
}

/// RabbitMQ has no `$cbs` node: with `auth = "cbs"` the connection is opened with SASL
/// ANONYMOUS and the link is not attached before a token was put on `$cbs`, so the send fails
/// naming CBS — the put-token step really runs before any link.
#[tokio::test]
async fn cbs_auth_puts_a_token_before_attaching_the_link() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let topic = unique("cbs");
    let _topology = Topology::declare(&[(&topic, &["s"])])?;
    let t = AmqpTransport::from_config(
        &connection_string_config(whizbang::config::AmqpAuth::Cbs),
        "cbs",
    )?;
    match t
        .publish(&topic, &event_envelope(&Bumped::new("s", 1)))
        .await
    {
        Err(TransportError::Connection(message)) => {
            assert!(message.contains("CBS"), "{message}");
            assert!(
                message.contains(&format!("amqp://127.0.0.1/exchange/{topic}")),
                "the token is for the link's entity: {message}"
            );
        }
        other => anyhow::bail!("expected the CBS step to fail on RabbitMQ, got {other:?}"),
    }
    Ok(())
}

/// An unreachable broker's errors, their `Debug` and the log name the endpoint but never the
/// password of `amqp_url` nor the `SharedAccessKey` of a connection string, nor does the
/// `Debug` of the settings built from them.
#[actix::test]
async fn broker_errors_never_show_the_password_or_the_key() -> anyhow::Result<()> {
    let logs = captured_logs();
    let secret = format!("S3cret{}", uuid::Uuid::now_v7().simple());
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let mut plain = amqp_transport_config();
    plain.amqp_url = format!("amqp://guest:{secret}@127.0.0.1:{port}").into();
    let mut service_bus = amqp_transport_config();
    service_bus.amqp.flavour = whizbang::config::AmqpFlavour::ServiceBus;
    service_bus.amqp.connection_string = format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=send;SharedAccessKey={secret}=;UseDevelopmentEmulator=true"
    )
    .into();
    for config in [plain, service_bus] {
        let t = AmqpTransport::from_config(&config, "secret-test")?;
        let published = t
            .publish("orders", &event_envelope(&Bumped::new("s", 1)))
            .await
            .expect_err("no broker");
        let subscribed = t
            .subscribe("orders", "inventory", 10)
            .await
            .err()
            .expect("no broker");
        let said = format!(
            "{published}\n{published:?}\n{subscribed}\n{subscribed:?}\n{config:?}\n{:?}",
            t.settings()
        );
        assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
        assert!(!said.contains(&secret), "the secret leaked: {said}");
    }
    let leaked = log_lines_with(&logs, &secret);
    assert!(leaked.is_empty(), "the secret reached the log: {leaked:?}");
    Ok(())
}
