//! Applying a batch of incoming events to every projection in one transaction.
//!
//! For each event and projection: the guard says apply, skip (a duplicate or re-delivery),
//! or repair a gap first (the missing sequences are read from the store). A projection that
//! refuses an event, or an event that cannot be decoded, goes to the dead letters; the guard
//! moves past it and the projector carries on. Guards, read-model rows, checkpoints,
//! partition progress and dead letters all commit together: a crash anywhere leaves either
//! the whole batch or none of it.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use ledger_events::{LedgerEvent, RecordedEvent};
use ledger_readmodels::dead_letters::{self, NewDeadLetter};
use ledger_readmodels::{
    guards, names, notify_change, owner_totals, progress, statements, summaries, transfers,
    ApplyError,
};
use ledger_store::LogCursor;
use sqlx::{Connection, PgConnection, PgPool};

/// The progress row that holds the cursor when reading the store directly.
pub const STORE_READER: &str = "store_log_reader";

/// Where an incoming event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A Kafka message.
    Kafka { partition: i32, offset: i64 },
    /// The store's log.
    Store { cursor: LogCursor },
}

/// One thing to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A readable event.
    Event {
        event: Box<RecordedEvent>,
        origin: Origin,
    },
    /// A message that is not an event at all (bad headers, not JSON).
    Unreadable {
        reason: String,
        origin: Origin,
        headers: Option<serde_json::Value>,
        value: Option<String>,
    },
}

impl Incoming {
    /// Where it came from.
    pub fn origin(&self) -> Origin {
        match self {
            Self::Event { origin, .. } | Self::Unreadable { origin, .. } => *origin,
        }
    }
}

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// (event, projection) pairs applied.
    pub applied: u64,
    /// Pairs skipped as already handled.
    pub duplicates: u64,
    /// Dead letters recorded.
    pub dead_letters: u64,
    /// Events read from the store to repair gaps.
    pub repaired: u64,
}

/// What a source (Kafka or the store) hands its batches to: the read-model applier or the
/// transfer process manager. `Err` means nothing of the batch may be considered done: the
/// source retries it and does not move its position.
pub trait BatchHandler: Clone + Send + Sync + 'static {
    /// Why a batch must be retried.
    type Error: std::fmt::Display + Send;

    /// Handles `batch`, in order per aggregate.
    fn handle(
        &self,
        batch: &[Incoming],
    ) -> impl std::future::Future<Output = Result<Applied, Self::Error>> + Send;
}

impl BatchHandler for Applier {
    type Error = sqlx::Error;

    async fn handle(&self, batch: &[Incoming]) -> Result<Applied, sqlx::Error> {
        self.apply_batch(batch).await
    }
}

impl BatchHandler for crate::transfers::ProcessManager {
    type Error = crate::transfers::ReactionError;

    async fn handle(&self, batch: &[Incoming]) -> Result<Applied, Self::Error> {
        self.handle_batch(batch).await
    }
}

/// Applies batches for one source.
#[derive(Debug, Clone)]
pub struct Applier {
    pool: PgPool,
    /// Consumer group and topic, for partition progress (Kafka only).
    kafka: Option<(String, String)>,
}

impl Applier {
    /// An applier over `pool`; `kafka` is `(group, topic)` when consuming Kafka.
    pub fn new(pool: PgPool, kafka: Option<(String, String)>) -> Self {
        Self { pool, kafka }
    }

    /// Applies `batch` in one transaction.
    pub async fn apply_batch(&self, batch: &[Incoming]) -> Result<Applied, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut outcome = Applied::default();
        let mut touched = BTreeSet::new();
        let mut newest: Option<(i64, DateTime<Utc>)> = None;
        let mut events = 0i64;
        for item in batch {
            match item {
                Incoming::Event { event, .. } => {
                    let span = tracing::debug_span!(
                        "event",
                        request_id = event.metadata.request_id.as_deref().unwrap_or(""),
                        event_id = %event.event_id,
                        position = event.global_position,
                    );
                    let _entered = span.enter();
                    // The thread from the HTTP request: its id and W3C trace context came
                    // through the event's metadata and the Kafka headers.
                    tracing::debug!(
                        request_id = event.metadata.request_id.as_deref().unwrap_or(""),
                        traceparent = event.metadata.traceparent().unwrap_or(""),
                        event_type = %event.event_type,
                        aggregate_id = %event.aggregate_id,
                        "applying event"
                    );
                    self.apply_event(&mut tx, event, item.origin(), &mut outcome)
                        .await?;
                    touched.insert(event.aggregate_id.clone());
                    events += 1;
                    if newest.is_none_or(|(p, _)| event.global_position > p) {
                        newest = Some((event.global_position, event.recorded_at));
                    }
                }
                Incoming::Unreadable {
                    reason,
                    origin,
                    headers,
                    value,
                } => {
                    tracing::warn!(%reason, "unreadable message to the dead letters");
                    let mut letter = letter_for(*origin);
                    letter.projection = "*".into();
                    letter.reason.clone_from(reason);
                    letter.raw_headers.clone_from(headers);
                    letter.raw_value.clone_from(value);
                    dead_letters::record(&mut tx, &letter).await?;
                    outcome.dead_letters += 1;
                }
            }
        }
        let cursor = batch.iter().rev().find_map(|item| match item.origin() {
            Origin::Store { cursor } => Some(cursor),
            Origin::Kafka { .. } => None,
        });
        if let Some((position, at)) = newest {
            for projection in names::ALL {
                progress::advance(&mut tx, projection, position, at, events, None).await?;
            }
        }
        if let Some(cursor) = cursor {
            let (position, at) = newest.unwrap_or((0, Utc::now()));
            progress::advance(
                &mut tx,
                STORE_READER,
                position,
                at,
                events,
                Some((cursor.transaction_id, cursor.global_position)),
            )
            .await?;
        }
        if let Some((group, topic)) = &self.kafka {
            let mut partitions: std::collections::BTreeMap<i32, (i64, i64)> = Default::default();
            for item in batch {
                if let Origin::Kafka { partition, offset } = item.origin() {
                    let position = match item {
                        Incoming::Event { event, .. } => event.global_position,
                        Incoming::Unreadable { .. } => 0,
                    };
                    let entry = partitions.entry(partition).or_insert((offset, position));
                    *entry = (entry.0.max(offset), entry.1.max(position));
                }
            }
            for (partition, (offset, position)) in partitions {
                progress::advance_partition(&mut tx, group, topic, partition, offset, position)
                    .await?;
            }
        }
        for account in &touched {
            notify_change(&mut tx, account).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn apply_event(
        &self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
        origin: Origin,
        outcome: &mut Applied,
    ) -> Result<(), sqlx::Error> {
        apply_guarded(tx, &names::ALL, event, origin, outcome).await
    }
}

/// Applies `event` to each of `projections` through its guard (apply, skip a duplicate,
/// or repair a gap from the store first), on `tx`.
pub async fn apply_guarded(
    tx: &mut PgConnection,
    projections: &[&str],
    event: &RecordedEvent,
    origin: Origin,
    outcome: &mut Applied,
) -> Result<(), sqlx::Error> {
    {
        for projection in projections
            .iter()
            .copied()
            .filter(|p| names::handles(p, &event.aggregate_type))
        {
            match guards::check(tx, projection, &event.aggregate_id, event.sequence).await? {
                guards::Verdict::Duplicate => outcome.duplicates += 1,
                guards::Verdict::Apply => apply_one(tx, projection, event, origin, outcome).await?,
                guards::Verdict::Gap { from } => {
                    let missing = ledger_store::events_of(
                        tx,
                        &event.aggregate_type,
                        &event.aggregate_id,
                        from,
                        event.sequence - 1,
                    )
                    .await?;
                    tracing::warn!(
                        projection,
                        aggregate_id = %event.aggregate_id,
                        from,
                        to = event.sequence - 1,
                        found = missing.len(),
                        "sequence gap: repairing from the store"
                    );
                    for earlier in &missing {
                        apply_one(
                            tx,
                            projection,
                            earlier,
                            Origin::Store {
                                cursor: LogCursor::default(),
                            },
                            outcome,
                        )
                        .await?;
                        outcome.repaired += 1;
                    }
                    apply_one(tx, projection, event, origin, outcome).await?;
                }
            }
        }
        Ok(())
    }
}

/// Applies one event to one projection (or dead-letters it), and moves the guard.
pub async fn apply_one(
    tx: &mut PgConnection,
    projection: &str,
    event: &RecordedEvent,
    origin: Origin,
    outcome: &mut Applied,
) -> Result<(), sqlx::Error> {
    let refused = match project(tx, projection, event).await {
        Ok(()) => {
            outcome.applied += 1;
            None
        }
        Err(ApplyError::Refused(reason)) => Some(reason),
        Err(ApplyError::Database(err)) => return Err(err),
    };
    if let Some(reason) = refused {
        tracing::warn!(projection, %reason, event_id = %event.event_id, "event to the dead letters");
        let mut letter = letter_for(origin);
        letter.projection = projection.to_owned();
        letter.reason = reason;
        letter.event_id = Some(event.event_id);
        letter.aggregate_id = Some(event.aggregate_id.clone());
        letter.sequence = Some(event.sequence);
        letter.global_position = Some(event.global_position);
        letter.event_type = Some(event.event_type.clone());
        letter.event_version = Some(event.event_version.clone());
        letter.raw_value = Some(event.payload.to_string());
        dead_letters::record(tx, &letter).await?;
        outcome.dead_letters += 1;
    }
    guards::advance(
        tx,
        projection,
        &event.aggregate_id,
        event.sequence,
        event.global_position,
    )
    .await
}

/// Decodes `event` and applies it to `projection` inside a savepoint (a refusal undoes only
/// this change), without looking at the guard.
pub async fn project(
    tx: &mut PgConnection,
    projection: &str,
    event: &RecordedEvent,
) -> Result<(), ApplyError> {
    let decoded = event
        .decode()
        .map_err(|err| ApplyError::Refused(err.to_string()))?;
    let mut savepoint = tx.begin().await?;
    let result = match (projection, &decoded) {
        (names::ACCOUNT_SUMMARY, LedgerEvent::Account(account)) => {
            summaries::apply(&mut savepoint, event, account).await
        }
        (names::ACCOUNT_STATEMENT, LedgerEvent::Account(account)) => {
            statements::apply(&mut savepoint, event, account).await
        }
        (names::OWNER_TOTALS, LedgerEvent::Account(account)) => {
            owner_totals::apply(&mut savepoint, event, account).await
        }
        (names::TRANSFERS, LedgerEvent::Transfer(transfer)) => {
            transfers::apply(&mut savepoint, event, transfer).await
        }
        (other, _) => Err(ApplyError::Refused(format!(
            "projection `{other}` does not take {} events",
            event.aggregate_type
        ))),
    };
    match result {
        Ok(()) => {
            savepoint.commit().await?;
            Ok(())
        }
        Err(err) => {
            savepoint.rollback().await?;
            Err(err)
        }
    }
}

fn letter_for(origin: Origin) -> NewDeadLetter {
    match origin {
        Origin::Kafka { partition, offset } => NewDeadLetter {
            source: "kafka".into(),
            kafka_partition: Some(partition),
            kafka_offset: Some(offset),
            ..NewDeadLetter::default()
        },
        Origin::Store { .. } => NewDeadLetter {
            source: "store".into(),
            ..NewDeadLetter::default()
        },
    }
}
