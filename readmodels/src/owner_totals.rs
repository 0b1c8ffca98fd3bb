//! `owner_totals`: per owner and currency, accounts and money, across aggregates.

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::ApplyError;

/// One owner's totals in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct OwnerTotal {
    /// The owner.
    pub owner: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Accounts ever opened.
    pub accounts: i64,
    /// Accounts open now.
    pub open_accounts: i64,
    /// Sum of the balances, minor units.
    pub balance: i64,
    /// Highest global position applied to this row.
    pub last_position: i64,
    /// The latest `recorded_at` among the events applied to the row: the greatest, not the
    /// last applied, so it does not depend on the order in which partitions are applied and
    /// a rebuild gives the same value as live apply (promise 5).
    pub updated_at: DateTime<Utc>,
}

/// The totals of `owner`, one row per currency.
pub async fn for_owner(pool: &PgPool, owner: &str) -> Result<Vec<OwnerTotal>, sqlx::Error> {
    sqlx::query_as(
        "SELECT owner, currency, accounts, open_accounts, balance, last_position, updated_at
           FROM owner_totals WHERE owner = $1 ORDER BY currency",
    )
    .bind(owner)
    .fetch_all(pool)
    .await
}

/// Applies one event.
pub async fn apply(
    tx: &mut PgConnection,
    event: &RecordedEvent,
    decoded: &AccountEvent,
) -> Result<(), ApplyError> {
    let id = event.aggregate_id.as_str();
    if let AccountEvent::AccountOpened { owner, currency } = decoded {
        let inserted = sqlx::query(
            "INSERT INTO owner_total_accounts (account_id, owner, currency, balance, open)
             VALUES ($1, $2, $3, 0, true) ON CONFLICT (account_id) DO NOTHING",
        )
        .bind(id)
        .bind(owner)
        .bind(currency.code())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted != 1 {
            return Err(ApplyError::Refused(format!("account {id} opened twice")));
        }
        sqlx::query(
            "INSERT INTO owner_totals AS t
                 (owner, currency, accounts, open_accounts, balance, last_position, updated_at)
             VALUES ($1, $2, 1, 1, 0, $3, $4)
             ON CONFLICT (owner, currency) DO UPDATE
                SET accounts = t.accounts + 1, open_accounts = t.open_accounts + 1,
                    last_position = greatest(t.last_position, EXCLUDED.last_position),
                    updated_at = greatest(t.updated_at, EXCLUDED.updated_at)",
        )
        .bind(owner)
        .bind(currency.code())
        .bind(event.global_position)
        .bind(event.recorded_at)
        .execute(&mut *tx)
        .await?;
        return Ok(());
    }
    let delta = decoded.balance_delta();
    let closes = matches!(decoded, AccountEvent::AccountClosed {});
    let owner: Option<(String, String)> = sqlx::query_as(
        "UPDATE owner_total_accounts SET balance = balance + $2, open = open AND NOT $3
          WHERE account_id = $1 RETURNING owner, currency",
    )
    .bind(id)
    .bind(delta)
    .bind(closes)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((owner, currency)) = owner else {
        return Err(ApplyError::Refused(format!(
            "{} for account {id}, which was never opened",
            event.event_type
        )));
    };
    sqlx::query(
        "UPDATE owner_totals
            SET balance = balance + $3, open_accounts = open_accounts - $4,
                last_position = greatest(last_position, $5), updated_at = greatest(updated_at, $6)
          WHERE owner = $1 AND currency = $2",
    )
    .bind(owner)
    .bind(currency)
    .bind(delta)
    .bind(i64::from(closes))
    .bind(event.global_position)
    .bind(event.recorded_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
