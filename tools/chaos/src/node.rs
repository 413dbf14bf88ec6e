//! The two kinds of process a chaos run starts: writer instances of service `chaos-writer`
//! (several share one schema and lease its partitions among themselves) and one instance of
//! service `chaos-consumer` (its own schema, one subscription on the writers' topic).
//!
//! Each node talks to the orchestrator through its standard streams only: it prints
//! `instance <uuid>` once started, a writer prints `done <retries>` when every one of its
//! streams holds all its events, the consumer prints `applied <n>` as it goes; the end of
//! standard input is the order to shut down gracefully (so a node never outlives its
//! orchestrator). A writer may be killed at any moment; a new one with the same index resumes
//! its streams from the event store. The nodes decide nothing about the run's verdict.

use crate::verdict::Applied;
use crate::{Append, Appended, ChaosResult};
use clap::Args;
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use whizbang::config::SubscriptionConfig;
use whizbang::dispatcher::{Dispatcher, LocalInvoke};
use whizbang::store::Store;
use whizbang::{
    Config, Decision, DispatchError, EventMeta, ExpectedVersion, Message, Perspective,
    PerspectiveError, Receptor, ReceptorContext, ReceptorError, Runtime,
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
    /// Where the applications are written (JSON) when the consumer stops.
    #[arg(long)]
    pub out: PathBuf,
}

impl ConsumerArgs {
    /// The command line that starts this consumer (`node consumer …`).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["node".into(), "consumer".into()];
        args.extend(self.node.to_args());
        args.extend(["--out".into(), self.out.to_string_lossy().into_owned()]);
        args
    }
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

/// Every application, in order, and the distinct message ids among them.
#[derive(Default)]
struct Log {
    applied: Vec<Applied>,
    distinct: HashSet<uuid::Uuid>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Log>>);

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Perspective<Appended> for Recorder {
    async fn apply(&self, event: Appended, meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut log = self.lock();
        log.distinct.insert(meta.message_id);
        log.applied.push(Applied {
            stream: event.stream,
            seq: event.seq,
            message_id: meta.message_id,
        });
        Ok(())
    }
}

#[derive(Serialize)]
struct ConsumerReport<'a> {
    instance: String,
    applied: &'a [Applied],
}

pub async fn consumer(args: ConsumerArgs) -> ChaosResult<()> {
    let mut config = args.node.load(CONSUMER_SERVICE)?;
    config.routing.subscriptions = vec![SubscriptionConfig {
        topic: args.node.topic.clone(),
        name: SUBSCRIPTION.into(),
    }];
    let recorder = Recorder::default();
    let runtime = Runtime::builder(config)
        .perspective::<Appended, _>("chaos-recorder", recorder.clone())
        .start()
        .await?;
    let instance = runtime.instance_id().to_string();
    println!("instance {instance}");

    let mut stdin_closed = std::pin::pin!(stdin_closed());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut reported = usize::MAX;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = recorder.lock().distinct.len();
                if n != reported {
                    println!("applied {n}");
                    reported = n;
                }
            }
            _ = &mut stdin_closed => break,
        }
    }
    runtime.shutdown().await?;
    let log = recorder.lock();
    let report = ConsumerReport {
        instance,
        applied: &log.applied,
    };
    std::fs::write(&args.out, serde_json::to_vec(&report)?)
        .map_err(|e| format!("cannot write {}: {e}", args.out.display()))?;
    println!("stopped {}", log.applied.len());
    Ok(())
}
