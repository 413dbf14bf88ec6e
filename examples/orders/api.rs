//! The order API over HTTP (actix-web), as the specification's two flows describe it:
//!
//! - `POST /orders` → `local_invoke` → `201 Created`, `Location: /orders/{id}`, the
//!   `OrderCreated` result as JSON, the read models already updated;
//! - `POST /orders/async` → `send` → `202 Accepted`, `Location: /orders/status/{correlation_id}`,
//!   the receipt as JSON;
//! - `POST /orders/batch` → several orders in one request scope (`whizbang::web::RequestScope`):
//!   all placed (`201 Created`, the `OrderCreated` results in order) or none;
//! - `GET /orders/status/{correlation_id}` → what the request caused (`whizbang::web::status`);
//! - `GET /orders/{id}` → the order-summary read model.
//!
//! Every `POST` takes an `Idempotency-Key` header: a repeat answers the first outcome without
//! placing the order(s) again. Errors are `application/problem+json` (`whizbang::web::Problem`). It owns the routes and the
//! server's life (stop accepting, finish what is in flight, then stop the runtime); the domain is
//! the parent module's, the HTTP plumbing the library's.

use super::{CreateOrder, OrderCreated, OrderSummaries};
use actix_web::dev::Server;
use actix_web::http::header::LOCATION;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpResponse, HttpServer, web};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;
use uuid::Uuid;
use whizbang::web::{
    BodyLimit, IdempotencyKey, Json, Problem, ReceiptJson, RequestScope, RuntimeHandle,
    complete_scopes,
};
use whizbang::{DispatchOptions, Runtime};

/// What every request handler holds.
#[derive(Clone)]
pub struct Orders {
    pub runtime: RuntimeHandle,
    pub summaries: OrderSummaries,
}

/// A new request: its own correlation id (so a 504 can name it) and the caller's idempotency key.
fn options(key: IdempotencyKey) -> (Uuid, DispatchOptions) {
    let correlation_id = Uuid::now_v7();
    let options = DispatchOptions {
        correlation_id: Some(correlation_id),
        idempotency_key: key.into_inner(),
        ..DispatchOptions::default()
    };
    (correlation_id, options)
}

/// `POST /orders`: the order, once stored and applied to the read models.
async fn create(
    orders: web::Data<Orders>,
    key: IdempotencyKey,
    Json(cmd): Json<CreateOrder>,
) -> Result<HttpResponse, Problem> {
    let (correlation_id, options) = options(key);
    let created: OrderCreated = orders
        .runtime
        .local_invoke_with(cmd, options)
        .await
        .map_err(|e| Problem::from(e).with_correlation_id(correlation_id))?;
    Ok(HttpResponse::Created()
        .insert_header((LOCATION, format!("/orders/{}", created.order_id)))
        .insert_header(("X-Correlation-Id", correlation_id.to_string()))
        .json(created))
}

/// `POST /orders/async`: a receipt once the command's effects are committed.
async fn create_async(
    orders: web::Data<Orders>,
    key: IdempotencyKey,
    Json(cmd): Json<CreateOrder>,
) -> Result<HttpResponse, Problem> {
    let (correlation_id, options) = options(key);
    let receipt = orders
        .runtime
        .send_with(cmd, options)
        .await
        .map_err(|e| Problem::from(e).with_correlation_id(correlation_id))?;
    Ok(HttpResponse::Accepted()
        .insert_header((
            LOCATION,
            format!("/orders/status/{}", receipt.correlation_id),
        ))
        .json(ReceiptJson::from(&receipt)))
}

/// The body of `POST /orders/batch` (a request) and of its `201` (an answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch<T> {
    pub orders: Vec<T>,
}

/// `POST /orders/batch`: every order of the batch placed, in one request scope, or none. The
/// scope is written by the `complete_scopes` middleware once this answers `201`, before the
/// answer leaves (so the read models show every order); a refused order fails the whole
/// request and nothing of the scope is written.
async fn create_batch(
    mut scope: RequestScope,
    Json(batch): Json<Batch<CreateOrder>>,
) -> Result<HttpResponse, Problem> {
    if batch.orders.is_empty() {
        return Err(
            Problem::bad_request("orders: a batch needs at least one order").with_field("orders"),
        );
    }
    let mut created = Vec::with_capacity(batch.orders.len());
    for (i, order) in batch.orders.into_iter().enumerate() {
        let order: OrderCreated = scope.local_invoke(order).await.map_err(|e| {
            let problem = Problem::from(e);
            match problem.field {
                Some(_) => problem,
                None => problem.with_field(format!("orders[{i}]")),
            }
        })?;
        created.push(order);
    }
    Ok(HttpResponse::Created().json(Batch { orders: created }))
}

/// `GET /orders/{id}`: the order-summary read model.
async fn summary(
    orders: web::Data<Orders>,
    order_id: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    match orders
        .summaries
        .get(&order_id)
        .await
        .map_err(|e| Problem::internal(&e))?
    {
        Some(summary) => Ok(HttpResponse::Ok().json(summary)),
        None => Err(Problem::not_found(format!("no order {order_id}"))),
    }
}

/// Any other path.
async fn no_route() -> HttpResponse {
    use actix_web::ResponseError as _;
    Problem::not_found("no such resource").error_response()
}

/// The routes, for an `App` of the caller's (the tests build the same service).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/orders", web::post().to(create))
        .route("/orders/async", web::post().to(create_async))
        .service(
            web::resource("/orders/batch")
                .wrap(from_fn(complete_scopes))
                .route(web::post().to(create_batch)),
        )
        .route(
            "/orders/status/{correlation_id}",
            web::get().to(whizbang::web::status),
        )
        .route("/orders/{id}", web::get().to(summary));
}

/// The HTTP server on `listener`, not yet running (await it, or spawn it). It ignores signals:
/// [`serve_until`] decides when it stops. `shutdown_timeout` bounds how long the requests in
/// flight are given to finish once it is told to stop.
pub fn server(
    listener: TcpListener,
    runtime: &Runtime,
    summaries: OrderSummaries,
    workers: usize,
    shutdown_timeout: Duration,
) -> std::io::Result<Server> {
    let orders = web::Data::new(Orders {
        runtime: RuntimeHandle::new(runtime),
        summaries,
    });
    let handle = web::Data::new(RuntimeHandle::new(runtime));
    let limit = BodyLimit::from_config(runtime.config());
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(orders.clone())
            .app_data(handle.clone())
            .app_data(limit)
            .configure(routes)
            .default_service(web::to(no_route))
    })
    .workers(workers.max(1))
    .disable_signals()
    .shutdown_timeout(shutdown_timeout.as_secs().max(1))
    .listen(listener)?
    .run())
}

/// Runs `server` until `stop` resolves (SIGTERM or Ctrl-C in the example), then stops
/// accepting, lets the requests in flight finish with their real answers, and only then stops
/// the runtime.
pub async fn serve_until(
    server: Server,
    runtime: Runtime,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let handle = server.handle();
    let mut running = actix::spawn(server);
    tokio::select! {
        ended = &mut running => {
            // The server stopped by itself (it cannot bind, say): stop the runtime all the same.
            runtime.shutdown().await?;
            return Ok(ended??);
        }
        () = stop => {}
    }
    tracing::info!("stopping: no new connections; finishing the requests in flight");
    handle.stop(true).await;
    running.await??;
    runtime.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}
