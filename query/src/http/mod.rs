//! The HTTP API under `/v1`, plus health routes and problem answers for everything else.

pub mod accounts;
pub mod consistency;
pub mod error;
pub mod openapi;
pub mod owners;
pub mod subjects;
pub mod transfers;

use std::time::Duration;

use axum::{middleware, Router};
use ledger_platform::auth::{self, Guard, Scope};
use ledger_platform::http::{control, fallback, health, limits, request_id, timeout};
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;

use crate::changes::Changes;

pub use error::ApiError;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// API keys (scope `read`) and rate limits.
    pub auth: ledger_platform::auth::Auth,
    /// The read models.
    pub pool: PgPool,
    /// Cache and change stream.
    pub changes: Changes,
    /// Longest wait for a position token.
    pub read_wait_timeout: Duration,
}

/// The whole application router.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let pool = state.pool.clone();
    let changes = state.changes.clone();
    let guard = Guard {
        auth: std::sync::Arc::new(state.auth.clone()),
        scope: Scope::Read,
    };
    // Exporting a subject hands out personal data in clear: a scope of its own.
    let export_guard = Guard {
        auth: std::sync::Arc::new(state.auth.clone()),
        scope: Scope::Export,
    };
    Router::new()
        .nest(
            "/v1",
            accounts::router()
                .merge(owners::router())
                .merge(subjects::router())
                .merge(transfers::router())
                .route_layer(middleware::from_fn_with_state(guard, auth::require))
                .merge(
                    subjects::export_router()
                        .route_layer(middleware::from_fn_with_state(export_guard, auth::require)),
                ),
        )
        .with_state(state)
        .merge(health::router(pool))
        .merge(ledger_platform::openapi::router(
            <openapi::QueryApiDoc as utoipa::OpenApi>::openapi(),
        ))
        .merge(ledger_platform::metrics::router(move || {
            let changes = changes.clone();
            async move {
                use std::sync::atomic::Ordering;
                metrics::counter!("ledger_query_cache_hits_total")
                    .absolute(changes.hits.load(Ordering::Relaxed));
                metrics::counter!("ledger_query_cache_misses_total")
                    .absolute(changes.misses.load(Ordering::Relaxed));
            }
        }))
        .fallback(fallback::not_found)
        .method_not_allowed_fallback(fallback::method_not_allowed)
        .layer(middleware::from_fn(control::layer))
        .layer(middleware::from_fn(limits::layer))
        .layer(middleware::from_fn_with_state(
            request_timeout,
            timeout::layer,
        ))
        .layer(CatchPanicLayer::custom(fallback::panic_response))
        .layer(middleware::from_fn(ledger_platform::metrics::layer))
        .layer(middleware::from_fn(request_id::layer))
}
