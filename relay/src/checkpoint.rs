//! SQL for `relay_checkpoints`: how far each relay has published.

use ledger_store::LogCursor;
use sqlx::PgPool;

/// The cursor `relay` resumes after (the start of the log if it never published).
pub async fn load(pool: &PgPool, relay: &str) -> Result<LogCursor, sqlx::Error> {
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM relay_checkpoints
          WHERE relay_name = $1",
    )
    .bind(relay)
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map_or_else(LogCursor::default, |(transaction_id, global_position)| {
            LogCursor {
                transaction_id,
                global_position,
            }
        }),
    )
}

/// Records that everything up to `cursor` is confirmed by the broker. Never moves a
/// checkpoint backwards (a deposed leader finishing late cannot undo its successor's work).
pub async fn save(pool: &PgPool, relay: &str, cursor: LogCursor) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_checkpoints AS c (relay_name, transaction_id, global_position)
         VALUES ($1, $2::text::xid8, $3)
         ON CONFLICT (relay_name) DO UPDATE
            SET transaction_id = EXCLUDED.transaction_id,
                global_position = EXCLUDED.global_position,
                updated_at = now()
          WHERE (c.transaction_id, c.global_position)
              < (EXCLUDED.transaction_id, EXCLUDED.global_position)",
    )
    .bind(relay)
    .bind(cursor.transaction_id.to_string())
    .bind(cursor.global_position)
    .execute(pool)
    .await?;
    Ok(())
}
