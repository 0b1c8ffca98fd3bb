//! `transfers`: one row per transfer with its state, what `GET /v1/transfers/{id}` answers.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ledger_events::{RecordedEvent, TransferEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// One transfer as the read model has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
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

/// Applies `events` (in order; several may be of one transfer): the rows concerned are read
/// in one statement, changed in memory and written back in one statement. Returns the events
/// refused (index in `events`, reason).
pub async fn apply_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, &TransferEvent)],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids = crate::distinct_ids(events.iter().map(|(event, _)| *event));
    let mut rows: BTreeMap<String, TransferRow> = sqlx::query_as::<_, TransferRow>(
        "SELECT transfer_id, from_account, to_account, amount, currency, state, failure_code,
                failure_reason, version, last_position, requested_at, updated_at
           FROM transfers WHERE transfer_id = ANY($1::text[])",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| (row.transfer_id.clone(), row))
    .collect();
    let (changed, refused) =
        crate::fold_events(events, |event, decoded| fold(&mut rows, event, decoded));
    let rows: Vec<&TransferRow> = changed.iter().filter_map(|id| rows.get(*id)).collect();
    if rows.is_empty() {
        return Ok(refused);
    }
    sqlx::query(
        "INSERT INTO transfers
             (transfer_id, from_account, to_account, amount, currency, state, failure_code,
              failure_reason, version, last_position, requested_at, updated_at)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[],
                              $11::timestamptz[], $12::timestamptz[])
         ON CONFLICT (transfer_id) DO UPDATE
            SET state = EXCLUDED.state, failure_code = EXCLUDED.failure_code,
                failure_reason = EXCLUDED.failure_reason, version = EXCLUDED.version,
                last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at",
    )
    .bind(
        rows.iter()
            .map(|r| r.transfer_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.from_account.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.to_account.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.amount).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.currency.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.state.as_str()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.failure_code.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.failure_reason.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_position).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.requested_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(refused)
}

/// One event's change to the transfers in memory, or why it does not fit.
fn fold(
    rows: &mut BTreeMap<String, TransferRow>,
    event: &RecordedEvent,
    decoded: &TransferEvent,
) -> Result<(), String> {
    let id = event.aggregate_id.as_str();
    let misfit = || {
        format!(
            "{} for transfer {id} does not fit the read model (not requested, or requested twice)",
            event.event_type
        )
    };
    if let TransferEvent::TransferRequested {
        from,
        to,
        amount,
        currency,
    } = decoded
    {
        if rows.contains_key(id) {
            return Err(misfit());
        }
        rows.insert(
            id.to_owned(),
            TransferRow {
                transfer_id: id.to_owned(),
                from_account: from.to_string(),
                to_account: to.to_string(),
                amount: amount.minor_units(),
                currency: currency.code().to_owned(),
                state: "requested".into(),
                failure_code: None,
                failure_reason: None,
                version: event.sequence,
                last_position: event.global_position,
                requested_at: event.recorded_at,
                updated_at: event.recorded_at,
            },
        );
        return Ok(());
    }
    let (state, failure) = match decoded {
        TransferEvent::TransferDebited {} => ("debited", None),
        TransferEvent::TransferCompleted {} => ("completed", None),
        TransferEvent::TransferFailed { code, reason } => ("failed", Some((code, reason))),
        TransferEvent::TransferCompensated { code, reason } => {
            ("compensated", Some((code, reason)))
        }
        TransferEvent::TransferRequested { .. } => ("requested", None),
    };
    let row = rows.get_mut(id).ok_or_else(misfit)?;
    row.state = state.to_owned();
    row.failure_code = failure.map(|(code, _)| code.clone());
    row.failure_reason = failure.map(|(_, reason)| reason.clone());
    row.version = event.sequence;
    row.last_position = event.global_position;
    row.updated_at = event.recorded_at;
    Ok(())
}

/// Removes the row of `transfer_id` (see [`crate::forget_aggregate`]).
pub async fn forget(tx: &mut PgConnection, transfer_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM transfers WHERE transfer_id = $1")
        .bind(transfer_id)
        .execute(tx)
        .await?;
    Ok(())
}
