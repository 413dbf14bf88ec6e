//! Azure Service Bus specifics: connection strings, SAS tokens, and CBS put-token with renewal.
//!
//! Owns the parsing of `Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=…;
//! SharedAccessKey=…[;EntityPath=…]` into typed parts (with typed errors that never echo the
//! key), the SAS token format Service Bus checks, and the claims-based-security exchange: a
//! connection opened with SASL ANONYMOUS puts a token for its entity on `$cbs`, then renews it
//! before it expires for as long as the connection lives. It must not know about envelopes or
//! links: the transport asks it for a URL, credentials and an authorized connection.
//!
//! The service is unreachable from development machines; the pure parts are unit-tested here
//! against vectors computed independently (python3's `hmac`, `hashlib`, `base64`, `urllib`).

use crate::config::AmqpAuth as Auth;
use crate::transport::TransportError;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::session::Session;
use fe2o3_amqp::types::primitives::Timestamp;
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use sha2::Sha256;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// The token type Service Bus expects for SAS tokens put on `$cbs`.
pub const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// A parsed Service Bus connection string. `Debug` masks the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The namespace host, e.g. `contoso.servicebus.windows.net` (with `:port` if one was given).
    pub host: String,
    pub key_name: String,
    pub key: String,
    /// Present in connection strings scoped to one entity.
    pub entity_path: Option<String>,
    /// `UseDevelopmentEmulator=true`: plain AMQP on port 5672, no TLS.
    pub use_development_emulator: bool,
}

/// Why a connection string was refused. No variant carries the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("the connection string is empty")]
    Empty,
    #[error("part {index} of the connection string is not KEY=VALUE")]
    MalformedPart { index: usize },
    #[error("the connection string has no {0}")]
    Missing(&'static str),
    #[error("the connection string names `{0}` twice")]
    Duplicate(String),
    #[error("unknown connection string key `{0}`")]
    UnknownKey(String),
    #[error("Endpoint `{0}` is not of the form sb://NAMESPACE.servicebus.windows.net/")]
    BadEndpoint(String),
    #[error("UseDevelopmentEmulator must be true or false, got `{0}`")]
    BadEmulatorFlag(String),
}

impl ConnectionString {
    /// Parses `Endpoint=sb://…/;SharedAccessKeyName=…;SharedAccessKey=…[;EntityPath=…]`. Keys
    /// are matched case-insensitively (as the Azure SDKs do); empty parts (a trailing `;`) are
    /// ignored; unknown keys are refused so that a typo does not go unnoticed.
    pub fn parse(text: &str) -> Result<ConnectionString, ConnectionStringError> {
        if text.trim().is_empty() {
            return Err(ConnectionStringError::Empty);
        }
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut entity_path = None;
        let mut emulator = None;
        for (index, part) in text.split(';').enumerate() {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            // The key may contain '=' (base64 padding): split at the first one only.
            let Some((name, value)) = part.split_once('=') else {
                return Err(ConnectionStringError::MalformedPart { index });
            };
            let name = name.trim();
            let value = value.trim().to_string();
            let slot = match name.to_ascii_lowercase().as_str() {
                "endpoint" => &mut endpoint,
                "sharedaccesskeyname" => &mut key_name,
                "sharedaccesskey" => &mut key,
                "entitypath" => &mut entity_path,
                "usedevelopmentemulator" => &mut emulator,
                // Only a plausible key name is echoed: a pasted key (letters, digits, '+',
                // '/', '=') without its name must not end up in an error message.
                _ if name.chars().all(|c| c.is_ascii_alphabetic()) => {
                    return Err(ConnectionStringError::UnknownKey(name.to_string()));
                }
                _ => return Err(ConnectionStringError::MalformedPart { index }),
            };
            if slot.replace(value).is_some() {
                return Err(ConnectionStringError::Duplicate(name.to_string()));
            }
        }
        let endpoint = endpoint
            .filter(|e| !e.is_empty())
            .ok_or(ConnectionStringError::Missing("Endpoint"))?;
        let host = parse_endpoint(&endpoint)?;
        let key_name = key_name
            .filter(|k| !k.is_empty())
            .ok_or(ConnectionStringError::Missing("SharedAccessKeyName"))?;
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or(ConnectionStringError::Missing("SharedAccessKey"))?;
        let use_development_emulator = match emulator.as_deref().map(str::to_ascii_lowercase) {
            None => false,
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            Some(_) => {
                return Err(ConnectionStringError::BadEmulatorFlag(
                    emulator.unwrap_or_default(),
                ));
            }
        };
        Ok(ConnectionString {
            host,
            key_name,
            key,
            entity_path: entity_path.filter(|p| !p.is_empty()),
            use_development_emulator,
        })
    }

    /// Where to connect: `amqps://HOST:5671` (TLS first), or `amqp://HOST:5672` for the emulator.
    pub fn amqp_url(&self) -> String {
        let has_port = self.host.contains(':');
        match (self.use_development_emulator, has_port) {
            (true, true) => format!("amqp://{}", self.host),
            (true, false) => format!("amqp://{}:5672", self.host),
            (false, true) => format!("amqps://{}", self.host),
            (false, false) => format!("amqps://{}:5671", self.host),
        }
    }

    /// The CBS audience (the token's resource URI) of one entity address, e.g.
    /// `amqp://contoso.servicebus.windows.net/orders/Subscriptions/inventory`.
    pub fn audience(&self, address: &str) -> String {
        let host = self.host.split(':').next().unwrap_or(&self.host);
        format!("amqp://{host}/{}", address.trim_start_matches('/'))
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host", &self.host)
            .field("key_name", &self.key_name)
            .field("key", &"***")
            .field("entity_path", &self.entity_path)
            .field("use_development_emulator", &self.use_development_emulator)
            .finish()
    }
}

fn parse_endpoint(endpoint: &str) -> Result<String, ConnectionStringError> {
    let bad = || ConnectionStringError::BadEndpoint(endpoint.to_string());
    let lower = endpoint.to_ascii_lowercase();
    let rest = ["sb://", "amqps://", "amqp://"]
        .iter()
        .find_map(|scheme| lower.starts_with(scheme).then(|| &endpoint[scheme.len()..]))
        .ok_or_else(bad)?;
    let host = rest.trim_end_matches('/');
    let valid = !host.is_empty()
        && !host.contains('/')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if valid {
        Ok(host.to_string())
    } else {
        Err(bad())
    }
}

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

/// How CBS tokens are made and when they are renewed.
#[derive(Clone)]
pub struct CbsSettings {
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
            &self.connection.key,
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
            password: connection.key.clone(),
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

    #[test]
    fn parses_a_portal_connection_string() {
        let c = ConnectionString::parse(&portal_string()).unwrap();
        assert_eq!(c.host, "contoso.servicebus.windows.net");
        assert_eq!(c.key_name, "RootManageSharedAccessKey");
        assert_eq!(c.key, KEY, "the '=' padding of the key is kept");
        assert_eq!(c.entity_path, None);
        assert!(!c.use_development_emulator);
        assert_eq!(c.amqp_url(), "amqps://contoso.servicebus.windows.net:5671");
        assert_eq!(
            c.audience("orders/Subscriptions/inventory"),
            "amqp://contoso.servicebus.windows.net/orders/Subscriptions/inventory"
        );
    }

    #[test]
    fn parses_entity_path_case_insensitive_keys_and_trailing_separator() {
        let c = ConnectionString::parse(&format!(
            " endpoint=SB://contoso.servicebus.windows.net ; sharedaccesskeyname=send ;SHAREDACCESSKEY={KEY};EntityPath=orders;"
        ))
        .unwrap();
        assert_eq!(c.host, "contoso.servicebus.windows.net");
        assert_eq!(c.key_name, "send");
        assert_eq!(c.entity_path.as_deref(), Some("orders"));
    }

    #[test]
    fn emulator_connects_without_tls() {
        let c = ConnectionString::parse(&format!(
            "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
        ))
        .unwrap();
        assert!(c.use_development_emulator);
        assert_eq!(c.amqp_url(), "amqp://localhost:5672");
    }

    #[test]
    fn refuses_bad_connection_strings_with_typed_errors() {
        use ConnectionStringError::*;
        let cases: Vec<(String, ConnectionStringError)> = vec![
            ("  ".into(), Empty),
            (
                format!("SharedAccessKeyName=k;SharedAccessKey={KEY}"),
                Missing("Endpoint"),
            ),
            (
                format!("Endpoint=sb://x.servicebus.windows.net/;SharedAccessKey={KEY}"),
                Missing("SharedAccessKeyName"),
            ),
            (
                "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=k".into(),
                Missing("SharedAccessKey"),
            ),
            (
                "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey="
                    .into(),
                Missing("SharedAccessKey"),
            ),
            (
                format!(
                    "Endpoint=https://x.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey={KEY}"
                ),
                BadEndpoint("https://x.servicebus.windows.net/".into()),
            ),
            (
                format!(
                    "Endpoint=sb://x.servicebus.windows.net/orders;SharedAccessKeyName=k;SharedAccessKey={KEY}"
                ),
                BadEndpoint("sb://x.servicebus.windows.net/orders".into()),
            ),
            (
                format!("Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccesKey={KEY}"),
                UnknownKey("SharedAccesKey".into()),
            ),
            (
                format!(
                    "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKeyName=j;SharedAccessKey={KEY}"
                ),
                Duplicate("SharedAccessKeyName".into()),
            ),
            (
                format!("Endpoint=sb://x/;SharedAccessKeyName=k;{KEY}"),
                MalformedPart { index: 2 },
            ),
            (
                format!(
                    "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey={KEY};UseDevelopmentEmulator=yes"
                ),
                BadEmulatorFlag("yes".into()),
            ),
        ];
        for (text, expected) in cases {
            let err = ConnectionString::parse(&text).unwrap_err();
            assert_eq!(err, expected, "{text}");
            assert!(!err.to_string().contains(KEY), "the key leaked: {err}");
        }
    }

    #[test]
    fn debug_masks_the_key() {
        let c = ConnectionString::parse(&portal_string()).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains(KEY), "{shown}");
        assert!(shown.contains("RootManageSharedAccessKey"));
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
