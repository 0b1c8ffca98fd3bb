//! The HTTP API under `/v1`, plus health routes and problem answers for everything else.

pub mod accounts;
pub mod error;
pub mod headers;
pub mod intents;
pub mod openapi;
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
    let guard = Guard {
        auth: std::sync::Arc::new(state.auth.clone()),
        scope: Scope::Write,
    };
    Router::new()
        .nest(
            "/v1",
            accounts::router()
                .merge(transfers::router())
                .route_layer(middleware::from_fn_with_state(guard, auth::require)),
        )
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
