//! The Postgres store: the durable implementation of the work-coordinator contract.
//!
//! Owns the bb8 pool of tokio-postgres connections (each with the batch statements prepared
//! once), the translation of a [`WorkBatch`] into the arrays of `wb_process_work_batch_packed`
//! (one statement, one round trip, one transaction; see `schema/0002_work_batch.sql` and its
//! later versions up to `0014_packed_answer.sql`; this module computes the numbering of the
//! appends of `0009_batch_numbering.sql` and reads the packed answer rows of 0014; a batch of
//! one message goes to `wb_process_one_message` of `0006_one_message.sql` instead; several
//! batches of one instance may run at once, each on its own pooled connection), the LISTEN
//! connection that wakes the coordinator when work is stored, and start-up with retries while
//! the database is unreachable. Lease times are the database's `now()`, never this process's
//! clock. It must not hold state of its own between calls: everything lives in the database.

use super::migrate::{causes, describe, migrate};
use super::tls::DatabaseTls;
use super::vacuum::autovacuum_gaps;
use super::*;
use crate::config::{Config, redact};
use crate::envelope::{Hop, MessageKind};
use bb8_postgres::PostgresConnectionManager;
use foldhash::{HashMap, HashMapExt};
use std::collections::BTreeMap;
use std::time::Instant;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Row, Statement};

/// A pooled connection with its prepared statements.
pub struct PgConnection {
    client: Client,
    batch: Statement,
    /// `wb_process_one_message`: the batches [`BatchArrays::one_message`] accepts.
    one_message: Statement,
    heartbeat: Statement,
}

/// Connects, then prepares the statements every batch uses.
pub struct PgManager {
    inner: PostgresConnectionManager<DatabaseTls>,
    schema: String,
}

/// `SELECT * FROM schema.function($1, …, $arity)`.
fn call(schema: &str, function: &str, arity: usize) -> String {
    let params: Vec<String> = (1..=arity).map(|i| format!("${i}")).collect();
    format!("SELECT * FROM {schema}.{function}({})", params.join(", "))
}

impl bb8::ManageConnection for PgManager {
    type Connection = PgConnection;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgConnection, tokio_postgres::Error> {
        let client = self.inner.connect().await?;
        let s = &self.schema;
        let batch = client
            .prepare(&call(s, "wb_process_work_batch_packed", 43))
            .await?;
        let one_message = client
            .prepare(&call(s, "wb_process_one_message", 21))
            .await?;
        let heartbeat = client.prepare(&call(s, "wb_heartbeat", 3)).await?;
        Ok(PgConnection {
            client,
            batch,
            one_message,
            heartbeat,
        })
    }

    async fn is_valid(&self, conn: &mut PgConnection) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        conn.client.is_closed()
    }
}

pub struct PostgresStore {
    pool: bb8::Pool<PgManager>,
    schema: String,
    settings: StoreSettings,
    signal: tokio::sync::watch::Sender<u64>,
    listener: tokio::task::JoinHandle<()>,
    /// Whether batches of one message go to `wb_process_one_message` (always, outside tests).
    one_message_path: bool,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(describe(&e))
}

fn query_error(e: tokio_postgres::Error) -> StoreError {
    // A closed connection or a server going away is worth retrying; anything else is a bug or
    // bad data. A server that terminates the connection under a running query (a restart, an
    // operator's `pg_terminate_backend`) answers with an error of its own first: SQLSTATE class
    // 08 (connection exception), 57P01-57P03 (shutdown, crash, not accepting connections yet)
    // or 53300 (too many connections); a serialization failure or deadlock (40001, 40P01)
    // rolled the whole batch back and is worth running again.
    let server_going_away = e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("08")
            || matches!(
                code,
                "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
            )
    });
    if e.is_closed() || e.as_db_error().is_none() || server_going_away {
        StoreError::Unavailable(describe(&e))
    } else {
        StoreError::Query(describe(&e))
    }
}

fn pool_error(e: bb8::RunError<tokio_postgres::Error>) -> StoreError {
    match e {
        bb8::RunError::User(e) => unavailable(e),
        bb8::RunError::TimedOut => {
            StoreError::Unavailable("timed out waiting for a connection".into())
        }
    }
}

impl PostgresStore {
    /// Connects to the configured database (retrying with capped backoff until
    /// `store.startup_timeout_ms`), applies the migrations, and opens the pool and the LISTEN
    /// connection.
    pub async fn connect(config: &Config) -> Result<PostgresStore, StoreError> {
        let (mut pg_config, tls) =
            super::tls::database_config(config).map_err(StoreError::Unavailable)?;
        let settings = StoreSettings::from_config(config);
        let schema = config.store.schema.clone();
        pg_config.connect_timeout(Duration::from_millis(config.store.connect_timeout_ms));
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
                    tracing::warn!(schema = %schema, "{gap}: deleted outbox, inbox and dedup rows are not reclaimed and the tables grow; schedule VACUUM of them (README: Postgres store, Vacuum)");
                }
            }
            Err(e) => tracing::debug!(error = %describe(&e), "autovacuum settings not readable"),
        }
        drop(client);

        let manager = PgManager {
            inner: PostgresConnectionManager::new(pg_config.clone(), tls.clone()),
            schema: schema.clone(),
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
        let listener = tokio::spawn(listen(pg_config, tls, schema.clone(), signal.clone()));
        Ok(PostgresStore {
            pool,
            schema,
            settings,
            signal,
            listener,
            one_message_path: true,
        })
    }

    /// Uses a lease shorter than the configuration's whole seconds allow.
    pub fn with_lease(mut self, lease: Duration) -> PostgresStore {
        self.settings.lease = lease;
        self
    }

    /// Sends every batch to `wb_process_work_batch`, even those `wb_process_one_message` would
    /// take: lets the conformance suite hold both to the same contract.
    pub fn without_one_message_path(mut self) -> PostgresStore {
        self.one_message_path = false;
        self
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    async fn conn(&self) -> Result<bb8::PooledConnection<'_, PgManager>, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn().await?;
        conn.client.query(sql, params).await.map_err(query_error)
    }
}

/// One connection for start-up work (migrations, checks), retried with capped backoff while
/// the database is unreachable, until `store.startup_timeout_ms`; each retry is logged with the
/// URL's password masked. A refusal that waiting will not change (see [`refused_for_good`])
/// fails at once. The runtime and the CLI start the same way.
pub async fn connect_at_start(
    config: &Config,
    pg_config: &tokio_postgres::Config,
    tls: &DatabaseTls,
) -> Result<Client, StoreError> {
    let deadline = Instant::now() + Duration::from_millis(config.store.startup_timeout_ms);
    let mut backoff = Duration::from_millis(100);
    let endpoint = redact(&config.store.database_url);
    loop {
        match connect_one(pg_config, tls).await {
            Ok(c) => return Ok(c),
            Err(e) if refused_for_good(&e) => {
                return Err(StoreError::Refused(format!(
                    "database {endpoint}: {}",
                    describe(&e)
                )));
            }
            Err(e) if Instant::now() + backoff < deadline => {
                tracing::warn!(database = %endpoint, error = %describe(&e), retry_in_ms = backoff.as_millis() as u64, "database unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "database {endpoint} unreachable for {} ms: {}",
                    config.store.startup_timeout_ms,
                    describe(&e)
                )));
            }
        }
    }
}

/// Whether a failed connection would fail the same way however long start-up kept trying: the
/// server turned down the credentials (SQLSTATE class 28) or the database name (3D000), or the
/// TLS handshake failed on the certificate or on a server without TLS. Anything else (refused
/// or reset connections, a server starting up or shutting down, too many connections, an I/O
/// error in the middle of a handshake) may pass.
fn refused_for_good(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("28") || code == "3D000";
    }
    for cause in causes(e) {
        if cause.is::<std::io::Error>() {
            return false;
        }
        let text = cause.to_string();
        // OpenSSL's reason for a failed chain or name check; tokio-postgres' for a server that
        // answered the TLS request with "no".
        if text.contains("certificate verify failed")
            || text.contains("server does not support TLS")
        {
            return true;
        }
    }
    false
}

async fn connect_one(
    config: &tokio_postgres::Config,
    tls: &DatabaseTls,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls.clone()).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "migration connection closed");
        }
    });
    Ok(client)
}

/// Keeps a LISTEN connection open for the life of the store; bumps `signal` on every
/// notification and after every reconnect (notifications may have been missed meanwhile).
async fn listen(
    config: tokio_postgres::Config,
    tls: DatabaseTls,
    schema: String,
    signal: tokio::sync::watch::Sender<u64>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    use futures::StreamExt;
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(AsyncMessage::Notification(_)) => {
                                let _ = tx.send(());
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                if client
                    .batch_execute(&format!("LISTEN wb_work_{schema}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    signal.send_modify(|n| *n = n.wrapping_add(1));
                    while rx.recv().await.is_some() {
                        signal.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                driver.abort();
                tracing::warn!("LISTEN connection lost; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %describe(&e), retry_in_ms = backoff.as_millis() as u64, "LISTEN connection failed");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Hops and metadata travel in one column.
fn encode_meta(envelope: &Envelope) -> Vec<u8> {
    // Room for a few hops up front: grown from empty, the buffer was reallocated four or five
    // times per message.
    let mut meta = Vec::with_capacity(192);
    match rmp_serde::encode::write(&mut meta, &(&envelope.hops, &envelope.metadata)) {
        Ok(()) => meta,
        Err(_) => Vec::new(),
    }
}

fn decode_envelope(row: &Row, kind_col: &str) -> Result<Envelope, StoreError> {
    let meta: Vec<u8> = row.get("meta");
    let (hops, metadata): (Vec<Hop>, BTreeMap<String, String>) = rmp_serde::from_slice(&meta)
        .map_err(|e| StoreError::Corrupt(format!("meta column: {e}")))?;
    let kind: String = row.get(kind_col);
    Ok(Envelope {
        message_id: row.get("message_id"),
        correlation_id: row.get("correlation_id"),
        causation_id: row.get("causation_id"),
        timestamp_us: row.get("timestamp_us"),
        message_type: row.get("message_type"),
        kind: MessageKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("message kind `{kind}`")))?,
        stream_id: row.get("stream_id"),
        hops,
        metadata,
        payload: row.get("payload"),
    })
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

/// The batch as the arrays `wb_process_work_batch` takes.
#[derive(Default)]
struct BatchArrays<'a> {
    r_queue: Vec<&'static str>,
    r_op: Vec<&'static str>,
    r_id: Vec<Uuid>,
    r_part: Vec<i32>,
    r_gen: Vec<i64>,
    r_error: Vec<Option<String>>,
    u_claim: Vec<bool>,
    x_unit: Vec<i32>,
    x_stream: Vec<&'a str>,
    x_expected: Vec<i64>,
    m_unit: Vec<i32>,
    m_id: Vec<Uuid>,
    m_kind: Vec<&'static str>,
    m_stream: Vec<&'a str>,
    m_part: Vec<i32>,
    m_corr: Vec<Uuid>,
    m_cause: Vec<Option<Uuid>>,
    m_type: Vec<&'a str>,
    m_ts: Vec<i64>,
    m_meta: Vec<Vec<u8>>,
    m_payload: Vec<&'a [u8]>,
    m_append: Vec<bool>,
    m_topic: Vec<Option<&'a str>>,
    m_inbox: Vec<bool>,
    c_unit: Vec<i32>,
    c_id: Vec<Uuid>,
    c_part: Vec<i32>,
    c_gen: Vec<i64>,
}

impl<'a> BatchArrays<'a> {
    fn report(
        &mut self,
        queue: &'static str,
        op: &'static str,
        w: &WorkRef,
        error: Option<String>,
    ) {
        self.r_queue.push(queue);
        self.r_op.push(op);
        self.r_id.push(w.message_id);
        self.r_part.push(w.partition as i32);
        self.r_gen.push(w.generation as i64);
        // Error texts come from user code: a NUL (which `text` cannot hold) must not fail the
        // batch, or the report would be retried forever.
        self.r_error
            .push(error.map(|e| e.replace('\0', "\u{FFFD}")));
    }

    fn failure(&mut self, queue: &'static str, f: &Failure) {
        let op = if f.kind == FailureKind::Transient {
            "transient"
        } else {
            "fail"
        };
        self.report(
            queue,
            op,
            &f.work,
            Some(format!("{}: {}", f.kind.as_str(), f.error)),
        );
    }

    /// Adds a unit's messages; records message id → first array index for reading the answer.
    fn unit(&mut self, index: i32, unit: &'a UnitOfWork, positions: &mut HashMap<Uuid, usize>) {
        self.u_claim.push(unit.claim_for_writer);
        for (stream, expected) in &unit.expectations {
            let v = match expected {
                ExpectedVersion::Any => continue,
                ExpectedVersion::NoStream => 0,
                ExpectedVersion::Exact(v) => *v as i64,
            };
            self.x_unit.push(index);
            self.x_stream.push(stream);
            self.x_expected.push(v);
        }
        // One slot per message of this unit (its event, outbox and inbox rows share it); the
        // same message in another unit (a second delivery) gets a slot of its own.
        // A unit holds a message or a few: a list, not a map.
        let mut here: Vec<(Uuid, usize)> = Vec::new();
        let mut slot =
            |arrays: &mut BatchArrays<'a>, envelope: &'a Envelope, partition: u32| -> usize {
                if let Some((_, i)) = here.iter().find(|(id, _)| *id == envelope.message_id) {
                    return *i;
                }
                let i = arrays.m_id.len();
                here.push((envelope.message_id, i));
                positions.entry(envelope.message_id).or_insert(i);
                arrays.m_unit.push(index);
                arrays.m_id.push(envelope.message_id);
                arrays.m_kind.push(envelope.kind.as_str());
                arrays.m_stream.push(&envelope.stream_id);
                arrays.m_part.push(partition as i32);
                arrays.m_corr.push(envelope.correlation_id);
                arrays.m_cause.push(envelope.causation_id);
                arrays.m_type.push(&envelope.message_type);
                arrays.m_ts.push(envelope.timestamp_us);
                arrays.m_meta.push(encode_meta(envelope));
                arrays.m_payload.push(&envelope.payload);
                arrays.m_append.push(false);
                arrays.m_topic.push(None);
                arrays.m_inbox.push(false);
                i
            };
        for e in &unit.events {
            // An event only appended has no queue row, so its partition is never read; an
            // outbox or inbox row of the same message sets it below.
            let i = slot(self, e, 0);
            self.m_append[i] = true;
        }
        for row in &unit.outbox {
            let i = slot(self, &row.envelope, row.partition);
            self.m_part[i] = row.partition as i32;
            self.m_topic[i] = Some(&row.topic);
        }
        for row in &unit.inbox {
            let i = slot(self, &row.envelope, row.partition);
            self.m_part[i] = row.partition as i32;
            self.m_inbox[i] = true;
        }
        for w in &unit.completes_inbox {
            self.c_unit.push(index);
            self.c_id.push(w.message_id);
            self.c_part.push(w.partition as i32);
            self.c_gen.push(w.generation as i64);
        }
    }
}

impl BatchArrays<'_> {
    /// Whether `wb_process_one_message` can write this batch: completions only as reports, at
    /// most one unit with at most one message, no expected versions, no inbox rows completed
    /// by the unit, no claim. Most batches of `local_invoke` and of scoped flushes are such;
    /// that function writes them row by row at about two thirds of the general one's cost.
    fn one_message(&self, batch: &WorkBatch) -> bool {
        batch.claim.is_none()
            && batch.in_flight.is_none()
            && self.r_op.iter().all(|op| *op == "done")
            && self.u_claim.len() <= 1
            && self.m_id.len() <= 1
            && self.x_unit.is_empty()
            && self.c_id.is_empty()
    }
}

/// What `wb_process_work_batch` (0009) needs to number a batch's appends without sorting it:
/// the appended streams, distinct and in byte order (the order their rows are locked in), with
/// how many appends each; and per message (zero where it is not appended) its stream's place in
/// that list (1-based), how many appends of its stream come after it in the batch, and its
/// place among the batch's appends (1-based). The function uses them only when no unit of the
/// batch conflicted, so they count every append.
#[derive(Debug, Default, PartialEq)]
struct Numbering<'a> {
    s_stream: Vec<&'a str>,
    s_count: Vec<i64>,
    m_sidx: Vec<i32>,
    m_vback: Vec<i64>,
    m_apos: Vec<i64>,
}

impl<'a> Numbering<'a> {
    fn of(m_stream: &[&'a str], m_append: &[bool]) -> Numbering<'a> {
        let appended = || {
            m_stream
                .iter()
                .zip(m_append)
                .filter(|(_, a)| **a)
                .map(|(s, _)| *s)
        };
        let mut s_stream: Vec<&str> = appended().collect();
        s_stream.sort_unstable();
        s_stream.dedup();
        let place = |stream: &str| s_stream.binary_search(&stream).unwrap_or_default();
        let mut s_count = vec![0i64; s_stream.len()];
        for stream in appended() {
            s_count[place(stream)] += 1;
        }
        // Walking the batch in order, the appends of a stream still to come.
        let mut left = s_count.clone();
        let (mut m_sidx, mut m_vback, mut m_apos) = (
            Vec::with_capacity(m_stream.len()),
            Vec::with_capacity(m_stream.len()),
            Vec::with_capacity(m_stream.len()),
        );
        let mut apos = 0;
        for (stream, a) in m_stream.iter().zip(m_append) {
            if *a {
                let i = place(stream);
                left[i] -= 1;
                apos += 1;
                m_sidx.push(i as i32 + 1);
                m_vback.push(left[i]);
                m_apos.push(apos);
            } else {
                m_sidx.push(0);
                m_vback.push(0);
                m_apos.push(0);
            }
        }
        Numbering {
            s_stream,
            s_count,
            m_sidx,
            m_vback,
            m_apos,
        }
    }
}

/// What the packed 'appended_v' answer row (0014) needs to give each append of the batch its
/// version and position: the appended streams (in [`Numbering`]'s order) and, per append in
/// batch order, its unit, id and numbering.
#[derive(Default)]
struct PackedAppends {
    streams: Vec<String>,
    places: Vec<AppendPlace>,
}

struct AppendPlace {
    unit: usize,
    message_id: Uuid,
    /// 1-based place of its stream in `streams`.
    sidx: usize,
    /// Appends of its stream after this one in the batch (0: the stream's last).
    vback: i64,
    /// 1-based place among the batch's appends.
    apos: i64,
}

impl PackedAppends {
    fn of(a: &BatchArrays, numbering: &Numbering) -> PackedAppends {
        let places = (0..a.m_id.len())
            .filter(|&i| a.m_append[i])
            .map(|i| AppendPlace {
                unit: a.m_unit[i] as usize,
                message_id: a.m_id[i],
                sidx: numbering.m_sidx[i] as usize,
                vback: numbering.m_vback[i],
                apos: numbering.m_apos[i],
            })
            .collect();
        PackedAppends {
            streams: numbering.s_stream.iter().map(|s| s.to_string()).collect(),
            places,
        }
    }
}

/// The one message of a batch [`BatchArrays::one_message`] accepts, as the scalar parameters
/// of `wb_process_one_message` (all NULL when the batch has no message).
struct OneMessage<'a> {
    id: Option<Uuid>,
    kind: Option<&'static str>,
    stream: Option<&'a str>,
    part: Option<i32>,
    corr: Option<Uuid>,
    cause: Option<Uuid>,
    typ: Option<&'a str>,
    ts: Option<i64>,
    meta: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    append: Option<bool>,
    topic: Option<&'a str>,
    inbox: Option<bool>,
}

impl<'a> OneMessage<'a> {
    fn of(a: &'a BatchArrays<'_>) -> OneMessage<'a> {
        OneMessage {
            id: a.m_id.first().copied(),
            kind: a.m_kind.first().copied(),
            stream: a.m_stream.first().copied(),
            part: a.m_part.first().copied(),
            corr: a.m_corr.first().copied(),
            cause: a.m_cause.first().copied().flatten(),
            typ: a.m_type.first().copied(),
            ts: a.m_ts.first().copied(),
            meta: a.m_meta.first().map(Vec::as_slice),
            payload: a.m_payload.first().copied(),
            append: a.m_append.first().copied(),
            topic: a.m_topic.first().copied().flatten(),
            inbox: a.m_inbox.first().copied(),
        }
    }
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
        .await
        .map(|_| ())
    }

    async fn heartbeat(&self, instance: InstanceId) -> Result<Heartbeat, StoreError> {
        let conn = self.conn().await?;
        let lease = self.settings.lease.as_secs_f64();
        let retention = self.settings.dedup_retention.as_secs_f64();
        let row = conn
            .client
            .query_one(&conn.heartbeat, &[&instance, &lease, &retention])
            .await
            .map_err(query_error)?;
        let held: Vec<i32> = row.get("held");
        let released: Vec<i32> = row.get("released");
        Ok(Heartbeat {
            live_instances: row.get::<_, i32>("live_instances") as u32,
            held_partitions: held.into_iter().map(|p| p as u32).collect(),
            released: released.into_iter().map(|p| p as u32).collect(),
        })
    }

    async fn process_work_batch(
        &self,
        instance: InstanceId,
        batch: WorkBatch,
    ) -> Result<WorkBatchResult, StoreError> {
        let mut a = BatchArrays::default();
        for w in &batch.outbox_completions {
            a.report("o", "done", w, None);
        }
        for f in &batch.outbox_failures {
            a.failure("o", f);
        }
        for w in &batch.outbox_releases {
            a.report("o", "release", w, None);
        }
        for w in &batch.inbox_completions {
            a.report("i", "done", w, None);
        }
        for f in &batch.inbox_failures {
            a.failure("i", f);
        }
        for w in &batch.inbox_releases {
            a.report("i", "release", w, None);
        }
        let mut positions = HashMap::new();
        for (i, unit) in batch.units.iter().enumerate() {
            a.unit(i as i32, unit, &mut positions);
        }
        let s = &self.settings;
        let lease = s.lease.as_secs_f64();
        let max_partitions = s.max_partitions_per_instance as i32;
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
            ]
        };
        let rows = {
            let conn = self.conn().await?;
            let statement = if one_message {
                &conn.one_message
            } else {
                &conn.batch
            };
            conn.client
                .query(statement, &params)
                .await
                .map_err(query_error)?
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
        let mut conn = self.conn().await?;
        let tx = conn.client.transaction().await.map_err(query_error)?;
        // The instance's own lock first, as its heartbeat takes it (wb_heartbeat): a heartbeat
        // in progress locks the instance's row and then its leases, and this statement locks
        // the leases and then the row; taken without the lock, the two deadlocked. It also waits
        // for this instance's batches that are writing into these partitions.
        tx.execute(
            &format!("SELECT pg_advisory_xact_lock({s}.wb_instance_key($1))"),
            &[&instance],
        )
        .await
        .map_err(query_error)?;
        tx.execute(&statement, &params).await.map_err(query_error)?;
        tx.commit().await.map_err(query_error)
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

    async fn inbox_processed(&self, message_ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let rows = self
            .query(
                &format!(
                    "SELECT message_id FROM {}.wb_dedup
                      WHERE message_id = ANY($1) AND processed_at IS NOT NULL",
                    self.schema
                ),
                &[&message_ids],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
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

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let s = &self.schema;
        let rows = self
            .query(
                &format!(
                    "SELECT 'outbox' AS q, message_id, message_type, stream_id, attempts, coalesce(last_error, '') AS err, seq
                       FROM {s}.wb_outbox WHERE dead
                     UNION ALL
                     SELECT 'inbox', message_id, message_type, stream_id, attempts, coalesce(last_error, ''), seq
                       FROM {s}.wb_inbox WHERE dead
                     ORDER BY q DESC, seq"
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| DeadLetter {
                queue: if r.get::<_, &str>(0) == "outbox" {
                    Queue::Outbox
                } else {
                    Queue::Inbox
                },
                message_id: r.get(1),
                message_type: r.get(2),
                stream_id: r.get(3),
                attempts: r.get::<_, i32>(4) as u32,
                error: r.get(5),
            })
            .collect())
    }

    async fn requeue_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError> {
        let s = &self.schema;
        let rows = self
            .query(
                &format!(
                    "WITH o AS (UPDATE {s}.wb_outbox SET dead = false, attempts = 0, next_attempt_at = NULL,
                                    claimed_by = NULL, claimed_generation = NULL
                                 WHERE message_id = $1 AND dead RETURNING 1),
                          i AS (UPDATE {s}.wb_inbox SET dead = false, attempts = 0, next_attempt_at = NULL,
                                    claimed_by = NULL, claimed_generation = NULL
                                 WHERE message_id = $1 AND dead RETURNING 1),
                          n AS (SELECT (SELECT count(*) FROM o) + (SELECT count(*) FROM i) AS c)
                     SELECT c, pg_notify('wb_work_{s}', '') FROM n"
                ),
                &[&message_id],
            )
            .await?;
        if rows[0].get::<_, i64>(0) == 0 {
            return Err(StoreError::NotFound(format!("dead letter {message_id}")));
        }
        Ok(())
    }

    async fn skip_dead_letter(&self, message_id: Uuid) -> Result<(), StoreError> {
        let s = &self.schema;
        let rows = self
            .query(
                &format!(
                    "WITH o AS (DELETE FROM {s}.wb_outbox WHERE message_id = $1 AND dead RETURNING 1),
                          i AS (DELETE FROM {s}.wb_inbox WHERE message_id = $1 AND dead RETURNING message_id),
                          d AS (UPDATE {s}.wb_dedup SET processed_at = now()
                                 WHERE message_id IN (SELECT message_id FROM i) RETURNING 1),
                          n AS (SELECT (SELECT count(*) FROM o) + (SELECT count(*) FROM i)
                                     + 0 * (SELECT count(*) FROM d) AS c)
                     SELECT c, pg_notify('wb_work_{s}', '') FROM n"
                ),
                &[&message_id],
            )
            .await?;
        if rows[0].get::<_, i64>(0) == 0 {
            return Err(StoreError::NotFound(format!("dead letter {message_id}")));
        }
        Ok(())
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

    fn work_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signal.subscribe()
    }
}

fn stored_event(row: &Row) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        position: row.get::<_, i64>("position") as u64,
        version: row.get::<_, i64>("version") as u64,
        envelope: decode_envelope(row, "message_kind")?,
    })
}

/// The columns of `wb_batch_row`, in order: the rows of a batch are read by position (a
/// look-up by name is a scan of the column list, per value). Start-up checks the functions
/// still return them so ([`check_batch_columns`]).
const BATCH_ROW_COLUMNS: [&str; 17] = [
    "kind",
    "unit",
    "message_id",
    "stream_id",
    "version",
    "position",
    "partition",
    "generation",
    "attempts",
    "topic",
    "correlation_id",
    "causation_id",
    "message_type",
    "message_kind",
    "timestamp_us",
    "meta",
    "payload",
];
/// Positions in [`BATCH_ROW_COLUMNS`] of the columns [`read_answer`] reads by position.
mod column {
    pub const KIND: usize = 0;
    pub const UNIT: usize = 1;
    pub const MESSAGE_ID: usize = 2;
    pub const STREAM_ID: usize = 3;
    pub const VERSION: usize = 4;
    pub const POSITION: usize = 5;
    pub const PARTITION: usize = 6;
    pub const GENERATION: usize = 7;
    pub const META: usize = 15;
    pub const PAYLOAD: usize = 16;
}

/// Fails start-up when a batch function's rows are not [`BATCH_ROW_COLUMNS`] in that order.
fn check_batch_columns(conn: &PgConnection, schema: &str) -> Result<(), StoreError> {
    for (function, statement) in [
        ("wb_process_work_batch", &conn.batch),
        ("wb_process_one_message", &conn.one_message),
    ] {
        let names: Vec<&str> = statement.columns().iter().map(|c| c.name()).collect();
        if names != BATCH_ROW_COLUMNS {
            return Err(StoreError::Corrupt(format!(
                "{schema}.{function} returns columns {names:?}, expected {BATCH_ROW_COLUMNS:?}"
            )));
        }
    }
    Ok(())
}

/// Where the batch's messages went in the arrays, for reading the answer.
struct MessagePlaces {
    m_unit: Vec<i32>,
    m_part: Vec<i32>,
    /// Message id → its first index in the arrays.
    positions: HashMap<Uuid, usize>,
    appends: PackedAppends,
}

/// A binary array (`array_send`) the packed answer rows of 0014 carry in a bytea column.
fn packed<'a, T: FromSql<'a>>(
    row: &'a Row,
    column: usize,
    array_type: &Type,
) -> Result<Vec<T>, StoreError> {
    let raw: &[u8] = row
        .try_get(column)
        .map_err(|e| StoreError::Corrupt(format!("packed answer column {column}: {e}")))?;
    Vec::<T>::from_sql(array_type, raw)
        .map_err(|e| StoreError::Corrupt(format!("packed answer column {column}: {e}")))
}

/// The place in the batch's arrays of a row the answer says was claimed for the writer.
fn claimed_index(positions: &HashMap<Uuid, usize>, id: Uuid) -> Result<usize, StoreError> {
    positions
        .get(&id)
        .copied()
        .ok_or_else(|| StoreError::Corrupt(format!("claimed unknown row {id}")))
}

/// The 'appended_v' row: each append's version and position from the batch's last position
/// and its streams' new versions (see `schema/0014_packed_answer.sql`).
fn read_packed_appends(
    row: &Row,
    appends: &mut PackedAppends,
    outcomes: &mut [UnitOutcome],
) -> Result<(), StoreError> {
    let last: i64 = row.get(column::POSITION);
    let versions: Vec<i64> = packed(row, column::PAYLOAD, &Type::INT8_ARRAY)?;
    if versions.len() != appends.streams.len() {
        return Err(StoreError::Corrupt(format!(
            "{} stream versions for {} appended streams",
            versions.len(),
            appends.streams.len()
        )));
    }
    let count = appends.places.len() as i64;
    for place in &appends.places {
        let version = versions[place.sidx - 1] - place.vback;
        // The stream's last append takes its name; earlier ones copy it.
        let stream = &mut appends.streams[place.sidx - 1];
        let stream_id = if place.vback == 0 {
            std::mem::take(stream)
        } else {
            stream.clone()
        };
        if let Some(UnitOutcome::Committed { appended, .. }) = outcomes.get_mut(place.unit) {
            appended.push(AppendedEvent {
                message_id: place.message_id,
                stream_id,
                version: version as u64,
                position: (last - count + place.apos) as u64,
            });
        }
    }
    Ok(())
}

/// Turns the rows of `wb_process_work_batch_packed` (or `wb_process_one_message`) back into a
/// [`WorkBatchResult`].
fn read_answer(
    mut batch: WorkBatch,
    places: MessagePlaces,
    rows: Vec<Row>,
) -> Result<WorkBatchResult, StoreError> {
    let MessagePlaces {
        m_unit,
        m_part,
        positions,
        mut appends,
    } = places;
    let mut result = WorkBatchResult::default();
    let mut outcomes: Vec<UnitOutcome> = batch
        .units
        .iter()
        .map(|_| UnitOutcome::Committed {
            appended: Vec::new(),
            claimed_outbox: Vec::new(),
            claimed_inbox: Vec::new(),
            duplicate_inbox: Vec::new(),
        })
        .collect();
    // Writer claims come back unordered: collected, then sorted by position in the batch.
    let mut wclaims: Vec<(usize, bool, WorkRef)> = Vec::new();
    for row in rows {
        let kind: &str = row.get(column::KIND);
        let unit = row.get::<_, Option<i32>>(column::UNIT).map(|u| u as usize);
        let message_id: Option<Uuid> = row.get(column::MESSAGE_ID);
        match kind {
            "stale" => result.stale.extend(message_id),
            "dead" => result.dead_lettered.extend(message_id),
            "retry" => {
                let ms: i64 = row.get(column::VERSION);
                result.next_retry_in = Some(Duration::from_millis(ms.max(0) as u64));
            }
            "conflict" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("conflict without unit".into()))?;
                let stream: String = row.get(column::STREAM_ID);
                let actual: i64 = row.get(column::POSITION);
                let expected = batch.units[u]
                    .expectations
                    .iter()
                    .find(|(s, _)| *s == stream)
                    .map_or(ExpectedVersion::Any, |(_, e)| *e);
                outcomes[u] = UnitOutcome::Conflict {
                    stream_id: stream,
                    expected,
                    actual: actual as u64,
                };
            }
            "appended" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("append without unit".into()))?;
                if let UnitOutcome::Committed { appended, .. } = &mut outcomes[u] {
                    appended.push(AppendedEvent {
                        message_id: message_id.unwrap_or_default(),
                        stream_id: row.get(column::STREAM_ID),
                        version: row.get::<_, i64>(column::VERSION) as u64,
                        position: row.get::<_, i64>(column::POSITION) as u64,
                    });
                }
            }
            "appended_v" => read_packed_appends(&row, &mut appends, &mut outcomes)?,
            "wclaims_o" => {
                let ids: Vec<Uuid> = packed(&row, column::PAYLOAD, &Type::UUID_ARRAY)?;
                let generations: Vec<i64> = packed(&row, column::META, &Type::INT8_ARRAY)?;
                if ids.len() != generations.len() {
                    return Err(StoreError::Corrupt(format!(
                        "{} claimed rows with {} generations",
                        ids.len(),
                        generations.len()
                    )));
                }
                for (id, generation) in ids.into_iter().zip(generations) {
                    let index = claimed_index(&positions, id)?;
                    wclaims.push((
                        index,
                        true,
                        WorkRef {
                            message_id: id,
                            partition: m_part[index] as u32,
                            generation: generation as u64,
                        },
                    ));
                }
            }
            "dup" => {
                let u = unit.ok_or_else(|| StoreError::Corrupt("dup without unit".into()))?;
                if let UnitOutcome::Committed {
                    duplicate_inbox, ..
                } = &mut outcomes[u]
                {
                    duplicate_inbox.extend(message_id);
                }
            }
            "wclaim_o" | "wclaim_i" => {
                let id = message_id.unwrap_or_default();
                let index = claimed_index(&positions, id)?;
                wclaims.push((
                    index,
                    kind == "wclaim_o",
                    WorkRef {
                        message_id: id,
                        partition: row.get::<_, i32>(column::PARTITION) as u32,
                        generation: row.get::<_, i64>(column::GENERATION) as u64,
                    },
                ));
            }
            "claim_o" | "claim_i" => {
                let envelope = decode_envelope(&row, "message_kind")?;
                let work = WorkRef {
                    message_id: envelope.message_id,
                    partition: row.get::<_, i32>("partition") as u32,
                    generation: row.get::<_, i64>("generation") as u64,
                };
                let attempts = row.get::<_, i32>("attempts") as u32;
                if kind == "claim_o" {
                    result.claimed_outbox.push(OutboxWork {
                        envelope,
                        topic: row.get("topic"),
                        work,
                        attempts,
                    });
                } else {
                    result.claimed_inbox.push(InboxWork {
                        envelope,
                        work,
                        attempts,
                    });
                }
            }
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown batch row kind {other}"
                )));
            }
        }
    }
    wclaims.sort_by_key(|(index, _, _)| *index);
    for (index, outbox, work) in wclaims {
        let u = m_unit[index] as usize;
        let unit = &mut batch.units[u];
        if let UnitOutcome::Committed {
            claimed_outbox,
            claimed_inbox,
            ..
        } = &mut outcomes[u]
        {
            // Each row is claimed once: moved out, not cloned.
            if outbox {
                if let Some(i) = unit
                    .outbox
                    .iter()
                    .position(|r| r.envelope.message_id == work.message_id)
                {
                    let row = unit.outbox.swap_remove(i);
                    claimed_outbox.push(OutboxWork {
                        envelope: row.envelope,
                        topic: row.topic,
                        work,
                        attempts: 0,
                    });
                }
            } else if let Some(i) = unit
                .inbox
                .iter()
                .position(|r| r.envelope.message_id == work.message_id)
            {
                claimed_inbox.push(InboxWork {
                    envelope: unit.inbox.swap_remove(i).envelope,
                    work,
                    attempts: 0,
                });
            }
        }
    }
    result.units = outcomes;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::{BATCH_ROW_COLUMNS, Numbering, column};

    #[test]
    fn numbering_counts_each_streams_appends_in_byte_order_and_places_each_message() {
        // Batch order: b, a, (not appended) a, b, B, b.
        let streams = ["b", "a", "a", "b", "B", "b"];
        let appended = [true, true, false, true, true, true];
        let n = Numbering::of(&streams, &appended);
        assert_eq!(n.s_stream, ["B", "a", "b"], "byte order, upper case first");
        assert_eq!(n.s_count, [1, 1, 3]);
        assert_eq!(n.m_sidx, [3, 2, 0, 3, 1, 3]);
        // A stream at version v before the batch ends at v + count: the first "b" gets
        // v + 3 - 2 = v + 1, the last v + 3.
        assert_eq!(n.m_vback, [2, 0, 0, 1, 0, 0]);
        assert_eq!(n.m_apos, [1, 2, 0, 3, 4, 5]);
        assert_eq!(Numbering::of(&["x"], &[false]).s_stream, Vec::<&str>::new());
    }

    #[test]
    fn column_positions_name_the_columns_read_there() {
        for (position, name) in [
            (column::KIND, "kind"),
            (column::UNIT, "unit"),
            (column::MESSAGE_ID, "message_id"),
            (column::STREAM_ID, "stream_id"),
            (column::VERSION, "version"),
            (column::POSITION, "position"),
            (column::PARTITION, "partition"),
            (column::GENERATION, "generation"),
        ] {
            assert_eq!(BATCH_ROW_COLUMNS[position], name);
        }
    }
}
