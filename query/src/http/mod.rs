//! The HTTP API under `/v1`, plus health routes and problem answers for everything else.

pub mod accounts;
pub mod consistency;
pub mod error;
pub mod owners;
pub mod transfers;

use std::time::Duration;

use axum::{middleware, Router};
use ledger_platform::http::{fallback, health, request_id, timeout};
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;

use crate::changes::Changes;

pub use error::ApiError;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
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
    Router::new()
        .nest(
            "/v1",
            accounts::router()
                .merge(owners::router())
                .merge(transfers::router()),
        )
        .with_state(state)
        .merge(health::router(pool))
        .fallback(fallback::not_found)
        .method_not_allowed_fallback(fallback::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            request_timeout,
            timeout::layer,
        ))
        .layer(CatchPanicLayer::custom(fallback::panic_response))
        .layer(middleware::from_fn(request_id::layer))
}
