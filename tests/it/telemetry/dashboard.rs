//! The Grafana dashboard in the repository (`docs/grafana/whizbang.json`) queries only metrics
//! the runtime exports, and the metric reference (`docs/metrics.md`) documents every one of
//! them with its labels. The list is the runtime's own (`whizbang::telemetry::METRICS`, what it
//! describes to its recorder); `metrics::the_order_scenario_shows_in_the_documented_series`
//! checks that list against a real scrape. It reads files only.

use std::collections::BTreeSet;
use std::path::PathBuf;
use whizbang::telemetry::{METRICS, MetricKind};

fn repo_file(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every `whizbang_*` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("whizbang_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The exported metric a series name belongs to (a histogram's `_bucket`, `_sum`, `_count`).
fn exported(series: &str) -> Option<&'static str> {
    METRICS.iter().map(|m| m.name).find(|name| {
        series == *name
            || METRICS.iter().any(|m| {
                m.name == *name
                    && m.kind == MetricKind::Histogram
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| series == format!("{name}{s}"))
            })
    })
}

/// Every PromQL expression of the dashboard (panels, nested rows, templating queries).
fn expressions(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    ("query", serde_json::Value::String(e)) if e.contains("whizbang_") => {
                        out.push(e.clone())
                    }
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(serde_json::Value::String(e)) = q.get("query") {
                            out.push(e.clone());
                        }
                    }
                    _ => expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("docs/grafana/whizbang.json")).expect("valid JSON");
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 10,
        "the dashboard has its queries: {exprs:?}"
    );
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = names_in(e);
        assert!(
            !names.is_empty(),
            "a query that names no whizbang metric: {e}"
        );
        for n in names {
            let metric = exported(&n).unwrap_or_else(|| {
                panic!("the dashboard queries `{n}`, which the runtime does not export: {e}")
            });
            used.insert(metric);
        }
    }
    // The dashboard shows every metric.
    let all: BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
    let unused: Vec<_> = all.difference(&used).collect();
    assert!(unused.is_empty(), "metrics with no panel: {unused:?}");
}

#[test]
fn the_reference_documents_every_metric_with_its_labels() {
    let doc = repo_file("docs/metrics.md");
    for m in METRICS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}`", m.name)))
            .unwrap_or_else(|| panic!("docs/metrics.md has no row for {}", m.name));
        let kind = format!("{:?}", m.kind).to_lowercase();
        assert!(row.contains(&kind), "{}: its type {kind}: {row}", m.name);
        for label in m.labels {
            assert!(
                row.contains(&format!("`{label}`")),
                "{}: label {label}: {row}",
                m.name
            );
        }
    }
    for n in names_in(&doc) {
        assert!(
            exported(&n).is_some(),
            "docs/metrics.md names `{n}`, which the runtime does not export"
        );
    }
}
