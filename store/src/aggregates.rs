//! The write side's statements on `events` and `snapshots`: load aggregates, read their
//! current versions, append a batch, and find out whether a batch whose commit was not
//! acknowledged is in the store. The command side loads and appends only through here.
//!
//! Every function takes the aggregate type (`account`, `transfer`) and works on many
//! aggregates at once: one statement per batch, whatever its size.

use std::collections::HashMap;

use ledger_events::RecordedEvent;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::log::Row;

/// One aggregate as stored: its latest snapshot and the events after it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAggregate {
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Its latest snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// The events after the snapshot (every event when there is none), in sequence order.
    pub events: Vec<RecordedEvent>,
    /// Sequence of its last event.
    pub version: i64,
    /// Global position of its last event.
    pub position: i64,
}

/// A snapshot as stored: the state after event `sequence`, serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The sequence of the last event folded into it.
    pub sequence: i64,
    /// The serialized state.
    pub payload: Value,
}

/// Loads aggregates from their latest snapshot and the events after it, in one query.
/// Aggregates without events are absent from the answer.
pub async fn load(
    pool: &PgPool,
    aggregate_type: &str,
    ids: &[String],
) -> Result<Vec<StoredAggregate>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct LoadRow {
        snapshot: Option<Value>,
        snapshot_sequence: Option<i64>,
        #[sqlx(flatten)]
        event: Row,
    }
    // The snapshot's own event is read too (for its position); its payload is not needed.
    let rows: Vec<LoadRow> = sqlx::query_as(
        "SELECT CASE WHEN e.sequence = s.last_sequence THEN s.payload END AS snapshot,
                s.last_sequence AS snapshot_sequence,
                e.transaction_id::text::bigint AS transaction_id, e.global_position, e.event_id,
                e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                e.payload, e.metadata, e.recorded_at
           FROM unnest($2::text[]) AS w(aggregate_id)
           LEFT JOIN LATERAL (SELECT last_sequence, payload
                                FROM snapshots
                               WHERE aggregate_type = $1 AND aggregate_id = w.aggregate_id
                               ORDER BY last_sequence DESC
                               LIMIT 1) s ON true
           JOIN events e
             ON e.aggregate_type = $1 AND e.aggregate_id = w.aggregate_id
            AND e.sequence >= coalesce(s.last_sequence, 0)
          ORDER BY w.aggregate_id, e.sequence",
    )
    .bind(aggregate_type)
    .bind(ids)
    .fetch_all(pool)
    .await?;

    let mut loaded: Vec<StoredAggregate> = Vec::new();
    for row in rows {
        let event = row.event.into_entry().event;
        let current = match loaded.last_mut() {
            Some(last) if last.aggregate_id == event.aggregate_id => last,
            _ => {
                loaded.push(StoredAggregate {
                    aggregate_id: event.aggregate_id.clone(),
                    snapshot: None,
                    events: Vec::new(),
                    version: 0,
                    position: 0,
                });
                loaded.last_mut().expect("just pushed")
            }
        };
        current.version = event.sequence;
        current.position = event.global_position;
        match (row.snapshot, row.snapshot_sequence) {
            (Some(payload), Some(sequence)) => {
                current.snapshot = Some(Snapshot { sequence, payload });
            }
            // The snapshot's event without the snapshot: cannot happen (same row).
            (None, Some(sequence)) if sequence == event.sequence => {}
            _ => current.events.push(event),
        }
    }
    Ok(loaded)
}

/// The events of one aggregate with sequences up to `last_sequence`, in order.
pub async fn events_through(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
    last_sequence: i64,
) -> Result<Vec<RecordedEvent>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    crate::log::events_of(&mut conn, aggregate_type, aggregate_id, 1, last_sequence).await
}

/// The current version (sequence of the last event) of each of `ids` that has events.
pub async fn versions(
    pool: &PgPool,
    aggregate_type: &str,
    ids: &[String],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let current: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, max(sequence)
           FROM events
          WHERE aggregate_type = $1 AND aggregate_id = ANY($2)
          GROUP BY aggregate_id",
    )
    .bind(aggregate_type)
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(current.into_iter().collect())
}

/// The events and snapshots one statement appends, as columns.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    /// The id of each event: chosen by the caller when it bound a ciphertext to it
    /// (`ledger-pii`), else a fresh UUID v7.
    event_ids: Vec<Uuid>,
    aggregate_ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<String>,
    event_versions: Vec<String>,
    payloads: Vec<String>,
    metadata: Vec<String>,
    /// The command attempt of each row (also in its metadata): proof that a row found in
    /// the store is this batch's, not another writer's at the same sequence.
    command_ids: Vec<String>,
    snapshot_ids: Vec<String>,
    snapshot_sequences: Vec<i64>,
    snapshot_payloads: Vec<String>,
}

/// One event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The event's id (`events.event_id`): the one its encrypted fields are bound to when
    /// it has any, else a fresh UUID v7 ([`NewEvent::fresh_id`]).
    pub event_id: Uuid,
    /// The aggregate.
    pub aggregate_id: String,
    /// Its sequence: one past the aggregate's version the command was decided on.
    pub sequence: i64,
    /// Type name.
    pub event_type: String,
    /// Schema version.
    pub event_version: String,
    /// The payload, serialized JSON.
    pub payload: String,
    /// The metadata, a serialized JSON object; carries `command_id` too.
    pub metadata: String,
    /// The command attempt that decided it.
    pub command_id: String,
}

impl NewEvent {
    /// A fresh event id, for an event whose id nothing is bound to.
    pub fn fresh_id() -> Uuid {
        Uuid::now_v7()
    }
}

impl Batch {
    /// Adds an event.
    pub fn push_event(&mut self, event: NewEvent) {
        self.event_ids.push(event.event_id);
        self.aggregate_ids.push(event.aggregate_id);
        self.sequences.push(event.sequence);
        self.event_types.push(event.event_type);
        self.event_versions.push(event.event_version);
        self.payloads.push(event.payload);
        self.metadata.push(event.metadata);
        self.command_ids.push(event.command_id);
    }

    /// Adds a snapshot of `aggregate_id` after event `sequence`, replacing one added
    /// earlier for the same aggregate (a batch may cross a snapshot boundary twice).
    pub fn push_snapshot(&mut self, aggregate_id: &str, sequence: i64, payload: String) {
        if let Some(i) = self.snapshot_ids.iter().position(|id| id == aggregate_id) {
            self.snapshot_sequences[i] = sequence;
            self.snapshot_payloads[i] = payload;
        } else {
            self.snapshot_ids.push(aggregate_id.to_owned());
            self.snapshot_sequences.push(sequence);
            self.snapshot_payloads.push(payload);
        }
    }

    /// How many events it appends.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether it appends no event.
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// The aggregate of each event, in order.
    pub fn aggregate_ids(&self) -> &[String] {
        &self.aggregate_ids
    }

    /// The id of each event, in order.
    pub fn event_ids(&self) -> &[Uuid] {
        &self.event_ids
    }

    /// The sequence of each event, in order.
    pub fn sequences(&self) -> &[i64] {
        &self.sequences
    }

    /// The metadata of each event, in order.
    pub fn metadata(&self) -> &[String] {
        &self.metadata
    }

    /// The command attempt of each event, in order.
    pub fn command_ids(&self) -> &[String] {
        &self.command_ids
    }

    /// The snapshots it writes: (aggregate, sequence, payload).
    pub fn snapshots(&self) -> impl Iterator<Item = (&str, i64, &str)> {
        self.snapshot_ids
            .iter()
            .zip(&self.snapshot_sequences)
            .zip(&self.snapshot_payloads)
            .map(|((id, sequence), payload)| (id.as_str(), *sequence, payload.as_str()))
    }
}

/// The global position of each appended event by (aggregate id, sequence).
pub type Positions = HashMap<(String, i64), i64>;

/// Appends the batch's events and writes its snapshots, in one statement (so one
/// transaction). A unique violation means another writer holds one of the sequences, or
/// an idempotency key or transfer step of the batch is claimed (the triggers on `events`):
/// nothing was written.
pub async fn append(
    pool: &PgPool,
    aggregate_type: &str,
    batch: &Batch,
) -> Result<Positions, sqlx::Error> {
    append_with(pool, aggregate_type, batch).await
}

/// [`append`] inside the caller's transaction. It must be the transaction's **first**
/// write (the `events_append_first` trigger, ADR 0017): write anything else (a data
/// subject's key row) after it. Used by the rare writes that are not group-committed:
/// registering and erasing data subjects.
pub async fn append_in(
    conn: &mut PgConnection,
    aggregate_type: &str,
    batch: &Batch,
) -> Result<Positions, sqlx::Error> {
    append_with(&mut *conn, aggregate_type, batch).await
}

async fn append_with<'c, E>(
    executor: E,
    aggregate_type: &str,
    batch: &Batch,
) -> Result<Positions, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    let appended: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH appended AS (
             INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             SELECT e.event_id, $1, e.aggregate_id, e.sequence, e.event_type, e.event_version,
                    e.payload::json, e.metadata::json
               FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                           $7::text[], $11::uuid[])
                    AS e(aggregate_id, sequence, event_type, event_version, payload, metadata,
                         event_id)
             RETURNING aggregate_id, sequence, global_position
         ), snapshot AS (
             SELECT s.aggregate_id, s.last_sequence, s.payload::json AS payload
               FROM unnest($8::text[], $9::bigint[], $10::text[])
                    AS s(aggregate_id, last_sequence, payload)
         ), updated AS (
             UPDATE snapshots AS old
                SET last_sequence = snapshot.last_sequence,
                    payload = snapshot.payload,
                    current_snapshot = old.current_snapshot + 1
               FROM snapshot
              WHERE old.aggregate_type = $1 AND old.aggregate_id = snapshot.aggregate_id
                AND old.last_sequence < snapshot.last_sequence
             RETURNING old.aggregate_id
         ), created AS (
             INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence,
                                    current_snapshot, payload)
             SELECT $1, snapshot.aggregate_id, snapshot.last_sequence, 1, snapshot.payload
               FROM snapshot
              WHERE NOT EXISTS (SELECT 1 FROM snapshots
                                 WHERE aggregate_type = $1
                                   AND aggregate_id = snapshot.aggregate_id)
             ON CONFLICT DO NOTHING
             RETURNING aggregate_id
         )
         SELECT aggregate_id, sequence, global_position FROM appended",
    )
    .bind(aggregate_type)
    .bind(&batch.aggregate_ids)
    .bind(&batch.sequences)
    .bind(&batch.event_types)
    .bind(&batch.event_versions)
    .bind(&batch.payloads)
    .bind(&batch.metadata)
    .bind(&batch.snapshot_ids)
    .bind(&batch.snapshot_sequences)
    .bind(&batch.snapshot_payloads)
    .bind(&batch.event_ids)
    .fetch_all(executor)
    .await?;
    Ok(appended
        .into_iter()
        .map(|(id, sequence, position)| ((id, sequence), position))
        .collect())
}

/// The batch's events that are in the store, written by the batch's own command attempts
/// (matched by `command_id`, so another writer's event at the same sequence does not
/// count). Used after a commit whose acknowledgement was lost: one statement is one
/// transaction, so either all are found or none is.
pub async fn find_appended(
    pool: &PgPool,
    aggregate_type: &str,
    batch: &Batch,
) -> Result<Positions, sqlx::Error> {
    let found: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT e.aggregate_id, e.sequence, e.global_position
           FROM unnest($2::text[], $3::bigint[], $4::text[])
                AS w(aggregate_id, sequence, command_id)
           JOIN events e
             ON e.aggregate_type = $1 AND e.aggregate_id = w.aggregate_id
            AND e.sequence = w.sequence AND e.metadata ->> 'command_id' = w.command_id",
    )
    .bind(aggregate_type)
    .bind(&batch.aggregate_ids)
    .bind(&batch.sequences)
    .bind(&batch.command_ids)
    .fetch_all(pool)
    .await?;
    Ok(found
        .into_iter()
        .map(|(id, sequence, position)| ((id, sequence), position))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, sequence: i64) -> NewEvent {
        NewEvent {
            event_id: NewEvent::fresh_id(),
            aggregate_id: id.to_owned(),
            sequence,
            event_type: "E".into(),
            event_version: "1".into(),
            payload: "{}".into(),
            metadata: "{}".into(),
            command_id: format!("c{sequence}"),
        }
    }

    #[test]
    fn a_batch_keeps_one_snapshot_per_aggregate_the_newest() {
        let mut batch = Batch::default();
        batch.push_event(event("a", 1));
        batch.push_snapshot("a", 1, "1".into());
        batch.push_snapshot("b", 4, "4".into());
        batch.push_snapshot("a", 3, "3".into());
        let snapshots: Vec<_> = batch.snapshots().collect();
        assert_eq!(snapshots, vec![("a", 3, "3"), ("b", 4, "4")]);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch.aggregate_ids(), ["a".to_owned()]);
    }
}
