//! Exactly-once read models on the Postgres store (`whizbang::ReadModel`), against the real
//! server:
//!
//! - a read model survives a SIGKILL of its process between its writes and its commit, and
//!   after its commit (which completed the inbox row too) before the partition actor heard of
//!   it: a child process (this test binary
//!   run again, `read_model_child`) is held at that point by the `fault-injection` hook and
//!   killed; a second instance resumes, and the read model's table holds every stored event
//!   exactly once, with the version and position the event store gave it;
//! - an inline read model that fails rolls its command back (no event, no outbox row, the
//!   caller gets the error) while the commands around it commit.
//!
//! Each test has schemas of its own; the read model's table lives in a schema beside the
//! store's.

use crate::support::pg::{self, connect, new_schema, on_postgres};
use crate::support::{Bump, BumpReceptor, Bumped, DEADLINE, config, on_bus, publishing};
use std::time::{Duration, Instant};
use tokio_postgres::Client;
use uuid::Uuid;
use whizbang::supervision::fault::{self, HoldAt};
use whizbang::transport::memory::MemoryBus;
use whizbang::{
    Config, Consistency, DispatchError, EventMeta, PerspectiveError, ReadModel, ReadModelTx,
};

/// The read model under test: one row per event it applied, with what `EventMeta` said. No key
/// on the rows: a duplicate would show as two.
#[derive(Clone)]
struct Rows {
    /// `<schema>.rm_rows`.
    table: String,
    /// An event with this `seq` is refused.
    refuse_seq: Option<u32>,
}

impl ReadModel<Bumped> for Rows {
    async fn apply(
        &self,
        event: Bumped,
        meta: EventMeta,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), PerspectiveError> {
        if Some(event.seq) == self.refuse_seq {
            return Err(PerspectiveError(format!("seq {} is refused", event.seq)));
        }
        let pg = tx
            .postgres()
            .ok_or_else(|| PerspectiveError("not on Postgres".into()))?;
        pg.execute(
            &format!(
                "INSERT INTO {} (stream_id, seq, version, position, message_id)
                 VALUES ($1, $2, $3, $4, $5)",
                self.table
            ),
            &[
                &meta.stream_id,
                &(event.seq as i64),
                &meta.version.map(|v| v as i64),
                &meta.position.map(|p| p as i64),
                &meta.message_id,
            ],
        )
        .await
        .map_err(|e| PerspectiveError(e.to_string()))?;
        Ok(())
    }
}

/// Creates the read model's schema and table; answers the table's name.
async fn read_model_table(client: &Client, schema: &str) -> String {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.rm_rows (stream_id text NOT NULL, seq bigint NOT NULL,
                 version bigint, position bigint, message_id uuid NOT NULL)"
        ))
        .await
        .expect("create the read model's table");
    format!("{schema}.rm_rows")
}

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Every stored event appears in the read model exactly once, with its version and position;
/// nothing else does. Answers how many events that is.
async fn exactly_once(client: &Client, schema: &str, table: &str) -> i64 {
    let events = count(client, &format!("SELECT count(*) FROM {schema}.wb_events")).await;
    let rows = count(client, &format!("SELECT count(*) FROM {table}")).await;
    let duplicates = count(
        client,
        &format!(
            "SELECT count(*) FROM (SELECT message_id FROM {table} GROUP BY message_id
              HAVING count(*) > 1) d"
        ),
    )
    .await;
    let matching = count(
        client,
        &format!(
            "SELECT count(*) FROM {table} r JOIN {schema}.wb_events e
                ON e.message_id = r.message_id AND e.stream_id = r.stream_id
               AND e.version = r.version AND e.position = r.position"
        ),
    )
    .await;
    assert_eq!(duplicates, 0, "events applied twice");
    assert_eq!(
        (rows, matching),
        (events, events),
        "read model rows (and those with the event's own version and position) against events"
    );
    events
}

// ---- a SIGKILL between the read model's writes and its progress ---------------------------

/// Environment of the child process: the store's schema, the service, the read model's table
/// and where it is held. Without them [`read_model_child`] does nothing.
const CHILD_SCHEMA: &str = "WHIZBANG_TEST_RM_SCHEMA";
const CHILD_SERVICE: &str = "WHIZBANG_TEST_RM_SERVICE";
const CHILD_TABLE: &str = "WHIZBANG_TEST_RM_TABLE";
const CHILD_HOLD: &str = "WHIZBANG_TEST_RM_HOLD";
const CHILD_TEST: &str = "postgres::read_models::read_model_child";
const CHILD_READY: &str = "read-model-child-ready";
/// The stream whose read-model runs the child is held in.
const HELD: &str = "rm-held";
const STREAMS: usize = 4;
const EVENTS: u32 = 3;

/// Both processes: the default 300 s lease, a heartbeat a second (a dead instance's partitions
/// are taken over through its liveness lock).
fn crash_config(service: &str, schema: &str) -> Config {
    let mut c = on_postgres(config(service), schema);
    c.partitions.heartbeat_seconds = 1;
    c.store.pool_size = 4;
    c
}

/// The streams besides [`HELD`].
fn streams() -> Vec<String> {
    (0..STREAMS).map(|i| format!("rm-{i}")).collect()
}

/// The child process (run only by [`killed_at`], through the environment above): sends every
/// command, its read model applying their events, and is held for ever at the chosen point on
/// the event of [`HELD`], sent last; says so, then waits for its SIGKILL.
#[actix_rt::test]
#[ignore = "the child process of the read-model SIGKILL tests, which run it"]
async fn read_model_child() {
    let (Ok(schema), Ok(service), Ok(table), Ok(hold)) = (
        std::env::var(CHILD_SCHEMA),
        std::env::var(CHILD_SERVICE),
        std::env::var(CHILD_TABLE),
        std::env::var(CHILD_HOLD),
    ) else {
        return;
    };
    let at = if hold == "before" {
        HoldAt::BeforeCommit
    } else {
        HoldAt::AfterCommit
    };
    fault::hold_read_models(HELD, at);
    let rt = on_bus(crash_config(&service, &schema), &MemoryBus::new())
        .receptor::<Bump, _>(BumpReceptor)
        .read_model::<Bumped, _>(
            "rows",
            Rows {
                table,
                refuse_seq: None,
            },
            Consistency::Async,
        )
        .start()
        .await
        .expect("the child starts");
    for seq in 1..=EVENTS {
        for stream in streams() {
            rt.send(Bump { stream, seq })
                .await
                .expect("the child sends");
        }
    }
    // Last, one event of HELD: its command commits, its read model hangs (and with it the
    // partition actor, so nothing is sent after it).
    rt.send(Bump {
        stream: HELD.into(),
        seq: 1,
    })
    .await
    .expect("the child sends the held stream's event");
    let deadline = Instant::now() + DEADLINE;
    while fault::read_models_held() == 0 {
        assert!(Instant::now() < deadline, "the child's read model is held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("{CHILD_READY} {}", rt.instance_id());
    let _ = tokio::task::spawn_blocking(|| {
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    })
    .await;
    std::process::exit(1);
}

/// Kills the child when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process running an exactly-once read model is SIGKILLed while held at `hold` (`before`:
/// its writes made, its transaction open; `after`: committed with its inbox row's completion,
/// the partition actor not told yet);
/// another instance resumes its partitions and the read model shows every event exactly once.
async fn killed_at(hold: &str) {
    let _pg = pg::slot().await;
    let client = connect().await;
    let (schema, rm_schema) = (new_schema(), new_schema());
    let table = read_model_table(&client, &rm_schema).await;
    let service = format!("rm-{}", Uuid::now_v7().simple());
    let config = crash_config(&service, &schema);

    // The survivor first, so that it holds its liveness lock from before the child's.
    let survivor = on_bus(config.clone(), &MemoryBus::new())
        .receptor::<Bump, _>(BumpReceptor)
        .read_model::<Bumped, _>(
            "rows",
            Rows {
                table: table.clone(),
                refuse_seq: None,
            },
            Consistency::Async,
        )
        .start()
        .await
        .expect("start the survivor");

    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_SCHEMA, &schema)
        .env(CHILD_SERVICE, &service)
        .env(CHILD_TABLE, &table)
        .env(CHILD_HOLD, hold)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the child process");
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Uuid>();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix(CHILD_READY)
                && let (Some(tx), Ok(id)) = (ready.take(), id.trim().parse())
            {
                let _ = tx.send(id);
            }
        }
    });
    let dead: Uuid = tokio::time::timeout(DEADLINE, ready_rx)
        .await
        .expect("the child is held in time")
        .expect("the child says it is held");

    // Where it is held: before the commit, the first event of HELD has its inbox row claimed
    // by the child and its read-model row is not there yet; after it, both the read-model row
    // and the row's completion are committed (the read model is the event's only
    // perspective: its transaction completes the row too, see `apply_group`).
    let first_held = format!(
        "SELECT message_id FROM {schema}.wb_events WHERE stream_id = '{HELD}' AND version = 1"
    );
    let claimed = count(
        &client,
        &format!(
            "SELECT count(*) FROM {schema}.wb_inbox
              WHERE message_id = ({first_held}) AND claimed_by = '{dead}'"
        ),
    )
    .await;
    let in_inbox = count(
        &client,
        &format!("SELECT count(*) FROM {schema}.wb_inbox WHERE message_id = ({first_held})"),
    )
    .await;
    if hold == "before" {
        assert_eq!(
            claimed, 1,
            "the held event's inbox row is the child's, not completed"
        );
    } else {
        assert_eq!(
            in_inbox, 0,
            "the held event's inbox row was completed with its read model's commit"
        );
    }
    let applied = count(
        &client,
        &format!("SELECT count(*) FROM {table} WHERE message_id = ({first_held})"),
    )
    .await;
    let expected = if hold == "before" { 0 } else { 1 };
    assert_eq!(
        applied, expected,
        "the held event's read-model row when the child is killed ({hold} the commit)"
    );

    child.0.kill().expect("SIGKILL the child");
    child.0.wait().unwrap();
    let killed_at = Instant::now();

    let all = (STREAMS as u32 * EVENTS + 1) as i64;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let inbox = count(&client, &format!("SELECT count(*) FROM {schema}.wb_inbox")).await;
        let rows = count(&client, &format!("SELECT count(*) FROM {table}")).await;
        if inbox == 0 && rows >= all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor finishes the dead process's work: inbox {inbox}, read model {rows} of {all}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "read model killed {hold} the commit: resumed and done {:?} after the SIGKILL",
        killed_at.elapsed()
    );
    assert_eq!(exactly_once(&client, &schema, &table).await, all);
    survivor.shutdown().await.expect("shut the survivor down");
    let _ = pg::drop_schemas(&[&schema, &rm_schema]).await;
}

#[actix_rt::test]
async fn a_read_model_killed_before_its_commit_shows_each_event_once() {
    killed_at("before").await;
}

#[actix_rt::test]
async fn a_read_model_killed_after_its_commit_before_its_report_shows_each_event_once() {
    killed_at("after").await;
}

// ---- shared transactions -----------------------------------------------------------------

/// Events of many partitions arriving at once are applied in shared transactions (each
/// transaction applying several, the read model's rows of one transaction sharing its id),
/// with their inbox rows completed in them. A refusing event among them costs its batch mates
/// nothing: that transaction is rolled back, each of its events applied alone, and the
/// refusing one fails as it would have alone (its row retried, its stream's later event
/// waiting behind it) while every other event is applied exactly once.
#[actix_rt::test]
async fn events_of_many_partitions_share_read_model_transactions_and_a_refusal_stays_alone() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let (schema, rm_schema) = (new_schema(), new_schema());
    let table = read_model_table(&client, &rm_schema).await;
    const POISON: u32 = 13;
    const COMMANDS: u32 = 40;
    let mut config = on_postgres(
        config(&format!("shared-{}", Uuid::now_v7().simple())),
        &schema,
    );
    // One read-model transaction at a time (a quarter of the pool): the events that arrive
    // while it commits go together into the next.
    config.store.pool_size = 4;
    let rt = on_bus(config, &MemoryBus::new())
        .receptor::<Bump, _>(BumpReceptor)
        .read_model::<Bumped, _>(
            "rows",
            Rows {
                table: table.clone(),
                refuse_seq: Some(POISON),
            },
            Consistency::Async,
        )
        .start()
        .await
        .expect("start");

    // Forty commands at once over eight streams, the poison one on a stream of its own with a
    // later event behind it.
    let mut commands: Vec<Bump> = (1..=COMMANDS)
        .map(|seq| Bump {
            stream: if seq == POISON {
                "rm-poison".into()
            } else {
                format!("rm-{}", seq % 8)
            },
            seq,
        })
        .collect();
    let sent = futures::future::join_all(commands.iter().map(|c| rt.send(c.clone()))).await;
    for s in sent {
        s.expect("sent");
    }
    commands.push(Bump {
        stream: "rm-poison".into(),
        seq: COMMANDS + 1,
    });
    rt.send(commands[COMMANDS as usize].clone())
        .await
        .expect("sent the event behind the poison");

    let applied = (COMMANDS - 1) as i64;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let rows = count(&client, &format!("SELECT count(*) FROM {table}")).await;
        let poison_tried = count(
            &client,
            &format!(
                "SELECT count(*) FROM {schema}.wb_inbox
                  WHERE stream_id = 'rm-poison' AND attempts > 0
                    AND last_error LIKE '%seq {POISON} is refused%'"
            ),
        )
        .await;
        let inbox = count(&client, &format!("SELECT count(*) FROM {schema}.wb_inbox")).await;
        if rows >= applied && poison_tried == 1 && inbox == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every other event applied ({rows} of {applied}) and completed (inbox {inbox}), \
             the poison one failed ({poison_tried})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The event behind the poison waits for it; nothing else is left in the inbox.
    let left: Vec<String> = client
        .query(
            &format!("SELECT stream_id FROM {schema}.wb_inbox ORDER BY stream_id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        left,
        ["rm-poison", "rm-poison"],
        "only the poison stream waits"
    );
    assert_eq!(
        count(
            &client,
            &format!("SELECT count(*) FROM {table} WHERE stream_id = 'rm-poison'")
        )
        .await,
        0,
        "nothing of the poison stream applied"
    );
    // Exactly once, each row with its event's version and position (the poison stream's two
    // events are stored but not applied: counted apart).
    let rows = count(&client, &format!("SELECT count(*) FROM {table}")).await;
    assert_eq!(rows, applied);
    let duplicates = count(
        &client,
        &format!(
            "SELECT count(*) FROM (SELECT message_id FROM {table} GROUP BY message_id
              HAVING count(*) > 1) d"
        ),
    )
    .await;
    assert_eq!(duplicates, 0, "events applied twice");
    let matching = count(
        &client,
        &format!(
            "SELECT count(*) FROM {table} r JOIN {schema}.wb_events e
                ON e.message_id = r.message_id AND e.version = r.version
               AND e.position = r.position"
        ),
    )
    .await;
    assert_eq!(matching, applied);
    let transactions = count(
        &client,
        &format!("SELECT count(DISTINCT xmin::text) FROM {table}"),
    )
    .await;
    assert!(
        transactions < rows,
        "{rows} events applied in {transactions} transactions: none shared"
    );
    eprintln!("{rows} events applied in {transactions} read-model transactions");
    rt.shutdown().await.expect("shut down");
    let _ = pg::drop_schemas(&[&schema, &rm_schema]).await;
}

// ---- inline ------------------------------------------------------------------------------

/// An inline read model that refuses one command's event rolls that command back (no event, no
/// outbox row, the caller gets the error); the commands dispatched beside it commit, each
/// event applied exactly once, in the command's transaction (its row is there when the command
/// returns).
#[actix_rt::test]
async fn a_failing_inline_read_model_rolls_its_command_back_alone() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let (schema, rm_schema) = (new_schema(), new_schema());
    let table = read_model_table(&client, &rm_schema).await;
    const POISON: u32 = 13;
    let config = publishing(
        on_postgres(
            config(&format!("inline-{}", Uuid::now_v7().simple())),
            &schema,
        ),
        "test.Bumped",
        "rm-inline",
    );
    let rt = on_bus(config, &MemoryBus::new())
        .receptor::<Bump, _>(BumpReceptor)
        .read_model::<Bumped, _>(
            "rows",
            Rows {
                table: table.clone(),
                refuse_seq: Some(POISON),
            },
            Consistency::Inline,
        )
        .start()
        .await
        .expect("start");

    // Twenty commands at once over four streams, the poison one among them.
    let commands: Vec<Bump> = (1..=20)
        .map(|seq| Bump {
            stream: if seq == POISON {
                "rm-poison".into()
            } else {
                format!("rm-{}", seq % 4)
            },
            seq,
        })
        .collect();
    let answers = futures::future::join_all(
        commands
            .iter()
            .map(|c| rt.local_invoke::<Bump, Bumped>(c.clone())),
    )
    .await;
    for (command, answer) in commands.iter().zip(&answers) {
        if command.seq == POISON {
            match answer {
                Err(DispatchError::InlineReadModelFailed {
                    read_model, error, ..
                }) => {
                    assert_eq!(read_model, "rows");
                    assert!(error.contains("seq 13 is refused"), "{error}")
                }
                other => panic!("the poison command answers its read model's error: {other:?}"),
            }
        } else {
            let event = answer.as_ref().expect("the other commands commit");
            // Inline: the row is there when the command returns.
            let n = count(
                &client,
                &format!("SELECT count(*) FROM {table} WHERE seq = {}", event.seq),
            )
            .await;
            assert_eq!(n, 1, "seq {} applied with its command", event.seq);
        }
    }
    let poison =
        |t: &str| format!("SELECT count(*) FROM {schema}.{t} WHERE stream_id = 'rm-poison'");
    assert_eq!(count(&client, &poison("wb_events")).await, 0, "no event");
    assert_eq!(
        count(&client, &poison("wb_outbox")).await,
        0,
        "no outbox row"
    );
    assert_eq!(count(&client, &poison("wb_inbox")).await, 0, "no inbox row");
    assert_eq!(exactly_once(&client, &schema, &table).await, 19);
    // Only inline read models: their events got no inbox rows.
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {schema}.wb_inbox")).await,
        0
    );
    rt.shutdown().await.expect("shut down");
    let _ = pg::drop_schemas(&[&schema, &rm_schema]).await;
}

/// Registering the same read model as `Inline` changes nothing for events that do not come
/// from a command of this instance: a scope's commands are applied from the inbox, once.
#[actix_rt::test]
async fn an_inline_read_model_applies_a_scopes_events_from_the_inbox_once() {
    let _pg = pg::slot().await;
    let client = connect().await;
    let (schema, rm_schema) = (new_schema(), new_schema());
    let table = read_model_table(&client, &rm_schema).await;
    let config = on_postgres(
        config(&format!("scope-{}", Uuid::now_v7().simple())),
        &schema,
    );
    let rt = on_bus(config, &MemoryBus::new())
        .receptor::<Bump, _>(BumpReceptor)
        .read_model::<Bumped, _>(
            "rows",
            Rows {
                table: table.clone(),
                refuse_seq: None,
            },
            Consistency::Inline,
        )
        .start()
        .await
        .expect("start");
    let mut scope = rt.scope();
    for seq in 1..=3 {
        let _: Bumped = scope
            .local_invoke(Bump {
                stream: "rm-scoped".into(),
                seq,
            })
            .await
            .expect("decided");
    }
    scope.complete().await.expect("the scope commits");
    let _: Bumped = rt
        .local_invoke(Bump {
            stream: "rm-scoped".into(),
            seq: 4,
        })
        .await
        .expect("an inline command after it");
    let deadline = Instant::now() + DEADLINE;
    while count(&client, &format!("SELECT count(*) FROM {table}")).await < 4 {
        assert!(Instant::now() < deadline, "the scope's events are applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(exactly_once(&client, &schema, &table).await, 4);
    rt.shutdown().await.expect("shut down");
    let _ = pg::drop_schemas(&[&schema, &rm_schema]).await;
}
