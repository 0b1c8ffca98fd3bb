//! `account_summaries`: one row per account.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One account as the query API answers it: the summary row with its subject's name from
/// `subjects` (the one row that holds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AccountSummary {
    /// The account.
    pub account_id: String,
    /// The data subject the account belongs to.
    pub subject_id: Uuid,
    /// The subject's name, `[erased]` once the subject is erased, or null while the
    /// subject's registration is not projected yet.
    pub owner: Option<String>,
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

/// One row of `account_summaries` as the projection folds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct SummaryRow {
    account_id: String,
    subject_id: Uuid,
    currency: String,
    balance: i64,
    status: String,
    version: i64,
    last_position: i64,
    updated_at: DateTime<Utc>,
}

/// The summary of `account_id`, if projected.
pub async fn find(pool: &PgPool, account_id: &str) -> Result<Option<AccountSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.account_id, a.subject_id, s.name AS owner, a.currency, a.balance, a.status,
                a.version, a.last_position, a.updated_at
           FROM account_summaries a LEFT JOIN subjects s USING (subject_id)
          WHERE a.account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(pool)
    .await
}

/// The summaries of every account of `subject_id`, oldest account id first.
pub async fn of_subject(
    pool: &PgPool,
    subject_id: Uuid,
) -> Result<Vec<AccountSummary>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.account_id, a.subject_id, s.name AS owner, a.currency, a.balance, a.status,
                a.version, a.last_position, a.updated_at
           FROM account_summaries a LEFT JOIN subjects s USING (subject_id)
          WHERE a.subject_id = $1 ORDER BY a.account_id",
    )
    .bind(subject_id)
    .fetch_all(pool)
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

/// Applies `events` (in order; several may be of one account) to the summaries: the rows
/// of the accounts concerned are read in one statement, changed in memory, and written
/// back in one statement. Returns the events refused (index in `events`, reason); a
/// refused event changes nothing.
pub async fn apply_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, &AccountEvent)],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids = crate::distinct_ids(events.iter().map(|(event, _)| *event));
    let mut rows: BTreeMap<String, SummaryRow> = sqlx::query_as::<_, SummaryRow>(
        "SELECT account_id, subject_id, currency, balance, status, version, last_position,
                updated_at
           FROM account_summaries WHERE account_id = ANY($1::text[])",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|row| (row.account_id.clone(), row))
    .collect();
    let (changed, refused) =
        crate::fold_events(events, |event, decoded| fold(&mut rows, event, decoded));
    let rows: Vec<&SummaryRow> = changed.iter().filter_map(|id| rows.get(*id)).collect();
    if rows.is_empty() {
        return Ok(refused);
    }
    sqlx::query(
        "INSERT INTO account_summaries
             (account_id, subject_id, currency, balance, status, version, last_position,
              updated_at)
         SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int8[], $5::text[],
                              $6::int8[], $7::int8[], $8::timestamptz[])
         ON CONFLICT (account_id) DO UPDATE
            SET balance = EXCLUDED.balance, status = EXCLUDED.status, version = EXCLUDED.version,
                last_position = EXCLUDED.last_position, updated_at = EXCLUDED.updated_at",
    )
    .bind(
        rows.iter()
            .map(|r| r.account_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.subject_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.currency.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.balance).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.last_position).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(refused)
}

/// One event's change to the summaries in memory, or why it does not fit.
fn fold(
    rows: &mut BTreeMap<String, SummaryRow>,
    event: &RecordedEvent,
    decoded: &AccountEvent,
) -> Result<(), String> {
    let id = event.aggregate_id.as_str();
    let misfit = || {
        format!(
            "{} for account {id} does not fit its summary (not opened, or opened twice)",
            event.event_type
        )
    };
    if let AccountEvent::AccountOpened {
        subject_id,
        currency,
        ..
    } = decoded
    {
        if rows.contains_key(id) {
            return Err(misfit());
        }
        rows.insert(
            id.to_owned(),
            SummaryRow {
                account_id: id.to_owned(),
                subject_id: *subject_id,
                currency: currency.code().to_owned(),
                balance: 0,
                status: "open".into(),
                version: event.sequence,
                last_position: event.global_position,
                updated_at: event.recorded_at,
            },
        );
        return Ok(());
    }
    let row = rows.get_mut(id).ok_or_else(misfit)?;
    if matches!(decoded, AccountEvent::AccountClosed {}) {
        row.status = "closed".into();
    } else {
        row.balance = row
            .balance
            .checked_add(decoded.balance_delta())
            .ok_or_else(|| {
                format!(
                    "{} for account {id} takes its balance beyond what a bigint holds",
                    event.event_type
                )
            })?;
    }
    row.version = event.sequence;
    row.last_position = event.global_position;
    row.updated_at = event.recorded_at;
    Ok(())
}

/// Removes the summary of `account_id` (see [`crate::forget_aggregate`]).
pub async fn forget(tx: &mut PgConnection, account_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM account_summaries WHERE account_id = $1")
        .bind(account_id)
        .execute(tx)
        .await?;
    Ok(())
}
