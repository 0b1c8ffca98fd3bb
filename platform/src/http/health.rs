//! `/healthz` (the process is alive) and `/readyz` (it can do its work: PostgreSQL answers).

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sqlx::PgPool;

use super::problem::Problem;

/// How long readiness waits for PostgreSQL.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The health routes over `pool`.
pub fn router<S>(pool: PgPool) -> Router<S> {
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(ready))
        .with_state(pool)
}

async fn ready(State(pool): State<PgPool>) -> Result<axum::Json<serde_json::Value>, Problem> {
    if crate::db::ping(&pool, PING_TIMEOUT).await {
        Ok(axum::Json(
            json!({"status": "ready", "checks": {"postgres": "ok"}}),
        ))
    } else {
        Err(Problem::unavailable("PostgreSQL is not reachable")
            .with("checks", json!({"postgres": "down"})))
    }
}
