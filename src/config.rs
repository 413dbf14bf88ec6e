//! Configuration: the one TOML file that tunes the runtime.
//!
//! Owns parsing (`config/*.toml`), validation of every knob, and the environment overrides for
//! endpoints and secrets (`WHIZBANG_DATABASE_URL`, `WHIZBANG_AMQP_URL`,
//! `WHIZBANG_AMQP_CONNECTION_STRING`, `WHIZBANG_SERVICE_NAME`).
//! It must not start anything: a config that loads is a config that is valid, so nothing starts
//! half-way. Unknown keys are rejected, and every error names the key and the file.
//! Secrets never appear in `Debug` output: URLs are printed with their password masked.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration that could not be loaded. Each variant names the file and, where there is
/// one, the key (as a dotted path such as `partitions.partition_count`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {file}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Where the durable state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// In-process, no server: the embedded default. Lost when the process exits.
    Memory,
    /// PostgreSQL through a bb8 pool.
    Postgres,
}

/// How messages travel between services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// In-process topics and subscriptions: the embedded default.
    Memory,
    /// AMQP 1.0 (Azure Service Bus, or RabbitMQ's AMQP 1.0 plugin in development).
    Amqp,
}

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

/// When queued work is written to the store (the seed's three strategies). With `Immediate`
/// and `Scoped`, completions of processed rows are written by the `flush_interval_ms` timer
/// rather than with a caller's unit (see the coordinator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushStrategy {
    /// Every unit of work is written in its own round trip as soon as it is queued.
    Immediate,
    /// Written at the end of the unit of work (a dispatch, or an explicit scope); units that end
    /// while a write is in flight are coalesced into the next one (group commit).
    Scoped,
    /// Written by a timer every `flush_interval_ms`: highest throughput, highest latency.
    Interval,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    pub name: String,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: "whizbang-service".into(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub database_url: String,
    pub schema: String,
    pub pool_size: u32,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub dedup_retention_hours: u64,
    pub connect_timeout_ms: u64,
    pub startup_timeout_ms: u64,
    /// A CA certificate (PEM) that must sign the server's certificate: TLS with the chain and
    /// the host name verified. Empty: TLS as `database_url`'s `sslmode` says, read as libpq
    /// reads it (see [`crate::store::postgres::tls`]).
    pub tls_ca_file: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Memory,
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema: "whizbang".into(),
            pool_size: 16,
            max_attempts: 10,
            backoff_base_ms: 100,
            backoff_max_ms: 60_000,
            dedup_retention_hours: 168,
            connect_timeout_ms: 5_000,
            startup_timeout_ms: 60_000,
            tls_ca_file: String::new(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionConfig {
    pub partition_count: u32,
    pub max_partitions_per_instance: u32,
    pub lease_seconds: u64,
    pub heartbeat_seconds: u64,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            partition_count: 10_000,
            max_partitions_per_instance: 100,
            lease_seconds: 300,
            heartbeat_seconds: 10,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    pub flush_strategy: FlushStrategy,
    pub flush_interval_ms: u64,
    pub poll_interval_ms: u64,
    pub claim_batch_size: u32,
    pub max_batch_size: u32,
    pub max_batches_in_flight: u32,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            flush_strategy: FlushStrategy::Scoped,
            flush_interval_ms: 100,
            poll_interval_ms: 5_000,
            claim_batch_size: 100,
            max_batch_size: 1_000,
            max_batches_in_flight: 2,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    pub kind: TransportKind,
    pub amqp_url: String,
    pub publisher_window: u32,
    pub prefetch: u32,
    /// Largest payload that crosses the transport, checked when dispatching (sending side)
    /// and when receiving (see `Envelope::check_size`).
    pub max_message_bytes: u32,
    pub send_timeout_ms: u64,
    /// `[transport.amqp]`: broker flavour, addresses, authentication, reconnects.
    pub amqp: AmqpConfig,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            kind: TransportKind::Memory,
            amqp_url: "amqp://guest:guest@127.0.0.1:5672".into(),
            publisher_window: 256,
            prefetch: 500,
            max_message_bytes: 1_048_576,
            send_timeout_ms: 10_000,
            amqp: AmqpConfig::default(),
        }
    }
}

/// `[transport.amqp]`: only read when `transport.kind = "amqp"`.
///
/// Addresses are templates: `{topic}` and `{subscription}` are replaced by the names used in
/// `[routing]`. Omitted templates take the flavour's defaults; `addresses` pins single names
/// (`"orders"` for a topic, `"orders/inventory"` for a subscription) to a literal address.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    pub flavour: AmqpFlavour,
    /// Service Bus connection string (`Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`).
    /// When set it replaces `transport.amqp_url`. Never logged.
    pub connection_string: String,
    pub auth: AmqpAuth,
    /// PEM file of an extra CA certificate to trust for `amqps://` (besides the system's);
    /// empty for none.
    pub tls_ca_file: String,
    pub topic_address: Option<String>,
    pub subscription_address: Option<String>,
    pub addresses: BTreeMap<String, String>,
    pub connect_timeout_ms: u64,
    /// AMQP idle timeout announced to the broker; 0 = none.
    pub idle_timeout_ms: u64,
    pub reconnect_backoff_base_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    pub token_ttl_seconds: u64,
    pub token_renew_before_seconds: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            flavour: AmqpFlavour::RabbitMq,
            connection_string: String::new(),
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

    /// Checks the section; keys are reported under `transport.amqp.`.
    fn validate(&self, amqp_url: &str) -> Result<(), (String, String)> {
        let key = |k: &str| format!("transport.amqp.{k}");
        let template_ok = |t: &str, required: &[&str]| {
            let mut rest = t.to_string();
            for placeholder in required {
                if !rest.contains(placeholder) {
                    return Err(format!("`{t}` must contain {placeholder}"));
                }
                rest = rest.replace(placeholder, "");
            }
            rest = rest.replace("{topic}", "");
            if rest.contains('{') || rest.contains('}') {
                return Err(format!(
                    "`{t}` has an unknown placeholder (known: {{topic}}, {{subscription}})"
                ));
            }
            Ok(())
        };
        template_ok(self.topic_template(), &["{topic}"]).map_err(|m| (key("topic_address"), m))?;
        template_ok(self.subscription_template(), &["{subscription}"])
            .map_err(|m| (key("subscription_address"), m))?;
        for (name, address) in &self.addresses {
            if name.trim().is_empty() || name.matches('/').count() > 1 {
                return Err((
                    key("addresses"),
                    format!("`{name}` must be TOPIC or TOPIC/SUBSCRIPTION"),
                ));
            }
            if address.trim().is_empty() {
                return Err((
                    format!("transport.amqp.addresses.{name}"),
                    "address must not be empty".into(),
                ));
            }
        }
        if !self.connection_string.is_empty() {
            crate::transport::amqp::servicebus::ConnectionString::parse(&self.connection_string)
                .map_err(|e| (key("connection_string"), e.to_string()))?;
        } else if let Err(m) = check_amqp_url(amqp_url) {
            return Err(("transport.amqp_url".into(), m));
        }
        match self.auth {
            AmqpAuth::Cbs if self.connection_string.is_empty() => {
                return Err((
                    key("auth"),
                    "\"cbs\" needs transport.amqp.connection_string (its key signs the tokens)"
                        .into(),
                ));
            }
            AmqpAuth::Plain if self.connection_string.is_empty() && !url_has_user(amqp_url) => {
                return Err((
                    key("auth"),
                    "\"plain\" needs a user in transport.amqp_url (amqp://USER:PASSWORD@HOST) or a connection_string; use \"anonymous\" otherwise".into(),
                ));
            }
            _ => {}
        }
        if self.connect_timeout_ms == 0 {
            return Err((key("connect_timeout_ms"), "must be at least 1".into()));
        }
        if self.reconnect_backoff_base_ms == 0
            || self.reconnect_backoff_base_ms > self.reconnect_backoff_max_ms
        {
            return Err((
                key("reconnect_backoff_base_ms"),
                format!(
                    "must be between 1 and transport.amqp.reconnect_backoff_max_ms ({}), got {}",
                    self.reconnect_backoff_max_ms, self.reconnect_backoff_base_ms
                ),
            ));
        }
        if self.token_ttl_seconds < 60 {
            return Err((
                key("token_ttl_seconds"),
                format!("must be at least 60, got {}", self.token_ttl_seconds),
            ));
        }
        if self.token_renew_before_seconds == 0
            || self.token_renew_before_seconds >= self.token_ttl_seconds
        {
            return Err((
                key("token_renew_before_seconds"),
                format!(
                    "must be between 1 and transport.amqp.token_ttl_seconds ({}) - 1, got {}",
                    self.token_ttl_seconds, self.token_renew_before_seconds
                ),
            ));
        }
        Ok(())
    }
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

/// A subscription this service consumes: every event published to `topic` reaches this
/// service's inbox once, under the subscription `name`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    pub topic: String,
    pub name: String,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Message type name → destination topic. A type without an entry stays in this service.
    pub topics: BTreeMap<String, String>,
    /// Topics this service consumes.
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// The whole configuration. Every field has a default, so an empty file is a valid file.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub service: ServiceConfig,
    pub store: StoreConfig,
    pub partitions: PartitionConfig,
    pub coordinator: CoordinatorConfig,
    pub transport: TransportConfig,
    pub routing: RoutingConfig,
}

impl Config {
    /// Reads, parses and validates `path`, then applies the environment overrides.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        config.apply_env(|name| std::env::var(name).ok());
        config.validate(path)?;
        Ok(config)
    }

    /// Parses TOML text; `file` only names the source in errors. Does not read the environment.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            message,
        };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), e.to_string()))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let inner = e.inner().to_string();
            let mut key = e.path().to_string();
            // An unknown key is reported against its parent table: name the key itself.
            if let Some(unknown) = unknown_field_name(&inner).filter(|u| !key.ends_with(u.as_str()))
            {
                key = if key == "." || key.is_empty() {
                    unknown
                } else {
                    format!("{key}.{unknown}")
                };
            }
            invalid(key, first_line(&inner))
        })?;
        config.validate(file)?;
        Ok(config)
    }

    /// Applies environment overrides for endpoints and secrets. `lookup` is `std::env::var` in
    /// production and a map in tests.
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        if let Some(url) = lookup("WHIZBANG_DATABASE_URL") {
            self.store.database_url = url;
        }
        if let Some(url) = lookup("WHIZBANG_AMQP_URL") {
            self.transport.amqp_url = url;
        }
        if let Some(cs) = lookup("WHIZBANG_AMQP_CONNECTION_STRING") {
            self.transport.amqp.connection_string = cs;
        }
        if let Some(name) = lookup("WHIZBANG_SERVICE_NAME") {
            self.service.name = name;
        }
        if let Some(schema) = lookup("WHIZBANG_SCHEMA") {
            self.store.schema = schema;
        }
    }

    /// Checks ranges and relations between knobs; the error names the offending key.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                key: key.into(),
                message,
            })
        };
        let p = &self.partitions;
        if p.partition_count == 0 || p.partition_count > 1_000_000 {
            return fail(
                "partitions.partition_count",
                format!("must be between 1 and 1000000, got {}", p.partition_count),
            );
        }
        if p.max_partitions_per_instance == 0 {
            return fail(
                "partitions.max_partitions_per_instance",
                "must be at least 1".into(),
            );
        }
        if p.heartbeat_seconds == 0 {
            return fail("partitions.heartbeat_seconds", "must be at least 1".into());
        }
        if p.lease_seconds <= p.heartbeat_seconds {
            return fail(
                "partitions.lease_seconds",
                format!(
                    "must be longer than partitions.heartbeat_seconds ({}), got {}",
                    p.heartbeat_seconds, p.lease_seconds
                ),
            );
        }
        let c = &self.coordinator;
        if c.flush_interval_ms == 0 || c.flush_interval_ms > 60_000 {
            return fail(
                "coordinator.flush_interval_ms",
                format!("must be between 1 and 60000, got {}", c.flush_interval_ms),
            );
        }
        if c.poll_interval_ms == 0 {
            return fail("coordinator.poll_interval_ms", "must be at least 1".into());
        }
        if c.claim_batch_size == 0 {
            return fail("coordinator.claim_batch_size", "must be at least 1".into());
        }
        if c.max_batch_size == 0 {
            return fail("coordinator.max_batch_size", "must be at least 1".into());
        }
        if c.max_batches_in_flight == 0 {
            return fail(
                "coordinator.max_batches_in_flight",
                "must be at least 1".into(),
            );
        }
        let s = &self.store;
        if s.max_attempts == 0 {
            return fail("store.max_attempts", "must be at least 1".into());
        }
        if s.connect_timeout_ms == 0 {
            return fail("store.connect_timeout_ms", "must be at least 1".into());
        }
        if s.pool_size == 0 {
            return fail("store.pool_size", "must be at least 1".into());
        }
        if s.backoff_base_ms == 0 || s.backoff_base_ms > s.backoff_max_ms {
            return fail(
                "store.backoff_base_ms",
                format!(
                    "must be between 1 and store.backoff_max_ms ({}), got {}",
                    s.backoff_max_ms, s.backoff_base_ms
                ),
            );
        }
        if !is_identifier(&s.schema) {
            return fail(
                "store.schema",
                format!(
                    "`{}` is not a plain SQL identifier (lowercase letter or _, then letters, digits or _, at most 63)",
                    s.schema
                ),
            );
        }
        if self.service.name.trim().is_empty() {
            return fail("service.name", "must not be empty".into());
        }
        let t = &self.transport;
        if t.publisher_window == 0 {
            return fail("transport.publisher_window", "must be at least 1".into());
        }
        if t.prefetch == 0 {
            return fail("transport.prefetch", "must be at least 1".into());
        }
        if t.max_message_bytes == 0 {
            return fail("transport.max_message_bytes", "must be at least 1".into());
        }
        if t.send_timeout_ms == 0 {
            return fail("transport.send_timeout_ms", "must be at least 1".into());
        }
        if t.kind == TransportKind::Amqp
            && let Err((key, message)) = t.amqp.validate(&t.amqp_url)
        {
            return fail(&key, message);
        }
        for (ty, topic) in &self.routing.topics {
            if topic.trim().is_empty() {
                return fail(
                    &format!("routing.topics.{ty}"),
                    "topic must not be empty".into(),
                );
            }
        }
        for (i, sub) in self.routing.subscriptions.iter().enumerate() {
            if sub.topic.trim().is_empty() || sub.name.trim().is_empty() {
                return fail(
                    &format!("routing.subscriptions[{i}]"),
                    "topic and name must not be empty".into(),
                );
            }
        }
        Ok(())
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.partitions.lease_seconds)
    }
}

/// A lowercase SQL identifier that needs no quoting (Postgres folds unquoted names to lowercase).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Masks the password of a URL (`scheme://user:secret@host` → `scheme://user:***@host`) and
/// any `SharedAccessKey=` value, so endpoints can be logged.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(key_at) = out.find("SharedAccessKey=") {
        let start = key_at + "SharedAccessKey=".len();
        let end = out[start..].find(';').map_or(out.len(), |i| start + i);
        out.replace_range(start..end, "***");
    }
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        if let Some(at) = out[rest..].find('@').map(|i| rest + i)
            && let Some(colon) = out[rest..at].find(':').map(|i| rest + i)
        {
            out.replace_range(colon + 1..at, "***");
        }
    }
    out
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("database_url", &redact(&self.database_url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("max_attempts", &self.max_attempts)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("kind", &self.kind)
            .field("amqp_url", &redact(&self.amqp_url))
            .field("publisher_window", &self.publisher_window)
            .field("prefetch", &self.prefetch)
            .field("amqp", &self.amqp)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let connection_string = if self.connection_string.is_empty() {
            String::new()
        } else {
            redact(&self.connection_string)
        };
        f.debug_struct("AmqpConfig")
            .field("flavour", &self.flavour)
            .field("connection_string", &connection_string)
            .field("auth", &self.auth)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("topic_address", &self.topic_template())
            .field("subscription_address", &self.subscription_template())
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    Some(rest.split('`').next()?.to_string())
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.partitions.partition_count, 10_000);
        assert_eq!(c.partitions.max_partitions_per_instance, 100);
        assert_eq!(c.partitions.lease_seconds, 300);
        assert_eq!(c.coordinator.flush_interval_ms, 100);
        assert_eq!(c.store.backend, StoreBackend::Memory);
        assert_eq!(c.transport.kind, TransportKind::Memory);
    }

    #[test]
    fn unknown_key_is_named_with_its_table() {
        let e = parse("[partitions]\npartition_cuont = 5\n").err().unwrap();
        assert_eq!(e.key(), Some("partitions.partition_cuont"));
        assert!(e.to_string().contains("test.toml"), "{e}");
    }

    #[test]
    fn unknown_top_level_table_is_named() {
        let e = parse("[nonsense]\nx = 1\n").err().unwrap();
        assert_eq!(e.key(), Some("nonsense"));
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse("[partitions]\nlease_seconds = \"long\"\n")
            .err()
            .unwrap();
        assert_eq!(e.key(), Some("partitions.lease_seconds"));
    }

    #[test]
    fn negative_value_is_named() {
        let e = parse("[partitions]\npartition_count = -3\n").err().unwrap();
        assert_eq!(e.key(), Some("partitions.partition_count"));
    }

    #[test]
    fn out_of_range_is_named() {
        let e = parse("[partitions]\npartition_count = 0\n").err().unwrap();
        assert_eq!(e.key(), Some("partitions.partition_count"));
        let e = parse("[partitions]\nlease_seconds = 5\nheartbeat_seconds = 10\n")
            .err()
            .unwrap();
        assert_eq!(e.key(), Some("partitions.lease_seconds"));
    }

    #[test]
    fn bad_enum_value_is_named() {
        let e = parse("[coordinator]\nflush_strategy = \"sometimes\"\n")
            .err()
            .unwrap();
        assert_eq!(e.key(), Some("coordinator.flush_strategy"));
    }

    #[test]
    fn schema_must_be_an_identifier() {
        let e = parse("[store]\nschema = \"x; drop table y\"\n")
            .err()
            .unwrap();
        assert_eq!(e.key(), Some("store.schema"));
    }

    #[test]
    fn env_overrides_endpoints() {
        let mut c = parse("").unwrap();
        c.apply_env(|k| (k == "WHIZBANG_DATABASE_URL").then(|| "postgres://a:b@h/db".into()));
        assert_eq!(c.store.database_url, "postgres://a:b@h/db");
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
        assert_eq!(c.transport.amqp.connection_string, CONNECTION_STRING);
        c.transport.amqp_url = "amqp://user:hunter2@h:5672".into();
        assert!(!format!("{:?}", c.transport).contains("hunter2"));
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            redact("postgres://user:hunter2@host/db"),
            "postgres://user:***@host/db"
        );
        assert_eq!(
            redact("Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=abc=;EntityPath=t"),
            "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=***;EntityPath=t"
        );
        let mut c = parse("").unwrap();
        c.store.database_url = "postgres://u:topsecret@h/db".into();
        assert!(!format!("{:?}", c.store).contains("topsecret"));
    }
}
