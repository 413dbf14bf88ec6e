//! Links and what carries them: one connection and one session per link, opened, watched and
//! dropped together.
//!
//! Owns connection establishment (TCP, TLS by the URL's scheme with the optional extra CA,
//! SASL, CBS authorization of the link's entity, the session) within the connect timeout, the
//! watcher that reports a session end or connection close that fe2o3-amqp would not tell a
//! waiting sender, and the topology probe. Because every link has its own connection and
//! session, an error that ends a session (on RabbitMQ an attach error or a `modified` outcome
//! does) never takes a sibling link down, and a broken link is rebuilt by dropping all three.
//! It must not send, receive or settle: the sender task and the subscription own their links.

use super::AmqpSettings;
use super::servicebus;
use crate::transport::TransportError;
use fe2o3_amqp::connection::{Connection, ConnectionHandle};
use fe2o3_amqp::link::{CreditMode, Receiver, Sender};
use fe2o3_amqp::session::{Session, SessionHandle};
use std::fmt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A connection and a session that serve one link, while the link is being attached.
pub(super) struct LinkConnection {
    pub(super) session: SessionHandle<()>,
    connection: ConnectionHandle<()>,
    renewal: Option<AbortOnDrop>,
}

/// Aborts its task when dropped.
pub(super) struct AbortOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connection and session of an attached link, watched: `closed` resolves (with the
/// reason) as soon as the broker ends the session or the connection stops, which fe2o3-amqp
/// does not report to a sender waiting for outcomes. Dropping it ends the session, closes the
/// connection and stops the CBS token renewal.
pub(super) struct LinkGuard {
    pub(super) closed: oneshot::Receiver<String>,
    _watcher: AbortOnDrop,
    _renewal: Option<AbortOnDrop>,
}

impl LinkConnection {
    /// Begins one more session on the link's connection (for a management client beside the
    /// link, so that its errors cannot end the link's session).
    pub(super) async fn extra_session(
        &mut self,
        address: &str,
    ) -> Result<SessionHandle<()>, TransportError> {
        Session::begin(&mut self.connection)
            .await
            .map_err(|e| connection_error(address, "cannot begin a session", e))
    }

    /// Hands the session and connection to a watcher task (they live as long as it does).
    pub(super) fn watch(self) -> LinkGuard {
        let LinkConnection {
            mut session,
            mut connection,
            renewal,
        } = self;
        let (tx, closed) = oneshot::channel();
        let watcher = tokio::spawn(async move {
            let reason = tokio::select! {
                r = session.on_end() => format!("the session ended ({r:?})"),
                r = connection.on_close() => format!("the connection closed ({r:?})"),
            };
            let _ = tx.send(reason);
            // Keep both handles until the link is dropped (which aborts this task).
            std::future::pending::<()>().await;
        });
        LinkGuard {
            closed,
            _watcher: AbortOnDrop(watcher),
            _renewal: renewal,
        }
    }
}

pub(super) fn connection_error(address: &str, what: &str, e: impl fmt::Display) -> TransportError {
    TransportError::Connection(format!("{address}: {what}: {e}"))
}

impl LinkConnection {
    /// Connects for a link to `address` within the connect timeout (and, with CBS, authorizes
    /// the link's entity first).
    pub(super) async fn open(
        settings: &AmqpSettings,
        address: &str,
    ) -> Result<LinkConnection, TransportError> {
        let connect = async {
            let container_id = format!("{}-{}", settings.container_id, uuid::Uuid::now_v7());
            let idle = settings.idle_timeout.as_millis().min(u32::MAX as u128) as u32;
            // The same options with the default TLS connector (system roots) or one that also
            // trusts the configured CA; TLS itself is chosen by the URL's scheme.
            macro_rules! configured {
                ($builder:expr) => {{
                    let builder = $builder
                        .sasl_profile(settings.sasl.clone())
                        .alt_tls_establishment(true);
                    if idle > 0 {
                        builder.idle_time_out(idle)
                    } else {
                        builder
                    }
                }};
            }
            let builder = Connection::builder().container_id(container_id);
            let opened = match &settings.tls_ca {
                None => configured!(builder).open(settings.url.as_str()).await,
                Some(ca) => {
                    let connector = native_tls::TlsConnector::builder()
                        .add_root_certificate(ca.clone())
                        .build()
                        .map_err(|e| connection_error(address, "TLS setup", e))?;
                    configured!(
                        builder
                            .native_tls_connector(tokio_native_tls::TlsConnector::from(connector))
                    )
                    .open(settings.url.as_str())
                    .await
                }
            };
            let mut connection = opened.map_err(|e| {
                connection_error(address, &format!("cannot connect to {}", settings.url), e)
            })?;
            let renewal = match &settings.cbs {
                Some(cbs) => Some(AbortOnDrop(
                    servicebus::authorize(&mut connection, cbs, cbs.connection.audience(address))
                        .await?,
                )),
                None => None,
            };
            let session = Session::begin(&mut connection)
                .await
                .map_err(|e| connection_error(address, "cannot begin a session", e))?;
            Ok(LinkConnection {
                session,
                connection,
                renewal,
            })
        };
        match tokio::time::timeout(settings.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Connection(format!(
                "{address}: no connection to {} within {:?}",
                settings.url, settings.connect_timeout
            ))),
        }
    }
}

pub(super) fn link_name(kind: &str, name: &str) -> String {
    format!("whizbang-{kind}-{name}-{}", uuid::Uuid::now_v7())
}

/// Attaches to `address` as a receiver without credit (nothing is delivered) or as a sender,
/// on a connection of its own, and detaches.
pub(super) async fn probe(
    settings: &AmqpSettings,
    address: &str,
    as_receiver: bool,
) -> Result<(), String> {
    let mut connection = LinkConnection::open(settings, address)
        .await
        .map_err(|e| e.to_string())?;
    let attach = async {
        if as_receiver {
            Receiver::builder()
                .name(link_name("probe", address))
                .source(address)
                .credit_mode(CreditMode::Manual)
                .attach(&mut connection.session)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        } else {
            Sender::builder()
                .name(link_name("probe", address))
                .target(address)
                .attach(&mut connection.session)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    match tokio::time::timeout(settings.send_timeout, attach).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer to the attach within {:?}",
            settings.send_timeout
        )),
    }
}
