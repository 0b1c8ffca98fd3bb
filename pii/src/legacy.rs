//! Moving personal data written in clear before data subjects existed into subjects and
//! ciphertext: the operator command `ledger-admin pii migrate-legacy` (ADR 0019).
//!
//! Before subjects, an account's opening named its holder in clear (`AccountOpened` v1
//! `owner`) and references were stored in clear (v2). Such data cannot be forgotten by
//! destroying a key. Today's code reads a v1 opening as the *legacy subject* of its owner
//! name (`ledger_events::subject::legacy_subject_id`, a UUID v5 of the name), so every
//! account of one name already shares one subject id. This migration makes that subject
//! real, one owner name per transaction:
//!
//! 1. appends `SubjectRegistered` for the legacy subject id with the name encrypted under a
//!    new data key (or the subject's existing key when a previous run created it),
//! 2. stores the wrapped key,
//! 3. rewrites each v1 opening of that name in place to v2 `{subject_id, currency}`,
//! 4. encrypts each reference in clear of those accounts in place (v3, the event's own id
//!    bound, `data_subject` added to its metadata),
//! 5. deletes the accounts' snapshots (older ones hold the name), replaces `owner` by
//!    `subject_id` in the answers stored for idempotency keys, and rewrites the raw value of
//!    dead letters of the rewritten events.
//!
//! Event ids, sequences, positions and amounts do not change; subject ids do not change
//! either (the legacy id is kept), so nothing that refers to them breaks. What it cannot
//! reach: Kafka messages published before (they age out with the topic's retention, or the
//! topic is recreated and republished) and backups. The read models hold the legacy names
//! until they are rebuilt (`ledger-admin rebuild all`) — the `SubjectRegistered` events it
//! appends are projected live, the rewritten rows only by a rebuild.
//!
//! A subject erased meanwhile (its key destroyed) gets no name: its openings are rewritten
//! without one and its references replaced by [`crate::ERASED_MARKER`]. Running it again
//! finds nothing left to do; running it while the ledger serves is safe (a v1 opening is
//! never written by today's code; the rows it rewrites are locked).

use ledger_events::subject::{fields, legacy_subject_id, SUBJECT_AGGREGATE_TYPE};
use ledger_events::SubjectEvent;
use ledger_store::legacy;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::data_key::SubjectKey;
use crate::store::{KeyStore, StoreError};
use crate::ERASED_MARKER;

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LegacyReport {
    /// Owner names moved into subjects.
    pub subjects: u64,
    /// Of those, subjects that had been erased meanwhile (no name written).
    pub erased_subjects: u64,
    /// `AccountOpened` events rewritten to v2.
    pub openings: u64,
    /// References encrypted (or, for an erased subject, replaced by the marker).
    pub references: u64,
    /// Snapshots deleted.
    pub snapshots: u64,
    /// Stored idempotency answers scrubbed of the name.
    pub answers: u64,
    /// Dead letters whose raw value was rewritten.
    pub dead_letters: u64,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    /// Reading or writing failed; the owner being migrated was rolled back.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A subject's key could not be loaded (e.g. a KEK missing from the keyring).
    #[error(transparent)]
    Key(#[from] StoreError),
}

/// Migrates every legacy owner name, `batch` names per look-up, one transaction per name.
///
/// # Errors
/// [`LegacyError`]; what was migrated before stays migrated (run it again to go on).
pub async fn migrate(
    pool: &PgPool,
    keys: &KeyStore,
    batch: i64,
) -> Result<LegacyReport, LegacyError> {
    let mut report = LegacyReport::default();
    loop {
        let owners = {
            let mut conn = pool.acquire().await?;
            legacy::legacy_owners(&mut conn, batch.max(1)).await?
        };
        if owners.is_empty() {
            return Ok(report);
        }
        for owner in owners {
            let mut tx = pool.begin().await?;
            migrate_owner(&mut tx, keys, &owner, &mut report).await?;
            tx.commit().await?;
            keys.forget(legacy_subject_id(&owner));
        }
    }
}

/// The key to encrypt a legacy subject's fields with: its live key, a new one (to be
/// stored), or none when it was erased.
enum Key {
    Existing(SubjectKey),
    New(SubjectKey),
    Erased,
}

async fn migrate_owner(
    conn: &mut PgConnection,
    keys: &KeyStore,
    owner: &str,
    report: &mut LegacyReport,
) -> Result<(), LegacyError> {
    let subject = legacy_subject_id(owner);
    let key = match keys.current(subject).await {
        Ok(key) => Key::Existing(key),
        Err(StoreError::UnknownSubject { .. }) => Key::New(KeyStore::generate(subject)),
        Err(StoreError::Erased { .. }) => Key::Erased,
        Err(other) => return Err(other.into()),
    };

    // First write of the transaction: the append (ADR 0017). A subject registered by an
    // earlier run keeps its event (ON CONFLICT DO NOTHING).
    if let Key::Existing(key) | Key::New(key) = &key {
        let event_id = Uuid::now_v7();
        let registered = SubjectEvent::SubjectRegistered {
            name: key.encrypt(event_id, fields::NAME, owner),
        };
        legacy::append_one(
            conn,
            event_id,
            SUBJECT_AGGREGATE_TYPE,
            &subject.to_string(),
            1,
            SubjectEvent::REGISTERED,
            "1",
            &serde_json::to_value(&registered).unwrap_or(Value::Null),
        )
        .await?;
    } else {
        // Erased, so registered before (only a subject with a key can be erased): nothing
        // to append, and no name to write.
        report.erased_subjects += 1;
    }
    if let Key::New(key) = &key {
        keys.store_in(conn, key).await?;
    }
    report.subjects += 1;

    let openings = legacy::openings_of(conn, owner).await?;
    let accounts: Vec<String> = openings.iter().map(|o| o.aggregate_id.clone()).collect();
    for opening in &openings {
        let payload = json!({
            "type": "AccountOpened",
            "subject_id": subject,
            "currency": opening.currency,
        });
        legacy::rewrite(conn, opening.event_id, "2", &payload, &json!({})).await?;
        report.dead_letters += legacy::scrub_dead_letters(conn, opening.event_id, &payload).await?;
        report.openings += 1;
    }
    for event in legacy::plain_references(conn, &accounts).await? {
        let mut payload = event.payload.clone();
        let plain = payload["reference"].as_str().unwrap_or_default().to_owned();
        payload["reference"] = Value::String(match &key {
            Key::Existing(key) | Key::New(key) => {
                key.encrypt(event.event_id, fields::REFERENCE, &plain)
            }
            Key::Erased => ERASED_MARKER.to_owned(),
        });
        let mut metadata = event.metadata.clone();
        if let Value::Object(map) = &mut metadata {
            map.insert("data_subject".into(), Value::String(subject.to_string()));
        }
        legacy::rewrite(conn, event.event_id, "3", &payload, &metadata).await?;
        report.dead_letters += legacy::scrub_dead_letters(conn, event.event_id, &payload).await?;
        report.references += 1;
    }
    report.snapshots += legacy::drop_snapshots(conn, &accounts).await?;
    report.answers += legacy::scrub_answers(conn, &accounts, subject).await?;
    tracing::info!(subject = %subject, accounts = accounts.len(), "legacy owner moved into a subject");
    Ok(())
}
