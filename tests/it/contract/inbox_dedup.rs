//! Contract 3: a message delivered twice to the inbox takes effect once (dedup by message id),
//! whether the copy arrives while the first is still pending or after it was processed; and
//! contract 5: every delivery, duplicate or not, is settled (accepted, not dead-lettered).

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use whizbang::store::InboxSettled;
use whizbang::transport::memory::MemoryBus;
use whizbang::{Command, Decision, Message, Receptor, ReceptorContext, ReceptorError};

const TOPIC: &str = "dedup";
const SUBSCRIPTION: &str = "inbox";

#[actix::test]
async fn an_event_delivered_twice_is_applied_once() -> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let (a, b) = (Recorder::new(), Recorder::new());
    let rt = on_bus(
        subscribed(config("dedup-service"), TOPIC, SUBSCRIPTION),
        &bus,
    )
    .perspective::<Bumped, _>("a", a.clone())
    .perspective::<Bumped, _>("b", b.clone())
    .start()
    .await?;
    let stream = unique("dedup");

    // Two copies back to back: the second arrives while the first may still be pending.
    let first = event_envelope(&Bumped::new(&stream, 1));
    bus.inject(TOPIC, first.clone());
    bus.inject(TOPIC, first.clone());
    wait_until("the first event to be applied", || {
        a.count_of(first.message_id) >= 1 && b.count_of(first.message_id) >= 1
    })
    .await?;
    // A third copy after it was processed: the dedup record must catch it.
    wait_for("the first event to be recorded as processed", || async {
        rt.store()
            .inbox_settled(&[first.message_id])
            .await
            .is_ok_and(|done| done == vec![(first.message_id, InboxSettled::Processed)])
    })
    .await?;
    bus.inject(TOPIC, first.clone());

    // A later, distinct message on the same stream: once it is applied, any copy of the first
    // (queued before it, on the same stream) would have been applied too.
    let second = event_envelope(&Bumped::new(&stream, 2));
    bus.inject(TOPIC, second.clone());
    wait_until("the second event to be applied", || {
        a.count_of(second.message_id) == 1 && b.count_of(second.message_id) == 1
    })
    .await?;
    wait_until("every delivery to be settled", || {
        bus.depth(TOPIC, SUBSCRIPTION) == 0
    })
    .await?;

    for (name, rec) in [("a", &a), ("b", &b)] {
        anyhow::ensure!(
            rec.count_of(first.message_id) == 1,
            "perspective {name} applied the first message {} times",
            rec.count_of(first.message_id)
        );
        anyhow::ensure!(
            rec.seqs(&stream) == vec![1, 2],
            "perspective {name} saw {:?}",
            rec.seqs(&stream)
        );
    }
    let dead = bus.dead_letters(TOPIC, SUBSCRIPTION);
    anyhow::ensure!(
        dead.is_empty(),
        "duplicates must be accepted, not rejected: {dead:?}"
    );
    let status = rt.status(first.correlation_id).await?;
    anyhow::ensure!(
        status.inbox_processed == 1 && status.inbox_pending == 0,
        "{status:?}"
    );
    rt.shutdown().await?;
    Ok(())
}

// ---- A command delivered twice runs its receptor once -------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Charge {
    stream: String,
    seq: u32,
}

impl Message for Charge {
    const TYPE_NAME: &'static str = "dedup.Charge";
    fn stream_id(&self) -> String {
        self.stream.clone()
    }
}
impl Command for Charge {}

#[derive(Clone, Default)]
struct ChargeReceptor(Arc<Mutex<Vec<u32>>>);

impl Receptor<Charge> for ChargeReceptor {
    type Result = ();

    async fn handle(
        &self,
        cmd: Charge,
        _ctx: ReceptorContext,
    ) -> Result<Decision<()>, ReceptorError> {
        self.0.lock().unwrap().push(cmd.seq);
        Ok(Decision::new(()).emit(&Bumped::new(cmd.stream, cmd.seq)))
    }
}

#[actix::test]
async fn a_command_delivered_twice_is_handled_once() -> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let receptor = ChargeReceptor::default();
    let a = Recorder::new();
    let rt = on_bus(
        subscribed(config("charge-service"), TOPIC, SUBSCRIPTION),
        &bus,
    )
    .receptor::<Charge, _>(receptor.clone())
    .perspective::<Bumped, _>("a", a.clone())
    .start()
    .await?;
    let stream = unique("charge");
    let first = command_envelope(&Charge {
        stream: stream.clone(),
        seq: 1,
    });
    bus.inject(TOPIC, first.clone());
    bus.inject(TOPIC, first.clone());
    wait_until("the first command's event", || a.seqs(&stream) == vec![1]).await?;
    bus.inject(TOPIC, first.clone());
    let second = command_envelope(&Charge {
        stream: stream.clone(),
        seq: 2,
    });
    bus.inject(TOPIC, second);
    wait_until("the second command's event", || a.seqs(&stream).len() >= 2).await?;
    wait_until("every delivery to be settled", || {
        bus.depth(TOPIC, SUBSCRIPTION) == 0
    })
    .await?;

    let handled = receptor.0.lock().unwrap().clone();
    anyhow::ensure!(handled == vec![1, 2], "receptor ran for {handled:?}");
    anyhow::ensure!(a.seqs(&stream) == vec![1, 2], "{:?}", a.seqs(&stream));
    let stored = rt.store().read_stream(&stream, 1).await?;
    anyhow::ensure!(stored.len() == 2, "{} events stored", stored.len());
    // The events the command caused point back at the one delivered message.
    anyhow::ensure!(stored[0].envelope.causation_id == Some(first.message_id));
    anyhow::ensure!(stored[0].envelope.correlation_id == first.correlation_id);
    rt.shutdown().await?;
    Ok(())
}
