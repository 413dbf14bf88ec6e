//! The request scope as an actix-web extractor: [`RequestScope`], and the middleware
//! [`complete_scopes`] that writes it when the handler has succeeded.
//!
//! Owns when a request's scope is written, and nothing else: the scope itself (one unit of
//! work, all or nothing, keyed or not) is [`crate::Scope`]'s. The specification's scoped
//! strategy "flushes on disposal"; a handler's arguments are disposed of when it returns, but a
//! `Drop` cannot await a store transaction, and writing from a spawned task would answer the
//! client before its commands are durable. So the disposal only hands the scope back to the
//! middleware, which completes it after the handler, before the response leaves:
//!
//! - the handler answered a success (2xx): the scope is completed, and the response goes out
//!   only once the scope is committed and this service's perspectives applied it
//!   (read-your-writes). If completing fails (a version conflict, the store), the client gets
//!   that failure's problem instead, and nothing of the scope was written;
//! - the handler answered anything else, or failed, or the request was dropped (the client went
//!   away): the scope is dropped and nothing of it is written.
//!
//! A handler may also complete the scope itself ([`RequestScope::complete`]) when its answer
//! needs the receipts (event positions). A `RequestScope` used on a route without the
//! middleware is refused with a 500 (logged), never silently dropped. It must not decide
//! anything about the commands.

use super::RuntimeHandle;
use super::extract::IdempotencyKey;
use super::problem::Problem;
use crate::error::DispatchError;
use crate::scope::{Scope, ScopeReceipt};
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, ResponseError, web};
use futures::future::{Ready, ready};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

/// Where a request's scope waits for the middleware, once its handler let go of it.
#[derive(Clone, Default)]
struct Slot(Arc<Mutex<SlotState>>);

#[derive(Default)]
struct SlotState {
    /// A `RequestScope` was extracted for this request (one only).
    extracted: bool,
    /// The scope its handler let go of.
    scope: Option<Scope>,
}

impl Slot {
    fn put(&self, scope: Scope) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).scope = Some(scope);
    }

    fn take(&self) -> Option<Scope> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .scope
            .take()
    }
}

/// The request's [`Scope`], for a handler's arguments: dispatch with
/// `scope.local_invoke(command)` (it dereferences to [`Scope`]); the scope is written when the
/// handler answers a success, nothing of it otherwise (see the module docs). It carries the
/// request's `Idempotency-Key`, if any ([`Scope::with_idempotency_key`]). Needs the
/// [`complete_scopes`] middleware on the route and a `web::Data<RuntimeHandle>`.
pub struct RequestScope {
    scope: Scope,
    slot: Slot,
}

impl RequestScope {
    /// Completes the scope now, for a handler whose answer needs the receipts; the middleware
    /// then has nothing left to write.
    pub async fn complete(mut self) -> Result<ScopeReceipt, DispatchError> {
        let empty = Scope::new(self.scope.dispatcher().clone());
        std::mem::replace(&mut self.scope, empty).complete().await
    }
}

impl Deref for RequestScope {
    type Target = Scope;
    fn deref(&self) -> &Scope {
        &self.scope
    }
}

impl DerefMut for RequestScope {
    fn deref_mut(&mut self) -> &mut Scope {
        &mut self.scope
    }
}

impl Drop for RequestScope {
    fn drop(&mut self) {
        let empty = Scope::new(self.scope.dispatcher().clone());
        self.slot.put(std::mem::replace(&mut self.scope, empty));
    }
}

impl FromRequest for RequestScope {
    type Error = Problem;
    type Future = Ready<Result<RequestScope, Problem>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        ready(request_scope(req))
    }
}

#[allow(clippy::result_large_err)] // a refusal's whole answer, as for `parse_json`
fn request_scope(req: &HttpRequest) -> Result<RequestScope, Problem> {
    let misuse = |what: &str| Problem::internal(&format!("RequestScope: {what}"));
    let Some(slot) = req.extensions().get::<Slot>().cloned() else {
        return Err(misuse(
            "the route lacks the whizbang::web::complete_scopes middleware",
        ));
    };
    let Some(handle) = req.app_data::<web::Data<RuntimeHandle>>() else {
        return Err(misuse(
            "no web::Data<RuntimeHandle> in the application data",
        ));
    };
    let key = IdempotencyKey::of(req)?;
    {
        let mut state = slot.0.lock().unwrap_or_else(|p| p.into_inner());
        if state.extracted {
            return Err(misuse("taken twice in one request"));
        }
        state.extracted = true;
    }
    let mut scope = Scope::new(handle.dispatcher().clone());
    if let Some(key) = key.into_inner() {
        scope = scope.with_idempotency_key(key);
    }
    Ok(RequestScope { scope, slot })
}

/// The middleware that writes a request's [`RequestScope`] when its handler answered a
/// success, before the response goes out; wrap the routes (or the `App`) that take one:
/// `.wrap(actix_web::middleware::from_fn(whizbang::web::complete_scopes))`. A request without
/// a scope passes through untouched.
pub async fn complete_scopes(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let slot = Slot::default();
    req.extensions_mut().insert(slot.clone());
    let response = next.call(req).await?;
    let Some(scope) = slot.take() else {
        return Ok(response.map_into_boxed_body());
    };
    if !response.status().is_success() {
        // The handler refused: nothing of the scope is written.
        return Ok(response.map_into_boxed_body());
    }
    match scope.complete().await {
        Ok(_) => Ok(response.map_into_boxed_body()),
        Err(e) => {
            let (request, _) = response.into_parts();
            let answer = Problem::from(e).error_response();
            Ok(ServiceResponse::new(request, answer).map_into_boxed_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn a_scope_without_the_middleware_is_refused_not_dropped() {
        let req = actix_web::test::TestRequest::default().to_http_request();
        let refused = request_scope(&req).err().expect("refused");
        assert_eq!(refused.status, 500);
    }
}
