//! The liveness lock of the instances registered through this store, and the long-lived
//! connections that hold it: a dedicated one (`application_name` `whizbang:<service>:lock`)
//! and the LISTEN connection that wakes the coordinator when work is stored.
//!
//! Each registered instance holds a session-level advisory lock of its own, in shared mode, on
//! both connections (`wb_take_liveness`, in `schema/functions/leases.sql`, which also records
//! when it was taken). A process that dies loses its connections and the lock with them, at
//! once, and the next heartbeat of another instance takes its partitions over as if their
//! leases had run out. Two holders, so that one connection dropped while the process lives (a
//! terminated backend, a proxy closing it) does not free the lock: each takes it again on a new
//! connection, retrying with the runtime's [`Backoff`]. While both are gone the lock is free and
//! the instance looks dead: other instances' heartbeats take over its partitions with work, as
//! for a crash, and the fencing token refuses what it reports for them afterwards; it judges
//! nobody itself, and keeps working with what it still holds (alone, it loses nothing).
//!
//! It must not run queries of the store's contract: it only takes and gives up locks and
//! forwards notifications.

use super::migrate::describe;
use super::tls::DatabaseTls;
use crate::retry::Backoff;
use crate::store::InstanceId;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client};

/// The instances whose lock this store's holders must hold.
pub(super) struct Liveness {
    wanted: watch::Sender<BTreeSet<InstanceId>>,
    /// What each holder holds now (emptied when its connection is lost).
    held: Vec<watch::Receiver<BTreeSet<InstanceId>>>,
}

/// One holding connection's side: what it must hold, and where it says what it holds.
pub(super) struct Holder {
    wanted: watch::Receiver<BTreeSet<InstanceId>>,
    held: watch::Sender<BTreeSet<InstanceId>>,
}

impl Liveness {
    pub(super) fn new() -> Liveness {
        Liveness {
            wanted: watch::channel(BTreeSet::new()).0,
            held: Vec::new(),
        }
    }

    /// A new holder of every wanted lock.
    pub(super) fn holder(&mut self) -> Holder {
        let (held, held_rx) = watch::channel(BTreeSet::new());
        self.held.push(held_rx);
        Holder {
            wanted: self.wanted.subscribe(),
            held,
        }
    }

    /// Asks the holders to take `instance`'s lock.
    pub(super) fn want(&self, instance: InstanceId) {
        self.wanted.send_if_modified(|w| w.insert(instance));
    }

    /// Asks the holders to give up `instance`'s lock.
    pub(super) fn forget(&self, instance: InstanceId) {
        self.wanted.send_if_modified(|w| w.remove(&instance));
    }

    /// Waits until some holder holds `instance`'s lock; false after `deadline`.
    pub(super) async fn wait_held(&self, instance: InstanceId, deadline: Duration) -> bool {
        let waits = self.held.iter().map(|rx| {
            let mut rx = rx.clone();
            Box::pin(async move { rx.wait_for(|held| held.contains(&instance)).await.is_ok() })
        });
        let any = async {
            let mut waits: Vec<_> = waits.collect();
            while !waits.is_empty() {
                let (held, _, rest) = futures::future::select_all(waits).await;
                if held {
                    return true;
                }
                // That holder is gone (its store dropped): wait for the others.
                waits = rest;
            }
            false
        };
        tokio::time::timeout(deadline, any).await.unwrap_or(false)
    }
}

impl Holder {
    fn wants_any(&self) -> bool {
        !self.wanted.borrow().is_empty()
    }

    /// Waits until something is wanted; false when the store is gone.
    async fn wait_wanted(&mut self) -> bool {
        self.wanted.wait_for(|w| !w.is_empty()).await.is_ok()
    }

    /// Takes the wanted locks this session does not hold yet and gives up those no longer
    /// wanted; `mine` is what this session holds.
    async fn sync(
        &mut self,
        client: &Client,
        schema: &str,
        mine: &mut BTreeSet<InstanceId>,
    ) -> Result<(), tokio_postgres::Error> {
        let wanted = self.wanted.borrow_and_update().clone();
        let take: Vec<InstanceId> = wanted.difference(mine).copied().collect();
        let drop: Vec<InstanceId> = mine.difference(&wanted).copied().collect();
        if !take.is_empty() {
            client
                .execute(&format!("SELECT {schema}.wb_take_liveness($1)"), &[&take])
                .await?;
            mine.extend(take);
        }
        if !drop.is_empty() {
            client
                .execute(&format!("SELECT {schema}.wb_drop_liveness($1)"), &[&drop])
                .await?;
            for instance in &drop {
                mine.remove(instance);
            }
        }
        self.held.send_replace(mine.clone());
        Ok(())
    }

    fn lost(&self) {
        self.held.send_replace(BTreeSet::new());
    }
}

/// What a holding connection is for besides the locks.
pub(super) enum Role {
    /// Only the locks (`whizbang:<service>:lock`); connected only while some lock is wanted.
    Lock,
    /// Also LISTENs on `wb_work_<schema>` for the life of the store, bumping the signal on every
    /// notification and after every reconnect (notifications may have been missed meanwhile).
    Listen(watch::Sender<u64>),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Role::Lock => "lock",
            Role::Listen(_) => "LISTEN",
        }
    }
}

/// The first wait before a lost holding connection is opened again, and the longest: a lock
/// held by no connection lets other instances take the partitions over at their heartbeat.
const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(1);

/// Keeps one holding connection open for the life of the store: opens it (again after a loss,
/// with [`Backoff`]), takes the wanted locks on it and follows their changes.
pub(super) async fn keep_open(
    config: tokio_postgres::Config,
    tls: DatabaseTls,
    schema: String,
    role: Role,
    mut holder: Holder,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    let what = role.name();
    loop {
        if matches!(role, Role::Lock) && !holder.wants_any() && !holder.wait_wanted().await {
            return;
        }
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                // Drives the connection; ends (closing `rx`) when the connection does.
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
                let outcome = serve(&client, &schema, &role, &mut holder, &mut rx, &mut backoff);
                let outcome = outcome.await;
                holder.lost();
                driver.abort();
                match outcome {
                    Ok(Ended::StoreGone) => return,
                    // Nothing to hold any more: closed until something is wanted again.
                    Ok(Ended::Idle) => continue,
                    Err(e) => {
                        tracing::warn!(connection = what, error = %e, "database connection lost; reconnecting")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(connection = what, error = %describe(&e), "database connection failed; reconnecting")
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

enum Ended {
    StoreGone,
    Idle,
}

/// Runs one holding connection until it is lost (an error) or no longer needed.
async fn serve(
    client: &Client,
    schema: &str,
    role: &Role,
    holder: &mut Holder,
    notified: &mut mpsc::UnboundedReceiver<()>,
    backoff: &mut Backoff,
) -> Result<Ended, String> {
    let failed = |e: tokio_postgres::Error| describe(&e);
    // A server-wide idle_session_timeout (PostgreSQL 14 and later) would close this connection,
    // idle between two lock changes by design, and free the lock of a live instance.
    client
        .batch_execute(
            "DO $$ BEGIN PERFORM set_config('idle_session_timeout', '0', false);
               EXCEPTION WHEN undefined_object THEN NULL; END $$",
        )
        .await
        .map_err(failed)?;
    if let Role::Listen(signal) = role {
        client
            .batch_execute(&format!("LISTEN wb_work_{schema}"))
            .await
            .map_err(failed)?;
        signal.send_modify(|n| *n = n.wrapping_add(1));
    }
    let mut mine = BTreeSet::new();
    loop {
        holder
            .sync(client, schema, &mut mine)
            .await
            .map_err(failed)?;
        backoff.reset();
        if matches!(role, Role::Lock) && mine.is_empty() {
            return Ok(Ended::Idle);
        }
        loop {
            tokio::select! {
                changed = holder.wanted.changed() => {
                    if changed.is_err() {
                        return Ok(Ended::StoreGone);
                    }
                    break;
                }
                notification = notified.recv() => match (notification, role) {
                    (Some(()), Role::Listen(signal)) => {
                        signal.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    (Some(()), Role::Lock) => {}
                    (None, _) => return Err("the connection closed".into()),
                },
            }
        }
    }
}
