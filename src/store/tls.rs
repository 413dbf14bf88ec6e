//! TLS for the Postgres store's connections: what `store.database_url`'s `sslmode` and
//! `store.tls_ca_file` ask for, as one connector for every connection the store and the CLI
//! open (the pool, the LISTEN connection, migrations).
//!
//! The modes follow libpq, which is what users of these URLs know:
//! - `sslmode=disable`, or `prefer` (tokio-postgres' default when the URL names none): no TLS.
//!   (libpq's `prefer` tries TLS first; here it stays plain, as before TLS was supported, so a
//!   URL without `sslmode` behaves as it always did.)
//! - `sslmode=require`: TLS, without verifying the server's certificate, as libpq does when no
//!   root certificate is given: encryption, no protection against an impostor.
//! - `store.tls_ca_file` set: TLS on every connection, with the certificate chain checked against
//!   that CA and the host name against the certificate (libpq's `verify-full`).
//!
//! It must not open connections itself, and must not log the URL (it may hold a password).

use crate::config::Config;
use crate::store::StoreError;
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode;

/// Sets `pg`'s TLS mode from `config` and returns the connector to connect with.
pub fn configure(
    config: &Config,
    pg: &mut tokio_postgres::Config,
) -> Result<MakeTlsConnector, StoreError> {
    let ca_file = &config.store.tls_ca_file;
    let mut builder = native_tls::TlsConnector::builder();
    if ca_file.is_empty() {
        if pg.get_ssl_mode() == SslMode::Prefer {
            pg.ssl_mode(SslMode::Disable);
        }
        builder
            .danger_accept_invalid_certs(true)
            .danger_accept_invalid_hostnames(true);
    } else {
        if pg.get_ssl_mode() == SslMode::Disable {
            return Err(StoreError::Unavailable(format!(
                "store.tls_ca_file is set ({ca_file}) but store.database_url says sslmode=disable"
            )));
        }
        pg.ssl_mode(SslMode::Require);
        let pem = std::fs::read(ca_file)
            .map_err(|e| StoreError::Unavailable(format!("store.tls_ca_file {ca_file}: {e}")))?;
        let ca = native_tls::Certificate::from_pem(&pem).map_err(|e| {
            StoreError::Unavailable(format!(
                "store.tls_ca_file {ca_file} is not a PEM certificate: {e}"
            ))
        })?;
        builder.add_root_certificate(ca);
    }
    let connector = builder
        .build()
        .map_err(|e| StoreError::Unavailable(format!("TLS setup for the database: {e}")))?;
    Ok(MakeTlsConnector::new(connector))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn configured(url: &str, ca_file: &str) -> Result<SslMode, StoreError> {
        let mut c = Config::default();
        c.store.tls_ca_file = ca_file.into();
        let mut pg = tokio_postgres::Config::from_str(url).unwrap();
        configure(&c, &mut pg).map(|_| pg.get_ssl_mode())
    }

    #[test]
    fn the_url_decides_without_a_ca_file() {
        let base = "postgres://u@h/db";
        assert_eq!(configured(base, "").unwrap(), SslMode::Disable);
        let prefer = format!("{base}?sslmode=prefer");
        assert_eq!(configured(&prefer, "").unwrap(), SslMode::Disable);
        let require = format!("{base}?sslmode=require");
        assert_eq!(configured(&require, "").unwrap(), SslMode::Require);
    }

    #[test]
    fn a_ca_file_requires_tls_and_must_be_readable() {
        let missing = configured("postgres://u@h/db", "/nonexistent/ca.pem").unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("store.tls_ca_file /nonexistent/ca.pem"),
            "{missing}"
        );
        let clash =
            configured("postgres://u@h/db?sslmode=disable", "/nonexistent/ca.pem").unwrap_err();
        assert!(clash.to_string().contains("sslmode=disable"), "{clash}");
    }
}
