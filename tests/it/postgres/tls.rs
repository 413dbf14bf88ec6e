//! TLS to the database (`store::postgres::tls`), against the local server, which runs with `ssl = on`
//! and Debian's self-signed certificate:
//! - `sslmode=require` in `store.database_url`: every connection of the store (the pool and the
//!   LISTEN connection) is encrypted, as the server itself reports in `pg_stat_ssl`;
//! - `store.tls_ca_file` naming a CA that did not sign the server's certificate: the store
//!   refuses the server, with the reason;
//! - a TLS-terminating proxy in front of the server, with a certificate made for the run for
//!   `localhost`, given as `store.tls_ca_file` or as libpq's `sslrootcert` with
//!   `sslmode=verify-full` / `verify-ca` in the URL: the store works through it when it names the
//!   server `localhost`, refuses it by its address (which the certificate does not name) except
//!   with `verify-ca`, and refuses it against the system's roots.
//!
//! Each test uses a schema of its own; an unreachable server, or one without TLS, fails it.

use crate::support::pg::{self, connect, database_url, drop_schemas, new_schema};
use crate::support::tls::TestCert;
use std::str::FromStr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use whizbang::Config;
use whizbang::config::StoreBackend;
use whizbang::store::postgres::PostgresStore;
use whizbang::store::{Store, StoreError};

/// `database_url()` with `sslmode` set (replacing any the URL had).
fn with_sslmode(mode: &str) -> String {
    let url = database_url();
    let (base, query) = url.split_once('?').unwrap_or((&url, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("sslmode="))
        .collect();
    let mode = format!("sslmode={mode}");
    params.push(&mode);
    format!("{base}?{}", params.join("&"))
}

fn config(url: String, service: &str) -> Config {
    let mut c = Config::default();
    c.service.name = service.into();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = url.into();
    c.store.schema = new_schema();
    c.store.pool_size = 2;
    c.store.startup_timeout_ms = 3_000;
    c
}

/// Drops a test's schema; a failure to drop does not fail the test.
async fn drop_schema(schema: &str) {
    let _ = drop_schemas(&[schema]).await;
}

#[tokio::test]
async fn sslmode_require_encrypts_every_connection_of_the_store() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        ssl, "on",
        "this test needs a server with ssl = on (Debian's packages set it up with a \
         self-signed certificate)"
    );
    let service = format!("tls-{}", Uuid::now_v7().simple());
    let c = config(with_sslmode("require"), &service);
    let store = PostgresStore::connect(&c)
        .await
        .expect("the store connects with sslmode=require");
    // Work through the pool, so that its connections exist.
    let instance = Uuid::now_v7();
    store
        .register_instance(instance, &service, "host")
        .await
        .unwrap();
    store.heartbeat(instance).await.unwrap();
    let rows = client
        .query(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
              WHERE a.application_name = $1",
            &[&format!("whizbang:{service}")],
        )
        .await
        .unwrap();
    let encrypted: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    // At least one pooled connection and the LISTEN connection.
    assert!(
        encrypted.len() >= 2 && encrypted.iter().all(|&e| e),
        "the store's connections, encrypted or not: {encrypted:?}"
    );
    drop(store);
    drop_schema(&c.store.schema).await;
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_servers_certificate_is_refused() {
    let _pg = pg::slot().await;
    // Any public root CA: none of them signed the server's self-signed certificate.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    assert!(
        std::path::Path::new(bundle).exists(),
        "this test needs the ca-certificates package ({bundle})"
    );
    let mut c = config(database_url(), "tls-refused");
    c.store.tls_ca_file = bundle.into();
    let schema = c.store.schema.clone();
    refused_at_once(
        c,
        "certificate verify failed",
        "the store trusted a server whose certificate its CA did not sign",
    )
    .await;
    drop_schema(&schema).await;
}

/// Opens a store with `c` and expects it refused with `reason`, at once: waiting will not
/// change the reason, so start-up must not retry it for its timeout (60 s here).
async fn refused_at_once(mut c: Config, reason: &str, accepted: &str) {
    c.store.startup_timeout_ms = 60_000;
    let started = std::time::Instant::now();
    let refused = match PostgresStore::connect(&c).await {
        Ok(_) => panic!("{accepted}"),
        Err(e) => e,
    };
    assert!(
        matches!(&refused, StoreError::Refused { message, .. } if message.contains(reason)),
        "the reason is given: {refused}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "refused at once: took {:?}",
        started.elapsed()
    );
}

/// A server that answers every `SSLRequest` with `N` (no TLS here), on an ephemeral port.
async fn server_without_tls() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                if tcp.read_exact(&mut request).await.is_ok() {
                    let _ = tcp.write_all(b"N").await;
                    // Held open: the client, not the server, must give up.
                    let _ = tcp.read(&mut [0u8; 64]).await;
                }
            });
        }
    });
    Ok(port)
}

#[tokio::test]
async fn a_server_without_tls_is_refused_at_once_when_tls_is_required() -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let port = server_without_tls().await?;
    let c = config(
        format!("postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require"),
        "tls-none",
    );
    refused_at_once(
        c,
        "server does not support TLS",
        "the store connected without TLS where the URL requires it",
    )
    .await;
    Ok(())
}

/// Answers a client's `SSLRequest` with `S` on an ephemeral port, accepts TLS with `cert`, and
/// relays the plaintext to the test server: a server with a certificate of the test's making.
async fn pg_tls_proxy(cert: &TestCert) -> anyhow::Result<u16> {
    let identity = native_tls::Identity::from_pkcs8(
        &std::fs::read(cert.cert())?,
        &std::fs::read(cert.key())?,
    )?;
    let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let pg = tokio_postgres::Config::from_str(&database_url())?;
    let upstream = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => {
            format!("{host}:{}", pg.get_ports().first().copied().unwrap_or(5432))
        }
        _ => anyhow::bail!("this test needs a TCP host in the database URL"),
    };
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // SSLRequest: length 8, then the code 80877103.
                let mut request = [0u8; 8];
                if tcp.read_exact(&mut request).await.is_err()
                    || request != [0, 0, 0, 8, 4, 210, 22, 47]
                {
                    return;
                }
                if tcp.write_all(b"S").await.is_err() {
                    return;
                }
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream.as_str()).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                }
            });
        }
    });
    Ok(port)
}

/// Opens a store on `url` (with `ca_file` as `store.tls_ca_file`), works through its pool,
/// and drops its schema; the store's error if it cannot open.
async fn store_works(url: String, ca_file: &str) -> Result<(), StoreError> {
    let mut c = config(url, "tls-verify");
    c.store.tls_ca_file = ca_file.into();
    let result = async {
        let store = PostgresStore::connect(&c).await?;
        let instance = Uuid::now_v7();
        store
            .register_instance(instance, "tls-verify", "host")
            .await?;
        store.heartbeat(instance).await.map(|_| ())
    }
    .await;
    drop_schema(&c.store.schema).await;
    result
}

fn refused_for_its_certificate(result: Result<(), StoreError>, case: &str) {
    match result {
        Ok(()) => panic!("{case}: a certificate for localhost was accepted for 127.0.0.1"),
        Err(e) => assert!(
            e.to_string().contains("certificate verify failed"),
            "{case}: the reason is given: {e}"
        ),
    }
}

#[tokio::test]
async fn a_ca_verifies_the_servers_certificate_and_its_name() -> anyhow::Result<()> {
    let _pg = pg::slot().await;
    let cert = TestCert::new()?;
    let port = pg_tls_proxy(&cert).await?;
    let pg = tokio_postgres::Config::from_str(&database_url())?;
    let user = pg.get_user().unwrap_or("postgres");
    let db = pg.get_dbname().unwrap_or("postgres");
    let ca = cert.cert().display().to_string();
    // Named as the certificate names it (and reached at 127.0.0.1), or by its address.
    let by_name = format!("postgres://{user}@localhost:{port}/{db}?hostaddr=127.0.0.1");
    let by_address = format!("postgres://{user}@127.0.0.1:{port}/{db}");

    // store.tls_ca_file: chain and name.
    store_works(by_name.clone(), &ca).await?;
    refused_for_its_certificate(store_works(by_address.clone(), &ca).await, "tls_ca_file");
    // libpq's URL options: verify-full checks the name, verify-ca only the chain.
    store_works(
        format!("{by_name}&sslmode=verify-full&sslrootcert={ca}"),
        "",
    )
    .await?;
    refused_for_its_certificate(
        store_works(
            format!("{by_address}?sslmode=verify-full&sslrootcert={ca}"),
            "",
        )
        .await,
        "verify-full",
    );
    store_works(
        format!("{by_address}?sslmode=verify-ca&sslrootcert={ca}"),
        "",
    )
    .await?;
    // verify-full without a CA: the system's roots, which do not know this certificate.
    refused_for_its_certificate(
        store_works(format!("{by_name}&sslmode=verify-full"), "").await,
        "system roots",
    );
    Ok(())
}
