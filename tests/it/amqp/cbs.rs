//! Claims-based security as Service Bus does it, against a fake Service Bus built with
//! fe2o3-amqp's acceptor: SASL ANONYMOUS, a `$cbs` node answering `put-token` with 202, and
//! entities that accept what is sent. With `auth = "cbs"` the transport puts a SAS token for
//! each link's entity (audience `amqp://HOST/ENTITY`, type `servicebus.windows.net:sastoken`)
//! before attaching the link, and puts a fresh one before the old one expires.

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslAnonymousMechanism, SessionAcceptor,
};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use whizbang::Envelope;
use whizbang::config::{AmqpAuth, AmqpFlavour, Config, TransportKind};
use whizbang::envelope::MessageKind;
use whizbang::transport::Transport;
use whizbang::transport::amqp::AmqpTransport;
use whizbang::transport::amqp::servicebus::{SAS_TOKEN_TYPE, sas_token};

const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";

/// What the fake broker saw, in order.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    PutToken {
        name: String,
        token: String,
        kind: String,
    },
    Attach(String),
    Message(String),
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn fake_service_bus() -> anyhow::Result<(u16, Log)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let log: Log = Arc::default();
    let acceptor = Arc::new(
        ConnectionAcceptor::builder()
            .container_id("fake-servicebus")
            .sasl_acceptor(SaslAnonymousMechanism::new())
            .build(),
    );
    let server_log = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = server_log.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = acceptor.accept(tcp).await else {
                    return;
                };
                while let Ok(session) = SessionAcceptor::new().accept(&mut connection).await {
                    tokio::spawn(serve_session(session, log.clone()));
                }
            });
        }
    });
    Ok((port, log))
}

/// Accepts links: a receiver on `$cbs` answers put-token requests through the session's sender
/// link back to the client; any other receiver accepts messages.
async fn serve_session(mut session: fe2o3_amqp::acceptor::ListenerSessionHandle, log: Log) {
    let (replies, outbox) = mpsc::unbounded_channel::<Message<AmqpValue<String>>>();
    let mut outbox = Some(outbox);
    let acceptor = LinkAcceptor::new();
    loop {
        let link = match acceptor.accept(&mut session).await {
            Ok(link) => link,
            Err(_) => return,
        };
        match link {
            LinkEndpoint::Sender(mut sender) => {
                // The CBS client's receiver (`cbs-client-node`): responses go back on it.
                if let Some(mut outbox) = outbox.take() {
                    tokio::spawn(async move {
                        while let Some(reply) = outbox.recv().await {
                            if sender.send(reply).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
            LinkEndpoint::Receiver(mut receiver) => {
                let address = receiver
                    .target()
                    .as_ref()
                    .and_then(|t| t.address.clone())
                    .unwrap_or_default();
                let log = log.clone();
                let replies = replies.clone();
                if address != "$cbs" {
                    log.lock().unwrap().push(Seen::Attach(address.clone()));
                }
                tokio::spawn(async move {
                    while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
                        let _ = receiver.accept(&delivery).await;
                        let message = delivery.into_message();
                        if address == "$cbs" {
                            let ap = message.application_properties.clone().unwrap_or_default();
                            let text = |k: &str| match ap.get(k) {
                                Some(SimpleValue::String(s)) => s.clone(),
                                _ => String::new(),
                            };
                            let token = match &message.body {
                                Body::Value(v) => match &v.0 {
                                    Value::String(s) => s.clone(),
                                    other => format!("{other:?}"),
                                },
                                other => format!("{other:?}"),
                            };
                            log.lock().unwrap().push(Seen::PutToken {
                                name: text("name"),
                                token,
                                kind: text("type"),
                            });
                            let correlation = message
                                .properties
                                .as_ref()
                                .and_then(|p| p.message_id.clone())
                                .unwrap_or(MessageId::Ulong(0));
                            let mut props = ApplicationProperties::default();
                            props.insert("status-code".into(), SimpleValue::Int(202));
                            props.insert(
                                "status-description".into(),
                                SimpleValue::String("Accepted".into()),
                            );
                            let _ = replies.send(Message {
                                header: None,
                                delivery_annotations: None,
                                message_annotations: None,
                                properties: Some(Properties {
                                    correlation_id: Some(correlation),
                                    ..Properties::default()
                                }),
                                application_properties: Some(props),
                                body: AmqpValue(String::new()),
                                footer: None,
                            });
                        } else {
                            let group = message
                                .properties
                                .as_ref()
                                .and_then(|p| p.group_id.clone())
                                .unwrap_or_default();
                            log.lock().unwrap().push(Seen::Message(group));
                        }
                    }
                });
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[tokio::test]
async fn cbs_tokens_are_put_before_each_link_and_renewed_before_expiry() -> anyhow::Result<()> {
    let (port, log) = fake_service_bus().await?;
    let mut config = Config::default().transport;
    config.kind = TransportKind::Amqp;
    config.send_timeout_ms = 10_000;
    config.amqp.flavour = AmqpFlavour::ServiceBus;
    config.amqp.auth = AmqpAuth::Cbs;
    config.amqp.connection_string = format!(
        "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=send;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
    ).into();
    // Tokens of 60 s, renewed 58 s before they expire: the first renewal comes after 2 s.
    config.amqp.token_ttl_seconds = 60;
    config.amqp.token_renew_before_seconds = 58;
    let t = AmqpTransport::from_config(&config, "cbs-test")?;

    let before = unix_now();
    let envelope = Envelope::new(
        MessageKind::Event,
        "OrderCreated",
        "order-7".into(),
        vec![1],
    );
    t.publish("orders", &envelope).await?;
    let audience = "amqp://127.0.0.1/orders";
    {
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:#?}");
        let Seen::PutToken { name, token, kind } = &seen[0] else {
            panic!("the token comes first: {seen:#?}");
        };
        assert_eq!(name, audience);
        assert_eq!(kind, SAS_TOKEN_TYPE);
        // The token is exactly the SAS token of that audience for an expiry 60 s ahead.
        let se: u64 = token
            .rsplit("&se=")
            .next()
            .and_then(|rest| rest.split('&').next())
            .and_then(|s| s.parse().ok())
            .expect("an se= field");
        assert!((before + 60..=unix_now() + 60).contains(&se), "se={se}");
        assert_eq!(token, &sas_token(audience, "send", KEY, se));
        assert_eq!(seen[1], Seen::Attach("orders".into()));
        assert_eq!(seen[2], Seen::Message("order-7".into()));
    }

    // The renewal: another token for the same audience, with a later expiry.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tokens: Vec<Seen> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s, Seen::PutToken { .. }))
            .cloned()
            .collect();
        if tokens.len() >= 2 {
            let Seen::PutToken { name, token, .. } = &tokens[1] else {
                unreachable!()
            };
            assert_eq!(name, audience);
            assert!(
                token.starts_with("SharedAccessSignature sr=amqp%3A%2F%2F127.0.0.1%2Forders&sig=")
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no renewal within 20 s: {tokens:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
