//! Azure Service Bus specifics: SAS tokens, and CBS put-token with renewal.
//!
//! Owns the SAS token format Service Bus checks, the SASL credentials of a Service Bus
//! connection, and the claims-based-security exchange: a connection opened with SASL ANONYMOUS
//! puts a token for its entity on `$cbs`, then renews it before it expires for as long as the
//! connection lives. It must not know about envelopes or links: the transport asks it for
//! credentials and an authorized connection. The connection string itself is a configuration
//! value, parsed by [`crate::config::ConnectionString`].
//!
//! The service is unreachable from development machines; the pure parts are unit-tested here
//! against vectors computed independently (python3's `hmac`, `hashlib`, `base64`, `urllib`).

use crate::config::{AmqpAuth as Auth, ConnectionString};
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
