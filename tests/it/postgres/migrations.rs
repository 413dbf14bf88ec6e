//! Migrations against the real Postgres server (`WHIZBANG_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`): idempotent, checksummed, refused for bad
//! schema names, safe when many instances start at once; function files re-applied when they
//! change; a pre-squash schema refused untouched; and the SQL partition function against the Rust
//! one. (The `whizbang` CLI on top of them is tested in `cli/tests/cli.rs`.)
//!
//! Each test works in its own schema (`t_<uuid>`), so they run in parallel. A server that
//! cannot be reached fails the test: nothing here skips.

use crate::support::pg::{self, connect, database_url, drop_schemas, new_schema};
use std::time::Duration;
use tokio_postgres::Client;
use uuid::Uuid;
use whizbang::routing::partition_of;
use whizbang::store::StoreError;
use whizbang::store::postgres::migrate::{
    FUNCTIONS, FunctionFile, MIGRATIONS, Migration, PRE_SQUASH_MIGRATIONS, checksum, migrate,
    migrate_with,
};
use whizbang::store::postgres::vacuum::autovacuum_gaps;

async fn tables(client: &Client, schema: &str) -> Vec<String> {
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = $1 ORDER BY table_name",
            &[&schema],
        )
        .await
        .expect("list tables")
        .iter()
        .map(|r| r.get(0))
        .collect()
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

/// What a first run applies: the baseline files, then every function file.
fn all_names() -> Vec<String> {
    MIGRATIONS
        .iter()
        .map(|m| m.name.to_string())
        .chain(FUNCTIONS.iter().map(|f| format!("functions/{}", f.name)))
        .collect()
}

/// The function files as recorded in `wb_functions`: (name, checksum), by name.
async fn recorded_functions(client: &Client, schema: &str) -> Vec<(String, String)> {
    client
        .query(
            &format!("SELECT name, checksum FROM {schema}.wb_functions ORDER BY name"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The one integer `sql` answers.
async fn scalar(client: &Client, sql: &str) -> i32 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The functions of `schema` with their identity arguments, by name.
async fn functions(client: &Client, schema: &str) -> Vec<String> {
    client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_are_idempotent_and_recorded_with_checksums() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();

    let first = migrate(&mut client, &schema)
        .await
        .expect("first migration");
    assert_eq!(
        first,
        all_names(),
        "the first run applies every file in order"
    );
    let before = tables(&client, &schema).await;
    for t in [
        "wb_instances",
        "wb_partition_leases",
        "wb_outbox",
        "wb_inbox",
        "wb_dedup",
        "wb_events",
        "wb_streams",
        "wb_perspective_checkpoints",
        "wb_migrations",
    ] {
        assert!(
            before.contains(&t.to_string()),
            "table {t} missing: {before:?}"
        );
    }
    // The tables updated in place on every message leave room on their pages for HOT updates.
    let fill: Vec<(String, String)> = client
        .query(
            "SELECT c.relname::text, array_to_string(c.reloptions, ',')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname IN ('wb_streams', 'wb_dedup')
              ORDER BY c.relname",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        fill,
        [
            ("wb_dedup".to_string(), "fillfactor=70".to_string()),
            ("wb_streams".to_string(), "fillfactor=40".to_string()),
        ]
    );
    let rec = recorded(&client, &schema).await;
    assert_eq!(rec.len(), MIGRATIONS.len());
    for (m, (version, name, sum)) in MIGRATIONS.iter().zip(&rec) {
        assert_eq!((*version, name.as_str()), (m.version, m.name));
        assert_eq!(sum, &checksum(m.sql), "checksum of {}", m.name);
    }

    // Data written between runs survives the second run, which applies nothing.
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.wb_perspective_checkpoints (perspective, position) VALUES ('p', 42)"
            ),
            &[],
        )
        .await
        .unwrap();
    let second = migrate(&mut client, &schema)
        .await
        .expect("second migration");
    assert!(second.is_empty(), "second run applied {second:?}");
    let third = migrate(&mut client, &schema)
        .await
        .expect("third migration");
    assert!(third.is_empty(), "third run applied {third:?}");
    assert_eq!(tables(&client, &schema).await, before);
    assert_eq!(recorded(&client, &schema).await, rec);
    let position: i64 = client
        .query_one(
            &format!(
                "SELECT position FROM {schema}.wb_perspective_checkpoints WHERE perspective = 'p'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(position, 42);
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

#[tokio::test]
async fn a_changed_applied_file_is_refused_and_nothing_else_is_applied() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    migrate(&mut client, &schema).await.expect("migration");

    // File 1 edited after it was applied, and a new file shipped alongside.
    let altered: &'static str =
        Box::leak(format!("{}\n-- an innocent-looking edit\n", MIGRATIONS[0].sql).into_boxed_str());
    let mut changed: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|m| Migration {
            version: m.version,
            name: m.name,
            sql: if m.version == 1 { altered } else { m.sql },
        })
        .collect();
    changed.push(Migration {
        version: MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0) + 1,
        name: "0099_new.sql",
        sql: "CREATE TABLE {{schema}}.wb_new_table (id integer);",
    });
    let err = migrate_with(&mut client, &schema, &changed, FUNCTIONS)
        .await
        .expect_err("a changed applied migration must be refused");
    assert!(matches!(err, StoreError::Migration { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("0001_baseline.sql"),
        "the error names the file: {text}"
    );
    assert!(!err.is_retryable(), "a changed file is not worth retrying");
    assert_eq!(recorded(&client, &schema).await.len(), MIGRATIONS.len());
    assert!(
        !tables(&client, &schema)
            .await
            .contains(&"wb_new_table".to_string()),
        "nothing of a refused run may be applied"
    );

    // The untouched files with the new one: applies exactly the new one.
    let mut extended: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|m| Migration {
            version: m.version,
            name: m.name,
            sql: m.sql,
        })
        .collect();
    extended.push(Migration {
        version: MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0) + 1,
        name: "0099_new.sql",
        sql: "CREATE TABLE {{schema}}.wb_new_table (id integer);",
    });
    let applied = migrate_with(&mut client, &schema, &extended, FUNCTIONS)
        .await
        .unwrap();
    assert_eq!(applied, vec!["0099_new.sql".to_string()]);
    assert!(
        tables(&client, &schema)
            .await
            .contains(&"wb_new_table".to_string())
    );
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

#[tokio::test]
async fn a_failing_file_rolls_back_the_whole_run() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    let broken = [
        Migration {
            version: 1,
            name: "0001_ok.sql",
            sql: "CREATE TABLE {{schema}}.wb_first (id integer);",
        },
        Migration {
            version: 2,
            name: "0002_broken.sql",
            sql: "CREATE TABLE {{schema}}.wb_second (id integer); SELECT no_such_function();",
        },
    ];
    let err = migrate_with(&mut client, &schema, &broken, &[])
        .await
        .expect_err("a failing file fails the run");
    assert!(err.to_string().contains("0002_broken.sql"), "{err}");
    let present: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !present,
        "the run is one transaction: not even the schema remains"
    );
}

#[tokio::test]
async fn invalid_schema_names_are_refused() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    for bad in [
        "Bad-Name",
        "x;drop",
        "x; DROP TABLE y",
        "",
        "1abc",
        "has space",
        "Upper",
    ] {
        let err = migrate(&mut client, bad)
            .await
            .expect_err(&format!("schema name {bad:?} must be refused"));
        assert!(
            matches!(err, StoreError::Migration { .. }),
            "{bad:?}: {err:?}"
        );
        assert!(
            err.to_string().contains("identifier"),
            "{bad:?}: the error says why: {err}"
        );
    }
    let too_long = "a".repeat(64);
    assert!(migrate(&mut client, &too_long).await.is_err());
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('Bad-Name', 'x;drop', 'Upper', 'upper')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "no schema was created for a refused name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrations_apply_each_file_once() {
    let schema = new_schema();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect().await);
    }
    // All four start together.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let schema = schema.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                migrate(&mut client, &schema).await
            })
        })
        .collect();
    let mut applied: Vec<String> = Vec::new();
    for task in tasks {
        let names = task
            .await
            .expect("task")
            .expect("every concurrent migration succeeds");
        applied.extend(names);
    }
    applied.sort();
    let mut expected = all_names();
    expected.sort();
    assert_eq!(
        applied, expected,
        "each file applied exactly once across the four connections"
    );
    let client = connect().await;
    assert_eq!(recorded(&client, &schema).await.len(), MIGRATIONS.len());
    assert_eq!(
        recorded_functions(&client, &schema).await.len(),
        FUNCTIONS.len()
    );
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

#[tokio::test]
async fn autovacuum_gaps_name_the_server_setting_and_each_switched_off_queue_table() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    migrate(&mut client, &schema).await.expect("migrate");
    let server_on: String = client
        .query_one("SHOW autovacuum", &[])
        .await
        .expect("SHOW autovacuum")
        .get(0);
    let server_gap = "autovacuum is off on this server".to_string();

    let gaps = autovacuum_gaps(&client, &schema).await.expect("gaps");
    assert_eq!(
        gaps.contains(&server_gap),
        server_on == "off",
        "server autovacuum {server_on}: {gaps:?}"
    );
    assert!(
        !gaps.iter().any(|g| g.contains(&schema)),
        "no table of a fresh schema is switched off: {gaps:?}"
    );

    // Switched off for one queue table (and on, explicitly, for another): only that one.
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.wb_inbox SET (autovacuum_enabled = false);
             ALTER TABLE {schema}.wb_outbox SET (autovacuum_enabled = true);"
        ))
        .await
        .expect("set reloptions");
    let gaps = autovacuum_gaps(&client, &schema).await.expect("gaps");
    let tables: Vec<&String> = gaps.iter().filter(|g| g.contains(&schema)).collect();
    assert_eq!(
        tables,
        [&format!("autovacuum_enabled is false on {schema}.wb_inbox")],
        "{gaps:?}"
    );
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

#[tokio::test]
async fn sql_partition_function_equals_the_rust_one() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    migrate(&mut client, &schema).await.unwrap();

    // A small deterministic generator (seeded from the clock, printed on failure).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet: Vec<char> =
        "abcxyzABC0189-_:/ .éüßñÅøЖжλΩ中文字日本🚀🦀😀\u{0}\u{7f}\u{80}\u{ffff}"
            .chars()
            .collect();
    let mut streams: Vec<String> = vec![
        String::new(),
        "a".into(),
        "order-1".into(),
        "order-ünïcödé".into(),
        "🦀".repeat(40),
    ];
    // Postgres text cannot hold NUL: those strings are tested on the Rust side only.
    while streams.len() < 400 {
        let len = (next() % 40) as usize;
        let s: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .filter(|c| *c != '\u{0}')
            .collect();
        streams.push(s);
    }
    for count in [1_i32, 7, 64, 10_000, 1_000_000] {
        let rows = client
            .query(
                &format!("SELECT s, {schema}.wb_partition_of(s, $2) FROM unnest($1::text[]) AS s"),
                &[&streams, &count],
            )
            .await
            .expect("wb_partition_of");
        assert_eq!(rows.len(), streams.len());
        for row in rows {
            let s: String = row.get(0);
            let sql: i32 = row.get(1);
            assert_eq!(
                sql as u32,
                partition_of(&s, count as u32),
                "stream {s:?} with {count} partitions (seed {seed})"
            );
        }
    }
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

/// Nothing listening at the database's address may change (a server starting): start-up keeps
/// trying, with backoff, until `store.startup_timeout_ms`.
#[tokio::test]
async fn an_unreachable_database_is_retried_until_the_start_up_timeout() {
    let _pg = pg::slot().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().unwrap().port()
    };
    let mut c = whizbang::Config::default();
    c.store.backend = whizbang::config::StoreBackend::Postgres;
    c.store.database_url = format!("postgres://postgres@127.0.0.1:{port}/postgres").into();
    c.store.schema = new_schema();
    c.store.startup_timeout_ms = 1_500;
    let started = std::time::Instant::now();
    let err = match whizbang::store::postgres::PostgresStore::connect(&c).await {
        Ok(_) => panic!("connected to a port nothing listens on"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, StoreError::Unavailable { message, .. } if message.contains("unreachable for 1500 ms")),
        "{err}"
    );
    // Retried (with jittered, growing waits) until the deadline itself, and not much past it.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_500) && took < Duration::from_millis(4_000),
        "retried until the start-up timeout before giving up: took {took:?}"
    );
}

/// The arguments of a work batch of two units (one event each, appended and bound for the
/// outbox, claimed for the writer, no idempotency records) on partitions `p` and `p + 1`, as
/// SQL literals.
fn two_unit_batch_args(instance: Uuid, p: i32, ids: [Uuid; 2]) -> String {
    let [a, b] = ids;
    format!(
        "'{instance}', 300, 10000, 10, 100, 60000,
         '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}',
         '{{t,t}}', '{{}}', '{{}}', '{{}}',
         '{{0,1}}', '{{{a},{b}}}', '{{event,event}}', '{{s-{a},s-{b}}}', '{{{p},{q}}}',
         '{{{a},{b}}}', '{{NULL,NULL}}', '{{T,T}}', '{{1,2}}', '{{\"\\\\x00\",\"\\\\x00\"}}',
         '{{\"\\\\x00\",\"\\\\x00\"}}', '{{t,t}}', '{{bench,bench}}', '{{f,f}}',
         '{{}}', '{{}}', '{{}}', '{{}}', 0, 0, NULL, NULL,
         (SELECT array_agg(s ORDER BY s COLLATE \"C\") FROM unnest(ARRAY['s-{a}', 's-{b}']) s),
         '{{1,1}}',
         ARRAY[CASE WHEN 's-{a}' COLLATE \"C\" < 's-{b}' THEN 1 ELSE 2 END,
               CASE WHEN 's-{a}' COLLATE \"C\" < 's-{b}' THEN 2 ELSE 1 END],
         '{{0,0}}', '{{1,2}}',
         '{{}}', '{{}}', '{{}}', '{{}}'",
        q = p + 1
    )
}

#[tokio::test]
async fn the_batch_function_answers_the_common_cases_in_packed_rows() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    migrate(&mut client, &schema).await.expect("migration");
    let instance = Uuid::now_v7();
    client
        .execute(
            &format!(
                "INSERT INTO {schema}.wb_instances (instance_id, service, host) VALUES ($1, 't', 't')"
            ),
            &[&instance],
        )
        .await
        .expect("register");

    let new_ids = [Uuid::now_v7(), Uuid::now_v7()];
    let rows = client
        .query(
            &format!(
                "SELECT kind, position, meta, payload
                   FROM {schema}.wb_process_work_batch({}) ORDER BY kind",
                two_unit_batch_args(instance, 20, new_ids)
            ),
            &[],
        )
        .await
        .expect("the batch function");
    let kinds: Vec<&str> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(kinds, ["appended_v", "wclaims_o"]);
    // appended_v: the batch's last position, and each stream's new version (byte order).
    assert_eq!(rows[0].get::<_, i64>(1), 2);
    let versions: Vec<i64> = unpack(rows[0].get(3), &tokio_postgres::types::Type::INT8_ARRAY);
    assert_eq!(versions, [1, 1]);
    // wclaims_o: the claimed rows' ids and generations.
    let ids: Vec<Uuid> = unpack(rows[1].get(3), &tokio_postgres::types::Type::UUID_ARRAY);
    let generations: Vec<i64> = unpack(rows[1].get(2), &tokio_postgres::types::Type::INT8_ARRAY);
    let mut claimed: Vec<(Uuid, i64)> = ids.into_iter().zip(generations).collect();
    claimed.sort();
    let mut expected = vec![(new_ids[0], 1), (new_ids[1], 1)];
    expected.sort();
    assert_eq!(claimed, expected);
    let stored: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.wb_events e JOIN {schema}.wb_outbox o USING (message_id)
                  WHERE o.claimed_by = $1"
            ),
            &[&instance],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        stored, 2,
        "the events and their claimed outbox rows are stored"
    );
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

/// A binary array (`array_send`) from a bytea column.
fn unpack<'a, T: tokio_postgres::types::FromSql<'a>>(
    raw: &'a [u8],
    array_type: &tokio_postgres::types::Type,
) -> Vec<T> {
    <Vec<T> as tokio_postgres::types::FromSql>::from_sql(array_type, raw).expect("binary array")
}

#[tokio::test]
async fn a_schema_of_the_pre_squash_migrations_is_refused_untouched() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    // What the numbered files of earlier versions left: their rows in wb_migrations (and a
    // table of theirs, which must survive the refusal).
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.wb_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE {schema}.wb_events (position bigint PRIMARY KEY);
             INSERT INTO {schema}.wb_events VALUES (1), (2);"
        ))
        .await
        .unwrap();
    for (i, name) in PRE_SQUASH_MIGRATIONS.iter().enumerate() {
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.wb_migrations (version, name, checksum) VALUES ($1, $2, 'x')"
                ),
                &[&(i as i32 + 1), name],
            )
            .await
            .unwrap();
    }
    let before = tables(&client, &schema).await;
    let err = migrate(&mut client, &schema)
        .await
        .expect_err("a pre-squash schema is refused");
    match &err {
        StoreError::PreSquashSchema {
            schema: named,
            applied,
        } => {
            assert_eq!(named, &schema);
            assert_eq!(applied.len(), PRE_SQUASH_MIGRATIONS.len());
        }
        other => panic!("expected PreSquashSchema, got {other:?}"),
    }
    let text = err.to_string();
    for needle in ["pre-squash", schema.as_str(), "DROP SCHEMA", "store.schema"] {
        assert!(text.contains(needle), "the error says {needle:?}: {text}");
    }
    assert!(!err.is_retryable());
    assert_eq!(
        tables(&client, &schema).await,
        before,
        "nothing was created"
    );
    assert!(
        functions(&client, &schema).await.is_empty(),
        "no function was created"
    );
    let events: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.wb_events"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 2, "the old schema's data is untouched");

    // The same through PostgresStore::connect: start-up fails with the same error.
    let mut c = whizbang::Config::default();
    c.store.backend = whizbang::config::StoreBackend::Postgres;
    c.store.database_url = database_url().into();
    c.store.schema = schema.clone();
    match whizbang::store::postgres::PostgresStore::connect(&c).await {
        Err(StoreError::PreSquashSchema { .. }) => {}
        Err(other) => panic!("expected PreSquashSchema, got {other:?}"),
        Ok(_) => panic!("a pre-squash schema was accepted"),
    }
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

#[tokio::test]
async fn a_changed_function_file_is_reapplied_and_old_signatures_dropped() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    migrate(&mut client, &schema).await.expect("migration");
    let recorded_before = recorded_functions(&client, &schema).await;

    // Version 1 of a file: one function of one argument.
    let v1 = [FunctionFile {
        name: "probe.sql",
        sql: "CREATE OR REPLACE FUNCTION {{schema}}.wb_probe(p integer) RETURNS integer
              LANGUAGE sql AS $$ SELECT p + 1 $$;",
    }];
    let applied = migrate_with(&mut client, &schema, MIGRATIONS, &v1)
        .await
        .unwrap();
    assert_eq!(applied, ["functions/probe.sql"]);
    assert!(
        migrate_with(&mut client, &schema, MIGRATIONS, &v1)
            .await
            .unwrap()
            .is_empty(),
        "an unchanged file is not applied again"
    );
    assert_eq!(
        scalar(&client, &format!("SELECT {schema}.wb_probe(1)")).await,
        2
    );

    // Version 2: the body changed (replaced in place).
    let v2 = [FunctionFile {
        name: "probe.sql",
        sql: "CREATE OR REPLACE FUNCTION {{schema}}.wb_probe(p integer) RETURNS integer
              LANGUAGE sql AS $$ SELECT p + 10 $$;",
    }];
    let applied = migrate_with(&mut client, &schema, MIGRATIONS, &v2)
        .await
        .unwrap();
    assert_eq!(applied, ["functions/probe.sql"]);
    assert_eq!(
        scalar(&client, &format!("SELECT {schema}.wb_probe(1)")).await,
        11
    );

    // Version 3: a new argument list (a new overload) and a new return type (which CREATE OR
    // REPLACE refuses): the old signature is gone, the new one answers.
    let v3 = [FunctionFile {
        name: "probe.sql",
        sql: "CREATE OR REPLACE FUNCTION {{schema}}.wb_probe(p integer, q integer) RETURNS bigint
              LANGUAGE sql AS $$ SELECT (p + q)::bigint $$;",
    }];
    migrate_with(&mut client, &schema, MIGRATIONS, &v3)
        .await
        .unwrap();
    let probes: Vec<String> = functions(&client, &schema)
        .await
        .into_iter()
        .filter(|f| f.contains("wb_probe"))
        .collect();
    assert_eq!(probes, [format!("{schema}.wb_probe(integer,integer)")]);
    let v4 = [FunctionFile {
        name: "probe.sql",
        sql: "CREATE OR REPLACE FUNCTION {{schema}}.wb_probe(p integer, q integer) RETURNS integer
              LANGUAGE sql AS $$ SELECT p * q $$;",
    }];
    migrate_with(&mut client, &schema, MIGRATIONS, &v4)
        .await
        .expect("a changed return type is applied by dropping the old definition");
    assert_eq!(
        scalar(&client, &format!("SELECT {schema}.wb_probe(3, 4)")).await,
        12
    );
    let recorded: Vec<(String, String)> = recorded_functions(&client, &schema)
        .await
        .into_iter()
        .filter(|(n, _)| n == "probe.sql")
        .collect();
    assert_eq!(recorded, [("probe.sql".to_string(), checksum(v4[0].sql))]);

    // The shipped files are unchanged, so the real migration applies nothing more.
    assert!(migrate(&mut client, &schema).await.unwrap().is_empty());
    assert_eq!(
        recorded_functions(&client, &schema)
            .await
            .into_iter()
            .filter(|(n, _)| n != "probe.sql")
            .collect::<Vec<_>>(),
        recorded_before
    );
    drop_schemas(&[&schema]).await.expect("drop test schema");
}

#[tokio::test]
async fn the_schema_has_each_live_function_once() {
    let _pg = pg::slot().await;
    let mut client = connect().await;
    let schema = new_schema();
    migrate(&mut client, &schema).await.expect("migration");
    let mut names: Vec<String> = functions(&client, &schema)
        .await
        .iter()
        .map(|f| f[schema.len() + 1..f.find('(').unwrap()].to_string())
        .collect();
    let n = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), n, "an overloaded function: {names:?}");
    assert_eq!(
        names,
        [
            "wb_acquire",
            "wb_claim_inbox",
            "wb_claim_inbox_walk",
            "wb_claim_outbox",
            "wb_claim_outbox_walk",
            "wb_drop_liveness",
            "wb_heartbeat",
            "wb_instance_key",
            "wb_liveness_class",
            "wb_liveness_key",
            "wb_partition_of",
            "wb_process_one_message",
            "wb_process_work_batch",
            "wb_take_liveness",
            "wb_unheld_partitions_search",
            "wb_unheld_partitions_with_work",
        ]
    );
    drop_schemas(&[&schema]).await.expect("drop test schema");
}
