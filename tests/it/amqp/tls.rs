//! The `amqps://` path (what Service Bus uses on port 5671): TLS first, then SASL PLAIN and
//! AMQP inside it. The test puts a TLS-terminating proxy (native-tls, a certificate made for
//! this run with the `openssl` command) in front of the local RabbitMQ and runs publish →
//! receive → accept through it; without `transport.amqp.tls_ca_file` the same connection is
//! refused because the certificate is not trusted.

use crate::support::amqp::*;
use crate::support::tls::TestCert;
use crate::support::*;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use whizbang::transport::amqp::AmqpTransport;
use whizbang::transport::{Settlement, Transport, TransportError};

/// Accepts TLS on an ephemeral port and relays the plaintext to the broker; returns the port
/// and a count of completed TLS handshakes.
async fn tls_proxy(cert: &Path, key: &Path) -> anyhow::Result<(u16, Arc<AtomicUsize>)> {
    let identity = native_tls::Identity::from_pkcs8(&std::fs::read(cert)?, &std::fs::read(key)?)?;
    let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let count = handshakes.clone();
    let broker = amqp_url()
        .rsplit('@')
        .next()
        .unwrap_or("127.0.0.1:5672")
        .trim_end_matches('/')
        .to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let count = count.clone();
            let broker = broker.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if let Ok(mut upstream) = tokio::net::TcpStream::connect(broker.as_str()).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                }
            });
        }
    });
    Ok((port, handshakes))
}

#[tokio::test]
async fn amqps_connects_tls_first_and_carries_messages() -> anyhow::Result<()> {
    let _broker = require_broker().await?;
    let cert = TestCert::new()?;
    let (port, handshakes) = tls_proxy(&cert.cert(), &cert.key()).await?;
    let topic = unique("tls");
    let _topology = Topology::declare(&[(&topic, &["s"])])?;

    let mut config = amqp_transport_config();
    config.amqp_url = format!("amqps://guest:guest@localhost:{port}").into();
    config.amqp.tls_ca_file = cert.cert().display().to_string();
    let t = AmqpTransport::from_config(&config, "tls-test")?;
    let e = event_envelope(&Bumped::new("tls-stream", 1));
    t.publish(&topic, &e).await?;
    let mut sub = t.subscribe(&topic, "s", 10).await?;
    let got = tokio::time::timeout(DEADLINE, sub.receive(10)).await??;
    assert_eq!(got[0].message.as_ref().ok(), Some(&e));
    sub.settle(got[0].tag, Settlement::Accept).await?;
    assert!(
        handshakes.load(Ordering::SeqCst) >= 2,
        "the sender and the receiver each connected through TLS"
    );

    // The system roots do not know this certificate: without the CA the handshake fails.
    let mut untrusted = amqp_transport_config();
    untrusted.amqp_url = format!("amqps://guest:guest@localhost:{port}").into();
    let t = AmqpTransport::from_config(&untrusted, "tls-test")?;
    match t
        .publish(&topic, &event_envelope(&Bumped::new("tls-stream", 2)))
        .await
    {
        Err(TransportError::Connection(message)) => {
            assert!(message.contains("cannot connect"), "{message}")
        }
        other => anyhow::bail!("an untrusted certificate must be refused, got {other:?}"),
    }
    Ok(())
}

#[test]
fn an_unreadable_ca_file_is_reported() {
    let mut config = amqp_transport_config();
    config.amqp.tls_ca_file = "/nonexistent/ca.pem".into();
    let err = AmqpTransport::from_config(&config, "x")
        .err()
        .expect("no such file");
    assert!(err.to_string().contains("tls_ca_file"), "{err}");
}
