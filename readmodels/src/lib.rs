//! The read models: every SQL statement on their tables, shared by the projector (which
//! writes) and the query API (which reads), so neither copies the other's SQL.
//!
//! # Layout
//!
//! - [`summaries`]: `account_summaries`, one row per account.
//! - [`statements`]: `account_statements`, one row per entry with the running balance, read
//!   in cursor-paginated pages.
//! - [`subject_totals`]: `subject_totals` (and its helper `subject_total_accounts`): money
//!   and accounts per data subject and currency, across aggregates.
//! - [`subjects`]: `subjects`, one row per data subject with the decrypted name, or
//!   [`ledger_pii::ERASED_MARKER`] once erased: the ONE row that holds a subject's name.
//! - [`export`]: everything the read models hold about one subject, as one document.
//! - [`transfers`]: `transfers`, one row per transfer with its state.
//! - [`guards`]: `projection_guards`, the per-projection, per-aggregate last sequence that
//!   makes duplicates and re-deliveries harmless.
//! - [`progress`]: `projection_checkpoints` and `projection_partitions`: positions, cursor,
//!   per-partition offsets.
//! - [`dead_letters`]: `dead_letters`, events a projection could not handle.
//!
//! Every `apply_batch` takes the projector's open transaction and a batch of events: it reads
//! the rows concerned in one statement, folds the events into them in memory, and writes
//! each table in one statement (`unnest` arrays), so a batch costs a fixed number of
//! statements whatever its size. A read-model change, its guard and its checkpoint commit
//! together or not at all.

pub mod dead_letters;
pub mod export;
pub mod guards;
pub mod progress;
pub mod statements;
pub mod subject_totals;
pub mod subjects;
pub mod summaries;
pub mod transfers;

/// The channel the projector notifies (payload: account id) when it commits read-model
/// changes; the query API listens to invalidate its cache and wake waiting reads.
pub const CHANGES_CHANNEL: &str = "ledger_read_models";

/// The names of the projections, as stored in guards, checkpoints and dead letters.
pub mod names {
    /// `account_summaries`.
    pub const ACCOUNT_SUMMARY: &str = "account_summary";
    /// `account_statements`.
    pub const ACCOUNT_STATEMENT: &str = "account_statement";
    /// `subject_totals` (was `owner_totals`, keyed by the name, before subjects).
    pub const SUBJECT_TOTALS: &str = "subject_totals";
    /// `transfers`.
    pub const TRANSFERS: &str = "transfers";
    /// `subjects`.
    pub const SUBJECTS: &str = "subjects";
    /// All of them, in the order the projector applies them.
    pub const ALL: [&str; 5] = [
        ACCOUNT_SUMMARY,
        ACCOUNT_STATEMENT,
        SUBJECT_TOTALS,
        TRANSFERS,
        SUBJECTS,
    ];

    /// Whether `projection` is fed events of `aggregate_type`. Events of an aggregate type
    /// no projection knows go to every projection, which refuses them (dead letters).
    ///
    /// `subjects` takes account events too (a v1 opening names a legacy subject), and
    /// `account_statement` takes subject events (an erasure rewrites references).
    pub fn handles(projection: &str, aggregate_type: &str) -> bool {
        use ledger_events::{
            ACCOUNT_AGGREGATE_TYPE, SUBJECT_AGGREGATE_TYPE, TRANSFER_AGGREGATE_TYPE,
        };
        match aggregate_type {
            ACCOUNT_AGGREGATE_TYPE => projection != TRANSFERS,
            TRANSFER_AGGREGATE_TYPE => projection == TRANSFERS,
            SUBJECT_AGGREGATE_TYPE => projection == SUBJECTS || projection == ACCOUNT_STATEMENT,
            _ => true,
        }
    }

    /// The tables a projection owns (what a rebuild builds anew and swaps in).
    pub fn tables(projection: &str) -> Option<&'static [&'static str]> {
        match projection {
            ACCOUNT_SUMMARY => Some(&["account_summaries"]),
            ACCOUNT_STATEMENT => Some(&["account_statements"]),
            SUBJECT_TOTALS => Some(&["subject_totals", "subject_total_accounts"]),
            TRANSFERS => Some(&["transfers"]),
            SUBJECTS => Some(&["subjects"]),
            _ => None,
        }
    }

    /// The primary-key columns of a read-model table (how a dry run pairs rows).
    pub fn primary_key(table: &str) -> &'static [&'static str] {
        match table {
            "account_statements" => &["account_id", "sequence"],
            "subject_totals" => &["subject_id", "currency"],
            "transfers" => &["transfer_id"],
            "subjects" => &["subject_id"],
            _ => &["account_id"],
        }
    }

    /// The version of each projection's code. Bump it when a change needs the read model
    /// rebuilt; the projector then says so at start.
    pub fn version(projection: &str) -> i32 {
        match projection {
            TRANSFERS | SUBJECTS => 1,
            // 2: transfer legs, with their transfer id. (Issue 17 decrypts references, but
            // every reference written before it is plain text and stays as it was.)
            // 2: the subject id instead of the owner's name (issue 17).
            ACCOUNT_SUMMARY | ACCOUNT_STATEMENT => 2,
            // 3: keyed by subject id (was `owner_totals` v2, by name).
            SUBJECT_TOTALS => 3,
            _ => 0,
        }
    }
}

/// Removes what `projection` holds of `aggregate_id` (its rows, and for `subject_totals` its
/// share of its subject's totals), so the aggregate can be projected again from its whole
/// history: how a dead letter is retried (ADR 0014). The caller holds the aggregate's guard.
pub async fn forget_aggregate(
    tx: &mut sqlx::PgConnection,
    projection: &str,
    aggregate_id: &str,
) -> Result<(), sqlx::Error> {
    match projection {
        names::ACCOUNT_SUMMARY => summaries::forget(tx, aggregate_id).await,
        names::ACCOUNT_STATEMENT => statements::forget(tx, aggregate_id).await,
        names::SUBJECT_TOTALS => subject_totals::forget(tx, aggregate_id).await,
        names::TRANSFERS => transfers::forget(tx, aggregate_id).await,
        names::SUBJECTS => subjects::forget(tx, aggregate_id).await,
        _ => Ok(()),
    }
}

/// Why a projection refused an event (it goes to the dead letters; the projector carries on).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event cannot apply to the model's state (e.g. money for an account never opened).
    #[error("{0}")]
    Refused(String),
    /// The database failed: the whole batch is retried.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The distinct aggregate ids of `events`, sorted: what a batch reads its rows by.
pub fn distinct_ids<'a>(
    events: impl IntoIterator<Item = &'a ledger_events::RecordedEvent>,
) -> Vec<&'a str> {
    let ids: std::collections::BTreeSet<&str> = events
        .into_iter()
        .map(|event| event.aggregate_id.as_str())
        .collect();
    ids.into_iter().collect()
}

/// Folds each of `events` (in order) with `fold`: returns the aggregates a fold changed and
/// the events refused (index in `events`, reason). Shared by the projections whose rows are
/// one per aggregate.
pub fn fold_events<'a, D>(
    events: &[(&'a ledger_events::RecordedEvent, &D)],
    mut fold: impl FnMut(&ledger_events::RecordedEvent, &D) -> Result<(), String>,
) -> (std::collections::BTreeSet<&'a str>, Vec<(usize, String)>) {
    let mut changed = std::collections::BTreeSet::new();
    let mut refused = Vec::new();
    for (index, (event, decoded)) in events.iter().enumerate() {
        match fold(event, decoded) {
            Ok(()) => {
                changed.insert(event.aggregate_id.as_str());
            }
            Err(reason) => refused.push((index, reason)),
        }
    }
    (changed, refused)
}

/// Sends the change notification for each of `account_ids` (delivered when `tx` commits),
/// in one statement.
pub async fn notify_changes(
    tx: &mut sqlx::PgConnection,
    account_ids: &[&str],
) -> Result<(), sqlx::Error> {
    if account_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, a) FROM unnest($2::text[]) AS a")
        .bind(CHANGES_CHANNEL)
        .bind(account_ids)
        .execute(tx)
        .await?;
    Ok(())
}

/// Sends the change notification for `account_id` (delivered when `tx` commits).
pub async fn notify_change(
    tx: &mut sqlx::PgConnection,
    account_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES_CHANNEL)
        .bind(account_id)
        .execute(tx)
        .await?;
    Ok(())
}
