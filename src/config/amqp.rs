//! `[transport.amqp]`: the AMQP 1.0 broker — flavour, addresses, authentication, TLS,
//! reconnects and CBS tokens.
//!
//! Owns these keys, their defaults and checks, and the address map (templates per flavour,
//! overrides per name) that turns topic and subscription names into broker addresses. The
//! transport (`crate::transport::amqp`) reads this section; nothing here may depend on the
//! transport. Its `Debug` never shows the connection string's key.

use super::{Checked, ConnectionString, ensure, redact};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Which AMQP 1.0 broker the address templates default to (`transport.amqp.flavour`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmqpFlavour {
    /// RabbitMQ 3.x with the `rabbitmq_amqp1_0` plugin: topics are topic exchanges
    /// (`/exchange/{topic}`), subscriptions pre-declared queues bound with `#`
    /// (`/amq/queue/{topic}.{subscription}`).
    RabbitMq,
    /// Azure Service Bus: topics `{topic}`, subscriptions `{topic}/Subscriptions/{subscription}`.
    ServiceBus,
}

/// How an AMQP connection authenticates (`transport.amqp.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmqpAuth {
    /// SASL PLAIN: the user and password of `transport.amqp_url`, or the key name and key of
    /// `transport.amqp.connection_string`.
    Plain,
    /// SASL ANONYMOUS, nothing else.
    Anonymous,
    /// Service Bus claims-based security: SASL ANONYMOUS, then a SAS token (made from the
    /// connection string's key) put on `$cbs` for each link's entity, renewed before expiry.
    Cbs,
}

/// `[transport.amqp]`: only read when `transport.kind = "amqp"`.
///
/// Addresses are templates: `{topic}` and `{subscription}` are replaced by the names used in
/// `[routing]`. Omitted templates take the flavour's defaults; `addresses` pins single names
/// (`"orders"` for a topic, `"orders/inventory"` for a subscription) to a literal address.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// The broker; picks the default address templates.
    pub flavour: AmqpFlavour,
    /// Service Bus connection string (`Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`).
    /// When set it replaces `transport.amqp_url`. Held as a secret (its key): never printed
    /// (`expose_secret` to read it).
    pub connection_string: SecretString,
    /// How connections authenticate.
    pub auth: AmqpAuth,
    /// PEM file of an extra CA certificate to trust for `amqps://` (besides the system's);
    /// empty for none.
    pub tls_ca_file: String,
    /// Template of a topic's address (`{topic}`); the flavour's default when absent.
    pub topic_address: Option<String>,
    /// Template of a subscription's address (`{subscription}`, optionally `{topic}`); the
    /// flavour's default when absent.
    pub subscription_address: Option<String>,
    /// Literal addresses for single names: `TOPIC` or `TOPIC/SUBSCRIPTION` → address.
    pub addresses: BTreeMap<String, String>,
    /// Timeout of one connection attempt (TCP, TLS, SASL, open, session, CBS).
    pub connect_timeout_ms: u64,
    /// AMQP idle timeout announced to the broker; 0 = none.
    pub idle_timeout_ms: u64,
    /// Reconnect backoff: base · 2^(failures-1), capped at `reconnect_backoff_max_ms`.
    pub reconnect_backoff_base_ms: u64,
    /// The cap of the reconnect backoff.
    pub reconnect_backoff_max_ms: u64,
    /// Lifetime of each CBS token (`auth = "cbs"`).
    pub token_ttl_seconds: u64,
    /// How long before expiry each CBS token is renewed.
    pub token_renew_before_seconds: u64,
    /// RabbitMQ: each subscription is this many shard queues behind a consistent-hash exchange
    /// that keeps every stream on one shard, each a single-active-consumer queue; every
    /// instance attaches to every shard. 0 = one plain queue per subscription (one consumer
    /// instance keeps streams in order; several would not).
    pub shards: u32,
    /// Template of a shard queue's address (`{shard}`, `{subscription}`, optionally
    /// `{topic}`); the flavour's default when absent.
    pub shard_address: Option<String>,
    /// Service Bus: subscriptions are session-enabled (session id = stream id) and received
    /// through session receivers that accept the next available session.
    pub sessions: bool,
    /// Session receivers per subscription and instance (`sessions = true`): sessions held at
    /// once.
    pub max_concurrent_sessions: u32,
    /// A session receiver that received nothing for this long gives its session back and
    /// accepts the next available one.
    pub session_idle_timeout_ms: u64,
    /// How often a held session's lock is renewed (keep it well under the entity's lock
    /// duration, 60 s by default).
    pub session_lock_renew_seconds: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            flavour: AmqpFlavour::RabbitMq,
            connection_string: SecretString::default(),
            auth: AmqpAuth::Plain,
            tls_ca_file: String::new(),
            topic_address: None,
            subscription_address: None,
            addresses: BTreeMap::new(),
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            reconnect_backoff_base_ms: 100,
            reconnect_backoff_max_ms: 10_000,
            token_ttl_seconds: 3_600,
            token_renew_before_seconds: 300,
            shards: 0,
            shard_address: None,
            sessions: false,
            max_concurrent_sessions: 8,
            session_idle_timeout_ms: 1_000,
            session_lock_renew_seconds: 20,
        }
    }
}

impl AmqpConfig {
    /// The topic address template in force (configured, or the flavour's default).
    pub fn topic_template(&self) -> &str {
        self.topic_address.as_deref().unwrap_or(match self.flavour {
            AmqpFlavour::RabbitMq => "/exchange/{topic}",
            AmqpFlavour::ServiceBus => "{topic}",
        })
    }

    /// The subscription address template in force (configured, or the flavour's default).
    pub fn subscription_template(&self) -> &str {
        self.subscription_address
            .as_deref()
            .unwrap_or(match self.flavour {
                AmqpFlavour::RabbitMq => "/amq/queue/{topic}.{subscription}",
                AmqpFlavour::ServiceBus => "{topic}/Subscriptions/{subscription}",
            })
    }

    /// The shard address template in force (configured, or the flavour's default).
    pub fn shard_template(&self) -> &str {
        self.shard_address.as_deref().unwrap_or(match self.flavour {
            AmqpFlavour::RabbitMq => "/amq/queue/{topic}.{subscription}.{shard}",
            AmqpFlavour::ServiceBus => "{topic}/Subscriptions/{subscription}-{shard}",
        })
    }

    /// The broker address of shard `shard` of `subscription` on `topic` (`shards` > 0).
    pub fn shard_address_of(&self, topic: &str, subscription: &str, shard: u32) -> String {
        self.shard_template()
            .replace("{topic}", topic)
            .replace("{subscription}", subscription)
            .replace("{shard}", &shard.to_string())
    }

    /// How many receivers one instance runs on each subscription: its shards, its concurrent
    /// session receivers, or one.
    pub fn receivers_per_subscription(&self) -> u32 {
        if self.sessions {
            self.max_concurrent_sessions
        } else {
            self.shards.max(1)
        }
    }

    /// The broker address of `topic`.
    pub fn topic_address_of(&self, topic: &str) -> String {
        match self.addresses.get(topic) {
            Some(address) => address.clone(),
            None => self.topic_template().replace("{topic}", topic),
        }
    }

    /// The broker address of `subscription` on `topic`.
    pub fn subscription_address_of(&self, topic: &str, subscription: &str) -> String {
        match self.addresses.get(&format!("{topic}/{subscription}")) {
            Some(address) => address.clone(),
            None => self
                .subscription_template()
                .replace("{topic}", topic)
                .replace("{subscription}", subscription),
        }
    }

    /// Checks the section (`amqp_url` is `transport.amqp_url`, the endpoint when there is no
    /// connection string); keys are reported under `transport.amqp.`.
    pub(super) fn validate(&self, amqp_url: &str) -> Checked {
        let template = |key: &str, t: &str, required: &str| {
            check_template(t, required).map_err(|m| (key.to_string(), m))
        };
        template(
            "transport.amqp.topic_address",
            self.topic_template(),
            "{topic}",
        )?;
        template(
            "transport.amqp.subscription_address",
            self.subscription_template(),
            "{subscription}",
        )?;
        check_shard_template(self.shard_template())
            .map_err(|m| ("transport.amqp.shard_address".to_string(), m))?;
        ensure(self.shards <= 1_000, "transport.amqp.shards", || {
            format!("must be at most 1000, got {}", self.shards)
        })?;
        ensure(
            !(self.sessions && self.shards > 0),
            "transport.amqp.sessions",
            || "sessions (Service Bus) and shards (RabbitMQ) exclude each other: set one".into(),
        )?;
        ensure(
            !self.sessions || self.flavour == AmqpFlavour::ServiceBus,
            "transport.amqp.sessions",
            || {
                "sessions need flavour = \"servicebus\" (RabbitMQ has no session filter: use shards)".into()
            },
        )?;
        ensure(
            (1..=256).contains(&self.max_concurrent_sessions),
            "transport.amqp.max_concurrent_sessions",
            || {
                format!(
                    "must be between 1 and 256, got {}",
                    self.max_concurrent_sessions
                )
            },
        )?;
        ensure(
            self.session_idle_timeout_ms > 0,
            "transport.amqp.session_idle_timeout_ms",
            || "must be at least 1".into(),
        )?;
        ensure(
            (1..=300).contains(&self.session_lock_renew_seconds),
            "transport.amqp.session_lock_renew_seconds",
            || {
                format!(
                    "must be between 1 and 300, got {}",
                    self.session_lock_renew_seconds
                )
            },
        )?;
        for (name, address) in &self.addresses {
            ensure(
                !name.trim().is_empty() && name.matches('/').count() <= 1,
                "transport.amqp.addresses",
                || format!("`{name}` must be TOPIC or TOPIC/SUBSCRIPTION"),
            )?;
            ensure(
                !address.trim().is_empty(),
                &format!("transport.amqp.addresses.{name}"),
                || "address must not be empty".into(),
            )?;
        }
        let has_connection_string = !self.connection_string.expose_secret().is_empty();
        if has_connection_string {
            ConnectionString::parse(self.connection_string.expose_secret())
                .map_err(|e| ("transport.amqp.connection_string".into(), e.to_string()))?;
        } else {
            check_amqp_url(amqp_url).map_err(|m| ("transport.amqp_url".into(), m))?;
        }
        ensure(
            self.auth != AmqpAuth::Cbs || has_connection_string,
            "transport.amqp.auth",
            || "\"cbs\" needs transport.amqp.connection_string (its key signs the tokens)".into(),
        )?;
        ensure(
            self.auth != AmqpAuth::Plain || has_connection_string || url_has_user(amqp_url),
            "transport.amqp.auth",
            || {
                "\"plain\" needs a user in transport.amqp_url (amqp://USER:PASSWORD@HOST) or a connection_string; use \"anonymous\" otherwise".into()
            },
        )?;
        ensure(
            self.connect_timeout_ms > 0,
            "transport.amqp.connect_timeout_ms",
            || "must be at least 1".into(),
        )?;
        ensure(
            (1..=self.reconnect_backoff_max_ms).contains(&self.reconnect_backoff_base_ms),
            "transport.amqp.reconnect_backoff_base_ms",
            || {
                format!(
                    "must be between 1 and transport.amqp.reconnect_backoff_max_ms ({}), got {}",
                    self.reconnect_backoff_max_ms, self.reconnect_backoff_base_ms
                )
            },
        )?;
        ensure(
            self.token_ttl_seconds >= 60,
            "transport.amqp.token_ttl_seconds",
            || format!("must be at least 60, got {}", self.token_ttl_seconds),
        )?;
        ensure(
            (1..self.token_ttl_seconds).contains(&self.token_renew_before_seconds),
            "transport.amqp.token_renew_before_seconds",
            || {
                format!(
                    "must be between 1 and transport.amqp.token_ttl_seconds ({}) - 1, got {}",
                    self.token_ttl_seconds, self.token_renew_before_seconds
                )
            },
        )
    }
}

/// An address template holds `required` and no placeholder but `{topic}` and
/// `{subscription}`.
fn check_template(t: &str, required: &str) -> Result<(), String> {
    if !t.contains(required) {
        return Err(format!("`{t}` must contain {required}"));
    }
    let rest = t.replace(required, "").replace("{topic}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "`{t}` has an unknown placeholder (known: {{topic}}, {{subscription}})"
        ));
    }
    Ok(())
}

/// A shard template holds `{shard}` and `{subscription}`, and no placeholder but those and
/// `{topic}`.
fn check_shard_template(t: &str) -> Result<(), String> {
    for required in ["{shard}", "{subscription}"] {
        if !t.contains(required) {
            return Err(format!("`{t}` must contain {required}"));
        }
    }
    let rest = t
        .replace("{shard}", "")
        .replace("{subscription}", "")
        .replace("{topic}", "");
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "`{t}` has an unknown placeholder (known: {{topic}}, {{subscription}}, {{shard}})"
        ));
    }
    Ok(())
}

/// `amqp://` or `amqps://`, a host, an optional port.
fn check_amqp_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("amqps://")
        .or_else(|| url.strip_prefix("amqp://"))
        .ok_or_else(|| format!("`{}` must start with amqp:// or amqps://", redact(url)))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = host_port.split(':').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("`{}` has no host", redact(url)));
    }
    if let Some(port) = host_port.split(':').nth(1)
        && port.parse::<u16>().is_err()
    {
        return Err(format!("`{}` has an invalid port", redact(url)));
    }
    Ok(())
}

fn url_has_user(url: &str) -> bool {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    authority
        .split_once('@')
        .is_some_and(|(user, _)| !user.is_empty())
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let connection_string = redact(self.connection_string.expose_secret());
        f.debug_struct("AmqpConfig")
            .field("flavour", &self.flavour)
            .field("connection_string", &connection_string)
            .field("auth", &self.auth)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("topic_address", &self.topic_template())
            .field("subscription_address", &self.subscription_template())
            .field("addresses", &self.addresses)
            .field("shards", &self.shards)
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn amqp(section: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "[transport]\nkind = \"amqp\"\n[transport.amqp]\n{section}\n"
        ))
    }

    const CONNECTION_STRING: &str = "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=c2VjcmV0LWtleQ==";

    #[test]
    fn amqp_section_defaults_to_rabbitmq_addresses() {
        let c = amqp("").unwrap();
        let a = &c.transport.amqp;
        assert_eq!(a.flavour, AmqpFlavour::RabbitMq);
        assert_eq!(a.auth, AmqpAuth::Plain);
        assert_eq!(a.topic_address_of("orders"), "/exchange/orders");
        assert_eq!(
            a.subscription_address_of("orders", "inventory"),
            "/amq/queue/orders.inventory"
        );
        let sb = amqp("flavour = \"servicebus\"").unwrap().transport.amqp;
        assert_eq!(sb.topic_address_of("orders"), "orders");
        assert_eq!(
            sb.subscription_address_of("orders", "inventory"),
            "orders/Subscriptions/inventory"
        );
    }

    #[test]
    fn shards_and_sessions_set_the_receivers_of_a_subscription() {
        let plain = amqp("").unwrap().transport.amqp;
        assert_eq!(plain.receivers_per_subscription(), 1);
        let sharded = amqp("shards = 4").unwrap().transport.amqp;
        assert_eq!(sharded.receivers_per_subscription(), 4);
        assert_eq!(
            sharded.shard_address_of("orders", "inventory", 3),
            "/amq/queue/orders.inventory.3"
        );
        let custom =
            amqp("shards = 2\nshard_address = \"/amq/queue/{subscription}-{shard}@{topic}\"")
                .unwrap()
                .transport
                .amqp;
        assert_eq!(
            custom.shard_address_of("orders", "inv", 1),
            "/amq/queue/inv-1@orders"
        );
        let sessions =
            amqp("flavour = \"servicebus\"\nsessions = true\nmax_concurrent_sessions = 3")
                .unwrap()
                .transport
                .amqp;
        assert_eq!(sessions.receivers_per_subscription(), 3);
    }

    #[test]
    fn amqp_keys_are_named_in_errors() {
        let cases = [
            ("topic_adress = \"x\"", "transport.amqp.topic_adress"),
            ("flavour = \"activemq\"", "transport.amqp.flavour"),
            ("auth = \"kerberos\"", "transport.amqp.auth"),
            (
                "topic_address = \"/exchange/orders\"",
                "transport.amqp.topic_address",
            ),
            (
                "subscription_address = \"/amq/queue/{topic}\"",
                "transport.amqp.subscription_address",
            ),
            (
                "topic_address = \"/exchange/{topc}\"",
                "transport.amqp.topic_address",
            ),
            ("auth = \"cbs\"", "transport.amqp.auth"),
            (
                "connect_timeout_ms = 0",
                "transport.amqp.connect_timeout_ms",
            ),
            (
                "reconnect_backoff_base_ms = 5000\nreconnect_backoff_max_ms = 100",
                "transport.amqp.reconnect_backoff_base_ms",
            ),
            (
                "token_ttl_seconds = 600\ntoken_renew_before_seconds = 600",
                "transport.amqp.token_renew_before_seconds",
            ),
            ("token_ttl_seconds = 10", "transport.amqp.token_ttl_seconds"),
            ("shards = 1001", "transport.amqp.shards"),
            (
                "shard_address = \"/amq/queue/{subscription}\"",
                "transport.amqp.shard_address",
            ),
            (
                "shard_address = \"/amq/queue/{subscription}.{shrd}.{shard}\"",
                "transport.amqp.shard_address",
            ),
            ("sessions = true", "transport.amqp.sessions"),
            (
                "flavour = \"servicebus\"\nsessions = true\nshards = 4",
                "transport.amqp.sessions",
            ),
            (
                "max_concurrent_sessions = 0",
                "transport.amqp.max_concurrent_sessions",
            ),
            (
                "session_idle_timeout_ms = 0",
                "transport.amqp.session_idle_timeout_ms",
            ),
            (
                "session_lock_renew_seconds = 0",
                "transport.amqp.session_lock_renew_seconds",
            ),
            (
                "addresses = { \"a/b/c\" = \"x\" }",
                "transport.amqp.addresses",
            ),
            (
                "connection_string = \"Endpoint=sb://x/;SharedAccessKeyName=k\"",
                "transport.amqp.connection_string",
            ),
        ];
        for (section, key) in cases {
            let e = amqp(section)
                .err()
                .unwrap_or_else(|| panic!("{section} was accepted"));
            assert_eq!(e.key(), Some(key), "{section}: {e}");
        }
        let e = parse("[transport]\nkind = \"amqp\"\namqp_url = \"http://x\"\n")
            .err()
            .unwrap();
        assert_eq!(e.key(), Some("transport.amqp_url"));
        let e = parse("[transport]\nkind = \"amqp\"\namqp_url = \"amqp://127.0.0.1\"\n")
            .err()
            .unwrap();
        assert_eq!(
            e.key(),
            Some("transport.amqp.auth"),
            "PLAIN needs a user: {e}"
        );
        amqp("auth = \"anonymous\"").unwrap();
    }

    #[test]
    fn amqp_section_is_only_checked_when_used() {
        parse("[transport]\nkind = \"memory\"\n[transport.amqp]\nauth = \"cbs\"\n").unwrap();
        // Unknown keys are refused either way.
        let e = parse("[transport.amqp]\nflavor = \"rabbitmq\"\n")
            .err()
            .unwrap();
        assert_eq!(e.key(), Some("transport.amqp.flavor"));
    }

    #[test]
    fn service_bus_connection_string_is_a_secret() {
        let c = amqp(&format!(
            "flavour = \"servicebus\"\nauth = \"cbs\"\nconnection_string = \"{CONNECTION_STRING}\""
        ))
        .unwrap();
        let shown = format!("{:?}", c.transport);
        assert!(!shown.contains("c2VjcmV0LWtleQ"), "{shown}");
        assert!(shown.contains("SharedAccessKey=***"), "{shown}");
        let e = amqp("connection_string = \"Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=c2VjcmV0LWtleQ==;Bogus=1\"")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("c2VjcmV0LWtleQ"), "{e}");
        let mut c = amqp("").unwrap();
        c.apply_env(|k| {
            (k == "WHIZBANG_AMQP_CONNECTION_STRING").then(|| CONNECTION_STRING.to_string())
        });
        assert_eq!(
            c.transport.amqp.connection_string.expose_secret(),
            CONNECTION_STRING
        );
        c.transport.amqp_url = "amqp://user:hunter2@h:5672".into();
        assert!(!format!("{:?}", c.transport).contains("hunter2"));
    }
}
