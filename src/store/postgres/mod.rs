//! The Postgres store: the durable implementation of the work-coordinator contract.
//!
//! Owns [`PostgresStore`] and its [`Store`] implementation: start-up (connect with retries,
//! migrate, the autovacuum check, the pool, the LISTEN task and the liveness lock's holder),
//! choosing per batch between `wb_process_work_batch` (arrays, one statement, one round trip,
//! one transaction) and `wb_process_one_message` (a batch of one message), partition
//! releases, and the reads (streams, the global log, inbox status, correlation status,
//! checkpoints). Lease times are the database's `now()`, never this process's clock; several
//! batches of one instance may run at once, each on its own pooled connection.
//!
//! It must not hold state of its own between calls: everything lives in the database, but for
//! the liveness locks of the instances registered through it, which live in the sessions of its
//! two holding connections (so that they die with the process). The pieces live beside it:
//! [`connect`] (pool, prepared statements, start-up connection), `liveness` (the lock's and
//! LISTEN's connections), `batch` (a [`WorkBatch`] as the functions' arrays), `answer` (their
//! rows back into a [`WorkBatchResult`]), `admin` (dead letters), [`inspect`] (the operator's
//! read-only views and bulk dead-letter actions), [`migrate`](mod@migrate), [`tls`] and
//! [`vacuum`].

mod admin;
mod answer;
mod batch;
pub mod connect;
pub mod inspect;
mod liveness;
pub mod migrate;
pub mod tls;
pub mod vacuum;

use self::answer::{MessagePlaces, check_batch_columns, read_answer, stored_event};
use self::batch::{BatchArrays, Numbering, OneMessage, PackedAppends};
use self::connect::{
    LostAnswers, PgConnection, PgManager, connect_at_start, endpoint, pool_error, query_error,
    unavailable, with_deadlines, with_statement_timeout,
};
use self::liveness::{Liveness, Role, keep_open};
use self::migrate::{describe, migrate};
use self::vacuum::autovacuum_gaps;
use super::*;
use crate::config::Config;
use crate::read_model::{AppliedMany, AppliedOnce, ApplyInTx, InlineApply, OnceWork, ReadModelTx};
use bb8_postgres::PostgresConnectionManager;
use foldhash::{HashMap, HashMapExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

/// The durable store: one Postgres schema, reached through a connection pool, with a task
/// that LISTENs for work notifications and one that holds the liveness lock of the instances
/// registered through it (both on connections of their own; stopped when the store is
/// dropped, which frees the locks).
pub struct PostgresStore {
    pool: bb8::Pool<PgManager>,
    schema: String,
    settings: StoreSettings,
    signal: tokio::sync::watch::Sender<u64>,
    /// The LISTEN connection's task; it holds the liveness locks too.
    listener: tokio::task::JoinHandle<()>,
    /// The dedicated liveness lock connection's task.
    lock_holder: tokio::task::JoinHandle<()>,
    liveness: Liveness,
    /// How long `register_instance` waits for the instance's liveness lock
    /// (`store.startup_timeout_ms`).
    lock_deadline: Duration,
    /// How long an instance must have held its own liveness lock before its heartbeat judges
    /// instances it has not seen holding theirs (see `wb_heartbeat`).
    liveness_grace: Duration,
    /// Whether batches of one message go to `wb_process_one_message` (always, outside tests).
    one_message_path: bool,
    /// The longest wait for one answer: the server's statement timeout plus [`ANSWER_MARGIN`].
    answer_deadline: Duration,
    /// Server processes of connections given up on with a statement out (see [`LostAnswers`]).
    lost_answers: LostAnswers,
}

/// How much longer than the server's statement timeout the store waits for an answer: the
/// server cancels a slow statement itself and answers within milliseconds; past this margin
/// nothing is answering. Half a second, so that a caller queued behind the batch still hears
/// of a hung server within the statement timeout + 1 s.
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
        self.lock_holder.abort();
    }
}

/// How long an instance that has just taken its liveness lock (at start, or again after its
/// connections were lost) waits before it judges, by its lock, an instance that no heartbeat
/// has found holding its own since: after a server restart or a failover every instance is
/// reconnecting, and one that comes back first must not take a slower one's partitions for a
/// death. Every holder retries within about a second of the server's return
/// (`liveness::RETRY_CAP`), so this is a wide margin. A crash within it is taken over when it
/// ends (plus a heartbeat) rather than at once.
pub const LIVENESS_GRACE: Duration = Duration::from_secs(10);

impl PostgresStore {
    /// Connects to the configured database (retrying with capped backoff until
    /// `store.startup_timeout_ms`), applies the migrations, and opens the pool and the LISTEN
    /// connection (the liveness lock's own connection opens once an instance registers).
    pub async fn connect(config: &Config) -> Result<PostgresStore, StoreError> {
        let (mut pg_config, tls) = tls::database_config(config).map_err(StoreError::unavailable)?;
        if tls.is_plain() && !tls::only_local_hosts(&pg_config) {
            // libpq's default `prefer` would try TLS first; this store connects in clear unless
            // told otherwise, so say so where it matters: off this machine.
            tracing::warn!(
                database = %endpoint(&pg_config),
                "the database connection is not encrypted: the password and the data travel in \
                 clear; set sslmode=require (or verify-full with store.tls_ca_file) in \
                 store.database_url"
            );
        }
        let settings = StoreSettings::from_config(config);
        let schema = config.store.schema.clone();
        with_deadlines(&mut pg_config, config);
        pg_config.application_name(format!("whizbang:{}", config.service.name));

        let mut client = connect_at_start(config, &pg_config, &tls).await?;
        let applied = migrate(&mut client, &schema).await?;
        if !applied.is_empty() {
            tracing::info!(schema = %schema, ?applied, "migrations applied");
        }
        // A warning, not a refusal: the service works, its queue tables just grow.
        match autovacuum_gaps(&client, &schema).await {
            Ok(gaps) => {
                for gap in gaps {
                    tracing::warn!(schema = %schema, "{gap}: deleted outbox, inbox and dedup rows are not reclaimed and the tables grow; schedule VACUUM of them (docs/postgres.md, Vacuum)");
                }
            }
            Err(e) => tracing::debug!(error = %describe(&e), "autovacuum settings not readable"),
        }
        drop(client);

        let lost_answers = LostAnswers::default();
        let manager = PgManager {
            inner: PostgresConnectionManager::new(
                with_statement_timeout(&pg_config, config),
                tls.clone(),
            ),
            schema: schema.clone(),
            lost_answers: lost_answers.clone(),
        };
        let pool = bb8::Pool::builder()
            .max_size(config.store.pool_size)
            .connection_timeout(Duration::from_millis(config.store.connect_timeout_ms))
            // A broken connection is detected by `has_broken`; a check per checkout would
            // double the round trips of every batch.
            .test_on_check_out(false)
            .build(manager)
            .await
            .map_err(unavailable)?;
        // On the statements every pooled connection prepares anyway: no second prepare.
        check_batch_columns(&*pool.get().await.map_err(pool_error)?, &schema)?;
        let signal = tokio::sync::watch::channel(0).0;
        // The liveness lock's two holders. Their statements (a take may wait behind another
        // instance's heartbeat for a moment) are bounded like the pool's.
        let mut liveness = Liveness::new();
        let held = with_statement_timeout(&pg_config, config);
        let listener = tokio::spawn(keep_open(
            held.clone(),
            tls.clone(),
            schema.clone(),
            Role::Listen(signal.clone()),
            liveness.holder(),
        ));
        let mut dedicated = held;
        dedicated.application_name(format!("whizbang:{}:lock", config.service.name));
        let lock_holder = tokio::spawn(keep_open(
            dedicated,
            tls,
            schema.clone(),
            Role::Lock,
            liveness.holder(),
        ));
        Ok(PostgresStore {
            pool,
            schema,
            settings,
            signal,
            listener,
            lock_holder,
            liveness,
            lock_deadline: Duration::from_millis(config.store.startup_timeout_ms),
            liveness_grace: LIVENESS_GRACE,
            one_message_path: true,
            answer_deadline: Duration::from_millis(config.store.statement_timeout_ms)
                + ANSWER_MARGIN,
            lost_answers,
        })
    }

    /// Uses a lease shorter than the configuration's whole seconds allow.
    pub fn with_lease(mut self, lease: Duration) -> PostgresStore {
        self.settings.lease = lease;
        self
    }

    /// Judges other instances by their liveness lock after holding its own for `grace` instead
    /// of [`LIVENESS_GRACE`] (tests).
    pub fn with_liveness_grace(mut self, grace: Duration) -> PostgresStore {
        self.liveness_grace = grace;
        self
    }

    /// Keeps processed dedup keys and idempotency keys for `retention` instead of the
    /// configuration's whole hours (`store.dedup_retention_hours`).
    pub fn with_dedup_retention(mut self, retention: Duration) -> PostgresStore {
        self.settings.dedup_retention = retention;
        self
    }

    /// Sends every batch to `wb_process_work_batch`, even those `wb_process_one_message` would
    /// take: lets the conformance suite hold both to the same contract.
    pub fn without_one_message_path(mut self) -> PostgresStore {
        self.one_message_path = false;
        self
    }

    /// The schema its tables and functions live in (`store.schema`).
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A pooled connection, once every statement whose answer was lost has ended.
    async fn conn(&self) -> Result<bb8::PooledConnection<'_, PgManager>, StoreError> {
        self.fence_lost_answers().await?;
        self.pool.get().await.map_err(pool_error)
    }

    /// Ends the server processes of connections given up on with a statement out, and waits
    /// until they are gone. A statement the store stopped waiting for (a hung server, a
    /// half-open connection) may still run and commit afterwards, when the server reads it:
    /// a work batch that claimed rows for this instance's writer, committed after the recovery
    /// batch that gives up the claims the coordinator never heard of, left a row claimed for a
    /// writer that did not have it, and the stream's next rows went out ahead of it (an order
    /// violation of the chaos run with a hung Postgres). Once the process is gone, its
    /// statement has committed or never will, and the next statement sees which.
    async fn fence_lost_answers(&self) -> Result<(), StoreError> {
        let lost = self
            .lost_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if lost.is_empty() {
            return Ok(());
        }
        let conn = self.pool.get().await.map_err(pool_error)?;
        let give_up = Instant::now() + self.answer_deadline;
        for backend in &lost {
            loop {
                let alive: i64 = self
                    .answered(&conn.broken, async {
                        conn.client
                            .query_one(
                                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                                  WHERE pid = $1 AND backend_start::text = $2",
                                &[&backend.pid, &backend.started],
                            )
                            .await
                            .map_err(query_error)
                    })
                    .await?
                    .get(0);
                if alive == 0 {
                    break;
                }
                if Instant::now() > give_up {
                    return Err(StoreError::unavailable(format!(
                        "server process {} of a connection whose answer was lost is still \
                         running; its statement may yet commit",
                        backend.pid
                    )));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tracing::info!(pid = backend.pid, "server process of a lost answer ended");
            self.lost_answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|b| b != backend);
        }
        Ok(())
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn().await?;
        self.answered(&conn.broken, async {
            conn.client.query(sql, params).await.map_err(query_error)
        })
        .await
    }

    /// Runs one work batch on `client` (a pooled connection, or a transaction open on it) with
    /// its prepared statements (`wb_process_work_batch`, `wb_process_one_message`).
    async fn run_batch(
        &self,
        client: &impl tokio_postgres::GenericClient,
        statements: (&tokio_postgres::Statement, &tokio_postgres::Statement),
        broken: &AtomicBool,
        instance: InstanceId,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let mut positions = HashMap::new();
        let mut a = BatchArrays::of(&batch, &mut positions);
        let s = &self.settings;
        let lease = s.lease.as_secs_f64();
        // A maximum the instance cannot reach (every partition) is sent as no limit
        // (`i32::MAX`): wb_acquire then skips counting the leases it holds (see leases.sql).
        let max_partitions = if s.max_partitions_per_instance >= s.partition_count {
            i32::MAX
        } else {
            s.max_partitions_per_instance as i32
        };
        let max_attempts = s.max_attempts as i32;
        let base = s.backoff_base.as_millis() as i64;
        let cap = s.backoff_max.as_millis() as i64;
        let claim_o = batch.claim.map_or(0, |c| c.outbox as i32);
        let claim_i = batch.claim.map_or(0, |c| c.inbox as i32);
        let in_flight_outbox = batch.in_flight.as_ref().map(|f| &f.outbox);
        let in_flight_inbox = batch.in_flight.as_ref().map(|f| &f.inbox);
        let one_message = self.one_message_path && a.one_message(&batch);
        // Set only for the one-message call or only for the set-based one; declared here so
        // the parameters can borrow them.
        let claim;
        let m;
        let numbering;
        // Where the packed 'appended_v' answer puts each append (set-based path only).
        let mut appends = PackedAppends::default();
        let params: Vec<&(dyn ToSql + Sync)> = if one_message {
            claim = a.u_claim.first().copied().unwrap_or(false);
            m = OneMessage::of(&a);
            vec![
                &instance,
                &lease,
                &max_partitions,
                &a.r_queue,
                &a.r_id,
                &a.r_part,
                &a.r_gen,
                &claim,
                &m.id,
                &m.kind,
                &m.stream,
                &m.part,
                &m.corr,
                &m.cause,
                &m.typ,
                &m.ts,
                &m.meta,
                &m.payload,
                &m.append,
                &m.topic,
                &m.inbox,
            ]
        } else {
            numbering = Numbering::of(&a.m_stream, &a.m_append);
            appends = PackedAppends::of(&a, &numbering);
            vec![
                &instance,
                &lease,
                &max_partitions,
                &max_attempts,
                &base,
                &cap,
                &a.r_queue,
                &a.r_op,
                &a.r_id,
                &a.r_part,
                &a.r_gen,
                &a.r_error,
                &a.u_claim,
                &a.x_unit,
                &a.x_stream,
                &a.x_expected,
                &a.m_unit,
                &a.m_id,
                &a.m_kind,
                &a.m_stream,
                &a.m_part,
                &a.m_corr,
                &a.m_cause,
                &a.m_type,
                &a.m_ts,
                &a.m_meta,
                &a.m_payload,
                &a.m_append,
                &a.m_topic,
                &a.m_inbox,
                &a.c_unit,
                &a.c_id,
                &a.c_part,
                &a.c_gen,
                &claim_o,
                &claim_i,
                &in_flight_outbox,
                &in_flight_inbox,
                &numbering.s_stream,
                &numbering.s_count,
                &numbering.m_sidx,
                &numbering.m_vback,
                &numbering.m_apos,
                &a.k_unit,
                &a.k_key,
                &a.k_hash,
                &a.k_outcome,
            ]
        };
        let rows = {
            let statement = if one_message {
                statements.1
            } else {
                statements.0
            };
            self.answered(broken, async {
                client.query(statement, &params).await.map_err(query_error)
            })
            .await?
        };
        // The arrays borrow the batch; the answer moves the claimed rows' envelopes out of it.
        let places = MessagePlaces {
            m_unit: std::mem::take(&mut a.m_unit),
            m_part: std::mem::take(&mut a.m_part),
            positions,
            appends,
        };
        drop(a);
        read_answer(batch, places, rows)
    }

    /// Waits for `work` on a connection no longer than [`PostgresStore::answer_deadline`]. No answer
    /// by then means a hung server or a half-open connection: the connection is marked broken
    /// (the pool drops it) and the caller gets a retryable error. A batch that ends so is
    /// recovered like one whose answer was lost.
    async fn answered<T>(
        &self,
        broken: &AtomicBool,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.answer_deadline, work).await {
            Ok(answer) => answer,
            Err(_) => {
                broken.store(true, Ordering::Relaxed);
                Err(StoreError::unavailable(format!(
                    "no answer from the database within {} ms (store.statement_timeout_ms + {} ms); \
                     the connection is dropped",
                    self.answer_deadline.as_millis(),
                    ANSWER_MARGIN.as_millis()
                )))
            }
        }
    }
}

/// CTEs (after a `freed` CTE returning partitions) that clear the claims on the rows of the
/// released partitions: they are nobody's work any more, and the search for partitions with
/// work only looks at unclaimed rows and expired leases.
fn clear_claims(s: &str) -> String {
    format!(
        "o_clear AS (UPDATE {s}.wb_outbox SET claimed_by = NULL, claimed_generation = NULL
                      WHERE partition IN (SELECT partition FROM freed) AND claimed_by IS NOT NULL
                      RETURNING 1),
         i_clear AS (UPDATE {s}.wb_inbox SET claimed_by = NULL, claimed_generation = NULL
                      WHERE partition IN (SELECT partition FROM freed) AND claimed_by IS NOT NULL
                      RETURNING 1)"
    )
}

#[async_trait]
impl Store for PostgresStore {
    async fn register_instance(
        &self,
        instance: InstanceId,
        service: &str,
        host: &str,
    ) -> Result<(), StoreError> {
        self.query(
            &format!(
                "INSERT INTO {}.wb_instances (instance_id, service, host) VALUES ($1, $2, $3)
                 ON CONFLICT (instance_id) DO UPDATE SET last_seen = now()",
                self.schema
            ),
            &[&instance, &service, &host],
        )
        .await?;
        // The liveness lock before any lease: from the first lease on, a death of this process
        // frees its partitions at the next heartbeat of another instance.
        self.liveness.want(instance);
        if self.liveness.wait_held(instance, self.lock_deadline).await {
            return Ok(());
        }
        self.liveness.forget(instance);
        Err(StoreError::unavailable(format!(
            "instance {instance}: its liveness lock was not taken within {} ms \
             (store.startup_timeout_ms); see the warnings of its lock connection",
            self.lock_deadline.as_millis()
        )))
    }

    async fn heartbeat(&self, instance: InstanceId) -> Result<Heartbeat, StoreError> {
        let conn = self.conn().await?;
        let lease = self.settings.lease.as_secs_f64();
        let retention = self.settings.dedup_retention.as_secs_f64();
        let grace = self.liveness_grace.as_secs_f64();
        let row = self
            .answered(&conn.broken, async {
                conn.client
                    .query_one(&conn.heartbeat, &[&instance, &lease, &retention, &grace])
                    .await
                    .map_err(query_error)
            })
            .await?;
        let held: Vec<i32> = row.get("held");
        let released: Vec<i32> = row.get("released");
        let taken_over: Vec<i32> = row.get("taken_over");
        Ok(Heartbeat {
            live_instances: row.get::<_, i32>("live_instances") as u32,
            held_partitions: held.into_iter().map(|p| p as u32).collect(),
            released: released.into_iter().map(|p| p as u32).collect(),
            taken_over: taken_over.into_iter().map(|p| p as u32).collect(),
        })
    }

    async fn process_work_batch(
        &self,
        instance: InstanceId,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let conn = self.conn().await?;
        self.run_batch(
            &conn.client,
            (&conn.batch, &conn.one_message),
            &conn.broken,
            instance,
            batch,
        )
        .await
    }

    async fn apply_once(
        &self,
        read_model: &str,
        message_id: Uuid,
        replay: bool,
        apply: &dyn ApplyInTx,
    ) -> Result<AppliedOnce, StoreError> {
        let mut pooled = self.conn().await?;
        let PgConnection {
            client,
            broken,
            statements,
            ..
        } = &mut *pooled;
        let (broken, statements): (&AtomicBool, &_) = (broken, statements);
        let s = &self.schema;
        let tx = self
            .answered(broken, async {
                client.transaction().await.map_err(query_error)
            })
            .await?;
        // The row first: a second instance applying the same event waits here for this
        // transaction, then finds the row and skips the event. A replay (a rebuild of the read
        // model) applies the event whatever was recorded.
        let on_conflict = if replay {
            "DO UPDATE SET applied_at = now()"
        } else {
            "DO NOTHING"
        };
        let record = format!(
            "INSERT INTO {s}.wb_read_model_applied (read_model, message_id) VALUES ($1, $2)
             ON CONFLICT (read_model, message_id) {on_conflict}"
        );
        let recorded = self
            .answered(broken, async {
                // Typed: parsed, bound and run in one round trip, with no prepare first.
                tx.execute_typed(
                    &record,
                    &[(&read_model, Type::TEXT), (&message_id, Type::UUID)],
                )
                .await
                .map_err(query_error)
            })
            .await?;
        if recorded == 0 {
            return Ok(AppliedOnce::AlreadyApplied);
        }
        let mut rm = ReadModelTx::with_postgres_statements(&tx, statements);
        // Bounded by the handler timeout (the handle's guard), not by the answer deadline. A
        // refusal rolls back when `tx` is dropped.
        if apply.apply(&mut rm).await.is_err() {
            return Ok(AppliedOnce::Refused);
        }
        let after = rm.take_staged();
        drop(rm);
        self.answered(broken, async { tx.commit().await.map_err(query_error) })
            .await?;
        for effect in after {
            effect();
        }
        Ok(AppliedOnce::Applied)
    }

    async fn apply_once_many(
        &self,
        instance: InstanceId,
        work: &[OnceWork<'_>],
    ) -> Result<AppliedMany, StoreError> {
        if work.is_empty() {
            return Ok(AppliedMany::Committed {
                outcomes: Vec::new(),
                completed: true,
            });
        }
        let mut pooled = self.conn().await?;
        let PgConnection {
            client,
            broken,
            statements,
            ..
        } = &mut *pooled;
        let (broken, statements): (&AtomicBool, &_) = (broken, statements);
        let s = &self.schema;
        let tx = self
            .answered(broken, async {
                client.transaction().await.map_err(query_error)
            })
            .await?;
        let (names, ids): (Vec<&str>, Vec<Uuid>) =
            work.iter().map(|w| (w.read_model, w.message_id)).unzip();
        // The records first, in one order (two instances running overlapping runs lock the keys
        // alike), as `apply_once` does: a second instance waits here, then skips.
        let record = format!(
            "INSERT INTO {s}.wb_read_model_applied (read_model, message_id)
             SELECT * FROM unnest($1::text[], $2::uuid[]) AS t(n, id) ORDER BY n, id
             ON CONFLICT (read_model, message_id) DO NOTHING
             RETURNING read_model, message_id"
        );
        // The completions, fenced as the work batch fences them (the lease still this
        // instance's, at the generation the row was claimed with). The lease is looked up by
        // primary key, row by row: joined, the generic plan hashed all of the instance's
        // leases on every call (most of this statement's cost with thousands of partitions
        // held).
        let completes: Vec<&WorkRef> = work.iter().filter_map(|w| w.completes.as_ref()).collect();
        let c_ids: Vec<Uuid> = completes.iter().map(|w| w.message_id).collect();
        let c_parts: Vec<i32> = completes.iter().map(|w| w.partition as i32).collect();
        let c_gens: Vec<i64> = completes.iter().map(|w| w.generation as i64).collect();
        let complete = format!(
            "WITH done AS (
                DELETE FROM {s}.wb_inbox i
                 USING unnest($1::uuid[], $2::integer[], $3::bigint[]) AS t(id, part, gen)
                 WHERE i.message_id = t.id AND i.claimed_by = $4 AND i.claimed_generation = t.gen
                   AND (SELECT l.generation FROM {s}.wb_partition_leases l
                         WHERE l.partition = t.part AND l.instance_id = $4) = t.gen
                RETURNING i.message_id)
             UPDATE {s}.wb_dedup d SET processed_at = now() FROM done
              WHERE d.message_id = done.message_id"
        );
        // Both sent at once (pipelined on the connection): one round trip.
        let recorded = self
            .answered(broken, async {
                // Prepared once per connection: neither parsed nor planned again.
                let recording = async {
                    let statement = statements
                        .get(&tx, &record, &[Type::TEXT_ARRAY, Type::UUID_ARRAY])
                        .await?;
                    tx.query(&statement, &[&names, &ids]).await
                };
                let completing = async {
                    if c_ids.is_empty() {
                        return Ok(0);
                    }
                    let statement = statements
                        .get(
                            &tx,
                            &complete,
                            &[
                                Type::UUID_ARRAY,
                                Type::INT4_ARRAY,
                                Type::INT8_ARRAY,
                                Type::UUID,
                            ],
                        )
                        .await?;
                    tx.execute(&statement, &[&c_ids, &c_parts, &c_gens, &instance])
                        .await
                };
                let (recorded, completed) = futures::join!(recording, completing);
                completed.map_err(query_error)?;
                recorded.map_err(query_error)
            })
            .await?;
        let fresh: std::collections::HashSet<(String, Uuid)> = recorded
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, Uuid>(1)))
            .collect();
        let is_fresh: Vec<bool> = work
            .iter()
            .map(|w| fresh.contains(&(w.read_model.to_string(), w.message_id)))
            .collect();
        // The runs, concurrently on the one transaction (their statements are pipelined): the
        // caller gives at most one event per stream. Each is bounded by the handler timeout
        // (its handle's guard), not by the answer deadline.
        let runs = work
            .iter()
            .zip(&is_fresh)
            .filter(|(_, fresh)| **fresh)
            .map(|(w, _)| {
                let tx = &tx;
                async move {
                    let mut rm = ReadModelTx::with_postgres_statements(tx, statements);
                    w.apply.apply(&mut rm).await.map(|()| rm.take_staged())
                }
            });
        let mut after = Vec::new();
        let mut refused = false;
        for staged in futures::future::join_all(runs).await {
            match staged {
                Ok(staged) => after.extend(staged),
                Err(_) => refused = true,
            }
        }
        if refused {
            // Everything rolls back when `tx` is dropped.
            return Ok(AppliedMany::Refused);
        }
        self.answered(broken, async { tx.commit().await.map_err(query_error) })
            .await?;
        for effect in after {
            effect();
        }
        Ok(AppliedMany::Committed {
            outcomes: is_fresh
                .into_iter()
                .map(|fresh| {
                    if fresh {
                        AppliedOnce::Applied
                    } else {
                        AppliedOnce::AlreadyApplied
                    }
                })
                .collect(),
            completed: true,
        })
    }

    async fn commit_inline(
        &self,
        instance: InstanceId,
        mut unit: UnitOfWork,
        apply: &dyn InlineApply,
    ) -> Result<InlineOutcome, StoreError> {
        unit.claim_for_writer = false;
        let mut pooled = self.conn().await?;
        let PgConnection {
            client,
            batch,
            one_message,
            broken,
            ..
        } = &mut *pooled;
        let broken: &AtomicBool = broken;
        let tx = self
            .answered(broken, async {
                client.transaction().await.map_err(query_error)
            })
            .await?;
        let answer = self
            .run_batch(
                &tx,
                (batch, one_message),
                broken,
                instance,
                WorkBatch {
                    units: vec![unit],
                    ..WorkBatch::default()
                },
            )
            .await?;
        let outcome = answer.units.into_iter().next().ok_or_else(|| {
            StoreError::Corrupt("the work batch answered nothing for the inline unit".into())
        })?;
        let UnitOutcome::Committed { appended, .. } = &outcome else {
            // A conflict or a taken key wrote nothing: the transaction rolls back on drop.
            return Ok(InlineOutcome::Unit(outcome));
        };
        let mut rm = ReadModelTx::with_postgres(&tx);
        let Ok(applied) = apply.apply(&mut rm, appended).await else {
            return Ok(InlineOutcome::Refused);
        };
        let after = rm.take_staged();
        drop(rm);
        let (names, ids): (Vec<&str>, Vec<Uuid>) =
            applied.iter().map(|(n, id)| (n.as_str(), *id)).unzip();
        let s = &self.schema;
        self.answered(broken, async {
            tx.execute(
                &format!(
                    "INSERT INTO {s}.wb_read_model_applied (read_model, message_id)
                     SELECT * FROM unnest($1::text[], $2::uuid[]) ON CONFLICT DO NOTHING"
                ),
                &[&names, &ids],
            )
            .await
            .map_err(query_error)?;
            tx.commit().await.map_err(query_error)
        })
        .await?;
        for effect in after {
            effect();
        }
        Ok(InlineOutcome::Unit(outcome))
    }

    async fn release_partitions(
        &self,
        instance: InstanceId,
        partitions: Option<&[u32]>,
    ) -> Result<(), StoreError> {
        let s = &self.schema;
        let list: Option<Vec<i32>> = partitions.map(|l| l.iter().map(|p| *p as i32).collect());
        let (statement, params): (String, Vec<&(dyn ToSql + Sync)>) = match &list {
            Some(list) => (
                format!(
                    "WITH freed AS (UPDATE {s}.wb_partition_leases SET instance_id = NULL, expires_at = NULL
                      WHERE instance_id = $1 AND partition = ANY($2) RETURNING partition),
                     {clear}
                     SELECT pg_notify('wb_work_{s}', '') FROM (SELECT count(*) FROM freed) x",
                    clear = clear_claims(s)
                ),
                vec![&instance, list],
            ),
            None => (
                format!(
                    "WITH freed AS (UPDATE {s}.wb_partition_leases SET instance_id = NULL, expires_at = NULL
                      WHERE instance_id = $1 RETURNING partition),
                     {clear},
                     gone AS (DELETE FROM {s}.wb_instances WHERE instance_id = $1 RETURNING 1)
                     SELECT pg_notify('wb_work_{s}', '') FROM (SELECT count(*) FROM freed) x",
                    clear = clear_claims(s)
                ),
                vec![&instance],
            ),
        };
        let mut pooled = self.conn().await?;
        let conn: &mut PgConnection = &mut pooled;
        self.answered(&conn.broken, async {
            let tx = conn.client.transaction().await.map_err(query_error)?;
            // The instance's own lock first, as its heartbeat takes it (wb_heartbeat): a
            // heartbeat in progress locks the instance's row and then its leases, and this
            // statement locks the leases and then the row; taken without the lock, the two
            // deadlocked. It also waits for this instance's batches that are writing into these
            // partitions.
            tx.execute(
                &format!("SELECT pg_advisory_xact_lock({s}.wb_instance_key($1))"),
                &[&instance],
            )
            .await
            .map_err(query_error)?;
            tx.execute(&statement, &params).await.map_err(query_error)?;
            tx.commit().await.map_err(query_error)
        })
        .await?;
        if partitions.is_none() {
            // Stopped for good: nothing of it left to take over.
            self.liveness.forget(instance);
        }
        Ok(())
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        from_version: u64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "SELECT *, 'event' AS message_kind FROM {}.wb_events
                      WHERE stream_id = $1 AND version >= $2 ORDER BY version",
                    self.schema
                ),
                &[&stream_id, &(from_version as i64)],
            )
            .await?;
        rows.iter().map(stored_event).collect()
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "SELECT *, 'event' AS message_kind FROM {}.wb_events
                      WHERE position > $1 ORDER BY position LIMIT $2",
                    self.schema
                ),
                &[&(after_position as i64), &(limit as i64)],
            )
            .await?;
        rows.iter().map(stored_event).collect()
    }

    async fn last_position(&self) -> Result<u64, StoreError> {
        let rows = self
            .query(
                &format!("SELECT last FROM {}.wb_position", self.schema),
                &[],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    async fn inbox_settled(
        &self,
        message_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, InboxSettled)>, StoreError> {
        let s = &self.schema;
        let rows = self
            .query(
                &format!(
                    "SELECT message_id, NULL::text FROM {s}.wb_dedup
                      WHERE message_id = ANY($1) AND processed_at IS NOT NULL
                     UNION ALL
                     SELECT message_id, coalesce(last_error, '') FROM {s}.wb_inbox
                      WHERE message_id = ANY($1) AND dead"
                ),
                &[&message_ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let settled = match r.get::<_, Option<String>>(1) {
                    None => InboxSettled::Processed,
                    Some(last_error) => InboxSettled::DeadLettered { last_error },
                };
                (r.get(0), settled)
            })
            .collect())
    }

    async fn correlation_status(
        &self,
        correlation_id: Uuid,
    ) -> Result<CorrelationStatus, StoreError> {
        let s = &self.schema;
        let events = self
            .query(
                &format!(
                    "SELECT message_type, stream_id, version FROM {s}.wb_events
                      WHERE correlation_id = $1 ORDER BY position"
                ),
                &[&correlation_id],
            )
            .await?;
        let counts = self
            .query(
                &format!(
                    "SELECT
                       (SELECT count(*) FROM {s}.wb_outbox WHERE correlation_id = $1 AND NOT dead),
                       (SELECT count(*) FROM {s}.wb_inbox WHERE correlation_id = $1 AND NOT dead),
                       (SELECT count(*) FROM {s}.wb_dedup WHERE correlation_id = $1 AND processed_at IS NOT NULL),
                       (SELECT count(*) FROM {s}.wb_outbox WHERE correlation_id = $1 AND dead)
                     + (SELECT count(*) FROM {s}.wb_inbox WHERE correlation_id = $1 AND dead)"
                ),
                &[&correlation_id],
            )
            .await?;
        let c = &counts[0];
        Ok(CorrelationStatus {
            events: events
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
                .collect(),
            outbox_pending: c.get::<_, i64>(0) as u64,
            inbox_pending: c.get::<_, i64>(1) as u64,
            inbox_processed: c.get::<_, i64>(2) as u64,
            dead_lettered: c.get::<_, i64>(3) as u64,
        })
    }

    async fn backlog(&self) -> Result<Vec<Backlog>, StoreError> {
        let queue = |table: &str, name: &str| {
            format!(
                "SELECT '{name}', count(*) FILTER (WHERE NOT dead), count(*) FILTER (WHERE dead),
                        extract(epoch FROM now() - min(created_at) FILTER (WHERE NOT dead))::float8
                   FROM {}.{table}",
                self.schema
            )
        };
        let rows = self
            .query(
                &format!(
                    "{} UNION ALL {}",
                    queue("wb_outbox", "outbox"),
                    queue("wb_inbox", "inbox")
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Backlog {
                queue: if r.get::<_, &str>(0) == "outbox" {
                    Queue::Outbox
                } else {
                    Queue::Inbox
                },
                pending: r.get::<_, i64>(1).max(0) as u64,
                dead: r.get::<_, i64>(2).max(0) as u64,
                oldest_pending_age: r
                    .get::<_, Option<f64>>(3)
                    .map(|s| Duration::from_secs_f64(s.max(0.0))),
            })
            .collect())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        admin::dead_letters(self).await
    }

    async fn requeue_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError> {
        admin::requeue(self, message_id).await
    }

    async fn skip_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError> {
        admin::skip(self, message_id).await
    }

    async fn load_checkpoint(&self, perspective: &str) -> Result<Option<u64>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "SELECT position FROM {}.wb_perspective_checkpoints WHERE perspective = $1",
                    self.schema
                ),
                &[&perspective],
            )
            .await?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0) as u64))
    }

    async fn save_checkpoint(&self, perspective: &str, position: u64) -> Result<(), StoreError> {
        self.query(
            &format!(
                "INSERT INTO {}.wb_perspective_checkpoints (perspective, position) VALUES ($1, $2)
                 ON CONFLICT (perspective) DO UPDATE SET position = excluded.position, updated_at = now()",
                self.schema
            ),
            &[&perspective, &(position as i64)],
        )
        .await
        .map(|_| ())
    }

    async fn idempotency_record(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "SELECT k.request_hash, k.outcome, e.message_id, e.stream_id, e.version, e.position
                       FROM {s}.wb_idempotency k
                       LEFT JOIN {s}.wb_events e ON e.message_id = ANY (k.event_ids)
                      WHERE k.idempotency_key = $1
                      ORDER BY e.position",
                    s = self.schema
                ),
                &[&key],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let record = NewIdempotencyRecord {
            key: key.to_string(),
            request_hash: first.get(0),
            outcome: first.get(1),
        };
        let appended = rows
            .iter()
            .filter_map(|r| {
                let message_id: Option<Uuid> = r.get(2);
                Some(AppendedEvent {
                    message_id: message_id?,
                    stream_id: r.get(3),
                    version: r.get::<_, i64>(4) as u64,
                    position: r.get::<_, i64>(5) as u64,
                })
            })
            .collect();
        Ok(Some(IdempotencyRecord { record, appended }))
    }

    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signal.subscribe()
    }
}
