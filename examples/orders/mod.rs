//! The order domain shared by the examples (`order_service`, `order_api`) and the HTTP tests
//! (`tests/it/web`): the `CreateOrder` command, its receptor, the `OrderCreated` event and its
//! perspectives (the order-summary read model, exactly once, in memory or in a Postgres table,
//! and the inventory reservations). `api` is the HTTP service over it.
//!
//! It must not start anything by itself: each example wires the runtime and decides what runs.

pub mod api;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use whizbang::{
    Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError, ReadModel,
    ReadModelTx, Receptor, ReceptorContext, ReceptorError,
};

// ---- Messages ---------------------------------------------------------------------------

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

/// The command: place an order (the JSON body of `POST /orders`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateOrder {
    pub order_id: String,
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
}

impl Message for CreateOrder {
    const TYPE_NAME: &'static str = "CreateOrder";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order_id)
    }
}
impl Command for CreateOrder {}

/// The event: the order was accepted (the JSON body of `201 Created`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: String,
    pub customer_id: String,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
}

impl Message for OrderCreated {
    const TYPE_NAME: &'static str = "OrderCreated";
    fn stream_id(&self) -> String {
        format!("order-{}", self.order_id)
    }
}
impl Event for OrderCreated {}

// ---- Receptor ---------------------------------------------------------------------------

/// Validates an order against the catalog and a credit limit, then decides `OrderCreated`.
/// Validation messages start with the field at fault (`lines[0].quantity: …`).
pub struct CreateOrderReceptor {
    pub catalog: HashMap<&'static str, i64>,
    pub credit_limit_cents: i64,
}

impl CreateOrderReceptor {
    /// The examples' catalog (WIDGET, GADGET, GIZMO) and a credit limit of $1,000.00.
    pub fn standard() -> CreateOrderReceptor {
        CreateOrderReceptor {
            catalog: HashMap::from([("WIDGET", 2_500), ("GADGET", 9_900), ("GIZMO", 450)]),
            credit_limit_cents: 100_000,
        }
    }

    /// Decides without waiting on anything (the receptor's whole logic).
    pub fn decide(&self, cmd: CreateOrder) -> Result<Decision<OrderCreated>, ReceptorError> {
        let id_ok = !cmd.order_id.is_empty()
            && cmd.order_id.len() <= 64
            && cmd
                .order_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(ReceptorError::Validation(
                "order_id: 1 to 64 letters, digits, `-` or `_`".into(),
            ));
        }
        if cmd.customer_id.trim().is_empty() {
            return Err(ReceptorError::Validation(
                "customer_id: must not be empty".into(),
            ));
        }
        if cmd.lines.is_empty() {
            return Err(ReceptorError::Validation(
                "lines: an order needs at least one line".into(),
            ));
        }
        if let Some((i, bad)) = cmd.lines.iter().enumerate().find(|(_, l)| l.quantity <= 0) {
            return Err(ReceptorError::Validation(format!(
                "lines[{i}].quantity: quantity of {} must be positive, got {}",
                bad.sku, bad.quantity
            )));
        }
        if let Some(unknown) = cmd
            .lines
            .iter()
            .find(|l| !self.catalog.contains_key(l.sku.as_str()))
        {
            return Err(ReceptorError::NotFound(format!("product {}", unknown.sku)));
        }
        let total_cents: i64 = cmd
            .lines
            .iter()
            .map(|l| i64::from(l.quantity).saturating_mul(l.unit_price_cents))
            .fold(0i64, i64::saturating_add);
        if total_cents > self.credit_limit_cents {
            return Err(ReceptorError::Conflict(format!(
                "total {} exceeds the credit limit {} of customer {}",
                cents(total_cents),
                cents(self.credit_limit_cents),
                cmd.customer_id
            )));
        }
        Ok(Decision::event(OrderCreated {
            order_id: cmd.order_id,
            customer_id: cmd.customer_id,
            lines: cmd.lines,
            total_cents,
        }))
    }
}

impl Receptor<CreateOrder> for CreateOrderReceptor {
    type Result = OrderCreated;

    async fn handle(
        &self,
        cmd: CreateOrder,
        _ctx: ReceptorContext,
    ) -> Result<Decision<OrderCreated>, ReceptorError> {
        self.decide(cmd)
    }
}

// ---- Perspectives -----------------------------------------------------------------------

/// The order-summary read model (the body of `GET /orders/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSummary {
    pub order_id: String,
    pub customer_id: String,
    pub lines: i32,
    pub total_cents: i64,
}

/// Connections for reading the summaries (`GET /orders/{id}`); the read model writes through
/// the runtime's transaction, not through these.
type PgPool = bb8::Pool<bb8_postgres::PostgresConnectionManager<DatabaseTls>>;
use tokio_postgres::types::Type;
use whizbang::store::postgres::tls::DatabaseTls;

/// Where the order summaries live: a map for the in-memory store, a table in the service's
/// schema (`<store.schema>.order_summary`) for the Postgres store.
#[derive(Clone)]
pub enum OrderSummaries {
    /// For the life of the process.
    Memory(Arc<Mutex<BTreeMap<String, OrderSummary>>>),
    /// A real table, written by the read model in the runtime's transaction; `pool` reads it.
    Postgres { pool: PgPool, table: String },
}

impl OrderSummaries {
    /// In memory.
    pub fn memory() -> OrderSummaries {
        OrderSummaries::Memory(Arc::default())
    }

    /// What the configuration's store calls for: the table (created if missing) beside the
    /// runtime's own on Postgres, a map otherwise.
    pub async fn for_config(config: &Config) -> anyhow::Result<OrderSummaries> {
        if config.store.backend != whizbang::config::StoreBackend::Postgres {
            return Ok(OrderSummaries::memory());
        }
        let (mut pg, tls) = whizbang::store::postgres::tls::database_config(config)
            .map_err(|e| anyhow::anyhow!(e))?;
        whizbang::store::postgres::connect::with_deadlines(&mut pg, config);
        let manager = bb8_postgres::PostgresConnectionManager::new(pg, tls);
        let schema = &config.store.schema;
        let table = format!("{schema}.order_summary");
        // Opened as reads need them, up to as many as the runtime's own pool.
        let pool = bb8::Pool::builder()
            .max_size(config.store.pool_size.max(1))
            .build(manager)
            .await?;
        pool.get()
            .await?
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {table} (
                     order_id    text PRIMARY KEY,
                     customer_id text NOT NULL,
                     lines       integer NOT NULL,
                     total_cents bigint NOT NULL,
                     updated_at  timestamptz NOT NULL DEFAULT now()
                 )"
            ))
            .await?;
        Ok(OrderSummaries::Postgres { pool, table })
    }

    /// The summary of `order_id`, if the perspective has applied it.
    pub async fn get(&self, order_id: &str) -> anyhow::Result<Option<OrderSummary>> {
        match self {
            OrderSummaries::Memory(map) => Ok(map.lock().unwrap().get(order_id).cloned()),
            OrderSummaries::Postgres { pool, table } => {
                let row = pool
                    .get()
                    .await?
                    .query_opt(
                        &format!(
                            "SELECT order_id, customer_id, lines, total_cents FROM {table} \
                             WHERE order_id = $1"
                        ),
                        &[&order_id],
                    )
                    .await?;
                Ok(row.map(|r| OrderSummary {
                    order_id: r.get(0),
                    customer_id: r.get(1),
                    lines: r.get(2),
                    total_cents: r.get(3),
                }))
            }
        }
    }

    /// How many orders it holds.
    pub async fn count(&self) -> anyhow::Result<u64> {
        match self {
            OrderSummaries::Memory(map) => Ok(map.lock().unwrap().len() as u64),
            OrderSummaries::Postgres { pool, table } => {
                let n: i64 = pool
                    .get()
                    .await?
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await?
                    .get(0);
                Ok(n as u64)
            }
        }
    }
}

/// Exactly once: on Postgres the upsert runs in the transaction in which the runtime records
/// the event as applied to `order-summary` (`whizbang::read_model`); in memory the insert is
/// staged and runs with that record.
impl ReadModel<OrderCreated> for OrderSummaries {
    async fn apply(
        &self,
        e: OrderCreated,
        _meta: EventMeta,
        tx: &mut ReadModelTx<'_>,
    ) -> Result<(), PerspectiveError> {
        let summary = OrderSummary {
            order_id: e.order_id,
            customer_id: e.customer_id,
            lines: i32::try_from(e.lines.len()).unwrap_or(i32::MAX),
            total_cents: e.total_cents,
        };
        match self {
            OrderSummaries::Memory(map) => {
                let map = map.clone();
                tx.on_commit(move || {
                    map.lock()
                        .unwrap()
                        .insert(summary.order_id.clone(), summary);
                });
                Ok(())
            }
            OrderSummaries::Postgres { table, .. } => {
                let pg = tx.postgres().ok_or_else(|| {
                    PerspectiveError(
                        "order_summary is a Postgres table: the store must be Postgres".into(),
                    )
                })?;
                // An upsert: a replay from scratch applies every event again. Prepared once
                // per connection of the runtime's pool: one round trip per event, no parse or
                // plan on the server.
                let upsert = tx
                    .prepared(
                        &format!(
                            "INSERT INTO {table} (order_id, customer_id, lines, total_cents) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT (order_id) DO UPDATE SET \
                             customer_id = EXCLUDED.customer_id, lines = EXCLUDED.lines, \
                             total_cents = EXCLUDED.total_cents, updated_at = now()"
                        ),
                        &[Type::TEXT, Type::TEXT, Type::INT4, Type::INT8],
                    )
                    .await
                    .transpose()
                    .map_err(|e| PerspectiveError(format!("order_summary: {e}")))?
                    .ok_or_else(|| {
                        PerspectiveError("order_summary: no Postgres transaction".into())
                    })?;
                pg.execute(
                    &upsert,
                    &[
                        &summary.order_id,
                        &summary.customer_id,
                        &summary.lines,
                        &summary.total_cents,
                    ],
                )
                .await
                .map_err(|e| PerspectiveError(format!("order_summary: {e}")))?;
                Ok(())
            }
        }
    }
}

/// The inventory service's read model: quantities reserved per SKU.
#[derive(Clone, Default)]
pub struct Inventory(pub Arc<Mutex<BTreeMap<String, i64>>>);

impl Perspective<OrderCreated> for Inventory {
    async fn apply(&self, e: OrderCreated, _meta: EventMeta) -> Result<(), PerspectiveError> {
        let mut reserved = self.0.lock().unwrap();
        for line in e.lines {
            *reserved.entry(line.sku).or_default() += i64::from(line.quantity);
        }
        Ok(())
    }
}

/// `$12.34`.
pub fn cents(c: i64) -> String {
    format!("${}.{:02}", c / 100, c % 100)
}

/// An order line.
pub fn line(sku: &str, quantity: i32, unit_price_cents: i64) -> OrderLine {
    OrderLine {
        sku: sku.into(),
        quantity,
        unit_price_cents,
    }
}
