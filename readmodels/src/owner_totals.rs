//! `owner_totals`: per owner and currency, accounts and money, across aggregates.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// One owner's totals in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OwnerTotal {
    /// The owner.
    pub owner: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Accounts ever opened.
    pub accounts: i64,
    /// Accounts open now.
    pub open_accounts: i64,
    /// Sum of the balances, minor units. Wider than one account's balance: the column is
    /// `numeric`, as an owner's accounts together may hold more than a bigint can.
    pub balance: i128,
    /// Highest global position applied to this row.
    pub last_position: i64,
    /// The latest `recorded_at` among the events applied to the row: the greatest, not the
    /// last applied, so it does not depend on the order in which partitions are applied and
    /// a rebuild gives the same value as live apply (promise 5).
    pub updated_at: DateTime<Utc>,
}

/// A row of `owner_totals` as read: the `numeric` balance as text, which carries it exactly.
#[derive(sqlx::FromRow)]
struct TotalRow {
    owner: String,
    currency: String,
    accounts: i64,
    open_accounts: i64,
    balance: String,
    last_position: i64,
    updated_at: DateTime<Utc>,
}

/// The totals of `owner`, one row per currency.
pub async fn for_owner(pool: &PgPool, owner: &str) -> Result<Vec<OwnerTotal>, sqlx::Error> {
    let rows: Vec<TotalRow> = sqlx::query_as(
        "SELECT owner, currency, accounts, open_accounts, balance::text AS balance,
                last_position, updated_at
           FROM owner_totals WHERE owner = $1 ORDER BY currency",
    )
    .bind(owner)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(OwnerTotal {
                balance: row
                    .balance
                    .parse()
                    .map_err(|err| sqlx::Error::ColumnDecode {
                        index: "balance".into(),
                        source: Box::new(err),
                    })?,
                owner: row.owner,
                currency: row.currency,
                accounts: row.accounts,
                open_accounts: row.open_accounts,
                last_position: row.last_position,
                updated_at: row.updated_at,
            })
        })
        .collect()
}

/// What `owner_total_accounts` remembers of one account.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Account {
    account_id: String,
    owner: String,
    currency: String,
    balance: i64,
    open: bool,
}

/// The change a batch makes to one owner's totals in one currency.
#[derive(Debug, Clone, Default)]
struct Change {
    accounts: i64,
    open_accounts: i64,
    balance: i128,
    last_position: i64,
    updated_at: Option<DateTime<Utc>>,
}

/// Applies `events` (in order): the accounts concerned are read from `owner_total_accounts`
/// in one statement; balances, open flags and each owner's change are computed in memory;
/// then one statement writes the accounts and one the owners' totals, in (owner, currency)
/// order, so two batches touching the same owners lock their rows in the same order and
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
        "SELECT account_id, owner, currency, balance, open FROM owner_total_accounts
          WHERE account_id = ANY($1::text[])",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|account| (account.account_id.clone(), account))
    .collect();
    let mut touched = BTreeSet::new();
    let mut changes: BTreeMap<(String, String), Change> = BTreeMap::new();
    let mut refused = Vec::new();
    for (index, (event, decoded)) in events.iter().enumerate() {
        let id = event.aggregate_id.as_str();
        let (key, opens, closes, delta) = match decoded {
            AccountEvent::AccountOpened { owner, currency } => {
                if accounts.contains_key(id) {
                    refused.push((index, format!("account {id} opened twice")));
                    continue;
                }
                let account = Account {
                    account_id: id.to_owned(),
                    owner: owner.clone(),
                    currency: currency.code().to_owned(),
                    balance: 0,
                    open: true,
                };
                let key = (account.owner.clone(), account.currency.clone());
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
                    (account.owner.clone(), account.currency.clone()),
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
        "INSERT INTO owner_total_accounts (account_id, owner, currency, balance, open)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[])
         ON CONFLICT (account_id) DO UPDATE SET balance = EXCLUDED.balance, open = EXCLUDED.open",
    )
    .bind(
        rows.iter()
            .map(|a| a.account_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|a| a.owner.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|a| a.currency.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|a| a.balance).collect::<Vec<_>>())
    .bind(rows.iter().map(|a| a.open).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    // The balance goes as text: the column is `numeric` (the sum of many bigint balances
    // can exceed a bigint), and text carries any integer exactly.
    sqlx::query(
        "INSERT INTO owner_totals AS t
             (owner, currency, accounts, open_accounts, balance, last_position, updated_at)
         SELECT o, c, a, n, b::numeric, p, u
           FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], $6::int8[],
                       $7::timestamptz[]) AS d (o, c, a, n, b, p, u)
          ORDER BY o, c
         ON CONFLICT (owner, currency) DO UPDATE
            SET accounts = t.accounts + EXCLUDED.accounts,
                open_accounts = t.open_accounts + EXCLUDED.open_accounts,
                balance = t.balance + EXCLUDED.balance,
                last_position = greatest(t.last_position, EXCLUDED.last_position),
                updated_at = greatest(t.updated_at, EXCLUDED.updated_at)",
    )
    .bind(changes.keys().map(|(o, _)| o.as_str()).collect::<Vec<_>>())
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

/// Takes `account_id` out of its owner's totals and forgets it (see
/// [`crate::forget_aggregate`]). A total left with no account is removed, as a rebuild would
/// not have it.
pub async fn forget(tx: &mut PgConnection, account_id: &str) -> Result<(), sqlx::Error> {
    let gone: Option<(String, String)> = sqlx::query_as(
        "WITH gone AS (DELETE FROM owner_total_accounts WHERE account_id = $1
                       RETURNING owner, currency, balance, open)
         UPDATE owner_totals t
            SET accounts = t.accounts - 1,
                open_accounts = t.open_accounts - CASE WHEN g.open THEN 1 ELSE 0 END,
                balance = t.balance - g.balance
           FROM gone g
          WHERE t.owner = g.owner AND t.currency = g.currency
         RETURNING t.owner, t.currency",
    )
    .bind(account_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((owner, currency)) = gone {
        sqlx::query("DELETE FROM owner_totals WHERE owner = $1 AND currency = $2 AND accounts = 0")
            .bind(owner)
            .bind(currency)
            .execute(tx)
            .await?;
    }
    Ok(())
}
