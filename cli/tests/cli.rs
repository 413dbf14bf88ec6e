//! The `whizbang` operator CLI against the real Postgres server (`WHIZBANG_TEST_DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`): migrate; `status` and `dead-letters
//! list|show` (table and JSON) on a message the real runtime dead-lettered; reads through a role
//! that may only SELECT; refusal of an unmigrated schema (left as it was); requeue and skip,
//! one by one and in bulk only with `--all`; exit codes, refusals of bad configuration, and
//! never printing the password. `dead-letters broker` against the real RabbitMQ
//! (`WHIZBANG_TEST_AMQP_URL`), on a topic of its own declared with scripts/amqp-topology.sh.
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
        let reason = e.as_db_error().map_or_else(
            || e.to_string(),
            |d| format!("{}: {}", d.code().code(), d.message()),
        );
        panic!("cannot reach the test database {url} (set WHIZBANG_TEST_DATABASE_URL): {reason}")
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

// ---- A dead letter left by the real runtime -----------------------------------------------

mod service {
    use serde::{Deserialize, Serialize};
    use whizbang::{
        Command, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, Receptor,
        ReceptorContext, ReceptorError,
    };

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Ship {
        pub parcel: String,
        pub weight_grams: u32,
    }
    impl Message for Ship {
        const TYPE_NAME: &'static str = "cli.Ship";
        fn stream_id(&self) -> String {
            format!("parcel-{}", self.parcel)
        }
    }
    impl Command for Ship {}

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Shipped {
        pub parcel: String,
        pub weight_grams: u32,
        pub labels: Vec<String>,
    }
    impl Message for Shipped {
        const TYPE_NAME: &'static str = "cli.Shipped";
        fn stream_id(&self) -> String {
            format!("parcel-{}", self.parcel)
        }
    }
    impl Event for Shipped {}

    pub struct Shipping;
    impl Receptor<Ship> for Shipping {
        type Result = Shipped;
        async fn handle(
            &self,
            c: Ship,
            _ctx: ReceptorContext,
        ) -> Result<Decision<Shipped>, ReceptorError> {
            Ok(Decision::event(Shipped {
                parcel: c.parcel,
                weight_grams: c.weight_grams,
                labels: vec!["fragile".into(), "this side up".into()],
            }))
        }
    }

    /// A read model whose database is gone: every event fails.
    pub struct Broken;
    impl Perspective<Shipped> for Broken {
        async fn apply(&self, e: Shipped, _m: EventMeta) -> Result<(), PerspectiveError> {
            Err(PerspectiveError(format!(
                "label printer offline for parcel {}",
                e.parcel
            )))
        }
    }
}

/// The runtime's configuration: `config/postgres.toml` in `schema`, failing fast.
fn runtime_config(schema: &str) -> whizbang::Config {
    let mut c =
        whizbang::Config::load(Path::new(&postgres_config())).expect("config/postgres.toml");
    c.service.name = "shipping".into();
    c.store.database_url = database_url().into();
    c.store.schema = schema.into();
    // The test server is shared: a small pool per runtime.
    c.store.pool_size = 2;
    c.store.max_attempts = 2;
    c.store.backoff_base_ms = 10;
    c.store.backoff_max_ms = 40;
    c.coordinator.poll_interval_ms = 20;
    c
}

/// Starts the runtime in `schema` and dead-letters one `Shipped` event (the perspective
/// always fails); returns the running runtime, the event's message id and the command's.
async fn dead_letter_in(schema: &str) -> (whizbang::Runtime, Uuid, Uuid) {
    use whizbang::{DispatchError, Runtime};
    let rt = Runtime::builder(runtime_config(schema))
        .receptor::<service::Ship, _>(service::Shipping)
        .perspective::<service::Shipped, _>("labels", service::Broken)
        .start()
        .await
        .expect("the runtime starts");
    let failed = rt
        .local_invoke::<_, service::Shipped>(service::Ship {
            parcel: "P-42".into(),
            weight_grams: 1250,
        })
        .await;
    let Err(DispatchError::PerspectiveFailed { message_id, .. }) = failed else {
        panic!("the perspective fails: {failed:?}");
    };
    let started = std::time::Instant::now();
    loop {
        let letters = rt.store().dead_letters().await.expect("dead letters");
        if letters.iter().any(|d| d.message_id == message_id) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{message_id} dead-lettered within 60 s: {letters:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let command: Uuid = connect()
        .await
        .query_one(
            &format!("SELECT causation_id FROM {schema}.wb_events WHERE message_id = $1"),
            &[&message_id],
        )
        .await
        .expect("the event is stored")
        .get(0);
    (rt, message_id, command)
}

/// `cli` run off the actix thread, so the runtime keeps heartbeating meanwhile.
async fn cli_async(config: &str, schema: &str, url: &str, args: &[&str]) -> Output {
    let (config, schema, url) = (config.to_string(), schema.to_string(), url.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&config, &schema, &url, &args)
    })
    .await
    .expect("the CLI ran")
}

fn json(out: &Output) -> serde_json::Value {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("JSON ({e}): {stdout}"))
}

#[actix_rt::test]
async fn status_and_show_describe_a_message_the_runtime_dead_lettered() {
    let schema = new_schema();
    let url = url_with_password();
    let config = postgres_config();
    let (rt, dead, command) = dead_letter_in(&schema).await;
    let instance = rt.instance_id().to_string();
    // A replay checkpoint behind the event store's head.
    rt.store()
        .save_checkpoint("labels", 0)
        .await
        .expect("save a checkpoint");

    // status, as a table: the instance, its heartbeat and leases, the dead inbox row.
    let out = cli_async(&config, &schema, &url, &["status"]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let row = stdout
        .lines()
        .find(|l| l.contains(&instance))
        .unwrap_or_else(|| panic!("instance {instance} listed: {stdout}"));
    assert!(
        row.contains("shipping") && row.contains("alive") && row.contains(" ago"),
        "{row}"
    );
    let inbox = stdout
        .lines()
        .find(|l| l.starts_with("inbox "))
        .unwrap_or_else(|| panic!("an inbox row: {stdout}"));
    let cells: Vec<&str> = inbox.split_whitespace().collect();
    // QUEUE PENDING IN-FLIGHT RETRYING DEAD OLDEST
    assert_eq!(&cells[..5], ["inbox", "0", "0", "0", "1"], "{inbox}");
    assert!(
        stdout.contains("QUEUE") && stdout.contains("OLDEST PENDING"),
        "{stdout}"
    );
    assert!(stdout.contains("event store: last position 1"), "{stdout}");
    let checkpoint = stdout
        .lines()
        .find(|l| l.starts_with("labels "))
        .unwrap_or_else(|| panic!("the labels checkpoint: {stdout}"));
    assert_eq!(
        checkpoint.split_whitespace().take(3).collect::<Vec<_>>(),
        ["labels", "0", "1"],
        "CHECKPOINT 0, BEHIND 1: {checkpoint}"
    );
    assert!(!stdout.contains("hunter2secret") && !stderr.contains("hunter2secret"));

    // status, as JSON: the same facts, keyed.
    let doc = json(&cli_async(&config, &schema, &url, &["status", "--output", "json"]).await);
    assert_eq!(doc["schema"], schema.as_str());
    assert!(!doc.to_string().contains("hunter2secret"), "{doc}");
    let instances = doc["instances"].as_array().expect("instances");
    let me = instances
        .iter()
        .find(|i| i["instance_id"] == instance.as_str())
        .unwrap_or_else(|| panic!("{instance} in {doc}"));
    assert_eq!(me["service"], "shipping");
    assert_eq!(me["alive"], true);
    assert!(
        me["heartbeat_age_seconds"].as_f64().expect("an age") < 300.0,
        "{me}"
    );
    let partitions = me["partitions"].as_array().expect("partitions");
    assert_eq!(me["leases"].as_u64(), Some(partitions.len() as u64), "{me}");
    let queue = |name: &str| {
        doc["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .find(|q| q["queue"] == name)
            .unwrap_or_else(|| panic!("queue {name} in {doc}"))
            .clone()
    };
    let inbox = queue("inbox");
    assert_eq!(inbox["dead"], 1, "{inbox}");
    assert_eq!(inbox["pending"], 0, "{inbox}");
    assert_eq!(inbox["oldest_pending_age_seconds"], serde_json::Value::Null);
    assert_eq!(queue("outbox")["dead"], 0);
    assert_eq!(doc["event_store"]["last_position"], 1);
    assert_eq!(doc["perspectives"][0]["perspective"], "labels", "{doc}");
    assert_eq!(doc["perspectives"][0]["position"], 0, "{doc}");
    assert_eq!(doc["perspectives"][0]["behind"], 1, "{doc}");
    assert_eq!(doc["partitions"]["configured"], 10000);

    // dead-letters show, as a table: the envelope, the error, the payload as JSON.
    let id = dead.to_string();
    let out = cli_async(&config, &schema, &url, &["dead-letters", "show", &id]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let field = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}  ")) || l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("field {name}: {stdout}"))
            .to_string()
    };
    assert!(field("message id").ends_with(&id), "{stdout}");
    assert!(field("type").contains("cli.Shipped (event)"), "{stdout}");
    assert!(field("stream").contains("parcel-P-42"), "{stdout}");
    assert!(
        field("correlation id").ends_with(&command.to_string()),
        "{stdout}"
    );
    assert!(
        field("causation id").ends_with(&command.to_string()),
        "{stdout}"
    );
    assert!(field("attempts").ends_with(" 2"), "{stdout}");
    assert!(
        field("last error").contains("label printer offline for parcel P-42"),
        "{stdout}"
    );
    assert!(field("hop").contains("shipping"), "{stdout}");
    assert!(stdout.contains("\"weight_grams\": 1250"), "{stdout}");
    assert!(stdout.contains("\"this side up\""), "{stdout}");

    // dead-letters show, as JSON.
    let doc = json(
        &cli_async(
            &config,
            &schema,
            &url,
            &["dead-letters", "show", &id, "--output", "json"],
        )
        .await,
    );
    assert_eq!(doc["queue"], "inbox");
    assert_eq!(doc["message_id"], id.as_str());
    assert_eq!(doc["kind"], "event");
    assert_eq!(doc["message_type"], "cli.Shipped");
    assert_eq!(doc["stream_id"], "parcel-P-42");
    assert_eq!(doc["correlation_id"], command.to_string().as_str());
    assert_eq!(doc["causation_id"], command.to_string().as_str());
    assert_eq!(doc["attempts"], 2);
    assert!(
        doc["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("label printer offline")
    );
    assert_eq!(
        doc["payload"],
        serde_json::json!({"parcel": "P-42", "weight_grams": 1250, "labels": ["fragile", "this side up"]})
    );
    assert_eq!(doc["hops"][0]["service"], "shipping");
    assert!(
        doc["created_at"]
            .as_str()
            .unwrap_or_default()
            .ends_with('Z'),
        "{doc}"
    );

    // dead-letters list with filters, as JSON.
    let listed = |args: &[&str]| {
        let mut all = vec!["dead-letters", "list", "--output", "json"];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for (filters, expected) in [
        (vec![], 1),
        (vec!["--queue", "inbox", "--message-type", "cli.Shipped"], 1),
        (vec!["--stream", "parcel-P-42", "--since", "1h"], 1),
        (vec!["--queue", "outbox"], 0),
        (vec!["--message-type", "cli.Ship"], 0),
        (vec!["--since", "2999-01-01T00:00:00Z"], 0),
    ] {
        let args = listed(&filters);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let doc = json(&cli_async(&config, &schema, &url, &args).await);
        let letters = doc.as_array().expect("an array");
        assert_eq!(letters.len(), expected, "{filters:?}: {doc}");
        if expected == 1 {
            assert_eq!(letters[0]["message_id"], id.as_str());
        }
    }
    let out = cli_async(
        &config,
        &schema,
        &url,
        &["dead-letters", "show", &Uuid::now_v7().to_string()],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert!(text(&out).1.contains("no dead letter"), "{:?}", text(&out));

    rt.shutdown().await.expect("shutdown");
    drop_schema(&connect().await, &schema).await;
}

#[actix_rt::test]
async fn reads_need_only_select_and_never_migrate() {
    let schema = new_schema();
    let config = postgres_config();
    let client = connect().await;

    // Not migrated: every read refuses, names the fix, and leaves nothing behind.
    for args in [
        vec!["status"],
        vec!["status", "--output", "json"],
        vec!["dead-letters", "list"],
        vec![
            "dead-letters",
            "show",
            "0193a3b4-0000-7000-8000-000000000001",
        ],
    ] {
        let out = cli_async(&config, &schema, &database_url(), &args).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}\n{stderr}");
        assert!(
            stderr.contains(&format!("schema `{schema}` is not migrated"))
                && stderr.contains("run `whizbang migrate`"),
            "{args:?}: {stderr}"
        );
    }
    let exists: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(exists, 0, "a read created the schema");

    // The read commands' connections refuse writes whatever the role may do (here: the
    // superuser of the test server).
    let pg: tokio_postgres::Config = database_url().parse().expect("the test URL");
    let (reader, connection) = whizbang::store::postgres::inspect::read_only(&pg)
        .connect(NoTls)
        .await
        .expect("a read-only connection");
    tokio::spawn(connection);
    let refused = reader
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect_err("a read-only transaction cannot create a schema");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused:?}"
    );

    // A role that may only read the schema's tables.
    let (rt, dead, _) = dead_letter_in(&schema).await;
    rt.shutdown().await.expect("shutdown");
    let role = format!("wb_ro_{}", Uuid::now_v7().simple());
    client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT USAGE ON SCHEMA {schema} TO {role};
             GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};"
        ))
        .await
        .expect("create the read-only role");
    let url = database_url();
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (_, host) = rest.split_once('@').expect("user@host");
    let read_only_url = format!("{scheme}://{role}@{host}");
    let id = dead.to_string();
    for args in [
        vec!["status"],
        vec!["status", "--output", "json"],
        vec!["dead-letters", "list"],
        vec!["dead-letters", "list", "--output", "json"],
        vec!["dead-letters", "show", &id],
        vec!["dead-letters", "show", &id, "--output", "json"],
    ] {
        let out = cli_async(&config, &schema, &read_only_url, &args).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} as {role}: {stdout}\n{stderr}"
        );
        if args.contains(&"list") || args.contains(&"show") {
            assert!(stdout.contains(&id), "{args:?}: {stdout}");
        }
    }
    // That role cannot change anything: a requeue is refused by the database.
    let out = cli_async(
        &config,
        &schema,
        &read_only_url,
        &["dead-letters", "requeue", &id],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    let out = cli_async(&config, &schema, &read_only_url, &["migrate"]).await;
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));

    drop_schema(&client, &schema).await;
    client
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("drop the role");
}

#[actix_rt::test]
async fn bulk_requeue_and_skip_need_all() {
    let schema = new_schema();
    let url = database_url();
    let config = postgres_config();
    let (rt, dead, _) = dead_letter_in(&schema).await;
    rt.shutdown().await.expect("shutdown");
    let client = connect().await;
    let is_dead = || async {
        client
            .query_opt(
                &format!("SELECT dead FROM {schema}.wb_inbox WHERE message_id = $1"),
                &[&dead],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, bool>(0))
    };

    for verb in ["requeue", "skip"] {
        let out = cli_async(&config, &schema, &url, &["dead-letters", verb]).await;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{verb}: {stderr}");
        assert!(stderr.contains("--all"), "{verb} says how: {stderr}");
        let out = cli_async(
            &config,
            &schema,
            &url,
            &["dead-letters", verb, "--queue", "inbox"],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{verb} with filters only: {:?}",
            text(&out)
        );
        let out = cli_async(
            &config,
            &schema,
            &url,
            &["dead-letters", verb, "--all", &dead.to_string()],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{verb} ids and --all: {:?}",
            text(&out)
        );
    }
    assert_eq!(is_dead().await, Some(true), "refusals change nothing");

    // Named ids: all or nothing.
    let out = cli_async(
        &config,
        &schema,
        &url,
        &[
            "dead-letters",
            "requeue",
            &dead.to_string(),
            &Uuid::now_v7().to_string(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert_eq!(
        is_dead().await,
        Some(true),
        "one unknown id, nothing requeued"
    );

    // --all with filters that select nothing, then with one that selects it.
    let out = cli_async(
        &config,
        &schema,
        &url,
        &["dead-letters", "requeue", "--all", "--queue", "outbox"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        text(&out).0.contains("0 dead letter(s) requeued"),
        "{:?}",
        text(&out)
    );
    assert_eq!(is_dead().await, Some(true));
    let out = cli_async(
        &config,
        &schema,
        &url,
        &[
            "dead-letters",
            "requeue",
            "--all",
            "--message-type",
            "cli.Shipped",
        ],
    )
    .await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("requeued inbox {dead}"))
            && stdout.contains("1 dead letter(s) requeued"),
        "{stdout}"
    );
    assert_eq!(is_dead().await, Some(false), "pending again");

    // Dead again (nothing runs it now), then skipped with --all.
    client
        .execute(
            &format!(
                "UPDATE {schema}.wb_inbox SET dead = true, attempts = 2 WHERE message_id = $1"
            ),
            &[&dead],
        )
        .await
        .unwrap();
    let out = cli_async(&config, &schema, &url, &["dead-letters", "skip", "--all"]).await;
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("skipped inbox {dead}")),
        "{stdout}"
    );
    assert_eq!(is_dead().await, None, "dropped");
    let processed: bool = client
        .query_one(
            &format!(
                "SELECT processed_at IS NOT NULL FROM {schema}.wb_dedup WHERE message_id = $1"
            ),
            &[&dead],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        processed,
        "a skipped inbox row stays a duplicate if redelivered"
    );
    drop_schema(&client, &schema).await;
}

/// `status --watch` redraws until SIGTERM, then exits 0; as JSON, one document per line.
#[tokio::test]
async fn status_watch_redraws_until_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let schema = new_schema();
    let mut client = connect().await;
    migrate(&mut client, &schema).await.unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_whizbang"))
        .args(["--config", &postgres_config()])
        .args(["status", "--watch", "--interval", "0.2", "--output", "json"])
        .env("WHIZBANG_DATABASE_URL", database_url())
        .env("WHIZBANG_SCHEMA", &schema)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start whizbang status --watch");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Three redraws, each a whole document.
    for n in 0..3 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("redraw {n} within 30 s"))
            .expect("a line");
        let doc: serde_json::Value = serde_json::from_str(&line).expect("one JSON document a line");
        assert_eq!(doc["schema"], schema.as_str(), "{line}");
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "status --watch stops within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "stopped by SIGTERM: exit 0");
    drop_schema(&client, &schema).await;
}

/// A database on another machine without TLS: the CLI warns, as the runtime does, that the
/// password travels in clear, and prints the password nowhere.
#[test]
fn a_connection_in_clear_to_another_host_is_warned_about() {
    let file = std::fs::read_to_string(postgres_config()).expect("config/postgres.toml");
    let quick = file
        .replace("startup_timeout_ms = 60000", "startup_timeout_ms = 300")
        .replace("connect_timeout_ms = 5000", "connect_timeout_ms = 200");
    assert_ne!(quick, file, "the timeouts were found and shortened");
    let path = std::env::temp_dir().join(format!("whizbang-cli-{}.toml", Uuid::now_v7().simple()));
    std::fs::write(&path, quick).expect("write the test config");
    // TEST-NET-1 (RFC 5737): nothing answers there.
    let url = "postgres://postgres:hunter2secret@192.0.2.1:5432/postgres";
    let out = cli(&path.display().to_string(), &new_schema(), url, &["status"]);
    let _ = std::fs::remove_file(&path);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("not encrypted"), "warned: {stderr}");
    assert!(
        stderr.contains("postgres://postgres@192.0.2.1:5432/postgres"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("hunter2secret") && !stderr.contains("hunter2secret"),
        "{stdout}\n{stderr}"
    );
}

/// A row that failed once and waits for its retry: pending and retrying, with the age of the
/// oldest pending row; not dead.
#[actix_rt::test]
async fn status_counts_a_row_waiting_for_its_retry() {
    use whizbang::{DispatchError, Runtime};
    let schema = new_schema();
    let config = postgres_config();
    let mut c = runtime_config(&schema);
    c.store.max_attempts = 10;
    c.store.backoff_base_ms = 600_000;
    c.store.backoff_max_ms = 600_000;
    let rt = Runtime::builder(c)
        .receptor::<service::Ship, _>(service::Shipping)
        .perspective::<service::Shipped, _>("labels", service::Broken)
        .start()
        .await
        .expect("the runtime starts");
    let failed = rt
        .local_invoke::<_, service::Shipped>(service::Ship {
            parcel: "P-7".into(),
            weight_grams: 10,
        })
        .await;
    let Err(DispatchError::PerspectiveFailed { message_id, .. }) = failed else {
        panic!("the perspective fails: {failed:?}");
    };
    let client = connect().await;
    let started = std::time::Instant::now();
    loop {
        let attempts: Option<i32> = client
            .query_opt(
                &format!("SELECT attempts FROM {schema}.wb_inbox WHERE message_id = $1"),
                &[&message_id],
            )
            .await
            .expect("read the inbox")
            .map(|r| r.get(0));
        if attempts.is_some_and(|a| a >= 1) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the failure is recorded within 60 s: attempts {attempts:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let doc = json(
        &cli_async(
            &config,
            &schema,
            &database_url(),
            &["status", "--output", "json"],
        )
        .await,
    );
    let inbox = doc["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["queue"] == "inbox")
        .expect("the inbox")
        .clone();
    assert_eq!(inbox["pending"], 1, "{inbox}");
    assert_eq!(inbox["in_flight"], 0, "{inbox}");
    assert_eq!(inbox["retrying"], 1, "{inbox}");
    assert_eq!(inbox["dead"], 0, "{inbox}");
    assert!(
        inbox["oldest_pending_age_seconds"]
            .as_f64()
            .is_some_and(|age| age >= 0.0),
        "{inbox}"
    );
    rt.shutdown().await.expect("shutdown");
    drop_schema(&client, &schema).await;
}

fn amqp_url() -> String {
    std::env::var("WHIZBANG_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// Runs scripts/amqp-topology.sh [--delete] SPEC.
fn topology(spec: &str, delete: bool) {
    let mut cmd = Command::new("bash");
    cmd.arg(repository().join("scripts/amqp-topology.sh"));
    if delete {
        cmd.arg("--delete");
    }
    let out = cmd
        .arg(spec)
        .output()
        .expect("run scripts/amqp-topology.sh");
    assert!(
        out.status.success(),
        "amqp-topology.sh {spec}: {:?}",
        text(&out)
    );
}

/// `whizbang dead-letters broker ARGS` against the test broker.
async fn broker_cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_whizbang"))
            .arg("--config")
            .arg(postgres_config())
            .args(["dead-letters", "broker"])
            .args(&args)
            .env("WHIZBANG_AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn")
            .output()
            .expect("run the whizbang binary")
    })
    .await
    .expect("the CLI ran")
}

#[tokio::test]
async fn broker_dead_letter_queues_are_counted_and_shown_and_keep_their_messages() {
    use fe2o3_amqp::types::messaging::{Message, Outcome, Properties};
    use fe2o3_amqp::types::primitives::Binary;
    use fe2o3_amqp::{Connection, Sender, Session};

    let topic = format!("t-dlq-{}", Uuid::now_v7().simple());
    let spec = format!("{topic}:inv/2");
    topology(&spec, false);
    let dead = format!("{topic}.inv.dead");

    // Two rejected deliveries, as the broker would have dead-lettered them.
    let url = amqp_url();
    let mut connection = Connection::open("cli-test", url.as_str())
        .await
        .expect("the test broker answers");
    let mut session = Session::begin(&mut connection).await.expect("session");
    let mut sender = Sender::attach(&mut session, "dead", format!("/amq/queue/{dead}"))
        .await
        .expect("attach to the dead-letter queue");
    for i in 0..2 {
        let message = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(format!("dead-{i}"))
                    .subject(String::from("test.NoSuchEvent"))
                    .group_id(String::from("order-7"))
                    .build(),
            )
            .data(Binary::from(vec![0xc1, 0xff]))
            .build();
        let outcome = tokio::time::timeout(Duration::from_secs(10), sender.send(message))
            .await
            .expect("sent in time")
            .expect("sent");
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    let _ = sender.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;

    let subscription = format!("{topic}:inv");
    let args = [
        "--subscription",
        subscription.as_str(),
        "--show",
        "--output",
        "json",
    ];
    let first = json(&broker_cli(&args).await);
    assert_eq!(first[0]["queue"], dead.as_str(), "{first}");
    assert_eq!(first[0]["messages"], 2, "{first}");
    let mut ids: Vec<String> = first[0]["letters"]
        .as_array()
        .expect("letters")
        .iter()
        .map(|l| l["message_id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["dead-0", "dead-1"], "{first}");
    assert_eq!(first[0]["letters"][0]["message_type"], "test.NoSuchEvent");
    assert_eq!(first[0]["letters"][0]["stream_id"], "order-7");

    // Reading removed nothing: the same count again, and in the table.
    let table = broker_cli(&["--subscription", subscription.as_str()]).await;
    let (stdout, stderr) = text(&table);
    assert_eq!(table.status.code(), Some(0), "{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&dead))
        .unwrap_or_else(|| panic!("no line for {dead}: {stdout}"));
    assert_eq!(line.split_whitespace().last(), Some("2"), "{stdout}");

    // A malformed subscription is a usage error; a queue that is not there a failure.
    let bad = broker_cli(&["--subscription", "no-colon"]).await;
    assert_eq!(bad.status.code(), Some(2), "{:?}", text(&bad));
    let missing = format!("{topic}-none:inv");
    let absent = broker_cli(&["--subscription", missing.as_str()]).await;
    assert_eq!(absent.status.code(), Some(1), "{:?}", text(&absent));

    topology(&spec, true);
}
