//! `transfers`: one row per transfer with its state, what `GET /v1/transfers/{id}` answers.

use chrono::{DateTime, Utc};
use ledger_events::{RecordedEvent, TransferEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::ApplyError;

/// One transfer as the read model has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct TransferRow {
    /// The transfer id.
    pub transfer_id: String,
    /// The account debited.
    pub from_account: String,
    /// The account credited.
    pub to_account: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// `requested`, `debited`, `completed`, `failed` or `compensated`.
    pub state: String,
    /// For `failed` and `compensated`: the refusal's code (e.g. `insufficient_funds`).
    pub failure_code: Option<String>,
    /// For `failed` and `compensated`: the refusal's message.
    pub failure_reason: Option<String>,
    /// Sequence of the transfer's last event.
    pub version: i64,
    /// Global position of the transfer's last event.
    pub last_position: i64,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
}

/// The transfer `transfer_id`, if the read model has it.
pub async fn get(pool: &PgPool, transfer_id: &str) -> Result<Option<TransferRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT transfer_id, from_account, to_account, amount, currency, state, failure_code,
                failure_reason, version, last_position, requested_at, updated_at
           FROM transfers WHERE transfer_id = $1",
    )
    .bind(transfer_id)
    .fetch_optional(pool)
    .await
}

/// The position the transfer's row has reached (0 when the read model does not have it).
pub async fn position_of(pool: &PgPool, transfer_id: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT last_position FROM transfers WHERE transfer_id = $1")
            .bind(transfer_id)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

/// Applies one transfer event to its row.
pub async fn apply(
    tx: &mut PgConnection,
    event: &RecordedEvent,
    decoded: &TransferEvent,
) -> Result<(), ApplyError> {
    let id = &event.aggregate_id;
    let changed = if let TransferEvent::TransferRequested {
        from,
        to,
        amount,
        currency,
    } = decoded
    {
        sqlx::query(
            "INSERT INTO transfers
                 (transfer_id, from_account, to_account, amount, currency, state, version,
                  last_position, requested_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 'requested', $6, $7, $8, $8)
             ON CONFLICT (transfer_id) DO NOTHING",
        )
        .bind(id)
        .bind(from.to_string())
        .bind(to.to_string())
        .bind(amount.minor_units())
        .bind(currency.code())
        .bind(event.sequence)
        .bind(event.global_position)
        .bind(event.recorded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    } else {
        let (state, failure) = match decoded {
            TransferEvent::TransferDebited {} => ("debited", None),
            TransferEvent::TransferCompleted {} => ("completed", None),
            TransferEvent::TransferFailed { code, reason } => ("failed", Some((code, reason))),
            TransferEvent::TransferCompensated { code, reason } => {
                ("compensated", Some((code, reason)))
            }
            TransferEvent::TransferRequested { .. } => ("requested", None),
        };
        sqlx::query(
            "UPDATE transfers
                SET state = $2, failure_code = $3, failure_reason = $4, version = $5,
                    last_position = $6, updated_at = $7
              WHERE transfer_id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(failure.map(|(code, _)| code))
        .bind(failure.map(|(_, reason)| reason))
        .bind(event.sequence)
        .bind(event.global_position)
        .bind(event.recorded_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
    };
    if changed == 1 {
        Ok(())
    } else {
        Err(ApplyError::Refused(format!(
            "{} for transfer {id} does not fit the read model (not requested, or requested twice)",
            event.event_type
        )))
    }
}
