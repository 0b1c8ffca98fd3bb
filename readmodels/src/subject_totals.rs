//! `subject_totals`: per data subject and currency, accounts and money, across aggregates.
//! Keyed by the subject id, never by a name (issue 17).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One subject's totals in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SubjectTotal {
    /// The data subject.
    pub subject_id: Uuid,
    /// ISO 4217 code.
    pub currency: String,
    /// Accounts ever opened.
    pub accounts: i64,
    /// Accounts open now.
    pub open_accounts: i64,
    /// Sum of the balances, minor units. Wider than one account's balance: the column is
    /// `numeric`, as a subject's accounts together may hold more than a bigint can.
    pub balance: i128,
    /// Highest global position applied to this row.
    pub last_position: i64,
    /// The latest `recorded_at` among the events applied to the row: the greatest, not the
    /// last applied, so it does not depend on the order in which partitions are applied and
    /// a rebuild gives the same value as live apply (promise 5).
    pub updated_at: DateTime<Utc>,
}

/// A row of `subject_totals` as read: the `numeric` balance as text, which carries it exactly.
#[derive(sqlx::FromRow)]
struct TotalRow {
    subject_id: Uuid,
    currency: String,
    accounts: i64,
    open_accounts: i64,
    balance: String,
    last_position: i64,
    updated_at: DateTime<Utc>,
}

/// The totals of `subject_id`, one row per currency.
pub async fn for_subject(
    pool: &PgPool,
    subject_id: Uuid,
) -> Result<Vec<SubjectTotal>, sqlx::Error> {
    let rows: Vec<TotalRow> = sqlx::query_as(
        "SELECT subject_id, currency, accounts, open_accounts, balance::text AS balance,
                last_position, updated_at
           FROM subject_totals WHERE subject_id = $1 ORDER BY currency",
    )
    .bind(subject_id)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(SubjectTotal {
                balance: row
                    .balance
                    .parse()
                    .map_err(|err| sqlx::Error::ColumnDecode {
                        index: "balance".into(),
                        source: Box::new(err),
                    })?,
                subject_id: row.subject_id,
                currency: row.currency,
                accounts: row.accounts,
                open_accounts: row.open_accounts,
                last_position: row.last_position,
                updated_at: row.updated_at,
            })
        })
        .collect()
}

/// What `subject_total_accounts` remembers of one account.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Account {
    account_id: String,
    subject_id: Uuid,
    currency: String,
    balance: i64,
    open: bool,
}

/// The change a batch makes to one subject's totals in one currency.
#[derive(Debug, Clone, Default)]
struct Change {
    accounts: i64,
    open_accounts: i64,
    balance: i128,
    last_position: i64,
    updated_at: Option<DateTime<Utc>>,
}

/// Applies `events` (in order): the accounts concerned are read from `subject_total_accounts`
/// in one statement; balances, open flags and each subject's change are computed in memory;
/// then one statement writes the accounts and one the subjects' totals, in (subject,
/// currency) order, so two batches touching the same subjects lock their rows in the same order and
/// never deadlock. Returns the events refused (index in `events`, reason).
pub async fn apply_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, &AccountEvent)],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids = crate::distinct_ids(events.iter().map(|(event, _)| *event));
    let mut accounts: BTreeMap<String, Account> = sqlx::query_as::<_, Account>(
        "SELECT account_id, subject_id, currency, balance, open FROM subject_total_accounts
          WHERE account_id = ANY($1::text[])",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|account| (account.account_id.clone(), account))
    .collect();
    let mut touched = BTreeSet::new();
    let mut changes: BTreeMap<(Uuid, String), Change> = BTreeMap::new();
    let mut refused = Vec::new();
    for (index, (event, decoded)) in events.iter().enumerate() {
        let id = event.aggregate_id.as_str();
        let (key, opens, closes, delta) = match decoded {
            AccountEvent::AccountOpened {
                subject_id,
                currency,
                ..
            } => {
                if accounts.contains_key(id) {
                    refused.push((index, format!("account {id} opened twice")));
                    continue;
                }
                let account = Account {
                    account_id: id.to_owned(),
                    subject_id: *subject_id,
                    currency: currency.code().to_owned(),
                    balance: 0,
                    open: true,
                };
                let key = (account.subject_id, account.currency.clone());
                accounts.insert(id.to_owned(), account);
                (key, 1, 0, 0)
            }
            _ => {
                let Some(account) = accounts.get_mut(id) else {
                    refused.push((
                        index,
                        format!(
                            "{} for account {id}, which was never opened",
                            event.event_type
                        ),
                    ));
                    continue;
                };
                let delta = decoded.balance_delta();
                let Some(balance) = account.balance.checked_add(delta) else {
                    refused.push((
                        index,
                        format!(
                            "{} for account {id} takes its balance beyond what a bigint holds",
                            event.event_type
                        ),
                    ));
                    continue;
                };
                let closes = matches!(decoded, AccountEvent::AccountClosed {});
                account.balance = balance;
                account.open = account.open && !closes;
                (
                    (account.subject_id, account.currency.clone()),
                    0,
                    i64::from(closes),
                    delta,
                )
            }
        };
        touched.insert(id);
        let change = changes.entry(key).or_default();
        change.accounts += opens;
        change.open_accounts += opens - closes;
        change.balance += i128::from(delta);
        change.last_position = change.last_position.max(event.global_position);
        change.updated_at = change.updated_at.max(Some(event.recorded_at));
    }
    if touched.is_empty() {
        return Ok(refused);
    }
    let rows: Vec<&Account> = touched.iter().filter_map(|id| accounts.get(*id)).collect();
    sqlx::query(
        "INSERT INTO subject_total_accounts (account_id, subject_id, currency, balance, open)
         SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::int8[], $5::bool[])
         ON CONFLICT (account_id) DO UPDATE SET balance = EXCLUDED.balance, open = EXCLUDED.open",
    )
    .bind(
        rows.iter()
            .map(|a| a.account_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|a| a.subject_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|a| a.currency.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|a| a.balance).collect::<Vec<_>>())
    .bind(rows.iter().map(|a| a.open).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    // The balance goes as text: the column is `numeric` (the sum of many bigint balances
    // can exceed a bigint), and text carries any integer exactly.
    sqlx::query(
        "INSERT INTO subject_totals AS t
             (subject_id, currency, accounts, open_accounts, balance, last_position, updated_at)
         SELECT o, c, a, n, b::numeric, p, u
           FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::int8[],
                       $7::timestamptz[]) AS d (o, c, a, n, b, p, u)
          ORDER BY o, c
         ON CONFLICT (subject_id, currency) DO UPDATE
            SET accounts = t.accounts + EXCLUDED.accounts,
                open_accounts = t.open_accounts + EXCLUDED.open_accounts,
                balance = t.balance + EXCLUDED.balance,
                last_position = greatest(t.last_position, EXCLUDED.last_position),
                updated_at = greatest(t.updated_at, EXCLUDED.updated_at)",
    )
    .bind(changes.keys().map(|(s, _)| *s).collect::<Vec<_>>())
    .bind(changes.keys().map(|(_, c)| c.as_str()).collect::<Vec<_>>())
    .bind(changes.values().map(|c| c.accounts).collect::<Vec<_>>())
    .bind(
        changes
            .values()
            .map(|c| c.open_accounts)
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .values()
            .map(|c| c.balance.to_string())
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .values()
            .map(|c| c.last_position)
            .collect::<Vec<_>>(),
    )
    .bind(changes.values().map(|c| c.updated_at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(refused)
}

/// Takes `account_id` out of its subject's totals and forgets it (see
/// [`crate::forget_aggregate`]). A total left with no account is removed, as a rebuild would
/// not have it.
pub async fn forget(tx: &mut PgConnection, account_id: &str) -> Result<(), sqlx::Error> {
    let gone: Option<(Uuid, String)> = sqlx::query_as(
        "WITH gone AS (DELETE FROM subject_total_accounts WHERE account_id = $1
                       RETURNING subject_id, currency, balance, open)
         UPDATE subject_totals t
            SET accounts = t.accounts - 1,
                open_accounts = t.open_accounts - CASE WHEN g.open THEN 1 ELSE 0 END,
                balance = t.balance - g.balance
           FROM gone g
          WHERE t.subject_id = g.subject_id AND t.currency = g.currency
         RETURNING t.subject_id, t.currency",
    )
    .bind(account_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((subject_id, currency)) = gone {
        sqlx::query(
            "DELETE FROM subject_totals WHERE subject_id = $1 AND currency = $2 AND accounts = 0",
        )
        .bind(subject_id)
        .bind(currency)
        .execute(tx)
        .await?;
    }
    Ok(())
}
