//! SQL for the `transfer_steps` table: which event took each money-moving step of a
//! transfer. Claimed only by the trigger on `events` (migration `..._transfers.sql`).

use std::collections::HashMap;

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

/// Who took each of `steps` that is taken (one query for a whole batch), by step.
pub async fn find_many(
    pool: &PgPool,
    steps: &[String],
) -> Result<HashMap<String, StepClaim>, sqlx::Error> {
    if steps.is_empty() {
        return Ok(HashMap::new());
    }
    let claims: Vec<StepClaim> = sqlx::query_as(
        "SELECT step, aggregate_type, aggregate_id, event_type, payload, global_position
           FROM transfer_steps WHERE step = ANY($1)",
    )
    .bind(steps)
    .fetch_all(pool)
    .await?;
    Ok(claims
        .into_iter()
        .map(|claim| (claim.step.clone(), claim))
        .collect())
}
