//! Data subjects on the write side (ADR 0019): the people accounts belong to.
//!
//! - [`Subjects::register`]: a server-chosen subject id, a new data key, the name sealed
//!   under it (bound to the event's id, chosen here), and `SubjectRegistered` appended at
//!   sequence 1 with the wrapped key stored, in **one** transaction. The append is that
//!   transaction's first write (the `events_append_first` trigger, ADR 0017).
//! - [`Subjects::erase`]: `SubjectErased` appended at sequence 2, then the keys destroyed
//!   (`KeyStore::erase_in`), in one transaction; after the commit this process forgets the
//!   key, and the notification on `ERASURE_CHANNEL` tells the others. Erasing again (or
//!   racing another erasure) answers the first erasure.
//! - [`Subjects::holder`] / [`Subjects::seal_reference`]: the subject of an account (an
//!   account's subject never changes, so it is cached, bounded) and a reference sealed
//!   under that subject's current key, bound to an event id chosen here for the writer to
//!   store the event under.
//!
//! Subject writes are rare, so they do not go through the group-commit writer: each is a
//! transaction of its own, its statements on `events` in `ledger_store` and on
//! `subject_keys` in `ledger_pii`. Nothing here logs a name or a reference.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use ledger_events::subject::fields;
use ledger_events::{
    AccountEvent, Metadata, SubjectEvent, ACCOUNT_AGGREGATE_TYPE, SUBJECT_AGGREGATE_TYPE,
};
use ledger_pii::{Erasure, KeyStore, SubjectKey};
use ledger_store::aggregates::{self, Batch, NewEvent};
use sqlx::PgPool;
use uuid::Uuid;

use crate::idempotency::{self, ClientKey};

/// A subject just registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// Its id (UUID v7, chosen by the server).
    pub subject_id: Uuid,
    /// Global position of its `SubjectRegistered`.
    pub position: i64,
}

/// A subject's erasure: the same answer however often it is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// The subject.
    pub subject_id: Uuid,
    /// When its keys were destroyed (the first erasure).
    pub erased_at: DateTime<Utc>,
    /// Global position of its `SubjectErased`.
    pub position: i64,
}

/// A reference sealed for a deposit or withdrawal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedReference {
    /// The id the event must be stored under (the ciphertext is bound to it).
    pub event_id: Uuid,
    /// The account's subject, whose key sealed it (the event's `data_subject`).
    pub subject_id: Uuid,
    /// `pii1.…`.
    pub ciphertext: String,
}

/// Why a subject operation was not carried out. Messages name ids only, never a name or a
/// reference.
#[derive(Debug, thiserror::Error)]
pub enum SubjectError {
    /// No subject with this id was registered (a legacy subject, known only by the name in
    /// old `AccountOpened` events, has no key and is not one either).
    #[error("no data subject {subject} is registered")]
    NotFound {
        /// The id asked for.
        subject: Uuid,
    },
    /// The subject was erased: no personal data can be recorded for it any more.
    #[error("data subject {subject} was erased at {erased_at}")]
    Erased {
        /// The subject.
        subject: Uuid,
        /// When.
        erased_at: DateTime<Utc>,
    },
    /// The account belongs to a legacy subject (no key yet): its references cannot be
    /// encrypted until the subject is migrated.
    #[error("data subject {subject} has no key yet (a legacy owner not yet migrated)")]
    NotMigrated {
        /// The subject.
        subject: Uuid,
    },
    /// The account does not exist.
    #[error("no account with this id exists")]
    AccountNotFound,
    /// The request's idempotency key was claimed by a concurrent request first.
    #[error("the idempotency key was claimed by a concurrent request")]
    KeyTaken,
    /// The connection was lost while committing: the write may or may not be in.
    #[error("the outcome of the commit is unknown")]
    OutcomeUnknown(#[source] sqlx::Error),
    /// The key store failed (database, or a key the configured KEKs cannot unwrap).
    #[error("the key store failed")]
    Keys(#[source] ledger_pii::StoreError),
    /// The event store failed.
    #[error("the event store failed")]
    Store(#[source] sqlx::Error),
    /// Stored data that cannot be read, or a defect.
    #[error("{0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for SubjectError {
    fn from(err: sqlx::Error) -> Self {
        Self::Store(err)
    }
}

/// The write side's view of data subjects. Clone it freely (clones share the caches).
#[derive(Clone)]
pub struct Subjects {
    pool: PgPool,
    keys: KeyStore,
    /// Account → its subject. An account's subject never changes, so an entry is never
    /// stale; bounded, and only accounts that exist are cached.
    holders: moka::sync::Cache<Uuid, Uuid>,
}

impl std::fmt::Debug for Subjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subjects")
            .field("keys", &self.keys)
            .field("cached_holders", &self.holders.entry_count())
            .finish_non_exhaustive()
    }
}

impl Subjects {
    /// Subjects over `pool` with the key store `keys`, caching at most `holders_capacity`
    /// account holders.
    pub fn new(pool: PgPool, keys: KeyStore, holders_capacity: u64) -> Self {
        Self {
            pool,
            keys,
            holders: moka::sync::Cache::new(holders_capacity.max(1)),
        }
    }

    /// The key store (the erasure listener calls `forget` on it).
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Registers a new subject named `name`: see the module doc. `metadata` is copied onto
    /// the event (its idempotency key, if any, is claimed by it).
    ///
    /// # Errors
    /// [`SubjectError::KeyTaken`], [`SubjectError::OutcomeUnknown`], store failures.
    #[tracing::instrument(skip_all)]
    pub async fn register(
        &self,
        name: &str,
        metadata: Metadata,
    ) -> Result<Registered, SubjectError> {
        let subject_id = Uuid::now_v7();
        let event_id = Uuid::now_v7();
        let key = KeyStore::generate(subject_id);
        let event = SubjectEvent::SubjectRegistered {
            name: key.encrypt(event_id, fields::NAME, name),
        };
        let batch = one_event(subject_id, 1, &event, event_id, metadata.clone())?;
        let mut tx = self.pool.begin().await?;
        let positions = match aggregates::append_in(&mut tx, SUBJECT_AGGREGATE_TYPE, &batch).await {
            Ok(positions) => positions,
            Err(err) => return Err(self.append_failed(err, &metadata).await),
        };
        self.keys
            .store_in(&mut tx, &key)
            .await
            .map_err(SubjectError::Keys)?;
        tx.commit().await.map_err(SubjectError::OutcomeUnknown)?;
        tracing::info!(subject = %subject_id, "data subject registered");
        Ok(Registered {
            subject_id,
            position: position_of(&positions, subject_id, 1)?,
        })
    }

    /// Erases the subject: see the module doc.
    ///
    /// # Errors
    /// [`SubjectError::NotFound`] (never registered: unknown, or a legacy subject),
    /// [`SubjectError::KeyTaken`], [`SubjectError::OutcomeUnknown`], store failures.
    #[tracing::instrument(skip_all, fields(subject = %subject_id))]
    pub async fn erase(
        &self,
        subject_id: Uuid,
        metadata: Metadata,
    ) -> Result<Erased, SubjectError> {
        let id = subject_id.to_string();
        let events = aggregates::events_through(&self.pool, SUBJECT_AGGREGATE_TYPE, &id, 2).await?;
        match events.len() {
            0 => {
                return Err(SubjectError::NotFound {
                    subject: subject_id,
                })
            }
            1 => {}
            _ => return self.erased_before(subject_id).await,
        }
        let event = SubjectEvent::SubjectErased {};
        let batch = one_event(
            subject_id,
            2,
            &event,
            NewEvent::fresh_id(),
            metadata.clone(),
        )?;
        let mut tx = self.pool.begin().await?;
        let positions = match aggregates::append_in(&mut tx, SUBJECT_AGGREGATE_TYPE, &batch).await {
            Ok(positions) => positions,
            Err(err) => {
                drop(tx);
                return match self.append_failed(err, &metadata).await {
                    // Sequence 2 is taken: another erasure won the race; its answer stands.
                    SubjectError::Store(err) if is_unique_violation(&err) => {
                        self.erased_before(subject_id).await
                    }
                    other => Err(other),
                };
            }
        };
        let erasure = KeyStore::erase_in(&mut tx, subject_id)
            .await
            .map_err(|err| match err {
                ledger_pii::StoreError::UnknownSubject { .. } => SubjectError::Corrupt(format!(
                    "data subject {subject_id} is registered but has no key row"
                )),
                other => SubjectError::Keys(other),
            })?;
        tx.commit().await.map_err(SubjectError::OutcomeUnknown)?;
        self.keys.forget(subject_id);
        tracing::info!(subject = %subject_id, "data subject erased");
        Ok(Erased {
            subject_id,
            erased_at: erasure.at(),
            position: position_of(&positions, subject_id, 2)?,
        })
    }

    /// The answer of an erasure committed before: its event's position and the time the
    /// keys were destroyed (read by running the erasure statement again, which erases
    /// nothing more and answers the first time).
    pub async fn erased_before(&self, subject_id: Uuid) -> Result<Erased, SubjectError> {
        let id = subject_id.to_string();
        let events = aggregates::events_through(&self.pool, SUBJECT_AGGREGATE_TYPE, &id, 2).await?;
        let erasure_event = events
            .iter()
            .find(|e| e.sequence == 2)
            .ok_or_else(|| SubjectError::Corrupt(format!("no erasure event of {subject_id}")))?;
        let mut conn = self.pool.acquire().await?;
        let erasure = KeyStore::erase_in(&mut conn, subject_id)
            .await
            .map_err(SubjectError::Keys)?;
        if matches!(erasure, Erasure::ErasedNow { .. }) {
            // Keys left live beside an erasure event cannot come from this code (one
            // transaction); they are destroyed now, as the event says they are.
            tracing::warn!(subject = %subject_id, "live keys found beside an erasure event were destroyed");
        }
        self.keys.forget(subject_id);
        Ok(Erased {
            subject_id,
            erased_at: erasure.at(),
            position: erasure_event.global_position,
        })
    }

    /// Checks that `subject_id` may hold a new account: registered and not erased (read
    /// through the key cache; a race with an erasure is harmless, an account holds no
    /// personal data).
    ///
    /// # Errors
    /// [`SubjectError::NotFound`], [`SubjectError::Erased`], key-store failures.
    pub async fn check_holder(&self, subject_id: Uuid) -> Result<(), SubjectError> {
        self.current_key(subject_id).await.map(|_| ())
    }

    /// The subject holding `account_id`, from the cache or its `AccountOpened`.
    ///
    /// # Errors
    /// [`SubjectError::AccountNotFound`], store failures, [`SubjectError::Corrupt`].
    pub async fn holder(&self, account_id: Uuid) -> Result<Uuid, SubjectError> {
        if let Some(subject) = self.holders.get(&account_id) {
            return Ok(subject);
        }
        let events = aggregates::events_through(
            &self.pool,
            ACCOUNT_AGGREGATE_TYPE,
            &account_id.to_string(),
            1,
        )
        .await?;
        let Some(first) = events.first() else {
            return Err(SubjectError::AccountNotFound);
        };
        match first.decode_account() {
            Ok(AccountEvent::AccountOpened { subject_id, .. }) => {
                self.holders.insert(account_id, subject_id);
                Ok(subject_id)
            }
            Ok(other) => Err(SubjectError::Corrupt(format!(
                "the first event of account {account_id} is {}",
                other.event_type()
            ))),
            Err(err) => Err(SubjectError::Corrupt(format!(
                "the first event of account {account_id}: {err}"
            ))),
        }
    }

    /// Seals `reference` for a deposit or withdrawal on `account_id`: under the current key
    /// of the account's subject, bound to a new event id and the field `reference`.
    ///
    /// # Errors
    /// [`SubjectError::AccountNotFound`], [`SubjectError::Erased`],
    /// [`SubjectError::NotMigrated`] (a legacy subject: no key), store failures.
    pub async fn seal_reference(
        &self,
        account_id: Uuid,
        reference: &str,
    ) -> Result<SealedReference, SubjectError> {
        let subject_id = self.holder(account_id).await?;
        let key = self
            .current_key(subject_id)
            .await
            .map_err(|err| match err {
                SubjectError::NotFound { subject } => SubjectError::NotMigrated { subject },
                other => other,
            })?;
        let event_id = Uuid::now_v7();
        Ok(SealedReference {
            event_id,
            subject_id,
            ciphertext: key.encrypt(event_id, fields::REFERENCE, reference),
        })
    }

    async fn current_key(&self, subject_id: Uuid) -> Result<SubjectKey, SubjectError> {
        self.keys
            .current(subject_id)
            .await
            .map_err(|err| match err {
                ledger_pii::StoreError::UnknownSubject { subject } => {
                    SubjectError::NotFound { subject }
                }
                ledger_pii::StoreError::Erased { subject, erased_at } => {
                    SubjectError::Erased { subject, erased_at }
                }
                other => SubjectError::Keys(other),
            })
    }

    /// What a failed append means: the request's idempotency key taken by another request,
    /// or the store's error as it is.
    async fn append_failed(&self, err: sqlx::Error, metadata: &Metadata) -> SubjectError {
        if is_unique_violation(&err) {
            if let Some(key) = ClientKey::of(metadata) {
                if let Ok(true) = idempotency::is_claimed(&self.pool, &key).await {
                    return SubjectError::KeyTaken;
                }
            }
        }
        SubjectError::Store(err)
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.is_unique_violation())
}

/// A batch of one subject event, its metadata stamped like the writer's.
fn one_event(
    subject_id: Uuid,
    sequence: i64,
    event: &SubjectEvent,
    event_id: Uuid,
    mut metadata: Metadata,
) -> Result<Batch, SubjectError> {
    let command_id = Uuid::now_v7().to_string();
    metadata
        .causation_id
        .get_or_insert_with(|| command_id.clone());
    metadata.command_id = Some(command_id.clone());
    let metadata = serde_json::to_string(&metadata.to_map())
        .map_err(|err| SubjectError::Corrupt(format!("metadata: {err}")))?;
    let mut batch = Batch::default();
    batch.push_event(NewEvent {
        event_id,
        aggregate_id: subject_id.to_string(),
        sequence,
        event_type: event.event_type(),
        event_version: event.event_version(),
        payload: serde_json::to_string(event)
            .map_err(|err| SubjectError::Corrupt(format!("event: {err}")))?,
        metadata,
        command_id,
    });
    Ok(batch)
}

fn position_of(
    positions: &aggregates::Positions,
    subject_id: Uuid,
    sequence: i64,
) -> Result<i64, SubjectError> {
    positions
        .get(&(subject_id.to_string(), sequence))
        .copied()
        .ok_or_else(|| {
            SubjectError::Corrupt(format!("event {sequence} of {subject_id} not appended"))
        })
}
