//! `account_statements`: one row per entry with the running balance, read in pages.
//!
//! Pages are keyed by sequence (`after`), so a client walking the statement while new
//! entries are appended sees every entry exactly once: appends only add higher sequences.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

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

/// Applies `events` (in order; several may be of one account): each account's last running
/// balance is read in one statement, the entries are computed in memory (each with the
/// balance after it) and appended in one statement. Returns the events refused (index in
/// `events`, reason); a refused event appends nothing.
pub async fn apply_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, &AccountEvent)],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids = crate::distinct_ids(events.iter().map(|(event, _)| *event));
    let mut balances: HashMap<String, i64> = sqlx::query_as::<_, (String, Option<i64>)>(
        "SELECT a.id, (SELECT balance_after FROM account_statements
                        WHERE account_id = a.id ORDER BY sequence DESC LIMIT 1)
           FROM unnest($1::text[]) AS a (id)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .filter_map(|(id, balance)| balance.map(|b| (id, b)))
    .collect();
    let mut refused = Vec::new();
    let mut rows = Entries::default();
    for (index, (event, decoded)) in events.iter().enumerate() {
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
            AccountEvent::TransferSettled { .. } => continue,
        };
        let previous = balances.get(&event.aggregate_id).copied();
        if previous.is_none() && entry_type != "opened" {
            refused.push((
                index,
                format!(
                    "{} for account {} before its opening",
                    event.event_type, event.aggregate_id
                ),
            ));
            continue;
        }
        let amount = decoded.balance_delta();
        let Some(balance_after) = previous.unwrap_or(0).checked_add(amount) else {
            refused.push((index, "running balance overflows".into()));
            continue;
        };
        balances.insert(event.aggregate_id.clone(), balance_after);
        rows.account_id.push(event.aggregate_id.as_str());
        rows.sequence.push(event.sequence);
        rows.global_position.push(event.global_position);
        rows.event_id.push(event.event_id);
        rows.entry_type.push(entry_type);
        rows.amount.push(amount);
        rows.balance_after.push(balance_after);
        rows.reference.push(reference);
        rows.transfer_id.push(decoded.transfer_id());
        rows.recorded_at.push(event.recorded_at);
    }
    if rows.account_id.is_empty() {
        return Ok(refused);
    }
    sqlx::query(
        "INSERT INTO account_statements
             (account_id, sequence, global_position, event_id, entry_type, amount,
              balance_after, reference, transfer_id, recorded_at)
         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::uuid[], $5::text[],
                              $6::int8[], $7::int8[], $8::text[], $9::uuid[], $10::timestamptz[])",
    )
    .bind(rows.account_id)
    .bind(rows.sequence)
    .bind(rows.global_position)
    .bind(rows.event_id)
    .bind(rows.entry_type)
    .bind(rows.amount)
    .bind(rows.balance_after)
    .bind(rows.reference)
    .bind(rows.transfer_id)
    .bind(rows.recorded_at)
    .execute(&mut *tx)
    .await?;
    Ok(refused)
}

/// The entries of a batch, column by column (as `unnest` takes them).
#[derive(Default)]
struct Entries<'a> {
    account_id: Vec<&'a str>,
    sequence: Vec<i64>,
    global_position: Vec<i64>,
    event_id: Vec<Uuid>,
    entry_type: Vec<&'static str>,
    amount: Vec<i64>,
    balance_after: Vec<i64>,
    reference: Vec<Option<String>>,
    transfer_id: Vec<Option<Uuid>>,
    recorded_at: Vec<DateTime<Utc>>,
}

/// Removes the statement of `account_id` (see [`crate::forget_aggregate`]).
pub async fn forget(tx: &mut PgConnection, account_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM account_statements WHERE account_id = $1")
        .bind(account_id)
        .execute(tx)
        .await?;
    Ok(())
}
