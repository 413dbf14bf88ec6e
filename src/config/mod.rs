//! Configuration: the one TOML file that tunes the runtime.
//!
//! Owns parsing (`config/*.toml`), validation of every knob, and the environment overrides for
//! endpoints and secrets (`WHIZBANG_DATABASE_URL`, `WHIZBANG_AMQP_URL`,
//! `WHIZBANG_AMQP_CONNECTION_STRING`, `WHIZBANG_SERVICE_NAME`, `WHIZBANG_SCHEMA`,
//! `WHIZBANG_METRICS_LISTEN`).
//! It must not start anything: a config that loads is a config that is valid, so nothing starts
//! half-way. Unknown keys are rejected, and every error names the key and the file.
//! Secrets never appear in `Debug` output: URLs are printed with their password masked.
//! Nothing here depends on the store or the transports: they read their sections.
//!
//! One file per section of the TOML file, each with its keys, defaults and checks:
//!
//! | section | file | type |
//! |---|---|---|
//! | `[service]` | `service.rs` | [`ServiceConfig`] |
//! | `[store]` | `store.rs` | [`StoreConfig`] |
//! | `[partitions]` | `partitions.rs` | [`PartitionConfig`] |
//! | `[coordinator]` | `coordinator.rs` | [`CoordinatorConfig`] |
//! | `[transport]` | `transport.rs` | [`TransportConfig`] |
//! | `[transport.amqp]` | `amqp.rs`, `connection_string.rs` | [`AmqpConfig`], [`ConnectionString`] |
//! | `[routing]` | `routing.rs` | [`RoutingConfig`] |
//! | `[runtime]` | `runtime.rs` | [`RuntimeConfig`] |
//! | `[telemetry]` | `telemetry.rs` | [`TelemetryConfig`] |

mod amqp;
mod connection_string;
mod coordinator;
mod partitions;
mod routing;
mod runtime;
mod service;
mod store;
mod telemetry;
mod transport;

pub use amqp::{AmqpAuth, AmqpConfig, AmqpFlavour};
pub use connection_string::{ConnectionString, ConnectionStringError};
pub use coordinator::{CoordinatorConfig, FlushStrategy};
pub use partitions::PartitionConfig;
pub use routing::{RoutingConfig, SubscriptionConfig};
pub use runtime::RuntimeConfig;
/// The type holding `store.database_url`, `transport.amqp_url` and
/// `transport.amqp.connection_string`, and the trait that reads it (re-exported from `secrecy`
/// so that a service need not depend on it).
pub use secrecy::{ExposeSecret, SecretString};
pub use service::ServiceConfig;
pub use store::{StoreBackend, StoreConfig, is_identifier};
pub use telemetry::TelemetryConfig;
pub use transport::{TransportConfig, TransportKind};

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A configuration that could not be loaded. Each variant names the file and, where there is
/// one, the key (as a dotted path such as `partitions.partition_count`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but a key is unknown, of the wrong type or out of range.
    #[error("invalid config file {file}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The dotted key (`(syntax)` for a TOML syntax error).
        key: String,
        /// What is wrong with it.
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

/// The whole configuration. Every field has a default, so an empty file is a valid file.
/// Its `Debug` shows no secret: the URLs and the connection string are [`SecretString`]s,
/// shown with their secrets masked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[service]`.
    pub service: ServiceConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[partitions]`.
    pub partitions: PartitionConfig,
    /// `[coordinator]`.
    pub coordinator: CoordinatorConfig,
    /// `[transport]` and `[transport.amqp]`.
    pub transport: TransportConfig,
    /// `[routing]`.
    pub routing: RoutingConfig,
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// `[telemetry]`.
    pub telemetry: TelemetryConfig,
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
    /// Keys left out keep their defaults; an unknown key or a value out of range is refused,
    /// naming the key:
    ///
    /// ```
    /// use std::path::Path;
    /// use whizbang::config::{Config, FlushStrategy, StoreBackend};
    ///
    /// let config = Config::parse(
    ///     "[store]\nbackend = \"postgres\"\n[coordinator]\nflush_strategy = \"interval\"\n",
    ///     Path::new("service.toml"),
    /// )?;
    /// assert_eq!(config.store.backend, StoreBackend::Postgres);
    /// assert_eq!(config.coordinator.flush_strategy, FlushStrategy::Interval);
    ///
    /// let typo = Config::parse("[store]\nbakend = \"memory\"\n", Path::new("service.toml"))
    ///     .err()
    ///     .expect("an unknown key is refused");
    /// assert_eq!(typo.key(), Some("store.bakend"));
    /// # Ok::<(), whizbang::config::ConfigError>(())
    /// ```
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
            self.store.database_url = url.into();
        }
        if let Some(url) = lookup("WHIZBANG_AMQP_URL") {
            self.transport.amqp_url = url.into();
        }
        if let Some(cs) = lookup("WHIZBANG_AMQP_CONNECTION_STRING") {
            self.transport.amqp.connection_string = cs.into();
        }
        if let Some(name) = lookup("WHIZBANG_SERVICE_NAME") {
            self.service.name = name;
        }
        if let Some(schema) = lookup("WHIZBANG_SCHEMA") {
            self.store.schema = schema;
        }
        if let Some(listen) = lookup("WHIZBANG_METRICS_LISTEN") {
            self.telemetry.metrics_listen = listen;
        }
    }

    /// Checks ranges and relations between knobs, section by section; the error names the
    /// first offending key.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        self.partitions
            .validate()
            .and_then(|()| self.coordinator.validate())
            .and_then(|()| self.store.validate())
            .and_then(|()| self.service.validate())
            .and_then(|()| self.transport.validate())
            .and_then(|()| self.routing.validate())
            .and_then(|()| self.runtime.validate())
            .and_then(|()| self.telemetry.validate())
            .map_err(|(key, message)| ConfigError::Invalid {
                file: file.to_path_buf(),
                key,
                message,
            })
    }
}

/// The outcome of a section's checks: `Err((dotted key, message))` for the first that failed.
type Checked = Result<(), (String, String)>;

/// `key` fails with `message()` unless `ok`.
fn ensure(ok: bool, key: &str, message: impl FnOnce() -> String) -> Checked {
    if ok {
        Ok(())
    } else {
        Err((key.to_string(), message()))
    }
}

/// Every `(key, value)` must be at least 1; the first zero fails.
fn at_least_one(knobs: &[(&str, u64)]) -> Checked {
    match knobs.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err((key.to_string(), "must be at least 1".into())),
        None => Ok(()),
    }
}

/// `value` must lie in `low..=high`.
fn within(key: &str, value: u64, low: u64, high: u64) -> Checked {
    ensure((low..=high).contains(&value), key, || {
        format!("must be between {low} and {high}, got {value}")
    })
}

/// Masks every secret a connection string can carry, in each form the drivers accept, so that
/// text which must name an endpoint can be shown: the password of a URL
/// (`scheme://user:secret@host`), a `password=` / `sslpassword=` value in libpq's `key=value`
/// form (quoted or not) or in a URL's query (`?password=…&`), and a Service Bus
/// `SharedAccessKey=` or `SharedAccessSignature=`. Where the parsed configuration is at hand,
/// render the endpoint from it instead (the store does), so that no secret is there to mask.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    // A Service Bus value runs to the next `;` (a signature holds spaces and `&`); a libpq or
    // query value to the next space, `&` or `;`.
    for (key, ends) in [
        ("SharedAccessKey=", ";"),
        ("SharedAccessSignature=", ";"),
        ("password=", " \t\n&;"),
        ("sslpassword=", " \t\n&;"),
    ] {
        out = mask_values(&out, key, ends.as_bytes());
    }
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        // The authority ends at the first '/', '?' or '#'; its userinfo before the last '@'.
        let authority_end = out[rest..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@').map(|i| rest + i)
            && let Some(colon) = out[rest..at].find(':').map(|i| rest + i)
        {
            out.replace_range(colon + 1..at, "***");
        }
    }
    out
}

/// Replaces the value of every `key` (matched without case, at the start of the text or after a
/// separator: space, `?`, `&`, `;`) with `***`. A value ends at the first of `ends`, or at its
/// closing quote when it is quoted (libpq's `password='a b'`).
fn mask_values(text: &str, key: &str, ends: &[u8]) -> String {
    let lower = text.to_ascii_lowercase();
    let key_lower = key.to_ascii_lowercase();
    let is_separator = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'?' | b'&' | b';');
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find(&key_lower).map(|i| search + i) {
        search = found + key.len();
        if found > 0 && !is_separator(lower.as_bytes()[found - 1]) {
            continue;
        }
        let start = found + key.len();
        let bytes = text.as_bytes();
        let end = if bytes.get(start) == Some(&b'\'') {
            // Quoted: up to the closing quote that is not escaped.
            let mut i = start + 1;
            while i < bytes.len() && !(bytes[i] == b'\'' && bytes[i - 1] != b'\\') {
                i += 1;
            }
            (i + 1).min(bytes.len())
        } else {
            (start..bytes.len())
                .find(|&i| ends.contains(&bytes[i]))
                .unwrap_or(bytes.len())
        };
        out.push_str(&text[copied..start]);
        out.push_str("***");
        copied = end;
        search = end.max(search);
    }
    out.push_str(&text[copied..]);
    out
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
        assert_eq!(c.store.database_url.expose_secret(), "postgres://a:b@h/db");
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

    /// Every form the drivers accept for a secret, each masked wherever it stands.
    #[test]
    fn secrets_are_masked_in_every_form() {
        let forms = [
            (
                "postgres://u:S3cretPw@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u:p@ss:S3cretPw@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u@h/db?password=S3cretPw&sslmode=require",
                "postgres://u@h/db?password=***&sslmode=require",
            ),
            (
                "postgres://u@h/db?sslmode=require&Password=S3cretPw",
                "postgres://u@h/db?sslmode=require&Password=***",
            ),
            (
                "host=127.0.0.1 user=u password=S3cretPw dbname=no_such_db",
                "host=127.0.0.1 user=u password=*** dbname=no_such_db",
            ),
            (
                "host=h password='S3cret Pw' dbname=d",
                "host=h password=*** dbname=d",
            ),
            (
                "password=S3cretPw host=h sslpassword=S3cretPw",
                "password=*** host=h sslpassword=***",
            ),
            (
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=S3cretPw",
                "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessSignature=***",
            ),
            (
                "amqps://u:S3cretPw@ns.servicebus.windows.net",
                "amqps://u:***@ns.servicebus.windows.net",
            ),
        ];
        for (given, shown) in forms {
            let masked = redact(given);
            assert_eq!(masked, shown, "{given}");
            assert!(!masked.contains("S3cret"), "{masked}");
        }
        // Names that merely end in the key are left alone.
        assert_eq!(redact("host=h mypassword=x"), "host=h mypassword=x");
    }

    /// The secrets of the configuration, in every form the drivers accept, loaded from a file
    /// and from the environment: the `Debug` of the whole configuration, and of each secret
    /// alone, never shows one.
    #[test]
    fn no_secret_in_the_debug_of_the_configuration() {
        let forms = [
            "postgres://u:S3cretPw@h:5432/db",
            "postgres://u@h/db?password=S3cretPw&sslmode=require",
            "host=127.0.0.1 user=u password=S3cretPw dbname=no_such_db",
            "host=h password='S3cret Pw' dbname=d",
        ];
        for form in forms {
            let text = format!(
                "[store]\ndatabase_url = \"{}\"\n[transport]\namqp_url = \"amqps://u:S3cretPw@h\"\n\
                 [transport.amqp]\nconnection_string = \"Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=S3cretPw=\"\n",
                form
            );
            let mut c = parse(&text).unwrap();
            assert_eq!(c.store.database_url.expose_secret(), form);
            for shown in [
                format!("{c:?}"),
                format!("{:#?}", c.store),
                format!("{:?}", c.store.database_url),
                format!("{:?}", c.transport.amqp_url),
                format!("{:?}", c.transport.amqp.connection_string),
            ] {
                assert!(!shown.contains("S3cret"), "{form}: {shown}");
            }
            assert!(
                format!("{c:?}").contains("SharedAccessKeyName=k"),
                "the rest is shown"
            );
            c.apply_env(|k| match k {
                "WHIZBANG_DATABASE_URL" => Some(form.into()),
                "WHIZBANG_AMQP_URL" => Some("amqp://u:S3cretPw@h".into()),
                "WHIZBANG_AMQP_CONNECTION_STRING" => {
                    Some("Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=S3cretPw".into())
                }
                _ => None,
            });
            assert!(!format!("{c:?}").contains("S3cret"), "{form}: {c:?}");
        }
    }

    /// Every check of `validate`, each alone: the key it names and its message, word for word.
    #[test]
    fn every_check_names_its_key_and_says_why() {
        let amqp = "[transport]\nkind = \"amqp\"\n";
        let cases: Vec<(String, &str, &str)> = vec![
            (
                "[partitions]\npartition_count = 1000001".into(),
                "partitions.partition_count",
                "must be between 1 and 1000000, got 1000001",
            ),
            (
                "[partitions]\nmax_partitions_per_instance = 0".into(),
                "partitions.max_partitions_per_instance",
                "must be at least 1",
            ),
            (
                "[partitions]\nheartbeat_seconds = 0".into(),
                "partitions.heartbeat_seconds",
                "must be at least 1",
            ),
            (
                "[partitions]\nlease_seconds = 10".into(),
                "partitions.lease_seconds",
                "must be longer than partitions.heartbeat_seconds (10), got 10",
            ),
            (
                "[coordinator]\nflush_interval_ms = 0".into(),
                "coordinator.flush_interval_ms",
                "must be between 1 and 60000, got 0",
            ),
            (
                "[coordinator]\nflush_interval_ms = 60001".into(),
                "coordinator.flush_interval_ms",
                "must be between 1 and 60000, got 60001",
            ),
            (
                "[coordinator]\npoll_interval_ms = 0".into(),
                "coordinator.poll_interval_ms",
                "must be at least 1",
            ),
            (
                "[coordinator]\nclaim_batch_size = 0".into(),
                "coordinator.claim_batch_size",
                "must be at least 1",
            ),
            (
                "[coordinator]\nmax_batch_size = 0".into(),
                "coordinator.max_batch_size",
                "must be at least 1",
            ),
            (
                "[coordinator]\nmax_batches_in_flight = 0".into(),
                "coordinator.max_batches_in_flight",
                "must be at least 1",
            ),
            (
                "[store]\nmax_attempts = 0".into(),
                "store.max_attempts",
                "must be at least 1",
            ),
            (
                "[store]\nconnect_timeout_ms = 0".into(),
                "store.connect_timeout_ms",
                "must be at least 1",
            ),
            (
                "[store]\npool_size = 0".into(),
                "store.pool_size",
                "must be at least 1",
            ),
            (
                "[store]\nbackoff_base_ms = 0".into(),
                "store.backoff_base_ms",
                "must be between 1 and store.backoff_max_ms (60000), got 0",
            ),
            (
                "[store]\nbackoff_base_ms = 100\nbackoff_max_ms = 50".into(),
                "store.backoff_base_ms",
                "must be between 1 and store.backoff_max_ms (50), got 100",
            ),
            (
                "[store]\nschema = \"Orders\"".into(),
                "store.schema",
                "`Orders` is not a plain SQL identifier (lowercase letter or _, then letters, digits or _, at most 63)",
            ),
            (
                "[service]\nname = \" \"".into(),
                "service.name",
                "must not be empty",
            ),
            (
                "[transport]\npublisher_window = 0".into(),
                "transport.publisher_window",
                "must be at least 1",
            ),
            (
                "[transport]\nprefetch = 0".into(),
                "transport.prefetch",
                "must be at least 1",
            ),
            (
                "[transport]\nmax_message_bytes = 0".into(),
                "transport.max_message_bytes",
                "must be at least 1",
            ),
            (
                "[transport]\nsend_timeout_ms = 0".into(),
                "transport.send_timeout_ms",
                "must be at least 1",
            ),
            (
                "[routing]\ntopics = { OrderCreated = \" \" }".into(),
                "routing.topics.OrderCreated",
                "topic must not be empty",
            ),
            (
                "[routing]\nsubscriptions = [{ topic = \"t\", name = \"\" }]".into(),
                "routing.subscriptions[0]",
                "topic and name must not be empty",
            ),
            (
                format!("{amqp}[transport.amqp]\ntopic_address = \"/exchange/orders\""),
                "transport.amqp.topic_address",
                "`/exchange/orders` must contain {topic}",
            ),
            (
                format!("{amqp}[transport.amqp]\ntopic_address = \"/exchange/{{topc}}\""),
                "transport.amqp.topic_address",
                "`/exchange/{topc}` must contain {topic}",
            ),
            (
                format!("{amqp}[transport.amqp]\ntopic_address = \"/exchange/{{topic}}.{{x}}\""),
                "transport.amqp.topic_address",
                "`/exchange/{topic}.{x}` has an unknown placeholder (known: {topic}, {subscription})",
            ),
            (
                format!("{amqp}[transport.amqp]\nsubscription_address = \"/amq/queue/{{topic}}\""),
                "transport.amqp.subscription_address",
                "`/amq/queue/{topic}` must contain {subscription}",
            ),
            (
                format!("{amqp}[transport.amqp]\naddresses = {{ \"a/b/c\" = \"x\" }}"),
                "transport.amqp.addresses",
                "`a/b/c` must be TOPIC or TOPIC/SUBSCRIPTION",
            ),
            (
                format!("{amqp}[transport.amqp]\naddresses = {{ \" \" = \"x\" }}"),
                "transport.amqp.addresses",
                "` ` must be TOPIC or TOPIC/SUBSCRIPTION",
            ),
            (
                format!("{amqp}[transport.amqp]\naddresses = {{ \"orders\" = \" \" }}"),
                "transport.amqp.addresses.orders",
                "address must not be empty",
            ),
            (
                format!(
                    "{amqp}[transport.amqp]\nconnection_string = \"Endpoint=sb://x/;SharedAccessKeyName=k\""
                ),
                "transport.amqp.connection_string",
                "the connection string has no SharedAccessKey",
            ),
            (
                "[transport]\nkind = \"amqp\"\namqp_url = \"http://u:secret@x\"".into(),
                "transport.amqp_url",
                "`http://u:***@x` must start with amqp:// or amqps://",
            ),
            (
                "[transport]\nkind = \"amqp\"\namqp_url = \"amqp://u:p@:5672\"".into(),
                "transport.amqp_url",
                "`amqp://u:***@:5672` has no host",
            ),
            (
                "[transport]\nkind = \"amqp\"\namqp_url = \"amqp://h:99999\"".into(),
                "transport.amqp_url",
                "`amqp://h:99999` has an invalid port",
            ),
            (
                format!("{amqp}[transport.amqp]\nauth = \"cbs\""),
                "transport.amqp.auth",
                "\"cbs\" needs transport.amqp.connection_string (its key signs the tokens)",
            ),
            (
                "[transport]\nkind = \"amqp\"\namqp_url = \"amqp://h\"".into(),
                "transport.amqp.auth",
                "\"plain\" needs a user in transport.amqp_url (amqp://USER:PASSWORD@HOST) or a connection_string; use \"anonymous\" otherwise",
            ),
            (
                format!("{amqp}[transport.amqp]\nconnect_timeout_ms = 0"),
                "transport.amqp.connect_timeout_ms",
                "must be at least 1",
            ),
            (
                format!("{amqp}[transport.amqp]\nreconnect_backoff_base_ms = 0"),
                "transport.amqp.reconnect_backoff_base_ms",
                "must be between 1 and transport.amqp.reconnect_backoff_max_ms (10000), got 0",
            ),
            (
                format!(
                    "{amqp}[transport.amqp]\nreconnect_backoff_base_ms = 5000\nreconnect_backoff_max_ms = 100"
                ),
                "transport.amqp.reconnect_backoff_base_ms",
                "must be between 1 and transport.amqp.reconnect_backoff_max_ms (100), got 5000",
            ),
            (
                format!(
                    "{amqp}[transport.amqp]\ntoken_ttl_seconds = 59\ntoken_renew_before_seconds = 30"
                ),
                "transport.amqp.token_ttl_seconds",
                "must be at least 60, got 59",
            ),
            (
                format!("{amqp}[transport.amqp]\ntoken_renew_before_seconds = 0"),
                "transport.amqp.token_renew_before_seconds",
                "must be between 1 and transport.amqp.token_ttl_seconds (3600) - 1, got 0",
            ),
            (
                format!(
                    "{amqp}[transport.amqp]\ntoken_ttl_seconds = 600\ntoken_renew_before_seconds = 600"
                ),
                "transport.amqp.token_renew_before_seconds",
                "must be between 1 and transport.amqp.token_ttl_seconds (600) - 1, got 600",
            ),
        ];
        for (text, key, message) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid {
                    key: k, message: m, ..
                }) => {
                    assert_eq!((k.as_str(), m.as_str()), (key, message), "{text}");
                }
                other => panic!("{text}: expected {key} to fail, got {:?}", other.err()),
            }
        }
        if cfg!(feature = "metrics") {
            let e = parse("[telemetry]\nmetrics_listen = \"localhost\"")
                .err()
                .unwrap();
            assert_eq!(e.key(), Some("telemetry.metrics_listen"));
            assert!(e.to_string().contains("not an IP:PORT"), "{e}");
            let c = parse("[telemetry]\nmetrics_listen = \"127.0.0.1:0\"").unwrap();
            assert_eq!(c.telemetry.metrics_addr(), Some(([127, 0, 0, 1], 0).into()));
        } else {
            let e = parse("[telemetry]\nmetrics_listen = \"127.0.0.1:0\"")
                .err()
                .unwrap();
            assert!(e.to_string().contains("feature `metrics`"), "{e}");
        }
        assert_eq!(parse("").unwrap().telemetry.metrics_addr(), None);
        // The defaults pass every check, with either transport.
        parse("").unwrap();
        parse(amqp).unwrap();
    }
}
