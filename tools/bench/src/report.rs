//! The results table: every figure of a `results.json`, with the goal the issues set for it and
//! whether it was met, as a Markdown table (what the README's benchmark section shows).
//!
//! Printed after each run, and by `whizbang-bench report [--file PATH]` from a file written
//! earlier. It only reads and formats; measuring belongs to the suites.

use serde_json::Value;
use std::fmt::Write as _;

/// A figure's goal.
#[derive(Clone, Copy)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Goal::AtMost(bound) => value <= bound,
            Goal::AtLeast(bound) => value >= bound,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtMost(bound) => format!("≤ {bound}"),
            Goal::AtLeast(bound) => format!("≥ {bound}"),
        }
    }
}

/// The goals the issues name, by suite and figure.
const GOALS: &[(&str, &str, Goal)] = &[
    ("core", "local_invoke_us_p50", Goal::AtMost(20.0)),
    ("core", "telemetry_overhead_ratio", Goal::AtMost(1.10)),
    ("store", "empty_batch_ms_p50", Goal::AtMost(0.5)),
    ("store", "store_ratio_vs_raw", Goal::AtLeast(0.7)),
    ("store", "local_invoke_p50_ratio_vs_raw", Goal::AtMost(2.0)),
    ("store", "local_invoke_p99_ms", Goal::AtMost(10.0)),
    ("store", "idle_queries_per_s", Goal::AtMost(1.0)),
    ("amqp", "publish_ratio_vs_bare", Goal::AtLeast(0.8)),
    ("amqp", "consume_events_per_s", Goal::AtLeast(5000.0)),
    ("amqp", "consume_ratio_vs_bare_drain", Goal::AtLeast(0.6)),
    ("amqp", "e2e_p50_ms", Goal::AtMost(20.0)),
    ("amqp", "e2e_p99_ms", Goal::AtMost(100.0)),
    ("engine", "cpu_receptor_scaling_ratio", Goal::AtLeast(1.6)),
    (
        "engine",
        "heartbeat_under_cpu_hog_lost_leases",
        Goal::AtMost(0.0),
    ),
    ("engine", "overload_rss_growth_mb", Goal::AtMost(64.0)),
    // Twice the caller deadline of the overload phase (1 s).
    ("engine", "overload_accepted_p99_ms", Goal::AtMost(2000.0)),
    // The statement timeout (5 s by default) + 1 s.
    ("engine", "pg_stall_error_s_max", Goal::AtMost(6.0)),
    ("engine", "pg_stall_lost", Goal::AtMost(0.0)),
    ("http", "http_invoke_ratio_vs_raw", Goal::AtLeast(0.6)),
    ("http", "http_invoke_p99_ratio_vs_raw", Goal::AtMost(2.0)),
];

/// Besides the figures with goals, what the README's one table shows (`--headline`): the
/// throughputs and their baselines, so a reader sees the scale as well as the ratios.
const HEADLINE: &[(&str, &str)] = &[
    ("core", "local_invoke_per_s"),
    ("store", "store_events_per_s"),
    ("store", "raw_events_per_s"),
    ("store", "store_ratio_vs_raw_rounds"),
    ("amqp", "publish_msgs_per_s"),
    ("amqp", "bare_publish_msgs_per_s"),
    ("e2e", "e2e_max_sustainable_per_s"),
    ("http", "http_invoke_per_s"),
    ("http", "http_raw_per_s"),
    ("http", "http_async_per_s"),
];

fn goal(suite: &str, figure: &str) -> Option<Goal> {
    GOALS
        .iter()
        .find(|(s, f, _)| *s == suite && *f == figure)
        .map(|&(_, _, g)| g)
}

/// Which figures a table shows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Every figure of the run (docs/benchmarks.md).
    All,
    /// The figures with goals and the [`HEADLINE`] throughputs (the README).
    Headline,
}

/// The Markdown table of `results` (the JSON `whizbang-bench` writes).
pub fn table(results: &Value, rows: Rows) -> String {
    let mut out = String::new();
    let machine = &results["machine"];
    let _ = writeln!(
        out,
        "commit {}, {} cores, {} MB, load average {}; Postgres {} (synchronous_commit {})\n",
        results["commit"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["memory_mb"],
        machine["load_average"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        results["postgres"]["server_version"]
            .as_str()
            .unwrap_or("-"),
        results["postgres"]["synchronous_commit"]
            .as_str()
            .unwrap_or("-"),
    );
    let _ = writeln!(out, "| suite | figure | value | goal |");
    let _ = writeln!(out, "|---|---|---|---|");
    let suites = results["suites"].as_array().cloned().unwrap_or_default();
    for suite in suites.iter().filter_map(Value::as_str) {
        let Some(figures) = results["figures"][suite].as_object() else {
            continue;
        };
        for (name, value) in figures {
            let headline =
                goal(suite, name).is_some() || HEADLINE.contains(&(suite, name.as_str()));
            if name == "suite" || (rows == Rows::Headline && !headline) {
                continue;
            }
            let shown = match value {
                // Whole numbers were stored as floats: show them without ".0".
                Value::Number(n) => match n.as_f64() {
                    Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
                    _ => n.to_string(),
                },
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let goal = goal(suite, name).map_or_else(String::new, |g| {
                let verdict = match value.as_f64() {
                    Some(v) if g.met(v) => "met",
                    Some(_) => "**not met**",
                    None => "?",
                };
                format!("{} ({verdict})", g.text())
            });
            let _ = writeln!(out, "| {suite} | `{name}` | {shown} | {goal} |");
        }
    }
    if let Some(errors) = results["errors"].as_array().filter(|e| !e.is_empty()) {
        let _ = writeln!(out, "\nerrors: {errors:?}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_listed_with_their_goals() {
        let results = serde_json::json!({
            "commit": "abc",
            "suites": ["store"],
            "machine": {"cores": 2, "memory_mb": 1024, "load_average": ["1.0", "0.5", "0.2"]},
            "postgres": {"server_version": "15.1", "synchronous_commit": "on"},
            "figures": {"store": {"suite": "store", "empty_batch_ms_p50": 0.13,
                                   "store_ratio_vs_raw": 0.1, "raw_events_per_s": 90000.0,
                                   "raw_minimal_rows_events_per_s": 95000.0}},
            "errors": [],
        });
        let t = table(&results, Rows::All);
        assert!(
            t.contains("| store | `empty_batch_ms_p50` | 0.13 | ≤ 0.5 (met) |"),
            "{t}"
        );
        assert!(
            t.contains("| store | `store_ratio_vs_raw` | 0.1 | ≥ 0.7 (**not met**) |"),
            "{t}"
        );
        assert!(
            t.contains("| store | `raw_events_per_s` | 90000 |  |"),
            "{t}"
        );
        assert!(!t.contains("`suite`"), "{t}");

        let headline = table(&results, Rows::Headline);
        assert!(headline.contains("`empty_batch_ms_p50`"), "{headline}");
        assert!(headline.contains("`raw_events_per_s`"), "{headline}");
        assert!(!headline.contains("`raw_minimal_rows"), "{headline}");
    }
}
