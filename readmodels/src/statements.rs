//! `account_statements`: one row per entry with the running balance, read in pages.
//!
//! Pages are keyed by sequence (`after`), so a client walking the statement while new
//! entries are appended sees every entry exactly once: appends only add higher sequences.
//!
//! # References and erasure (issue 17)
//!
//! A v3 reference is ciphertext; the projector decrypts it before the batch's SQL and hands
//! the text to show (the plaintext, or [`ERASED_MARKER`] when the subject's key is erased).
//! Such an entry keeps its subject in `data_subject`. A plain (v2) reference is shown as is.
//! A subject's erasure ([`apply_subject_batch`]) writes the marker into every reference of
//! the subject.
//!
//! **The race.** An account event may be decrypted with a key cached just before the
//! subject's erasure and be applied by one partition worker while another applies the
//! `SubjectErased` (subject and account events travel on different partitions). Both take
//! the subject's erasure lock ([`crate::subjects::lock_for_references`] SHARED before
//! writing references, [`crate::subjects::lock_for_erasure`] EXCLUSIVE before rewriting
//! them), held to the end of their transactions:
//! - reference writer first: the erasure waits for its commit; its `UPDATE`, a statement
//!   begun after the lock was granted, sees (READ COMMITTED) the committed rows and writes
//!   the marker into them;
//! - erasure first: the writer waits for its commit, then (in a statement begun after the
//!   lock) reads `subject_keys`, where the key was destroyed in the very transaction that
//!   appended `SubjectErased`, so it finds the subject erased and writes the marker.
//!
//! A writer that takes the lock after the key's destruction but before the erasure event
//! is projected also finds the key destroyed. Either way no plaintext stays behind.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent, SubjectEvent};
use ledger_pii::ERASED_MARKER;
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
    /// The payment reference, if any (for a refund: why the destination refused);
    /// `[erased]` once the account's subject is erased.
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
/// balance after it) and appended in one statement. `shown` holds, by event id, the text
/// to show for each encrypted reference (decrypted, or the marker). Returns the events
/// refused (index in `events`, reason); a refused event appends nothing.
pub async fn apply_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, &AccountEvent)],
    shown: &HashMap<Uuid, String>,
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
            AccountEvent::MoneyDeposited { reference, .. } => ("deposit", reference.as_deref()),
            AccountEvent::MoneyWithdrawn { reference, .. } => ("withdrawal", reference.as_deref()),
            AccountEvent::AccountClosed {} => ("closed", None),
            AccountEvent::TransferSent { .. } => ("transfer_sent", None),
            AccountEvent::TransferReceived { .. } => ("transfer_received", None),
            AccountEvent::TransferRefunded { reason, .. } => {
                ("transfer_refunded", Some(reason.as_str()))
            }
            // Moves no money: not a statement entry.
            AccountEvent::TransferSettled { .. } => continue,
        };
        let (reference, data_subject) = match reference {
            Some(text) if ledger_pii::is_encrypted(text) => {
                let subject = event
                    .metadata
                    .data_subject
                    .as_deref()
                    .and_then(|s| s.parse::<Uuid>().ok());
                match (shown.get(&event.event_id), subject) {
                    (Some(shown), Some(subject)) => (Some(shown.clone()), Some(subject)),
                    _ => {
                        refused.push((
                            index,
                            format!(
                                "{} {}: its encrypted reference was not decrypted (no data subject)",
                                event.event_type, event.event_id
                            ),
                        ));
                        continue;
                    }
                }
            }
            other => (other.map(str::to_owned), None),
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
        rows.data_subject.push(data_subject);
        rows.transfer_id.push(decoded.transfer_id());
        rows.recorded_at.push(event.recorded_at);
    }
    if rows.account_id.is_empty() {
        return Ok(refused);
    }
    // The erasure lock (see the module documentation): no reference of an erased subject
    // is written in clear, whatever key the projector decrypted it with.
    let subjects: Vec<Uuid> = rows.data_subject.iter().flatten().copied().collect();
    let erased = crate::subjects::lock_for_references(tx, &subjects).await?;
    if !erased.is_empty() {
        for (reference, subject) in rows.reference.iter_mut().zip(&rows.data_subject) {
            if subject.is_some_and(|s| erased.contains(&s)) {
                *reference = Some(ERASED_MARKER.to_owned());
            }
        }
    }
    sqlx::query(
        "INSERT INTO account_statements
             (account_id, sequence, global_position, event_id, entry_type, amount,
              balance_after, reference, transfer_id, recorded_at, data_subject)
         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::uuid[], $5::text[],
                              $6::int8[], $7::int8[], $8::text[], $9::uuid[], $10::timestamptz[],
                              $11::uuid[])",
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
    .bind(rows.data_subject)
    .execute(&mut *tx)
    .await?;
    Ok(refused)
}

/// Applies subject events to the statements: a `SubjectErased` writes [`ERASED_MARKER`]
/// into every reference the subject's key sealed (one statement for the batch, under the
/// subjects' erasure locks; see the module documentation) and notifies the accounts
/// changed. Other subject events change nothing. Refuses nothing but a subject id that is
/// not a UUID.
pub async fn apply_subject_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, &SubjectEvent)],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let mut erased = Vec::new();
    let mut refused = Vec::new();
    for (index, (event, decoded)) in events.iter().enumerate() {
        if !matches!(decoded, SubjectEvent::SubjectErased {}) {
            continue;
        }
        match event.aggregate_id.parse::<Uuid>() {
            Ok(subject) => erased.push(subject),
            Err(_) => refused.push((
                index,
                format!(
                    "{} for subject `{}`, which is not a UUID",
                    event.event_type, event.aggregate_id
                ),
            )),
        }
    }
    if erased.is_empty() {
        return Ok(refused);
    }
    crate::subjects::lock_for_erasure(tx, &erased).await?;
    sqlx::query(
        "WITH changed AS (
             UPDATE account_statements SET reference = $1
              WHERE data_subject = ANY($2::uuid[]) AND reference IS DISTINCT FROM $1
              RETURNING account_id)
         SELECT pg_notify($3, account_id) FROM (SELECT DISTINCT account_id FROM changed) c",
    )
    .bind(ERASED_MARKER)
    .bind(&erased)
    .bind(crate::CHANGES_CHANNEL)
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
    data_subject: Vec<Option<Uuid>>,
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
