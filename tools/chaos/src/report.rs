//! The fault-injection table: the figures of the last chaos run (`target/chaos/results.json`)
//! with the bound each must meet, followed by the single-fault scenarios of the same commit
//! (`target/chaos/pg-restart.json`, `target/chaos/broker-restart.json`) when they ran, as one
//! Markdown table (what docs/chaos.md shows), as `name: value` lines, or as a headline of a
//! few lines (what the README shows). It only reads and formats; the runs measure and judge.

use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// How `whizbang-chaos report` prints.
#[derive(Clone, Copy)]
pub enum Form {
    Lines,
    Markdown,
    Headline,
}

/// The scenarios whose results files the report adds, in order.
pub const SCENARIOS: &[&str] = &["pg-restart", "broker-restart"];

/// The bound of a main-run figure, as text, and whether `figures` meet it.
fn bound(name: &str, figures: &Value) -> Option<(String, bool)> {
    let value = figures[name].as_f64()?;
    let number = |n: &str| figures[n].as_f64();
    Some(match name {
        "lost"
        | "duplicates"
        | "reapplied_after_consumer_kill"
        | "order_violations"
        | "phantoms"
        | "stuck_rows" => ("= 0".into(), value == 0.0),
        "committed" => {
            let expected = number("expected_events")?;
            (format!("= {expected}"), value == expected)
        }
        "takeover_s_max" => {
            let bound = number("takeover_bound_s")?;
            (format!("≤ {bound} (lease + 2 s)"), value <= bound)
        }
        "crash_takeover_s_max" => {
            let bound = number("crash_takeover_bound_s")?;
            (format!("≤ {bound} (heartbeat + 2 s)"), value <= bound)
        }
        "kills" | "crash_kills" | "consumer_kills" => ("≥ 1".into(), value >= 1.0),
        "dead_lettered_broker" => {
            let sent = number("poison_sent")?;
            (format!("= {sent} (poison sent)"), value == sent)
        }
        "requeued" => {
            let dead = number("dead_lettered_store")?;
            (
                format!("= {dead} (dead-lettered in the store)"),
                value == dead,
            )
        }
        _ => return None,
    })
}

fn shown(value: &Value) -> String {
    match value {
        // Whole numbers were stored as floats: show them without ".0".
        Value::Number(n) => match n.as_f64() {
            Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn verdict(failures: &Value) -> String {
    match failures.as_array().filter(|f| !f.is_empty()) {
        None => "passed".into(),
        Some(f) => format!(
            "**failed**: {}",
            f.iter().map(shown).collect::<Vec<_>>().join("; ")
        ),
    }
}

/// The scenario files of `dir` written at `commit`; others are stale and left out (named on
/// stderr).
pub fn scenarios(dir: &Path, commit: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for name in SCENARIOS {
        let path = dir.join(format!("{name}.json"));
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if v["commit"] == *commit => out.push(v),
            Ok(v) => eprintln!(
                "whizbang-chaos: {} is of commit {}, the run of {}: left out",
                path.display(),
                v["commit"],
                commit
            ),
            Err(e) => eprintln!("whizbang-chaos: {} unreadable: {e}", path.display()),
        }
    }
    out
}

/// The Markdown table of a run's `results` and its `scenarios`.
pub fn table(results: &Value, scenarios: &[Value]) -> String {
    let mut out = String::new();
    let figures = &results["figures"];
    let _ = writeln!(
        out,
        "commit {}, {} cores; {} form: {} writers, {} consumers, {} streams × {} events, {} kills, {} broker and {} Postgres restarts\n",
        results["commit"].as_str().unwrap_or("?"),
        shown(&results["cores"]),
        results["form"].as_str().unwrap_or("?"),
        shown(&figures["writers"]),
        shown(&figures["consumers"]),
        shown(&figures["streams"]),
        shown(&figures["events_per_stream"]),
        shown(&figures["kills"]),
        shown(&figures["broker_restarts"]),
        shown(&figures["postgres_restarts"]),
    );
    let _ = writeln!(out, "| run | figure | value | bound |");
    let _ = writeln!(out, "|---|---|---|---|");
    if let Some(map) = figures.as_object() {
        for (name, value) in map {
            let bound = bound(name, figures).map_or_else(String::new, |(text, met)| {
                format!("{text} ({})", if met { "met" } else { "**not met**" })
            });
            let _ = writeln!(out, "| run | `{name}` | {} | {bound} |", shown(value));
        }
    }
    let _ = writeln!(
        out,
        "| run | verdict | {} | |",
        verdict(&results["failures"])
    );
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap_or("?");
        if let Some(map) = s["figures"].as_object() {
            for (figure, value) in map {
                let bound = s["bounds"][figure].as_str().map_or_else(String::new, |b| {
                    let met = b
                        .strip_prefix("= ")
                        .and_then(|b| b.parse::<f64>().ok())
                        .is_some_and(|b| value.as_f64() == Some(b));
                    format!("{b} ({})", if met { "met" } else { "**not met**" })
                });
                let _ = writeln!(out, "| {name} | `{figure}` | {} | {bound} |", shown(value));
            }
        }
        let _ = writeln!(out, "| {name} | verdict | {} | |", verdict(&s["failures"]));
    }
    out
}

/// The headline for the README: one sentence on the run and one table row of the figures
/// with bounds, then the scenarios' verdicts.
pub fn headline(results: &Value, scenarios: &[Value]) -> String {
    let f = &results["figures"];
    let v = |name: &str| shown(&f[name]);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "commit {}, {} cores, {} form: {} writers and {} consumers ({} shards, flush {}), {} \
         streams × {} events; {} kills ({} of consumers, {} during a server fault), the broker \
         and Postgres each restarted{}; {} poison messages, {} failing events\n",
        results["commit"].as_str().unwrap_or("?"),
        shown(&results["cores"]),
        results["form"].as_str().unwrap_or("?"),
        v("writers"),
        v("consumers"),
        v("shards"),
        v("flush_strategy"),
        v("streams"),
        v("events_per_stream"),
        v("kills"),
        v("consumer_kills"),
        v("overlapping_kills"),
        if f["hangs"].as_f64().unwrap_or(0.0) > 0.0 {
            format!(" and hung {} s", v("hang_s"))
        } else {
            " (no hangs)".to_string()
        },
        v("poison_sent"),
        v("dead_lettered_store"),
    );
    let _ = writeln!(
        out,
        "| lost | duplicates | order violations | stuck rows | re-applied after a consumer kill | takeover max | crash takeover max | hang recovery max | dead-lettered → requeued | verdict |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| {} | {} | {} | {} | {} | {} s (≤ {}) | {} s (≤ {}) | {} s | {} → {} | {} |",
        v("lost"),
        v("duplicates"),
        v("order_violations"),
        v("stuck_rows"),
        v("reapplied_after_consumer_kill"),
        v("takeover_s_max"),
        v("takeover_bound_s"),
        v("crash_takeover_s_max"),
        v("crash_takeover_bound_s"),
        v("hang_recovery_s_max"),
        v("dead_lettered"),
        v("requeued"),
        verdict(&results["failures"]),
    );
    if !scenarios.is_empty() {
        let each: Vec<String> = scenarios
            .iter()
            .map(|s| {
                format!(
                    "`{}` {}",
                    s["scenario"].as_str().unwrap_or("?"),
                    verdict(&s["failures"])
                )
            })
            .collect();
        let _ = writeln!(out, "\nScenarios: {}.", each.join(", "));
    }
    out
}

/// The same figures as `name: value` lines (scenario figures prefixed with the scenario).
pub fn lines(results: &Value, scenarios: &[Value]) -> String {
    let mut out = String::new();
    let mut section = |prefix: &str, v: &Value| {
        if let Some(map) = v["figures"].as_object() {
            for (name, value) in map {
                let _ = writeln!(out, "{prefix}{name}: {}", shown(value));
            }
        }
        let _ = writeln!(out, "{prefix}verdict: {}", verdict(&v["failures"]));
    };
    section("", results);
    for s in scenarios {
        section(&format!("{}.", s["scenario"].as_str().unwrap_or("?")), s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_listed_with_their_bounds_and_verdicts() {
        let results = serde_json::json!({
            "commit": "abc", "cores": 2, "form": "short",
            "figures": {"writers": 3.0, "consumers": 2.0, "streams": 60.0, "events_per_stream": 50.0, "kills": 6.0,
                        "broker_restarts": 1.0, "postgres_restarts": 1.0,
                        "expected_events": 3000.0, "committed": 3000.0, "lost": 0.0,
                        "duplicates": 2.0, "takeover_s_max": 7.5, "takeover_bound_s": 7.0,
                        "crash_lease_s": 300.0, "crash_kills": 2.0,
                        "crash_takeover_s_max": 1.4, "crash_takeover_bound_s": 3.0},
            "failures": ["duplicates = 2, must be 0"],
        });
        let scenario = serde_json::json!({
            "scenario": "pg-restart", "commit": "abc",
            "figures": {"sends_ok": 560.0, "sends_not_stored_once": 0.0},
            "bounds": {"sends_not_stored_once": "= 0"}, "failures": [],
        });
        let t = table(&results, &[scenario]);
        assert!(t.starts_with("commit abc, 2 cores; short form: 3 writers, 2 consumers, 60 streams × 50 events, 6 kills, 1 broker and 1 Postgres restarts\n"), "{t}");
        assert!(t.contains("| run | `lost` | 0 | = 0 (met) |"), "{t}");
        assert!(
            t.contains("| run | `duplicates` | 2 | = 0 (**not met**) |"),
            "{t}"
        );
        assert!(
            t.contains("| run | `committed` | 3000 | = 3000 (met) |"),
            "{t}"
        );
        assert!(
            t.contains("| run | `takeover_s_max` | 7.5 | ≤ 7 (lease + 2 s) (**not met**) |"),
            "{t}"
        );
        assert!(
            t.contains("| run | `crash_takeover_s_max` | 1.4 | ≤ 3 (heartbeat + 2 s) (met) |"),
            "{t}"
        );
        assert!(t.contains("| run | `crash_kills` | 2 | ≥ 1 (met) |"), "{t}");
        assert!(t.contains("| run | `crash_lease_s` | 300 |  |"), "{t}");
        assert!(
            t.contains("| run | verdict | **failed**: duplicates = 2, must be 0 | |"),
            "{t}"
        );
        assert!(t.contains("| pg-restart | `sends_ok` | 560 |  |"), "{t}");
        assert!(
            t.contains("| pg-restart | `sends_not_stored_once` | 0 | = 0 (met) |"),
            "{t}"
        );
        assert!(t.contains("| pg-restart | verdict | passed | |"), "{t}");
        let l = lines(&results, &[]);
        assert!(
            l.contains("lost: 0\n") && l.contains("verdict: **failed**"),
            "{l}"
        );
        let h = headline(&results, &[]);
        assert_eq!(h.lines().count(), 5, "{h}");
        assert!(
            h.contains("| 0 | 2 |") && h.contains("7.5 s (≤ 7)") && h.contains("**failed**"),
            "{h}"
        );
    }

    #[test]
    fn dead_letters_must_match_what_was_poisoned_and_requeued() {
        let results = serde_json::json!({
            "commit": "abc", "cores": 2, "form": "short",
            "figures": {"poison_sent": 5.0, "dead_lettered_broker": 4.0,
                        "dead_lettered_store": 4.0, "requeued": 4.0, "consumer_kills": 3.0},
            "failures": [],
        });
        let t = table(&results, &[]);
        assert!(
            t.contains("| run | `dead_lettered_broker` | 4 | = 5 (poison sent) (**not met**) |"),
            "{t}"
        );
        assert!(
            t.contains("| run | `requeued` | 4 | = 4 (dead-lettered in the store) (met) |"),
            "{t}"
        );
        assert!(
            t.contains("| run | `consumer_kills` | 3 | ≥ 1 (met) |"),
            "{t}"
        );
    }

    #[test]
    fn a_crash_takeover_past_the_heartbeat_bound_is_not_met() {
        let results = serde_json::json!({
            "commit": "abc", "cores": 2, "form": "short",
            "figures": {"crash_kills": 0.0, "crash_takeover_s_max": 3.1,
                        "crash_takeover_bound_s": 3.0, "takeover_s_max": 3.1,
                        "takeover_bound_s": 5.0},
            "failures": ["crash_takeover_s_max = 3.1 s, bound 3.0 s (heartbeat + 2 s)"],
        });
        let t = table(&results, &[]);
        assert!(
            t.contains(
                "| run | `crash_takeover_s_max` | 3.1 | ≤ 3 (heartbeat + 2 s) (**not met**) |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| run | `crash_kills` | 0 | ≥ 1 (**not met**) |"),
            "{t}"
        );
        assert!(
            t.contains("| run | `takeover_s_max` | 3.1 | ≤ 5 (lease + 2 s) (met) |"),
            "{t}"
        );
        let l = lines(&results, &[]);
        assert!(l.contains("crash_takeover_s_max: 3.1\n"), "{l}");
    }
}
