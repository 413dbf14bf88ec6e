//! The listener of `telemetry.metrics_listen`: `/metrics`, `/health/live`, `/health/ready`.

use crate::supervision::{Health, Supervised};
use actix_web::{App, HttpResponse, HttpServer, web};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How often histogram samples are folded into their buckets between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// What the handlers read; `supervised` is set once the actors run.
struct Served {
    prometheus: PrometheusHandle,
    supervised: Arc<OnceLock<Supervised>>,
}

/// The running listener; stopped by [`MetricsServer::stop`] or when dropped.
pub(crate) struct MetricsServer {
    addr: SocketAddr,
    supervised: Arc<OnceLock<Supervised>>,
    handle: actix_web::dev::ServerHandle,
    upkeep: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Binds `addr` and serves on one worker thread of its own; until [`MetricsServer::serve`]
    /// hands it the actors, readiness answers 503 (starting).
    pub(crate) fn start(
        addr: SocketAddr,
        prometheus: PrometheusHandle,
    ) -> std::io::Result<MetricsServer> {
        let supervised = Arc::new(OnceLock::new());
        let served = web::Data::new(Served {
            prometheus: prometheus.clone(),
            supervised: supervised.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(served.clone())
                .route("/metrics", web::get().to(metrics))
                .route("/health/live", web::get().to(live))
                .route("/health/ready", web::get().to(ready))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .bind(addr)?;
        let addr = server.addrs().first().copied().unwrap_or(addr);
        let server = server.run();
        let handle = server.handle();
        actix::spawn(async move {
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "the metrics listener stopped");
            }
        });
        let upkeep = actix::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP);
            loop {
                tick.tick().await;
                prometheus.run_upkeep();
            }
        });
        tracing::info!(%addr, "serving /metrics, /health/live and /health/ready");
        Ok(MetricsServer {
            addr,
            supervised,
            handle,
            upkeep,
        })
    }

    /// The actors are running: health is read from them from now on.
    pub(crate) fn serve(&self, supervised: Supervised) {
        let _ = self.supervised.set(supervised);
    }

    /// The address it listens on (the port chosen when `metrics_listen` named port 0).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and waits for the requests being answered.
    pub(crate) async fn stop(self) {
        self.handle.stop(true).await;
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.upkeep.abort();
        // The stop command is sent at once; its completion is not awaited here.
        drop(self.handle.stop(false));
    }
}

async fn metrics(served: web::Data<Served>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(served.prometheus.render())
}

fn answer(health: Health, up: bool) -> HttpResponse {
    if up {
        HttpResponse::Ok().json(health)
    } else {
        HttpResponse::ServiceUnavailable().json(health)
    }
}

/// The report, or while the runtime is starting a not-ready one saying so.
fn health(served: &Served) -> Health {
    match served.supervised.get() {
        Some(supervised) => supervised.health(),
        None => Health::starting(),
    }
}

/// Liveness: 503 only when the instance should be replaced (restarts over their budget).
async fn live(served: web::Data<Served>) -> HttpResponse {
    let health = health(&served);
    let up = health.live;
    answer(health, up)
}

/// Readiness: 503 while anything in `reasons` holds (store or transport failing, heartbeat
/// late, an actor down, starting or shutting down).
async fn ready(served: web::Data<Served>) -> HttpResponse {
    let health = health(&served);
    let up = health.ready;
    answer(health, up)
}
