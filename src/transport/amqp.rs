//! The AMQP 1.0 transport (fe2o3-amqp): Azure Service Bus in production, RabbitMQ 3.x with its
//! `rabbitmq_amqp1_0` plugin in development and CI.
//!
//! Owns the links to the broker and what happens when they break. Each link — one sender per
//! topic, one receiver per subscription, one probe per topology check — has a connection and a
//! session of its own, so an error that ends a session (on RabbitMQ an attach error or a
//! `modified` outcome does) or a connection can never take a sibling link down, and a broken
//! link is rebuilt by dropping all three. It must not know about the store or handlers; the
//! envelope ↔ message mapping lives in [`wire`], Service Bus connection strings, SAS tokens and
//! CBS in [`servicebus`].
//!
//! ## Publishing
//!
//! `publish` hands the encoded message to the topic's sender task over a channel and waits for
//! the broker's outcome, never longer than `transport.send_timeout_ms`. The task writes
//! transfers one after another (`send_batchable`) without waiting for their outcomes, and
//! collects outcomes as they come, each with the same timeout: many concurrent `publish` calls
//! become one pipelined stream of transfers on one link, the way the broker is fastest. Only an
//! `accepted` outcome resolves `Ok`; `rejected` is a [`TransportError::Rejected`] (counted as an
//! attempt by the store); `released`, `modified`, a link error or a timeout are transient. On a
//! timeout or a link, session or connection error the link, session and connection are dropped
//! and every send still waiting on them fails at once (fe2o3-amqp 0.18 may otherwise wait for
//! an outcome forever). The next `publish` reconnects; while reconnecting fails, further
//! attempts are spaced by a capped exponential backoff and calls in between fail fast. Messages
//! whose outcome was lost are sent again by the publisher's retry: the receiving inbox
//! deduplicates them by message id.
//!
//! ## Receiving
//!
//! A subscription is a receiver with `prefetch` credit, replenished as deliveries are settled.
//! A delivery that cannot be rebuilt into an envelope arrives as `Err(MalformedDelivery)` so the
//! consumer rejects it with the reason. `Accept`, `Reject(reason)` (condition
//! `whizbang:rejected`, the reason as description — Service Bus dead-letters it with both) and
//! `Release` map to the AMQP outcomes of the same names. A receive or settle error ends the
//! subscription; the consumer opens a new one, and the broker redelivers what was unsettled.
//!
//! ## Addresses
//!
//! Topic and subscription names become broker addresses through the `[transport.amqp]` address
//! map (templates per flavour, overrides per name), so neither broker's form is hard-coded:
//! Service Bus `orders` / `orders/Subscriptions/inventory`, RabbitMQ `/exchange/orders` /
//! `/amq/queue/orders.inventory`. RabbitMQ routes a message sent to `/exchange/T` by its subject
//! (the message type); the subscription queues are bound with `#`. [`Transport::check_topology`]
//! attaches to every address at start-up and names the first one that does not exist, because
//! RabbitMQ accepts and silently drops what is sent to a missing `/amq/queue/…`.

pub mod servicebus;
pub mod wire;

pub use crate::config::AmqpAuth as Auth;

use super::*;
use crate::config::{AmqpConfig, TransportConfig};
use fe2o3_amqp::connection::{Connection, ConnectionHandle};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{CreditMode, Receiver, SendError, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::{Session, SessionHandle};
use fe2o3_amqp::types::definitions::{self, ErrorCondition, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Body, Data, Message, Outcome};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use futures::FutureExt as _;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use servicebus::{CbsSettings, ConnectionString};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The error condition of a rejected delivery (its description is the consumer's reason).
pub const REJECT_CONDITION: &str = "whizbang:rejected";

/// Sends queued per topic before `publish` callers wait for room.
const SEND_QUEUE: usize = 4096;

/// Everything the transport needs to reach the broker, resolved from the configuration.
#[derive(Clone)]
pub struct AmqpSettings {
    /// Where to connect, without credentials (`amqp://host:5672`, `amqps://host:5671`).
    pub url: String,
    pub sasl: SaslProfile,
    /// Present when links are authorized by CBS put-token (Service Bus).
    pub cbs: Option<CbsSettings>,
    /// An extra CA to trust for `amqps://` (`transport.amqp.tls_ca_file`).
    pub tls_ca: Option<native_tls::Certificate>,
    /// The address map (templates and overrides).
    pub addresses: AmqpConfig,
    /// Longest wait for a broker outcome, an attach or a credit.
    pub send_timeout: Duration,
    /// Longest wait for a connection (TCP, TLS, SASL, open, session, CBS).
    pub connect_timeout: Duration,
    /// Idle timeout announced to the broker; zero for none.
    pub idle_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Prefix of the container id of every connection (a UUID follows).
    pub container_id: String,
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sasl = match &self.sasl {
            SaslProfile::Plain { username, .. } => format!("PLAIN {username}:***"),
            SaslProfile::Anonymous => "ANONYMOUS".into(),
            _ => "other".into(),
        };
        f.debug_struct("AmqpSettings")
            .field("url", &self.url)
            .field("sasl", &sasl)
            .field("cbs", &self.cbs)
            .field("tls_ca", &self.tls_ca.is_some())
            .field("addresses", &self.addresses)
            .field("send_timeout", &self.send_timeout)
            .finish_non_exhaustive()
    }
}

impl AmqpSettings {
    /// Resolves `[transport]` and `[transport.amqp]`: the endpoint (connection string or
    /// `amqp_url`), TLS by scheme (`amqps://` → TLS first, as Service Bus expects on 5671), SASL
    /// PLAIN / ANONYMOUS, CBS. `service` names the connections (container ids).
    pub fn from_config(
        config: &TransportConfig,
        service: &str,
    ) -> Result<AmqpSettings, TransportError> {
        let amqp = &config.amqp;
        let (url, sasl, cbs) = if amqp.connection_string.is_empty() {
            let (url, user) = split_credentials(&config.amqp_url);
            let sasl = match (amqp.auth, user) {
                (Auth::Plain, Some((username, password))) => {
                    SaslProfile::Plain { username, password }
                }
                (Auth::Plain, None) => {
                    return Err(TransportError::Connection(
                        "transport.amqp.auth = \"plain\" needs USER:PASSWORD in transport.amqp_url"
                            .into(),
                    ));
                }
                (Auth::Anonymous, _) => SaslProfile::Anonymous,
                (Auth::Cbs, _) => {
                    return Err(TransportError::Connection(
                        "transport.amqp.auth = \"cbs\" needs transport.amqp.connection_string"
                            .into(),
                    ));
                }
            };
            (url, sasl, None)
        } else {
            let cs = ConnectionString::parse(&amqp.connection_string).map_err(|e| {
                TransportError::Connection(format!("transport.amqp.connection_string: {e}"))
            })?;
            let sasl = servicebus::sasl_for(amqp.auth, &cs);
            let cbs = (amqp.auth == Auth::Cbs).then(|| CbsSettings {
                connection: cs.clone(),
                token_ttl: Duration::from_secs(amqp.token_ttl_seconds),
                renew_before: Duration::from_secs(amqp.token_renew_before_seconds),
            });
            (cs.amqp_url(), sasl, cbs)
        };
        let tls_ca = if amqp.tls_ca_file.is_empty() {
            None
        } else {
            let pem = std::fs::read(&amqp.tls_ca_file).map_err(|e| {
                TransportError::Connection(format!(
                    "transport.amqp.tls_ca_file {}: {e}",
                    amqp.tls_ca_file
                ))
            })?;
            Some(native_tls::Certificate::from_pem(&pem).map_err(|e| {
                TransportError::Connection(format!(
                    "transport.amqp.tls_ca_file {} is not a PEM certificate: {e}",
                    amqp.tls_ca_file
                ))
            })?)
        };
        Ok(AmqpSettings {
            url,
            sasl,
            cbs,
            tls_ca,
            addresses: amqp.clone(),
            send_timeout: Duration::from_millis(config.send_timeout_ms),
            connect_timeout: Duration::from_millis(amqp.connect_timeout_ms),
            idle_timeout: Duration::from_millis(amqp.idle_timeout_ms),
            backoff_base: Duration::from_millis(amqp.reconnect_backoff_base_ms),
            backoff_max: Duration::from_millis(amqp.reconnect_backoff_max_ms),
            container_id: service.to_string(),
        })
    }

    /// The delay before reconnect attempt `failures + 1`: base · 2^(failures-1), capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max)
    }
}

/// `amqp://user:pass@host:port/x` → (`amqp://host:port/x`, Some((user, pass))), both
/// percent-decoded.
fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_string(), None);
    };
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    (
        format!("{scheme}://{host}{path}"),
        Some((decode(user), decode(pass))),
    )
}

/// A connection and a session that serve one link, while the link is being attached.
struct LinkConnection {
    session: SessionHandle<()>,
    connection: ConnectionHandle<()>,
    renewal: Option<AbortOnDrop>,
}

/// Aborts its task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connection and session of an attached link, watched: `closed` resolves (with the
/// reason) as soon as the broker ends the session or the connection stops, which fe2o3-amqp
/// does not report to a sender waiting for outcomes. Dropping it ends the session, closes the
/// connection and stops the CBS token renewal.
struct LinkGuard {
    closed: oneshot::Receiver<String>,
    _watcher: AbortOnDrop,
    _renewal: Option<AbortOnDrop>,
}

impl LinkConnection {
    /// Hands the session and connection to a watcher task (they live as long as it does).
    fn watch(self) -> LinkGuard {
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

fn connection_error(address: &str, what: &str, e: impl fmt::Display) -> TransportError {
    TransportError::Connection(format!("{address}: {what}: {e}"))
}

impl LinkConnection {
    /// Connects for a link to `address` within the connect timeout (and, with CBS, authorizes
    /// the link's entity first).
    async fn open(
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

fn link_name(kind: &str, name: &str) -> String {
    format!("whizbang-{kind}-{name}-{}", uuid::Uuid::now_v7())
}

// ---- Sending ----------------------------------------------------------------------------

struct SenderLink {
    // Field order is drop order: the link goes before its session and connection.
    sender: Sender,
    guard: LinkGuard,
}

struct SendRequest {
    message: Message<Data>,
    reply: oneshot::Sender<Result<(), TransportError>>,
}

enum Settled {
    Outcome(Result<Outcome, SendError>),
    TimedOut,
}

/// Owns the sender link of one topic; see the module docs.
struct SenderTask {
    settings: Arc<AmqpSettings>,
    topic: String,
    address: String,
    link: Option<SenderLink>,
    /// Consecutive failed connection attempts, and when the next may start.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    next_seq: u64,
    waiting: HashMap<u64, oneshot::Sender<Result<(), TransportError>>>,
    outcomes: FuturesUnordered<BoxFuture<'static, (u64, Settled)>>,
}

impl SenderTask {
    async fn run(mut self, mut requests: mpsc::Receiver<SendRequest>) {
        loop {
            tokio::select! {
                Some((seq, settled)) = self.outcomes.next(), if !self.outcomes.is_empty() => {
                    self.finish(seq, settled);
                }
                reason = closed(&mut self.link), if self.link.is_some() => {
                    self.reset(TransportError::Connection(format!("{}: {reason}", self.address)));
                }
                request = requests.recv() => match request {
                    Some(request) => self.start(request).await,
                    None => break,
                },
            }
        }
        // The transport was dropped: nobody waits for the remaining outcomes.
    }

    async fn connect(&mut self) -> Result<(), TransportError> {
        if let Some(at) = self.retry_at {
            let now = Instant::now();
            if now < at {
                return Err(TransportError::Connection(format!(
                    "{}: not connected ({}); next attempt in {} ms",
                    self.address,
                    self.last_error,
                    (at - now).as_millis()
                )));
            }
        }
        let attempt = async {
            let mut connection = LinkConnection::open(&self.settings, &self.address).await?;
            let attach = Sender::builder()
                .name(link_name("send", &self.topic))
                .target(self.address.as_str())
                .sender_settle_mode(SenderSettleMode::Unsettled)
                .attach(&mut connection.session);
            let sender = match tokio::time::timeout(self.settings.send_timeout, attach).await {
                Ok(Ok(sender)) => sender,
                Ok(Err(e)) => return Err(connection_error(&self.address, "attach failed", e)),
                Err(_) => return Err(connection_error(&self.address, "attach", "timed out")),
            };
            Ok(SenderLink {
                sender,
                guard: connection.watch(),
            })
        };
        match attempt.await {
            Ok(link) => {
                if self.failures > 0 {
                    tracing::info!(address = %self.address, "sender reconnected");
                }
                self.link = Some(link);
                self.failures = 0;
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                let delay = self.settings.backoff(self.failures);
                self.retry_at = Some(Instant::now() + delay);
                self.last_error = e.to_string();
                tracing::warn!(address = %self.address, error = %e, retry_in_ms = delay.as_millis() as u64, "sender cannot connect");
                Err(e)
            }
        }
    }

    async fn start(&mut self, request: SendRequest) {
        if request.reply.is_closed() {
            return; // the caller gave up (timeout): do not send a stale copy
        }
        if self.link.is_none()
            && let Err(e) = self.connect().await
        {
            let _ = request.reply.send(Err(e));
            return;
        }
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let timeout = self.settings.send_timeout;
        match tokio::time::timeout(timeout, link.sender.send_batchable(request.message)).await {
            Ok(Ok(outcome)) => {
                self.next_seq += 1;
                let seq = self.next_seq;
                self.waiting.insert(seq, request.reply);
                self.outcomes.push(Box::pin(async move {
                    match tokio::time::timeout(timeout, outcome).await {
                        Ok(result) => (seq, Settled::Outcome(result)),
                        Err(_) => (seq, Settled::TimedOut),
                    }
                }));
            }
            Ok(Err(e)) => {
                let e = connection_error(&self.address, "send failed", e);
                let _ = request.reply.send(Err(e.clone_for_waiters()));
                self.reset(e);
            }
            Err(_) => {
                let _ = request.reply.send(Err(TransportError::Timeout {
                    topic: self.topic.clone(),
                }));
                self.reset(connection_error(
                    &self.address,
                    "no link credit",
                    format!("within {timeout:?}"),
                ));
            }
        }
    }

    fn finish(&mut self, seq: u64, settled: Settled) {
        let Some(reply) = self.waiting.remove(&seq) else {
            return;
        };
        let result = match settled {
            Settled::Outcome(Ok(Outcome::Accepted(_))) => Ok(()),
            Settled::Outcome(Ok(Outcome::Rejected(rejected))) => Err(TransportError::Rejected {
                topic: self.topic.clone(),
                reason: describe(rejected.error.as_ref()),
            }),
            Settled::Outcome(Ok(Outcome::Released(_))) => Err(TransportError::Connection(format!(
                "{}: the broker released the message",
                self.address
            ))),
            Settled::Outcome(Ok(Outcome::Modified(_))) => {
                let e = TransportError::Connection(format!(
                    "{}: the broker returned a modified outcome",
                    self.address
                ));
                let _ = reply.send(Err(e.clone_for_waiters()));
                self.reset(e);
                return;
            }
            Settled::Outcome(Err(e)) => {
                let e = connection_error(&self.address, "link lost", e);
                let _ = reply.send(Err(e.clone_for_waiters()));
                self.reset(e);
                return;
            }
            Settled::TimedOut => {
                let _ = reply.send(Err(TransportError::Timeout {
                    topic: self.topic.clone(),
                }));
                self.reset(TransportError::Timeout {
                    topic: self.topic.clone(),
                });
                return;
            }
        };
        let _ = reply.send(result);
    }

    /// Drops the link, its session and connection; every send waiting on them fails now.
    fn reset(&mut self, cause: TransportError) {
        if self.link.take().is_some() {
            tracing::warn!(address = %self.address, error = %cause, in_flight = self.waiting.len(), "sender link dropped; reconnecting on the next send");
        }
        self.outcomes = FuturesUnordered::new();
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(TransportError::Connection(format!(
                "{}: link dropped before the outcome arrived ({cause})",
                self.address
            ))));
        }
        self.last_error = cause.to_string();
    }
}

/// Resolves when the link's session or connection is gone (never when there is no link).
async fn closed(link: &mut Option<SenderLink>) -> String {
    match link {
        Some(link) => (&mut link.guard.closed)
            .await
            .unwrap_or_else(|_| "the connection watcher stopped".into()),
        None => std::future::pending().await,
    }
}

fn describe(error: Option<&definitions::Error>) -> String {
    match error {
        Some(e) => {
            let condition = match &e.condition {
                ErrorCondition::Custom(symbol) => symbol.0.clone(),
                other => format!("{other:?}"),
            };
            match &e.description {
                Some(d) => format!("{condition}: {d}"),
                None => condition,
            }
        }
        None => "rejected without an error".into(),
    }
}

impl TransportError {
    fn clone_for_waiters(&self) -> TransportError {
        match self {
            TransportError::Connection(m) => TransportError::Connection(m.clone()),
            TransportError::Rejected { topic, reason } => TransportError::Rejected {
                topic: topic.clone(),
                reason: reason.clone(),
            },
            TransportError::Timeout { topic } => TransportError::Timeout {
                topic: topic.clone(),
            },
            TransportError::Topology(m) => TransportError::Topology(m.clone()),
            TransportError::Closed => TransportError::Closed,
        }
    }
}

// ---- The transport ------------------------------------------------------------------------

/// The AMQP 1.0 transport. Cheap to share (`Arc`); dropping it closes every sender link.
pub struct AmqpTransport {
    settings: Arc<AmqpSettings>,
    senders: Mutex<HashMap<String, mpsc::Sender<SendRequest>>>,
}

impl AmqpTransport {
    pub fn new(settings: AmqpSettings) -> AmqpTransport {
        AmqpTransport {
            settings: Arc::new(settings),
            senders: Mutex::new(HashMap::new()),
        }
    }

    /// The transport `[transport]` describes; `service` names its connections.
    pub fn from_config(
        config: &TransportConfig,
        service: &str,
    ) -> Result<AmqpTransport, TransportError> {
        Ok(AmqpTransport::new(AmqpSettings::from_config(
            config, service,
        )?))
    }

    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// The broker address `topic` is sent to.
    pub fn topic_address(&self, topic: &str) -> String {
        self.settings.addresses.topic_address_of(topic)
    }

    /// The broker address `subscription` of `topic` is received from.
    pub fn subscription_address(&self, topic: &str, subscription: &str) -> String {
        self.settings
            .addresses
            .subscription_address_of(topic, subscription)
    }

    /// The queue of the sender task of `topic`, started on first use.
    fn sender(&self, topic: &str) -> mpsc::Sender<SendRequest> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = senders.get(topic)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let task = SenderTask {
            settings: self.settings.clone(),
            topic: topic.to_string(),
            address: self.topic_address(topic),
            link: None,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            next_seq: 0,
            waiting: HashMap::new(),
            outcomes: FuturesUnordered::new(),
        };
        tokio::spawn(task.run(rx));
        senders.insert(topic.to_string(), tx.clone());
        tx
    }

    /// Attaches to `address` as a receiver without credit (nothing is delivered) or as a
    /// sender, on a connection of its own, and detaches.
    async fn probe(&self, address: &str, as_receiver: bool) -> Result<(), String> {
        let mut connection = LinkConnection::open(&self.settings, address)
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
        match tokio::time::timeout(self.settings.send_timeout, attach).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer to the attach within {:?}",
                self.settings.send_timeout
            )),
        }
    }
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn publish(&self, topic: &str, envelope: &Envelope) -> Result<(), TransportError> {
        let message = wire::to_message(envelope);
        let (reply, outcome) = oneshot::channel();
        let timeout = self.settings.send_timeout;
        let queue = self.sender(topic);
        let wait = async {
            queue
                .send(SendRequest { message, reply })
                .await
                .map_err(|_| TransportError::Connection(format!("sender of {topic} stopped")))?;
            outcome
                .await
                .map_err(|_| TransportError::Connection(format!("sender of {topic} stopped")))?
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                topic: topic.to_string(),
            }),
        }
    }

    async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        prefetch: u32,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let address = self.subscription_address(topic, subscription);
        let mut connection = LinkConnection::open(&self.settings, &address).await?;
        let attach = Receiver::builder()
            .name(link_name("receive", &format!("{topic}.{subscription}")))
            .source(address.as_str())
            // Credit is granted by hand, a whole window at a time and only once the previous
            // window is used up (see `AmqpSubscription::receive`). fe2o3's automatic mode
            // renews credit while transfers are still on the wire, and RabbitMQ's next transfer
            // then counts as one more than allowed: the link fails with "The peer sent more
            // message transfers than currently allowed".
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut connection.session);
        let mut receiver = match tokio::time::timeout(self.settings.send_timeout, attach).await {
            Ok(Ok(receiver)) => receiver,
            Ok(Err(e)) => return Err(connection_error(&address, "attach failed", e)),
            Err(_) => return Err(connection_error(&address, "attach", "timed out")),
        };
        let window = prefetch.max(1);
        receiver
            .set_credit(window)
            .await
            .map_err(|e| connection_error(&address, "granting credit failed", e))?;
        Ok(Box::new(AmqpSubscription {
            receiver,
            guard: connection.watch(),
            address,
            unsettled: HashMap::new(),
            next_tag: 0,
            failed: None,
            window,
            credit_left: window,
        }))
    }

    async fn check_topology(
        &self,
        topics: &[String],
        subscriptions: &[(String, String)],
    ) -> Result<(), TransportError> {
        let mut probes = Vec::new();
        for topic in topics {
            let address = self.topic_address(topic);
            // RabbitMQ accepts a sender on a missing /amq/queue/… (and drops what is sent): a
            // receiver attach is what proves a queue exists.
            let as_receiver = address.starts_with("/amq/queue/");
            probes.push((format!("topic `{topic}`"), address, as_receiver));
        }
        for (topic, subscription) in subscriptions {
            let address = self.subscription_address(topic, subscription);
            probes.push((
                format!("subscription `{subscription}` of topic `{topic}`"),
                address,
                true,
            ));
        }
        let results = futures::future::join_all(
            probes
                .iter()
                .map(|(_, address, as_receiver)| self.probe(address, *as_receiver)),
        )
        .await;
        let missing: Vec<String> = probes
            .iter()
            .zip(results)
            .filter_map(|((what, address, _), result)| {
                result
                    .err()
                    .map(|e| format!("{what} at address `{address}`: {e}"))
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(TransportError::Topology(format!(
                "missing or unreachable on {}: {}",
                self.settings.url,
                missing.join("; ")
            )))
        }
    }
}

// ---- Receiving ----------------------------------------------------------------------------

struct AmqpSubscription {
    // Field order is drop order: the link goes before its session and connection.
    receiver: Receiver,
    guard: LinkGuard,
    address: String,
    unsettled: HashMap<u64, DeliveryInfo>,
    next_tag: u64,
    /// A receive error met after a delivery was already in hand: reported by the next call.
    failed: Option<TransportError>,
    /// Credit granted per window (the prefetch), and what is left of the current window.
    window: u32,
    credit_left: u32,
}

impl AmqpSubscription {
    fn admit(&mut self, delivery: fe2o3_amqp::link::delivery::Delivery<Body<Value>>) -> Delivery {
        let (info, message) = delivery.into_parts();
        self.next_tag += 1;
        let tag = self.next_tag;
        self.unsettled.insert(tag, info);
        Delivery {
            tag,
            message: wire::from_message(message),
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn receive(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let first = tokio::select! {
            delivery = self.receiver.recv::<Body<Value>>() => {
                delivery.map_err(|e| connection_error(&self.address, "receive failed", e))?
            }
            reason = &mut self.guard.closed => {
                let reason = reason.unwrap_or_else(|_| "the connection watcher stopped".into());
                return Err(connection_error(&self.address, "link lost", reason));
            }
        };
        let mut out = vec![self.admit(first)];
        // Whatever else has already arrived. For a single-frame delivery (auto-accept off) the
        // receiver's only await is its channel, so an unready `recv` is dropped before it took
        // a frame. An error after the first delivery is not swallowed: it is the answer of the
        // next call (once swallowed, a delivery that failed stayed unsettled on the link and
        // never came back while the link lived).
        while out.len() < max.max(1).min(self.credit_left as usize) {
            match self.receiver.recv::<Body<Value>>().now_or_never() {
                Some(Ok(delivery)) => out.push(self.admit(delivery)),
                Some(Err(e)) => {
                    self.failed = Some(connection_error(&self.address, "receive failed", e));
                    break;
                }
                None => break,
            }
        }
        self.credit_left = self.credit_left.saturating_sub(out.len() as u32);
        if self.credit_left == 0 {
            // The window is used up, so nothing is in flight: the new credit cannot overlap
            // transfers the broker already sent.
            self.receiver
                .set_credit(self.window)
                .await
                .map_err(|e| connection_error(&self.address, "granting credit failed", e))?;
            self.credit_left = self.window;
        }
        Ok(out)
    }

    async fn settle(&mut self, tag: u64, settlement: Settlement) -> Result<(), TransportError> {
        let Some(info) = self.unsettled.remove(&tag) else {
            return Ok(()); // settling twice is harmless
        };
        let result = match settlement {
            Settlement::Accept => self.receiver.accept(info).await,
            Settlement::Reject(reason) => {
                let error = definitions::Error::new(
                    ErrorCondition::Custom(Symbol::from(REJECT_CONDITION)),
                    Some(reason),
                    None,
                );
                self.receiver.reject(info, error).await
            }
            Settlement::Release => self.receiver.release(info).await,
        };
        result.map_err(|e| connection_error(&self.address, "settle failed", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AmqpFlavour, Config};
    use std::path::Path;

    fn transport_config(toml: &str) -> TransportConfig {
        Config::parse(toml, Path::new("test.toml"))
            .unwrap()
            .transport
    }

    #[test]
    fn rabbitmq_addresses_by_default() {
        let c = transport_config("[transport]\nkind = \"amqp\"\n");
        assert_eq!(c.amqp.flavour, AmqpFlavour::RabbitMq);
        let t = AmqpTransport::from_config(&c, "svc").unwrap();
        assert_eq!(t.topic_address("orders"), "/exchange/orders");
        assert_eq!(
            t.subscription_address("orders", "inventory"),
            "/amq/queue/orders.inventory"
        );
        assert_eq!(t.settings().url, "amqp://127.0.0.1:5672");
        assert!(matches!(
            &t.settings().sasl,
            SaslProfile::Plain { username, password } if username == "guest" && password == "guest"
        ));
        assert!(t.settings().cbs.is_none());
    }

    #[test]
    fn service_bus_addresses_tls_and_cbs() {
        let c = transport_config(
            "[transport]\nkind = \"amqp\"\n[transport.amqp]\nflavour = \"servicebus\"\nauth = \"cbs\"\nconnection_string = \"Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0\"\n",
        );
        let t = AmqpTransport::from_config(&c, "svc").unwrap();
        assert_eq!(t.topic_address("orders"), "orders");
        assert_eq!(
            t.subscription_address("orders", "inventory"),
            "orders/Subscriptions/inventory"
        );
        assert_eq!(
            t.settings().url,
            "amqps://contoso.servicebus.windows.net:5671"
        );
        assert!(matches!(t.settings().sasl, SaslProfile::Anonymous));
        let cbs = t.settings().cbs.as_ref().unwrap();
        assert_eq!(cbs.token_ttl, Duration::from_secs(3600));
        assert_eq!(cbs.renew_after(), Duration::from_secs(3300));
        assert!(!format!("{:?}", t.settings()).contains("c2VjcmV0"));
    }

    #[test]
    fn service_bus_with_sasl_plain() {
        let c = transport_config(
            "[transport]\nkind = \"amqp\"\n[transport.amqp]\nflavour = \"servicebus\"\nconnection_string = \"Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0\"\n",
        );
        let t = AmqpTransport::from_config(&c, "svc").unwrap();
        assert!(matches!(
            &t.settings().sasl,
            SaslProfile::Plain { username, password } if username == "k" && password == "c2VjcmV0"
        ));
        assert!(t.settings().cbs.is_none());
    }

    #[test]
    fn templates_and_overrides() {
        let c = transport_config(
            "[transport]\nkind = \"amqp\"\n[transport.amqp]\ntopic_address = \"/exchange/{topic}.v2\"\nsubscription_address = \"/amq/queue/{subscription}@{topic}\"\naddresses = { \"payments\" = \"/exchange/pay\", \"orders/audit\" = \"/amq/queue/audit\" }\n",
        );
        let t = AmqpTransport::from_config(&c, "svc").unwrap();
        assert_eq!(t.topic_address("orders"), "/exchange/orders.v2");
        assert_eq!(t.topic_address("payments"), "/exchange/pay");
        assert_eq!(
            t.subscription_address("orders", "inv"),
            "/amq/queue/inv@orders"
        );
        assert_eq!(
            t.subscription_address("orders", "audit"),
            "/amq/queue/audit"
        );
    }

    #[test]
    fn credentials_are_split_and_decoded() {
        assert_eq!(
            split_credentials("amqps://user%40x:p%3Ass@host:5671/vhost"),
            (
                "amqps://host:5671/vhost".to_string(),
                Some(("user@x".to_string(), "p:ss".to_string()))
            )
        );
        assert_eq!(
            split_credentials("amqp://host:5672"),
            ("amqp://host:5672".to_string(), None)
        );
    }

    #[test]
    fn reconnect_backoff_is_capped() {
        let c = transport_config(
            "[transport]\nkind = \"amqp\"\n[transport.amqp]\nreconnect_backoff_base_ms = 100\nreconnect_backoff_max_ms = 1000\n",
        );
        let s = AmqpSettings::from_config(&c, "svc").unwrap();
        let delays: Vec<u64> = (1..=6).map(|n| s.backoff(n).as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(s.backoff(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn rejections_are_described() {
        let e = definitions::Error::new(
            ErrorCondition::Custom(Symbol::from("x:y")),
            Some("too big".to_string()),
            None,
        );
        assert_eq!(describe(Some(&e)), "x:y: too big");
        assert_eq!(describe(None), "rejected without an error");
    }
}
