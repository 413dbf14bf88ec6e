//! A database password never reaches an error or a log line, in any form the driver accepts
//! (`user:pass@` in the URL, `?password=` in its query, libpq's `key=value`), whether the
//! database refuses the connection at once (an unknown database) or start-up retries an
//! unreachable one and logs each retry.

use crate::support::captured_logs;
use crate::support::pg;
use std::error::Error as _;
use uuid::Uuid;
use whizbang::Runtime;
use whizbang::config::StoreBackend;

/// The connection strings of every form, to `host:port` and a database that does not exist,
/// each carrying `secret`.
fn forms(port: u16, secret: &str) -> Vec<String> {
    let db = format!("no_such_db_{}", Uuid::now_v7().simple());
    vec![
        format!("postgres://postgres:{secret}@127.0.0.1:{port}/{db}"),
        format!("postgres://postgres@127.0.0.1:{port}/{db}?password={secret}&sslmode=disable"),
        format!("host=127.0.0.1 port={port} user=postgres password={secret} dbname={db}"),
        format!("host=127.0.0.1 port={port} user=postgres password='{secret} x' dbname={db}"),
    ]
}

/// Starts a runtime on `url` and answers everything it said: the error's text, its `Debug`
/// and every cause beneath it.
async fn start_failure(url: &str, startup_timeout_ms: u64) -> String {
    let mut c = whizbang::Config::default();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = url.into();
    c.store.schema = pg::new_schema();
    c.store.startup_timeout_ms = startup_timeout_ms;
    match Runtime::builder(c).start().await {
        Ok(_) => panic!("a runtime started on a database that does not exist"),
        Err(e) => {
            let mut said = format!("{e}\n{e:?}");
            let mut cause = e.source();
            while let Some(c) = cause {
                said.push_str(&format!("\n{c}\n{c:?}"));
                cause = c.source();
            }
            said
        }
    }
}

#[actix::test]
async fn a_refused_database_never_shows_the_password() {
    let _pg = pg::slot().await;
    let logs = captured_logs();
    let secret = format!("S3cret{}", Uuid::now_v7().simple());
    for url in forms(5432, &secret) {
        let said = start_failure(&url, 60_000).await;
        assert!(
            said.contains("no_such_db"),
            "the error names the database: {said}"
        );
        assert!(
            !said.contains(&secret),
            "the password leaked from {url:?}: {said}"
        );
    }
    let leaked = crate::support::log_lines_with(&logs, &secret);
    assert!(
        leaked.is_empty(),
        "the password reached the log: {leaked:?}"
    );
}

#[actix::test]
async fn retries_of_an_unreachable_database_never_log_the_password() {
    let logs = captured_logs();
    let secret = format!("S3cret{}", Uuid::now_v7().simple());
    // A port nothing listens on: start-up retries, logging each attempt, until its timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    for url in forms(port, &secret) {
        let said = start_failure(&url, 400).await;
        assert!(said.contains("unreachable"), "{said}");
        assert!(
            !said.contains(&secret),
            "the password leaked from {url:?}: {said}"
        );
    }
    let retries = crate::support::log_lines_with(&logs, &format!("127.0.0.1:{port}"));
    assert!(
        !retries.is_empty(),
        "each retry is logged, naming the database"
    );
    let leaked = crate::support::log_lines_with(&logs, &secret);
    assert!(
        leaked.is_empty(),
        "the password reached the log: {leaked:?}"
    );
}

/// `sslmode=prefer`, or no `sslmode` at all, connects without TLS (libpq would try TLS first):
/// off this machine the store warns, naming the endpoint without the password, that the
/// password and the data travel in clear; `sslmode=require` is not warned about. The host is
/// TEST-NET-1 (never routed), so nothing is ever sent.
#[actix::test]
async fn a_plaintext_connection_off_this_machine_is_warned_about_without_the_password() {
    let logs = captured_logs();
    let secret = format!("S3cret{}", Uuid::now_v7().simple());
    let db = |case: &str| format!("warned_{case}_{}", Uuid::now_v7().simple());
    let (absent, prefer, keyvalue, require) = (db("absent"), db("prefer"), db("kv"), db("req"));
    for url in [
        format!("postgres://postgres:{secret}@192.0.2.1:5432/{absent}"),
        format!("postgres://postgres@192.0.2.1:5432/{prefer}?sslmode=prefer&password={secret}"),
        format!("host=192.0.2.1 user=postgres password={secret} dbname={keyvalue}"),
        format!("postgres://postgres:{secret}@192.0.2.1:5432/{require}?sslmode=require"),
    ] {
        let said = start_failure(&url, 300).await;
        assert!(!said.contains(&secret), "the password leaked: {said}");
    }
    for warned in [&absent, &prefer, &keyvalue] {
        let lines: Vec<String> = crate::support::log_lines_with(&logs, warned)
            .into_iter()
            .filter(|l| l.contains("not encrypted"))
            .collect();
        assert_eq!(lines.len(), 1, "{warned}: one warning: {lines:?}");
        assert!(
            lines[0].contains("postgres://postgres@192.0.2.1"),
            "{}",
            lines[0]
        );
    }
    let required: Vec<String> = crate::support::log_lines_with(&logs, &require)
        .into_iter()
        .filter(|l| l.contains("not encrypted"))
        .collect();
    assert!(
        required.is_empty(),
        "TLS required, no warning: {required:?}"
    );
    let leaked = crate::support::log_lines_with(&logs, &secret);
    assert!(
        leaked.is_empty(),
        "the password reached the log: {leaked:?}"
    );
}
