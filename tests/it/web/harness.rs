//! The order API of `examples/orders` served on a bound port (127.0.0.1:0) and a real HTTP
//! client (awc) for the cases of `web::*`: the order service, with an in-process inventory
//! service subscribed to its events, both on one recording transport so a case can wait with
//! `whizbang::testing::Tracker` until a request settled.

use crate::orders::api;
use crate::orders::{CreateOrder, CreateOrderReceptor, Inventory, OrderCreated, OrderSummaries};
use crate::support::{config, publishing, subscribed};
use actix_web::dev::ServerHandle;
use awc::http::header::HeaderMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use whizbang::testing::{RecordingTransport, Tracker};
use whizbang::{Config, Consistency, Decision, Receptor, ReceptorContext, ReceptorError, Runtime};

/// The topic the order service publishes `OrderCreated` to.
pub const TOPIC: &str = "web-orders";

/// The order service's configuration: publishes `OrderCreated`.
pub fn orders_config() -> Config {
    publishing(config("order-service"), "OrderCreated", TOPIC)
}

/// A valid order body.
pub fn order_json(order_id: &str) -> String {
    serde_json::json!({
        "order_id": order_id,
        "customer_id": "alice",
        "lines": [{"sku": "WIDGET", "quantity": 2, "unit_price_cents": 2500}]
    })
    .to_string()
}

/// The example's receptor, after a pause: for requests in flight, deadlines and overload.
pub struct Slow {
    pub delay: Duration,
    pub entered: Arc<AtomicUsize>,
}

impl Receptor<CreateOrder> for Slow {
    type Result = OrderCreated;

    async fn handle(
        &self,
        cmd: CreateOrder,
        _ctx: ReceptorContext,
    ) -> Result<Decision<OrderCreated>, ReceptorError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        CreateOrderReceptor::standard().decide(cmd)
    }
}

/// An HTTP answer: status, headers and the body as JSON (`Null` when empty).
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A member of the JSON body as text.
    pub fn str(&self, member: &str) -> Option<&str> {
        self.body.get(member).and_then(|v| v.as_str())
    }
}

/// A real HTTP client with a generous timeout (the machine is shared).
pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(60))
        .finish()
}

/// Sends a request and reads its answer.
pub async fn call(request: awc::ClientRequest, body: Option<String>) -> anyhow::Result<Reply> {
    let sent = match body {
        Some(b) => request.send_body(b).await,
        None => request.send().await,
    };
    let mut response = sent.map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    let bytes = response
        .body()
        .limit(4 << 20)
        .await
        .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?;
    let body = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("body not JSON ({e}): {bytes:?}"))?
    };
    Ok(Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body,
    })
}

/// The service under test.
pub struct Api {
    pub addr: SocketAddr,
    pub client: awc::Client,
    pub orders: Runtime,
    pub inventory: Runtime,
    pub reserved: Inventory,
    pub summaries: OrderSummaries,
    pub transport: Arc<RecordingTransport>,
    server: ServerHandle,
    running: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Api {
    /// The order service on `config` with `receptor`, its summaries as the config's store calls
    /// for, the inventory service in process on the in-memory store, the server on a free port.
    pub async fn start<R>(config: Config, receptor: R) -> anyhow::Result<Api>
    where
        R: Receptor<CreateOrder, Result = OrderCreated>,
    {
        let transport = RecordingTransport::memory();
        let summaries = OrderSummaries::for_config(&config).await?;
        let orders = Runtime::builder(config)
            .transport(transport.clone())
            .receptor::<CreateOrder, _>(receptor)
            .read_model::<OrderCreated, _>("order-summary", summaries.clone(), Consistency::Async)
            .start()
            .await?;
        let reserved = Inventory::default();
        let inventory = Runtime::builder(subscribed(
            crate::support::config("inventory-service"),
            TOPIC,
            "inventory",
        ))
        .transport(transport.clone())
        .perspective::<OrderCreated, _>("inventory", reserved.clone())
        .start()
        .await?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let server = api::server(
            listener,
            &orders,
            summaries.clone(),
            2,
            Duration::from_secs(30),
        )?;
        let handle = server.handle();
        let running = actix::spawn(server);
        Ok(Api {
            addr,
            client: client(),
            orders,
            inventory,
            reserved,
            summaries,
            transport,
            server: handle,
            running,
        })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &str) -> anyhow::Result<Reply> {
        call(
            self.client
                .post(self.url(path))
                .insert_header(("Content-Type", "application/json")),
            Some(body.to_string()),
        )
        .await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        call(self.client.get(self.url(path)), None).await
    }

    /// How many events the order service stored for order `id`.
    pub async fn events_of(&self, id: &str) -> anyhow::Result<usize> {
        let stream = format!("order-{id}");
        Ok(self.orders.store().read_stream(&stream, 1).await?.len())
    }

    /// A tracker over both services, with a deadline.
    pub fn tracker(&self) -> Tracker<'_> {
        Tracker::new(&self.transport)
            .service(&self.orders)
            .service(&self.inventory)
            .deadline(crate::support::DEADLINE)
    }

    /// Stops the server (after the requests in flight), then both runtimes.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.server.stop(true).await;
        self.running.await??;
        self.orders.shutdown().await?;
        self.inventory.shutdown().await?;
        Ok(())
    }
}
