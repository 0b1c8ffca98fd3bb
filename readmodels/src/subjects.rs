//! `subjects`: one row per data subject, with the name in clear (decrypted by the projector)
//! or [`ERASED_MARKER`] once the subject is erased. The only read-model row that holds a
//! subject's name: summaries, totals and exports join it, so an erasure rewrites one row.
//!
//! Also here: the **erasure lock** that keeps a statement reference decrypted just before
//! an erasure from outliving it ([`lock_for_references`], [`lock_for_erasure`]); see
//! [`crate::statements`] for the argument.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ledger_events::{AccountEvent, LedgerEvent, RecordedEvent, SubjectEvent};
use ledger_pii::ERASED_MARKER;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// One data subject as the query API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Subject {
    /// The subject's id (server-chosen; for a legacy owner the UUID v5 of the name).
    pub subject_id: Uuid,
    /// The name, or `[erased]` once the subject is erased.
    pub name: String,
    /// Known only from the `owner` of accounts opened before subjects existed: no key, so
    /// it cannot be erased by destroying one.
    pub legacy: bool,
    /// When the subject was registered (legacy: its earliest account opening). Null only
    /// while its erasure has been projected before its registration.
    pub registered_at: Option<DateTime<Utc>>,
    /// When the subject was erased, if it was.
    pub erased_at: Option<DateTime<Utc>>,
    /// Highest global position applied to the row.
    pub last_position: i64,
    /// The latest `recorded_at` among the events applied to the row.
    pub updated_at: DateTime<Utc>,
}

/// The subject `subject_id`, if projected.
pub async fn find(pool: &PgPool, subject_id: Uuid) -> Result<Option<Subject>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subject_id, name, legacy, registered_at, erased_at, last_position, updated_at
           FROM subjects WHERE subject_id = $1",
    )
    .bind(subject_id)
    .fetch_optional(pool)
    .await
}

/// The events of a batch the `subjects` projection reads, with the text each shows.
#[derive(Debug, Clone, Copy)]
pub enum SubjectChange<'a> {
    /// `SubjectRegistered`, with the decrypted name (or the marker: key erased).
    Registered { name: &'a str },
    /// `SubjectErased`.
    Erased,
    /// A v1 `AccountOpened`: the legacy subject of its clear `owner`.
    LegacyOpening { subject_id: Uuid, owner: &'a str },
    /// Any other account event: nothing to do.
    Nothing,
}

impl<'a> SubjectChange<'a> {
    /// What `decoded` means for `subjects`; `name` is the shown text of a registration.
    pub fn of(decoded: &'a LedgerEvent, name: Option<&'a str>) -> Result<Self, String> {
        match decoded {
            LedgerEvent::Subject(SubjectEvent::SubjectRegistered { .. }) => name
                .map(|name| Self::Registered { name })
                .ok_or_else(|| "SubjectRegistered without a readable name".to_owned()),
            LedgerEvent::Subject(SubjectEvent::SubjectErased {}) => Ok(Self::Erased),
            LedgerEvent::Account(AccountEvent::AccountOpened {
                subject_id,
                legacy_owner: Some(owner),
                ..
            }) => Ok(Self::LegacyOpening {
                subject_id: *subject_id,
                owner,
            }),
            LedgerEvent::Account(_) => Ok(Self::Nothing),
            LedgerEvent::Transfer(_) => {
                Err("projection `subjects` does not take transfer events".into())
            }
        }
    }
}

/// A row as a batch changes it, merged as the upsert merges it with the stored row.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    legacy: bool,
    registered_at: Option<DateTime<Utc>>,
    erased_at: Option<DateTime<Utc>>,
    last_position: i64,
    updated_at: DateTime<Utc>,
}

impl Row {
    /// Merges a later change in: the same rules as the upsert, all independent of the order
    /// in which two partitions' events arrive (rebuild equals live): the first name stays
    /// unless erased, the earliest registration and erasure, the greatest position and time.
    fn merge(&mut self, other: Row) {
        self.erased_at = earliest(self.erased_at, other.erased_at);
        if self.erased_at.is_some() {
            ERASED_MARKER.clone_into(&mut self.name);
        }
        self.registered_at = earliest(self.registered_at, other.registered_at);
        self.last_position = self.last_position.max(other.last_position);
        self.updated_at = self.updated_at.max(other.updated_at);
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Applies `events` (in order): the rows change in memory and are written in one upsert
/// statement, then the accounts of the subjects whose name changed are notified (one more
/// statement), so the query API's cache and ETags follow the name (and its erasure).
/// Returns the events refused (index in `events`, reason).
pub async fn apply_batch(
    tx: &mut PgConnection,
    events: &[(&RecordedEvent, SubjectChange<'_>)],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let mut rows: BTreeMap<Uuid, Row> = BTreeMap::new();
    let mut renamed: Vec<Uuid> = Vec::new();
    let mut refused = Vec::new();
    for (index, (event, change)) in events.iter().enumerate() {
        let subject_of_event = || {
            event.aggregate_id.parse::<Uuid>().map_err(|_| {
                format!(
                    "{} for subject `{}`, which is not a UUID",
                    event.event_type, event.aggregate_id
                )
            })
        };
        let base = |name: &str, legacy: bool| Row {
            name: name.to_owned(),
            legacy,
            registered_at: None,
            erased_at: None,
            last_position: event.global_position,
            updated_at: event.recorded_at,
        };
        let (subject, row) = match *change {
            SubjectChange::Nothing => continue,
            SubjectChange::Registered { name } => match subject_of_event() {
                Ok(subject) => (
                    subject,
                    Row {
                        registered_at: Some(event.recorded_at),
                        ..base(name, false)
                    },
                ),
                Err(reason) => {
                    refused.push((index, reason));
                    continue;
                }
            },
            SubjectChange::Erased => match subject_of_event() {
                Ok(subject) => (
                    subject,
                    Row {
                        erased_at: Some(event.recorded_at),
                        ..base(ERASED_MARKER, false)
                    },
                ),
                Err(reason) => {
                    refused.push((index, reason));
                    continue;
                }
            },
            SubjectChange::LegacyOpening { subject_id, owner } => (
                subject_id,
                Row {
                    registered_at: Some(event.recorded_at),
                    ..base(owner, true)
                },
            ),
        };
        if !matches!(change, SubjectChange::LegacyOpening { .. }) {
            renamed.push(subject);
        }
        match rows.get_mut(&subject) {
            Some(existing) => existing.merge(row),
            None => {
                rows.insert(subject, row);
            }
        }
    }
    if rows.is_empty() {
        return Ok(refused);
    }
    sqlx::query(
        "INSERT INTO subjects AS s
             (subject_id, name, legacy, registered_at, erased_at, last_position, updated_at)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[],
                              $5::timestamptz[], $6::int8[], $7::timestamptz[])
         ON CONFLICT (subject_id) DO UPDATE
            SET erased_at = least(s.erased_at, EXCLUDED.erased_at),
                name = CASE WHEN coalesce(s.erased_at, EXCLUDED.erased_at) IS NULL THEN s.name
                            ELSE $8 END,
                registered_at = least(s.registered_at, EXCLUDED.registered_at),
                last_position = greatest(s.last_position, EXCLUDED.last_position),
                updated_at = greatest(s.updated_at, EXCLUDED.updated_at)",
    )
    .bind(rows.keys().copied().collect::<Vec<_>>())
    .bind(rows.values().map(|r| r.name.as_str()).collect::<Vec<_>>())
    .bind(rows.values().map(|r| r.legacy).collect::<Vec<_>>())
    .bind(rows.values().map(|r| r.registered_at).collect::<Vec<_>>())
    .bind(rows.values().map(|r| r.erased_at).collect::<Vec<_>>())
    .bind(rows.values().map(|r| r.last_position).collect::<Vec<_>>())
    .bind(rows.values().map(|r| r.updated_at).collect::<Vec<_>>())
    .bind(ERASED_MARKER)
    .execute(&mut *tx)
    .await?;
    if !renamed.is_empty() {
        // The summaries answer the name: their accounts change with it.
        sqlx::query(
            "SELECT pg_notify($1, account_id)
               FROM account_summaries WHERE subject_id = ANY($2::uuid[])",
        )
        .bind(crate::CHANGES_CHANNEL)
        .bind(&renamed)
        .execute(&mut *tx)
        .await?;
    }
    Ok(refused)
}

/// Removes the row of subject `aggregate_id` (see [`crate::forget_aggregate`]); a legacy
/// subject's row belongs to its accounts' openings and stays.
pub async fn forget(tx: &mut PgConnection, aggregate_id: &str) -> Result<(), sqlx::Error> {
    let Ok(subject) = aggregate_id.parse::<Uuid>() else {
        return Ok(());
    };
    sqlx::query("DELETE FROM subjects WHERE subject_id = $1 AND NOT legacy")
        .bind(subject)
        .execute(tx)
        .await?;
    Ok(())
}

/// The advisory-lock class of the erasure lock (the first key of the two-key form).
const ERASURE_LOCK_CLASS: i32 = 0x5049_4931; // "PII1"

/// Takes the erasure lock of each of `subjects` in SHARED mode (the writer of statement
/// references), in one statement and in a fixed order, then answers which of them are
/// erased (their keys destroyed, `subject_keys`). Held until the transaction ends.
pub async fn lock_for_references(
    tx: &mut PgConnection,
    subjects: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let sorted = lock_subjects(tx, subjects, "pg_advisory_xact_lock_shared").await?;
    // A statement of its own: in READ COMMITTED it sees every erasure committed before the
    // lock was granted.
    sqlx::query_scalar(
        "SELECT DISTINCT subject_id FROM subject_keys
          WHERE subject_id = ANY($1::uuid[]) AND erased_at IS NOT NULL",
    )
    .bind(&sorted)
    .fetch_all(&mut *tx)
    .await
}

/// Takes the erasure lock of each of `subjects` in EXCLUSIVE mode (the projection of an
/// erasure), in one statement and in the same order as [`lock_for_references`].
pub async fn lock_for_erasure(tx: &mut PgConnection, subjects: &[Uuid]) -> Result<(), sqlx::Error> {
    if !subjects.is_empty() {
        lock_subjects(tx, subjects, "pg_advisory_xact_lock").await?;
    }
    Ok(())
}

/// Takes the erasure lock of each of `subjects` with `function` (shared or exclusive), in
/// one statement, in subject order, so two transactions never wait on each other in a
/// cycle. Returns the subjects, sorted and without repeats.
async fn lock_subjects(
    tx: &mut PgConnection,
    subjects: &[Uuid],
    function: &'static str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut sorted = subjects.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sqlx::query(&format!(
        "SELECT {function}($1, hashtext(s::text))
           FROM unnest($2::uuid[]) WITH ORDINALITY AS u (s, n) ORDER BY n"
    ))
    .bind(ERASURE_LOCK_CLASS)
    .bind(&sorted)
    .execute(&mut *tx)
    .await?;
    Ok(sorted)
}
