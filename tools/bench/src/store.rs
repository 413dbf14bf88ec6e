//! `whizbang-bench store`: the Postgres store beside raw SQL on the same tables, in one run.
//!
//! Figures (one `name: value` line each):
//! - `empty_batch_ms_p50`: a work batch with nothing to do (a claim that finds nothing);
//! - `store_{immediate,scoped,interval}_events_per_s` (W1): commands each producing one event
//!   (event store + outbox, then published), with each flush strategy;
//!   `store_events_per_s`, `raw_events_per_s`, `store_ratio_vs_raw`: the interval one beside a
//!   raw batched `INSERT … SELECT unnest(…)` of the same rows into a copy of the same tables
//!   (the event and outbox rows the store round wrote, read back: same stream ids, versions,
//!   ids, meta and payloads), in `--rounds` alternating rounds: the medians of the rates and
//!   of the rounds' ratios (each round's figures on the `…_rounds` lines); the raw copy's
//!   tables are kept in the state of the store's: the earlier phases' events, and an outbox
//!   emptied after each round (untimed), as the store's is by publishing;
//!   `raw_minimal_rows_events_per_s`, `store_ratio_vs_raw_minimal_rows`: the same beside rows
//!   of the same count with the smallest meta, no causation id and a stream each (the baseline
//!   up to 2026-11-29, kept for comparison);
//!   `store_runtime_cpu_us_per_event`, `store_server_cpu_us_per_event`,
//!   `raw_client_cpu_us_per_event`, `raw_server_cpu_us_per_event`: CPU time per event of those
//!   rounds (medians), of this process and of a local Postgres server, from `/proc` (left out
//!   where it cannot be read). The store's rounds include publishing and completing the rows
//!   (the drain each round waits for) and the runtime's start and stop; the raw rounds only
//!   insert. On a machine whose cores are all busy in the store rounds, the ratio is about
//!   `cores × raw cost / (runtime + server cost)`;
//! - W0, the physical limit of those tables: `raw_batch100_events_per_s`,
//!   `raw_batch1000_events_per_s`, `raw_row_per_txn_1_client_per_s`,
//!   `raw_row_per_txn_16_clients_per_s`;
//! - `local_invoke_p50_ms`, `local_invoke_p99_ms`, `raw_insert_p50_ms`,
//!   `local_invoke_p50_ratio_vs_raw`: one `local_invoke` (scoped, 1 event + 1 perspective)
//!   beside a raw single-statement transaction inserting one event and one outbox row;
//!   `unit_batch_ms_p50`, `unit_batch_p50_ratio_vs_raw`: the work batch such a call sends
//!   (one unit, no reports), written straight to the store, measured in the same alternation;
//!   `local_invoke_beyond_unit_batch_ms_p50`: the difference of the two p50s, the runtime's
//!   share of a call's latency;
//!   `local_invoke_runtime_cpu_us`, `local_invoke_server_cpu_us`, `raw_insert_client_cpu_us`,
//!   `raw_insert_server_cpu_us`: CPU time per call of each side run alone (this process, the
//!   local server), which shows on which side a local_invoke's extra time is spent;
//! - `idle_queries_per_s`: store calls an idle instance makes, counted at the store seam.
//! - `backlog_claim_ms_p50`, `raw_backlog_claim_ms_p50`, `backlog_claim_ratio_vs_raw`: a claim
//!   of `claim_batch_size` outbox rows (then completed) with `--backlog` rows queued, beside a
//!   bare queue claim (`ORDER BY seq LIMIT … FOR UPDATE SKIP LOCKED`, no stream order) of the
//!   same backlog in the raw copy: a claim must cost what it hands out, not what is queued.

use super::cpu::CpuTime;
use super::{BenchResult, Samples, figure};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::ExposeSecret;
use whizbang::config::{FlushStrategy, StoreBackend};
use whizbang::store::postgres::PostgresStore;
use whizbang::store::*;
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
    ReceptorContext, ReceptorError, Runtime,
};

#[derive(clap::Args)]
pub struct StoreArgs {
    /// Database URL (default: WHIZBANG_DATABASE_URL or the local server).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Commands for the throughput figure.
    #[arg(long, default_value_t = 20_000)]
    pub commands: usize,
    /// Calls for the latency figures.
    #[arg(long, default_value_t = 2_000)]
    pub calls: usize,
    /// Seconds an idle instance is watched.
    #[arg(long, default_value_t = 15)]
    pub idle_seconds: u64,
    /// Outbox rows queued for the backlog claim figure.
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Rounds of the interval throughput beside its raw baseline (medians are reported). On a
    /// shared 2-vCPU VM one round's ratio moves between about 0.55 and 0.9 with the same code;
    /// seven rounds (about 2 s each) keep the median steadier than the three used before.
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    stream: String,
    n: u64,
}
impl Message for Record {
    const TYPE_NAME: &'static str = "BenchRecord";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Record {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Recorded {
    stream: String,
    n: u64,
}
impl Message for Recorded {
    const TYPE_NAME: &'static str = "BenchRecorded";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Recorded {}

struct RecordReceptor;
impl Receptor<Record> for RecordReceptor {
    type Result = Recorded;
    async fn handle(
        &self,
        c: Record,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Recorded>, ReceptorError> {
        Ok(Decision::event(Recorded {
            stream: c.stream,
            n: c.n,
        }))
    }
}

#[derive(Clone, Default)]
struct Count(Arc<AtomicU64>);
impl Perspective<Recorded> for Count {
    async fn apply(&self, _e: Recorded, _m: EventMeta) -> Result<(), PerspectiveError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Counts the calls that reach the store (each is one statement on Postgres).
struct Counting {
    inner: Arc<dyn Store>,
    calls: AtomicU64,
}

#[async_trait]
impl Store for Counting {
    async fn register_instance(&self, i: InstanceId, s: &str, h: &str) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.register_instance(i, s, h).await
    }
    async fn heartbeat(&self, i: InstanceId) -> Result<Heartbeat, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.heartbeat(i).await
    }
    async fn process_work_batch(
        &self,
        i: InstanceId,
        b: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.process_work_batch(i, b).await
    }
    async fn apply_once(
        &self,
        r: &str,
        id: Uuid,
        replay: bool,
        a: &dyn ApplyInTx,
    ) -> Result<AppliedOnce, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.apply_once(r, id, replay, a).await
    }
    async fn apply_once_many(
        &self,
        i: InstanceId,
        w: &[OnceWork<'_>],
    ) -> Result<AppliedMany, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.apply_once_many(i, w).await
    }
    async fn commit_inline(
        &self,
        i: InstanceId,
        u: UnitOfWork,
        a: &dyn InlineApply,
    ) -> Result<InlineOutcome, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.commit_inline(i, u, a).await
    }
    async fn release_partitions(&self, i: InstanceId, p: Option<&[u32]>) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.release_partitions(i, p).await
    }
    async fn read_stream(&self, s: &str, v: u64) -> Result<Vec<StoredEvent>, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.read_stream(s, v).await
    }
    async fn read_all(&self, a: u64, l: u32) -> Result<Vec<StoredEvent>, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.read_all(a, l).await
    }
    async fn last_position(&self) -> Result<u64, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.last_position().await
    }
    async fn inbox_settled(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, InboxSettled)>, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.inbox_settled(ids).await
    }
    async fn correlation_status(&self, c: Uuid) -> Result<CorrelationStatus, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.correlation_status(c).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.dead_letters().await
    }
    async fn requeue_dead_letter(&self, m: Uuid) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.requeue_dead_letter(m).await
    }
    async fn skip_dead_letter(&self, m: Uuid) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.skip_dead_letter(m).await
    }
    async fn load_checkpoint(&self, p: &str) -> Result<Option<u64>, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.load_checkpoint(p).await
    }
    async fn save_checkpoint(&self, p: &str, pos: u64) -> Result<(), StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.save_checkpoint(p, pos).await
    }
    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inner.idempotency_record(key).await
    }
    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.work_signal()
    }
}

fn config(args: &StoreArgs, schema: &str) -> Config {
    let mut c = Config::default();
    c.service.name = "bench".into();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = crate::database_url(args.database_url.as_deref()).into();
    c.store.schema = schema.to_string();
    // One instance alone: it may hold every partition (the default of 100 is a share for a
    // fleet). The store takes this from the config it is opened with, so it is set here, for
    // every phase; the throughput phase has far more streams in flight than 100 partitions.
    c.partitions.max_partitions_per_instance = c.partitions.partition_count;
    c.routing
        .topics
        .insert(Recorded::TYPE_NAME.into(), "bench".into());
    c
}

pub async fn store(args: StoreArgs) -> BenchResult<()> {
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let base = config(&args, &schema);
    // Said before the run, not after it: a backlog the claims drain would time empty claims.
    let needed = BACKLOG_CLAIMS * base.coordinator.claim_batch_size as usize;
    if args.backlog < needed {
        return Err(format!(
            "--backlog {} is too small: the backlog figure times {BACKLOG_CLAIMS} claims of \
             {} rows (coordinator.claim_batch_size), each of which must find a full batch; \
             use at least {needed}",
            args.backlog, base.coordinator.claim_batch_size
        )
        .into());
    }
    let result = run(&args, &base).await;
    // Leave nothing behind, whatever happened.
    if let Ok(client) = crate::raw_client(base.store.database_url.expose_secret()).await {
        let _ = client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_raw CASCADE;
                 DROP SCHEMA IF EXISTS {schema}_rawmin CASCADE"
            ))
            .await;
    }
    result
}

async fn run(args: &StoreArgs, base: &Config) -> BenchResult<()> {
    let pg: Arc<dyn Store> = Arc::new(PostgresStore::connect(base).await?);
    let client = crate::raw_client(base.store.database_url.expose_secret()).await?;
    // The raw baselines write into their own copy of the tables (same migrations, same
    // indexes): rows they insert must not become work for the runtimes measured here.
    let schema = &format!("{}_raw", base.store.schema);
    let mut raw_config = base.clone();
    raw_config.store.schema = schema.clone();
    PostgresStore::connect(&raw_config).await?;

    // 1. An empty batch: a claim that finds nothing.
    let instance = Uuid::now_v7();
    pg.register_instance(instance, "bench", "bench").await?;
    let claim = WorkBatch {
        claim: Some(ClaimBudget {
            outbox: 100,
            inbox: 100,
        }),
        ..WorkBatch::default()
    };
    for _ in 0..200 {
        pg.process_work_batch(instance, claim.clone()).await?;
    }
    let mut samples = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let t = Instant::now();
        pg.process_work_batch(instance, claim.clone()).await?;
        samples.push(t.elapsed());
    }
    // Gone, as after a graceful shutdown: it must not count as a live instance (its fair share
    // would halve the runtimes' below).
    pg.release_partitions(instance, None).await?;
    let empty = Samples::new(samples);
    ms_figure("empty_batch_ms_p50", &empty, 50.0);
    ms_figure("empty_batch_ms_p99", &empty, 99.0);

    // 2. Throughput (W1): each flush strategy; the interval one beside raw batched unnest
    // inserts into the same tables, in alternating rounds (this machine's speed drifts within
    // seconds: a round's two rates are measured next to each other, and the medians are kept).
    let streams = 4_000.min(args.commands).max(1);
    let per_stream = args.commands.div_ceil(streams);
    let total = streams * per_stream;
    figure("store_streams_in_flight", streams);
    for (name, strategy, streams) in [
        // One unit per round trip, so a tenth of the work (a rate, not a total, is compared).
        ("immediate", FlushStrategy::Immediate, streams.div_ceil(10)),
        ("scoped", FlushStrategy::Scoped, streams),
    ] {
        let rate = throughput(&pg, base, strategy, streams, per_stream, &client).await?;
        figure(&format!("store_{name}_events_per_s"), format!("{rate:.0}"));
    }

    let event_meta = rmp_serde::to_vec(&(
        Vec::<whizbang::envelope::Hop>::new(),
        std::collections::BTreeMap::<String, String>::new(),
    ))?;
    let payload = whizbang::message::encode(&Recorded {
        stream: "raw-0".into(),
        n: 0,
    })?;
    let insert = client.prepare(&raw_insert_sql(schema)).await?;
    // The baseline before 2026-11-29 in a copy of its own, so that neither baseline's rows
    // slow the other's inserts down.
    let minimal_schema = format!("{}_rawmin", base.store.schema);
    let mut minimal_config = base.clone();
    minimal_config.store.schema = minimal_schema.clone();
    PostgresStore::connect(&minimal_config).await?;
    let minimal_insert = client.prepare(&raw_insert_sql(&minimal_schema)).await?;
    // The raw copy starts in the state of the store's tables: the events the earlier phases
    // appended, and an outbox that held a row for each and is empty again (its dead rows and
    // their index entries stay, as in the store's: nothing vacuums during the run).
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.wb_events SELECT * FROM {store}.wb_events;
             INSERT INTO {schema}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                    correlation_id, causation_id, message_type, timestamp_us, meta, payload)
             SELECT message_id, 'event', stream_id, {schema}.wb_partition_of(stream_id, 10000),
                    'bench', correlation_id, causation_id, message_type, timestamp_us, meta, payload
               FROM {store}.wb_events;
             DELETE FROM {schema}.wb_outbox",
            store = base.store.schema
        ))
        .await?;
    let rows = RawRows {
        meta: &event_meta,
        payload: &payload,
    };
    let (mut store_rates, mut raw_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut minimal_rates, mut minimal_ratios) = (Vec::new(), Vec::new());
    // CPU per event of each round: [store runtime, store server, raw client, raw server].
    let mut cpu: [Vec<f64>; 4] = Default::default();
    let store_schema = &base.store.schema;
    for round in 0..args.rounds.max(1) {
        let appended_before = EventRows::last_position(&client, store_schema).await?;
        let before = CpuTime::now();
        let store_rate = throughput(
            &pg,
            base,
            FlushStrategy::Interval,
            streams,
            per_stream,
            &client,
        )
        .await?;
        let between = CpuTime::now();
        // The raw baseline inserts the rows this round appended, read back (not timed).
        let appended = EventRows::after(&client, store_schema, appended_before).await?;
        if appended.ids.len() != total {
            return Err(format!(
                "the store round appended {} events, expected {total}",
                appended.ids.len()
            )
            .into());
        }
        let first_position = 1_000_000_000 + round as i64 * 100_000_000;
        let start = CpuTime::now();
        let t = Instant::now();
        appended
            .insert(&client, &insert, 1_000, first_position)
            .await?;
        let raw_rate = total as f64 / t.elapsed().as_secs_f64();
        let after = CpuTime::now();
        // The store round ends with its outbox drained (published, deleted): so does the raw
        // one, untimed, or its outbox would grow round after round where the store's does not.
        client
            .execute(&format!("DELETE FROM {schema}.wb_outbox"), &[])
            .await?;
        // Rows of the same count with the smallest meta, no causation and a stream each: the
        // baseline before 2026-11-29, kept beside it.
        let minimal_rate = rows
            .batched(&client, &minimal_insert, 1_000, total, first_position)
            .await?;
        let (runtime, server) = between.us_per(before, total);
        let (raw_client, raw_server) = after.us_per(start, total);
        for (samples, value) in cpu
            .iter_mut()
            .zip([runtime, server, raw_client, raw_server])
        {
            samples.extend(value);
        }
        store_rates.push(store_rate);
        raw_rates.push(raw_rate);
        ratios.push(store_rate / raw_rate);
        minimal_rates.push(minimal_rate);
        minimal_ratios.push(store_rate / minimal_rate);
    }
    let list = |v: &[f64], digits: usize| {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    figure("store_rounds", ratios.len());
    figure("store_interval_events_per_s_rounds", list(&store_rates, 0));
    figure("raw_events_per_s_rounds", list(&raw_rates, 0));
    figure("store_ratio_vs_raw_rounds", list(&ratios, 2));
    figure(
        "raw_minimal_rows_events_per_s_rounds",
        list(&minimal_rates, 0),
    );
    let median = |v: &[f64]| Samples::of(v.to_vec()).percentile(50.0);
    let (store_rate, raw_rate) = (median(&store_rates), median(&raw_rates));
    figure("store_interval_events_per_s", format!("{store_rate:.0}"));
    figure("store_events_per_s", format!("{store_rate:.0}"));
    figure("raw_events_per_s", format!("{raw_rate:.0}"));
    figure("store_ratio_vs_raw", format!("{:.2}", median(&ratios)));
    let minimal_rate = median(&minimal_rates);
    figure(
        "raw_minimal_rows_events_per_s",
        format!("{minimal_rate:.0}"),
    );
    figure(
        "store_ratio_vs_raw_minimal_rows",
        format!("{:.2}", median(&minimal_ratios)),
    );
    for (name, samples) in [
        "store_runtime_cpu_us_per_event",
        "store_server_cpu_us_per_event",
        "raw_client_cpu_us_per_event",
        "raw_server_cpu_us_per_event",
    ]
    .into_iter()
    .zip(&cpu)
    {
        if !samples.is_empty() {
            figure(name, format!("{:.1}", median(samples)));
        }
    }

    // W0, the physical limit of these tables: batches of 100 rows, and one row (event + outbox)
    // per transaction from 1 and from 16 clients.
    let rate = rows
        .batched(&client, &insert, 100, total, 40_000_000)
        .await?;
    figure("raw_batch100_events_per_s", format!("{rate:.0}"));
    figure("raw_batch1000_events_per_s", format!("{minimal_rate:.0}"));
    let single_rows = 2_000;
    let rate = rows
        .single_rows(&raw_config, 1, single_rows, 50_000_000)
        .await?;
    figure("raw_row_per_txn_1_client_per_s", format!("{rate:.0}"));
    let rate = rows
        .single_rows(&raw_config, 16, single_rows, 60_000_000)
        .await?;
    figure("raw_row_per_txn_16_clients_per_s", format!("{rate:.0}"));

    // 3. Latency: local_invoke (scoped, 1 event + 1 perspective) beside one raw insert statement.
    let mut scoped = base.clone();
    scoped.coordinator.flush_strategy = FlushStrategy::Scoped;
    let count = Count::default();
    let rt = Runtime::builder(scoped)
        .store(pg.clone())
        .receptor::<Record, _>(RecordReceptor)
        .perspective::<Recorded, _>("count", count.clone())
        .start()
        .await?;
    let single = client.prepare(&single_row_sql(schema)).await?;
    // The store's share of a local_invoke: the batch it sends, written straight to the store
    // by an instance of its own (the runtime's holds its own partitions).
    let writer = Uuid::now_v7();
    pg.register_instance(writer, "bench", "bench").await?;
    let mut unit_rows = UnitRows::default();
    let mut invoke = Vec::with_capacity(args.calls);
    let mut unit = Vec::with_capacity(args.calls);
    let mut raw = Vec::with_capacity(args.calls);
    let warmup = 100;
    // Alternate so all three see the same machine.
    for i in 0..args.calls + warmup {
        let t = Instant::now();
        let _: Recorded = rt
            .local_invoke(Record {
                stream: format!("lat-{}", i % 64),
                n: i as u64,
            })
            .await?;
        let d = t.elapsed();
        let batch = unit_batch(i, base.partitions.partition_count)?;
        let t = Instant::now();
        let answer = pg.process_work_batch(writer, batch).await?;
        let u = t.elapsed();
        unit_rows.take(answer)?;
        let t = Instant::now();
        rows.insert_one(&client, &single, 20_000_000 + i as i64)
            .await?;
        let r = t.elapsed();
        if i >= warmup {
            invoke.push(d);
            unit.push(u);
            raw.push(r);
        }
        // As the runtime does on its timer: the rows' completions, in a batch of their own.
        if i % 50 == 49 {
            unit_rows.complete(&pg, writer).await?;
        }
    }
    unit_rows.complete(&pg, writer).await?;
    pg.release_partitions(writer, None).await?;
    if count.0.load(Ordering::Relaxed) < (args.calls + warmup) as u64 {
        return Err("local_invoke returned before its perspective ran".into());
    }
    // CPU per call, each side alone: where a local_invoke's time goes beyond the raw insert's.
    let calls = args.calls;
    let before = CpuTime::now();
    for i in 0..calls {
        let _: Recorded = rt
            .local_invoke(Record {
                stream: format!("lat-{}", i % 64),
                n: i as u64,
            })
            .await?;
    }
    let between = CpuTime::now();
    for i in 0..calls {
        rows.insert_one(&client, &single, 30_000_000 + i as i64)
            .await?;
    }
    let after = CpuTime::now();
    let (runtime, server) = between.us_per(before, calls);
    let (raw_client, raw_server) = after.us_per(between, calls);
    for (name, value) in [
        ("local_invoke_runtime_cpu_us", runtime),
        ("local_invoke_server_cpu_us", server),
        ("raw_insert_client_cpu_us", raw_client),
        ("raw_insert_server_cpu_us", raw_server),
    ] {
        if let Some(value) = value {
            figure(name, format!("{value:.1}"));
        }
    }
    let invoke = Samples::new(invoke);
    let raw = Samples::new(raw);
    ms_figure("local_invoke_p50_ms", &invoke, 50.0);
    ms_figure("local_invoke_p99_ms", &invoke, 99.0);
    ms_figure("raw_insert_p50_ms", &raw, 50.0);
    figure(
        "local_invoke_p50_ratio_vs_raw",
        format!("{:.2}", invoke.percentile(50.0) / raw.percentile(50.0)),
    );
    let unit = Samples::new(unit);
    ms_figure("unit_batch_ms_p50", &unit, 50.0);
    figure(
        "unit_batch_p50_ratio_vs_raw",
        format!("{:.2}", unit.percentile(50.0) / raw.percentile(50.0)),
    );
    figure(
        "local_invoke_beyond_unit_batch_ms_p50",
        format!(
            "{:.3}",
            (invoke.percentile(50.0) - unit.percentile(50.0)) / 1000.0
        ),
    );
    rt.shutdown().await?;

    // 4. A claim with a backlog queued.
    backlog_claims(&pg, base, &client, schema, args.backlog).await?;

    // 5. Idle: store calls of an instance with nothing to do.
    let counting = Arc::new(Counting {
        inner: pg.clone(),
        calls: AtomicU64::new(0),
    });
    let rt = Runtime::builder(base.clone())
        .store(counting.clone())
        .receptor::<Record, _>(RecordReceptor)
        .start()
        .await?;
    // Let start-up work (registration, the first claim) pass, then watch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = counting.calls.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let calls = counting.calls.load(Ordering::Relaxed) - before;
    figure(
        "idle_queries_per_s",
        format!("{:.2}", calls as f64 / t.elapsed().as_secs_f64()),
    );
    rt.shutdown().await?;
    Ok(())
}

/// One unit as `local_invoke` writes it: 1 event, its outbox row and its inbox row for a local
/// perspective, leased to the writer.
fn unit_batch(i: usize, partition_count: u32) -> BenchResult<WorkBatch> {
    let stream = format!("unit-{}", i % 64);
    let envelope = whizbang::Envelope::new(
        whizbang::envelope::MessageKind::Event,
        Recorded::TYPE_NAME,
        stream.clone(),
        whizbang::message::encode(&Recorded {
            stream: stream.clone(),
            n: i as u64,
        })?,
    );
    let partition = whizbang::routing::partition_of(&stream, partition_count);
    let unit = UnitOfWork {
        events: vec![envelope.clone()],
        outbox: vec![NewOutboxRow {
            envelope: envelope.clone(),
            topic: "bench".into(),
            partition,
        }],
        inbox: vec![NewInboxRow {
            envelope,
            partition,
        }],
        claim_for_writer: true,
        ..UnitOfWork::default()
    };
    Ok(WorkBatch {
        units: vec![unit],
        ..WorkBatch::default()
    })
}

/// The rows [`unit_batch`]es leased to their writer, until they are reported done (so they
/// do not pile up in front of the next ones of their stream).
#[derive(Default)]
struct UnitRows {
    outbox: Vec<WorkRef>,
    inbox: Vec<WorkRef>,
}

impl UnitRows {
    fn take(&mut self, answer: WorkBatchResult) -> BenchResult<()> {
        for outcome in answer.units {
            let UnitOutcome::Committed {
                claimed_outbox,
                claimed_inbox,
                ..
            } = outcome
            else {
                return Err("a unit with no expected version conflicted".into());
            };
            self.outbox
                .extend(claimed_outbox.into_iter().map(|w| w.work));
            self.inbox.extend(claimed_inbox.into_iter().map(|w| w.work));
        }
        Ok(())
    }

    /// Reports every row taken so far done; a refused one would stay in front of its stream.
    async fn complete(&mut self, pg: &Arc<dyn Store>, writer: InstanceId) -> BenchResult<()> {
        let batch = WorkBatch {
            outbox_completions: std::mem::take(&mut self.outbox),
            inbox_completions: std::mem::take(&mut self.inbox),
            ..WorkBatch::default()
        };
        let answer = pg.process_work_batch(writer, batch).await?;
        if !answer.stale.is_empty() {
            return Err(
                format!("{} unit rows' completions were refused", answer.stale.len()).into(),
            );
        }
        Ok(())
    }
}

/// The raw batched baseline: events and their outbox rows, from arrays, in one statement.
fn raw_insert_sql(schema: &str) -> String {
    format!(
        "WITH e AS (
            INSERT INTO {schema}.wb_events (position, stream_id, version, message_id, correlation_id,
                   causation_id, message_type, timestamp_us, meta, payload)
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::uuid[],
                                 $6::uuid[], $7::text[], $8::bigint[], $9::bytea[], $10::bytea[]))
         INSERT INTO {schema}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                correlation_id, causation_id, message_type, timestamp_us, meta, payload)
         SELECT id, 'event', s, p, 'bench', c, k, t, ts, m, b
           FROM unnest($4::uuid[], $2::text[], $11::int[], $5::uuid[], $6::uuid[], $7::text[],
                       $8::bigint[], $9::bytea[], $10::bytea[]) AS x(id, s, p, c, k, t, ts, m, b)"
    )
}

/// The raw single-row baseline: one event and its outbox row in one statement.
fn single_row_sql(schema: &str) -> String {
    format!(
            "WITH e AS (
                INSERT INTO {schema}.wb_events (position, stream_id, version, message_id, correlation_id,
                       causation_id, message_type, timestamp_us, meta, payload)
                VALUES ($1, $2, 1, $3, $3, NULL, $4, $5, $6, $7))
             INSERT INTO {schema}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                    correlation_id, causation_id, message_type, timestamp_us, meta, payload)
             VALUES ($3, 'event', $2, 0, 'bench', $3, NULL, $4, $5, $6, $7)"
    )
}

/// Events for a raw baseline to insert, each with its outbox row, in the columns of the raw
/// insert: those a store round appended, read back in position order (so that both sides
/// write the same bytes), or the minimal rows of [`RawRows::minimal`].
#[derive(Default)]
struct EventRows {
    streams: Vec<String>,
    versions: Vec<i64>,
    ids: Vec<Uuid>,
    correlations: Vec<Uuid>,
    causations: Vec<Option<Uuid>>,
    types: Vec<String>,
    timestamps: Vec<i64>,
    metas: Vec<Vec<u8>>,
    payloads: Vec<Vec<u8>>,
}

impl EventRows {
    /// The last position of `schema`'s event store (0 while it is empty).
    async fn last_position(client: &tokio_postgres::Client, schema: &str) -> BenchResult<i64> {
        Ok(client
            .query_one(
                &format!("SELECT coalesce(max(position), 0) FROM {schema}.wb_events"),
                &[],
            )
            .await?
            .get(0))
    }

    /// The events of `schema`'s event store after `position`, in position order.
    async fn after(
        client: &tokio_postgres::Client,
        schema: &str,
        position: i64,
    ) -> BenchResult<EventRows> {
        let mut rows = EventRows::default();
        for row in client
            .query(
                &format!(
                    "SELECT stream_id, version, message_id, correlation_id, causation_id,
                            message_type, timestamp_us, meta, payload
                       FROM {schema}.wb_events WHERE position > $1 ORDER BY position"
                ),
                &[&position],
            )
            .await?
        {
            rows.streams.push(row.get(0));
            rows.versions.push(row.get(1));
            rows.ids.push(row.get(2));
            rows.correlations.push(row.get(3));
            rows.causations.push(row.get(4));
            rows.types.push(row.get(5));
            rows.timestamps.push(row.get(6));
            rows.metas.push(row.get(7));
            rows.payloads.push(row.get(8));
        }
        Ok(rows)
    }

    /// All of them through `insert` (`INSERT … SELECT unnest(…)`), `batch` per statement, at
    /// positions from `first_position`.
    async fn insert(
        &self,
        client: &tokio_postgres::Client,
        insert: &tokio_postgres::Statement,
        batch: usize,
        first_position: i64,
    ) -> BenchResult<()> {
        let total = self.ids.len();
        let mut done = 0usize;
        while done < total {
            let r = done..(done + batch).min(total);
            let positions: Vec<i64> = r.clone().map(|i| first_position + i as i64).collect();
            let parts: Vec<i32> = self.streams[r.clone()]
                .iter()
                .map(|s| whizbang::routing::partition_of(s, 10_000) as i32)
                .collect();
            client
                .execute(
                    insert,
                    &[
                        &positions,
                        &&self.streams[r.clone()],
                        &&self.versions[r.clone()],
                        &&self.ids[r.clone()],
                        &&self.correlations[r.clone()],
                        &&self.causations[r.clone()],
                        &&self.types[r.clone()],
                        &&self.timestamps[r.clone()],
                        &&self.metas[r.clone()],
                        &&self.payloads[r.clone()],
                        &parts,
                    ],
                )
                .await?;
            done = r.end;
        }
        Ok(())
    }
}

/// Rows of the raw baselines: an event and its outbox row, straight into the tables.
struct RawRows<'a> {
    meta: &'a [u8],
    payload: &'a [u8],
}

impl RawRows<'_> {
    /// `total` rows with the smallest meta, no causation id and a stream each, through
    /// `insert` (`INSERT … SELECT unnest(…)`), `batch` per statement; rows per second, the
    /// making of the rows included (as it was when this was the only baseline).
    async fn batched(
        &self,
        client: &tokio_postgres::Client,
        insert: &tokio_postgres::Statement,
        batch: usize,
        total: usize,
        first_position: i64,
    ) -> BenchResult<f64> {
        let t = Instant::now();
        self.minimal(total, first_position)
            .insert(client, insert, batch, first_position)
            .await?;
        Ok(total as f64 / t.elapsed().as_secs_f64())
    }

    /// `total` events on streams of their own (`raw-{first_position}-{n}`, version 1), each its
    /// own correlation, with this meta and payload.
    fn minimal(&self, total: usize, first_position: i64) -> EventRows {
        let ids: Vec<Uuid> = (0..total).map(|_| Uuid::now_v7()).collect();
        EventRows {
            streams: (0..total)
                .map(|i| format!("raw-{first_position}-{i}"))
                .collect(),
            versions: vec![1; total],
            correlations: ids.clone(),
            ids,
            causations: vec![None; total],
            types: vec![Recorded::TYPE_NAME.to_string(); total],
            timestamps: vec![whizbang::envelope::now_us(); total],
            metas: vec![self.meta.to_vec(); total],
            payloads: vec![self.payload.to_vec(); total],
        }
    }

    /// One event and its outbox row, at `position` on a stream of their own, through a
    /// statement prepared from [`single_row_sql`]: one transaction.
    async fn insert_one(
        &self,
        client: &tokio_postgres::Client,
        statement: &tokio_postgres::Statement,
        position: i64,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                statement,
                &[
                    &position,
                    &format!("rawrow-{position}"),
                    &Uuid::now_v7(),
                    &Recorded::TYPE_NAME,
                    &whizbang::envelope::now_us(),
                    &self.meta,
                    &self.payload,
                ],
            )
            .await?;
        Ok(())
    }

    /// `total` single-row transactions (one event and its outbox row in one statement) from
    /// `clients` connections at once; rows per second.
    async fn single_rows(
        &self,
        config: &Config,
        clients: usize,
        total: usize,
        first_position: i64,
    ) -> BenchResult<f64> {
        let schema = &config.store.schema;
        let sql = single_row_sql(schema);
        let per_client = total.div_ceil(clients);
        let mut connections = Vec::with_capacity(clients);
        for _ in 0..clients {
            let client = crate::raw_client(config.store.database_url.expose_secret()).await?;
            let statement = client.prepare(&sql).await?;
            connections.push((client, statement));
        }
        let t = Instant::now();
        let runs = connections
            .into_iter()
            .enumerate()
            .map(|(c, (client, statement))| async move {
                for i in 0..per_client {
                    self.insert_one(
                        &client,
                        &statement,
                        first_position + (c * per_client + i) as i64,
                    )
                    .await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            });
        for r in futures::future::join_all(runs).await {
            r?;
        }
        Ok((per_client * clients) as f64 / t.elapsed().as_secs_f64())
    }
}

/// Commands each producing one event (published on), `per_stream` one after another on each
/// of `streams` streams at once, with `strategy`; commits per second. Waits for the outbox to
/// drain before it returns, so the next phase starts on empty queues.
async fn throughput(
    pg: &Arc<dyn Store>,
    base: &Config,
    strategy: FlushStrategy,
    streams: usize,
    per_stream: usize,
    client: &tokio_postgres::Client,
) -> BenchResult<f64> {
    let mut c = base.clone();
    c.coordinator.flush_strategy = strategy;
    let rt = Arc::new(
        Runtime::builder(c)
            .store(pg.clone())
            .receptor::<Record, _>(RecordReceptor)
            .start()
            .await?,
    );
    let t = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            let rt = rt.clone();
            actix_rt::spawn(async move {
                for n in 0..per_stream {
                    rt.send(Record {
                        stream: format!("tp-{s}"),
                        n: n as u64,
                    })
                    .await?;
                }
                Ok::<_, whizbang::DispatchError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let rate = (streams * per_stream) as f64 / t.elapsed().as_secs_f64();
    let drain = Instant::now();
    loop {
        let left: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {}.wb_outbox", base.store.schema),
                &[],
            )
            .await?
            .get(0);
        if left == 0 {
            break;
        }
        if drain.elapsed() > Duration::from_secs(120) {
            return Err(format!("{left} outbox rows still queued after 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rt = Arc::try_unwrap(rt).map_err(|_| "runtime still shared")?;
    rt.shutdown().await?;
    Ok(rate)
}

/// Queues `rows` unclaimed outbox rows (10 per stream, 100 partitions) in `schema`, in one
/// statement.
async fn queue_backlog(
    client: &tokio_postgres::Client,
    schema: &str,
    rows: usize,
) -> BenchResult<()> {
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                        correlation_id, message_type, timestamp_us, meta, payload)
                 SELECT gen_random_uuid(), 'event', 'backlog-' || (i % $2::bigint), ((i % $2::bigint) % 100)::int, 'bench',
                        gen_random_uuid(), 'BenchRecorded', 0, '\\x929080', '\\x90'
                   FROM generate_series(0::bigint, $1::bigint - 1) AS i"
            ),
            &[&(rows as i64), &((rows / 10).max(1) as i64)],
        )
        .await?;
    Ok(())
}

/// A figure in milliseconds: `samples`' percentile `p`.
fn ms_figure(name: &str, samples: &Samples, p: f64) {
    figure(name, format!("{:.3}", samples.percentile(p) / 1000.0));
}

/// Claims of the backlog figure, its unmeasured warm-up included; the backlog must hold a full
/// claim for each.
const BACKLOG_CLAIMS: usize = 33;
const BACKLOG_WARMUP: usize = 3;

/// `backlog_claim_ms_p50` and its raw baseline: claims of `claim_batch_size` outbox rows, each
/// completed before the next, with `rows` queued; the raw one claims the same number from the
/// same backlog in the raw copy with a bare `FOR UPDATE SKIP LOCKED` (no stream order).
async fn backlog_claims(
    pg: &Arc<dyn Store>,
    base: &Config,
    client: &tokio_postgres::Client,
    raw_schema: &str,
    rows: usize,
) -> BenchResult<()> {
    let schema = &base.store.schema;
    // The runtimes before drained their rows; the raw copy's earlier rows are cleared.
    client
        .batch_execute(&format!("TRUNCATE {raw_schema}.wb_outbox"))
        .await?;
    queue_backlog(client, schema, rows).await?;
    queue_backlog(client, raw_schema, rows).await?;
    client
        .batch_execute(&format!(
            "ANALYZE {schema}.wb_outbox; ANALYZE {raw_schema}.wb_outbox"
        ))
        .await?;
    let budget = base.coordinator.claim_batch_size;
    let instance = Uuid::now_v7();
    pg.register_instance(instance, "bench", "bench").await?;
    let claim = WorkBatch {
        claim: Some(ClaimBudget {
            outbox: budget,
            inbox: 0,
        }),
        ..WorkBatch::default()
    };
    // Claims measured, after a few unmeasured ones (each side plans its statements first).
    let (rounds, warmup) = (BACKLOG_CLAIMS - BACKLOG_WARMUP, BACKLOG_WARMUP);
    let mut samples = Vec::with_capacity(rounds);
    let mut claimed = 0usize;
    for round in 0..rounds + warmup {
        let t = Instant::now();
        let result = pg.process_work_batch(instance, claim.clone()).await?;
        if round >= warmup {
            samples.push(t.elapsed());
        }
        claimed += result.claimed_outbox.len();
        let done = WorkBatch {
            outbox_completions: result.claimed_outbox.iter().map(|o| o.work).collect(),
            ..WorkBatch::default()
        };
        pg.process_work_batch(instance, done).await?;
    }
    pg.release_partitions(instance, None).await?;
    if claimed < (rounds + warmup) * budget as usize / 2 {
        return Err(format!("the backlog claims handed out only {claimed} rows").into());
    }
    let raw_claim = client
        .prepare(&format!(
            "WITH c AS (SELECT seq FROM {raw_schema}.wb_outbox WHERE claimed_by IS NULL
                         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)
             UPDATE {raw_schema}.wb_outbox o SET claimed_by = $2, claimed_generation = 1
               FROM c WHERE o.seq = c.seq RETURNING o.message_id"
        ))
        .await?;
    let raw_done = client
        .prepare(&format!(
            "DELETE FROM {raw_schema}.wb_outbox WHERE message_id = ANY($1)"
        ))
        .await?;
    let mut raw = Vec::with_capacity(rounds);
    for round in 0..rounds + warmup {
        let t = Instant::now();
        let ids: Vec<Uuid> = client
            .query(&raw_claim, &[&(budget as i64), &instance])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if round >= warmup {
            raw.push(t.elapsed());
        }
        client.execute(&raw_done, &[&ids]).await?;
    }
    let store = Samples::new(samples).percentile(50.0) / 1000.0;
    let raw = Samples::new(raw).percentile(50.0) / 1000.0;
    figure("backlog_rows", rows);
    figure("backlog_claim_ms_p50", format!("{store:.3}"));
    figure("raw_backlog_claim_ms_p50", format!("{raw:.3}"));
    figure("backlog_claim_ratio_vs_raw", format!("{:.2}", store / raw));
    // Leave the queues empty for the phases after.
    client
        .batch_execute(&format!(
            "TRUNCATE {schema}.wb_outbox; TRUNCATE {raw_schema}.wb_outbox"
        ))
        .await?;
    Ok(())
}
