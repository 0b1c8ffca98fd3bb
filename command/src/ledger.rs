//! The command service: load the account, let it decide, append the events; on a version
//! conflict, retry a bounded number of times with jittered backoff (promise 2: one writer
//! wins, the loser retries on fresh state or is answered 409).

use std::time::Duration;

use cqrs_es::{AggregateError, EventStore};
use ledger_events::{Metadata, ACCOUNT_AGGREGATE_TYPE};
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{Account, AccountCommand, AccountError};
use crate::idempotency;
use crate::store::{self, AccountStore};
use ledger_store::positions;

/// One command with its metadata.
#[derive(Debug, Clone)]
pub struct Intent {
    /// The account the command is for.
    pub account_id: Uuid,
    /// What to do.
    pub command: AccountCommand,
    /// Request/correlation ids and idempotency key, copied onto every event.
    pub metadata: Metadata,
}

/// The state after a command, and where its last event sits in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The account.
    pub account_id: Uuid,
    /// Its state after the command.
    pub account: Account,
    /// Its version: the sequence of its last event.
    pub version: i64,
    /// Global position of the command's last event: the read-your-writes token.
    pub position: i64,
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A domain rule refused it; nothing was written.
    #[error(transparent)]
    Rejected(#[from] AccountError),
    /// Its idempotency key was claimed by a concurrent request first.
    #[error("the idempotency key was claimed by a concurrent request")]
    KeyTaken,
    /// Every attempt lost the race for the account's next version.
    #[error("concurrent updates to the account; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    /// PostgreSQL is unreachable or saturated.
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug, corrupt data).
    #[error("unexpected event store error: {0}")]
    Internal(String),
}

/// Retry policy for version conflicts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Backoff before retry n is uniform in [0, min(cap, base * 2^n)].
    pub base: Duration,
    /// Upper bound of one backoff.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 16,
            base: Duration::from_millis(2),
            cap: Duration::from_millis(100),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        ceiling.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }
}

/// Executes account commands against the event store.
pub struct Ledger {
    pool: PgPool,
    store: AccountStore,
    retry: RetryPolicy,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// A ledger over `pool`, snapshotting every `snapshot_every` events.
    pub fn new(pool: PgPool, snapshot_every: usize, retry: RetryPolicy) -> Self {
        Self {
            store: store::account_store(pool.clone(), snapshot_every),
            pool,
            retry,
        }
    }

    /// Carries out `intent`: at most one set of events is appended, and only a returned
    /// `Ok` means they are committed.
    #[tracing::instrument(skip_all, fields(account_id = %intent.account_id))]
    pub async fn execute(&self, intent: Intent) -> Result<Outcome, LedgerError> {
        let aggregate_id = intent.account_id.to_string();
        for attempt in 0..=self.retry.max_retries {
            let context = self
                .store
                .load_aggregate(&aggregate_id)
                .await
                .map_err(classify)?;
            let events = context.aggregate.decide(intent.command.clone())?;
            let mut account = context.aggregate.clone();
            events.iter().for_each(|event| account.fold(event));

            let mut metadata = intent.metadata.clone();
            let command_id = Uuid::now_v7().to_string();
            metadata
                .causation_id
                .get_or_insert_with(|| command_id.clone());
            metadata.command_id = Some(command_id);

            match self.store.commit(events, context, metadata.to_map()).await {
                Ok(committed) => {
                    let version = committed
                        .last()
                        .and_then(|e| i64::try_from(e.sequence).ok())
                        .ok_or_else(|| LedgerError::Internal("commit returned no events".into()))?;
                    let position = positions::global_position(
                        &self.pool,
                        ACCOUNT_AGGREGATE_TYPE,
                        &aggregate_id,
                        version,
                    )
                    .await
                    .map_err(sql_error)?
                    .ok_or_else(|| LedgerError::Internal("committed event not found".into()))?;
                    return Ok(Outcome {
                        account_id: intent.account_id,
                        account,
                        version,
                        position,
                    });
                }
                Err(AggregateError::AggregateConflict) => {
                    if let Some(key) = &intent.metadata.idempotency_key {
                        if idempotency::is_claimed(&self.pool, key)
                            .await
                            .map_err(sql_error)?
                        {
                            return Err(LedgerError::KeyTaken);
                        }
                    }
                    tracing::debug!(attempt, "version conflict, retrying");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                Err(err) => return Err(classify(err)),
            }
        }
        tracing::warn!(
            attempts = self.retry.max_retries + 1,
            "gave up on version conflicts"
        );
        Err(LedgerError::Conflict {
            attempts: self.retry.max_retries + 1,
        })
    }

    /// The outcome of an earlier command whose last event is `appended`, folded from the
    /// store (used when a duplicate request finds its key claimed but no answer stored, e.g.
    /// because the process died between commit and response).
    pub async fn outcome_at(
        &self,
        appended: &idempotency::Appended,
    ) -> Result<Outcome, LedgerError> {
        let account_id = Uuid::parse_str(&appended.aggregate_id)
            .map_err(|err| LedgerError::Internal(format!("stored account id: {err}")))?;
        let events = self
            .store
            .load_events(&appended.aggregate_id)
            .await
            .map_err(classify)?;
        let mut account = Account::default();
        for envelope in events
            .iter()
            .filter(|e| i64::try_from(e.sequence).is_ok_and(|s| s <= appended.last_sequence))
        {
            account.fold(&envelope.payload);
        }
        Ok(Outcome {
            account_id,
            account,
            version: appended.last_sequence,
            position: appended.last_position,
        })
    }

    /// The pool (for idempotency bookkeeping beside the ledger).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn classify(err: AggregateError<AccountError>) -> LedgerError {
    match err {
        AggregateError::UserError(rule) => LedgerError::Rejected(rule),
        AggregateError::AggregateConflict => LedgerError::Conflict { attempts: 1 },
        AggregateError::DatabaseConnectionError(err) => LedgerError::Unavailable(err.to_string()),
        AggregateError::UnexpectedError(err) => match err.downcast_ref::<sqlx::Error>() {
            Some(sql) => sql_error_ref(sql),
            None => LedgerError::Internal(err.to_string()),
        },
        AggregateError::DeserializationError(err) => LedgerError::Internal(err.to_string()),
    }
}

fn sql_error(err: sqlx::Error) -> LedgerError {
    sql_error_ref(&err)
}

fn sql_error_ref(err: &sqlx::Error) -> LedgerError {
    if ledger_platform::db::is_unavailable(err) {
        LedgerError::Unavailable(err.to_string())
    } else {
        LedgerError::Internal(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let policy = RetryPolicy::default();
        for retry in 0..40 {
            let backoff = policy.backoff(retry);
            assert!(backoff <= policy.cap, "retry {retry}: {backoff:?}");
            assert!(backoff <= policy.base * 2u32.saturating_pow(retry.min(20)));
        }
    }
}
