//! The `whizbang` operator CLI against the real Postgres server (`WHIZBANG_TEST_DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`): migrate, list, requeue and skip dead
//! letters, exit codes, refusals of bad configuration, and never printing the password.
//!
//! Each test works in its own schema (`t_<uuid>`), so they run in parallel. A server that
//! cannot be reached fails the test: nothing here skips.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;
use whizbang::store::postgres::migrate::{FUNCTIONS, MIGRATIONS, migrate};

fn database_url() -> String {
    std::env::var("WHIZBANG_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn new_schema() -> String {
    format!("t_{}", Uuid::now_v7().simple())
}

async fn connect() -> Client {
    let url = database_url();
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(&url, NoTls),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out connecting to the test database {url}"))
    .unwrap_or_else(|e| {
        panic!("cannot reach the test database {url} (set WHIZBANG_TEST_DATABASE_URL): {e}")
    });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

async fn drop_schema(client: &Client, schema: &str) {
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .expect("drop test schema");
}

async fn recorded(client: &Client, schema: &str) -> Vec<(i32, String, String)> {
    client
        .query(
            &format!("SELECT version, name, checksum FROM {schema}.wb_migrations ORDER BY version"),
            &[],
        )
        .await
        .expect("read wb_migrations")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The repository's root (this crate sits at `<root>/cli`), where `config/` lives.
fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn postgres_config() -> String {
    repository()
        .join("config/postgres.toml")
        .display()
        .to_string()
}

/// Runs `whizbang --config <config> <args>` against `schema`.
fn cli(config: &str, schema: &str, url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whizbang"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("WHIZBANG_DATABASE_URL", url)
        .env("WHIZBANG_SCHEMA", schema)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the whizbang binary")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The test URL with a password added (trust auth ignores it), to check it is never printed.
fn url_with_password() -> String {
    let url = database_url();
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((user, host)) = rest.split_once('@')
        && !user.contains(':')
    {
        return format!("{scheme}://{user}:hunter2secret@{host}");
    }
    url
}

#[tokio::test]
async fn cli_migrates_and_lists_dead_letters_on_an_empty_schema() {
    let schema = new_schema();
    let url = url_with_password();
    let config = postgres_config();

    let out = cli(&config, &schema, &url, &["migrate"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "migrate: {stdout}\n{stderr}");
    let files = MIGRATIONS
        .iter()
        .map(|m| m.name.to_string())
        .chain(FUNCTIONS.iter().map(|f| format!("functions/{}", f.name)));
    for name in files {
        assert!(stdout.contains(&name), "lists {name}: {stdout}");
    }
    assert!(stdout.contains(&schema), "{stdout}");
    assert!(
        !stdout.contains("hunter2secret") && !stderr.contains("hunter2secret"),
        "the password is never printed: {stdout}\n{stderr}"
    );

    let out = cli(&config, &schema, &url, &["migrate"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("up to date"), "second run: {stdout}");
    assert!(!stdout.contains("hunter2secret") && !stderr.contains("hunter2secret"));

    let client = connect().await;
    assert_eq!(recorded(&client, &schema).await.len(), MIGRATIONS.len());

    let out = cli(&config, &schema, &url, &["dead-letters", "list"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("no dead letters"), "{stdout}");
    drop_schema(&client, &schema).await;
}

/// A database name the server does not know is not retried until `store.startup_timeout_ms`
/// (60 s in `config/postgres.toml`): waiting will not create it.
#[test]
fn cli_reports_a_missing_database_at_once() {
    let url = url_with_password();
    let (base, _) = url
        .rsplit_once('/')
        .expect("a database URL ends in /DATABASE");
    let missing = format!("wb_missing_{}", Uuid::now_v7().simple());
    let started = std::time::Instant::now();
    let out = cli(
        &postgres_config(),
        &new_schema(),
        &format!("{base}/{missing}"),
        &["migrate"],
    );
    let elapsed = started.elapsed();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("database refused the connection")
            && stderr.contains(&format!("database \"{missing}\" does not exist")),
        "the reason is given: {stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "refused at once, not retried for the start-up timeout: took {elapsed:?}"
    );
    assert!(!stderr.contains("hunter2secret"), "{stderr}");
}

#[tokio::test]
async fn cli_lists_requeues_and_skips_dead_letters() {
    let schema = new_schema();
    let url = database_url();
    let config = postgres_config();
    let mut client = connect().await;
    migrate(&mut client, &schema).await.unwrap();

    // Two parked rows, as the store leaves them after max attempts.
    let (outbox_id, inbox_id) = (Uuid::now_v7(), Uuid::now_v7());
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                        correlation_id, message_type, timestamp_us, meta, payload, attempts, last_error, dead)
                 VALUES ($1, 'event', 'order-7', 3, 'orders', $1, 'OrderCreated', 0, '\\x'::bytea,
                         '\\x'::bytea, 10, 'send to orders not accepted:
 quota exceeded', true)"
            ),
            &[&outbox_id],
        )
        .await
        .unwrap();
    client
        .execute(
            &format!("INSERT INTO {schema}.wb_dedup (message_id, correlation_id) VALUES ($1, $1)"),
            &[&inbox_id],
        )
        .await
        .unwrap();
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.wb_inbox (message_id, message_kind, stream_id, partition,
                        correlation_id, message_type, timestamp_us, meta, payload, attempts, last_error, dead)
                 VALUES ($1, 'event', 'stock-9', 4, $1, 'StockReserved', 0, '\\x'::bytea, '\\x'::bytea,
                         10, 'failed: inventory: out of widgets', true)"
            ),
            &[&inbox_id],
        )
        .await
        .unwrap();

    let out = cli(&config, &schema, &url, &["dead-letters", "list"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let header = stdout.lines().next().unwrap_or_default();
    for column in ["QUEUE", "MESSAGE ID", "TYPE", "STREAM", "ATTEMPTS", "ERROR"] {
        assert!(header.contains(column), "header has {column}: {stdout}");
    }
    let line_of = |id: Uuid| {
        stdout
            .lines()
            .find(|l| l.contains(&id.to_string()))
            .unwrap_or_else(|| panic!("{id} listed: {stdout}"))
            .to_string()
    };
    let o = line_of(outbox_id);
    for cell in ["outbox", "OrderCreated", "order-7", "10", "quota exceeded"] {
        assert!(o.contains(cell), "{cell} in {o:?}");
    }
    let i = line_of(inbox_id);
    for cell in ["inbox", "StockReserved", "stock-9", "out of widgets"] {
        assert!(i.contains(cell), "{cell} in {i:?}");
    }

    // Requeue: pending again, attempts reset.
    let out = cli(
        &config,
        &schema,
        &url,
        &["dead-letters", "requeue", &outbox_id.to_string()],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let row = client
        .query_one(
            &format!("SELECT dead, attempts FROM {schema}.wb_outbox WHERE message_id = $1"),
            &[&outbox_id],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i32>(1), 0);

    // Skip: gone from the inbox, marked processed for dedup.
    let out = cli(
        &config,
        &schema,
        &url,
        &["dead-letters", "skip", &inbox_id.to_string()],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let left: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.wb_inbox WHERE message_id = $1"),
            &[&inbox_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    // Nothing dead remains; an unknown id is a runtime error (1), a malformed one usage (2).
    let out = cli(&config, &schema, &url, &["dead-letters", "list"]);
    assert!(text(&out).0.contains("no dead letters"), "{:?}", text(&out));
    let out = cli(
        &config,
        &schema,
        &url,
        &["dead-letters", "skip", &inbox_id.to_string()],
    );
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(
        text(&out).1.contains(&inbox_id.to_string()),
        "{:?}",
        text(&out)
    );
    let out = cli(
        &config,
        &schema,
        &url,
        &["dead-letters", "requeue", "not-a-uuid"],
    );
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    drop_schema(&client, &schema).await;
}

#[test]
fn cli_refuses_the_memory_backend_and_bad_config() {
    let schema = new_schema();
    let memory = repository().join("config/whizbang.toml");
    let memory = &memory.display().to_string();
    let out = cli(memory, &schema, &database_url(), &["migrate"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("memory"), "says why: {stderr}");
    let out = cli(memory, &schema, &database_url(), &["dead-letters", "list"]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));

    let out = cli(
        &postgres_config(),
        "Bad-Name",
        &database_url(),
        &["migrate"],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("store.schema"), "{stderr}");

    let out = cli(
        "/nonexistent/whizbang.toml",
        &schema,
        &database_url(),
        &["migrate"],
    );
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));

    let out = Command::new(env!("CARGO_BIN_EXE_whizbang"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
}
