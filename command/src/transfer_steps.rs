//! SQL for the `transfer_steps` table: which event took each money-moving step of a
//! transfer. Claimed only by the trigger on `events` (migration `..._transfers.sql`).

use serde_json::Value;
use sqlx::PgPool;

/// The event that took a step.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StepClaim {
    /// `<transfer id>/debit|credit|settle`.
    pub step: String,
    /// `account` or `transfer`.
    pub aggregate_type: String,
    /// The aggregate whose event took it.
    pub aggregate_id: String,
    /// That event's type, e.g. `TransferSent` or `TransferFailed`.
    pub event_type: String,
    /// That event's payload.
    pub payload: Value,
    /// That event's global position.
    pub global_position: i64,
}

/// Who took `step`, if anyone did.
pub async fn find(pool: &PgPool, step: &str) -> Result<Option<StepClaim>, sqlx::Error> {
    sqlx::query_as(
        "SELECT step, aggregate_type, aggregate_id, event_type, payload, global_position
           FROM transfer_steps WHERE step = $1",
    )
    .bind(step)
    .fetch_optional(pool)
    .await
}
