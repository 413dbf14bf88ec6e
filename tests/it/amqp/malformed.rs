//! Bad input from the wire (contract 8): deliveries that a plain fe2o3-amqp sender puts into a
//! subscription — a garbage body, no message id, an unknown message type, an oversized payload,
//! a wrong content type, an amqp-value body — are rejected by a running whizbang consumer with
//! a reason naming the problem, while the good messages around them are applied, in order.
//! Nothing stays in the queue: a rejected delivery is never delivered again.

use crate::support::amqp::*;
use crate::support::*;
use fe2o3_amqp::types::messaging::{Data, Message as AmqpMessage, Outcome};
use fe2o3_amqp::types::primitives::{Binary, Symbol};
use fe2o3_amqp::{Connection, Sender, Session};
use whizbang::Runtime;
use whizbang::transport::amqp::wire;

#[actix::test]
async fn malformed_deliveries_are_rejected_with_a_reason_and_good_ones_applied()
-> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let logs = captured_logs();
    let topic = unique("bad");
    let _topology = Topology::declare(&[(&topic, &["inventory"])])?;
    let mut config = subscribed(amqp_config("inventory-service"), &topic, "inventory");
    config.transport.max_message_bytes = 4_096;
    let recorder = Recorder::default();
    let runtime = Runtime::builder(config)
        .perspective::<Bumped, _>("inventory", recorder.clone())
        .start()
        .await?;

    // A plain sender, as any other client of the broker could be.
    let mut connection = Connection::open("plain-sender", amqp_url().as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    let mut sender = Sender::attach(&mut session, "plain", format!("/exchange/{topic}")).await?;
    let stream = "order-1";
    let good = |seq: u32| wire::to_message(&event_envelope(&Bumped::new(stream, seq)));

    let mut garbage = good(100);
    garbage.body = Data(Binary::from(vec![0xc1, 0xff, 0x00, 0x13]));
    let garbage_id = bumped_id(&garbage);
    let mut no_id = good(101);
    no_id.properties.as_mut().unwrap().message_id = None;
    let mut unknown = good(102);
    unknown.properties.as_mut().unwrap().subject = Some("test.NoSuchEvent".into());
    let mut oversized = good(103);
    oversized.body = Data(Binary::from(vec![0u8; 10_000]));
    let mut wrong_type = good(104);
    wrong_type.properties.as_mut().unwrap().content_type = Some(Symbol::from("application/json"));
    let value_body = {
        let m = good(105);
        AmqpMessage::builder()
            .properties(m.properties.clone().unwrap())
            .application_properties(m.application_properties.clone().unwrap())
            .value("{\"stream\":\"order-1\",\"seq\":105}")
            .build()
    };

    let send = |outcome: Outcome| {
        anyhow::ensure!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        Ok(())
    };
    send(sender.send(good(1)).await?)?;
    send(sender.send(garbage).await?)?;
    send(sender.send(good(2)).await?)?;
    send(sender.send(no_id).await?)?;
    send(sender.send(good(3)).await?)?;
    send(sender.send(unknown).await?)?;
    send(sender.send(good(4)).await?)?;
    send(sender.send(oversized).await?)?;
    send(sender.send(good(5)).await?)?;
    send(sender.send(wrong_type).await?)?;
    send(sender.send(good(6)).await?)?;
    send(sender.send(value_body).await?)?;
    send(sender.send(good(7)).await?)?;

    wait_until("the seven good events to be applied", || {
        recorder.seqs(stream).len() >= 7
    })
    .await?;
    assert_eq!(recorder.seqs(stream), (1..=7).collect::<Vec<_>>());

    let expected_reasons = [
        format!("message {garbage_id} does not decode"),
        "malformed delivery: no message-id".to_string(),
        "unknown message type `test.NoSuchEvent`".to_string(),
        "bytes, over the limit of 4096".to_string(),
        "content-type `application/json` is not application/msgpack".to_string(),
        "body is an amqp-value, not a data section".to_string(),
    ];
    // The log is shared by every test of the process (the size-limit tests log the same limit),
    // so only the lines naming this test's topic count.
    let ours = |needle: &str| -> Vec<String> {
        log_lines_with(&logs, needle)
            .into_iter()
            .filter(|l| l.contains(&topic))
            .collect()
    };
    wait_until("a rejection logged for each bad delivery", || {
        expected_reasons.iter().all(|r| !ours(r).is_empty())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; rejections logged: {:#?}", ours("delivery rejected")))?;
    for reason in &expected_reasons {
        let lines = ours(reason);
        assert!(
            lines.iter().all(|l| l.contains("delivery rejected")),
            "{lines:?}"
        );
    }

    // Rejected means gone: nothing is left in (or redelivered from) the queue.
    let queue = format!("{topic}.inventory");
    wait_for("the subscription queue to be empty", || async {
        queue_depth(&queue).ok().flatten() == Some(0)
    })
    .await?;
    assert_eq!(recorder.total(), 7);

    drop(sender);
    drop(session);
    let _ = connection.close().await;
    runtime.shutdown().await?;
    Ok(())
}

fn bumped_id(m: &AmqpMessage<Data>) -> String {
    match m.properties.as_ref().and_then(|p| p.message_id.as_ref()) {
        Some(fe2o3_amqp::types::messaging::MessageId::String(s)) => s.clone(),
        other => panic!("unexpected message id {other:?}"),
    }
}
