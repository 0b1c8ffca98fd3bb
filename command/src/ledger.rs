//! The command service: load the aggregate, let it decide, append the events; on a version
//! conflict, retry a bounded number of times with jittered backoff (promise 2: one writer
//! wins, the loser retries on fresh state or is answered 409).
//!
//! One [`Ledger`] per aggregate type: accounts for the HTTP API, accounts and transfers for
//! the transfer process manager.

use std::time::Duration;

use ledger_events::Metadata;
use ledger_store::aggregates;
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::{Account, Decider};
use crate::idempotency;
use crate::transfer_steps::{self, StepClaim};
use crate::writer::{self, WriterConfig, Writers};

/// One command with its metadata.
#[derive(Debug, Clone)]
pub struct Intent<A: Decider = Account> {
    /// The aggregate the command is for.
    pub aggregate_id: Uuid,
    /// What to do.
    pub command: A::Command,
    /// Request/correlation ids, idempotency key and transfer step, copied onto every event.
    pub metadata: Metadata,
    /// The id the command's event must be stored under, chosen by the caller because a
    /// ciphertext in the command is bound to it (an encrypted `reference`, ADR 0019).
    /// `None`: the writer gives each event a fresh id. A command with a preset id that
    /// decides more than one event is a defect (answered as an internal error).
    pub event_id: Option<Uuid>,
}

impl<A: Decider> Intent<A> {
    /// `command` on `aggregate_id` with `metadata`, its events under fresh ids.
    pub fn new(aggregate_id: Uuid, command: A::Command, metadata: Metadata) -> Self {
        Self {
            aggregate_id,
            command,
            metadata,
            event_id: None,
        }
    }
}

/// The state after a command, and where its last event sits in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<A: Decider = Account> {
    /// The aggregate.
    pub aggregate_id: Uuid,
    /// Its state after the command.
    pub state: A,
    /// Its version: the sequence of its last event.
    pub version: i64,
    /// Global position of the command's last event (or of the aggregate's last event when
    /// the command had nothing left to do): the read-your-writes token.
    pub position: i64,
    /// How many events the command appended (0 when it was already done).
    pub appended: usize,
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError<E: std::error::Error = crate::domain::AccountError> {
    /// A domain rule refused it; nothing was written.
    #[error(transparent)]
    Rejected(E),
    /// Its idempotency key was claimed by a concurrent request first.
    #[error("the idempotency key was claimed by a concurrent request")]
    KeyTaken,
    /// Its transfer step was taken by another event (this command's or another's).
    #[error("transfer step {} was already taken by {}", .0.step, .0.event_type)]
    StepTaken(Box<StepClaim>),
    /// Every attempt lost the race for the aggregate's next version.
    #[error("concurrent updates to the aggregate; gave up after {attempts} attempts")]
    Conflict { attempts: u32 },
    /// The writer's queue was full: the command was refused before it was queued, and
    /// nothing was written.
    #[error("the command queue is full ({queue_max} commands waiting); nothing was queued")]
    Overloaded { queue_max: usize },
    /// The connection was lost while the command's events were being committed, and the
    /// store could not be read to find out whether they were: they may or may not be in.
    #[error("the outcome of the commit is unknown: the connection was lost and the store could not be read")]
    OutcomeUnknown,
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

/// Executes commands of one aggregate type against the event store.
pub struct Ledger<A: Decider = Account> {
    pool: PgPool,
    writers: Writers<A>,
    retry: RetryPolicy,
}

impl<A: Decider> std::fmt::Debug for Ledger<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("aggregate_type", &A::TYPE)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl<A> Ledger<A>
where
    A: Decider,
    A::Error: std::error::Error,
{
    /// A ledger over `pool`, snapshotting every `snapshot_every` events, with the default
    /// writers. Starts the writer tasks: call it inside a tokio runtime.
    pub fn new(pool: PgPool, snapshot_every: usize, retry: RetryPolicy) -> Self {
        let writers = WriterConfig {
            snapshot_every: i64::try_from(snapshot_every).unwrap_or(i64::MAX),
            ..WriterConfig::default()
        };
        Self::with_writers(pool, retry, writers)
    }

    /// A ledger over `pool` with writers sized by `writers`.
    pub fn with_writers(pool: PgPool, retry: RetryPolicy, writers: WriterConfig) -> Self {
        Self {
            writers: Writers::start(pool.clone(), writers),
            pool,
            retry,
        }
    }

    /// Carries out `intent`: at most one set of events is appended, and only a returned
    /// `Ok` means they are committed. A command the aggregate has nothing left to do for
    /// appends nothing and answers the current state.
    ///
    /// The command is decided and committed by its aggregate's writer, together with the
    /// commands queued beside it (group commit, ADR 0010). A command that loses a race with
    /// another process even on fresh state is retried here with jittered backoff, unless
    /// its idempotency key or transfer step turns out to be taken.
    #[tracing::instrument(skip_all, fields(aggregate_type = A::TYPE, aggregate_id = %intent.aggregate_id))]
    pub async fn execute(&self, intent: Intent<A>) -> Result<Outcome<A>, LedgerError<A::Error>> {
        for attempt in 0..=self.retry.max_retries {
            match self.writers.submit(intent.clone()).await {
                Err(LedgerError::Conflict { .. }) => {
                    if let Some(key) = idempotency::ClientKey::of(&intent.metadata) {
                        if idempotency::is_claimed(&self.pool, &key)
                            .await
                            .map_err(sql_error)?
                        {
                            return Err(LedgerError::KeyTaken);
                        }
                    }
                    if let Some(step) = &intent.metadata.transfer_step {
                        if let Some(claim) = transfer_steps::find(&self.pool, step)
                            .await
                            .map_err(sql_error)?
                        {
                            return Err(LedgerError::StepTaken(Box::new(claim)));
                        }
                    }
                    tracing::debug!(attempt, "version conflict, retrying");
                    metrics::counter!("ledger_command_conflicts_total", "aggregate_type" => A::TYPE)
                        .increment(1);
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                other => return other,
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

    /// The aggregate's current state and version (0 when it has no events), read from the
    /// store (its latest snapshot and the events after it).
    pub async fn load(&self, aggregate_id: Uuid) -> Result<(A, i64), LedgerError<A::Error>> {
        let stored = aggregates::load(&self.pool, A::TYPE, &[aggregate_id.to_string()])
            .await
            .map_err(sql_error)?;
        match stored.first() {
            Some(stored) => writer::restore::<A>(stored)
                .map(|entry| (entry.state, entry.version))
                .map_err(LedgerError::Internal),
            None => Ok((A::default(), 0)),
        }
    }

    /// The outcome of an earlier command whose last event is `appended`, folded from the
    /// store (used when a duplicate request finds its key claimed but no answer stored, e.g.
    /// because the process died between commit and response).
    pub async fn outcome_at(
        &self,
        appended: &idempotency::Appended,
    ) -> Result<Outcome<A>, LedgerError<A::Error>> {
        let aggregate_id = Uuid::parse_str(&appended.aggregate_id)
            .map_err(|err| LedgerError::Internal(format!("stored aggregate id: {err}")))?;
        let events = aggregates::events_through(
            &self.pool,
            A::TYPE,
            &appended.aggregate_id,
            appended.last_sequence,
        )
        .await
        .map_err(sql_error)?;
        let mut state = A::default();
        for recorded in &events {
            let event = A::read(recorded).map_err(|err| {
                LedgerError::Internal(format!(
                    "event {} of {}: {err}",
                    recorded.sequence, recorded.aggregate_id
                ))
            })?;
            state.fold(&event);
        }
        // The command's own events: the last one's command attempt, counted back.
        let command_id = events.last().and_then(|e| e.metadata.command_id.clone());
        let count = events
            .iter()
            .rev()
            .take_while(|e| e.metadata.command_id == command_id)
            .count();
        Ok(Outcome {
            aggregate_id,
            state,
            version: appended.last_sequence,
            position: appended.last_position,
            appended: count,
        })
    }

    /// The pool (for idempotency bookkeeping beside the ledger).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn sql_error<E: std::error::Error>(err: sqlx::Error) -> LedgerError<E> {
    if ledger_platform::db::is_unavailable(&err) {
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
