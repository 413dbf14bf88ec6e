//! TLS for the Postgres store's connections: what `store.database_url`'s `sslmode` (and
//! `sslrootcert`) and `store.tls_ca_file` ask for, as one connector for every connection the
//! store and the CLI open (the pool, the LISTEN connection, migrations).
//!
//! The URL is read as libpq reads it, which is what users of these URLs know (and what cloud
//! providers' connection strings are written for):
//! - `sslmode=disable`, or `prefer` (also what a URL without `sslmode` means): no TLS. (libpq's
//!   `prefer` tries TLS first; here it stays plain, as before TLS was supported, so a URL without
//!   `sslmode` behaves as it always did.)
//! - `sslmode=require`: TLS, without verifying the server's certificate, as libpq does when no
//!   root certificate is given: encryption, no protection against an impostor.
//! - `sslmode=verify-ca`: TLS, the certificate chain verified; `sslmode=verify-full`: the chain
//!   and the host name. The CA is `sslrootcert=PATH` in the URL, or `store.tls_ca_file`, or
//!   (`sslrootcert=system`, or neither given) the system's trusted roots.
//! - `store.tls_ca_file` set with `prefer` or `require`: as `verify-full` against that CA;
//!   `sslrootcert` with `prefer` or `require`: as `verify-ca` (libpq does so when `require`
//!   finds a root certificate).
//!
//! tokio-postgres itself knows only `disable`, `prefer` and `require` and no `sslrootcert`: the
//! rest is taken out of the URL here before it is parsed. This module must not open connections
//! and must not log the URL (it may hold a password).

use crate::config::Config;
use postgres_native_tls::{MakeTlsConnector, TlsConnector, TlsStream};
use secrecy::ExposeSecret;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// The TLS connector of the store's connections: native-tls where the settings ask for TLS,
/// none where they do not. Building a native-tls connector reads the system's trusted roots
/// (96% of the instructions of a `whizbang migrate` over a plain connection), so a plain
/// configuration builds none. Its connections are made with `sslmode=disable`, which never
/// asks the connector for a handshake.
#[derive(Clone)]
pub struct DatabaseTls(Option<MakeTlsConnector>);

impl DatabaseTls {
    /// Whether connections go without TLS (`sslmode=disable`, or `prefer` without a CA).
    pub fn is_plain(&self) -> bool {
        self.0.is_none()
    }
}

/// Whether every host of `pg` is this machine (loopback or a Unix socket), where a connection
/// without TLS exposes nothing on a network.
pub fn only_local_hosts(pg: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    pg.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    })
}

impl<S> MakeTlsConnect<S> for DatabaseTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = DatabaseTlsConnect;
    type Error = native_tls::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<DatabaseTlsConnect, native_tls::Error> {
        match &mut self.0 {
            Some(make) => MakeTlsConnect::<S>::make_tls_connect(make, domain)
                .map(|c| DatabaseTlsConnect(Some(c))),
            None => Ok(DatabaseTlsConnect(None)),
        }
    }
}

/// One connection's handshake (see [`DatabaseTls`]).
pub struct DatabaseTlsConnect(Option<TlsConnector>);

type Handshake<S> = Pin<
    Box<dyn Future<Output = Result<TlsStream<S>, Box<dyn std::error::Error + Send + Sync>>> + Send>,
>;

impl<S> TlsConnect<S> for DatabaseTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        match self.0 {
            Some(connector) => Box::pin(async move { Ok(connector.connect(stream).await?) }),
            // Unreachable with the settings `database_config` makes; an error, not a panic.
            None => Box::pin(std::future::ready(Err(
                "TLS was asked for on a connection configured without it".into(),
            ))),
        }
    }
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Nothing (libpq's `require`).
    Nothing,
    /// The chain, against the CA (libpq's `verify-ca`).
    Chain,
    /// The chain and the host name (libpq's `verify-full`).
    Full,
}

/// The parts of a libpq URL that tokio-postgres does not read.
#[derive(Debug, Default, PartialEq, Eq)]
struct LibpqTls {
    verify: Option<Verify>,
    root_cert: Option<String>,
}

/// `url` without `sslmode=verify-ca|verify-full` and `sslrootcert=…`, and what they said
/// (`verify-*` becomes `sslmode=require` for tokio-postgres).
fn take_libpq_tls(url: &str) -> Result<(String, LibpqTls), String> {
    let mut tls = LibpqTls::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), tls));
    };
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|e| format!("store.database_url: {key} is not UTF-8: {e}"))?;
        match (key, value.as_ref()) {
            ("sslmode", "verify-ca") => {
                tls.verify = Some(Verify::Chain);
                kept.push("sslmode=require".to_string());
            }
            ("sslmode", "verify-full") => {
                tls.verify = Some(Verify::Full);
                kept.push("sslmode=require".to_string());
            }
            ("sslrootcert", path) => tls.root_cert = Some(path.to_string()),
            _ => kept.push(param.to_string()),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

/// The connection settings of `store.database_url` and the TLS connector its connections use.
/// The error names the setting at fault (never the URL, which may hold a password).
pub fn database_config(config: &Config) -> Result<(tokio_postgres::Config, DatabaseTls), String> {
    let (url, libpq) = take_libpq_tls(config.store.database_url.expose_secret())?;
    let mut pg = tokio_postgres::Config::from_str(&url)
        .map_err(|e| format!("invalid store.database_url: {e}"))?;
    // Only a CA the URL alone names is libpq's `sslrootcert`; one `store.tls_ca_file` names
    // too (the same file) asks for the setting's full verification.
    let ca_in_url = libpq.root_cert.is_some() && config.store.tls_ca_file.is_empty();
    let ca_file = match (&libpq.root_cert, config.store.tls_ca_file.as_str()) {
        (Some(url_ca), file) if !file.is_empty() && url_ca != file => {
            return Err(format!(
                "store.database_url names sslrootcert={url_ca} and store.tls_ca_file names \
                 {file}: give the CA once"
            ));
        }
        (Some(url_ca), _) => Some(url_ca.clone()),
        (None, "") => None,
        (None, file) => Some(file.to_string()),
    };
    let verify = match (libpq.verify, pg.get_ssl_mode(), &ca_file) {
        (Some(v), _, _) => v,
        (None, SslMode::Disable, Some(file)) => {
            return Err(format!(
                "a CA for the database is given ({file}) but store.database_url says sslmode=disable"
            ));
        }
        // libpq verifies the chain when `require` finds a root certificate; the CA of
        // `store.tls_ca_file` is there to verify the server: chain and name.
        (None, _, Some(_)) if ca_in_url => Verify::Chain,
        (None, _, Some(_)) => Verify::Full,
        (None, SslMode::Prefer, None) => {
            pg.ssl_mode(SslMode::Disable);
            Verify::Nothing
        }
        (None, _, None) => Verify::Nothing,
    };
    if verify != Verify::Nothing {
        pg.ssl_mode(SslMode::Require);
    }
    if pg.get_ssl_mode() == SslMode::Disable {
        return Ok((pg, DatabaseTls(None)));
    }
    let mut builder = native_tls::TlsConnector::builder();
    match verify {
        Verify::Nothing => {
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        Verify::Chain => {
            builder.danger_accept_invalid_hostnames(true);
        }
        Verify::Full => {}
    }
    // `system` (libpq 16) or no CA at all with verification asked: the system's roots.
    if let Some(file) = ca_file.filter(|f| f != "system") {
        let pem = std::fs::read(&file).map_err(|e| format!("database CA file {file}: {e}"))?;
        let ca = native_tls::Certificate::from_pem(&pem)
            .map_err(|e| format!("database CA file {file} is not a PEM certificate: {e}"))?;
        builder.add_root_certificate(ca);
    }
    let connector = builder
        .build()
        .map_err(|e| format!("TLS setup for the database: {e}"))?;
    Ok((pg, DatabaseTls(Some(MakeTlsConnector::new(connector)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machine_counts_as_local() {
        let local = |url: &str| only_local_hosts(&url.parse::<tokio_postgres::Config>().unwrap());
        assert!(local("postgres://u@127.0.0.1/db"));
        assert!(local("postgres://u@localhost:5433/db"));
        assert!(local("host=::1 user=u"));
        assert!(local("host=/var/run/postgresql user=u"));
        assert!(!local("postgres://u@db.example.com/db"));
        assert!(!local("postgres://u@10.0.0.5/db"));
        assert!(!local("host=127.0.0.1,db.example.com user=u"));
    }

    fn mode(url: &str, ca_file: &str) -> Result<SslMode, String> {
        let mut c = Config::default();
        c.store.database_url = url.into();
        c.store.tls_ca_file = ca_file.into();
        database_config(&c).map(|(pg, _)| pg.get_ssl_mode())
    }

    #[test]
    fn the_url_decides_without_a_ca_file() {
        let base = "postgres://u@h/db";
        assert_eq!(mode(base, "").unwrap(), SslMode::Disable);
        assert_eq!(
            mode(&format!("{base}?sslmode=prefer"), "").unwrap(),
            SslMode::Disable
        );
        assert_eq!(
            mode(&format!("{base}?sslmode=require"), "").unwrap(),
            SslMode::Require
        );
        // verify-* with no CA named: the system's roots.
        let full = format!("{base}?sslmode=verify-full&application_name=x");
        assert_eq!(mode(&full, "").unwrap(), SslMode::Require);
    }

    #[test]
    fn a_plain_configuration_builds_no_tls_connector() {
        let tls = |url: &str| {
            let mut c = Config::default();
            c.store.database_url = url.into();
            database_config(&c).map(|(_, tls)| tls.0.is_some()).unwrap()
        };
        assert!(!tls("postgres://u@h/db"));
        assert!(!tls("postgres://u@h/db?sslmode=prefer"));
        assert!(!tls("postgres://u@h/db?sslmode=disable"));
        assert!(tls("postgres://u@h/db?sslmode=require"));
        assert!(tls("postgres://u@h/db?sslmode=verify-full"));
    }

    #[test]
    fn libpq_options_are_taken_out_of_the_url() {
        let (url, tls) = take_libpq_tls(
            "postgres://u:p@h:5432/db?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p@h:5432/db?sslmode=require&connect_timeout=3"
        );
        assert_eq!(tls.verify, Some(Verify::Chain));
        assert_eq!(tls.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (url, tls) = take_libpq_tls("postgres://h/db?sslrootcert=system").unwrap();
        assert_eq!((url.as_str(), tls.verify), ("postgres://h/db", None));
        let (url, _) = take_libpq_tls("postgres://h/db").unwrap();
        assert_eq!(url, "postgres://h/db");
    }

    #[test]
    fn a_ca_file_requires_tls_and_must_be_readable() {
        let missing = mode("postgres://u@h/db", "/nonexistent/ca.pem").unwrap_err();
        assert!(
            missing.contains("database CA file /nonexistent/ca.pem"),
            "{missing}"
        );
        let in_url = mode(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/url.pem",
            "",
        )
        .unwrap_err();
        assert!(in_url.contains("/nonexistent/url.pem"), "{in_url}");
        let clash = mode("postgres://u@h/db?sslmode=disable", "/nonexistent/ca.pem").unwrap_err();
        assert!(clash.contains("sslmode=disable"), "{clash}");
        let twice = mode("postgres://u@h/db?sslrootcert=/a.pem", "/b.pem").unwrap_err();
        assert!(twice.contains("give the CA once"), "{twice}");
    }
}
