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
//! ## Map of the modules
//!
//! | module | owns |
//! |---|---|
//! | [`message`] | the `Command` / `Event` traits and the payload codec |
//! | [`envelope`] | message id, correlation, causation, hops, metadata |
//! | [`handler`] | the `Receptor` / `Perspective` traits and the actors that run them |
//! | [`registry`] | message type → receptor, perspectives, topic |
//! | [`replay`] | rebuilding or resuming a perspective from the event store |
//! | [`dispatcher`] | the public API: `SendCommand`, `LocalInvoke`, `PublishEvent` |
//! | [`routing`] | what a decision becomes: the unit of work, stream → partition hash |
//! | [`partition`] | per-partition actors that run jobs strictly in order |
//! | [`coordinator`] | flush strategies, work batches, claims, heartbeats, hand-off |
//! | [`publisher`] | outbox rows → transport, pipelined, in order per stream |
//! | [`consumer`] | transport deliveries → inbox, settled after commit |
//! | [`store`] | the work-coordinator contract; [`store::memory`], [`store::postgres`] (with [`store::postgres::migrate`], [`store::postgres::tls`]) |
//! | [`transport`] | the transport contract; [`transport::memory`], [`transport::amqp`] |
//! | [`config`] | the TOML configuration |
//! | [`runtime`] | starting and stopping one service instance |
//! | [`error`] | the public error types |

pub mod config;
pub mod consumer;
pub mod coordinator;
pub mod dispatcher;
pub mod envelope;
pub mod error;
pub mod handler;
pub mod message;
pub mod partition;
pub mod publisher;
pub mod registry;
pub mod replay;
pub mod routing;
pub mod runtime;
pub mod store;
pub mod transport;

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
pub use runtime::{Runtime, RuntimeBuilder};
pub use store::ExpectedVersion;

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
