//! The integration tests, as one test binary (`cargo test --test it`): every case runs against
//! the real servers (PostgreSQL and an AMQP 1.0 broker, see `support`), each in a schema and on
//! topics of its own, in the threads of one process.
//!
//! This file only maps the modules; helpers live in `support` (one definition each), cases in
//! the modules below. Nothing here may skip a case when a server is missing: it fails.

mod support;

/// The order domain and HTTP service of the examples (`examples/orders`), for `web::*`.
#[allow(dead_code)]
#[path = "../../examples/orders/mod.rs"]
mod orders;

mod actix_facts;
mod config_files;
mod config_reference;
mod store_conformance;

/// The AMQP 1.0 transport against the real broker (RabbitMQ) and a fake Service Bus.
mod amqp {
    mod cbs;
    mod competing;
    mod conformance;
    mod end_to_end;
    mod inbox_failure;
    mod malformed;
    mod size_limit;
    mod tls;
    mod transport;
}

/// Metrics, health probes and the dashboard (`[telemetry]`), over real HTTP.
mod telemetry {
    mod dashboard;
    mod health;
    mod metrics;
}

/// The contract (`src/lib.rs`), one file per concern, mostly on the in-memory transport.
mod contract {
    mod admission;
    mod backpressure;
    mod bad_input;
    mod batches_in_flight;
    mod correlation;
    mod deferred_completions;
    mod failures;
    mod handler_timeout;
    mod heartbeats;
    mod idempotency;
    mod inbox_dedup;
    mod lost_answers;
    mod malformed;
    mod ordering;
    mod read_models;
    mod read_your_writes;
    mod registry;
    mod replay;
    mod scopes;
    mod stop_signal;
    mod supervision;
    mod version_conflict;
}

/// The Postgres store on its own: migrations, the liveness lock, the whole runtime on it, TLS to
/// the server.
mod postgres {
    mod deadlines;
    mod idempotency;
    mod inbox_order;
    mod liveness;
    mod lost_answer;
    mod migrations;
    mod read_models;
    mod runtime;
    mod secrets;
    mod tls;
}

/// The HTTP edge (`whizbang::web`) through the order_api example over real HTTP, and
/// `whizbang::testing`.
mod web {
    mod flows;
    mod harness;
    mod idempotency;
    mod limits;
    mod postgres;
    mod scopes;
    mod shutdown;
    mod tracking;
}
