//! What a single-fault scenario (`pg-restart`, `broker-restart`) reports: its figures, the
//! counts that must be zero, and the checks that failed. Printed as `name: value` lines (like
//! the main run) and written to `target/chaos/<scenario>.json` for `whizbang-chaos report`.
//! It only records and prints; the scenarios decide what to check.

use crate::ChaosResult;
use std::process::Command as Process;

pub struct Scenario {
    name: &'static str,
    figures: Vec<(String, String)>,
    /// Figures with a bound: name → the bound, as text (`= 0`).
    bounds: Vec<(String, String)>,
    failures: Vec<String>,
}

impl Scenario {
    pub fn new(name: &'static str) -> Scenario {
        Scenario {
            name,
            figures: Vec::new(),
            bounds: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// A figure without a bound (how much was sent, how long the outage took).
    pub fn figure(&mut self, name: &str, value: impl ToString) {
        self.figures.push((name.into(), value.to_string()));
    }

    /// A count that must equal `bound` (0 for lost, doubled or reordered).
    pub fn bound(&mut self, name: &str, value: usize, bound: usize) {
        self.figure(name, value);
        self.bounds.push((name.into(), format!("= {bound}")));
        if value != bound {
            self.failures
                .push(format!("{name} = {value}, must be {bound}"));
        }
    }

    /// A condition that must hold; `what` says what was expected.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(format!("expected: {}", what.into()));
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Prints the figures and the verdict, writes the JSON; whether the scenario passed.
    /// An error that ended the scenario early counts as a failure.
    pub fn finish(mut self, outcome: ChaosResult<()>) -> bool {
        if let Err(e) = outcome {
            self.failures.push(format!("{} stopped: {e}", self.name));
        }
        for (name, value) in &self.figures {
            println!("{name}: {value}");
        }
        if let Err(e) = self.write() {
            self.failures
                .push(format!("cannot write the results file: {e}"));
        }
        for f in &self.failures {
            println!("FAILED: {f}");
        }
        if self.failures.is_empty() {
            println!("{}: passed", self.name);
        }
        self.failures.is_empty()
    }

    fn write(&self) -> ChaosResult<()> {
        let as_json = |pairs: &[(String, String)]| {
            pairs
                .iter()
                .map(|(name, value)| {
                    let v = value
                        .parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map_or_else(|| serde_json::Value::String(value.clone()), Into::into);
                    (name.clone(), v)
                })
                .collect::<serde_json::Map<_, _>>()
        };
        let commit = Process::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(whizbang_tools_common::workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let results = serde_json::json!({
            "scenario": self.name,
            "commit": commit,
            "figures": as_json(&self.figures),
            "bounds": self
                .bounds
                .iter()
                .map(|(name, bound)| (name.clone(), serde_json::Value::String(bound.clone())))
                .collect::<serde_json::Map<_, _>>(),
            "failures": self.failures,
            "passed": self.failures.is_empty(),
        });
        let dir = whizbang_tools_common::target_dir().join("chaos");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.json", self.name));
        std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
        println!("results written to {}", path.display());
        Ok(())
    }
}
