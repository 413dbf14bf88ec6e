//! Failures of user code: a receptor's typed refusal or panic leaves nothing behind and the
//! runtime keeps serving (contracts 1 and 8); a failing perspective is retried with backoff
//! while its stream waits behind it, then dead-lettered after `store.max_attempts`, and an
//! operator can requeue or skip it (contracts 4 and 6).

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use whizbang::store::{Queue, Store, StoreError, WorkBatch, WorkBatchResult};
use whizbang::transport::memory::MemoryBus;
use whizbang::{
    Command, Config, Decision, DispatchError, DispatchOptions, Event, EventMeta, Message,
    Perspective, PerspectiveError, Receptor, ReceptorContext, ReceptorError, Runtime, SendCommand,
};

// ---- Messages and handlers ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
enum Mode {
    Ok,
    Validation,
    Conflict,
    NotFound,
    Internal,
    Panic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Try {
    stream: String,
    seq: u32,
    mode: Mode,
    /// How many times the flaky perspective fails on the resulting event.
    fail_times: u32,
    /// Whether the flaky perspective fails by panicking rather than by returning an error.
    panic: bool,
    /// Further events (seq+1, seq+2, ..) on the same stream in the same decision, which never
    /// fail.
    #[serde(default)]
    more: u32,
}

impl Try {
    fn new(stream: &str, seq: u32, mode: Mode) -> Try {
        Try {
            stream: stream.into(),
            seq,
            mode,
            fail_times: 0,
            panic: false,
            more: 0,
        }
    }

    fn failing(mut self, times: u32, panic: bool) -> Try {
        self.fail_times = times;
        self.panic = panic;
        self
    }
}

impl Message for Try {
    const TYPE_NAME: &'static str = "failures.Try";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Try {}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Tried {
    stream: String,
    seq: u32,
    fail_times: u32,
    panic: bool,
}

impl Message for Tried {
    const TYPE_NAME: &'static str = "failures.Tried";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Event for Tried {}
impl Seq for Tried {
    fn seq(&self) -> u32 {
        self.seq
    }
}

struct TryReceptor;

impl Receptor<Try> for TryReceptor {
    type Result = Tried;

    async fn handle(
        &self,
        cmd: Try,
        _ctx: ReceptorContext,
    ) -> Result<Decision<Tried>, ReceptorError> {
        let what = format!("{} #{}", cmd.stream, cmd.seq);
        match cmd.mode {
            Mode::Ok => {
                let mut d = Decision::event(Tried {
                    stream: cmd.stream.clone(),
                    seq: cmd.seq,
                    fail_times: cmd.fail_times,
                    panic: cmd.panic,
                });
                for i in 1..=cmd.more {
                    d = d.emit(&Tried {
                        stream: cmd.stream.clone(),
                        seq: cmd.seq + i,
                        fail_times: 0,
                        panic: false,
                    });
                }
                Ok(d)
            }
            Mode::Validation => Err(ReceptorError::Validation(format!("{what} is malformed"))),
            Mode::Conflict => Err(ReceptorError::Conflict(format!("{what} breaks a rule"))),
            Mode::NotFound => Err(ReceptorError::NotFound(format!("{what} refers to nothing"))),
            Mode::Internal => Err(ReceptorError::Internal(format!(
                "{what} broke the receptor"
            ))),
            Mode::Panic => panic!("receptor exploded on {what}"),
        }
    }
}

/// A perspective that fails (or panics) on an event the first `fail_times` times it sees it,
/// unless healed; records what it applied, in order, and how often it was called per event.
#[derive(Clone, Default)]
struct Flaky {
    applied: Recorder,
    calls: Arc<Mutex<HashMap<Uuid, u32>>>,
    healed: Arc<AtomicBool>,
}

impl Flaky {
    fn calls(&self, id: Uuid) -> u32 {
        self.calls.lock().unwrap().get(&id).copied().unwrap_or(0)
    }
}

impl Perspective<Tried> for Flaky {
    async fn apply(&self, event: Tried, meta: EventMeta) -> Result<(), PerspectiveError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(meta.message_id).or_default();
            *n += 1;
            *n
        };
        if call <= event.fail_times && !self.healed.load(Ordering::SeqCst) {
            if event.panic {
                panic!("flaky perspective panicked on call {call}");
            }
            return Err(PerspectiveError(format!(
                "flaky perspective failed on call {call}"
            )));
        }
        self.applied.apply(event, meta).await
    }
}

struct Service {
    rt: Runtime,
    /// Always succeeds.
    steady: Recorder,
    flaky: Flaky,
}

async fn service(config: Config, bus: &Arc<MemoryBus>) -> anyhow::Result<Service> {
    let steady = Recorder::new();
    let flaky = Flaky::default();
    let rt = on_bus(config, bus)
        .receptor::<Try, _>(TryReceptor)
        .perspective::<Tried, _>("steady", steady.clone())
        .perspective::<Tried, _>("flaky", flaky.clone())
        .start()
        .await?;
    Ok(Service { rt, steady, flaky })
}

/// Fast retries, so the backoff tests run in milliseconds.
fn quick_retries(service: &str, max_attempts: u32) -> Config {
    let mut c = config(service);
    c.store.backoff_base_ms = 10;
    c.store.backoff_max_ms = 40;
    c.store.max_attempts = max_attempts;
    c.coordinator.poll_interval_ms = 20;
    c
}

fn with_correlation(correlation: Uuid) -> DispatchOptions {
    DispatchOptions {
        correlation_id: Some(correlation),
        ..DispatchOptions::default()
    }
}

// ---- Receptor failures ---------------------------------------------------------------------

#[actix::test]
async fn rejected_commands_return_typed_errors_and_leave_nothing_behind() -> anyhow::Result<()> {
    const TOPIC: &str = "tries";
    let bus = MemoryBus::new();
    let remote = Recorder::new();
    let receiver = on_bus(subscribed(config("remote"), TOPIC, "remote"), &bus)
        .perspective::<Tried, _>("remote", remote.clone())
        .start()
        .await?;
    let s = service(publishing(config("tries"), Tried::TYPE_NAME, TOPIC), &bus).await?;

    let cases = [
        (Mode::Validation, 400, "malformed"),
        (Mode::Conflict, 409, "breaks a rule"),
        (Mode::NotFound, 404, "refers to nothing"),
        (Mode::Internal, 500, "broke the receptor"),
    ];
    let mut rejected_streams = Vec::new();
    for (mode, http, text) in cases {
        let stream = unique(&format!("{mode:?}"));
        rejected_streams.push(stream.clone());
        let check = |e: DispatchError, via: &str| -> anyhow::Result<()> {
            anyhow::ensure!(
                e.http_status() == http,
                "{mode:?} via {via}: http {} for {e}",
                e.http_status()
            );
            anyhow::ensure!(
                e.is_conflict() == (mode == Mode::Conflict),
                "{mode:?}: is_conflict of {e}"
            );
            anyhow::ensure!(
                !e.is_retryable(),
                "{mode:?}: a refusal is not retryable: {e}"
            );
            anyhow::ensure!(e.to_string().contains(text), "{e}");
            match e {
                DispatchError::Rejected {
                    message_type,
                    error,
                } => {
                    anyhow::ensure!(message_type == Try::TYPE_NAME, "{message_type}");
                    let variant_ok = matches!(
                        (mode, &error),
                        (Mode::Validation, ReceptorError::Validation(_))
                            | (Mode::Conflict, ReceptorError::Conflict(_))
                            | (Mode::NotFound, ReceptorError::NotFound(_))
                            | (Mode::Internal, ReceptorError::Internal(_))
                    );
                    anyhow::ensure!(variant_ok, "{mode:?} via {via}: got {error:?}");
                    Ok(())
                }
                other => anyhow::bail!("{mode:?} via {via}: expected Rejected, got {other:?}"),
            }
        };

        let corr_invoke = Uuid::now_v7();
        let r =
            s.rt.local_invoke_with::<Try, Tried>(
                Try::new(&stream, 1, mode),
                with_correlation(corr_invoke),
            )
            .await;
        check(
            r.err()
                .ok_or_else(|| anyhow::anyhow!("{mode:?} local_invoke succeeded"))?,
            "local_invoke",
        )?;

        let corr_send = Uuid::now_v7();
        let r =
            s.rt.dispatcher()
                .send(
                    SendCommand::new(Try::new(&stream, 2, mode))
                        .with_options(with_correlation(corr_send)),
                )
                .await?;
        check(
            r.err()
                .ok_or_else(|| anyhow::anyhow!("{mode:?} send succeeded"))?,
            "send",
        )?;

        let stored = s.rt.store().read_stream(&stream, 1).await?;
        anyhow::ensure!(
            stored.is_empty(),
            "{mode:?}: {} events stored",
            stored.len()
        );
        for corr in [corr_invoke, corr_send] {
            let status = s.rt.status(corr).await?;
            anyhow::ensure!(
                status == whizbang::store::CorrelationStatus::default(),
                "{mode:?}: {status:?}"
            );
        }
    }

    // A good command afterwards goes all the way; once the other service has it, anything the
    // rejected ones had published would have arrived before it.
    let good = unique("good");
    let r: Tried = s.rt.local_invoke(Try::new(&good, 1, Mode::Ok)).await?;
    anyhow::ensure!(r.seq == 1);
    wait_until("the good event at the other service", || {
        remote.total() >= 1
    })
    .await?;
    wait_until("the subscription to drain", || {
        bus.depth(TOPIC, "remote") == 0
    })
    .await?;
    for (name, rec) in [
        ("steady", &s.steady),
        ("flaky", &s.flaky.applied),
        ("remote", &remote),
    ] {
        anyhow::ensure!(
            rec.streams() == vec![good.clone()] && rec.total() == 1,
            "perspective {name} saw streams {:?} ({} events)",
            rec.streams(),
            rec.total()
        );
    }
    let all = s.rt.store().read_all(0, 1000).await?;
    anyhow::ensure!(
        all.len() == 1 && all[0].envelope.stream_id == good,
        "store holds {:?}",
        all.iter()
            .map(|e| &e.envelope.stream_id)
            .collect::<Vec<_>>()
    );
    s.rt.shutdown().await?;
    receiver.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_panicking_receptor_fails_that_command_only() -> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let s = service(config("panics"), &bus).await?;
    let stream = unique("panic");
    let other = unique("other");

    let e =
        s.rt.local_invoke::<Try, Tried>(Try::new(&stream, 1, Mode::Panic))
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("a panicking receptor succeeded"))?;
    match &e {
        DispatchError::Panicked {
            message_type,
            message,
        } => {
            anyhow::ensure!(message_type == Try::TYPE_NAME, "{message_type}");
            anyhow::ensure!(message.contains("receptor exploded"), "{message}");
        }
        other => anyhow::bail!("expected Panicked, got {other:?}"),
    }
    anyhow::ensure!(e.http_status() == 500, "{}", e.http_status());

    // The very next commands, on the same stream and on another, succeed.
    let r: Tried = s.rt.local_invoke(Try::new(&stream, 2, Mode::Ok)).await?;
    anyhow::ensure!(r.seq == 2);
    let r: Tried = s.rt.local_invoke(Try::new(&other, 1, Mode::Ok)).await?;
    anyhow::ensure!(r.seq == 1);

    // send: the same, and the receptor actor survives repeated panics.
    for seq in 3..6 {
        let e = s.rt.send(Try::new(&stream, seq, Mode::Panic)).await.err();
        anyhow::ensure!(
            matches!(e, Some(DispatchError::Panicked { .. })),
            "send of a panicking command: {e:?}"
        );
    }
    let receipt = s.rt.send(Try::new(&stream, 6, Mode::Ok)).await?;
    anyhow::ensure!(
        receipt.events.len() == 1 && receipt.events[0].version == 2,
        "the panicked commands wrote something: {receipt:?}"
    );
    let stored = s.rt.store().read_stream(&stream, 1).await?;
    let seqs: Vec<u32> = stored
        .iter()
        .map(|e| whizbang::message::decode::<Tried>(&e.envelope.payload).map(|t| t.seq))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(seqs == vec![2, 6], "stored {seqs:?}");
    wait_until("the perspectives", || s.steady.seqs(&stream) == vec![2, 6]).await?;
    s.rt.shutdown().await?;
    Ok(())
}

// ---- Perspective failures -----------------------------------------------------------------

#[actix::test]
async fn a_failing_perspective_is_retried_and_its_stream_waits() -> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let s = service(quick_retries("retries", 10), &bus).await?;

    for panic in [false, true] {
        let stream = unique(if panic { "panicky" } else { "failing" });
        // The event is committed, but its first perspective run fails: local_invoke says so.
        let e =
            s.rt.local_invoke::<Try, Tried>(Try::new(&stream, 1, Mode::Ok).failing(3, panic))
                .await
                .err()
                .ok_or_else(|| {
                    anyhow::anyhow!("local_invoke succeeded though the perspective failed")
                })?;
        let first = match &e {
            DispatchError::PerspectiveFailed { message_id, error } => {
                anyhow::ensure!(error.contains("flaky"), "{error}");
                if panic {
                    anyhow::ensure!(error.contains("panicked"), "{error}");
                }
                *message_id
            }
            other => anyhow::bail!("expected PerspectiveFailed, got {other:?}"),
        };
        let stored = s.rt.store().read_stream(&stream, 1).await?;
        anyhow::ensure!(
            stored.len() == 1 && stored[0].envelope.message_id == first,
            "the event must be committed"
        );

        // A later event of the same stream is committed, but must wait for the first.
        let receipt = s.rt.send(Try::new(&stream, 2, Mode::Ok)).await?;
        anyhow::ensure!(receipt.events[0].version == 2);
        // Meanwhile the runtime serves other streams.
        let other = unique("other");
        let r: Tried = s.rt.local_invoke(Try::new(&other, 1, Mode::Ok)).await?;
        anyhow::ensure!(r.seq == 1 && s.flaky.applied.seqs(&other) == vec![1]);
        let seen = s.flaky.applied.seqs(&stream);
        anyhow::ensure!(
            seen.is_empty() || seen == vec![1] || seen == vec![1, 2],
            "{seen:?}"
        );

        // A third by local_invoke returns once everything before it, retries included, ran.
        let r: Tried = s.rt.local_invoke(Try::new(&stream, 3, Mode::Ok)).await?;
        anyhow::ensure!(r.seq == 3);
        for (name, rec) in [("steady", &s.steady), ("flaky", &s.flaky.applied)] {
            let seen = rec.seqs(&stream);
            anyhow::ensure!(seen == vec![1, 2, 3], "{name} applied {seen:?}");
        }
        anyhow::ensure!(
            s.flaky.calls(first) == 4,
            "flaky called {} times",
            s.flaky.calls(first)
        );
        // The steady perspective applied the event once, not once per retry.
        anyhow::ensure!(
            s.steady.count_of(first) == 1,
            "{}",
            s.steady.count_of(first)
        );
    }
    anyhow::ensure!(s.rt.store().dead_letters().await?.is_empty());
    s.rt.shutdown().await?;
    Ok(())
}

/// The events after a failing one were already handed to the partition actor (one decision,
/// one stream): they are handed back and wait for the retry, never overtaking it.
#[actix::test]
async fn events_queued_behind_a_failure_wait_for_its_retry() -> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let s = service(quick_retries("queued", 10), &bus).await?;
    for panic in [false, true] {
        let stream = unique("queued");
        let mut cmd = Try::new(&stream, 1, Mode::Ok).failing(2, panic);
        cmd.more = 4;
        let e = s.rt.local_invoke::<Try, Tried>(cmd).await.err();
        anyhow::ensure!(
            matches!(e, Some(DispatchError::PerspectiveFailed { .. })),
            "{e:?}"
        );
        wait_until("all five events", || {
            s.flaky.applied.seqs(&stream).len() >= 5
        })
        .await?;
        anyhow::ensure!(
            s.flaky.applied.seqs(&stream) == vec![1, 2, 3, 4, 5],
            "flaky applied {:?}",
            s.flaky.applied.seqs(&stream)
        );
        wait_until("the steady perspective", || {
            s.steady.seqs(&stream).len() >= 5
        })
        .await?;
        anyhow::ensure!(
            s.steady.seqs(&stream) == vec![1, 2, 3, 4, 5],
            "steady applied {:?}",
            s.steady.seqs(&stream)
        );
    }
    s.rt.shutdown().await?;
    Ok(())
}

/// The same on the receiving side of the bus: a perspective of the other service fails on an
/// event; the later events of its stream, delivered meanwhile, wait for it.
#[actix::test]
async fn a_failing_remote_perspective_keeps_its_stream_in_order() -> anyhow::Result<()> {
    const TOPIC: &str = "remote-tries";
    let bus = MemoryBus::new();
    let flaky = Flaky::default();
    let mut remote_config = subscribed(quick_retries("remote", 10), TOPIC, "remote");
    remote_config.transport.prefetch = 3;
    let remote = on_bus(remote_config, &bus)
        .perspective::<Tried, _>("flaky", flaky.clone())
        .start()
        .await?;
    let s = service(
        publishing(quick_retries("source", 10), Tried::TYPE_NAME, TOPIC),
        &bus,
    )
    .await?;
    let streams: Vec<String> = (0..5).map(|i| unique(&format!("remote-{i}"))).collect();
    for seq in 1..=10u32 {
        for (i, stream) in streams.iter().enumerate() {
            // Stream i fails its event number i+1 a few times (panicking on odd streams).
            let fail = if seq == i as u32 + 1 { 3 } else { 0 };
            let cmd = Try::new(stream, seq, Mode::Ok).failing(fail, i % 2 == 1);
            s.rt.send(cmd).await?;
        }
    }
    wait_until("every event at the other service", || {
        streams.iter().all(|st| flaky.applied.seqs(st).len() >= 10)
    })
    .await?;
    for stream in &streams {
        anyhow::ensure!(
            flaky.applied.seqs(stream) == (1..=10).collect::<Vec<_>>(),
            "{stream}: {:?}",
            flaky.applied.seqs(stream)
        );
    }
    anyhow::ensure!(remote.store().dead_letters().await?.is_empty());
    s.rt.shutdown().await?;
    remote.shutdown().await?;
    Ok(())
}

/// Points of the race below, signalled between the store and the perspective.
#[derive(Default)]
struct Gate {
    /// The batch holding the later event's inbox row is applied (its answer not yet back).
    later_committed: tokio::sync::Notify,
    /// The perspective is failing the earlier event.
    earlier_failing: tokio::sync::Notify,
}

/// Waits for `notify` at most a few seconds (so that a scenario that cannot happen fails the
/// test instead of hanging it).
async fn wait_gate(notify: &tokio::sync::Notify, what: &str) -> Result<(), String> {
    tokio::time::timeout(std::time::Duration::from_secs(5), notify.notified())
        .await
        .map_err(|_| format!("timed out waiting for {what}"))
}

/// Answers the batch committing the later event (`seq` 2) only after the perspective has
/// failed the earlier one: like a database whose reply is still on the wire after COMMIT.
struct SlowReplies {
    gate: Arc<Gate>,
}

#[async_trait::async_trait]
impl BatchHook for SlowReplies {
    async fn process(
        &self,
        inner: &whizbang::store::memory::MemoryStore,
        instance: Uuid,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let seq2 = |e: &whizbang::Envelope| {
            whizbang::message::decode::<Tried>(&e.payload).is_ok_and(|t| t.seq == 2)
        };
        let later = batch.units.iter().any(|u| {
            u.inbox.iter().any(|row| seq2(&row.envelope))
                || u.outbox.iter().any(|row| seq2(&row.envelope))
        });
        let result = inner.process_work_batch(instance, batch).await;
        if later {
            self.gate.later_committed.notify_one();
            wait_gate(&self.gate.earlier_failing, "the earlier event to fail")
                .await
                .map_err(StoreError::unavailable)?;
            // Let the partition actor take in the failure before the answer arrives.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        result
    }
}

/// Fails the first call on an event with `fail_times > 0`, once the later event is committed.
#[derive(Clone, Default)]
struct FailsLate(Recorder, Arc<Mutex<HashMap<Uuid, u32>>>, Arc<Gate>);

impl Perspective<Tried> for FailsLate {
    async fn apply(&self, event: Tried, meta: EventMeta) -> Result<(), PerspectiveError> {
        let call = {
            let mut calls = self.1.lock().unwrap();
            let n = calls.entry(meta.message_id).or_default();
            *n += 1;
            *n
        };
        if call <= event.fail_times {
            wait_gate(&self.2.later_committed, "the later event's commit")
                .await
                .map_err(PerspectiveError)?;
            self.2.earlier_failing.notify_one();
            return Err(PerspectiveError(format!("late failure on call {call}")));
        }
        self.0.apply(event, meta).await
    }
}

/// The consumer commits a later event of a stream while an earlier one is being applied; the
/// earlier one fails before the store's answer for the later one is back (the later row was
/// leased to this instance straight away, since everything before it was in flight). The later
/// one must still wait for the earlier one's retry.
#[actix::test]
async fn a_failure_while_a_later_row_is_being_committed_does_not_let_it_overtake()
-> anyhow::Result<()> {
    const TOPIC: &str = "slow-replies";
    let bus = MemoryBus::new();
    let mut remote_config = subscribed(quick_retries("slow-remote", 10), TOPIC, "remote");
    // One delivery per receive: each event is its own inbox commit.
    remote_config.transport.prefetch = 1;
    let gate = Arc::new(Gate::default());
    let store = HookedStore::new(&remote_config, SlowReplies { gate: gate.clone() });
    let perspective = FailsLate(Recorder::new(), Default::default(), gate);
    let remote = on_bus(remote_config, &bus)
        .store(Arc::new(store))
        .perspective::<Tried, _>("slow-to-fail", perspective.clone())
        .start()
        .await?;
    let s = service(
        publishing(quick_retries("slow-source", 10), Tried::TYPE_NAME, TOPIC),
        &bus,
    )
    .await?;
    let stream = unique("overtake");
    s.rt.send(Try::new(&stream, 1, Mode::Ok).failing(1, false))
        .await?;
    s.rt.send(Try::new(&stream, 2, Mode::Ok)).await?;
    wait_until("both events at the other service", || {
        perspective.0.seqs(&stream).len() >= 2
    })
    .await?;
    anyhow::ensure!(
        perspective.0.seqs(&stream) == vec![1, 2],
        "applied in the order {:?}",
        perspective.0.seqs(&stream)
    );
    s.rt.shutdown().await?;
    remote.shutdown().await?;
    Ok(())
}

/// A memory transport on which the first publish of the earlier event (`seq` 1) fails, once
/// the later event is committed.
struct FailsFirstPublish {
    inner: whizbang::transport::memory::MemoryTransport,
    gate: Arc<Gate>,
    failed: AtomicBool,
}

#[async_trait::async_trait]
impl whizbang::transport::Transport for FailsFirstPublish {
    async fn publish(
        &self,
        topic: &str,
        envelope: &whizbang::Envelope,
    ) -> Result<(), whizbang::transport::TransportError> {
        let earlier =
            whizbang::message::decode::<Tried>(&envelope.payload).is_ok_and(|t| t.seq == 1);
        if earlier && !self.failed.swap(true, Ordering::SeqCst) {
            let waited = wait_gate(&self.gate.later_committed, "the later event's commit").await;
            self.gate.earlier_failing.notify_one();
            return Err(whizbang::transport::TransportError::Rejected {
                topic: topic.into(),
                reason: format!("refused once ({waited:?})"),
            });
        }
        self.inner.publish(topic, envelope).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn whizbang::transport::Subscription>, whizbang::transport::TransportError>
    {
        self.inner.subscribe(topic, subscription, prefetch).await
    }

    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), whizbang::transport::TransportError> {
        self.inner.check_topology(topics, subscriptions).await
    }
}

/// The same race on the publishing side: the earlier event's publish fails while the batch
/// committing the later event (and leasing its outbox row to this instance) is answered. The
/// later event must not be published before the earlier one.
#[actix::test]
async fn a_failed_publish_while_a_later_row_is_being_committed_does_not_let_it_overtake()
-> anyhow::Result<()> {
    const TOPIC: &str = "slow-publish";
    let bus = MemoryBus::new();
    let remote = Recorder::new();
    let receiver = on_bus(subscribed(config("receiver"), TOPIC, "receiver"), &bus)
        .perspective::<Tried, _>("remote", remote.clone())
        .start()
        .await?;
    let gate = Arc::new(Gate::default());
    let sender_config = publishing(quick_retries("publisher", 10), Tried::TYPE_NAME, TOPIC);
    let store = HookedStore::new(&sender_config, SlowReplies { gate: gate.clone() });
    let transport = FailsFirstPublish {
        inner: whizbang::transport::memory::MemoryTransport::new(bus.clone()),
        gate,
        failed: AtomicBool::new(false),
    };
    let sender = Runtime::builder(sender_config)
        .store(Arc::new(store))
        .transport(Arc::new(transport))
        .receptor::<Try, _>(TryReceptor)
        .start()
        .await?;
    let stream = unique("publish-overtake");
    sender.send(Try::new(&stream, 1, Mode::Ok)).await?;
    sender.send(Try::new(&stream, 2, Mode::Ok)).await?;
    wait_until("both events at the other service", || {
        remote.seqs(&stream).len() >= 2
    })
    .await?;
    anyhow::ensure!(
        remote.seqs(&stream) == vec![1, 2],
        "published in the order {:?}",
        remote.seqs(&stream)
    );
    sender.shutdown().await?;
    receiver.shutdown().await?;
    Ok(())
}

/// Sets up a stream whose first event dead-letters after `max_attempts`; returns the service,
/// the stream, the dead event's id and the correlation of the second (parked) event.
async fn dead_lettered_stream(max_attempts: u32) -> anyhow::Result<(Service, String, Uuid, Uuid)> {
    let bus = MemoryBus::new();
    let s = service(quick_retries("dead-letters", max_attempts), &bus).await?;
    let stream = unique("doomed");
    let e =
        s.rt.local_invoke::<Try, Tried>(Try::new(&stream, 1, Mode::Ok).failing(u32::MAX, false))
            .await
            .err();
    let Some(DispatchError::PerspectiveFailed {
        message_id: dead, ..
    }) = e
    else {
        anyhow::bail!("expected PerspectiveFailed, got {e:?}");
    };
    let parked = s.rt.send(Try::new(&stream, 2, Mode::Ok)).await?;

    wait_dead_lettered(s.rt.store(), dead).await?;
    let letters = s.rt.store().dead_letters().await?;
    anyhow::ensure!(letters.len() == 1, "{letters:?}");
    let letter = &letters[0];
    anyhow::ensure!(letter.queue == Queue::Inbox, "{letter:?}");
    anyhow::ensure!(letter.message_type == Tried::TYPE_NAME, "{letter:?}");
    anyhow::ensure!(letter.stream_id == stream, "{letter:?}");
    anyhow::ensure!(letter.attempts == max_attempts, "{letter:?}");
    anyhow::ensure!(
        letter.error.contains("flaky perspective failed"),
        "{letter:?}"
    );

    // Nothing else is blocked...
    let other = unique("other");
    let r: Tried = s.rt.local_invoke(Try::new(&other, 1, Mode::Ok)).await?;
    anyhow::ensure!(r.seq == 1);
    // ...but the stream waits behind its dead letter, which is not retried any more.
    anyhow::ensure!(
        s.flaky.calls(dead) == max_attempts,
        "{} calls",
        s.flaky.calls(dead)
    );
    anyhow::ensure!(s.flaky.applied.seqs(&stream).is_empty());
    anyhow::ensure!(
        s.steady.seqs(&stream) == vec![1],
        "{:?}",
        s.steady.seqs(&stream)
    );
    let status = s.rt.status(parked.correlation_id).await?;
    anyhow::ensure!(
        status.inbox_pending == 1 && status.inbox_processed == 0,
        "the parked event: {status:?}"
    );
    let stored = s.rt.store().read_stream(&stream, 1).await?;
    anyhow::ensure!(stored.len() == 2 && stored[0].envelope.message_id == dead);
    let status = s.rt.status(stored[0].envelope.correlation_id).await?;
    anyhow::ensure!(
        status.dead_lettered == 1 && status.inbox_pending == 0,
        "the dead event: {status:?}"
    );
    Ok((s, stream, dead, parked.correlation_id))
}

#[actix::test]
async fn a_dead_letter_parks_its_stream_until_requeued() -> anyhow::Result<()> {
    let (s, stream, dead, parked) = dead_lettered_stream(3).await?;
    s.flaky.healed.store(true, Ordering::SeqCst);
    s.rt.store().requeue_dead_letter(dead).await?;
    wait_until("the requeued event and the one behind it", || {
        s.flaky.applied.seqs(&stream) == vec![1, 2]
    })
    .await?;
    anyhow::ensure!(
        s.steady.seqs(&stream) == vec![1, 2],
        "{:?}",
        s.steady.seqs(&stream)
    );
    anyhow::ensure!(s.flaky.calls(dead) == 4, "{} calls", s.flaky.calls(dead));
    anyhow::ensure!(s.rt.store().dead_letters().await?.is_empty());
    let rt = &s.rt;
    wait_for("the parked event to be processed", || async move {
        rt.status(parked)
            .await
            .is_ok_and(|st| st.inbox_processed == 1 && st.inbox_pending == 0)
    })
    .await?;
    s.rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_skipped_dead_letter_lets_its_stream_move_on() -> anyhow::Result<()> {
    let (s, stream, dead, _) = dead_lettered_stream(2).await?;
    s.rt.store().skip_dead_letter(dead).await?;
    wait_until("the event behind the skipped one", || {
        s.flaky.applied.seqs(&stream) == vec![2]
    })
    .await?;
    anyhow::ensure!(
        s.steady.seqs(&stream) == vec![1, 2],
        "{:?}",
        s.steady.seqs(&stream)
    );
    anyhow::ensure!(s.flaky.calls(dead) == 2, "{} calls", s.flaky.calls(dead));
    anyhow::ensure!(s.rt.store().dead_letters().await?.is_empty());
    s.rt.shutdown().await?;
    Ok(())
}
