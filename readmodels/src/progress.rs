//! `projection_checkpoints` and `projection_partitions`: how far each projection has got.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// A projection's progress.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Checkpoint {
    /// The projection.
    pub projection: String,
    /// Highest global position applied.
    pub last_position: i64,
    /// When the last applied event was recorded.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Events applied since the table was created.
    pub events_applied: i64,
    /// When it last moved.
    pub updated_at: DateTime<Utc>,
}

/// Records progress of `projection` by `events` events up to `position` (and, when reading
/// the store directly, the log cursor to resume after).
pub async fn advance(
    tx: &mut PgConnection,
    projection: &str,
    position: i64,
    event_at: DateTime<Utc>,
    events: i64,
    cursor: Option<(i64, i64)>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints AS c
             (projection, transaction_id, global_position, last_position, last_event_at,
              events_applied, updated_at)
         VALUES ($1, $2::text::xid8, coalesce($3, 0), $4, $5, $6, now())
         ON CONFLICT (projection) DO UPDATE
            SET transaction_id = coalesce(EXCLUDED.transaction_id, c.transaction_id),
                global_position = CASE WHEN EXCLUDED.transaction_id IS NULL
                                       THEN c.global_position ELSE EXCLUDED.global_position END,
                last_position = greatest(c.last_position, EXCLUDED.last_position),
                last_event_at = greatest(c.last_event_at, EXCLUDED.last_event_at),
                events_applied = c.events_applied + EXCLUDED.events_applied,
                updated_at = now()",
    )
    .bind(projection)
    .bind(cursor.map(|(tx_id, _)| tx_id.to_string()))
    .bind(cursor.map(|(_, position)| position))
    .bind(position)
    .bind(event_at)
    .bind(events)
    .execute(tx)
    .await?;
    Ok(())
}

/// The log cursor `projection` resumes after when reading the store directly.
pub async fn cursor(pool: &PgPool, projection: &str) -> Result<(i64, i64), sqlx::Error> {
    let row: Option<(Option<i64>, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM projection_checkpoints
          WHERE projection = $1",
    )
    .bind(projection)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((Some(tx_id), position)) => (tx_id, position),
        _ => (0, 0),
    })
}

/// Every projection's progress.
pub async fn all(pool: &PgPool) -> Result<Vec<Checkpoint>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, last_position, last_event_at, events_applied, updated_at
           FROM projection_checkpoints ORDER BY projection",
    )
    .fetch_all(pool)
    .await
}

/// A partition's progress in a consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PartitionProgress {
    /// The Kafka partition.
    pub partition: i32,
    /// The last offset applied.
    pub last_offset: i64,
    /// Global position of the event at that offset.
    pub last_position: i64,
}

/// Records that `offset` of `partition` is applied (in the batch's transaction).
pub async fn advance_partition(
    tx: &mut PgConnection,
    group: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    position: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_partitions AS p
             (consumer_group, topic, partition, last_offset, last_position, updated_at)
         VALUES ($1, $2, $3, $4, $5, now())
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE
            SET last_offset = greatest(p.last_offset, EXCLUDED.last_offset),
                last_position = greatest(p.last_position, EXCLUDED.last_position),
                updated_at = now()",
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .bind(position)
    .execute(tx)
    .await?;
    Ok(())
}

/// Every partition's progress in `group`.
pub async fn partitions(
    pool: &PgPool,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionProgress>, sqlx::Error> {
    sqlx::query_as(
        "SELECT partition, last_offset, last_position FROM projection_partitions
          WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await
}
