//! The HTTP API under `/v1`, plus health routes and problem answers for everything else.

pub mod accounts;
pub mod error;
pub mod headers;
pub mod intents;
pub mod openapi;
pub mod subjects;
pub mod transfers;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::{middleware, Router};
use ledger_platform::auth::{self, Guard, Scope};
use ledger_platform::http::{control, fallback, health, request_id, timeout};
use tower_http::catch_panic::CatchPanicLayer;

use crate::domain::Transfer;
use crate::ledger::Ledger;
use crate::subjects::Subjects;

pub use error::ApiError;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// API keys (scope `write`) and rate limits.
    pub auth: ledger_platform::auth::Auth,
    /// Executes account commands.
    pub ledger: Arc<Ledger>,
    /// Executes transfer commands.
    pub transfers: Arc<Ledger<Transfer>>,
    /// Data subjects: registration, erasure, sealing references (ADR 0019).
    pub subjects: Arc<Subjects>,
}

/// Limits the router applies to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted request body; larger is a 413.
    pub max_body_bytes: usize,
    /// A request taking longer is answered 503 (and its work abandoned if not committed).
    pub request_timeout: Duration,
}

/// The whole application router.
pub fn router(state: AppState, limits: Limits) -> Router {
    let pool = state.ledger.pool().clone();
    let auth = Arc::new(state.auth.clone());
    let guard = |scope| Guard {
        auth: auth.clone(),
        scope,
    };
    // Each group of routes gets its scope's guard (`route_layer` applies to the routes
    // added before it): commands need `write`, erasing a data subject `admin`.
    let commands = accounts::router()
        .merge(transfers::router())
        .merge(subjects::write_router())
        .route_layer(middleware::from_fn_with_state(
            guard(Scope::Write),
            auth::require,
        ));
    let operator = subjects::admin_router().route_layer(middleware::from_fn_with_state(
        guard(Scope::Admin),
        auth::require,
    ));
    Router::new()
        .nest("/v1", commands.merge(operator))
        .with_state(state)
        .merge(health::router(pool))
        .merge(ledger_platform::metrics::static_router())
        .merge(ledger_platform::openapi::router(
            <openapi::CommandApiDoc as utoipa::OpenApi>::openapi(),
        ))
        .fallback(fallback::not_found)
        .method_not_allowed_fallback(fallback::method_not_allowed)
        .layer(middleware::from_fn(control::layer))
        .layer(middleware::from_fn(ledger_platform::http::limits::layer))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            limits.request_timeout,
            timeout::layer,
        ))
        .layer(CatchPanicLayer::custom(fallback::panic_response))
        .layer(middleware::from_fn(ledger_platform::metrics::layer))
        .layer(middleware::from_fn(request_id::layer))
}
