//! Supervision: a panic in any long-lived actor (coordinator, partition, publisher, consumer,
//! registry) restarts it, the restart is counted in `Runtime::health`, and the work carries on
//! with nothing lost: every event in the store is applied, in store order per stream, by the
//! local perspective and by the receiving service. Past `runtime.max_restarts` the instance
//! reports itself not live. Panics are injected with the test-only `fault-injection` hook.

use crate::support::pg::{self, new_schema, on_postgres};
use crate::support::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::registry::RegisterReceptor;
use whizbang::supervision::fault;
use whizbang::transport::memory::MemoryBus;
use whizbang::{ActorKind, Config, Message, Runtime};

const TOPIC: &str = "supervised";
const SUBSCRIPTION: &str = "receiver";
const STREAMS: usize = 12;
const ROUNDS: u32 = 6;
const DEADLINE: Duration = Duration::from_secs(60);

struct Services {
    sender: Runtime,
    receiver: Runtime,
    local: Recorder,
    remote: Recorder,
}

async fn services(sender_config: Config) -> anyhow::Result<Services> {
    let bus = MemoryBus::new();
    let remote = Recorder::new();
    let receiver = on_bus(
        subscribed(config("supervised-receiver"), TOPIC, SUBSCRIPTION),
        &bus,
    )
    .perspective::<Bumped, _>("remote", remote.clone())
    .start()
    .await?;
    let local = Recorder::new();
    let sender = on_bus(publishing(sender_config, Bumped::TYPE_NAME, TOPIC), &bus)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("local", local.clone())
        .start()
        .await?;
    Ok(Services {
        sender,
        receiver,
        local,
        remote,
    })
}

/// Bumps every stream once with `seq`, retrying a call the restart answered with an error
/// (its command may or may not have committed: the checks compare with the store).
async fn round(rt: &Runtime, seq: u32) -> anyhow::Result<()> {
    let started = Instant::now();
    for s in 0..STREAMS {
        loop {
            let answer: Result<Bumped, _> = rt
                .local_invoke(Bump {
                    stream: format!("s-{s}"),
                    seq,
                })
                .await;
            match answer {
                Ok(_) => break,
                Err(e) if started.elapsed() < DEADLINE => {
                    assert!(e.is_retryable(), "a restart answers retryable errors: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => anyhow::bail!("round {seq} still failing after {DEADLINE:?}: {e}"),
            }
        }
    }
    Ok(())
}

/// Every event the store holds, per stream, in store order.
async fn stored(rt: &Runtime) -> anyhow::Result<HashMap<String, Vec<Uuid>>> {
    let mut by_stream: HashMap<String, Vec<Uuid>> = HashMap::new();
    for e in rt.store().read_all(0, 100_000).await? {
        by_stream
            .entry(e.envelope.stream_id.clone())
            .or_default()
            .push(e.envelope.message_id);
    }
    Ok(by_stream)
}

/// Waits until `recorder` has applied every stored event, then checks that the first
/// application of each followed store order per stream.
async fn applied_in_order(
    who: &str,
    recorder: &Recorder,
    stored: &HashMap<String, Vec<Uuid>>,
) -> anyhow::Result<()> {
    wait_until(&format!("{who} applied every stored event"), || {
        stored
            .iter()
            .all(|(stream, ids)| ids.iter().all(|id| recorder.ids(stream).contains(id)))
    })
    .await?;
    for (stream, ids) in stored {
        let mut first_seen: Vec<Uuid> = Vec::new();
        for id in recorder.ids(stream) {
            if !first_seen.contains(&id) {
                first_seen.push(id);
            }
        }
        assert_eq!(&first_seen, ids, "{who}: stream {stream} in store order");
    }
    Ok(())
}

/// Runs rounds with a panic injected into `kind` of the sender (or of the receiver, for the
/// consumer) after the first, then checks nothing was lost and the restart was counted.
async fn carries_on_after_a_panic_in(kind: ActorKind, sender_config: Config) -> anyhow::Result<()> {
    let s = services(sender_config).await?;
    round(&s.sender, 1).await?;
    let panicking = if kind == ActorKind::Consumer {
        &s.receiver
    } else {
        &s.sender
    };
    assert!(panicking.health().actors_alive);
    fault::panic_next(panicking.instance_id(), kind);
    for seq in 2..=ROUNDS {
        round(&s.sender, seq).await?;
    }
    wait_until(&format!("the {kind:?} restart counted"), || {
        panicking.health().restarts_total == 1
    })
    .await?;
    let health = panicking.health();
    assert_eq!(health.restarted, vec![kind], "{health:?}");
    assert!(health.live, "one restart is within the budget: {health:?}");
    let stored = stored(&s.sender).await?;
    assert_eq!(stored.len(), STREAMS);
    assert!(stored.values().all(|ids| ids.len() >= ROUNDS as usize));
    applied_in_order("the local perspective", &s.local, &stored).await?;
    applied_in_order("the receiving service", &s.remote, &stored).await?;
    // The restarted actors keep serving.
    round(&s.sender, ROUNDS + 1).await?;
    wait_until("every actor running again", || {
        panicking.health().actors_alive
    })
    .await?;
    assert_eq!(s.remote.duplicates(), vec![], "the inbox deduplicates");
    s.sender.shutdown().await?;
    s.receiver.shutdown().await?;
    Ok(())
}

#[actix_rt::test]
async fn a_panic_in_the_coordinator_restarts_the_engine_and_nothing_is_lost() {
    carries_on_after_a_panic_in(ActorKind::Coordinator, config("supervised-sender"))
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_panic_in_a_partition_actor_restarts_the_engine_and_nothing_is_lost() {
    carries_on_after_a_panic_in(ActorKind::Partition, config("supervised-sender"))
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_panic_in_the_publisher_restarts_the_engine_and_nothing_is_lost() {
    carries_on_after_a_panic_in(ActorKind::Publisher, config("supervised-sender"))
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_panic_in_a_consumer_restarts_it_and_nothing_is_lost() {
    carries_on_after_a_panic_in(ActorKind::Consumer, config("supervised-sender"))
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_panic_in_the_coordinator_on_postgres_rereads_the_claimed_rows() {
    let _pg = pg::slot().await;
    let schema = new_schema();
    carries_on_after_a_panic_in(
        ActorKind::Coordinator,
        on_postgres(config("supervised-pg-sender"), &schema),
    )
    .await
    .unwrap();
    pg::drop_schemas(&[&schema]).await.unwrap();
}

#[actix_rt::test]
async fn a_panic_in_the_registry_restarts_it_with_its_table() {
    let s = services(config("supervised-sender")).await.unwrap();
    fault::panic_next(s.sender.instance_id(), ActorKind::Registry);
    let refused = s
        .sender
        .registry()
        .send(RegisterReceptor::new::<Bump, _>(BumpReceptor))
        .await;
    assert!(refused.is_err(), "the registry panicked on the message");
    wait_until("the registry restart counted", || {
        s.sender.health().restarts_total == 1 && s.sender.health().actors_alive
    })
    .await
    .unwrap();
    // The restarted registry holds the table it had: the receptor is still registered (a second
    // one is refused) and still serves.
    let again = s
        .sender
        .registry()
        .send(RegisterReceptor::new::<Bump, _>(BumpReceptor))
        .await
        .expect("the restarted registry answers");
    assert!(again.is_err(), "Bump's receptor is still registered");
    round(&s.sender, 1).await.unwrap();
    s.sender.shutdown().await.unwrap();
    s.receiver.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn restarts_past_the_budget_make_the_instance_not_live() {
    let mut c = config("supervised-sender");
    c.runtime.max_restarts = 1;
    let s = services(c).await.unwrap();
    let unhealthy = s.sender.unhealthy();
    round(&s.sender, 1).await.unwrap();
    for (n, seq) in [(1, 2), (2, 3)] {
        fault::panic_next(s.sender.instance_id(), ActorKind::Coordinator);
        round(&s.sender, seq).await.unwrap();
        wait_until(&format!("restart {n} counted"), || {
            s.sender.health().restarts_total == n
        })
        .await
        .unwrap();
    }
    tokio::time::timeout(DEADLINE, unhealthy)
        .await
        .expect("unhealthy() resolves past the budget");
    let health = s.sender.health();
    assert!(!health.live && !health.ready, "{health:?}");
    assert!(
        health
            .reasons
            .iter()
            .any(|r| r.contains("runtime.max_restarts")),
        "{health:?}"
    );
    // Not live, but it still serves what it can while it is being replaced.
    round(&s.sender, 4).await.unwrap();
    s.sender.shutdown().await.unwrap();
    s.receiver.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn a_healthy_instance_reports_live_and_ready() {
    let s = services(config("supervised-sender")).await.unwrap();
    round(&s.sender, 1).await.unwrap();
    let health = s.sender.health();
    assert!(health.live && health.ready, "{health:?}");
    assert!(health.database_reachable && health.transport_connected && health.actors_alive);
    assert_eq!(health.restarts_total, 0);
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["ready"], true);
    s.receiver.shutdown().await.unwrap();
    s.sender.shutdown().await.unwrap();
}

#[actix_rt::test]
async fn idle_partition_actors_stop_and_start_again_on_demand() {
    let mut c = config("supervised-sender");
    c.partitions.idle_actor_seconds = 1;
    c.runtime.worker_threads = 2;
    let s = services(c).await.unwrap();
    round(&s.sender, 1).await.unwrap();
    assert!(s.sender.health().partition_actors > 0);
    wait_until("every idle partition actor stopped", || {
        s.sender.health().partition_actors == 0
    })
    .await
    .unwrap();
    // Stopping on purpose is not a death: nothing was restarted.
    assert_eq!(s.sender.health().restarts_total, 0);
    for seq in 2..=3 {
        round(&s.sender, seq).await.unwrap();
    }
    let stored = stored(&s.sender).await.unwrap();
    assert!(stored.values().all(|ids| ids.len() == 3));
    applied_in_order("the local perspective", &s.local, &stored)
        .await
        .unwrap();
    applied_in_order("the receiving service", &s.remote, &stored)
        .await
        .unwrap();
    assert_eq!(s.local.duplicates(), vec![]);
    s.sender.shutdown().await.unwrap();
    s.receiver.shutdown().await.unwrap();
}
