//! `[store]`: where the durable state lives and how it is reached.
//!
//! Owns the backend choice, the database endpoint, pool, retries and TLS CA file, the schema
//! name rule ([`is_identifier`]) and their checks. It must not connect (the store does), and
//! its `Debug` never shows the database password.

use super::{Checked, at_least_one, ensure, redact};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::fmt;

/// Where the durable state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// In-process, no server: the embedded default. Lost when the process exits.
    Memory,
    /// PostgreSQL through a bb8 pool.
    Postgres,
}

/// `[store]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Where events, outbox, inbox and leases live.
    pub backend: StoreBackend,
    /// Postgres connection URL (only read by the Postgres backend), in any form libpq reads.
    /// Held as a secret: it prints as `[REDACTED]`, and the store names the endpoint from the
    /// parsed configuration, without the password (`expose_secret` to read it).
    pub database_url: SecretString,
    /// Schema holding this service's tables: a lowercase SQL identifier.
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: u32,
    /// Attempts before a failing message is dead-lettered.
    pub max_attempts: u32,
    /// Retry backoff: base · 2^(attempt-1), capped at `backoff_max_ms`.
    pub backoff_base_ms: u64,
    /// The cap of the retry backoff.
    pub backoff_max_ms: u64,
    /// How long inbox message ids are remembered for deduplication.
    pub dedup_retention_hours: u64,
    /// Timeout of one connection attempt to the database.
    pub connect_timeout_ms: u64,
    /// How long start-up keeps retrying an unreachable database before it fails.
    pub startup_timeout_ms: u64,
    /// The server cancels any statement of the runtime's pool that runs longer (Postgres's
    /// `statement_timeout`, lock waits included), and the runtime gives up waiting for an answer
    /// this long plus 500 ms (a hung server or a half-open connection): a stalled database answers
    /// callers with a retryable error instead of holding them.
    pub statement_timeout_ms: u64,
    /// How long sent data may stay unacknowledged before the kernel drops the connection
    /// (`TCP_USER_TIMEOUT`); TCP keepalives probe an idle connection after half of it. A
    /// database host that vanished is noticed in seconds, not after the OS's two hours.
    pub tcp_user_timeout_ms: u64,
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
            statement_timeout_ms: 5_000,
            tcp_user_timeout_ms: 10_000,
            tls_ca_file: String::new(),
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Checked {
        at_least_one(&[
            ("store.max_attempts", self.max_attempts.into()),
            ("store.connect_timeout_ms", self.connect_timeout_ms),
            ("store.statement_timeout_ms", self.statement_timeout_ms),
            ("store.tcp_user_timeout_ms", self.tcp_user_timeout_ms),
            ("store.pool_size", self.pool_size.into()),
        ])?;
        ensure(
            (1..=self.backoff_max_ms).contains(&self.backoff_base_ms),
            "store.backoff_base_ms",
            || {
                format!(
                    "must be between 1 and store.backoff_max_ms ({}), got {}",
                    self.backoff_max_ms, self.backoff_base_ms
                )
            },
        )?;
        ensure(
            cfg!(feature = "postgres") || self.backend != StoreBackend::Postgres,
            "store.backend",
            || {
                "`postgres` needs whizbang's cargo feature `postgres`, which this build was \
                 compiled without (enable it, or use `memory`)"
                    .to_string()
            },
        )?;
        ensure(is_identifier(&self.schema), "store.schema", || {
            format!(
                "`{}` is not a plain SQL identifier (lowercase letter or _, then letters, digits or _, at most 63)",
                self.schema
            )
        })
    }
}

/// A lowercase SQL identifier that needs no quoting (Postgres folds unquoted names to lowercase).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("backend", &self.backend)
            .field("database_url", &redact(self.database_url.expose_secret()))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("max_attempts", &self.max_attempts)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish_non_exhaustive()
    }
}
