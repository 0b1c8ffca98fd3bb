//! `projection_guards`: per projection and aggregate, the last sequence handled.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

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

/// The last sequence handled of each of `aggregate_ids` in `projection`, locking their guard
/// rows for the rest of the transaction (creating missing ones at 0) in one statement.
///
/// The rows are taken in key order (the `ORDER BY` feeds the insert, which creates or locks
/// each row in turn), so two transactions locking overlapping sets wait for each other
/// instead of deadlocking. `DO UPDATE … WHERE false` locks an existing row without writing
/// a new version of it; the second statement reads the rows already locked.
pub async fn lock_many(
    tx: &mut PgConnection,
    projection: &str,
    aggregate_ids: &[&str],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_guards AS g (projection, aggregate_id, last_sequence, last_position)
         SELECT $1, a, 0, 0 FROM unnest($2::text[]) AS a ORDER BY a
         ON CONFLICT (projection, aggregate_id) DO UPDATE SET last_sequence = g.last_sequence
          WHERE false",
    )
    .bind(projection)
    .bind(aggregate_ids)
    .execute(&mut *tx)
    .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, last_sequence FROM projection_guards
          WHERE projection = $1 AND aggregate_id = ANY($2::text[])",
    )
    .bind(projection)
    .bind(aggregate_ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Records, for each aggregate, the last sequence handled (at its position), in one
/// statement. The rows must be locked by [`lock_many`] in this transaction.
pub async fn advance_many(
    tx: &mut PgConnection,
    projection: &str,
    aggregate_ids: &[&str],
    sequences: &[i64],
    positions: &[i64],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_guards AS g SET last_sequence = d.s, last_position = d.p
           FROM unnest($2::text[], $3::int8[], $4::int8[]) AS d (a, s, p)
          WHERE g.projection = $1 AND g.aggregate_id = d.a",
    )
    .bind(projection)
    .bind(aggregate_ids)
    .bind(sequences)
    .bind(positions)
    .execute(tx)
    .await?;
    Ok(())
}

/// The global position up to which `projection` has handled `aggregate_id` (0 when it has
/// handled nothing of it): the read-your-writes watermark of that aggregate in that read
/// model. It is committed with the model's rows, so a model that has reached a position
/// holds every event of the aggregate up to it (dead-lettered ones excepted, which are
/// handled too).
pub async fn position_of(
    pool: &PgPool,
    projection: &str,
    aggregate_id: &str,
) -> Result<i64, sqlx::Error> {
    let position: Option<i64> = sqlx::query_scalar(
        "SELECT last_position FROM projection_guards WHERE projection = $1 AND aggregate_id = $2",
    )
    .bind(projection)
    .bind(aggregate_id)
    .fetch_optional(pool)
    .await?;
    Ok(position.unwrap_or(0))
}
