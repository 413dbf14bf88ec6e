//! `[transport]`: how messages travel between services.
//!
//! Owns the transport kind, the endpoint URL, the windows, the message size limit and the send
//! timeout, and their checks; the `[transport.amqp]` table is [`AmqpConfig`], checked only when
//! `kind = "amqp"`. It must not connect (the transports do), and its `Debug` never shows the
//! URL's password.

use super::{AmqpConfig, Checked, at_least_one, ensure, redact};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::fmt;

/// How messages travel between services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// In-process topics and subscriptions: the embedded default.
    Memory,
    /// AMQP 1.0 (Azure Service Bus, or RabbitMQ's AMQP 1.0 plugin in development).
    Amqp,
}

/// `[transport]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Which transport.
    pub kind: TransportKind,
    /// AMQP endpoint (`amqp://USER:PASSWORD@HOST:PORT`, or `amqps://`). Held as a secret
    /// (its password): never printed (`expose_secret` to read it).
    pub amqp_url: SecretString,
    /// Unsettled sends in flight at once (at most one per stream).
    pub publisher_window: u32,
    /// Credit: deliveries the broker may push ahead of processing.
    pub prefetch: u32,
    /// Largest payload that crosses the transport, checked when dispatching (sending side)
    /// and when receiving (see `Envelope::check_size`).
    pub max_message_bytes: u32,
    /// A send not accepted within this time is retried.
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

impl TransportConfig {
    pub(super) fn validate(&self) -> Checked {
        at_least_one(&[
            ("transport.publisher_window", self.publisher_window.into()),
            ("transport.prefetch", self.prefetch.into()),
            ("transport.max_message_bytes", self.max_message_bytes.into()),
            ("transport.send_timeout_ms", self.send_timeout_ms),
        ])?;
        if self.kind == TransportKind::Amqp {
            ensure(cfg!(feature = "amqp"), "transport.kind", || {
                "`amqp` needs whizbang's cargo feature `amqp`, which this build was compiled \
                 without (enable it, or use `memory`)"
                    .to_string()
            })?;
            self.amqp.validate(self.amqp_url.expose_secret())?;
        }
        Ok(())
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("kind", &self.kind)
            .field("amqp_url", &redact(self.amqp_url.expose_secret()))
            .field("publisher_window", &self.publisher_window)
            .field("prefetch", &self.prefetch)
            .field("amqp", &self.amqp)
            .finish_non_exhaustive()
    }
}
