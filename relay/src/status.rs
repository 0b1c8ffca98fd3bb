//! `/healthz`, `/readyz` (PostgreSQL and the broker reachable) and `/status` (leadership,
//! position, lag, last error) of the relay.

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{middleware, Json, Router};
use ledger_platform::http::{fallback, request_id, Problem};
use rdkafka::producer::FutureProducer;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::kafka;
use crate::relay::{SharedStatus, Status};

/// Shared state of the status routes.
#[derive(Clone)]
pub struct StatusState {
    /// The relay's status.
    pub status: SharedStatus,
    /// For readiness.
    pub pool: PgPool,
    /// For readiness.
    pub producer: FutureProducer,
    /// The topic whose metadata readiness asks for.
    pub topic: String,
}

impl std::fmt::Debug for StatusState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusState")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// The routes.
pub fn router(state: StatusState) -> Router {
    let shared = state.status.clone();
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .with_state(state)
        .merge(ledger_platform::metrics::router(move || {
            let shared = shared.clone();
            async move { refresh_metrics(&shared) }
        }))
        .fallback(fallback::not_found)
        .layer(middleware::from_fn(ledger_platform::metrics::layer))
        .layer(middleware::from_fn(request_id::layer))
}

/// Sets the relay's gauges from its status: `ledger_relay_leader`, `ledger_relay_lag_events`,
/// `ledger_relay_lag_seconds`, `ledger_relay_position` and `ledger_relay_published_total`.
fn refresh_metrics(shared: &crate::relay::SharedStatus) {
    let status = shared.lock().map(|s| s.clone()).unwrap_or_default();
    metrics::gauge!("ledger_relay_leader").set(if status.leader { 1.0 } else { 0.0 });
    metrics::gauge!("ledger_relay_lag_events").set(status.lag_events as f64);
    metrics::gauge!("ledger_relay_lag_seconds").set(status.lag_seconds);
    metrics::gauge!("ledger_relay_position").set(status.global_position as f64);
    metrics::counter!("ledger_relay_published_total").absolute(status.published);
}

async fn status(State(state): State<StatusState>) -> Json<Status> {
    Json(state.status.lock().map(|s| s.clone()).unwrap_or_default())
}

async fn ready(State(state): State<StatusState>) -> Result<Json<Value>, Problem> {
    let timeout = Duration::from_secs(2);
    let postgres = ledger_platform::db::ping(&state.pool, timeout).await;
    let broker = kafka::reachable(&state.producer, &state.topic, timeout).await;
    let checks = json!({
        "postgres": if postgres { "ok" } else { "down" },
        "broker": if broker { "ok" } else { "down" },
    });
    if postgres && broker {
        Ok(Json(json!({"status": "ready", "checks": checks})))
    } else {
        Err(Problem::unavailable("a dependency of the relay is unreachable").with("checks", checks))
    }
}
