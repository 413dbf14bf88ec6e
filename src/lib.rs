//! # whizbang
//!
//! A runtime that carries application messages through their whole life on supervised actix
//! actors: command → receptor → events → event store + outbox (one atomic unit) → perspectives
//! (read models) → transport → inbox with dedup → perspectives on the receiving side, in order
//! per stream.
//!
//! ## The contract
//!
//! 1. A command that returned success has its events and outbox rows durably committed,
//!    atomically (durably on the Postgres store; the in-memory store keeps them for the life of
//!    the process).
//! 2. Every committed outbox row reaches the transport at least once.
//! 3. A message delivered twice to the inbox takes effect once (dedup by message id).
//! 4. Messages of one stream are published and applied in the order they were stored; different
//!    streams run in parallel.
//! 5. A delivery is settled (accepted) only after its inbox row is committed.
//! 6. A message that keeps failing is dead-lettered after `store.max_attempts` with its error; its
//!    stream waits behind it until an operator requeues or skips it; nothing else is blocked.
//! 7. `local_invoke` returns only after the perspectives for the returned events have run.
//! 8. Bad input (malformed delivery, unknown type, invalid config) gets a clear, typed error and
//!    loses nothing else.
//!
//! ## A service in a few lines
//!
//! A command, the receptor that decides what it does, the event it emits and a perspective (read
//! model) that applies it; the runtime runs on the embedded in-memory store and transport unless
//! the configuration names Postgres and AMQP.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::{Arc, Mutex};
//! use whizbang::{
//!     Command, Config, Decision, Event, EventMeta, Message, Perspective, PerspectiveError,
//!     Receptor, ReceptorContext, ReceptorError, Runtime,
//! };
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OpenAccount { id: String, owner: String }
//! impl Message for OpenAccount {
//!     const TYPE_NAME: &'static str = "OpenAccount"; // stored and sent on the wire
//!     fn stream_id(&self) -> String { format!("account-{}", self.id) }
//! }
//! impl Command for OpenAccount {}
//!
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! struct AccountOpened { id: String, owner: String }
//! impl Message for AccountOpened {
//!     const TYPE_NAME: &'static str = "AccountOpened";
//!     fn stream_id(&self) -> String { format!("account-{}", self.id) }
//! }
//! impl Event for AccountOpened {}
//!
//! struct Accounts;
//! impl Receptor<OpenAccount> for Accounts {
//!     type Result = AccountOpened;
//!     async fn handle(&self, cmd: OpenAccount, _ctx: ReceptorContext)
//!         -> Result<Decision<AccountOpened>, ReceptorError> {
//!         if cmd.owner.is_empty() {
//!             return Err(ReceptorError::Validation("an account needs an owner".into()));
//!         }
//!         Ok(Decision::event(AccountOpened { id: cmd.id, owner: cmd.owner }))
//!     }
//! }
//!
//! #[derive(Clone, Default)]
//! struct Owners(Arc<Mutex<BTreeMap<String, String>>>);
//! impl Perspective<AccountOpened> for Owners {
//!     async fn apply(&self, e: AccountOpened, _meta: EventMeta) -> Result<(), PerspectiveError> {
//!         self.0.lock().unwrap().insert(e.id, e.owner);
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! actix::System::new().block_on(async {
//!     let owners = Owners::default();
//!     let runtime = Runtime::builder(Config::default())
//!         .receptor::<OpenAccount, _>(Accounts)
//!         .perspective::<AccountOpened, _>("owners", owners.clone())
//!         .start()
//!         .await?;
//!
//!     // The typed result, once the event is stored and the perspective has applied it.
//!     let opened: AccountOpened = runtime
//!         .local_invoke(OpenAccount { id: "7".into(), owner: "Ada".into() })
//!         .await?;
//!     assert_eq!(opened.owner, "Ada");
//!     assert_eq!(owners.0.lock().unwrap().get("7").map(String::as_str), Some("Ada"));
//!
//!     // A refusal is typed and writes nothing.
//!     let refused = runtime
//!         .local_invoke::<_, AccountOpened>(OpenAccount { id: "8".into(), owner: "".into() })
//!         .await
//!         .unwrap_err();
//!     assert_eq!(refused.http_status(), 400);
//!
//!     runtime.shutdown().await?;
//!     Ok(())
//! })
//! # }
//! ```
//!
//! ## Map of the modules
//!
//! | module | owns |
//! |---|---|
//! | [`message`] | the `Command` / `Event` traits and the payload codec |
//! | [`envelope`] | message id, correlation, causation, hops, metadata |
//! | [`handler`] | the `Receptor` / `Perspective` traits and the guarded handles that run them |
//! | [`read_model`] | exactly-once read models: [`ReadModel`] writes through the store transaction that records its progress, after the command or inline in its transaction |
//! | [`registry`] | message type → receptor, perspectives, topic |
//! | [`replay`] | rebuilding or resuming a perspective from the event store, with progress reports |
//! | `operator` (feature `operator`) | commands a service embeds in its binary: `replay` with a progress bar |
//! | [`dispatcher`] | the public API: `SendCommand`, `LocalInvoke`, `PublishEvent` |
//! | [`routing`] | what a decision becomes: the unit of work, stream → partition hash |
//! | `idempotency` (internal) | idempotent commands: recorded first outcomes, request hashes, one run per key |
//! | `partition` (internal) | per-partition actors that run jobs strictly in order |
//! | `coordinator` (internal) | flush strategies, work batches, claims, heartbeats, hand-off |
//! | `publisher` (internal) | outbox rows → transport, pipelined, in order per stream |
//! | `consumer` (internal) | transport deliveries → inbox, settled after commit |
//! | [`store`] | the work-coordinator contract; [`store::memory`], [`store::postgres`] (with [`store::postgres::migrate`], [`store::postgres::tls`], [`store::postgres::inspect`]: the operator's read-only views) |
//! | [`transport`] | the transport contract; [`transport::memory`], [`transport::amqp`] |
//! | [`config`] | the TOML configuration |
//! | [`runtime`] | starting and stopping one service instance |
//! | [`supervision`] | restarting actors that stop, the restart budget, [`Health`] |
//! | [`scope`] | request scopes: several commands written in one transaction, all or nothing |
//! | [`signal`] | SIGTERM and Ctrl-C: the process being asked to stop |
//! | [`telemetry`] | a span per step of a message's life, W3C trace context in the envelope and on the wire; OpenTelemetry export (features `otel`, `otlp`) |
//! | [`error`] | the public error types |
//! | `web` (feature `web`) | the HTTP edge for actix-web: problem+json errors, JSON and `Idempotency-Key` extractors, the status endpoint |
//! | [`telemetry`] | the metrics the runtime exports ([`telemetry::METRICS`]) and, with `telemetry.metrics_listen`, the listener serving `/metrics`, `/health/live`, `/health/ready` |
//! | [`testing`] | for an application's tests: dispatch, wait until everything it caused has settled, inspect what was published |

pub(crate) mod admission;
pub mod config;
pub(crate) mod consumer;
pub(crate) mod coordinator;
pub mod dispatcher;
pub mod envelope;
pub mod error;
pub mod handler;
pub(crate) mod idempotency;
pub mod message;
#[cfg(feature = "operator")]
pub mod operator;
pub(crate) mod partition;
pub(crate) mod protocol;
pub(crate) mod publisher;
pub mod read_model;
pub mod registry;
pub mod replay;
mod retry;
pub mod routing;
pub mod runtime;
pub mod scope;
pub mod signal;
pub mod store;
pub mod supervision;
pub mod telemetry;
pub mod testing;
pub mod transport;
#[cfg(feature = "web")]
pub mod web;
mod workers;

pub use config::Config;
pub use dispatcher::{
    DeliveryReceipt, DispatchOptions, Dispatcher, LocalInvoke, PublishEvent, ReceiptStatus,
    SendCommand, Status,
};
pub use envelope::Envelope;
pub use error::{DispatchError, StartError};
pub use handler::{
    Decision, EventMeta, Perspective, PerspectiveError, Receptor, ReceptorContext, ReceptorError,
};
pub use message::{Command, Event, Message};
pub use read_model::{Consistency, ReadModel, ReadModelTx};
pub use runtime::{Runtime, RuntimeBuilder};
pub use scope::{Scope, ScopeReceipt};
pub use signal::StopSignal;
pub use store::ExpectedVersion;
pub use supervision::{ActorKind, Health};

#[doc(hidden)]
pub use mimalloc as __mimalloc;

/// Makes mimalloc the allocator of the process; write `whizbang::use_mimalloc!();` once, at the
/// top level of the binary's `main.rs`. A library cannot choose the allocator, and the runtime
/// allocates for every message it carries (envelopes, hops, actor messages, batch arrays): with
/// glibc's malloc, allocation was about half of the runtime's CPU, and mimalloc raised its
/// throughput on the in-memory store from ~31,000 to 50,000-62,000 events/s on a 2-core VM
/// (README, "Allocator"). Every binary and example of this crate uses it.
#[macro_export]
macro_rules! use_mimalloc {
    () => {
        #[global_allocator]
        static WHIZBANG_GLOBAL_ALLOCATOR: $crate::__mimalloc::MiMalloc =
            $crate::__mimalloc::MiMalloc;
    };
}
