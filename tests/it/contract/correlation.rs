//! The correlation / causation chain and hops: command A → event E and follow-on command B
//! (`Decision::then_send`) → event F. Every message of the conversation shares A's correlation
//! id; each points at the message that caused it; each records where it went.

use crate::support::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use uuid::Uuid;
use whizbang::routing::partition_of;
use whizbang::transport::Transport;
use whizbang::transport::memory::{MemoryBus, MemoryTransport};
use whizbang::{
    Command, Decision, DispatchOptions, Event, Message, Receptor, ReceptorContext, ReceptorError,
    Runtime,
};

const TOPIC: &str = "flows";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartFlow {
    flow: String,
}
impl Message for StartFlow {
    const TYPE_NAME: &'static str = "corr.StartFlow";
    fn stream_id(&self) -> String {
        format!("flow-{}", self.flow)
    }
}
impl Command for StartFlow {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FlowStarted {
    flow: String,
}
impl Message for FlowStarted {
    const TYPE_NAME: &'static str = "corr.FlowStarted";
    fn stream_id(&self) -> String {
        format!("flow-{}", self.flow)
    }
}
impl Event for FlowStarted {}
impl Seq for FlowStarted {
    fn seq(&self) -> u32 {
        1
    }
}

/// The follow-on command, on another stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ContinueFlow {
    flow: String,
}
impl Message for ContinueFlow {
    const TYPE_NAME: &'static str = "corr.ContinueFlow";
    fn stream_id(&self) -> String {
        format!("next-{}", self.flow)
    }
}
impl Command for ContinueFlow {}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FlowContinued {
    flow: String,
}
impl Message for FlowContinued {
    const TYPE_NAME: &'static str = "corr.FlowContinued";
    fn stream_id(&self) -> String {
        format!("next-{}", self.flow)
    }
}
impl Event for FlowContinued {}
impl Seq for FlowContinued {
    fn seq(&self) -> u32 {
        2
    }
}

type Contexts = Arc<Mutex<Vec<ReceptorContext>>>;

#[derive(Clone, Default)]
struct StartReceptor(Contexts);

impl Receptor<StartFlow> for StartReceptor {
    /// A's message id and correlation id, as the receptor saw them.
    type Result = (Uuid, Uuid);

    async fn handle(
        &self,
        cmd: StartFlow,
        ctx: ReceptorContext,
    ) -> Result<Decision<(Uuid, Uuid)>, ReceptorError> {
        self.0.lock().unwrap().push(ctx.clone());
        Ok(Decision::new((ctx.message_id, ctx.correlation_id))
            .emit(&FlowStarted {
                flow: cmd.flow.clone(),
            })
            .then_send(&ContinueFlow { flow: cmd.flow }))
    }
}

#[derive(Clone, Default)]
struct ContinueReceptor(Contexts);

impl Receptor<ContinueFlow> for ContinueReceptor {
    type Result = ();

    async fn handle(
        &self,
        cmd: ContinueFlow,
        ctx: ReceptorContext,
    ) -> Result<Decision<()>, ReceptorError> {
        self.0.lock().unwrap().push(ctx);
        Ok(Decision::new(()).emit(&FlowContinued { flow: cmd.flow }))
    }
}

struct Flow {
    bus: Arc<MemoryBus>,
    rt: Runtime,
    remote_rt: Runtime,
    starts: Contexts,
    continues: Contexts,
    events: Recorder,
    remote: Recorder,
}

async fn flow_service() -> anyhow::Result<Flow> {
    let bus = MemoryBus::new();
    let remote = Recorder::new();
    let remote_rt = on_bus(subscribed(config("flow-watcher"), TOPIC, "watcher"), &bus)
        .perspective::<FlowStarted, _>("remote", remote.clone())
        .start()
        .await?;
    // A subscription nobody consumes: the test reads what was published from it.
    bus.declare(TOPIC, "probe");
    let (start, cont) = (StartReceptor::default(), ContinueReceptor::default());
    let events = Recorder::new();
    let rt = on_bus(
        publishing(config("flow-service"), FlowStarted::TYPE_NAME, TOPIC),
        &bus,
    )
    .receptor::<StartFlow, _>(start.clone())
    .receptor::<ContinueFlow, _>(cont.clone())
    .perspective::<FlowStarted, _>("started", events.clone())
    .perspective::<FlowContinued, _>("continued", events.clone())
    .start()
    .await?;
    Ok(Flow {
        bus,
        rt,
        remote_rt,
        starts: start.0,
        continues: cont.0,
        events,
        remote,
    })
}

/// Runs one conversation and checks its chain; returns (A's id, correlation id).
async fn check_chain(
    f: &Flow,
    flow: &str,
    options: Option<DispatchOptions>,
) -> anyhow::Result<(Uuid, Uuid)> {
    let (first_stream, next_stream) = (format!("flow-{flow}"), format!("next-{flow}"));
    let cmd = StartFlow { flow: flow.into() };
    let (a_id, corr): (Uuid, Uuid) = match &options {
        Some(o) => f.rt.local_invoke_with(cmd, o.clone()).await?,
        None => f.rt.local_invoke(cmd).await?,
    };
    let a_ctx = f
        .starts
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.message_id == a_id)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("A's receptor context not recorded"))?;
    match &options {
        Some(o) => {
            anyhow::ensure!(
                Some(corr) == o.correlation_id,
                "A continues the given correlation"
            );
            anyhow::ensure!(a_ctx.causation_id == o.causation_id, "{a_ctx:?}");
        }
        None => {
            anyhow::ensure!(
                corr == a_id,
                "an original request starts its own correlation"
            );
            anyhow::ensure!(a_ctx.causation_id.is_none(), "{a_ctx:?}");
        }
    }
    anyhow::ensure!(a_ctx.stream_id == first_stream);

    // E: applied before local_invoke returned.
    let e = f.events.stream(&first_stream);
    anyhow::ensure!(e.len() == 1, "E seen {} times", e.len());
    let e = &e[0].meta;
    anyhow::ensure!(
        e.causation_id == Some(a_id),
        "E.causation {:?}",
        e.causation_id
    );
    anyhow::ensure!(e.correlation_id == corr, "E.correlation");
    anyhow::ensure!(e.message_id != a_id);

    // B and F: B ran from the inbox; F's perspective runs after it.
    wait_until("F's perspective", || {
        f.events.stream(&next_stream).len() == 1
    })
    .await?;
    let b_ctx = f
        .continues
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.stream_id == next_stream)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("B's receptor did not run"))?;
    anyhow::ensure!(
        b_ctx.causation_id == Some(a_id),
        "B.causation {:?}",
        b_ctx.causation_id
    );
    anyhow::ensure!(b_ctx.correlation_id == corr, "B.correlation");
    anyhow::ensure!(b_ctx.message_id != a_id && b_ctx.message_id != e.message_id);
    let fm = f.events.stream(&next_stream)[0].meta.clone();
    anyhow::ensure!(
        fm.causation_id == Some(b_ctx.message_id),
        "F.causation {:?}, B is {}",
        fm.causation_id,
        b_ctx.message_id
    );
    anyhow::ensure!(fm.correlation_id == corr, "F.correlation");

    // The store holds the same identities.
    let stored_e = f.rt.store().read_stream(&first_stream, 1).await?;
    let stored_f = f.rt.store().read_stream(&next_stream, 1).await?;
    anyhow::ensure!(stored_e.len() == 1 && stored_f.len() == 1);
    let (se, sf) = (&stored_e[0].envelope, &stored_f[0].envelope);
    anyhow::ensure!(se.message_id == e.message_id && sf.message_id == fm.message_id);
    anyhow::ensure!(se.causation_id == Some(a_id) && se.correlation_id == corr);
    anyhow::ensure!(sf.causation_id == Some(b_ctx.message_id) && sf.correlation_id == corr);
    anyhow::ensure!(
        stored_e[0].position < stored_f[0].position,
        "E is stored before F"
    );
    let all = f.rt.store().read_all(0, 10_000).await?;
    let in_conversation: Vec<&str> = all
        .iter()
        .filter(|s| s.envelope.correlation_id == corr)
        .map(|s| s.envelope.message_type.as_str())
        .collect();
    anyhow::ensure!(
        in_conversation == vec![FlowStarted::TYPE_NAME, FlowContinued::TYPE_NAME],
        "{in_conversation:?}"
    );

    // Hops: each stored event records the service instance, its stream and partition.
    let partitions = f.rt.config().partitions.partition_count;
    for stored in [se, sf] {
        let hop = stored
            .hops
            .first()
            .ok_or_else(|| anyhow::anyhow!("no hop on {}", stored.message_type))?;
        anyhow::ensure!(hop.service == "flow-service", "{hop:?}");
        anyhow::ensure!(hop.instance == f.rt.instance_id(), "{hop:?}");
        anyhow::ensure!(hop.stream_id == stored.stream_id, "{hop:?}");
        anyhow::ensure!(
            hop.partition == partition_of(&stored.stream_id, partitions),
            "{hop:?}"
        );
        anyhow::ensure!(hop.timestamp_us > 0, "{hop:?}");
    }

    // The status lookup by correlation id sees the whole conversation: E, B and F processed.
    let rt = &f.rt;
    wait_for("E, B and F to be processed", || async move {
        rt.status(corr)
            .await
            .is_ok_and(|s| s.inbox_processed == 3 && s.inbox_pending == 0)
    })
    .await?;
    let status = f.rt.status(corr).await?;
    anyhow::ensure!(
        status.events
            == vec![
                (FlowStarted::TYPE_NAME.to_string(), first_stream.clone(), 1),
                (FlowContinued::TYPE_NAME.to_string(), next_stream.clone(), 1),
            ],
        "{status:?}"
    );

    // The other service saw E with the same identity, through the bus.
    wait_until("E at the other service", || {
        f.remote.stream(&first_stream).len() == 1
    })
    .await?;
    let r = &f.remote.stream(&first_stream)[0].meta;
    anyhow::ensure!(
        r.message_id == e.message_id && r.correlation_id == corr && r.causation_id == Some(a_id),
        "{r:?}"
    );
    Ok((a_id, corr))
}

#[actix::test]
async fn causation_and_correlation_follow_the_chain() -> anyhow::Result<()> {
    let f = flow_service().await?;
    let flow = unique("one");
    check_chain(&f, &flow, None).await?;

    // The published copy carries the stored identity plus a hop for the topic.
    let transport = MemoryTransport::new(f.bus.clone());
    let mut probe = transport.subscribe(TOPIC, "probe", 10).await?;
    let deliveries = tokio::time::timeout(DEADLINE, probe.receive(10)).await??;
    anyhow::ensure!(deliveries.len() == 1, "{} deliveries", deliveries.len());
    let published = deliveries[0]
        .message
        .clone()
        .map_err(|m| anyhow::anyhow!("{m:?}"))?;
    let stored = f.rt.store().read_stream(&format!("flow-{flow}"), 1).await?;
    let stored = &stored[0].envelope;
    anyhow::ensure!(published.message_id == stored.message_id);
    anyhow::ensure!(published.correlation_id == stored.correlation_id);
    anyhow::ensure!(published.causation_id == stored.causation_id);
    anyhow::ensure!(
        published.hops.len() == stored.hops.len() + 1,
        "published hops {:?}, stored hops {:?}",
        published.hops,
        stored.hops
    );
    let last = published.hops.last().expect("checked");
    anyhow::ensure!(last.topic.as_deref() == Some(TOPIC), "{last:?}");
    anyhow::ensure!(last.service == "flow-service" && last.instance == f.rt.instance_id());
    anyhow::ensure!(
        last.timestamp_us >= stored.hops[0].timestamp_us,
        "hops are in order"
    );

    f.rt.shutdown().await?;
    f.remote_rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn local_invoke_with_continues_a_given_conversation() -> anyhow::Result<()> {
    let f = flow_service().await?;
    let (corr, cause) = (Uuid::now_v7(), Uuid::now_v7());
    let flow = unique("continued");
    let (a_id, got) = check_chain(&f, &flow, Some(DispatchOptions::caused_by(corr, cause))).await?;
    anyhow::ensure!(got == corr && a_id != corr && a_id != cause);

    // Metadata given by the caller travels with every caused message.
    let mut options = DispatchOptions::caused_by(Uuid::now_v7(), a_id);
    options.metadata = BTreeMap::from([("tenant".to_string(), "t-42".to_string())]);
    let flow2 = unique("meta");
    check_chain(&f, &flow2, Some(options)).await?;
    let b_ctx = f
        .continues
        .lock()
        .unwrap()
        .iter()
        .find(|c| c.stream_id == format!("next-{flow2}"))
        .cloned()
        .expect("checked by check_chain");
    anyhow::ensure!(
        b_ctx.metadata.get("tenant").map(String::as_str) == Some("t-42"),
        "{:?}",
        b_ctx.metadata
    );
    let stored =
        f.rt.store()
            .read_stream(&format!("flow-{flow2}"), 1)
            .await?;
    anyhow::ensure!(
        stored[0]
            .envelope
            .metadata
            .get("tenant")
            .map(String::as_str)
            == Some("t-42"),
        "{:?}",
        stored[0].envelope.metadata
    );
    f.rt.shutdown().await?;
    f.remote_rt.shutdown().await?;
    Ok(())
}
