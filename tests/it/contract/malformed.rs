//! Contract 8 on the consuming side: deliveries that cannot be processed (undecodable at the
//! transport, unknown type, undecodable payload, oversized, wrong kind) are rejected with a
//! reason in the subscription's dead letters, and the good deliveries around them go through.

use crate::support::*;
use std::sync::Arc;
use whizbang::envelope::MessageKind;
use whizbang::transport::MalformedDelivery;
use whizbang::transport::memory::MemoryBus;
use whizbang::{Envelope, Message, Runtime};

const TOPIC: &str = "incoming";
const SUB: &str = "consumer";
const MAX_BYTES: u32 = 512;

async fn consumer(bus: &Arc<MemoryBus>) -> anyhow::Result<(Runtime, Recorder)> {
    let mut c = subscribed(config("consumer"), TOPIC, SUB);
    c.transport.max_message_bytes = MAX_BYTES;
    let rec = Recorder::new();
    let rt = on_bus(c, bus)
        .receptor::<Bump, _>(BumpReceptor)
        .perspective::<Bumped, _>("rec", rec.clone())
        .start()
        .await?;
    Ok((rt, rec))
}

#[actix::test]
async fn bad_deliveries_are_rejected_with_a_reason_and_good_ones_go_through() -> anyhow::Result<()>
{
    let bus = MemoryBus::new();
    let (rt, rec) = consumer(&bus).await?;
    let stream = unique("mixed");
    let good = |seq| event_envelope(&Bumped::new(&stream, seq));

    let unknown_type = Envelope::new(
        MessageKind::Event,
        "nobody.KnowsThis",
        stream.clone(),
        whizbang::message::encode(&Bumped::new(&stream, 90))?,
    );
    let undecodable = Envelope::new(
        MessageKind::Event,
        Bumped::TYPE_NAME,
        stream.clone(),
        vec![0xc1, 0xff, 0x00, 0x13],
    );
    let mut big = Bumped::new(&stream, 91);
    big.pad = "x".repeat(MAX_BYTES as usize + 1);
    let oversized = event_envelope(&big);
    anyhow::ensure!(oversized.payload.len() > MAX_BYTES as usize);
    let wrong_kind = Envelope::new(
        MessageKind::Command,
        Bumped::TYPE_NAME,
        stream.clone(),
        whizbang::message::encode(&Bumped::new(&stream, 92))?,
    );

    let first = good(1);
    bus.inject(TOPIC, first.clone());
    bus.inject_malformed(
        TOPIC,
        MalformedDelivery {
            message_id: Some("broker-7".into()),
            reason: "body is not an envelope".into(),
        },
    );
    bus.inject(TOPIC, unknown_type.clone());
    bus.inject(TOPIC, undecodable.clone());
    bus.inject(TOPIC, oversized.clone());
    bus.inject(TOPIC, wrong_kind.clone());
    bus.inject_malformed(
        TOPIC,
        MalformedDelivery {
            message_id: None,
            reason: "no body at all".into(),
        },
    );
    let second = good(2);
    bus.inject(TOPIC, second.clone());

    wait_until("the good deliveries", || rec.seqs(&stream).len() >= 2).await?;
    wait_until("every delivery settled", || bus.depth(TOPIC, SUB) == 0).await?;
    anyhow::ensure!(rec.seqs(&stream) == vec![1, 2], "{:?}", rec.seqs(&stream));

    let dead = bus.dead_letters(TOPIC, SUB);
    anyhow::ensure!(dead.len() == 6, "{} dead letters: {dead:#?}", dead.len());
    let reason_of = |id: Option<String>| -> anyhow::Result<String> {
        dead.iter()
            .find(|(i, _)| *i == id)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| anyhow::anyhow!("no dead letter for {id:?}: {dead:#?}"))
    };
    let id = |e: &Envelope| Some(e.message_id.to_string());
    let r = reason_of(Some("broker-7".into()))?;
    anyhow::ensure!(
        r.contains("body is not an envelope") && r.contains("broker-7"),
        "{r}"
    );
    let r = reason_of(None)?;
    anyhow::ensure!(r.contains("no body at all"), "{r}");
    let r = reason_of(id(&unknown_type))?;
    anyhow::ensure!(
        r.contains("unknown message type") && r.contains("nobody.KnowsThis"),
        "{r}"
    );
    let r = reason_of(id(&undecodable))?;
    anyhow::ensure!(r.contains("does not decode"), "{r}");
    let r = reason_of(id(&oversized))?;
    anyhow::ensure!(
        r.contains("over the limit") && r.contains(&MAX_BYTES.to_string()),
        "{r}"
    );
    let r = reason_of(id(&wrong_kind))?;
    anyhow::ensure!(r.contains("command") && r.contains("event"), "{r}");
    // The good ones are not among them.
    anyhow::ensure!(
        !dead
            .iter()
            .any(|(i, _)| *i == id(&first) || *i == id(&second))
    );

    // Nothing of the rejected ones reached the inbox or the event store.
    for e in [&unknown_type, &undecodable, &oversized, &wrong_kind] {
        let status = rt.status(e.correlation_id).await?;
        anyhow::ensure!(
            status.inbox_processed == 0 && status.inbox_pending == 0,
            "{status:?}"
        );
    }

    // The consumer keeps consuming: a bad delivery, then good ones on two streams.
    bus.inject_malformed(
        TOPIC,
        MalformedDelivery {
            message_id: Some("broker-8".into()),
            reason: "truncated".into(),
        },
    );
    let other = unique("after");
    bus.inject(TOPIC, good(3));
    bus.inject(TOPIC, event_envelope(&Bumped::new(&other, 1)));
    wait_until("deliveries after the bad ones", || {
        rec.seqs(&stream) == vec![1, 2, 3] && rec.seqs(&other) == vec![1]
    })
    .await?;
    wait_until("the last rejection", || {
        bus.dead_letters(TOPIC, SUB).len() == 7
    })
    .await?;
    rt.shutdown().await?;
    Ok(())
}

#[actix::test]
async fn a_bad_command_delivery_is_rejected_and_a_good_one_is_handled() -> anyhow::Result<()> {
    let bus = MemoryBus::new();
    let (rt, rec) = consumer(&bus).await?;
    let stream = unique("cmd");
    let bad = Envelope::new(
        MessageKind::Command,
        Bump::TYPE_NAME,
        stream.clone(),
        b"not messagepack at all".to_vec(),
    );
    bus.inject(TOPIC, bad.clone());
    bus.inject(
        TOPIC,
        command_envelope(&Bump {
            stream: stream.clone(),
            seq: 1,
        }),
    );
    wait_until("the good command's event", || rec.seqs(&stream) == vec![1]).await?;
    wait_until("the bad command's rejection", || {
        !bus.dead_letters(TOPIC, SUB).is_empty()
    })
    .await?;
    let dead = bus.dead_letters(TOPIC, SUB);
    anyhow::ensure!(dead.len() == 1, "{dead:?}");
    anyhow::ensure!(dead[0].0 == Some(bad.message_id.to_string()), "{dead:?}");
    anyhow::ensure!(dead[0].1.contains("does not decode"), "{dead:?}");
    let stored = rt.store().read_stream(&stream, 1).await?;
    anyhow::ensure!(stored.len() == 1, "{} events", stored.len());
    rt.shutdown().await?;
    Ok(())
}
