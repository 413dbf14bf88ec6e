//! `whizbang-bench http`: the order API of `examples/orders` over HTTP on the Postgres store,
//! beside a bare actix-web handler in the same run that takes the same request, runs the same
//! receptor logic and inserts the same event and its outbox row with one raw statement.
//!
//! Keep-alive clients (`--clients`, each one connection, requests one after another) post
//! orders, each on a stream of its own. The runtime's `POST /orders` (`local_invoke`: event
//! store + outbox + the order-summary table, read-your-writes) and the raw handler are measured
//! in alternating rounds; then `POST /orders/async` (`send`) alone. Both sides have
//! `--connections` database connections, each held by one request at a time. Figures:
//! `http_invoke_per_s`, `http_raw_per_s`, `http_invoke_ratio_vs_raw` (the median of the rounds'
//! ratios), `http_invoke_p99_ms`, `http_raw_p99_ms`, `http_invoke_p99_ratio_vs_raw`,
//! `http_async_per_s`; and the CPU per request of each side, this process's and the Postgres
//! server's (`http_{invoke,raw}_{process,server}_cpu_us_per_request`, medians of the rounds).
//! Every answer's status is checked: a request not answered `201`/`202`
//! fails the suite.

#[allow(dead_code)] // the examples' domain and HTTP service; the bench uses a part of it
#[path = "../../../examples/orders/mod.rs"]
mod orders;

use crate::cpu::CpuTime;
use crate::{BenchResult, Samples, figure};
use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Args;
use orders::{CreateOrder, CreateOrderReceptor, OrderCreated, OrderSummaries};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;
use whizbang::config::ExposeSecret;
use whizbang::config::StoreBackend;
use whizbang::store::postgres::PostgresStore;
use whizbang::{Config, Consistency, Message, Runtime};

/// Arguments of the `http` suite.
#[derive(Args)]
pub struct HttpArgs {
    /// Database URL (default: WHIZBANG_DATABASE_URL or the local server).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Keep-alive clients posting at once.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Requests per client in one round.
    #[arg(long, default_value_t = 100)]
    pub requests: usize,
    /// Rounds of each side, alternating (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// HTTP worker threads of each server.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Database connections of each side (the runtime's `store.pool_size`, the raw handler's
    /// connections).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

fn config(args: &HttpArgs, schema: &str) -> Config {
    let mut c = Config::default();
    c.service.name = "bench-http".into();
    c.store.backend = StoreBackend::Postgres;
    c.store.database_url = crate::database_url(args.database_url.as_deref()).into();
    c.store.schema = schema.to_string();
    c.store.pool_size = args.connections as u32;
    // One instance alone: it may hold every partition.
    c.partitions.max_partitions_per_instance = c.partitions.partition_count;
    c.routing
        .topics
        .insert(OrderCreated::TYPE_NAME.into(), "bench-orders".into());
    c
}

/// The raw baseline: the example's receptor logic, then one statement inserting the event and
/// its outbox row, on a connection of its pool held for the request (as the runtime's pool
/// does; a connection shared by concurrent requests would pipeline them).
struct Raw {
    pool: bb8::Pool<RawConnections>,
    position: AtomicI64,
    receptor: CreateOrderReceptor,
}

/// Connections of the raw baseline, each with the insert prepared once.
struct RawConnections {
    config: tokio_postgres::Config,
    sql: String,
}

impl bb8::ManageConnection for RawConnections {
    type Connection = (tokio_postgres::Client, tokio_postgres::Statement);
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<Self::Connection, tokio_postgres::Error> {
        let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let insert = client.prepare(&self.sql).await?;
        Ok((client, insert))
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), tokio_postgres::Error> {
        conn.0.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.0.is_closed()
    }
}

async fn raw_create(raw: web::Data<Raw>, cmd: web::Json<CreateOrder>) -> HttpResponse {
    let cmd = cmd.into_inner();
    let stream = cmd.stream_id();
    let decision = match raw.receptor.decide(cmd) {
        Ok(d) => d,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    let Some(Ok(payload)) = decision.events.first().map(|e| e.payload.clone()) else {
        return HttpResponse::InternalServerError().finish();
    };
    let id = Uuid::now_v7();
    let position = raw.position.fetch_add(1, Ordering::Relaxed) + 1;
    let now_us = whizbang::envelope::now_us();
    let connection = match raw.pool.get().await {
        Ok(c) => c,
        Err(e) => return HttpResponse::ServiceUnavailable().body(e.to_string()),
    };
    let (client, insert) = &*connection;
    let meta: Vec<u8> = Vec::new();
    match client
        .execute(
            insert,
            &[
                &position,
                &stream,
                &id,
                &OrderCreated::TYPE_NAME,
                &now_us,
                &meta,
                &payload,
            ],
        )
        .await
    {
        Ok(_) => HttpResponse::Created()
            .insert_header(("Location", format!("/orders/{}", decision.result.order_id)))
            .json(decision.result),
        Err(e) => HttpResponse::ServiceUnavailable().body(e.to_string()),
    }
}

fn raw_insert_sql(schema: &str) -> String {
    format!(
        "WITH e AS (
            INSERT INTO {schema}.wb_events (position, stream_id, version, message_id, correlation_id,
                   causation_id, message_type, timestamp_us, meta, payload)
            VALUES ($1, $2, 1, $3, $3, NULL, $4, $5, $6, $7))
         INSERT INTO {schema}.wb_outbox (message_id, message_kind, stream_id, partition, topic,
                correlation_id, causation_id, message_type, timestamp_us, meta, payload)
         VALUES ($3, 'event', $2, 0, 'bench-orders', $3, NULL, $4, $5, $6, $7)"
    )
}

/// One round: every client posts `requests` orders to `url`, one after another on one
/// keep-alive connection. Returns the latencies and the wall time.
async fn round(
    url: &str,
    clients: usize,
    requests: usize,
    tag: &str,
    expected: u16,
) -> BenchResult<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            let tag = tag.to_string();
            actix::spawn(async move {
                let client = awc::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .finish();
                let mut latencies = Vec::with_capacity(requests);
                for n in 0..requests {
                    let body = serde_json::json!({
                        "order_id": format!("{tag}-{c}-{n}"),
                        "customer_id": format!("customer-{c}"),
                        "lines": [{"sku": "WIDGET", "quantity": 2, "unit_price_cents": 2500}]
                    })
                    .to_string();
                    let t = Instant::now();
                    let mut response = client
                        .post(&url)
                        .insert_header(("Content-Type", "application/json"))
                        .send_body(body)
                        .await
                        .map_err(|e| format!("POST {url}: {e}"))?;
                    let answer = response
                        .body()
                        .await
                        .map_err(|e| format!("POST {url}: reading the answer: {e}"))?;
                    latencies.push(t.elapsed());
                    if response.status().as_u16() != expected {
                        return Err(format!(
                            "POST {url}: {} instead of {expected}: {}",
                            response.status(),
                            String::from_utf8_lossy(&answer)
                        ));
                    }
                }
                Ok::<_, String>(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(clients * requests);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed()))
}

fn per_s(latencies: &[Duration], wall: Duration) -> f64 {
    latencies.len() as f64 / wall.as_secs_f64()
}

/// The suite; drops its schemas whatever happened.
pub async fn http(args: HttpArgs) -> BenchResult<()> {
    let schema = format!("bench_http_{}", Uuid::now_v7().simple());
    let base = config(&args, &schema);
    let result = run(&args, &base).await;
    if let Ok(client) = crate::raw_client(base.store.database_url.expose_secret()).await {
        let _ = client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_raw CASCADE"
            ))
            .await;
    }
    result
}

async fn run(args: &HttpArgs, base: &Config) -> BenchResult<()> {
    // The runtime's service: the example's, on a free port.
    let summaries = OrderSummaries::for_config(base)
        .await
        .map_err(|e| format!("order_summary table: {e:#}"))?;
    let runtime = Runtime::builder(base.clone())
        .receptor::<CreateOrder, _>(CreateOrderReceptor::standard())
        .read_model::<OrderCreated, _>("order-summary", summaries.clone(), Consistency::Async)
        .start()
        .await?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let service_addr = listener.local_addr()?;
    let service = orders::api::server(
        listener,
        &runtime,
        summaries,
        args.workers,
        Duration::from_secs(10),
    )?;
    let service_handle = service.handle();
    let service_running = actix::spawn(service);

    // The raw baseline: its own copy of the tables (same migrations, same indexes).
    let mut raw_config = base.clone();
    raw_config.store.schema = format!("{}_raw", base.store.schema);
    PostgresStore::connect(&raw_config).await?;
    let pool = bb8::Pool::builder()
        .max_size(args.connections.max(1) as u32)
        .min_idle(Some(args.connections.max(1) as u32))
        .build(RawConnections {
            config: raw_config.store.database_url.expose_secret().parse()?,
            sql: raw_insert_sql(&raw_config.store.schema),
        })
        .await?;
    let raw = web::Data::new(Raw {
        pool,
        position: AtomicI64::new(0),
        receptor: CreateOrderReceptor::standard(),
    });
    let raw_listener = TcpListener::bind("127.0.0.1:0")?;
    let raw_addr: SocketAddr = raw_listener.local_addr()?;
    let raw_server = HttpServer::new(move || {
        App::new()
            .app_data(raw.clone())
            .route("/orders", web::post().to(raw_create))
    })
    .workers(args.workers.max(1))
    .disable_signals()
    .listen(raw_listener)?
    .run();
    let raw_handle = raw_server.handle();
    let raw_running = actix::spawn(raw_server);

    let service_url = format!("http://{service_addr}/orders");
    let raw_url = format!("http://{raw_addr}/orders");
    let measured = measure(args, &service_url, &raw_url).await;

    service_handle.stop(true).await;
    raw_handle.stop(true).await;
    let _ = service_running.await;
    let _ = raw_running.await;
    runtime.shutdown().await?;
    measured
}

async fn measure(args: &HttpArgs, service_url: &str, raw_url: &str) -> BenchResult<()> {
    let (clients, requests) = (args.clients.max(1), args.requests.max(1));
    // Warm-up: connections, prepared statements, partitions leased.
    round(service_url, clients, requests / 5 + 1, "warm", 201).await?;
    round(raw_url, clients, requests / 5 + 1, "warm", 201).await?;

    let (mut invoke, mut raw) = (Vec::new(), Vec::new());
    let (mut invoke_rates, mut raw_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    // CPU per request (this process: clients, servers, runtime; the Postgres server), which
    // drifts less than a rate on a shared machine. The server's includes anyone else's work.
    let mut cpu: [Vec<f64>; 4] = Default::default();
    let mut record_cpu = |side: usize, before: CpuTime, n: usize| {
        let (own, server) = CpuTime::now().us_per(before, n);
        if let (Some(own), Some(server)) = (own, server) {
            cpu[side * 2].push(own);
            cpu[side * 2 + 1].push(server);
        }
    };
    for r in 0..args.rounds.max(1) {
        let before = CpuTime::now();
        let (l, wall) = round(service_url, clients, requests, &format!("i{r}"), 201).await?;
        record_cpu(0, before, l.len());
        let invoke_rate = per_s(&l, wall);
        invoke.extend(l);
        let before = CpuTime::now();
        let (l, wall) = round(raw_url, clients, requests, &format!("r{r}"), 201).await?;
        record_cpu(1, before, l.len());
        let raw_rate = per_s(&l, wall);
        raw.extend(l);
        invoke_rates.push(invoke_rate);
        raw_rates.push(raw_rate);
        ratios.push(invoke_rate / raw_rate);
    }
    let (l, wall) = round(
        &format!("{service_url}/async"),
        clients,
        requests,
        "async",
        202,
    )
    .await?;
    let async_rate = per_s(&l, wall);

    let invoke = Samples::new(invoke);
    let raw = Samples::new(raw);
    let invoke_p99 = invoke.percentile(99.0) / 1000.0;
    let raw_p99 = raw.percentile(99.0) / 1000.0;
    figure("http_clients", clients);
    figure("http_rounds", args.rounds.max(1));
    figure(
        "http_invoke_per_s",
        format!("{:.0}", Samples::of(invoke_rates).percentile(50.0)),
    );
    figure(
        "http_raw_per_s",
        format!("{:.0}", Samples::of(raw_rates).percentile(50.0)),
    );
    let ratios = Samples::of(ratios);
    figure(
        "http_invoke_ratio_vs_raw_rounds",
        ratios
            .0
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    figure(
        "http_invoke_ratio_vs_raw",
        format!("{:.2}", ratios.percentile(50.0)),
    );
    figure(
        "http_invoke_p50_ms",
        format!("{:.2}", invoke.percentile(50.0) / 1000.0),
    );
    figure("http_invoke_p99_ms", format!("{invoke_p99:.2}"));
    figure(
        "http_raw_p50_ms",
        format!("{:.2}", raw.percentile(50.0) / 1000.0),
    );
    figure("http_raw_p99_ms", format!("{raw_p99:.2}"));
    figure(
        "http_invoke_p99_ratio_vs_raw",
        format!("{:.2}", invoke_p99 / raw_p99),
    );
    figure("http_async_per_s", format!("{async_rate:.0}"));
    for (name, samples) in [
        "http_invoke_process_cpu_us_per_request",
        "http_invoke_server_cpu_us_per_request",
        "http_raw_process_cpu_us_per_request",
        "http_raw_server_cpu_us_per_request",
    ]
    .into_iter()
    .zip(cpu)
    {
        if !samples.is_empty() {
            figure(
                name,
                format!("{:.0}", Samples::of(samples).percentile(50.0)),
            );
        }
    }
    Ok(())
}
