//! Declaring and deleting RabbitMQ topics with their subscriptions for the binaries that make
//! their own (the benchmarks, the chaos run), through `scripts/amqp-topology.sh`, the one
//! place that knows how.

use std::process::Command;

/// Runs `scripts/amqp-topology.sh [--delete] SPEC…` (each spec `TOPIC:SUB[,SUB…]`).
pub fn topology(specs: &[String], delete: bool) -> Result<(), String> {
    let script = crate::workspace_root().join("scripts/amqp-topology.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    if delete {
        cmd.arg("--delete");
    }
    let out = cmd
        .args(specs)
        .output()
        .map_err(|e| format!("cannot run scripts/amqp-topology.sh: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/amqp-topology.sh {}{} failed: {}{}",
            if delete { "--delete " } else { "" },
            specs.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
