//! `dead_letters`: what a projection could not handle, with why and where it came from.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A dead letter to record.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NewDeadLetter {
    /// The projection that refused it (`*` when the message could not even be read).
    pub projection: String,
    /// Why.
    pub reason: String,
    /// The event's id, when known.
    pub event_id: Option<Uuid>,
    /// Its aggregate, when known.
    pub aggregate_id: Option<String>,
    /// Its sequence, when known.
    pub sequence: Option<i64>,
    /// Its global position, when known.
    pub global_position: Option<i64>,
    /// Its type, when known.
    pub event_type: Option<String>,
    /// Its version, when known.
    pub event_version: Option<String>,
    /// `kafka` or `store`.
    pub source: String,
    /// Kafka partition, when from Kafka.
    pub kafka_partition: Option<i32>,
    /// Kafka offset, when from Kafka.
    pub kafka_offset: Option<i64>,
    /// The raw headers as a JSON object.
    pub raw_headers: Option<serde_json::Value>,
    /// The raw value (lossy UTF-8).
    pub raw_value: Option<String>,
}

/// PostgreSQL text cannot hold NUL: a dead letter keeps what it can of a poisonous value.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// Records a dead letter in the batch's transaction, once: a letter for the same projection
/// and event (or Kafka partition and offset, for a message that is not an event) that is not
/// superseded makes this a no-op, so a re-delivery records nothing new. Text is stored with any NUL replaced
/// (U+FFFD), so the letter of an event PostgreSQL refuses can itself be stored.
pub async fn record(tx: &mut PgConnection, letter: &NewDeadLetter) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters
             (projection, reason, event_id, aggregate_id, sequence, global_position, event_type,
              event_version, source, kafka_partition, kafka_offset, raw_headers, raw_value)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         ON CONFLICT DO NOTHING",
    )
    .bind(storable(&letter.projection))
    .bind(storable(&letter.reason))
    .bind(letter.event_id)
    .bind(letter.aggregate_id.as_deref().map(storable))
    .bind(letter.sequence)
    .bind(letter.global_position)
    .bind(letter.event_type.as_deref().map(storable))
    .bind(letter.event_version.as_deref().map(storable))
    .bind(&letter.source)
    .bind(letter.kafka_partition)
    .bind(letter.kafka_offset)
    .bind(letter.raw_headers.as_ref().map(|headers| {
        serde_json::from_str::<serde_json::Value>(
            &headers.to_string().replace("\\u0000", "\\ufffd"),
        )
        .unwrap_or(serde_json::Value::Null)
    }))
    .bind(letter.raw_value.as_deref().map(storable))
    .execute(tx)
    .await?;
    Ok(())
}

/// Pending dead letters per projection.
pub async fn pending_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, count(*) FROM dead_letters WHERE status = 'pending'
          GROUP BY projection ORDER BY projection",
    )
    .fetch_all(pool)
    .await
}

/// A recorded dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub projection: String,
    pub reason: String,
    pub event_id: Option<Uuid>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub global_position: Option<i64>,
    pub event_type: Option<String>,
    pub source: String,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub raw_value: Option<String>,
    pub status: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

const COLUMNS: &str = "id, projection, reason, event_id, aggregate_id, sequence, global_position,
                       event_type, source, kafka_partition, kafka_offset, raw_value, status, created_at";

/// Dead letters with `status` (all when `None`), oldest first.
pub async fn list(
    pool: &PgPool,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM dead_letters
          WHERE $1::text IS NULL OR status = $1 ORDER BY id LIMIT $2"
    ))
    .bind(status)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One dead letter.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Sets a dead letter's status.
pub async fn set_status(tx: &mut PgConnection, id: i64, status: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dead_letters SET status = $2 WHERE id = $1")
        .bind(id)
        .bind(status)
        .execute(tx)
        .await?;
    Ok(())
}

/// One dead letter, its row locked for the rest of `tx`: two operators acting on one letter
/// at once are serialised here, and the second sees what the first did.
pub async fn lock(tx: &mut PgConnection, id: i64) -> Result<Option<DeadLetter>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM dead_letters WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(tx)
    .await
}

/// The pending dead letters of `projection` for `aggregate_id`, by event id, locked for the
/// rest of `tx`.
pub async fn pending_of(
    tx: &mut PgConnection,
    projection: &str,
    aggregate_id: &str,
) -> Result<Vec<(i64, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, event_id FROM dead_letters
          WHERE projection = $1 AND aggregate_id = $2 AND status = 'pending'
            AND event_id IS NOT NULL
          ORDER BY id FOR UPDATE",
    )
    .bind(projection)
    .bind(aggregate_id)
    .fetch_all(tx)
    .await
}

/// Which of `event_ids` an operator skipped for `projection` (in the live `dead_letters`,
/// whatever the search path): a skip is a decision that rebuilds and retries keep, so that
/// a rebuild equals the live model after it (ADR 0014).
pub async fn skipped(
    tx: &mut PgConnection,
    projection: &str,
    event_ids: &[Uuid],
) -> Result<std::collections::HashSet<Uuid>, sqlx::Error> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM public.dead_letters
          WHERE projection = $1 AND status = 'skipped' AND event_id = ANY($2)",
    )
    .bind(projection)
    .bind(event_ids)
    .fetch_all(tx)
    .await?;
    Ok(ids.into_iter().collect())
}
