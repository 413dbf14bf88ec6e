//! CPU time, read from Linux's `/proc/<pid>/schedstat` (nanoseconds on CPU per thread): this
//! process's threads, and the processes of a Postgres server on this machine.
//!
//! Throughput on a shared machine drifts within seconds; the CPU a phase costs per event does
//! not, so it shows what a change saved where a rate cannot. It only reads; a figure built on
//! it is left out where `/proc` (or a local server) is not there.

use std::fs;

/// Nanoseconds on CPU so far: this process, and every process named `postgres` (postmaster,
/// backends, background workers); `None` where they cannot be read.
#[derive(Clone, Copy)]
pub struct CpuTime {
    pub own_ns: Option<u64>,
    pub server_ns: Option<u64>,
}

/// The first field of a schedstat file: time on CPU, in nanoseconds.
fn on_cpu_ns(path: &str) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn own_ns() -> Option<u64> {
    let mut total = 0;
    for task in fs::read_dir("/proc/self/task").ok()?.flatten() {
        total += on_cpu_ns(&format!("{}/schedstat", task.path().display()))?;
    }
    Some(total)
}

fn server_ns() -> Option<u64> {
    let mut total = 0;
    let mut found = false;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres") {
            // A backend may exit between the two reads: it then counts as nothing.
            if let Some(ns) = on_cpu_ns(&format!("/proc/{pid}/schedstat")) {
                total += ns;
                found = true;
            }
        }
    }
    found.then_some(total)
}

impl CpuTime {
    pub fn now() -> CpuTime {
        CpuTime {
            own_ns: own_ns(),
            server_ns: server_ns(),
        }
    }

    /// Microseconds per item since `earlier`: (this process, the server).
    pub fn us_per(self, earlier: CpuTime, items: usize) -> (Option<f64>, Option<f64>) {
        let per = |now: Option<u64>, then: Option<u64>| {
            Some(now?.saturating_sub(then?) as f64 / 1000.0 / items.max(1) as f64)
        };
        (
            per(self.own_ns, earlier.own_ns),
            per(self.server_ns, earlier.server_ns),
        )
    }
}
