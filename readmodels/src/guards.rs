//! `projection_guards`: per projection and aggregate, the last sequence handled.

use sqlx::PgConnection;

/// What to do with an event, given the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next sequence: apply it.
    Apply,
    /// Already handled (a duplicate or a re-delivery): skip it.
    Duplicate,
    /// Sequences `from..event` are missing: fetch and apply them first.
    Gap { from: i64 },
}

/// The verdict for `sequence` of `aggregate_id` in `projection`, locking the guard row
/// for the rest of the transaction: two projector instances handling one event at once (a
/// rebalance overlap) are serialised here, and the second sees it as a duplicate. The row is
/// created first if missing, so there is always a row to lock (a concurrent creator makes
/// this wait for its commit).
pub async fn check(
    tx: &mut PgConnection,
    projection: &str,
    aggregate_id: &str,
    sequence: i64,
) -> Result<Verdict, sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_guards (projection, aggregate_id, last_sequence, last_position)
         VALUES ($1, $2, 0, 0) ON CONFLICT (projection, aggregate_id) DO NOTHING",
    )
    .bind(projection)
    .bind(aggregate_id)
    .execute(&mut *tx)
    .await?;
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM projection_guards
          WHERE projection = $1 AND aggregate_id = $2 FOR UPDATE",
    )
    .bind(projection)
    .bind(aggregate_id)
    .fetch_optional(&mut *tx)
    .await?;
    let last = last.unwrap_or(0);
    Ok(if sequence <= last {
        Verdict::Duplicate
    } else if sequence == last + 1 {
        Verdict::Apply
    } else {
        Verdict::Gap { from: last + 1 }
    })
}

/// Records that `sequence` (at `position`) of `aggregate_id` is handled.
pub async fn advance(
    tx: &mut PgConnection,
    projection: &str,
    aggregate_id: &str,
    sequence: i64,
    position: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_guards (projection, aggregate_id, last_sequence, last_position)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (projection, aggregate_id) DO UPDATE
            SET last_sequence = EXCLUDED.last_sequence, last_position = EXCLUDED.last_position",
    )
    .bind(projection)
    .bind(aggregate_id)
    .bind(sequence)
    .bind(position)
    .execute(tx)
    .await?;
    Ok(())
}
