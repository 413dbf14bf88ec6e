//! The two kinds of process a chaos run starts: writer instances of service `chaos-writer`
//! (several share one schema and lease its partitions among themselves) and consumer instances
//! of service `chaos-consumer` (their own schema, one sharded subscription on the writers'
//! topic, competing for its shards and partitions).
//!
//! Each node talks to the orchestrator through its standard streams only: it prints
//! `instance <uuid>` once started, a writer prints `done <retries>` when every one of its
//! streams holds all its events; the end of standard input is the order to shut down
//! gracefully (so a node never outlives its orchestrator). Any node may be killed at any
//! moment; a new one with the same index resumes: a writer its streams from the event store, a
//! consumer whatever its subscription and inbox hold. The consumers' read model is a Postgres
//! table (`chaos_applied` in the run's read schema) with one row per application, written by an
//! exactly-once read model (in the runtime's own transaction), so the verdict counts duplicates
//! and order from the data itself. The nodes decide nothing about the run's verdict.

use crate::{Append, Appended, ChaosResult};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use whizbang::config::SubscriptionConfig;
use whizbang::dispatcher::{Dispatcher, LocalInvoke};
use whizbang::store::Store;
use whizbang::{
    Config, Consistency, Decision, DispatchError, EventMeta, ExpectedVersion, Message,
    PerspectiveError, ReadModel, ReadModelTx, Receptor, ReceptorContext, ReceptorError, Runtime,
};

/// The writers' service name (all writer processes are instances of it).
pub const WRITER_SERVICE: &str = "chaos-writer";
/// The consumer's service name.
pub const CONSUMER_SERVICE: &str = "chaos-consumer";
/// The consumer's subscription on the writers' topic.
pub const SUBSCRIPTION: &str = "consumer";

/// The stream id of stream number `n`.
pub fn stream_name(n: usize) -> String {
    format!("chaos-{n:04}")
}

/// What every node is told: the configuration file, its schema, the run's topic, and a lease
/// that replaces the file's (the long-lease writer of a run).
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub schema: String,
    #[arg(long)]
    pub topic: String,
    /// `partitions.lease_seconds` for this node instead of the file's.
    #[arg(long)]
    pub lease_seconds: Option<u64>,
    /// `coordinator.flush_strategy` for this node instead of the file's.
    #[arg(long)]
    pub flush_strategy: Option<String>,
}

impl NodeArgs {
    /// The configuration file as service `service` in this node's schema, routing cleared.
    fn load(&self, service: &str) -> ChaosResult<Config> {
        let mut config = Config::load(&self.config)?;
        config.service.name = service.into();
        config.store.schema = self.schema.clone();
        config.routing.topics.clear();
        config.routing.subscriptions.clear();
        if let Some(lease) = self.lease_seconds {
            config.partitions.lease_seconds = lease;
        }
        if let Some(strategy) = &self.flush_strategy {
            config.coordinator.flush_strategy =
                serde_json::from_value(serde_json::Value::String(strategy.clone()))
                    .map_err(|e| format!("--flush-strategy {strategy}: {e}"))?;
        }
        Ok(config)
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--config".into(),
            self.config.to_string_lossy().into_owned(),
            "--schema".into(),
            self.schema.clone(),
            "--topic".into(),
            self.topic.clone(),
        ];
        if let Some(lease) = self.lease_seconds {
            args.extend(["--lease-seconds".into(), lease.to_string()]);
        }
        if let Some(strategy) = &self.flush_strategy {
            args.extend(["--flush-strategy".into(), strategy.clone()]);
        }
        args
    }
}

#[derive(Args, Debug, Clone)]
pub struct WriterArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// This writer's index; it drives streams `n` with `n % writers == index`.
    #[arg(long)]
    pub index: usize,
    #[arg(long)]
    pub writers: usize,
    #[arg(long)]
    pub streams: usize,
    /// Events per stream.
    #[arg(long)]
    pub events: u64,
    /// Commands per second this writer sends, across its streams.
    #[arg(long)]
    pub rate: f64,
}

impl WriterArgs {
    /// The command line that starts this writer (`node writer …`).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["node".into(), "writer".into()];
        args.extend(self.node.to_args());
        for (flag, value) in [
            ("--index", self.index.to_string()),
            ("--writers", self.writers.to_string()),
            ("--streams", self.streams.to_string()),
            ("--events", self.events.to_string()),
            ("--rate", self.rate.to_string()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        args
    }
}

#[derive(Args, Debug, Clone)]
pub struct ConsumerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// This process's label (`consumer-<index>.<incarnation>`), written with each application
    /// so that the verdict can tell re-applications after a kill of the applying process.
    #[arg(long)]
    pub label: String,
    /// The schema of the read model (`chaos_applied`), made by the orchestrator.
    #[arg(long)]
    pub read_schema: String,
    /// The perspective fails event `--fail-seq` of every stream whose number is a multiple of
    /// `--fail-every` (0: none) until the file `--healed` exists.
    #[arg(long, default_value_t = 0)]
    pub fail_every: usize,
    #[arg(long, default_value_t = 0)]
    pub fail_seq: u64,
    #[arg(long)]
    pub healed: PathBuf,
    /// `store.max_attempts` for this consumer (a failing event is dead-lettered after these).
    #[arg(long)]
    pub max_attempts: u32,
}

impl ConsumerArgs {
    /// The command line that starts this consumer (`node consumer …`).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["node".into(), "consumer".into()];
        args.extend(self.node.to_args());
        for (flag, value) in [
            ("--label", self.label.clone()),
            ("--read-schema", self.read_schema.clone()),
            ("--fail-every", self.fail_every.to_string()),
            ("--fail-seq", self.fail_seq.to_string()),
            ("--healed", self.healed.to_string_lossy().into_owned()),
            ("--max-attempts", self.max_attempts.to_string()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        args
    }

    /// Whether the perspective fails `stream`'s event `seq` (until healed).
    pub fn fails(&self, stream: &str, seq: u64) -> bool {
        self.fail_every > 0
            && seq == self.fail_seq
            && stream
                .strip_prefix("chaos-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n % self.fail_every == 0)
    }
}

/// The read model's table: one row per application, in the order they committed (`n`).
/// Written by an exactly-once read model: the insert runs in the transaction that records the
/// event as applied, so a consumer killed anywhere cannot leave a second row (the verdict
/// counts one after a kill apart, as `reapplied_after_consumer_kill`, bound 0).
pub fn read_model_ddl(schema: &str) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}; \
         CREATE TABLE IF NOT EXISTS {schema}.chaos_applied ( \
             n bigserial PRIMARY KEY, stream text NOT NULL, seq bigint NOT NULL, \
             message_id uuid NOT NULL, label text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
}

// ---- the writer --------------------------------------------------------------------------

/// Appends event `seq` to its stream, refusing it unless the stream is at `seq - 1`: a command
/// whose first attempt committed unseen cannot append twice.
struct AppendReceptor;

impl Receptor<Append> for AppendReceptor {
    type Result = Appended;

    async fn handle(
        &self,
        command: Append,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Appended>, ReceptorError> {
        let expected = match command.seq {
            0 => return Err(ReceptorError::Validation("seq starts at 1".into())),
            1 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(n - 1),
        };
        let event = Appended {
            stream: command.stream.clone(),
            seq: command.seq,
        };
        Ok(Decision::event(event).expect_version(command.stream, expected))
    }
}

pub async fn writer(args: WriterArgs) -> ChaosResult<()> {
    let mut config = args.node.load(WRITER_SERVICE)?;
    config.routing.topics = [(Appended::TYPE_NAME.to_string(), args.node.topic.clone())].into();
    let runtime = Runtime::builder(config)
        .receptor::<Append, _>(AppendReceptor)
        .start()
        .await?;
    println!("instance {}", runtime.instance_id());

    let streams: Vec<String> = (0..args.streams)
        .filter(|n| n % args.writers == args.index)
        .map(stream_name)
        .collect();
    let permits = Arc::new(Semaphore::new(0));
    let pacer = tokio::spawn(pace(permits.clone(), args.rate));
    let mut drivers = tokio::task::JoinSet::new();
    for stream in streams {
        drivers.spawn(drive_stream(
            runtime.dispatcher(),
            runtime.store().clone(),
            stream,
            args.events,
            permits.clone(),
        ));
    }
    let mut stdin_closed = std::pin::pin!(stdin_closed());
    let mut retries = 0u64;
    let mut failure = None;
    loop {
        tokio::select! {
            joined = drivers.join_next() => match joined {
                None => {
                    println!("done {retries}");
                    break;
                }
                Some(Ok(Ok(r))) => retries += r,
                Some(Ok(Err(e))) => {
                    failure = Some(e);
                    break;
                }
                Some(Err(e)) => {
                    failure = Some(format!("a stream driver panicked: {e}").into());
                    break;
                }
            },
            _ = &mut stdin_closed => break,
        }
    }
    pacer.abort();
    drivers.abort_all();
    if failure.is_none() {
        // Done: keep serving (publishing, taking over partitions) until told to stop.
        stdin_closed.await;
    }
    runtime.shutdown().await?;
    failure.map_or(Ok(()), Err)
}

/// Releases `rate` permits per second, in 10 ms steps, with at most 100 ms of them banked.
async fn pace(permits: Arc<Semaphore>, rate: f64) {
    let start = Instant::now();
    let mut released = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let bank = ((rate / 10.0).ceil() as usize).max(1);
    loop {
        tick.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        let new = due.saturating_sub(released);
        released = due;
        let room = bank.saturating_sub(permits.available_permits());
        permits.add_permits((new as usize).min(room));
    }
}

/// Appends events until `stream` holds `events`, one command at a time (so in order), resuming
/// from the stream's stored version. Returns how many attempts were retried.
async fn drive_stream(
    dispatcher: actix::Addr<Dispatcher>,
    store: Arc<dyn Store>,
    stream: String,
    events: u64,
    permits: Arc<Semaphore>,
) -> ChaosResult<u64> {
    let mut retries = 0;
    let mut version = stored_version(store.as_ref(), &stream, &mut retries).await;
    while version < events {
        permits.acquire().await?.forget();
        let command = Append {
            stream: stream.clone(),
            seq: version + 1,
        };
        match dispatcher
            .send(LocalInvoke::<Append, Appended>::new(command))
            .await
        {
            Ok(Ok(_)) => version += 1,
            // An earlier attempt committed after all (its answer was lost): read where we are.
            Ok(Err(e)) if e.is_conflict() => {
                version = stored_version(store.as_ref(), &stream, &mut retries).await;
            }
            Ok(Err(e)) if is_bug(&e) => {
                return Err(format!("{stream} seq {}: {e}", version + 1).into());
            }
            Ok(Err(e)) => {
                retries += 1;
                tracing::warn!(%stream, error = %e, "append failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("dispatcher gone: {e}").into()),
        }
    }
    Ok(retries)
}

/// Errors a retry cannot mend: they mean this harness or the runtime is wrong.
fn is_bug(e: &DispatchError) -> bool {
    matches!(
        e,
        DispatchError::HandlerNotFound { .. }
            | DispatchError::Rejected { .. }
            | DispatchError::Panicked { .. }
            | DispatchError::Codec(_)
            | DispatchError::InvalidMessage { .. }
            | DispatchError::ResultType { .. }
    )
}

/// The stream's current version, retried until the store answers.
async fn stored_version(store: &dyn Store, stream: &str, retries: &mut u64) -> u64 {
    loop {
        match store.read_stream(stream, 0).await {
            Ok(events) => return events.last().map_or(0, |e| e.version),
            Err(e) => {
                *retries += 1;
                tracing::warn!(%stream, error = %e, "reading the stream failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Resolves when standard input reaches its end (or fails): the orchestrator's stop order.
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

// ---- the consumer ------------------------------------------------------------------------

/// The consumers' read model: inserts one row per application into `chaos_applied`, in the
/// transaction in which the runtime records the event as applied (exactly once, whatever is
/// killed or restarted where), and fails the chosen events until the run heals it.
struct ChaosReadModel {
    insert: String,
    args: ConsumerArgs,
}

fn failed(why: impl Into<String>) -> PerspectiveError {
    PerspectiveError(why.into())
}

impl ReadModel<Appended> for ChaosReadModel {
    async fn apply(
        &self,
        event: Appended,
        meta: EventMeta,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), PerspectiveError> {
        if self.args.fails(&event.stream, event.seq) && !self.args.healed.exists() {
            return Err(failed(format!(
                "{} seq {} fails until the run heals it",
                event.stream, event.seq
            )));
        }
        let tx = tx
            .postgres()
            .ok_or_else(|| failed("the chaos read model needs the Postgres store"))?;
        tx.execute(
            &self.insert,
            &[
                &event.stream,
                &(event.seq as i64),
                &meta.message_id,
                &self.args.label,
            ],
        )
        .await
        .map_err(|e| failed(format!("read model insert failed: {e}")))?;
        Ok(())
    }
}

pub async fn consumer(args: ConsumerArgs) -> ChaosResult<()> {
    let mut config = args.node.load(CONSUMER_SERVICE)?;
    config.routing.subscriptions = vec![SubscriptionConfig {
        topic: args.node.topic.clone(),
        name: SUBSCRIPTION.into(),
    }];
    config.store.max_attempts = args.max_attempts;
    let read_model = ChaosReadModel {
        insert: format!(
            "INSERT INTO {}.chaos_applied (stream, seq, message_id, label) VALUES ($1, $2, $3, $4)",
            args.read_schema
        ),
        args,
    };
    let runtime = Runtime::builder(config)
        .read_model::<Appended, _>("chaos-read-model", read_model, Consistency::Async)
        .start()
        .await?;
    println!("instance {}", runtime.instance_id());
    stdin_closed().await;
    runtime.shutdown().await?;
    Ok(())
}
