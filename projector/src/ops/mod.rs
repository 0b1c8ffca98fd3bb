//! What operators do, shared by the `ledger-admin` CLI and the admin HTTP API.
//!
//! - [`rebuild`]: build a projection afresh from the event store in shadow tables (its own
//!   schema), resumable, then swap it in atomically — or, as a dry run, report how it
//!   differs from the live model.
//! - [`replay`]: re-apply a range of positions to the live model through the guards.
//! - [`republish`]: send events from the store to Kafka again.
//! - [`dead_letters`]: list, show, retry, skip — every action audited.
//! - [`overview`]: each projection's position, lag, state, version and dead letters.

pub mod dead_letters;
pub mod overview;
pub mod rebuild;
pub mod replay;
pub mod republish;

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No projection of that name.
    #[error("unknown projection `{0}` (known: account_summary, account_statement, subject_totals, transfers, subjects)")]
    UnknownProjection(String),
    /// A rebuild of this projection is running elsewhere.
    #[error("a rebuild of `{0}` is already running")]
    AlreadyRunning(String),
    /// No such dead letter.
    #[error("no dead letter {0}")]
    NoSuchDeadLetter(i64),
    /// The request makes no sense (e.g. an empty range).
    #[error("{0}")]
    Invalid(String),
    /// A transfer step could not be taken now (the database, a lost race): try again.
    #[error("not now: {0}")]
    Unavailable(String),
    /// Kafka failed.
    #[error("Kafka: {0}")]
    Kafka(String),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// `PII_KEK` / `PII_KEK_PREVIOUS` are missing or malformed.
    #[error(transparent)]
    Keyring(#[from] ledger_pii::KeyringError),
    /// The data-key store failed (e.g. a stored key the configured KEKs do not open).
    #[error("data keys: {0}")]
    Keys(#[from] ledger_pii::StoreError),
}

/// Checks a projection name.
pub fn known(projection: &str) -> Result<&'static [&'static str], OpError> {
    ledger_readmodels::names::tables(projection)
        .ok_or_else(|| OpError::UnknownProjection(projection.to_owned()))
}
