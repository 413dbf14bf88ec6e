//! The local servers a chaos run restarts and hangs: the RabbitMQ broker (`rabbitmqctl
//! [-n NODE] stop_app` / `start_app`, SIGSTOP / SIGCONT of its Erlang VM) and the Postgres
//! cluster (`pg_ctlcluster <version> <cluster> restart`, SIGSTOP / SIGCONT of its postmaster
//! and backends), run as root or through password-less sudo, and the guards that leave them
//! running however a scenario ends (a failure, an error, Ctrl-C). It stops, starts, pauses,
//! resumes and waits; it never changes a server's configuration or data.
//!
//! Which servers: `WHIZBANG_CHAOS_PG_CLUSTER` names the Postgres cluster (default `main`) and
//! `WHIZBANG_RABBITMQ_NODE` the broker node (default: rabbitmqctl's own,
//! `rabbit@<host>`); `scripts/chaos.sh` points both at private servers of its own.

use crate::ChaosResult;
use std::process::Command as Process;
use std::time::{Duration, Instant};

/// How to reach the local servers' control commands.
#[derive(Clone)]
pub struct Servers {
    sudo: bool,
    pg_version: Option<String>,
    pg_cluster: String,
    rabbit_node: Option<String>,
    database_url: String,
}

/// The Postgres cluster a run controls (`WHIZBANG_CHAOS_PG_CLUSTER`, default `main`).
pub fn pg_cluster() -> String {
    std::env::var("WHIZBANG_CHAOS_PG_CLUSTER")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "main".into())
}

/// The broker node a run controls (`WHIZBANG_RABBITMQ_NODE`), if not rabbitmqctl's default.
pub fn rabbit_node() -> Option<String> {
    std::env::var("WHIZBANG_RABBITMQ_NODE")
        .ok()
        .filter(|n| !n.is_empty())
}

impl Servers {
    /// Checks the rights (root, or sudo without a password) and, when `postgres`, finds the
    /// cluster to restart (`/etc/postgresql/<version>/<cluster>`, the newest version).
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
        let pg_cluster = pg_cluster();
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
                .filter(|e| e.path().join(&pg_cluster).is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
            Some(versions.pop().ok_or_else(|| {
                format!("no /etc/postgresql/<version>/{pg_cluster} cluster to restart")
            })?)
        } else {
            None
        };
        Ok(Servers {
            sudo: !root,
            pg_version,
            pg_cluster,
            rabbit_node: rabbit_node(),
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
        self.rabbitmqctl("stop_app")
    }

    pub fn start_broker(&self) -> Result<(), String> {
        self.rabbitmqctl("start_app")
    }

    fn rabbitmqctl(&self, action: &str) -> Result<(), String> {
        let mut args = Vec::new();
        if let Some(node) = &self.rabbit_node {
            args.extend(["-n", node.as_str()]);
        }
        args.push(action);
        self.as_root("rabbitmqctl", &args).map(drop)
    }

    /// `pg_ctlcluster <version> <cluster> ACTION` (start, restart, ...).
    pub fn pg_ctl(&self, action: &str) -> Result<(), String> {
        let version = self.pg_version.as_deref().ok_or("no Postgres cluster")?;
        self.as_root(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                version,
                &self.pg_cluster,
                action,
            ],
        )
        .map(drop)
    }

    /// The process of `what` ("broker" or "postgres") a hang stops first: the broker node's
    /// Erlang VM (its pid from `rabbitmqctl eval 'os:getpid().'`), or the cluster's postmaster
    /// (first line of its `postmaster.pid`), whose children are stopped after it.
    pub fn main_pid(&self, what: &str) -> Result<u32, String> {
        match what {
            "broker" => {
                let mut args = Vec::new();
                if let Some(node) = &self.rabbit_node {
                    args.extend(["-n", node.as_str()]);
                }
                args.extend(["eval", "os:getpid()."]);
                let out = self.as_root("rabbitmqctl", &args)?;
                out.trim()
                    .trim_matches('"')
                    .parse::<u32>()
                    .map_err(|e| format!("rabbitmqctl eval os:getpid() answered {out:?}: {e}"))
            }
            "postgres" => {
                let version = self.pg_version.as_deref().ok_or("no Postgres cluster")?;
                let file = format!(
                    "/var/lib/postgresql/{version}/{}/postmaster.pid",
                    self.pg_cluster
                );
                let text = self.as_root("cat", &[&file])?;
                text.lines()
                    .next()
                    .and_then(|l| l.trim().parse::<u32>().ok())
                    .ok_or_else(|| format!("no postmaster pid in {file}"))
            }
            other => Err(format!("unknown server {other}")),
        }
    }

    /// The children of `pid` (a stopped postmaster forks no more).
    fn children(pid: u32) -> Vec<u32> {
        Process::new("pgrep")
            .args(["-P", &pid.to_string()])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `signal` (`STOP`, `CONT`) to each of `pids`; a process that has exited meanwhile
    /// (a backend ending) is not an error, the first of them failing is.
    pub fn signal(&self, signal: &str, pids: &[u32]) -> Result<(), String> {
        for (i, pid) in pids.iter().enumerate() {
            let sent = self.as_root("kill", &[&format!("-{signal}"), &pid.to_string()]);
            if i == 0 {
                sent?;
            }
        }
        Ok(())
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

/// A server hung with SIGSTOP: SIGCONT to every stopped process when resumed or dropped, so no
/// exit path (an error, a panic unwinding, Ctrl-C) leaves a server stopped.
pub struct HangGuard {
    servers: Servers,
    pids: Vec<u32>,
}

impl HangGuard {
    /// Stops `what` ("broker" or "postgres"): SIGSTOP to its processes.
    pub fn stop(servers: Servers, what: &str) -> Result<HangGuard, String> {
        let main = servers.main_pid(what)?;
        // Held before the signal: a SIGSTOP that fails halfway still gets its SIGCONT.
        let mut guard = HangGuard {
            servers,
            pids: vec![main],
        };
        guard.servers.signal("STOP", &[main])?;
        let children = Servers::children(main);
        guard.pids.extend(&children);
        guard.servers.signal("STOP", &children).ok();
        Ok(guard)
    }

    /// SIGCONT to the stopped processes.
    pub fn resume(mut self) -> Result<(), String> {
        let pids = std::mem::take(&mut self.pids);
        self.servers.signal("CONT", &pids)
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        if !self.pids.is_empty()
            && let Err(e) = self.servers.signal("CONT", &self.pids)
        {
            eprintln!(
                "could not resume the hung server ({e}): run `kill -CONT {:?}`",
                self.pids
            );
        }
    }
}
