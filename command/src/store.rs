//! The event store: postgres-es's repository behind cqrs-es's `PersistedEventStore`.
//! Reads postgres-es does not offer come from `ledger_store`.
//!
//! [`LedgerRepository`] wraps `PostgresEventRepository` for one reason: when postgres-es
//! updates a snapshot it commits the events *before* it checks that the snapshot row was
//! updated, and reports a concurrency conflict if it was not. The events are then durable
//! although the caller was told they were not, and a retry would apply the command twice.
//! The wrapper checks, on every conflict that came with a snapshot update, whether this
//! attempt's events are in the store (by the attempt's `command_id`), and reports success
//! when they are: the stale snapshot is only a cache, the events are the truth.

use cqrs_es::persist::{
    PersistedEventRepository, PersistedEventStore, PersistenceError, ReplayStream, SerializedEvent,
    SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::PgPool;

/// Builds the store of aggregate `A`: snapshots every `snapshot_every` events, payloads
/// read through the contract's upcasters.
pub fn event_store<A: Aggregate>(
    pool: PgPool,
    snapshot_every: usize,
) -> PersistedEventStore<LedgerRepository, A> {
    PersistedEventStore::new_snapshot_store(LedgerRepository::new(pool), snapshot_every)
        .with_upcasters(ledger_events::upcast::upcasters())
}

/// postgres-es's repository, with the commit-then-check snapshot race made safe.
pub struct LedgerRepository {
    inner: PostgresEventRepository,
    pool: PgPool,
}

impl std::fmt::Debug for LedgerRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerRepository").finish_non_exhaustive()
    }
}

impl LedgerRepository {
    /// Over the default `events` and `snapshots` tables.
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: PostgresEventRepository::new(pool.clone()),
            pool,
        }
    }

    /// Whether the first of `events` is stored, written by the same command attempt.
    async fn committed<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
    ) -> Result<bool, PersistenceError> {
        let Some(first) = events.first() else {
            return Ok(false);
        };
        let Some(command_id) = first.metadata.get("command_id").and_then(Value::as_str) else {
            return Ok(false);
        };
        ledger_store::positions::appended_by(
            &self.pool,
            A::TYPE,
            &first.aggregate_id,
            i64::try_from(first.sequence).unwrap_or(i64::MAX),
            command_id,
        )
        .await
        .map_err(|err| PersistenceError::ConnectionError(Box::new(err)))
    }
}

impl PersistedEventRepository for LedgerRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.inner.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.inner
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.inner.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        let with_snapshot = snapshot_update.is_some();
        match self.inner.persist::<A>(events, snapshot_update).await {
            Err(PersistenceError::OptimisticLockError)
                if with_snapshot && self.committed::<A>(events).await? =>
            {
                tracing::warn!(
                    aggregate_id = events.first().map(|e| e.aggregate_id.as_str()),
                    "events committed but the snapshot was stale; keeping the events"
                );
                Ok(())
            }
            other => other,
        }
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.inner.stream_all_events::<A>().await
    }
}
