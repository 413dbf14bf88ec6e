//! `whizbang-bench amqp`: the AMQP 1.0 transport on the local RabbitMQ, with the Postgres
//! store, in one run. The suite declares its own topology (exchanges and queues named for this
//! run, deleted at the end) and works in throwaway schemas (dropped at the end).
//!
//! Figures (one `name: value` line each):
//! - `publish_msgs_per_s`, `bare_publish_msgs_per_s`, `publish_ratio_vs_bare`: outbox → broker.
//!   N events appended with `Runtime::publish` (Postgres store, interval flush, many streams
//!   in flight) until the broker has accepted all N of them from the runtime's publisher
//!   (counted at the transport seam: an accepted send is routed to the queue), beside a bare
//!   fe2o3-amqp sender (window 256) sending N copies (fresh message ids) of an envelope the
//!   runtime sent to the same exchange until all are accepted.
//! - `consume_events_per_s`: broker → inbox (dedup) → perspective. A subscription queue
//!   pre-filled with N event envelopes; a runtime (Postgres store, schema already migrated) is
//!   started on it and timed from `start()` until its counting perspective applied all N.
//! - `bare_drain_msgs_per_s`, `consume_ratio_vs_bare_drain`: the same queue pre-filled with the
//!   same N envelopes, drained by a bare fe2o3-amqp receiver (credit windows of the runtime's
//!   prefetch, accepting each message), timed from attach to the last accept; and the
//!   runtime's consume rate over it. `--consume-rounds` rounds (default 3) in alternating
//!   order, each on a fresh schema: the medians, and the ratio's median, min and max.
//! - `e2e_p50_ms`, `e2e_p99_ms`: a sender runtime's `local_invoke` (receptor → event with a
//!   topic → outbox → broker) to the perspective of a second runtime consuming the
//!   subscription, at a fixed offered rate, timed from each event's intended send time (carried
//!   in the event, so a late send counts against the latency).

use super::{BenchResult, Samples, figure};
use async_trait::async_trait;
use fe2o3_amqp::link::CreditMode;
use fe2o3_amqp::types::messaging::{Body, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::{FlushStrategy, StoreBackend, SubscriptionConfig, TransportKind};
use whizbang::envelope::{MessageKind, now_us};
use whizbang::transport::amqp::{AmqpTransport, wire};
use whizbang::transport::{Subscription, Transport, TransportError};
use whizbang::{
    Command, Config, Decision, Envelope, Event, EventMeta, Message, Perspective, PerspectiveError,
    Receptor, ReceptorContext, ReceptorError, Runtime,
};
use whizbang_tools_common::amqp_topology;

#[derive(clap::Args)]
pub struct AmqpArgs {
    /// Database URL (default: WHIZBANG_DATABASE_URL or the local server).
    #[arg(long)]
    pub database_url: Option<String>,
    /// AMQP URL (default: WHIZBANG_AMQP_URL or the local RabbitMQ).
    #[arg(long)]
    pub amqp_url: Option<String>,
    /// Events of the publish and consume rate figures.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Streams the rate figures spread their events over.
    #[arg(long, default_value_t = 1_000)]
    pub streams: usize,
    /// Offered rate of the end-to-end latency figure, events per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds the end-to-end load is offered.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Offered rates of the `e2e` suite, events per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub rates: Vec<u64>,
    /// After `rates`, the `e2e` suite doubles the rate up to this bound (0: no search) to find
    /// the highest sustainable one.
    #[arg(long, default_value_t = 8_000)]
    pub search_up_to: u64,
    /// A rate is sustainable while its p99 stays at or below this many milliseconds (above it
    /// the consumer falls behind and the queue, and with it the latency, keeps growing).
    #[arg(long, default_value_t = 250.0)]
    pub sustainable_p99_ms: f64,
    /// Rounds of the consume figure: each times a runtime and the bare receiver over the same
    /// pre-filled queue, in alternating order; the figures are the medians.
    #[arg(long, default_value_t = 3)]
    pub consume_rounds: usize,
}

/// How long any phase may take before the suite fails.
const DEADLINE: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(1);

// ---- The workload ------------------------------------------------------------------------

/// A command asking for one `Tick`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ping {
    stream: String,
    n: u64,
    intended_us: i64,
}
impl Message for Ping {
    const TYPE_NAME: &'static str = "BenchPing";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Ping {}

/// The event: carries the instant (unix µs) its command was meant to be sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tick {
    stream: String,
    n: u64,
    intended_us: i64,
}
impl Message for Tick {
    const TYPE_NAME: &'static str = "BenchTick";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Tick {}

struct PingReceptor;
impl Receptor<Ping> for PingReceptor {
    type Result = Tick;
    async fn handle(
        &self,
        c: Ping,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Tick>, ReceptorError> {
        Ok(Decision::event(Tick {
            stream: c.stream,
            n: c.n,
            intended_us: c.intended_us,
        }))
    }
}

/// Counts applied ticks.
#[derive(Clone, Default)]
struct Count(Arc<AtomicUsize>);
impl Perspective<Tick> for Count {
    async fn apply(&self, _e: Tick, _m: EventMeta) -> Result<(), PerspectiveError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Records now − intended of every applied tick.
#[derive(Clone, Default)]
struct Latencies(Arc<Mutex<Vec<Duration>>>);
impl Perspective<Tick> for Latencies {
    async fn apply(&self, e: Tick, _m: EventMeta) -> Result<(), PerspectiveError> {
        let us = (now_us() - e.intended_us).max(0) as u64;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Duration::from_micros(us));
        Ok(())
    }
}
impl Latencies {
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn tick(stream: usize, n: usize) -> Tick {
    Tick {
        stream: format!("s-{stream}"),
        n: n as u64,
        intended_us: now_us(),
    }
}

fn tick_envelope(t: &Tick) -> BenchResult<Envelope> {
    Ok(Envelope::new(
        MessageKind::Event,
        Tick::TYPE_NAME,
        t.stream_id(),
        whizbang::message::encode(t)?,
    ))
}

/// The runtime's transport, counting the sends the broker accepted.
struct Counted {
    inner: Arc<dyn Transport>,
    accepted: AtomicUsize,
    /// The last envelope sent, which the bare sender copies (same size on the wire).
    sample: Mutex<Option<Envelope>>,
}

#[async_trait]
impl Transport for Counted {
    async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<(), TransportError> {
        self.inner.publish(topic, envelope).await?;
        *self.sample.lock().unwrap_or_else(|p| p.into_inner()) = Some(envelope.clone());
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        self.inner.subscribe(topic, subscription, prefetch).await
    }
    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError> {
        self.inner.check_topology(topics, subscriptions).await
    }
}

// ---- Environment: topology, schemas, configuration -----------------------------------------

struct Names {
    publish_topic: String,
    consume_topic: String,
    e2e_topic: String,
    schema: String,
}

impl Names {
    fn new() -> Names {
        let id = &Uuid::now_v7().simple().to_string()[16..];
        Names {
            publish_topic: format!("bench-pub-{id}"),
            consume_topic: format!("bench-con-{id}"),
            e2e_topic: format!("bench-e2e-{id}"),
            schema: format!("bench_amqp_{id}"),
        }
    }

    fn specs(&self) -> Vec<String> {
        vec![
            format!("{}:sink", self.publish_topic),
            format!("{}:inbox", self.consume_topic),
            format!("{}:remote", self.e2e_topic),
        ]
    }

    fn schemas(&self) -> Vec<String> {
        ["pub", "con", "snd", "rcv", "dup"]
            .iter()
            .map(|s| format!("{}_{s}", self.schema))
            .collect()
    }
}

fn database_url(args: &AmqpArgs) -> String {
    crate::database_url(args.database_url.as_deref())
}

fn amqp_url(args: &AmqpArgs) -> String {
    args.amqp_url
        .clone()
        .or_else(|| std::env::var("WHIZBANG_AMQP_URL").ok())
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672".into())
}

fn config(args: &AmqpArgs, service: &str, schema: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = database_url(args).into();
    c.store.schema = schema.into();
    c.transport.kind = TransportKind::Amqp;
    c.transport.amqp_url = amqp_url(args).into();
    c.transport.amqp.reconnect_backoff_max_ms = 1_000;
    c
}

async fn wait(what: &str, mut done: impl FnMut() -> bool) -> BenchResult<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > DEADLINE {
            return Err(format!("timed out after {DEADLINE:?} waiting for {what}").into());
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

pub async fn amqp(args: AmqpArgs) -> BenchResult<()> {
    let names = Names::new();
    amqp_topology::topology(&names.specs(), false)?;
    let result = run(&args, &names).await;
    clean_up(&args, &names).await;
    result
}

/// The `e2e` suite: end-to-end latency at each of `args.rates`.
pub async fn e2e(args: AmqpArgs) -> BenchResult<()> {
    let names = Names::new();
    amqp_topology::topology(&names.specs(), false)?;
    let result = e2e_rates(&args, &names).await;
    clean_up(&args, &names).await;
    result
}

/// The fixed rates, then doubling from the last one until the p99 passes the bound.
async fn e2e_rates(args: &AmqpArgs, names: &Names) -> BenchResult<()> {
    let mut sustainable = 0;
    let mut rate = 0;
    for &r in &args.rates {
        rate = r;
        let p99_ms = end_to_end(args, names, r, &format!("e2e_{r}")).await?;
        if p99_ms <= args.sustainable_p99_ms {
            sustainable = sustainable.max(r);
        }
    }
    while rate > 0 && rate * 2 <= args.search_up_to && sustainable == rate {
        rate *= 2;
        let p99_ms = end_to_end(args, names, rate, &format!("e2e_{rate}")).await?;
        if p99_ms <= args.sustainable_p99_ms {
            sustainable = rate;
        }
    }
    figure("e2e_sustainable_p99_bound_ms", args.sustainable_p99_ms);
    figure("e2e_max_sustainable_per_s", sustainable);
    Ok(())
}

/// Deletes this run's exchanges and queues and drops its schemas, whatever happened.
async fn clean_up(args: &AmqpArgs, names: &Names) {
    if let Err(e) = amqp_topology::topology(&names.specs(), true) {
        eprintln!("whizbang-bench: could not delete the topology: {e}");
    }
    match tokio_postgres::connect(&database_url(args), tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // Every schema of the run: the fixed ones and the consume rounds' (`{con}_{round}`).
            let like = format!("{}\\_%", names.schema);
            let rounds = client
                .query(
                    "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1",
                    &[&like],
                )
                .await
                .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
                .unwrap_or_else(|_| Vec::new());
            for s in names.schemas().into_iter().chain(rounds) {
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
                    .await;
            }
        }
        Err(e) => eprintln!("whizbang-bench: could not drop the schemas: {e}"),
    }
}

async fn run(args: &AmqpArgs, names: &Names) -> BenchResult<()> {
    let schemas = names.schemas();
    let n = args.events.max(1);
    let streams = args.streams.max(1);
    figure("events", n);

    // ---- 1. Outbox → broker, beside a bare pipelined sender ----
    let mut c = config(args, "bench-pub", &schemas[0]);
    c.coordinator.flush_strategy = FlushStrategy::Interval;
    c.partitions.max_partitions_per_instance = c.partitions.partition_count;
    c.routing
        .topics
        .insert(Tick::TYPE_NAME.into(), names.publish_topic.clone());
    let counted = Arc::new(Counted {
        inner: Arc::new(AmqpTransport::from_config(&c.transport, "bench-pub")?),
        accepted: AtomicUsize::new(0),
        sample: Mutex::new(None),
    });
    let rt = Arc::new(
        Runtime::builder(c)
            .transport(counted.clone())
            .start()
            .await?,
    );
    // Warm up: connection, link, the queue's process.
    for i in 0..200 {
        rt.publish(tick(i % streams, i)).await?;
    }
    wait("the warm-up publishes", || {
        counted.accepted.load(Ordering::Relaxed) >= 200
    })
    .await?;
    let before = counted.accepted.load(Ordering::Relaxed);
    let per_stream = n.div_ceil(streams);
    let total = per_stream * streams;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for s in 0..streams {
        let rt = rt.clone();
        tasks.push(actix_rt::spawn(async move {
            for i in 0..per_stream {
                rt.publish(tick(s, i)).await?;
            }
            Ok::<_, whizbang::DispatchError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let committed = start.elapsed();
    wait("the broker to accept every published event", || {
        counted.accepted.load(Ordering::Relaxed) >= before + total
    })
    .await?;
    let publish_rate = total as f64 / start.elapsed().as_secs_f64();
    let rt = Arc::try_unwrap(rt).map_err(|_| "runtime still shared")?;
    rt.shutdown().await?;

    let sample = counted
        .sample
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or("nothing was published")?;
    let bare_rate = bare_rate(&amqp_url(args), &names.publish_topic, total, &sample).await?;
    figure("publish_events", total);
    figure(
        "publish_commit_msgs_per_s",
        format!("{:.0}", total as f64 / committed.as_secs_f64()),
    );
    figure("publish_msgs_per_s", format!("{publish_rate:.0}"));
    figure("bare_publish_msgs_per_s", format!("{bare_rate:.0}"));
    figure(
        "publish_ratio_vs_bare",
        format!("{:.2}", publish_rate / bare_rate),
    );

    // ---- 2. Broker → inbox → perspective (W3), without and with 10% duplicate deliveries ----
    // One pass of each is a few seconds on a shared machine: rounds, in alternating order, and
    // the medians (the ratio is the median of each round's own ratio).
    let (mut rates, mut drains, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.consume_rounds.max(1) {
        let schema = format!("{}_{round}", schemas[1]);
        let (rate, drain) = if round % 2 == 0 {
            let rate = consume(args, names, &schema, n, streams, None).await?;
            (rate, bare_drain(args, names, n, streams).await?)
        } else {
            let drain = bare_drain(args, names, n, streams).await?;
            (
                consume(args, names, &schema, n, streams, None).await?,
                drain,
            )
        };
        eprintln!("consume round {round}: runtime {rate:.0}/s, bare drain {drain:.0}/s");
        rates.push(rate);
        drains.push(drain);
        ratios.push(rate / drain);
    }
    let (rates, drains, ratios) = (Samples::of(rates), Samples::of(drains), Samples::of(ratios));
    figure("consume_rounds", ratios.0.len());
    for (name, value) in [
        (
            "consume_events_per_s",
            format!("{:.0}", rates.percentile(50.0)),
        ),
        (
            "bare_drain_msgs_per_s",
            format!("{:.0}", drains.percentile(50.0)),
        ),
        (
            "consume_ratio_vs_bare_drain",
            format!("{:.2}", ratios.percentile(50.0)),
        ),
        (
            "consume_ratio_min",
            format!("{:.2}", ratios.percentile(0.0)),
        ),
        (
            "consume_ratio_max",
            format!("{:.2}", ratios.percentile(100.0)),
        ),
    ] {
        figure(name, value);
    }
    let rate = consume(args, names, &schemas[4], n, streams, Some(10)).await?;
    figure(
        "consume_10pct_duplicates_deliveries_per_s",
        format!("{rate:.0}"),
    );

    // ---- 3. End to end at a fixed offered rate ----
    end_to_end(args, names, args.rate, "e2e").await.map(|_| ())
}

/// Pre-fills the consume topic with `n` deliveries (with `duplicate_every`, every k-th repeats
/// the message before it: same message id), then times a runtime on `schema` consuming them
/// into the inbox and a counting perspective; deliveries per second. Fails if a duplicate took
/// effect.
async fn consume(
    args: &AmqpArgs,
    names: &Names,
    schema: &str,
    n: usize,
    streams: usize,
    duplicate_every: Option<usize>,
) -> BenchResult<f64> {
    let mut c = config(args, "bench-con", schema);
    c.partitions.max_partitions_per_instance = c.partitions.partition_count;
    // Migrate the schema first, so the timed start does not include it.
    Runtime::builder(c.clone())
        .start()
        .await?
        .shutdown()
        .await?;
    let filler = AmqpTransport::from_config(&c.transport, "bench-fill")?;
    let mut deliveries: Vec<Envelope> = Vec::with_capacity(n);
    for i in 0..n {
        match (duplicate_every, deliveries.last()) {
            // Never the last one: its arrival in the inbox proves everything before it came.
            (Some(k), Some(previous)) if i % k == k / 2 && i + 1 < n => {
                deliveries.push(previous.clone())
            }
            _ => deliveries.push(tick_envelope(&tick(i % streams, i))?),
        }
    }
    let unique = deliveries
        .iter()
        .map(|e| e.message_id)
        .collect::<std::collections::HashSet<_>>()
        .len();
    let mut in_flight = FuturesUnordered::new();
    for e in &deliveries {
        if in_flight.len() >= 256
            && let Some(r) = in_flight.next().await
        {
            r?;
        }
        in_flight.push(filler.publish(&names.consume_topic, e));
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    drop(in_flight);
    c.routing.subscriptions.push(SubscriptionConfig {
        topic: names.consume_topic.clone(),
        name: "inbox".into(),
    });
    let count = Count::default();
    let start = Instant::now();
    let rt = Runtime::builder(c)
        .perspective::<Tick, _>("count", count.clone())
        .start()
        .await?;
    wait("the perspective to apply every pre-filled event", || {
        count.0.load(Ordering::Relaxed) >= unique
    })
    .await?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    // Every delivery, duplicates included, received: the last one (never a duplicate) has its
    // dedup record, since the inbox takes deliveries in the order they arrive.
    let last = deliveries.last().map(|e| e.message_id).unwrap_or_default();
    let (client, conn) =
        tokio_postgres::connect(&database_url(args), tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let deadline = Instant::now() + DEADLINE;
    loop {
        let seen: i64 = client
            .query_one(
                &format!("SELECT count(*) FILTER (WHERE message_id = $1) FROM {schema}.wb_dedup"),
                &[&last],
            )
            .await?
            .get(0);
        let pending: i64 = client
            .query_one(&format!("SELECT count(*) FROM {schema}.wb_inbox"), &[])
            .await?
            .get(0);
        if seen == 1 && pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("inbox not drained: {pending} rows left").into());
        }
        tokio::time::sleep(POLL * 10).await;
    }
    rt.shutdown().await?;
    let applied = count.0.load(Ordering::Relaxed);
    if applied != unique {
        return Err(format!("{applied} applications of {unique} distinct events").into());
    }
    Ok(rate)
}

/// Latency from the intended send time of a `local_invoke` on one runtime to the perspective
/// of another having applied its event, at `rate` events/s offered for `args.seconds`; figures
/// named `{prefix}_p50_ms` and so on; returns the p99 in milliseconds. Each call gets fresh schemas (the pair of runtimes of an
/// earlier rate must not leave work behind for this one).
async fn end_to_end(args: &AmqpArgs, names: &Names, rate: u64, prefix: &str) -> BenchResult<f64> {
    let schemas = names.schemas();
    let (snd_schema, rcv_schema) = (
        format!("{}_{rate}", schemas[2]),
        format!("{}_{rate}", schemas[3]),
    );
    let result = end_to_end_in(args, names, rate, prefix, &snd_schema, &rcv_schema).await;
    if let Ok((client, conn)) =
        tokio_postgres::connect(&database_url(args), tokio_postgres::NoTls).await
    {
        tokio::spawn(async move {
            let _ = conn.await;
        });
        for s in [&snd_schema, &rcv_schema] {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
                .await;
        }
    }
    result
}

async fn end_to_end_in(
    args: &AmqpArgs,
    names: &Names,
    rate: u64,
    prefix: &str,
    snd_schema: &str,
    rcv_schema: &str,
) -> BenchResult<f64> {
    let mut snd = config(args, "bench-snd", snd_schema);
    snd.routing
        .topics
        .insert(Tick::TYPE_NAME.into(), names.e2e_topic.clone());
    let mut rcv = config(args, "bench-rcv", rcv_schema);
    rcv.routing.subscriptions.push(SubscriptionConfig {
        topic: names.e2e_topic.clone(),
        name: "remote".into(),
    });
    let latencies = Latencies::default();
    let receiver = Runtime::builder(rcv)
        .perspective::<Tick, _>("latency", latencies.clone())
        .start()
        .await?;
    let sender = Arc::new(
        Runtime::builder(snd)
            .receptor::<Ping, _>(PingReceptor)
            .start()
            .await?,
    );
    let rate = rate.max(1);
    let warmup = (rate / 2) as usize;
    let timed = (rate * args.seconds.max(1)) as usize;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let e2e_streams = 256;
    // Warm-up: half a second at the same rate, not recorded.
    let errors = Arc::new(AtomicUsize::new(0));
    for (phase, calls) in [(0, warmup), (1, timed)] {
        if phase == 1 {
            wait("the warm-up events to arrive", || latencies.len() >= warmup).await?;
            latencies
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
        let t0 = Instant::now();
        let t0_us = now_us();
        let mut tasks = Vec::with_capacity(calls);
        for i in 0..calls {
            let offset = interval * i as u32;
            tokio::time::sleep_until((t0 + offset).into()).await;
            let sender = sender.clone();
            let errors = errors.clone();
            let ping = Ping {
                stream: format!("e2e-{}", i % e2e_streams),
                n: i as u64,
                intended_us: t0_us + offset.as_micros() as i64,
            };
            tasks.push(actix_rt::spawn(async move {
                let r: Result<Tick, _> = sender.local_invoke(ping).await;
                if r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
    }
    if errors.load(Ordering::Relaxed) > 0 {
        return Err(format!(
            "{} local_invoke calls failed",
            errors.load(Ordering::Relaxed)
        )
        .into());
    }
    wait("every timed event to reach the remote perspective", || {
        latencies.len() >= timed
    })
    .await?;
    let samples = Samples::new(std::mem::take(
        &mut *latencies.0.lock().unwrap_or_else(|p| p.into_inner()),
    ));
    let sender = Arc::try_unwrap(sender).map_err(|_| "runtime still shared")?;
    sender.shutdown().await?;
    receiver.shutdown().await?;
    figure(&format!("{prefix}_offered_per_s"), rate);
    figure(&format!("{prefix}_events"), timed);
    for p in [50.0, 95.0, 99.0] {
        figure(
            &format!("{prefix}_p{p}_ms"),
            format!("{:.2}", samples.percentile(p) / 1000.0),
        );
    }
    Ok(samples.percentile(99.0) / 1000.0)
}

/// Pre-fills the consume topic's queue with `n` envelopes like [`consume`] does, then drains it
/// with a bare fe2o3-amqp receiver: credit granted a window (the runtime's prefetch) at a time
/// once the previous one is used up (as the runtime does: RabbitMQ fails a link whose credit is
/// renewed while transfers are on the wire), each message accepted; msg/s from the attach to
/// the last accept.
async fn bare_drain(args: &AmqpArgs, names: &Names, n: usize, streams: usize) -> BenchResult<f64> {
    let c = config(args, "bench-drain", "unused");
    let window = c.transport.prefetch.max(1);
    let filler = AmqpTransport::from_config(&c.transport, "bench-fill")?;
    let envelopes = (0..n)
        .map(|i| tick_envelope(&tick(i % streams, i)))
        .collect::<BenchResult<Vec<_>>>()?;
    let mut in_flight = FuturesUnordered::new();
    for e in &envelopes {
        if in_flight.len() >= 256
            && let Some(r) = in_flight.next().await
        {
            r?;
        }
        in_flight.push(filler.publish(&names.consume_topic, e));
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    drop(in_flight);
    let address = filler.subscription_address(&names.consume_topic, "inbox");
    let start = Instant::now();
    let mut connection = Connection::open("bench-drain", amqp_url(args).as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut receiver = Receiver::builder()
        .name("bare-drain")
        .source(address.as_str())
        .credit_mode(CreditMode::Manual)
        .auto_accept(false)
        .attach(&mut session)
        .await?;
    let mut drained = 0;
    while drained < n {
        let grant = window.min((n - drained) as u32);
        receiver.set_credit(grant).await?;
        for _ in 0..grant {
            let delivery = tokio::time::timeout(DEADLINE, receiver.recv::<Body<Value>>())
                .await
                .map_err(|_| format!("bare drain: nothing received after {drained} of {n}"))??;
            receiver.accept(&delivery).await?;
            drained += 1;
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(receiver);
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(rate)
}

/// A bare fe2o3-amqp sender: `send_batchable` with up to 256 unsettled, `n` copies (each with
/// its own message id) of an envelope the runtime sent; msg/s until all are accepted.
async fn bare_rate(url: &str, topic: &str, n: usize, sample: &Envelope) -> BenchResult<f64> {
    let window = 256;
    let mut connection = Connection::open("bench-bare", url).await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut sender = Sender::attach(&mut session, "bare", format!("/exchange/{topic}")).await?;
    let make = |count: usize| -> Vec<_> {
        (0..count)
            .map(|_| {
                let mut e = sample.clone();
                e.message_id = Uuid::now_v7();
                wire::to_message(&e)
            })
            .collect()
    };
    // Warm up like the runtime did.
    for message in make(200) {
        let outcome = sender.send_batchable(message).await?.await?;
        if !matches!(outcome, Outcome::Accepted(_)) {
            return Err("bare send not accepted".into());
        }
    }
    let batch = make(n);
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for message in batch {
        if in_flight.len() >= window
            && let Some(outcome) = in_flight.next().await
            && !matches!(outcome?, Outcome::Accepted(_))
        {
            return Err("bare send not accepted".into());
        }
        in_flight.push(sender.send_batchable(message).await?);
    }
    while let Some(outcome) = in_flight.next().await {
        if !matches!(outcome?, Outcome::Accepted(_)) {
            return Err("bare send not accepted".into());
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(in_flight);
    let _ = sender.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(rate)
}
