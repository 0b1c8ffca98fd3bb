//! `account_statements`: one row per entry with the running balance, read in pages.
//!
//! Pages are keyed by sequence (`after`), so a client walking the statement while new
//! entries are appended sees every entry exactly once: appends only add higher sequences.

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::ApplyError;

/// One statement entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct StatementEntry {
    /// The entry's event sequence within the account (the page cursor).
    pub sequence: i64,
    /// The event's global position.
    pub global_position: i64,
    /// The event id.
    pub event_id: Uuid,
    /// `opened`, `deposit`, `withdrawal`, `transfer_sent`, `transfer_received`,
    /// `transfer_refunded` or `closed`.
    pub entry_type: String,
    /// Signed minor units: positive in, negative out, 0 for opening/closing.
    pub amount: i64,
    /// Balance after this entry.
    pub balance_after: i64,
    /// The payment reference, if any (for a refund: why the destination refused).
    pub reference: Option<String>,
    /// The transfer this entry is a leg of, if any.
    pub transfer_id: Option<Uuid>,
    /// When the event was recorded.
    pub recorded_at: DateTime<Utc>,
}

/// Up to `limit` entries of `account_id` with a sequence above `after`, oldest first.
pub async fn page(
    pool: &PgPool,
    account_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<StatementEntry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT sequence, global_position, event_id, entry_type, amount, balance_after,
                reference, transfer_id, recorded_at
           FROM account_statements
          WHERE account_id = $1 AND sequence > $2
          ORDER BY sequence
          LIMIT $3",
    )
    .bind(account_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Applies one event: appends the entry with the running balance.
pub async fn apply(
    tx: &mut PgConnection,
    event: &RecordedEvent,
    decoded: &AccountEvent,
) -> Result<(), ApplyError> {
    let (entry_type, reference) = match decoded {
        AccountEvent::AccountOpened { .. } => ("opened", None),
        AccountEvent::MoneyDeposited { reference, .. } => ("deposit", reference.clone()),
        AccountEvent::MoneyWithdrawn { reference, .. } => ("withdrawal", reference.clone()),
        AccountEvent::AccountClosed {} => ("closed", None),
        AccountEvent::TransferSent { .. } => ("transfer_sent", None),
        AccountEvent::TransferReceived { .. } => ("transfer_received", None),
        AccountEvent::TransferRefunded { reason, .. } => {
            ("transfer_refunded", Some(reason.clone()))
        }
        // Moves no money: not a statement entry.
        AccountEvent::TransferSettled { .. } => return Ok(()),
    };
    let amount = decoded.balance_delta();
    let previous: Option<i64> = sqlx::query_scalar(
        "SELECT balance_after FROM account_statements
          WHERE account_id = $1 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(&event.aggregate_id)
    .fetch_optional(&mut *tx)
    .await?;
    if previous.is_none() && entry_type != "opened" {
        return Err(ApplyError::Refused(format!(
            "{} for account {} before its opening",
            event.event_type, event.aggregate_id
        )));
    }
    let balance_after = previous
        .unwrap_or(0)
        .checked_add(amount)
        .ok_or_else(|| ApplyError::Refused("running balance overflows".into()))?;
    sqlx::query(
        "INSERT INTO account_statements
             (account_id, sequence, global_position, event_id, entry_type, amount,
              balance_after, reference, transfer_id, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .bind(event.global_position)
    .bind(event.event_id)
    .bind(entry_type)
    .bind(amount)
    .bind(balance_after)
    .bind(reference)
    .bind(decoded.transfer_id())
    .bind(event.recorded_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
