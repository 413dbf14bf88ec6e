//! Connections of the Postgres store: the bb8 pool's manager (each pooled connection prepares
//! the batch, one-message and heartbeat statements once), the start-up connection retried
//! with capped backoff while the database is unreachable, and the mapping of driver errors to
//! [`StoreError`]. The long-lived connections (the liveness lock's and LISTEN's) are
//! `liveness`'s.
//!
//! It must not run queries of the store's contract (those belong to `PostgresStore`) and must
//! never put the database's password into a log line or an error: it names the database by
//! [`endpoint`], rendered from the parsed configuration, which holds no password.

pub(crate) use super::migrate::causes;
use super::migrate::describe;
use super::tls::DatabaseTls;
use crate::config::Config;
use crate::retry::Backoff;
use crate::store::StoreError;
use bb8_postgres::PostgresConnectionManager;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, Statement};

/// A pooled connection with its prepared statements.
pub struct PgConnection {
    pub(super) client: Client,
    pub(super) batch: Statement,
    /// `wb_process_one_message`: the batches [`BatchArrays::one_message`] accepts.
    pub(super) one_message: Statement,
    pub(super) heartbeat: Statement,
    /// Set when an answer did not come within the deadline: the connection may be half-open
    /// or its server hung, so the pool drops it instead of handing it out again.
    pub(super) broken: AtomicBool,
    /// The server process behind this connection, recorded at connect.
    pub(super) backend: Backend,
}

/// A server process of the pool: its pid and start time (together they name it; a pid alone
/// may be reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub(super) pid: i32,
    pub(super) started: String,
}

/// Server processes of connections dropped with a statement whose answer never came: such a
/// statement may still run and commit on the server after the store gave up on it (a server
/// that was stopped reads it when it resumes). The store ends them (see
/// `PostgresStore::fence_lost_answers`) before its next work batch, so that batch sees what they
/// did, or that they did nothing.
pub type LostAnswers = Arc<std::sync::Mutex<Vec<Backend>>>;

/// Deadlines of every connection: TCP keepalives on an idle connection and `TCP_USER_TIMEOUT`
/// on unacknowledged data (`store.tcp_user_timeout_ms`), so a vanished database host is noticed
/// in seconds; the connection attempt itself is bounded by `store.connect_timeout_ms`.
pub fn with_deadlines(pg: &mut tokio_postgres::Config, config: &Config) {
    let tcp = Duration::from_millis(config.store.tcp_user_timeout_ms);
    pg.connect_timeout(Duration::from_millis(config.store.connect_timeout_ms))
        .tcp_user_timeout(tcp)
        .keepalives(true)
        .keepalives_idle((tcp / 2).max(Duration::from_secs(1)))
        .keepalives_interval((tcp / 6).max(Duration::from_secs(1)))
        .keepalives_retries(3);
}

/// The pool's connections also carry the server-side `statement_timeout`
/// (`store.statement_timeout_ms`, lock waits included), added to any `options` the URL gives.
/// Start-up work (migrations wait on an advisory lock while another instance migrates) does
/// not; the connections holding the liveness lock do (a take that waits longer is retried on a
/// new connection).
pub(super) fn with_statement_timeout(
    pg: &tokio_postgres::Config,
    config: &Config,
) -> tokio_postgres::Config {
    let mut pooled = pg.clone();
    let timeout = format!("-c statement_timeout={}", config.store.statement_timeout_ms);
    let options = match pg.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} {timeout}"),
        _ => timeout,
    };
    pooled.options(options);
    pooled
}

/// Connects, then prepares the statements every batch uses.
pub struct PgManager {
    pub(super) inner: PostgresConnectionManager<DatabaseTls>,
    pub(super) schema: String,
    /// Where a broken connection's server process goes when the pool drops it.
    pub(super) lost_answers: LostAnswers,
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
            .prepare(&call(s, "wb_process_work_batch", 47))
            .await?;
        let one_message = client
            .prepare(&call(s, "wb_process_one_message", 21))
            .await?;
        let heartbeat = client.prepare(&call(s, "wb_heartbeat", 4)).await?;
        let me = client
            .query_one(
                "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity \
                  WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok(PgConnection {
            client,
            batch,
            one_message,
            heartbeat,
            broken: AtomicBool::new(false),
            backend: Backend {
                pid: me.get(0),
                started: me.get(1),
            },
        })
    }

    async fn is_valid(&self, conn: &mut PgConnection) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        if conn.broken.load(Ordering::Relaxed) {
            // Given up on while a statement was out: it may still run on the server.
            let mut lost = self.lost_answers.lock().unwrap_or_else(|p| p.into_inner());
            if !lost.contains(&conn.backend) {
                lost.push(conn.backend.clone());
            }
            return true;
        }
        conn.client.is_closed()
    }
}

pub(super) fn unavailable(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable {
        message: describe(&e),
        source: Some(Arc::new(e)),
    }
}

pub(super) fn query_error(e: tokio_postgres::Error) -> StoreError {
    // A closed connection, or an error that is not the server's answer (I/O), is the store
    // going away; anything the server answered keeps its SQLSTATE, which says whether it is
    // worth running again (`StoreError::is_retryable`).
    match e.as_db_error() {
        Some(db) if !e.is_closed() => StoreError::Query {
            code: Some(db.code().code().to_string()),
            message: describe(&e),
            source: Some(Arc::new(e)),
        },
        _ => unavailable(e),
    }
}

pub(super) fn pool_error(e: bb8::RunError<tokio_postgres::Error>) -> StoreError {
    match e {
        bb8::RunError::User(e) => unavailable(e),
        bb8::RunError::TimedOut => StoreError::unavailable("timed out waiting for a connection"),
    }
}

/// The database a connection goes to, rendered from the parsed configuration as
/// `postgres://user@host:port/dbname`: there is no password in it to leak, whichever form
/// `store.database_url` gave it in (URL, `?password=`, libpq's `key=value`).
pub fn endpoint(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            // One port for every host, or one each (libpq's rule).
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let user = pg.get_user().unwrap_or_default();
    let dbname = pg.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{}/{dbname}", hosts.join(","))
}

/// One connection for start-up work (migrations, checks), retried with capped backoff while
/// the database is unreachable, until `store.startup_timeout_ms`; each retry is logged with the
/// URL's password masked. A refusal that waiting will not change (wrong credentials, an unknown database, a refused certificate)
/// fails at once. The runtime and the CLI start the same way.
pub async fn connect_at_start(
    config: &Config,
    pg_config: &tokio_postgres::Config,
    tls: &DatabaseTls,
) -> Result<Client, StoreError> {
    let deadline = Instant::now() + Duration::from_millis(config.store.startup_timeout_ms);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let endpoint = endpoint(pg_config);
    loop {
        match connect_one(pg_config, tls).await {
            Ok(c) => return Ok(c),
            Err(e) if refused_for_good(&e) => {
                return Err(StoreError::Refused {
                    message: format!("database {endpoint}: {}", describe(&e)),
                    source: Some(Arc::new(e)),
                });
            }
            Err(e) if Instant::now() < deadline => {
                // The last wait is cut short so that one more try lands on the deadline: the
                // start-up timeout is how long the database is given, not a bound on the jitter.
                let delay = backoff
                    .next_delay()
                    .min(deadline.saturating_duration_since(Instant::now()));
                tracing::warn!(database = %endpoint, error = %describe(&e), retry_in_ms = delay.as_millis() as u64, "database unreachable; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                return Err(StoreError::Unavailable {
                    message: format!(
                        "database {endpoint} unreachable for {} ms: {}",
                        config.store.startup_timeout_ms,
                        describe(&e)
                    ),
                    source: Some(Arc::new(e)),
                });
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
