//! The key store: every statement on `subject_keys`, and a short-lived cache of unwrapped
//! keys in front of it.
//!
//! - [`KeyStore::create`] makes a subject's first data key and stores it wrapped by the
//!   current KEK; [`KeyStore::generate`] and [`KeyStore::store_in`] are the same in two
//!   steps, the second inside the caller's transaction (with the event the key seals).
//! - [`KeyStore::load`] / [`KeyStore::current`] read a subject's keys (all versions in one
//!   statement), unwrap them with whichever KEK each names, and cache them for
//!   [`CacheSettings::ttl`].
//! - [`KeyStore::erase`] deletes the wrapped bytes of every version in one statement, keeps
//!   the rows as a tombstone, notifies [`ERASURE_CHANNEL`] in the same transaction and
//!   replaces the subject's cache entry by the tombstone. Idempotent. [`KeyStore::erase_in`]
//!   runs the same statements in the caller's transaction (with the erasure event).
//! - [`KeyStore::rewrap_all`] moves every live key under the current KEK, batch by batch
//!   (one transaction each, rows locked), and reports what it did: the core of the KEK
//!   rotation command.
//! - [`KeyStore::encrypt`] / [`KeyStore::decrypt`] are field encryption with the key looked
//!   up here.
//! - [`KeyStore::verify_keyring`] is the start-up check: one live key per KEK id unwraps.
//!
//! **Cache and erasure.** An erasure by this process can never be undone by a load that was
//! reading the row at the same time: loads insert into the cache only if no erasure
//! happened in this process since they started reading (a generation counter, checked and
//! updated under one lock with the cache change). An erasure by *another* process reaches
//! this cache when the entry expires (the TTL), or sooner when the caller listens on
//! [`ERASURE_CHANNEL`] and calls [`KeyStore::forget`]. An erased subject's tombstone is
//! cached too: erasure is for ever, so that entry can never be wrong.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::data_key::{DataKey, SubjectKey, UnwrapError, WrappedKey};
use crate::field::{Ciphertext, FieldError};
use crate::keyring::{KekId, Keyring};

/// The `NOTIFY` channel an erasure is announced on; the payload is the subject id.
pub const ERASURE_CHANNEL: &str = "pii_subject_erased";

/// How long unwrapped keys stay in memory, and how many subjects at most.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Time to live of an entry from its load. Also the longest an erasure by another
    /// process can go unseen by this one when nobody calls [`KeyStore::forget`].
    pub ttl: Duration,
    /// Most subjects held.
    pub max_subjects: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            max_subjects: 100_000,
        }
    }
}

/// What the cache holds for a subject.
#[derive(Debug)]
enum Cached {
    /// Every version, oldest first.
    Live(Vec<SubjectKey>),
    /// Erased at this time: nothing to decrypt with, ever again.
    Erased(DateTime<Utc>),
}

/// One row of `subject_keys` as a load reads it.
#[derive(sqlx::FromRow)]
struct KeyRow {
    key_version: i32,
    kek_id: String,
    wrapped_key: Option<Vec<u8>>,
    erased_at: Option<DateTime<Utc>>,
}

/// The answer of [`KeyStore::erase`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erasure {
    /// The keys were destroyed by this call.
    ErasedNow {
        /// When.
        at: DateTime<Utc>,
    },
    /// They had been destroyed before (the time of that erasure).
    AlreadyErased {
        /// When.
        at: DateTime<Utc>,
    },
}

impl Erasure {
    /// When the subject's keys were destroyed.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::ErasedNow { at } | Self::AlreadyErased { at } => *at,
        }
    }
}

/// What [`KeyStore::rewrap_all`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewrapReport {
    /// Live keys moved under the current KEK by this run.
    pub rewrapped: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Keys that could not be unwrapped (their KEK is not configured, or does not
    /// authenticate them); left as they are.
    pub failed: Vec<RewrapFailure>,
    /// After the run: live keys per KEK id. Once only the current KEK is listed, the
    /// previous ones may be removed from `PII_KEK_PREVIOUS`.
    pub live_by_kek: BTreeMap<String, u64>,
}

/// A key [`KeyStore::rewrap_all`] could not move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapFailure {
    /// Its subject.
    pub subject: Uuid,
    /// Its version.
    pub version: u32,
    /// Why.
    pub error: UnwrapError,
}

/// A key-store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No key was ever created for this subject.
    #[error("unknown data subject {subject}")]
    UnknownSubject {
        /// The subject.
        subject: Uuid,
    },
    /// The subject exists but has no key of this version.
    #[error("data subject {subject} has no key version {version}")]
    UnknownKeyVersion {
        /// The subject.
        subject: Uuid,
        /// The version asked for.
        version: u32,
    },
    /// The subject's keys were destroyed.
    #[error("the keys of data subject {subject} were erased at {erased_at}")]
    Erased {
        /// The subject.
        subject: Uuid,
        /// When.
        erased_at: DateTime<Utc>,
    },
    /// [`KeyStore::create`] for a subject that already has a key (or had one).
    #[error("data subject {subject} already has a key")]
    AlreadyExists {
        /// The subject.
        subject: Uuid,
    },
    /// A stored key could not be unwrapped with the configured KEKs.
    #[error("the key version {version} of data subject {subject} cannot be unwrapped")]
    Unwrap {
        /// The subject.
        subject: Uuid,
        /// The version.
        version: u32,
        /// Why.
        #[source]
        source: UnwrapError,
    },
    /// PostgreSQL failed.
    #[error("key store database error")]
    Database(#[from] sqlx::Error),
}

/// Why [`KeyStore::decrypt`] gave no plaintext. Callers (the projector) turn every variant
/// but [`DecryptError::KeyErased`] into a dead letter with this reason; an erased key means
/// "show the erased marker". Messages never contain ciphertext or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    /// The text is not a valid ciphertext, names another version than it was sealed with,
    /// or fails authentication.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The subject's keys were erased: the field is gone for good.
    #[error("the keys of data subject {subject} were erased at {erased_at}")]
    KeyErased {
        /// The subject.
        subject: Uuid,
        /// When.
        erased_at: DateTime<Utc>,
    },
    /// The text names a key version the subject does not have.
    #[error("data subject {subject} has no key version {version}")]
    UnknownKeyVersion {
        /// The subject.
        subject: Uuid,
        /// The version the text names.
        version: u32,
    },
    /// No key was ever created for this subject.
    #[error("unknown data subject {subject}")]
    UnknownSubject {
        /// The subject.
        subject: Uuid,
    },
    /// The key could not be read (database) or unwrapped (KEK configuration).
    #[error("the data key is unavailable")]
    KeyUnavailable(#[source] StoreError),
}

impl From<StoreError> for DecryptError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Erased { subject, erased_at } => Self::KeyErased { subject, erased_at },
            StoreError::UnknownKeyVersion { subject, version } => {
                Self::UnknownKeyVersion { subject, version }
            }
            StoreError::UnknownSubject { subject } => Self::UnknownSubject { subject },
            other => Self::KeyUnavailable(other),
        }
    }
}

/// The data-key store on PostgreSQL with its cache. Clone it freely: clones share the
/// pool, the keyring and the cache.
#[derive(Clone)]
pub struct KeyStore {
    pool: PgPool,
    keyring: Arc<Keyring>,
    cache: moka::sync::Cache<Uuid, Arc<Cached>>,
    /// Erasures seen by this process; see the module doc.
    erasures: Arc<Mutex<u64>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("keyring", &self.keyring)
            .field("cached_subjects", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// A store over `pool` (migrated: `subject_keys` exists) with this keyring and cache.
    pub fn new(pool: PgPool, keyring: Keyring, cache: CacheSettings) -> Self {
        Self {
            pool,
            keyring: Arc::new(keyring),
            cache: moka::sync::Cache::builder()
                .max_capacity(cache.max_subjects)
                .time_to_live(cache.ttl)
                .build(),
            erasures: Arc::new(Mutex::new(0)),
        }
    }

    /// The keyring in use.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Creates the subject's first data key (version 1), stored wrapped by the current KEK.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when the subject has (or had: erased) a key;
    /// [`StoreError::Database`].
    #[tracing::instrument(skip_all, fields(subject = %subject))]
    pub async fn create(&self, subject: Uuid) -> Result<SubjectKey, StoreError> {
        let key = Self::generate(subject);
        let mut conn = self.pool.acquire().await?;
        self.store_in(&mut conn, &key).await?;
        Ok(key)
    }

    /// A new first data key (version 1) for `subject`, from the operating system's
    /// randomness, not stored yet: encrypt the subject's first fields with it, then store
    /// it with [`KeyStore::store_in`] in the transaction that writes them.
    pub fn generate(subject: Uuid) -> SubjectKey {
        SubjectKey::new(subject, 1, DataKey::generate())
    }

    /// Stores `key` wrapped by the current KEK, on the caller's connection (inside its
    /// transaction: the key is stored together with the event whose fields it sealed, or
    /// not at all). The cache is left alone; the key is read back on first use.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when the subject already has (or had) a key of that
    /// version; [`StoreError::Database`].
    pub async fn store_in(
        &self,
        conn: &mut sqlx::PgConnection,
        key: &SubjectKey,
    ) -> Result<(), StoreError> {
        let subject = key.subject();
        let wrapped = key.wrap(&self.keyring);
        let inserted = sqlx::query(
            "INSERT INTO subject_keys (subject_id, key_version, kek_id, wrapped_key)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (subject_id, key_version) DO NOTHING",
        )
        .bind(subject)
        .bind(i32::try_from(key.version()).unwrap_or(i32::MAX))
        .bind(wrapped.kek_id.as_str())
        .bind(&wrapped.bytes)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::AlreadyExists { subject });
        }
        Ok(())
    }

    /// The subject's key of this version.
    ///
    /// # Errors
    /// [`StoreError::UnknownSubject`], [`StoreError::Erased`],
    /// [`StoreError::UnknownKeyVersion`], [`StoreError::Unwrap`], [`StoreError::Database`].
    pub async fn load(&self, subject: Uuid, version: u32) -> Result<SubjectKey, StoreError> {
        let keys = self.keys(subject).await?;
        keys.iter()
            .find(|k| k.version() == version)
            .cloned()
            .ok_or(StoreError::UnknownKeyVersion { subject, version })
    }

    /// The subject's newest key: the one new fields are encrypted with.
    ///
    /// # Errors
    /// As [`KeyStore::load`].
    pub async fn current(&self, subject: Uuid) -> Result<SubjectKey, StoreError> {
        let keys = self.keys(subject).await?;
        keys.last()
            .cloned()
            .ok_or(StoreError::UnknownSubject { subject })
    }

    /// Encrypts one field of one event with the subject's current key.
    ///
    /// # Errors
    /// As [`KeyStore::current`].
    pub async fn encrypt(
        &self,
        subject: Uuid,
        event_id: Uuid,
        field: &str,
        plaintext: &str,
    ) -> Result<String, StoreError> {
        Ok(self
            .current(subject)
            .await?
            .encrypt(event_id, field, plaintext))
    }

    /// Decrypts one field of one event with the key version its text names.
    ///
    /// # Errors
    /// [`DecryptError`]: [`DecryptError::KeyErased`] when the subject was erased (show
    /// [`crate::ERASED_MARKER`]); every other variant is a defect of the data or the
    /// configuration.
    pub async fn decrypt(
        &self,
        subject: Uuid,
        event_id: Uuid,
        field: &str,
        text: &str,
    ) -> Result<String, DecryptError> {
        let ciphertext = Ciphertext::parse(text)?;
        let key = self.load(subject, ciphertext.key_version()).await?;
        Ok(key.decrypt_parsed(event_id, field, &ciphertext)?)
    }

    /// Every version of the subject's key, from the cache or from one statement.
    async fn keys(&self, subject: Uuid) -> Result<Vec<SubjectKey>, StoreError> {
        if let Some(cached) = self.cache.get(&subject) {
            return match &*cached {
                Cached::Live(keys) => Ok(keys.clone()),
                Cached::Erased(at) => Err(StoreError::Erased {
                    subject,
                    erased_at: *at,
                }),
            };
        }
        let generation = *self.erasures.lock().unwrap_or_else(PoisonError::into_inner);
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT key_version, kek_id, wrapped_key, erased_at
               FROM subject_keys WHERE subject_id = $1 ORDER BY key_version",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Err(StoreError::UnknownSubject { subject });
        }
        let entry = match rows.iter().filter_map(|r| r.erased_at).max() {
            Some(erased_at) => Cached::Erased(erased_at),
            None => {
                let mut keys = Vec::with_capacity(rows.len());
                for row in rows {
                    let version = u32::try_from(row.key_version).unwrap_or_default();
                    let unwrap_error = |source| StoreError::Unwrap {
                        subject,
                        version,
                        source,
                    };
                    let wrapped = WrappedKey {
                        kek_id: KekId::new(&row.kek_id)
                            .ok_or_else(|| unwrap_error(UnwrapError::Malformed))?,
                        bytes: row.wrapped_key.unwrap_or_default(),
                    };
                    keys.push(
                        SubjectKey::unwrap(&self.keyring, subject, version, &wrapped)
                            .map_err(unwrap_error)?,
                    );
                }
                Cached::Live(keys)
            }
        };
        let entry = Arc::new(entry);
        {
            let erasures = self.erasures.lock().unwrap_or_else(PoisonError::into_inner);
            // An erasure in this process since the read may have erased what was read:
            // answer this load (it began before the erasure ended) but cache nothing.
            if *erasures == generation {
                self.cache.insert(subject, Arc::clone(&entry));
            }
        }
        match &*entry {
            Cached::Live(keys) => Ok(keys.clone()),
            Cached::Erased(at) => Err(StoreError::Erased {
                subject,
                erased_at: *at,
            }),
        }
    }

    /// Destroys every version of the subject's key (the wrapped bytes are deleted; the rows
    /// stay as a tombstone) and announces it on [`ERASURE_CHANNEL`], in a transaction of its
    /// own. Erasing again answers [`Erasure::AlreadyErased`] with the first erasure's time.
    ///
    /// # Errors
    /// [`StoreError::UnknownSubject`] when no key was ever created for it;
    /// [`StoreError::Database`].
    #[tracing::instrument(skip_all, fields(subject = %subject))]
    pub async fn erase(&self, subject: Uuid) -> Result<Erasure, StoreError> {
        let mut tx = self.pool.begin().await?;
        let answer = Self::erase_in(&mut tx, subject).await?;
        tx.commit().await?;
        self.forget_as_erased(subject, answer.at());
        Ok(answer)
    }

    /// [`KeyStore::erase`]'s statements inside the caller's transaction, so that the keys
    /// are destroyed together with whatever else it writes (the erasure event) or not at
    /// all. It leaves the cache alone: call [`KeyStore::forget`] once the transaction has
    /// committed (a rollback then leaves nothing to undo).
    ///
    /// # Errors
    /// As [`KeyStore::erase`].
    pub async fn erase_in(
        conn: &mut sqlx::PgConnection,
        subject: Uuid,
    ) -> Result<Erasure, StoreError> {
        let erased: Option<DateTime<Utc>> = sqlx::query_scalar(
            "WITH erased AS (
                 UPDATE subject_keys SET wrapped_key = NULL, erased_at = now()
                  WHERE subject_id = $1 AND erased_at IS NULL
                  RETURNING erased_at)
             SELECT max(erased_at) FROM erased",
        )
        .bind(subject)
        .fetch_one(&mut *conn)
        .await?;
        if let Some(at) = erased {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(ERASURE_CHANNEL)
                .bind(subject.to_string())
                .execute(&mut *conn)
                .await?;
            tracing::info!(subject = %subject, "data subject's keys erased");
            return Ok(Erasure::ErasedNow { at });
        }
        // Nothing live: erased before, or never known. In READ COMMITTED this statement's
        // snapshot sees an erasure that committed while the update above waited for its lock.
        let before: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(erased_at) FROM subject_keys WHERE subject_id = $1")
                .bind(subject)
                .fetch_one(&mut *conn)
                .await?;
        match before {
            Some(at) => Ok(Erasure::AlreadyErased { at }),
            None => Err(StoreError::UnknownSubject { subject }),
        }
    }

    /// Drops whatever this process caches for the subject: call it on a notification on
    /// [`ERASURE_CHANNEL`] (an erasure by another process).
    pub fn forget(&self, subject: Uuid) {
        let mut erasures = self.erasures.lock().unwrap_or_else(PoisonError::into_inner);
        *erasures += 1;
        self.cache.invalidate(&subject);
    }

    fn forget_as_erased(&self, subject: Uuid, at: DateTime<Utc>) {
        let mut erasures = self.erasures.lock().unwrap_or_else(PoisonError::into_inner);
        *erasures += 1;
        self.cache.insert(subject, Arc::new(Cached::Erased(at)));
    }

    /// The start-up check: unwraps one live key per KEK id found in `subject_keys`, so that
    /// a KEK missing from the configuration, or wrong key material under a known id, refuses
    /// to start instead of failing every decryption later. Returns the KEK ids checked.
    ///
    /// # Errors
    /// [`StoreError::Unwrap`] (its source names the KEK id and the settings);
    /// [`StoreError::Database`].
    pub async fn verify_keyring(&self) -> Result<Vec<KekId>, StoreError> {
        let rows: Vec<(Uuid, i32, String, Vec<u8>)> = sqlx::query_as(
            "SELECT DISTINCT ON (kek_id) subject_id, key_version, kek_id, wrapped_key
               FROM subject_keys WHERE erased_at IS NULL
              ORDER BY kek_id, subject_id, key_version",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut checked = Vec::with_capacity(rows.len());
        for (subject, version, kek_id, bytes) in rows {
            let version = u32::try_from(version).unwrap_or_default();
            let unwrap_error = |source| StoreError::Unwrap {
                subject,
                version,
                source,
            };
            let kek_id = KekId::new(&kek_id).ok_or_else(|| unwrap_error(UnwrapError::Malformed))?;
            SubjectKey::unwrap(
                &self.keyring,
                subject,
                version,
                &WrappedKey {
                    kek_id: kek_id.clone(),
                    bytes,
                },
            )
            .map_err(unwrap_error)?;
            checked.push(kek_id);
        }
        Ok(checked)
    }

    /// Rewraps every live key that is not under the current KEK with the current KEK,
    /// `batch_size` keys per transaction (the rows locked, so an erasure or another
    /// rewrap waits), walking the keys in primary-key order once. Keys it cannot unwrap are
    /// reported and left as they are. Running it again rewraps nothing more.
    ///
    /// # Errors
    /// [`StoreError::Database`]; batches committed before stay committed (a rerun goes on).
    #[tracing::instrument(skip_all, fields(kek = %self.keyring.current().id()))]
    pub async fn rewrap_all(&self, batch_size: u32) -> Result<RewrapReport, StoreError> {
        let current = self.keyring.current().id().as_str().to_owned();
        let limit = i64::from(batch_size.max(1));
        let mut report = RewrapReport::default();
        let mut after = (Uuid::nil(), 0_i32);
        loop {
            let mut tx = self.pool.begin().await?;
            let rows: Vec<(Uuid, i32, String, Vec<u8>)> = sqlx::query_as(
                "SELECT subject_id, key_version, kek_id, wrapped_key FROM subject_keys
                  WHERE erased_at IS NULL AND kek_id <> $1
                    AND (subject_id, key_version) > ($2, $3)
                  ORDER BY subject_id, key_version
                  LIMIT $4
                  FOR UPDATE",
            )
            .bind(&current)
            .bind(after.0)
            .bind(after.1)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let Some(last) = rows.last() else { break };
            after = (last.0, last.1);
            let (mut subjects, mut versions, mut wrapped_keys) = (vec![], vec![], vec![]);
            for (subject, version, kek_id, bytes) in rows {
                let v = u32::try_from(version).unwrap_or_default();
                let unwrapped =
                    KekId::new(&kek_id)
                        .ok_or(UnwrapError::Malformed)
                        .and_then(|kek_id| {
                            SubjectKey::unwrap(
                                &self.keyring,
                                subject,
                                v,
                                &WrappedKey { kek_id, bytes },
                            )
                        });
                match unwrapped {
                    Ok(key) => {
                        subjects.push(subject);
                        versions.push(version);
                        wrapped_keys.push(key.wrap(&self.keyring).bytes);
                    }
                    Err(error) => {
                        tracing::warn!(subject = %subject, version, %error, "data key not rewrapped");
                        report.failed.push(RewrapFailure {
                            subject,
                            version: v,
                            error,
                        });
                    }
                }
            }
            let moved = sqlx::query(
                "UPDATE subject_keys k
                    SET kek_id = $1, wrapped_key = u.wrapped_key, rewrapped_at = now()
                   FROM unnest($2::uuid[], $3::int[], $4::bytea[]) AS u(subject_id, key_version, wrapped_key)
                  WHERE k.subject_id = u.subject_id AND k.key_version = u.key_version
                    AND k.erased_at IS NULL",
            )
            .bind(&current)
            .bind(&subjects)
            .bind(&versions)
            .bind(&wrapped_keys)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            report.rewrapped += moved;
            report.batches += 1;
            tracing::info!(rewrapped = report.rewrapped, "rewrap batch committed");
        }
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kek_id, count(*) FROM subject_keys WHERE erased_at IS NULL GROUP BY kek_id",
        )
        .fetch_all(&self.pool)
        .await?;
        report.live_by_kek = counts
            .into_iter()
            .map(|(id, n)| (id, u64::try_from(n).unwrap_or_default()))
            .collect();
        Ok(report)
    }
}
