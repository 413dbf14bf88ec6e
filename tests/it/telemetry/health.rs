//! `/health/live` and `/health/ready` over real HTTP, as an orchestrator probes them: ready
//! (200) on a running instance on Postgres, 503 with the `Health` JSON and a reason naming the
//! store while Postgres cannot be reached, 200 again once it can. The shared Postgres server is
//! never stopped: the runtime reaches it through a proxy of this test, which is cut and
//! restored.

use crate::support::pg::{self, database_url, new_schema, on_postgres};
use crate::support::proxy::Proxy;
use crate::support::scrape;
use crate::support::{config, wait_for};
use std::net::SocketAddr;
use whizbang::Runtime;

/// The test database's URL, and the address it names.
async fn upstream() -> anyhow::Result<(String, SocketAddr)> {
    let url = database_url();
    let parsed: tokio_postgres::Config = url.parse()?;
    let host = match parsed.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        other => anyhow::bail!("the test database must be reached over TCP, got {other:?}"),
    };
    let port = parsed.get_ports().first().copied().unwrap_or(5432);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{host}:{port} resolves to nothing"))?;
    Ok((url, addr))
}

/// Status of a probe, with the JSON for the failure message.
async fn probe(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    scrape::health(addr, path)
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[actix::test]
async fn readiness_follows_postgres_through_a_cut_and_a_restore() -> anyhow::Result<()> {
    let _slot = pg::slot().await;
    let schema = new_schema();
    let (url, upstream) = upstream().await?;
    let proxy = Proxy::start(upstream).await?;
    let mut c = on_postgres(config("health-probe"), &schema);
    let host_port = format!("@{}:{}", upstream.ip(), upstream.port());
    c.store.database_url = if url.contains(&host_port) {
        url.replace(&host_port, &format!("@{}", proxy.addr()))
    } else {
        format!("postgres://postgres@{}/postgres", proxy.addr())
    }
    .into();
    c.telemetry.metrics_listen = "127.0.0.1:0".into();
    c.partitions.heartbeat_seconds = 1;
    c.store.connect_timeout_ms = 1_000;
    c.store.statement_timeout_ms = 2_000;
    let runtime = Runtime::builder(c).start().await?;
    let addr = runtime.metrics_addr().expect("a listener");

    wait_for("ready", || async {
        probe(addr, "/health/ready").await.0 == 200
    })
    .await?;
    let (status, ready) = probe(addr, "/health/ready").await;
    assert_eq!(status, 200);
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["database_reachable"], true, "{ready}");
    assert_eq!(ready["reasons"], serde_json::json!([]), "{ready}");

    proxy.cut();
    wait_for("not ready while Postgres is cut off", || async {
        probe(addr, "/health/ready").await.0 == 503
    })
    .await?;
    let (status, down) = probe(addr, "/health/ready").await;
    assert_eq!(status, 503, "{down}");
    assert_eq!(down["ready"], false, "{down}");
    assert_eq!(down["database_reachable"], false, "{down}");
    let reasons = down["reasons"].to_string();
    assert!(
        reasons.contains("store"),
        "a reason names the store: {down}"
    );
    // Still live: an unreachable database is no reason to replace the instance.
    let (status, live) = probe(addr, "/health/live").await;
    assert_eq!(status, 200, "{live}");
    assert_eq!(live["live"], true);
    // The metrics go on being served.
    scrape::metrics(addr).await?;

    proxy.restore();
    wait_for("ready again once Postgres is back", || async {
        probe(addr, "/health/ready").await.0 == 200
    })
    .await?;
    let (_, back) = probe(addr, "/health/ready").await;
    assert_eq!(back["database_reachable"], true, "{back}");

    runtime.shutdown().await?;
    let _ = pg::drop_schemas(&[&schema]).await;
    Ok(())
}
