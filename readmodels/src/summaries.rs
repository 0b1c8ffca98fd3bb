//! `account_summaries`: one row per account.

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::ApplyError;

/// One account as the query API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AccountSummary {
    /// The account.
    pub account_id: String,
    /// Its owner.
    pub owner: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Minor units.
    pub balance: i64,
    /// `open` or `closed`.
    pub status: String,
    /// Sequence of the last event applied.
    pub version: i64,
    /// Global position of the last event applied: the read-your-writes watermark.
    pub last_position: i64,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
}

/// The summary of `account_id`, if projected.
pub async fn find(pool: &PgPool, account_id: &str) -> Result<Option<AccountSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT account_id, owner, currency, balance, status, version, last_position, updated_at
           FROM account_summaries WHERE account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(pool)
    .await
}

/// Where `account_id` has got to (0 when not projected yet).
pub async fn position_of(pool: &PgPool, account_id: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT last_position FROM account_summaries WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

/// Applies one event to the account's summary.
pub async fn apply(
    tx: &mut PgConnection,
    event: &RecordedEvent,
    decoded: &AccountEvent,
) -> Result<(), ApplyError> {
    let id = event.aggregate_id.as_str();
    let changed = match decoded {
        AccountEvent::AccountOpened { owner, currency } => sqlx::query(
            "INSERT INTO account_summaries
                 (account_id, owner, currency, balance, status, version, last_position, updated_at)
             VALUES ($1, $2, $3, 0, 'open', $4, $5, $6)
             ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(id)
        .bind(owner)
        .bind(currency.code())
        .bind(event.sequence)
        .bind(event.global_position)
        .bind(event.recorded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        AccountEvent::MoneyDeposited { .. }
        | AccountEvent::MoneyWithdrawn { .. }
        | AccountEvent::TransferSent { .. }
        | AccountEvent::TransferReceived { .. }
        | AccountEvent::TransferRefunded { .. }
        | AccountEvent::TransferSettled { .. } => sqlx::query(
            "UPDATE account_summaries
                SET balance = balance + $2, version = $3, last_position = $4, updated_at = $5
              WHERE account_id = $1",
        )
        .bind(id)
        .bind(decoded.balance_delta())
        .bind(event.sequence)
        .bind(event.global_position)
        .bind(event.recorded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
        AccountEvent::AccountClosed {} => sqlx::query(
            "UPDATE account_summaries
                SET status = 'closed', version = $2, last_position = $3, updated_at = $4
              WHERE account_id = $1",
        )
        .bind(id)
        .bind(event.sequence)
        .bind(event.global_position)
        .bind(event.recorded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected(),
    };
    if changed == 1 {
        Ok(())
    } else {
        Err(ApplyError::Refused(format!(
            "{} for account {id} does not fit its summary (not opened, or opened twice)",
            event.event_type
        )))
    }
}
