//! Bad input against the real Postgres store (contract 8): strings full of SQL metacharacters
//! and unusual characters go through every text column unharmed; a message the store cannot
//! hold (a NUL character) is refused with a typed error and takes nothing else down with it,
//! whether it comes from a caller, from another service over the transport, or as the error
//! text of a failing perspective. A message bound for the transport with a payload over
//! `transport.max_message_bytes` is refused at dispatch (one at the limit goes through), while
//! messages that stay local are not limited. Invalid commands (a validation failure, an unknown
//! type, a panicking receptor) get their typed errors and write no row.

use crate::support::pg::{self, drop_schemas, new_schema, on_postgres, rows};
use crate::support::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use whizbang::config::FlushStrategy;
use whizbang::transport::memory::MemoryBus;
use whizbang::{
    Command, Config, Decision, DispatchError, Event, EventMeta, Message, Perspective,
    PerspectiveError, Receptor, ReceptorContext, ReceptorError, Runtime,
};

/// `service` on the Postgres store, in a schema of its own.
fn pg(service: &str) -> (Config, String) {
    let schema = new_schema();
    let mut c = on_postgres(config(service), &schema);
    c.store.max_attempts = 3;
    c.store.backoff_base_ms = 10;
    c.store.backoff_max_ms = 20;
    (c, schema)
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
    let _pg = pg::slot().await;
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
    let _pg = pg::slot().await;
    let (mut c, schema) = pg("bad-input-nul");
    // Interval flushes: the bad unit and the good ones would share a batch.
    c.coordinator.flush_strategy = FlushStrategy::Interval;
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
    let _pg = pg::slot().await;
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
    let _pg = pg::slot().await;
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

// ---- Payloads at the transport's size limit ------------------------------------------------

/// The message `make(pad)` with a pad that makes its encoded payload exactly `bytes` long.
fn padded_to<M: Message>(bytes: usize, make: impl Fn(String) -> M) -> M {
    let size = |n: usize| {
        whizbang::message::encode(&make("x".repeat(n)))
            .expect("encodes")
            .len()
    };
    let mut n = 0;
    for _ in 0..8 {
        let len = size(n);
        if len == bytes {
            return make("x".repeat(n));
        }
        n = (n + bytes)
            .checked_sub(len)
            .expect("the unpadded message fits in `bytes`");
    }
    panic!("no pad makes the payload exactly {bytes} bytes");
}

/// A `Bumped` whose payload is exactly `bytes` long.
fn bumped_of(stream: &str, seq: u32, bytes: usize) -> Bumped {
    padded_to(bytes, |pad| Bumped {
        stream: stream.into(),
        seq,
        pad,
    })
}

/// A command whose receptor emits a `Bumped` with a payload of exactly `event_bytes`; `pad`
/// sizes the command itself (when it is sent to another service).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Grow {
    stream: String,
    seq: u32,
    event_bytes: usize,
    pad: String,
}

impl Message for Grow {
    const TYPE_NAME: &'static str = "test.Grow";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Grow {}

/// A `Grow` whose own payload is exactly `bytes` long.
fn grow_of(stream: &str, seq: u32, bytes: usize) -> Grow {
    padded_to(bytes, |pad| Grow {
        stream: stream.into(),
        seq,
        event_bytes: 0,
        pad,
    })
}

struct GrowReceptor;

impl Receptor<Grow> for GrowReceptor {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Grow,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        Ok(Decision::event(bumped_of(
            &cmd.stream,
            cmd.seq,
            cmd.event_bytes,
        )))
    }
}

/// `result` is the refusal of a `message_type` payload of `limit + 1` bytes.
fn check_oversized<T>(
    result: Result<T, DispatchError>,
    message_type: &str,
    limit: u32,
) -> anyhow::Result<()> {
    match result {
        Err(e @ DispatchError::InvalidMessage { .. }) => {
            anyhow::ensure!(e.http_status() == 400 && !e.is_retryable(), "{e}");
            let text = e.to_string();
            anyhow::ensure!(text.contains(message_type), "{text}");
            anyhow::ensure!(text.contains(&format!("{} bytes", limit + 1)), "{text}");
            anyhow::ensure!(text.contains(&format!("limit of {limit}")), "{text}");
            Ok(())
        }
        Err(other) => anyhow::bail!("expected InvalidMessage, got {other:?}"),
        Ok(_) => anyhow::bail!("expected InvalidMessage, the dispatch succeeded"),
    }
}

#[actix::test]
async fn an_event_over_the_transport_limit_is_refused_at_dispatch_and_nothing_of_it_is_written()
-> anyhow::Result<()> {
    let _pg = pg::slot().await;
    const TOPIC: &str = "bad-input-size";
    const LIMIT: u32 = 2_048;
    let bus = MemoryBus::new();
    let (mut down_config, down_schema) = pg("bad-input-size-down");
    down_config.transport.max_message_bytes = LIMIT;
    let remote = Recorder::new();
    let down = on_bus(subscribed(down_config, TOPIC, "down"), &bus)
        .perspective::<Bumped, _>("remote", remote.clone())
        .start()
        .await?;
    let (mut up_config, up_schema) = pg("bad-input-size-up");
    up_config.transport.max_message_bytes = LIMIT;
    // Interval flushes: a refused unit and good ones would share a batch.
    up_config.coordinator.flush_strategy = FlushStrategy::Interval;
    let local = Recorder::new();
    let up = on_bus(publishing(up_config, Bumped::TYPE_NAME, TOPIC), &bus)
        .receptor::<Bump, _>(BumpReceptor)
        .receptor::<Grow, _>(GrowReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;

    // At the limit, from a receptor and from `publish`: accepted.
    let at = unique("at-limit");
    let r: Bumped = up
        .local_invoke(Grow {
            stream: at.clone(),
            seq: 1,
            event_bytes: LIMIT as usize,
            pad: String::new(),
        })
        .await?;
    anyhow::ensure!(whizbang::message::encode(&r)?.len() == LIMIT as usize);
    up.publish(bumped_of(&at, 2, LIMIT as usize)).await?;

    // One byte over, from a receptor, alongside good commands: refused, the good ones commit.
    let over = unique("over-limit");
    let good: Vec<String> = (0..20).map(|i| unique(&format!("good-{i}"))).collect();
    let bad = up.local_invoke::<Grow, Bumped>(Grow {
        stream: over.clone(),
        seq: 1,
        event_bytes: LIMIT as usize + 1,
        pad: String::new(),
    });
    let goods = futures::future::join_all(good.iter().map(|stream| {
        up.local_invoke::<Bump, Bumped>(Bump {
            stream: stream.clone(),
            seq: 1,
        })
    }));
    let (bad, goods) = futures::join!(bad, goods);
    check_oversized(bad, Bumped::TYPE_NAME, LIMIT)?;
    for (stream, result) in good.iter().zip(goods) {
        let r = result.map_err(|e| anyhow::anyhow!("{stream}: {e}"))?;
        anyhow::ensure!(r.seq == 1 && local.seqs(stream) == vec![1]);
    }
    // And from `publish`.
    check_oversized(
        up.publish(bumped_of(&over, 2, LIMIT as usize + 1)).await,
        Bumped::TYPE_NAME,
        LIMIT,
    )?;

    // Nothing of the refused ones was written; the accepted ones were.
    for table in ["wb_events", "wb_outbox", "wb_inbox"] {
        let n = rows(&up_schema, table, Some(&over)).await?;
        anyhow::ensure!(n == 0, "{n} rows of the refused messages in {table}");
    }
    anyhow::ensure!(rows(&up_schema, "wb_events", Some(&at)).await? == 2);
    anyhow::ensure!(local.seqs(&at) == vec![1, 2] && local.seqs(&over).is_empty());

    // The other service applies the events at the limit and the good ones, and rejects nothing.
    wait_until("the accepted events at the other service", || {
        remote.seqs(&at) == vec![1, 2] && good.iter().all(|s| remote.seqs(s) == vec![1])
    })
    .await?;
    wait_until("the subscription to drain", || {
        bus.depth(TOPIC, "down") == 0
    })
    .await?;
    let rejected = bus.dead_letters(TOPIC, "down");
    anyhow::ensure!(rejected.is_empty(), "rejected: {rejected:?}");
    anyhow::ensure!(remote.seqs(&over).is_empty() && remote.total() == 22);
    up.shutdown().await?;
    down.shutdown().await?;
    drop_schemas(&[&up_schema, &down_schema]).await
}

#[actix::test]
async fn local_messages_are_not_limited_by_the_transport_and_a_remote_command_is()
-> anyhow::Result<()> {
    let _pg = pg::slot().await;
    const COMMANDS: &str = "bad-input-size-commands";
    const LIMIT: u32 = 2_048;
    let bus = MemoryBus::new();
    // What the broker received, for another service that handles `Grow`.
    bus.declare(COMMANDS, "audit");
    let (mut c, schema) = pg("bad-input-size-local");
    c.transport.max_message_bytes = LIMIT;
    // `Grow` has no receptor here: it goes out. `Bumped` has no topic: it stays here.
    let c = publishing(c, Grow::TYPE_NAME, COMMANDS);
    let local = Recorder::new();
    let rt = on_bus(c, &bus)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;

    // An event four times the limit that stays here: stored and applied, no outbox row.
    let big = unique("big-local");
    rt.publish(bumped_of(&big, 1, 4 * LIMIT as usize)).await?;
    wait_until("the big event applied", || local.seqs(&big) == vec![1]).await?;
    anyhow::ensure!(rows(&schema, "wb_events", Some(&big)).await? == 1);
    anyhow::ensure!(rows(&schema, "wb_outbox", Some(&big)).await? == 0);

    // A command for another service: at the limit it is accepted and published; one byte over
    // it is refused and never reaches the outbox (the next one of its stream is published
    // right after the first).
    let stream = unique("remote-command");
    let receipt = rt.send(grow_of(&stream, 1, LIMIT as usize)).await?;
    anyhow::ensure!(receipt.status == whizbang::ReceiptStatus::Accepted);
    check_oversized(
        rt.send(grow_of(&stream, 2, LIMIT as usize + 1)).await,
        Grow::TYPE_NAME,
        LIMIT,
    )?;
    rt.send(grow_of(&stream, 3, LIMIT as usize)).await?;
    wait_for("the accepted commands published", || async {
        bus.depth(COMMANDS, "audit") >= 2
            && rows(&schema, "wb_outbox", Some(&stream)).await.ok() == Some(0)
    })
    .await?;
    anyhow::ensure!(bus.depth(COMMANDS, "audit") == 2);
    rt.shutdown().await?;
    drop_schemas(&[&schema]).await
}

// ---- Invalid commands: typed errors, no rows -----------------------------------------------

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
enum Verdict {
    Ok,
    Invalid,
    Panic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Check {
    stream: String,
    seq: u32,
    verdict: Verdict,
}

impl Message for Check {
    const TYPE_NAME: &'static str = "test.Check";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Check {}

struct CheckReceptor;

impl Receptor<Check> for CheckReceptor {
    type Result = Bumped;

    async fn handle(
        &self,
        cmd: Check,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Bumped>, ReceptorError> {
        match cmd.verdict {
            Verdict::Ok => Ok(Decision::event(Bumped::new(cmd.stream, cmd.seq))),
            Verdict::Invalid => Err(ReceptorError::Validation("seq must be odd".into())),
            Verdict::Panic => panic!("the receptor fell over on {}", cmd.stream),
        }
    }
}

/// No receptor and no topic anywhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stray {
    stream: String,
}

impl Message for Stray {
    const TYPE_NAME: &'static str = "test.Stray";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Stray {}

#[actix::test]
async fn invalid_commands_get_typed_errors_and_write_no_row() -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    const TOPIC: &str = "bad-input-checks";
    let bus = MemoryBus::new();
    bus.declare(TOPIC, "audit");
    let (c, schema) = pg("bad-input-invalid");
    let local = Recorder::new();
    let rt = on_bus(publishing(c, Bumped::TYPE_NAME, TOPIC), &bus)
        .receptor::<Check, _>(CheckReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;
    let stream = unique("invalid");
    let check = |verdict| Check {
        stream: stream.clone(),
        seq: 1,
        verdict,
    };
    let invalid = |e: Option<DispatchError>, via: &str| -> anyhow::Result<()> {
        match e {
            Some(
                e @ DispatchError::Rejected {
                    error: ReceptorError::Validation(_),
                    ..
                },
            ) => {
                anyhow::ensure!(e.http_status() == 400 && !e.is_retryable(), "{via}: {e}");
                anyhow::ensure!(
                    e.to_string().contains("seq must be odd")
                        && e.to_string().contains("test.Check"),
                    "{via}: {e}"
                );
                Ok(())
            }
            other => anyhow::bail!("{via}: expected a validation failure, got {other:?}"),
        }
    };
    let panicked = |e: Option<DispatchError>, via: &str| -> anyhow::Result<()> {
        match e {
            Some(DispatchError::Panicked {
                message_type,
                message,
            }) => {
                anyhow::ensure!(message_type == Check::TYPE_NAME, "{via}: {message_type}");
                anyhow::ensure!(message.contains("fell over"), "{via}: {message}");
                Ok(())
            }
            other => anyhow::bail!("{via}: expected Panicked, got {other:?}"),
        }
    };
    let not_found = |e: Option<DispatchError>, via: &str| -> anyhow::Result<()> {
        match e {
            Some(DispatchError::HandlerNotFound { message_type }) => {
                anyhow::ensure!(message_type == Stray::TYPE_NAME, "{via}: {message_type}");
                Ok(())
            }
            other => anyhow::bail!("{via}: expected HandlerNotFound, got {other:?}"),
        }
    };

    invalid(
        rt.local_invoke::<Check, Bumped>(check(Verdict::Invalid))
            .await
            .err(),
        "local_invoke",
    )?;
    invalid(rt.send(check(Verdict::Invalid)).await.err(), "send")?;
    panicked(
        rt.local_invoke::<Check, Bumped>(check(Verdict::Panic))
            .await
            .err(),
        "local_invoke",
    )?;
    panicked(rt.send(check(Verdict::Panic)).await.err(), "send")?;
    let stray = || Stray {
        stream: stream.clone(),
    };
    not_found(
        rt.local_invoke::<Stray, ()>(stray()).await.err(),
        "local_invoke",
    )?;
    not_found(rt.send(stray()).await.err(), "send")?;

    // Not a row anywhere in the schema, and nothing at the broker.
    for table in ["wb_events", "wb_outbox", "wb_inbox", "wb_dedup"] {
        let n = rows(&schema, table, None).await?;
        anyhow::ensure!(n == 0, "{n} rows in {table} after refused commands");
    }
    anyhow::ensure!(bus.depth(TOPIC, "audit") == 0);

    // A good command right after, on the same stream, by both calls.
    let r: Bumped = rt.local_invoke(check(Verdict::Ok)).await?;
    anyhow::ensure!(r.seq == 1 && local.seqs(&stream) == vec![1]);
    let receipt = rt
        .send(Check {
            seq: 2,
            ..check(Verdict::Ok)
        })
        .await?;
    anyhow::ensure!(
        receipt.events.len() == 1 && receipt.events[0].version == 2,
        "{receipt:?}"
    );
    anyhow::ensure!(rows(&schema, "wb_events", None).await? == 2);
    wait_until("both events published", || bus.depth(TOPIC, "audit") == 2).await?;
    wait_until("both events applied", || local.seqs(&stream) == vec![1, 2]).await?;
    rt.shutdown().await?;
    drop_schemas(&[&schema]).await
}
