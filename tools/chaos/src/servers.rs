//! The local servers a chaos run restarts: the RabbitMQ broker (`rabbitmqctl stop_app` /
//! `start_app`) and the Postgres cluster (`pg_ctlcluster <version> main restart`), run as root
//! or through password-less sudo, and the guards that leave them running however a scenario
//! ends (a failure, an error, Ctrl-C). It stops, starts and waits; it never changes a server's
//! configuration or data.

use crate::ChaosResult;
use std::process::Command as Process;
use std::time::{Duration, Instant};

/// How to reach the local servers' control commands.
#[derive(Clone)]
pub struct Servers {
    sudo: bool,
    pg_version: Option<String>,
    database_url: String,
}

impl Servers {
    /// Checks the rights (root, or sudo without a password) and, when `postgres`, finds the
    /// cluster to restart (`/etc/postgresql/<version>/main`, the newest version).
    pub fn find(broker: bool, postgres: bool, database_url: &str) -> ChaosResult<Servers> {
        let root = Process::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if (broker || postgres)
            && !root
            && !Process::new("sudo")
                .args(["-n", "true"])
                .status()
                .is_ok_and(|s| s.success())
        {
            return Err(
                "restarting the broker or Postgres needs root or password-less sudo".into(),
            );
        }
        let pg_version = if postgres {
            let found = ["/usr/bin/pg_ctlcluster", "/usr/sbin/pg_ctlcluster"]
                .iter()
                .any(|p| std::path::Path::new(p).exists());
            if !found {
                return Err(
                    "pg_ctlcluster not found: the local Postgres server is restarted \
                            with Debian's postgresql-common tools (apt-get install postgresql)"
                        .into(),
                );
            }
            let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
                .map_err(|e| {
                    format!("/etc/postgresql unreadable ({e}): no local cluster to restart")
                })?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("main").is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
            Some(
                versions
                    .pop()
                    .ok_or("no /etc/postgresql/<version>/main cluster to restart")?,
            )
        } else {
            None
        };
        Ok(Servers {
            sudo: !root,
            pg_version,
            database_url: database_url.into(),
        })
    }

    /// Runs `program args` as root; its standard output.
    fn as_root(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = if self.sudo {
            let mut c = Process::new("sudo");
            c.arg("-n").arg(program);
            c
        } else {
            Process::new(program)
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{program} {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Restarts `what` ("broker" or "postgres") and waits until it answers; returns seconds.
    pub fn restart(&self, what: &str) -> Result<f64, String> {
        let start = Instant::now();
        match what {
            "broker" => {
                self.stop_broker()?;
                self.start_broker()?;
            }
            "postgres" => {
                self.pg_ctl("restart")?;
                self.wait_for_postgres(Duration::from_secs(60))?;
            }
            other => return Err(format!("unknown server {other}")),
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// `rabbitmqctl stop_app`: the broker's node stays up, its listeners and queues go away.
    pub fn stop_broker(&self) -> Result<(), String> {
        self.as_root("rabbitmqctl", &["stop_app"]).map(drop)
    }

    pub fn start_broker(&self) -> Result<(), String> {
        self.as_root("rabbitmqctl", &["start_app"]).map(drop)
    }

    /// `pg_ctlcluster <version> main ACTION` (start, restart, ...).
    pub fn pg_ctl(&self, action: &str) -> Result<(), String> {
        let version = self.pg_version.as_deref().ok_or("no Postgres cluster")?;
        self.as_root(
            "pg_ctlcluster",
            &["--skip-systemctl-redirect", version, "main", action],
        )
        .map(drop)
    }

    /// Whether Postgres accepts connections at the database URL now.
    pub fn postgres_ready(&self) -> bool {
        Process::new("pg_isready")
            .args(["-q", "-t", "1", "-d", &self.database_url])
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn wait_for_postgres(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if self.postgres_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Postgres did not accept connections within {limit:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Leaves the Postgres server running when dropped: waits for it, and starts it if it does not
/// come back by itself.
pub struct PostgresGuard(pub Servers);

impl Drop for PostgresGuard {
    fn drop(&mut self) {
        if self.0.wait_for_postgres(Duration::from_secs(30)).is_ok() {
            return;
        }
        eprintln!("the Postgres server is not up after the scenario: starting it");
        if let Err(e) = self.0.pg_ctl("start") {
            eprintln!("{e}");
        }
        if self.0.wait_for_postgres(Duration::from_secs(60)).is_err() {
            eprintln!("the Postgres server did not come back: start it by hand");
        }
    }
}

/// Stops and starts the broker; starts it again when dropped while stopped.
pub struct BrokerGuard {
    servers: Servers,
    stopped: bool,
}

impl BrokerGuard {
    pub fn new(servers: Servers) -> BrokerGuard {
        BrokerGuard {
            servers,
            stopped: false,
        }
    }

    pub async fn stop(&mut self) -> ChaosResult<()> {
        // Marked first: a stop that fails halfway still gets a start from the guard.
        self.stopped = true;
        let servers = self.servers.clone();
        tokio::task::spawn_blocking(move || servers.stop_broker()).await??;
        Ok(())
    }

    pub async fn start(&mut self) -> ChaosResult<()> {
        let servers = self.servers.clone();
        tokio::task::spawn_blocking(move || servers.start_broker()).await??;
        self.stopped = false;
        Ok(())
    }
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped
            && let Err(e) = self.servers.start_broker()
        {
            eprintln!("could not start the broker again: {e}; run `rabbitmqctl start_app`");
        }
    }
}
