//! Reading what a runtime serves on `telemetry.metrics_listen`: `/metrics` parsed into
//! series, and the health endpoints' status and JSON, over real HTTP.

use std::net::SocketAddr;
use std::time::Duration;

/// One sample of the Prometheus text format: its name, labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the series `name` whose labels include every `labels` pair; `None` when
    /// no series matches. Panics if several do (the caller named too few labels).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().map(|s| s.value)
    }

    /// The names of every metric with at least one sample (histogram series under their base
    /// name, without `_bucket`, `_sum`, `_count`).
    pub fn metric_names(&self) -> std::collections::BTreeSet<String> {
        self.samples
            .iter()
            .map(|s| {
                let n = s.name.as_str();
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| n.strip_suffix(suffix))
                    .filter(|base| self.text.contains(&format!("# TYPE {base} histogram")))
                    .unwrap_or(n)
                    .to_string()
            })
            .collect()
    }
}

/// Parses the Prometheus text format (label values here never hold `,` or `"`).
pub fn parse(text: &str) -> Scrape {
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("NAME VALUE");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("k=\"v\"");
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            Sample {
                name,
                labels,
                value: value.parse().unwrap_or(f64::NAN),
            }
        })
        .collect();
    Scrape {
        text: text.to_string(),
        samples,
    }
}

fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
}

/// `GET http://addr/path`: status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut response = client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: {e}"))?;
    let body = response
        .body()
        .limit(16 << 20)
        .await
        .map_err(|e| anyhow::anyhow!("GET {path}: reading the body: {e}"))?;
    Ok((
        response.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// Scrapes `/metrics`; fails on any status but 200 or a content type that is not Prometheus
/// text.
pub async fn metrics(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
    Ok(parse(&body))
}

/// A health endpoint's status and JSON body.
pub async fn health(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let (status, body) = get(addr, path).await?;
    let json = serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("{path} answered {status} with no JSON ({e}): {body}"))?;
    Ok((status, json))
}
