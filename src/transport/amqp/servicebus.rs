//! Azure Service Bus specifics: SAS tokens, CBS put-token with renewal, and sessions.
//!
//! Owns the SAS token format Service Bus checks, the SASL credentials of a Service Bus
//! connection, and the claims-based-security exchange: a connection opened with SASL ANONYMOUS
//! puts a token for its entity on `$cbs`, then renews it before it expires for as long as the
//! connection lives. It must not know about envelopes or links: the transport asks it for
//! credentials and an authorized connection. The connection string itself is a configuration
//! value, parsed by [`crate::config::ConnectionString`].
//!
//! Sessions (`transport.amqp.sessions`): a session-enabled subscription delivers the messages of
//! one session (the AMQP `group-id`, whizbang's stream id) to one receiver at a time, in order.
//! A receiver attaches with the source filter `com.microsoft:session-filter` (a described value,
//! descriptor `0x00000013:0x7000000C`; null asks for the next available session), reads the
//! session it was given from the filter of the attach the service answers with, and keeps the
//! session locked by `com.microsoft:renew-session-lock` requests to the entity's `$management`
//! node (application property `operation`, body map `session-id`; the answer has
//! `statusCode` 200 and the new `expiration`).
//!
//! The service is unreachable from development machines; the pure parts are unit-tested here
//! against vectors computed independently (python3's `hmac`, `hashlib`, `base64`, `urllib`).

use crate::config::{AmqpAuth as Auth, ConnectionString};
use crate::transport::TransportError;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::Session;
use fe2o3_amqp::types::definitions::Fields;
use fe2o3_amqp::types::messaging::{ApplicationProperties, FilterSet, Message, Source};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Value};
use fe2o3_amqp::types::primitives::{Symbol, Timestamp};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use secrecy::ExposeSecret;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use sha2::Sha256;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// The token type Service Bus expects for SAS tokens put on `$cbs`.
pub const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// Everything but `A-Z a-z 0-9 - . _ ~` is percent-encoded (RFC 3986 unreserved), as .NET's
/// `WebUtility.UrlEncode` and python's `urllib.parse.quote(s, safe='')` do for these inputs.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn url_encode(s: &str) -> String {
    utf8_percent_encode(s, URL_COMPONENT).to_string()
}

/// A Service Bus SAS token for `resource_uri`, valid until `expiry_unix` (seconds):
/// `SharedAccessSignature sr=<enc uri>&sig=<enc base64 HMAC-SHA256(key, enc uri + "\n" +
/// expiry)>&se=<expiry>&skn=<key name>`. The key is used as its UTF-8 bytes, as Azure does.
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry_unix: u64) -> String {
    let encoded_uri = url_encode(resource_uri);
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC-SHA256 accepts keys of any length");
    mac.update(format!("{encoded_uri}\n{expiry_unix}").as_bytes());
    use base64::Engine as _;
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={encoded_uri}&sig={}&se={expiry_unix}&skn={key_name}",
        url_encode(&signature)
    )
}

/// The source filter that asks Service Bus for a session.
pub const SESSION_FILTER: &str = "com.microsoft:session-filter";
/// The descriptor code of [`SESSION_FILTER`]'s value (`0x00000013:0x7000000C`).
pub const SESSION_FILTER_CODE: u64 = 0x0000_0013_7000_000C;
/// The management operation that extends a session's lock.
pub const RENEW_SESSION_LOCK: &str = "com.microsoft:renew-session-lock";
/// Link property (and request application property): how long, in milliseconds, the service
/// may wait before answering (for an accept-next: for a session to become available).
pub const SERVER_TIMEOUT: &str = "com.microsoft:timeout";
/// Request application property: how long the management operation may take, in milliseconds.
pub const REQUEST_SERVER_TIMEOUT: &str = "com.microsoft:server-timeout";

/// The source filter of a session receiver: `session_id`, or the next available session when
/// `None` (a described null).
pub fn session_filter(session_id: Option<&str>) -> FilterSet {
    let value = match session_id {
        Some(id) => Value::String(id.to_string()),
        None => Value::Null,
    };
    let mut filter = FilterSet::new();
    filter.insert(
        Symbol::from(SESSION_FILTER),
        Value::Described(Box::new(Described {
            descriptor: Descriptor::Code(SESSION_FILTER_CODE),
            value,
        })),
    );
    filter
}

/// The link properties of an accept-next attach: the service waits up to `wait` for a
/// session before it answers without one.
pub fn session_link_properties(wait: Duration) -> Fields {
    let mut fields = Fields::new();
    fields.insert(
        Symbol::from(SERVER_TIMEOUT),
        Value::Uint(wait.as_millis().min(u32::MAX as u128) as u32),
    );
    fields
}

/// The session a receiver was given: the session filter of the source the service attached
/// with (described or, from older peers, bare). `None` when it gave none (no session was
/// available within the wait).
pub fn accepted_session_id(source: Option<&Source>) -> Option<String> {
    let value = source?
        .filter
        .as_ref()?
        .get(&Symbol::from(SESSION_FILTER))?;
    let inner = match value {
        Value::Described(described) => &described.value,
        other => other,
    };
    match inner {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        _ => None,
    }
}

/// The management node of an entity (`orders/Subscriptions/inventory/$management`).
pub fn management_address(entity_address: &str) -> String {
    format!("{}/$management", entity_address.trim_end_matches('/'))
}

/// `com.microsoft:renew-session-lock`: extends the lock of `session_id` by the entity's lock
/// duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewSessionLock {
    /// The session whose lock is renewed.
    pub session_id: String,
    /// How long the service may take to answer, in milliseconds.
    pub server_timeout_ms: u32,
}

impl Request for RenewSessionLock {
    const OPERATION: &'static str = RENEW_SESSION_LOCK;
    type Response = SessionLockRenewed;
    type Body = Value;

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        Some(
            ApplicationProperties::builder()
                .insert(
                    REQUEST_SERVER_TIMEOUT,
                    SimpleValue::Uint(self.server_timeout_ms),
                )
                .build(),
        )
    }

    fn encode_body(self) -> Value {
        let mut body = OrderedMap::new();
        body.insert(
            Value::String("session-id".into()),
            Value::String(self.session_id),
        );
        Value::Map(body)
    }
}

/// The answer to [`RenewSessionLock`]: status 200 and the lock's new expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLockRenewed {
    /// When the lock now expires (milliseconds since the Unix epoch), when the service said.
    pub expiration_ms: Option<i64>,
}

impl Response for SessionLockRenewed {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = fe2o3_amqp_management::error::Error;

    fn decode_message(message: Message<Value>) -> Result<Self, Self::Error> {
        let expiration_ms = match &message.body {
            Value::Map(map) => match map.get(&Value::String("expiration".into())) {
                Some(Value::Timestamp(t)) => Some(t.milliseconds()),
                _ => None,
            },
            _ => None,
        };
        Ok(SessionLockRenewed { expiration_ms })
    }
}

/// How CBS tokens are made and when they are renewed.
#[derive(Clone)]
pub struct CbsSettings {
    /// The namespace, policy name and key the tokens are signed with.
    pub connection: ConnectionString,
    /// Lifetime of each token.
    pub token_ttl: Duration,
    /// A token is replaced this long before it expires.
    pub renew_before: Duration,
}

impl fmt::Debug for CbsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CbsSettings")
            .field("connection", &self.connection)
            .field("token_ttl", &self.token_ttl)
            .field("renew_before", &self.renew_before)
            .finish()
    }
}

impl CbsSettings {
    /// The token for `audience` issued at `now_unix`, and its expiry (unix seconds).
    pub fn token_at(&self, audience: &str, now_unix: u64) -> (String, u64) {
        let expiry = now_unix + self.token_ttl.as_secs().max(1);
        let token = sas_token(
            audience,
            &self.connection.key_name,
            self.connection.key.expose_secret(),
            expiry,
        );
        (token, expiry)
    }

    /// How long after issuing a token the next one is put: `ttl - renew_before`, at least 1 s
    /// (the configuration guarantees `renew_before < ttl`).
    pub fn renew_after(&self) -> Duration {
        self.token_ttl
            .saturating_sub(self.renew_before)
            .max(Duration::from_secs(1))
    }
}

/// SASL credentials of a Service Bus connection: PLAIN with the key name and key, or ANONYMOUS
/// when the link will be authorized by CBS.
pub fn sasl_for(
    auth: Auth,
    connection: &ConnectionString,
) -> fe2o3_amqp::sasl_profile::SaslProfile {
    use fe2o3_amqp::sasl_profile::SaslProfile;
    match auth {
        Auth::Plain => SaslProfile::Plain {
            username: connection.key_name.clone(),
            // The SASL frame needs it as text: it goes to the broker and nowhere else.
            password: connection.key.expose_secret().to_string(),
        },
        Auth::Anonymous | Auth::Cbs => SaslProfile::Anonymous,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Puts a token for `audience` on the connection's `$cbs` node (on a session of its own, so a
/// CBS failure cannot end a link's session), then keeps renewing it in a task until the task is
/// aborted (when the connection is dropped).
pub async fn authorize(
    connection: &mut ConnectionHandle<()>,
    settings: &CbsSettings,
    audience: String,
) -> Result<JoinHandle<()>, TransportError> {
    let failed = |what: &str, e: &dyn fmt::Display| {
        TransportError::Connection(format!("CBS {what} for {audience}: {e}"))
    };
    let mut session = Session::begin(connection)
        .await
        .map_err(|e| failed("session", &e))?;
    let mut client = CbsClient::attach(&mut session)
        .await
        .map_err(|e| failed("attach to $cbs", &e))?;
    put_token(&mut client, settings, &audience)
        .await
        .map_err(|e| failed("put-token", &e))?;
    let settings = settings.clone();
    Ok(tokio::spawn(async move {
        // The session lives (and with it the $cbs link) for as long as this task.
        let _session = session;
        let mut wait = settings.renew_after();
        loop {
            tokio::time::sleep(wait).await;
            match put_token(&mut client, &settings, &audience).await {
                Ok(()) => {
                    tracing::debug!(%audience, "CBS token renewed");
                    wait = settings.renew_after();
                }
                Err(e) => {
                    // The link fails when the old token expires, and is then rebuilt.
                    tracing::warn!(%audience, error = %e, "CBS token renewal failed; retrying");
                    wait = Duration::from_secs(5).min(settings.renew_after());
                }
            }
        }
    }))
}

async fn put_token(
    client: &mut CbsClient,
    settings: &CbsSettings,
    audience: &str,
) -> Result<(), String> {
    let (token, expiry) = settings.token_at(audience, unix_now());
    let expires_at = Timestamp::from_milliseconds((expiry as i64).saturating_mul(1000));
    client
        .put_token(
            audience.to_string(),
            CbsToken::new(token, SAS_TOKEN_TYPE, expires_at),
        )
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhpcy1pcy1ub3QtYS1yZWFsLWtleS0xMjM0NTY3OD0=";

    fn portal_string() -> String {
        format!(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY}"
        )
    }

    /// The expected string was computed independently with python3:
    /// `enc = urllib.parse.quote(uri, safe='')`,
    /// `sig = base64.b64encode(hmac.new(key.encode(), (enc + "\n" + str(expiry)).encode(),
    /// hashlib.sha256).digest())`, then `quote(sig, safe='')`.
    #[test]
    fn sas_token_matches_an_independent_vector() {
        let token = sas_token(
            "amqp://contoso.servicebus.windows.net/orders",
            "RootManageSharedAccessKey",
            KEY,
            1_700_000_000,
        );
        assert_eq!(
            token,
            "SharedAccessSignature sr=amqp%3A%2F%2Fcontoso.servicebus.windows.net%2Forders&sig=bb1sZgvxyIzHLYZow8jiw4d%2FybEXiIkegUUZPBceonY%3D&se=1700000000&skn=RootManageSharedAccessKey"
        );
    }

    #[test]
    fn tokens_expire_after_their_ttl_and_are_renewed_before() {
        let settings = CbsSettings {
            connection: ConnectionString::parse(&portal_string()).unwrap(),
            token_ttl: Duration::from_secs(3600),
            renew_before: Duration::from_secs(300),
        };
        let (token, expiry) = settings.token_at(
            "amqp://contoso.servicebus.windows.net/orders",
            1_699_996_400,
        );
        assert_eq!(expiry, 1_700_000_000);
        assert_eq!(
            token,
            sas_token(
                "amqp://contoso.servicebus.windows.net/orders",
                "RootManageSharedAccessKey",
                KEY,
                1_700_000_000
            )
        );
        assert_eq!(settings.renew_after(), Duration::from_secs(3300));
        assert!(settings.renew_after() < settings.token_ttl);
    }

    fn described(value: &Value) -> (&Descriptor, &Value) {
        match value {
            Value::Described(d) => (&d.descriptor, &d.value),
            other => panic!("a described value expected, got {other:?}"),
        }
    }

    #[test]
    fn session_filter_asks_for_a_session_or_the_next_available_one() {
        let key = Symbol::from("com.microsoft:session-filter");
        let next = session_filter(None);
        assert_eq!(next.len(), 1);
        let (descriptor, value) = described(next.get(&key).unwrap());
        assert_eq!(descriptor, &Descriptor::Code(0x0000_0013_7000_000C));
        assert_eq!(value, &Value::Null);

        let named = session_filter(Some("order-42"));
        let (descriptor, value) = described(named.get(&key).unwrap());
        assert_eq!(descriptor, &Descriptor::Code(SESSION_FILTER_CODE));
        assert_eq!(value, &Value::String("order-42".into()));

        // On the wire: described(ulong 0x000000137000000C, str8 "order-42").
        let bytes = serde_amqp::to_vec(named.get(&key).unwrap()).unwrap();
        assert_eq!(
            &bytes[..10],
            &[0x00, 0x80, 0x00, 0x00, 0x00, 0x13, 0x70, 0x00, 0x00, 0x0c]
        );
        assert_eq!(&bytes[10..12], &[0xa1, 8]);
        assert_eq!(&bytes[12..], b"order-42");
        let bytes = serde_amqp::to_vec(next.get(&key).unwrap()).unwrap();
        assert_eq!(bytes.last(), Some(&0x40), "null value");
    }

    #[test]
    fn the_accepted_session_is_read_from_the_attach_answer() {
        let source = |filter: Option<FilterSet>| {
            let mut s = Source::builder()
                .address("orders/Subscriptions/inventory")
                .build();
            s.filter = filter;
            s
        };
        assert_eq!(
            accepted_session_id(Some(&source(Some(session_filter(Some("order-7")))))),
            Some("order-7".into())
        );
        // Some peers echo the value without its descriptor.
        let mut bare = FilterSet::new();
        bare.insert(
            Symbol::from(SESSION_FILTER),
            Value::String("order-8".into()),
        );
        assert_eq!(
            accepted_session_id(Some(&source(Some(bare)))),
            Some("order-8".into())
        );
        // No session available: the filter comes back null, or not at all.
        assert_eq!(
            accepted_session_id(Some(&source(Some(session_filter(None))))),
            None
        );
        assert_eq!(accepted_session_id(Some(&source(None))), None);
        assert_eq!(accepted_session_id(None), None);
    }

    #[test]
    fn accept_next_waits_as_long_as_the_link_property_says() {
        let p = session_link_properties(Duration::from_secs(5));
        assert_eq!(
            p.get(&Symbol::from("com.microsoft:timeout")),
            Some(&Value::Uint(5_000))
        );
    }

    #[test]
    fn session_locks_are_renewed_on_the_entitys_management_node() {
        assert_eq!(
            management_address("orders/Subscriptions/inventory"),
            "orders/Subscriptions/inventory/$management"
        );
        let message = RenewSessionLock {
            session_id: "order-42".into(),
            server_timeout_ms: 10_000,
        }
        .into_message();
        let app = message.application_properties.as_ref().unwrap();
        assert_eq!(
            app.get("operation"),
            Some(&SimpleValue::String(
                "com.microsoft:renew-session-lock".into()
            ))
        );
        assert_eq!(
            app.get("com.microsoft:server-timeout"),
            Some(&SimpleValue::Uint(10_000))
        );
        let Value::Map(body) = &message.body else {
            panic!("an amqp-value map body expected, got {:?}", message.body);
        };
        assert_eq!(
            body.get(&Value::String("session-id".into())),
            Some(&Value::String("order-42".into()))
        );
        assert_eq!(body.len(), 1);
    }

    #[test]
    fn a_renewal_answer_gives_the_new_expiry_or_its_status() {
        let answer = |status: i32, body: Value| {
            Message::builder()
                .application_properties(
                    ApplicationProperties::builder()
                        .insert("statusCode", SimpleValue::Int(status))
                        .insert("statusDescription", "because")
                        .build(),
                )
                .body(body)
                .build()
        };
        let mut ok = OrderedMap::new();
        ok.insert(
            Value::String("expiration".into()),
            Value::Timestamp(Timestamp::from_milliseconds(1_700_000_060_000)),
        );
        let renewed = SessionLockRenewed::from_message(answer(200, Value::Map(ok))).unwrap();
        assert_eq!(renewed.expiration_ms, Some(1_700_000_060_000));
        let lost = SessionLockRenewed::from_message(answer(410, Value::Null)).unwrap_err();
        assert!(format!("{lost:?}").contains("410"), "{lost:?}");
    }

    #[test]
    fn sasl_profile_follows_the_auth_mode() {
        use fe2o3_amqp::sasl_profile::SaslProfile;
        let c = ConnectionString::parse(&portal_string()).unwrap();
        match sasl_for(Auth::Plain, &c) {
            SaslProfile::Plain { username, password } => {
                assert_eq!(username, "RootManageSharedAccessKey");
                assert_eq!(password, KEY);
            }
            _ => panic!("PLAIN expected"),
        }
        assert!(matches!(sasl_for(Auth::Cbs, &c), SaslProfile::Anonymous));
    }
}
