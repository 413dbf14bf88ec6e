//! The transport's settings: `[transport]` and `[transport.amqp]` resolved into what a
//! connection needs.
//!
//! Owns the endpoint (connection string or `amqp_url`, credentials split off the URL), the SASL
//! profile, CBS, the extra TLS CA, the timeouts and the reconnect backoff. It reads the
//! configuration types of [`crate::config`] and must not define any of its own: keys, defaults
//! and their validation live there. It must not open connections (that is [`super::links`]) nor
//! print a secret: `Debug` masks the password.

use super::servicebus::{self, CbsSettings};
use crate::config::{AmqpAuth as Auth, AmqpConfig, ConnectionString, TransportConfig};
use crate::retry::Backoff;
use crate::transport::TransportError;
use fe2o3_amqp::sasl_profile::SaslProfile;
use secrecy::ExposeSecret;
use std::fmt;
use std::time::Duration;

/// Everything the transport needs to reach the broker, resolved from the configuration.
#[derive(Clone)]
pub struct AmqpSettings {
    /// Where to connect, without credentials (`amqp://host:5672`, `amqps://host:5671`).
    pub url: String,
    /// How the connection authenticates (PLAIN with the URL's credentials, ANONYMOUS, …).
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
    /// First wait before reconnecting after a failure.
    pub backoff_base: Duration,
    /// Longest wait between reconnection attempts.
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
        let (url, sasl, cbs) = if amqp.connection_string.expose_secret().is_empty() {
            let (url, user) = split_credentials(config.amqp_url.expose_secret());
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
            let cs =
                ConnectionString::parse(amqp.connection_string.expose_secret()).map_err(|e| {
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

    /// The reconnect policy: the runtime's capped exponential backoff with full jitter, from
    /// `reconnect_backoff_base_ms` up to `reconnect_backoff_max_ms`.
    pub(crate) fn reconnect_backoff(&self) -> Backoff {
        Backoff::new(self.backoff_base, self.backoff_max)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AmqpFlavour, Config};
    use crate::transport::amqp::AmqpTransport;
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
        let b = s.reconnect_backoff();
        let ceilings: Vec<u64> = (1..=6).map(|n| b.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(1000));
    }
}
