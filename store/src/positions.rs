//! Look-ups of single events by aggregate and sequence.

use sqlx::PgPool;

/// Whether the event at `sequence` was appended by the command attempt `command_id`.
pub async fn appended_by(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
    command_id: &str,
) -> Result<bool, sqlx::Error> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3
            AND metadata ->> 'command_id' = $4",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(sequence)
    .bind(command_id)
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some())
}
