//! The Service Bus connection string: the value of `transport.amqp.connection_string` (or
//! `WHIZBANG_AMQP_CONNECTION_STRING`), parsed.
//!
//! Owns the parsing of `Endpoint=sb://NS.servicebus.windows.net/;SharedAccessKeyName=…;
//! SharedAccessKey=…[;EntityPath=…][;UseDevelopmentEmulator=…]` into typed parts, with typed
//! errors that never echo the key, and what follows from the parts alone (the AMQP URL, the CBS
//! audience of an entity). It lives in the configuration because a config that loads must hold
//! a valid connection string; the transport reads the parsed value. It must not sign tokens or
//! connect (that is `crate::transport::amqp::servicebus`), nor show the key in `Debug`.

use secrecy::{ExposeSecret, SecretString};
use std::fmt;

/// A parsed Service Bus connection string. `Debug` masks the key.
#[derive(Clone)]
pub struct ConnectionString {
    /// The namespace host, e.g. `contoso.servicebus.windows.net` (with `:port` if one was given).
    pub host: String,
    /// The name of the shared access policy (`SharedAccessKeyName`).
    pub key_name: String,
    /// The policy's key (`SharedAccessKey`): a secret, never printed (`expose_secret` to
    /// sign with it).
    pub key: SecretString,
    /// Present in connection strings scoped to one entity.
    pub entity_path: Option<String>,
    /// `UseDevelopmentEmulator=true`: plain AMQP on port 5672, no TLS.
    pub use_development_emulator: bool,
}

impl PartialEq for ConnectionString {
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host
            && self.key_name == other.key_name
            && self.key.expose_secret() == other.key.expose_secret()
            && self.entity_path == other.entity_path
            && self.use_development_emulator == other.use_development_emulator
    }
}

impl Eq for ConnectionString {}

/// Why a connection string was refused. No variant carries the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("the connection string is empty")]
    /// Nothing but whitespace and separators.
    Empty,
    #[error("part {index} of the connection string is not KEY=VALUE")]
    /// A part without `=`.
    MalformedPart {
        /// The part's position, counting from 0.
        index: usize,
    },
    #[error("the connection string has no {0}")]
    /// A required key (named) is absent.
    Missing(&'static str),
    #[error("the connection string names `{0}` twice")]
    /// A key appears twice.
    Duplicate(String),
    #[error("unknown connection string key `{0}`")]
    /// A key Service Bus connection strings do not have.
    UnknownKey(String),
    #[error("Endpoint `{0}` is not of the form sb://NAMESPACE.servicebus.windows.net/")]
    /// `Endpoint` is not an `sb://` URL with a host.
    BadEndpoint(String),
    #[error("UseDevelopmentEmulator must be true or false, got `{0}`")]
    /// `UseDevelopmentEmulator` is neither `true` nor `false`.
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
            key: key.into(),
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
        assert_eq!(
            c.key.expose_secret(),
            KEY,
            "the '=' padding of the key is kept"
        );
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
}
