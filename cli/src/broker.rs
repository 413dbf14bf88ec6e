//! `whizbang dead-letters broker`: the broker's dead-letter queues of a service's
//! subscriptions (RabbitMQ: `TOPIC.SUB.dead`, declared by `scripts/amqp-topology.sh`), where
//! the broker puts deliveries the consumers rejected (an unknown type, a malformed payload, an
//! oversized one). It counts each queue's messages and, with `--show`, prints each one's
//! envelope fields.
//!
//! How it reads them: RabbitMQ's AMQP 1.0 plugin cannot browse a queue, and the management
//! plugin (HTTP) may not be enabled, so this module attaches an ordinary receiver to
//! `/amq/queue/TOPIC.SUB.dead`, takes what the queue holds (until nothing arrives for a short
//! while, at most `--limit`), and settles every delivery `released`: RabbitMQ puts each back at
//! its place in the queue, so the queue is the same afterwards but for each message's delivery
//! count. It must not accept, reject or modify-as-failed anything: reading must never remove a
//! dead letter. Only the RabbitMQ flavour: Service Bus keeps dead letters in
//! `SUB/$DeadLetterQueue`, which its own tools show.

use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};
use serde_json::{Value as Json, json};
use std::time::Duration;
use whizbang::Config;
use whizbang::config::{AmqpFlavour, ExposeSecret};

/// A message seen in a dead-letter queue.
#[derive(Debug, Clone)]
pub struct Letter {
    pub message_id: Option<String>,
    /// The message type (the AMQP subject).
    pub subject: Option<String>,
    /// The stream (the AMQP group id).
    pub stream: Option<String>,
    pub delivery_count: u32,
}

/// One dead-letter queue: how many messages it holds (at least, when `limit` was reached) and,
/// when asked, each of them.
#[derive(Debug, Clone)]
pub struct DeadQueue {
    pub queue: String,
    pub messages: usize,
    pub limited: bool,
    pub letters: Vec<Letter>,
}

/// The dead-letter queue names of `subscriptions` (`TOPIC:SUB`, or the configuration's).
pub fn queues(config: &Config, subscriptions: &[String]) -> Result<Vec<String>, String> {
    if config.transport.amqp.flavour != AmqpFlavour::RabbitMq {
        return Err(
            "dead-letters broker reads RabbitMQ's TOPIC.SUB.dead queues; on Service Bus use \
             its SUB/$DeadLetterQueue tools"
                .into(),
        );
    }
    let pairs: Vec<(String, String)> = if subscriptions.is_empty() {
        config
            .routing
            .subscriptions
            .iter()
            .map(|s| (s.topic.clone(), s.name.clone()))
            .collect()
    } else {
        subscriptions
            .iter()
            .map(|s| {
                s.split_once(':')
                    .filter(|(t, n)| !t.is_empty() && !n.is_empty())
                    .map(|(t, n)| (t.to_string(), n.to_string()))
                    .ok_or_else(|| format!("--subscription {s}: expected TOPIC:SUBSCRIPTION"))
            })
            .collect::<Result<_, _>>()?
    };
    if pairs.is_empty() {
        return Err(
            "no subscriptions: the configuration has no [routing] subscriptions; name them with \
             --subscription TOPIC:SUB"
                .into(),
        );
    }
    Ok(pairs
        .into_iter()
        .map(|(topic, sub)| format!("{topic}.{sub}.dead"))
        .collect())
}

/// Reads each queue as the module says; every delivery is released before it returns.
pub async fn read(
    config: &Config,
    queues: &[String],
    limit: usize,
    idle: Duration,
) -> Result<Vec<DeadQueue>, String> {
    let url = config.transport.amqp_url.expose_secret();
    let redacted = whizbang::config::redact(url);
    let connect = Duration::from_millis(config.transport.amqp.connect_timeout_ms);
    let mut connection = tokio::time::timeout(connect, Connection::open("whizbang-cli", url))
        .await
        .map_err(|_| format!("the broker at {redacted} did not answer within {connect:?}"))?
        .map_err(|e| format!("cannot connect to the broker at {redacted}: {e}"))?;
    let mut session = Session::begin(&mut connection)
        .await
        .map_err(|e| format!("cannot begin a session: {e}"))?;
    let mut out = Vec::new();
    for queue in queues {
        let mut receiver = tokio::time::timeout(
            connect,
            Receiver::attach(
                &mut session,
                "whizbang-cli-dead",
                format!("/amq/queue/{queue}"),
            ),
        )
        .await
        .map_err(|_| format!("attaching to {queue} timed out"))?
        .map_err(|e| format!("cannot read {queue} (is it declared?): {e}"))?;
        let mut deliveries = Vec::new();
        while deliveries.len() < limit {
            match tokio::time::timeout(idle, receiver.recv::<Body<Value>>()).await {
                Ok(Ok(delivery)) => deliveries.push(delivery),
                Ok(Err(e)) => {
                    release_all(&mut receiver, &deliveries).await;
                    return Err(format!("reading {queue} failed: {e}"));
                }
                Err(_) => break,
            }
        }
        let letters = deliveries.iter().map(|d| letter(d.message())).collect();
        release_all(&mut receiver, &deliveries).await;
        let _ = receiver.close().await;
        out.push(DeadQueue {
            queue: queue.clone(),
            messages: deliveries.len(),
            limited: deliveries.len() >= limit,
            letters,
        });
    }
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(out)
}

async fn release_all(
    receiver: &mut Receiver,
    deliveries: &[fe2o3_amqp::link::delivery::Delivery<Body<Value>>],
) {
    for d in deliveries {
        if let Err(e) = receiver.release(d).await {
            tracing::warn!(error = %e, "could not release a dead letter; the broker returns it when the link closes");
        }
    }
}

fn letter(message: &Message<Body<Value>>) -> Letter {
    let properties = message.properties.as_ref();
    Letter {
        message_id: properties
            .and_then(|p| p.message_id.as_ref())
            .map(|id| match id {
                MessageId::String(s) => s.clone(),
                MessageId::Uuid(u) => format!("{u:?}"),
                MessageId::Ulong(n) => n.to_string(),
                MessageId::Binary(b) => format!("{b:?}"),
            }),
        subject: properties.and_then(|p| p.subject.clone()),
        stream: properties.and_then(|p| p.group_id.clone()),
        delivery_count: message.header.as_ref().map_or(0, |h| h.delivery_count),
    }
}

/// The table: one line per queue, and with `show` one per message under it.
pub fn table(queues: &[DeadQueue], show: bool) -> String {
    let mut out = format!("{:<50} {:>9}\n", "dead-letter queue", "messages");
    for q in queues {
        let n = if q.limited {
            format!("≥{}", q.messages)
        } else {
            q.messages.to_string()
        };
        out.push_str(&format!("{:<50} {n:>9}\n", q.queue));
        if show {
            for l in &q.letters {
                out.push_str(&format!(
                    "  {}  type {}  stream {}  delivered {}\n",
                    l.message_id.as_deref().unwrap_or("-"),
                    l.subject.as_deref().unwrap_or("-"),
                    l.stream.as_deref().unwrap_or("-"),
                    l.delivery_count
                ));
            }
        }
    }
    out
}

pub fn json(queues: &[DeadQueue], show: bool) -> Json {
    Json::Array(
        queues
            .iter()
            .map(|q| {
                let mut v = json!({
                    "queue": q.queue,
                    "messages": q.messages,
                    "at_least": q.limited,
                });
                if show {
                    v["letters"] = q
                        .letters
                        .iter()
                        .map(|l| {
                            json!({
                                "message_id": l.message_id,
                                "message_type": l.subject,
                                "stream_id": l.stream,
                                "delivery_count": l.delivery_count,
                            })
                        })
                        .collect();
                }
                v
            })
            .collect(),
    )
}
