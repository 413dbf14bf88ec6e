//! What every HTTP service on the runtime needs, for actix-web (cargo feature `web`).
//!
//! Owns the HTTP edge of the library: [`Problem`] (RFC 9457 `application/problem+json`, with
//! every [`DispatchError`] mapped to its status, `Retry-After` on 503, and server failures
//! logged rather than answered), the extractors [`Json`] (415, 413 over
//! `transport.max_message_bytes`, 400 naming the field), [`IdempotencyKey`] and
//! [`RequestScope`] (the request's [`crate::Scope`], written by the [`complete_scopes`]
//! middleware when the handler succeeded), the status endpoint handler [`status`], and
//! [`RuntimeHandle`], the cloneable part of a
//! [`crate::Runtime`] that handlers hold. It must not hold business logic, store anything, or own
//! the server's life: the application builds its `HttpServer`, and stops the runtime after it.
//!
//! `docs/http.md` lists the statuses and what a client should do with each.
//!
//! ## A service in a few lines
//!
//! ```no_run
//! use actix_web::{App, HttpResponse, HttpServer, web};
//! use whizbang::web::{BodyLimit, IdempotencyKey, Json, Problem, RuntimeHandle};
//! use whizbang::{Command, Config, DispatchOptions, Message, Runtime};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Rename { id: String, name: String }
//! impl Message for Rename {
//!     const TYPE_NAME: &'static str = "Rename";
//!     fn stream_id(&self) -> String { format!("thing-{}", self.id) }
//! }
//! impl Command for Rename {}
//!
//! async fn rename(
//!     handle: web::Data<RuntimeHandle>,
//!     key: IdempotencyKey,
//!     Json(cmd): Json<Rename>,
//! ) -> Result<HttpResponse, Problem> {
//!     let options = DispatchOptions { idempotency_key: key.into_inner(), ..Default::default() };
//!     let receipt = handle.send_with(cmd, options).await?;
//!     Ok(HttpResponse::Accepted().json(whizbang::web::ReceiptJson::from(&receipt)))
//! }
//!
//! # async fn run(runtime: Runtime) -> std::io::Result<()> {
//! let handle = RuntimeHandle::new(&runtime);
//! let limit = BodyLimit::from_config(runtime.config());
//! HttpServer::new(move || {
//!     App::new()
//!         .app_data(web::Data::new(handle.clone()))
//!         .app_data(limit)
//!         .route("/things", web::post().to(rename))
//!         .route("/things/status/{correlation_id}", web::get().to(whizbang::web::status))
//! })
//! .bind("127.0.0.1:8080")?
//! .run()
//! .await?;
//! runtime.shutdown().await.ok();
//! # Ok(())
//! # }
//! ```

mod extract;
mod problem;
mod scope;
mod status;

pub use extract::{BodyLimit, IdempotencyKey, Json, parse_json};
pub use problem::{PROBLEM_JSON, Problem};
pub use scope::{RequestScope, complete_scopes};
pub use status::{
    DeadLetterReport, Progress, ReceiptEvent, ReceiptJson, StatusReport, StoredEvent, status,
};

use crate::dispatcher::{
    DeliveryReceipt, DispatchOptions, Dispatcher, LocalInvoke, SendCommand, Status,
};
use crate::error::DispatchError;
use crate::message::Command;
use crate::runtime::Runtime;
use crate::store::Store;
use actix::Addr;
use std::sync::Arc;
use uuid::Uuid;

/// The part of a running [`Runtime`] that request handlers need: its dispatcher and store.
/// Cheap to clone (one per HTTP worker); the application keeps the `Runtime` itself to shut it
/// down after the server stopped.
#[derive(Clone)]
pub struct RuntimeHandle {
    dispatcher: Addr<Dispatcher>,
    store: Arc<dyn Store>,
}

impl RuntimeHandle {
    /// A handle on `runtime`.
    pub fn new(runtime: &Runtime) -> RuntimeHandle {
        RuntimeHandle {
            dispatcher: runtime.dispatcher(),
            store: runtime.store().clone(),
        }
    }

    /// The dispatcher actor.
    pub fn dispatcher(&self) -> &Addr<Dispatcher> {
        &self.dispatcher
    }

    /// The store the runtime writes to (for read models kept in it, and lookups).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// `LocalInvoke` with `options`: the typed result once the events are stored and the
    /// perspectives ran.
    pub async fn local_invoke_with<C: Command, R: Send + 'static>(
        &self,
        command: C,
        options: DispatchOptions,
    ) -> Result<R, DispatchError> {
        self.dispatcher
            .send(LocalInvoke::<C, R>::new(command).with_options(options))
            .await?
    }

    /// `Send` with `options`: a receipt once the command's effects are committed.
    pub async fn send_with<C: Command>(
        &self,
        command: C,
        options: DispatchOptions,
    ) -> Result<DeliveryReceipt, DispatchError> {
        self.dispatcher
            .send(SendCommand::new(command).with_options(options))
            .await?
    }

    /// What the request `correlation_id` caused, as the status endpoint reports it; `None` when
    /// nothing is known of it.
    pub async fn status_report(
        &self,
        correlation_id: Uuid,
    ) -> Result<Option<StatusReport>, DispatchError> {
        let status = self.dispatcher.send(Status(correlation_id)).await??;
        let dead_letters = if status.dead_lettered > 0 {
            self.store.dead_letters().await?
        } else {
            Vec::new()
        };
        Ok(StatusReport::new(correlation_id, status, &dead_letters))
    }
}

impl From<&Runtime> for RuntimeHandle {
    fn from(runtime: &Runtime) -> RuntimeHandle {
        RuntimeHandle::new(runtime)
    }
}
