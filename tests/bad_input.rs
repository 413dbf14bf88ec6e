//! Bad input against the real Postgres store (contract 8): strings full of SQL metacharacters
//! and unusual characters go through every text column unharmed; a message the store cannot
//! hold (a NUL character) is refused with a typed error and takes nothing else down with it,
//! whether it comes from a caller, from another service over the transport, or as the error
//! text of a failing perspective.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use uuid::Uuid;
use whizbang::config::StoreBackend;
use whizbang::transport::memory::MemoryBus;
use whizbang::{
    Config, DispatchError, Event, EventMeta, Message, Perspective, PerspectiveError, Runtime,
};

fn database_url() -> String {
    std::env::var("WHIZBANG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `service` on the Postgres store, in a schema of its own.
fn pg(service: &str) -> (Config, String) {
    let schema = format!("t_{}", Uuid::now_v7().simple());
    let mut c = config(service);
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = database_url();
    c.store.schema = schema.clone();
    c.store.max_attempts = 3;
    c.store.backoff_base_ms = 10;
    c.store.backoff_max_ms = 20;
    (c, schema)
}

async fn drop_schemas(schemas: &[&str]) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    for s in schemas {
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
            .await?;
    }
    Ok(())
}

/// Stream ids a careless store would mangle or choke on.
fn hostile_streams() -> Vec<String> {
    vec![
        "o'reilly'); DROP TABLE wb_events; --".into(),
        r#"back\slash "double" `tick` $1 %s {{schema}} ? :name"#.into(),
        "ünïcødé — ストリーム — 🚀 — مرحبا — \u{200b}zero-width".into(),
        "tab\there\nnewline\r\nand more".into(),
        "x".repeat(2_000),
        " leading and trailing spaces ".into(),
    ]
}

#[actix::test]
async fn hostile_strings_round_trip_through_every_text_column() -> anyhow::Result<()> {
    const TOPIC: &str = "bad-input-strings";
    let bus = MemoryBus::new();
    let (down_config, down_schema) = pg("bad-input-down");
    let remote = Recorder::new();
    let down = on_bus(subscribed(down_config, TOPIC, "down"), &bus)
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await?;
    let (up_config, up_schema) = pg("bad-input-up");
    let local = Recorder::new();
    let rt = on_bus(publishing(up_config, Bumped::TYPE_NAME, TOPIC), &bus)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;

    let streams = hostile_streams();
    for stream in &streams {
        for seq in 1..=3 {
            let r: Bumped = rt
                .local_invoke(Bump {
                    stream: stream.clone(),
                    seq,
                })
                .await?;
            anyhow::ensure!(&r.stream == stream && r.seq == seq);
        }
        // Read your write, exactly as given.
        anyhow::ensure!(local.seqs(stream) == vec![1, 2, 3], "{stream:?}");
        let stored = rt.store().read_stream(stream, 0).await?;
        anyhow::ensure!(stored.len() == 3, "{stream:?}: {} stored", stored.len());
        anyhow::ensure!(stored.iter().all(|e| &e.envelope.stream_id == stream));
    }
    wait_until("every event at the other service", || {
        streams.iter().all(|s| remote.seqs(s) == vec![1, 2, 3])
    })
    .await?;
    anyhow::ensure!(remote.total() == streams.len() * 3);
    rt.shutdown().await?;
    down.shutdown().await?;
    drop_schemas(&[&up_schema, &down_schema]).await
}

#[actix::test]
async fn a_nul_in_a_stream_id_is_refused_and_the_same_batch_commits() -> anyhow::Result<()> {
    let (mut c, schema) = pg("bad-input-nul");
    // Interval flushes: the bad unit and the good ones would share a batch.
    c.coordinator.flush_strategy = whizbang::config::FlushStrategy::Interval;
    let local = Recorder::new();
    let rt = Runtime::builder(c)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;
    let good: Vec<String> = (0..20).map(|i| unique(&format!("good-{i}"))).collect();
    let bad = rt.local_invoke::<Bump, Bumped>(Bump {
        stream: "nul\0inside".into(),
        seq: 1,
    });
    let goods = futures::future::join_all(good.iter().map(|stream| {
        rt.local_invoke::<Bump, Bumped>(Bump {
            stream: stream.clone(),
            seq: 1,
        })
    }));
    let (bad, goods) = futures::join!(bad, goods);
    match bad {
        Err(e @ DispatchError::InvalidMessage { .. }) => {
            anyhow::ensure!(e.http_status() == 400 && !e.is_retryable(), "{e}");
            anyhow::ensure!(e.to_string().contains("NUL"), "{e}");
        }
        other => anyhow::bail!("expected InvalidMessage, got {other:?}"),
    }
    for (stream, result) in good.iter().zip(goods) {
        let r = result.map_err(|e| anyhow::anyhow!("{stream}: {e}"))?;
        anyhow::ensure!(r.seq == 1);
        anyhow::ensure!(local.seqs(stream) == vec![1]);
    }
    anyhow::ensure!(
        rt.store()
            .read_stream("nul\0inside", 0)
            .await
            .is_err_or_empty()
    );
    rt.shutdown().await?;
    drop_schemas(&[&schema]).await
}

/// `is_err_or_empty` for the read of a stream id the store may not even accept as a parameter.
trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl<T, E> ErrOrEmpty for Result<Vec<T>, E> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, Vec::is_empty)
    }
}

#[actix::test]
async fn a_delivery_with_a_nul_is_rejected_and_consumption_goes_on() -> anyhow::Result<()> {
    const TOPIC: &str = "bad-input-nul-delivery";
    let bus = MemoryBus::new();
    let (c, schema) = pg("bad-input-nul-consumer");
    let remote = Recorder::new();
    let rt = on_bus(subscribed(c, TOPIC, "consumer"), &bus)
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await?;
    let stream = unique("after-nul");
    bus.declare(TOPIC, "consumer");
    bus.inject(TOPIC, event_envelope(&Bumped::new("nul\0stream", 1)));
    for seq in 1..=5 {
        bus.inject(TOPIC, event_envelope(&Bumped::new(stream.clone(), seq)));
    }
    wait_until("the good deliveries applied", || {
        remote.seqs(&stream) == vec![1, 2, 3, 4, 5]
    })
    .await?;
    let rejected = bus.dead_letters(TOPIC, "consumer");
    anyhow::ensure!(
        rejected.len() == 1 && rejected[0].1.contains("NUL"),
        "rejections: {rejected:?}"
    );
    anyhow::ensure!(remote.total() == 5);
    rt.shutdown().await?;
    drop_schemas(&[&schema]).await
}

/// Fails with an error text carrying a NUL, a few times, then applies.
#[derive(Clone, Default)]
struct FailsWithNul(Recorder, Arc<AtomicU32>);

impl<E: Event + Seq> Perspective<E> for FailsWithNul {
    async fn apply(&self, event: E, meta: EventMeta) -> Result<(), PerspectiveError> {
        if self.1.fetch_add(1, Ordering::SeqCst) < 2 {
            return Err(PerspectiveError("bad\0bytes from user code".into()));
        }
        self.0.apply(event, meta).await
    }
}

#[actix::test]
async fn a_nul_in_a_perspective_error_is_recorded_and_the_retry_runs() -> anyhow::Result<()> {
    let (c, schema) = pg("bad-input-nul-error");
    let flaky = FailsWithNul::default();
    let rt = Runtime::builder(c)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("flaky", flaky.clone())
        .start()
        .await?;
    let stream = unique("nul-error");
    // The first application fails (its failure report carries the NUL); the retries follow.
    let first = rt
        .local_invoke::<Bump, Bumped>(Bump {
            stream: stream.clone(),
            seq: 1,
        })
        .await;
    anyhow::ensure!(
        matches!(first, Err(DispatchError::PerspectiveFailed { .. })),
        "{first:?}"
    );
    wait_until("the retry to apply the event", || {
        flaky.0.seqs(&stream) == vec![1]
    })
    .await?;
    // And the runtime still commits.
    let r: Bumped = rt
        .local_invoke(Bump {
            stream: stream.clone(),
            seq: 2,
        })
        .await?;
    anyhow::ensure!(r.seq == 2 && flaky.0.seqs(&stream) == vec![1, 2]);
    rt.shutdown().await?;
    drop_schemas(&[&schema]).await
}
