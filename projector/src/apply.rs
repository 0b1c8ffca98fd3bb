//! Applying a batch of incoming events to every projection in one transaction (ADR 0013).
//!
//! A batch from Kafka is first checked against the store ([`checked_against_store`]): each
//! event is replaced by the store's copy, and a message whose event the store does not hold
//! becomes a dead letter (ADR 0016).
//!
//! [`apply_events`] is the one code path of live apply, replay and rebuild. Per projection,
//! with a fixed number of statements whatever the batch's size:
//!
//! 1. the guards of all the batch's aggregates are created or locked in one statement, in
//!    key order (two workers never deadlock on them), and read in one more;
//! 2. in memory, each event is judged against its aggregate's guard: apply, skip (a
//!    duplicate or re-delivery), or repair a gap first (the missing sequences are read from
//!    the store, the only per-event statement, and only when a gap exists);
//! 3. the projection folds the events to apply into its rows in memory and writes each of
//!    its tables in one statement (`readmodels::*::apply_batch`); the events it refuses
//!    (money for an account never opened, an account opened twice, a payload that does not
//!    decode) go to the dead letters;
//! 4. the guards move past every event handled, in one statement.
//!
//! When PostgreSQL refuses a value of the batch (a data exception, an integrity violation,
//! a limit), the batch is applied again in halves inside savepoints until the event that
//! causes it is alone; that event is dead-lettered with the database's reason and the rest
//! applied. Any other database error (a lost connection, a deadlock) fails the batch, which
//! the source retries. Guards, read-model rows, checkpoints, partition progress and dead
//! letters all commit together: a crash anywhere leaves either the whole batch or none of it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use std::collections::HashMap;

use ledger_events::subject::fields as subject_fields;
use ledger_events::{AccountEvent, LedgerEvent, RecordedEvent, SubjectEvent, TransferEvent};
use ledger_pii::{DecryptError, KeyStore, StoreError, ERASED_MARKER};
use ledger_readmodels::dead_letters::{self, NewDeadLetter};
use ledger_readmodels::subjects::{self, SubjectChange};
use ledger_readmodels::{
    guards, names, notify_changes, progress, statements, subject_totals, summaries, transfers,
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
    /// An event as read from the store's log, placed by its log cursor.
    pub fn from_log(entry: ledger_store::LogEntry) -> Self {
        Self::Event {
            origin: Origin::Store {
                cursor: entry.cursor,
            },
            event: Box::new(entry.event),
        }
    }

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

impl Applied {
    /// Adds what another (part of a) batch did.
    pub fn absorb(&mut self, other: Applied) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.dead_letters += other.dead_letters;
        self.repaired += other.repaired;
    }
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
    /// The data keys personal fields are decrypted with.
    keys: KeyStore,
    /// Consumer group and topic, for partition progress (Kafka only).
    kafka: Option<(String, String)>,
}

impl Applier {
    /// An applier over `pool` decrypting with `keys`; `kafka` is `(group, topic)` when
    /// consuming Kafka.
    pub fn new(pool: PgPool, keys: KeyStore, kafka: Option<(String, String)>) -> Self {
        Self { pool, keys, kafka }
    }

    /// Applies `batch` in one transaction.
    pub async fn apply_batch(&self, batch: &[Incoming]) -> Result<Applied, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let checked = checked_against_store(&mut tx, batch).await?;
        let batch: &[Incoming] = &checked;
        let mut outcome = Applied::default();
        let mut events = Vec::with_capacity(batch.len());
        let mut newest: Option<(i64, DateTime<Utc>)> = None;
        for item in batch {
            match item {
                Incoming::Event { event, origin } => {
                    // The thread from the HTTP request: its id and W3C trace context came
                    // through the event's metadata and the Kafka headers.
                    tracing::debug!(
                        request_id = event.metadata.request_id.as_deref().unwrap_or(""),
                        traceparent = event.metadata.traceparent().unwrap_or(""),
                        event_id = %event.event_id,
                        position = event.global_position,
                        event_type = %event.event_type,
                        aggregate_id = %event.aggregate_id,
                        "applying event"
                    );
                    events.push((event.as_ref(), *origin));
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
        apply_events(&mut tx, &self.keys, &names::ALL, &events, &mut outcome).await?;
        let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
        let cursor = batch.iter().rev().find_map(|item| match item.origin() {
            Origin::Store { cursor } => Some(cursor),
            Origin::Kafka { .. } => None,
        });
        if let Some((position, at)) = newest {
            for projection in names::ALL {
                progress::advance(&mut tx, projection, position, at, count, None).await?;
            }
        }
        if let Some(cursor) = cursor {
            let (position, at) = newest.unwrap_or((0, Utc::now()));
            progress::advance(
                &mut tx,
                STORE_READER,
                position,
                at,
                count,
                Some((cursor.transaction_id, cursor.global_position)),
            )
            .await?;
        }
        if let Some((group, topic)) = &self.kafka {
            let mut partitions: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
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
        let touched = ledger_readmodels::distinct_ids(events.iter().map(|(event, _)| *event));
        notify_changes(&mut tx, &touched).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// The store is the truth, not the message (ADR 0016): each event of `batch` that came from
/// Kafka is replaced by the store's copy of it (found by event id, at the same aggregate
/// and sequence), or, when the store holds no such event, becomes an unreadable message
/// saying so, which goes to the dead letters while the partition moves on. So a gap is
/// only ever repaired up to an event the store holds, and a guard never moves past the
/// aggregate's real events. Events read from the store pass as they are. One statement
/// per batch, none when nothing came from Kafka.
pub async fn checked_against_store<'a>(
    conn: &mut PgConnection,
    batch: &'a [Incoming],
) -> Result<std::borrow::Cow<'a, [Incoming]>, sqlx::Error> {
    let ids: Vec<uuid::Uuid> = batch
        .iter()
        .filter_map(|item| match item {
            Incoming::Event {
                event,
                origin: Origin::Kafka { .. },
            } => Some(event.event_id),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(std::borrow::Cow::Borrowed(batch));
    }
    let stored: std::collections::HashMap<uuid::Uuid, RecordedEvent> =
        ledger_store::events_by_ids(conn, &ids)
            .await?
            .into_iter()
            .map(|event| (event.event_id, event))
            .collect();
    Ok(batch
        .iter()
        .map(|item| match item {
            Incoming::Event {
                event,
                origin: origin @ Origin::Kafka { .. },
            } => match stored.get(&event.event_id) {
                Some(truth)
                    if truth.aggregate_type == event.aggregate_type
                        && truth.aggregate_id == event.aggregate_id
                        && truth.sequence == event.sequence =>
                {
                    Incoming::Event {
                        event: Box::new(truth.clone()),
                        origin: *origin,
                    }
                }
                found => {
                    let reason = match found {
                        None => format!(
                            "not in the event store: no event {} ({} {} sequence {})",
                            event.event_id,
                            event.aggregate_type,
                            event.aggregate_id,
                            event.sequence
                        ),
                        Some(truth) => format!(
                            "differs from the event store: event {} is {} {} sequence {} there, \
                             {} {} sequence {} in the message",
                            event.event_id,
                            truth.aggregate_type,
                            truth.aggregate_id,
                            truth.sequence,
                            event.aggregate_type,
                            event.aggregate_id,
                            event.sequence
                        ),
                    };
                    Incoming::Unreadable {
                        reason,
                        origin: *origin,
                        headers: Some(serde_json::json!({
                            "ce_id": event.event_id,
                            "ledger_aggregate_type": event.aggregate_type,
                            "ce_subject": event.aggregate_id,
                            "ledger_sequence": event.sequence,
                            "ledger_global_position": event.global_position,
                            "ledger_event_type": event.event_type,
                            "ledger_event_version": event.event_version,
                        })),
                        value: Some(event.payload.to_string()),
                    }
                }
            },
            other => other.clone(),
        })
        .collect::<Vec<_>>()
        .into())
}

/// Whether PostgreSQL refused a value the events brought (a data exception such as a numeric
/// overflow or a byte it cannot store, an integrity violation, a limit such as a too-long
/// key), or the value could not even be encoded: the events' fault, so the event at fault is
/// isolated and dead-lettered. Anything else (a lost connection, a deadlock, a server
/// shutting down) is the database's state, and the batch is retried as it is.
pub fn is_data_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| {
                code.get(..2)
                    .map(|class| matches!(class, "22" | "23" | "54"))
            })
            .unwrap_or(false),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// The dead letter's reason for an event the database refused.
fn refused_by(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => format!(
            "the database refused it ({}): {}",
            db.code().unwrap_or_default(),
            db.message()
        ),
        other => format!("the database refused it: {other}"),
    }
}

/// Applies `events` (in order per aggregate) to each of `projections` on `tx`, through the
/// guards: the shared code path of live apply, replay and rebuild.
///
/// The whole set goes in one savepoint; if PostgreSQL refuses a value of it, the set is
/// applied again in halves, each in its own savepoint, down to the single event at fault,
/// which is dead-lettered per projection with the database's reason.
pub async fn apply_events(
    tx: &mut PgConnection,
    keys: &KeyStore,
    projections: &[&str],
    events: &[(&RecordedEvent, Origin)],
    outcome: &mut Applied,
) -> Result<(), sqlx::Error> {
    let decoded = Decoded::of(keys, events.iter().map(|(event, _)| *event));
    apply_decoded(tx, projections, events, &decoded, outcome).await
}

/// [`apply_events`] with the events' payloads already decoded (`decoded`): how a rebuild of
/// several projections decodes each event once for all of them (ADR 0018). An event
/// `decoded` does not hold (a gap repaired from the store) is decoded where it is needed.
pub async fn apply_decoded(
    tx: &mut PgConnection,
    projections: &[&str],
    events: &[(&RecordedEvent, Origin)],
    decoded: &Decoded<'_>,
    outcome: &mut Applied,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    apply_or_split(tx, projections, events, decoded, outcome).await
}

/// The decoded payloads of a batch's events, decoded once and shared by every projection
/// (and every half of a bisected batch): decoding is much of a rebuild's CPU time.
#[derive(Debug)]
pub struct Decoded<'a> {
    by_id: std::collections::HashMap<uuid::Uuid, (&'a RecordedEvent, DecodeResult)>,
    /// The data keys personal fields are decrypted with, while the batch is applied.
    keys: KeyStore,
}

/// A decoded event, or why it does not decode (the dead letter's reason).
type DecodeResult = Result<LedgerEvent, String>;

impl<'a> Decoded<'a> {
    /// Nothing decoded yet: every event is decoded where it is needed.
    pub fn empty(keys: &KeyStore) -> Self {
        Self {
            by_id: std::collections::HashMap::new(),
            keys: keys.clone(),
        }
    }

    /// Decodes each of `events` once; personal fields are decrypted with `keys`.
    pub fn of(keys: &KeyStore, events: impl IntoIterator<Item = &'a RecordedEvent>) -> Self {
        let by_id = events
            .into_iter()
            .map(|event| {
                (
                    event.event_id,
                    (event, event.decode().map_err(|err| err.to_string())),
                )
            })
            .collect();
        Self {
            by_id,
            keys: keys.clone(),
        }
    }

    /// `event` decoded: from the cache when it holds this very event, else decoded now.
    fn get(&self, event: &RecordedEvent) -> Cow<'_, DecodeResult> {
        match self.by_id.get(&event.event_id) {
            Some((cached, result)) if std::ptr::eq(*cached, event) || *cached == event => {
                Cow::Borrowed(result)
            }
            _ => Cow::Owned(event.decode().map_err(|err| err.to_string())),
        }
    }
}

/// Applies `events` in a savepoint; when the database refuses a value of them, rolls that
/// back and applies each half the same way, down to the single event at fault, which
/// [`isolate_one`] dead-letters per projection.
fn apply_or_split<'a>(
    tx: &'a mut PgConnection,
    projections: &'a [&'a str],
    events: &'a [(&'a RecordedEvent, Origin)],
    decoded: &'a Decoded<'a>,
    outcome: &'a mut Applied,
) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move {
        let mut attempt = Applied::default();
        let mut savepoint = tx.begin().await?;
        match apply_set(&mut savepoint, projections, events, decoded, &mut attempt).await {
            Ok(()) => {
                savepoint.commit().await?;
                outcome.absorb(attempt);
                Ok(())
            }
            Err(err) if is_data_error(&err) => {
                savepoint.rollback().await?;
                if let [(event, origin)] = events {
                    for projection in projections {
                        isolate_one(tx, projection, event, *origin, decoded, outcome).await?;
                    }
                    return Ok(());
                }
                tracing::warn!(
                    error = %err,
                    events = events.len(),
                    "the database refuses a value of this batch: isolating the event at fault"
                );
                let (first, second) = events.split_at(events.len() / 2);
                apply_or_split(tx, projections, first, decoded, outcome).await?;
                apply_or_split(tx, projections, second, decoded, outcome).await
            }
            Err(err) => Err(err),
        }
    })
}

/// One event and one projection, when the database refused something of them: its guard,
/// the events missing before it (each alone), then the event alone. What the database
/// refuses is dead-lettered with its reason and the guard moves past it (unless the guard
/// itself cannot be stored, e.g. an aggregate id PostgreSQL refuses).
fn isolate_one<'a>(
    tx: &'a mut PgConnection,
    projection: &'a str,
    event: &'a RecordedEvent,
    origin: Origin,
    decoded: &'a Decoded<'a>,
    outcome: &'a mut Applied,
) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    Box::pin(async move {
        if !names::handles(projection, &event.aggregate_type) {
            return Ok(());
        }
        let mut savepoint = tx.begin().await?;
        let id = event.aggregate_id.as_str();
        let last = match guards::lock_many(&mut savepoint, projection, &[id]).await {
            Ok(last) => {
                savepoint.commit().await?;
                last.get(id).copied().unwrap_or(0)
            }
            Err(err) if is_data_error(&err) => {
                savepoint.rollback().await?;
                dead_letter(tx, projection, event, origin, refused_by(&err)).await?;
                outcome.dead_letters += 1;
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        if event.sequence <= last {
            outcome.duplicates += 1;
            return Ok(());
        }
        if event.sequence > last + 1 {
            let missing = ledger_store::events_of(
                tx,
                &event.aggregate_type,
                id,
                last + 1,
                event.sequence - 1,
            )
            .await?;
            for earlier in &missing {
                outcome.repaired += 1;
                let origin = Origin::Store {
                    cursor: LogCursor::default(),
                };
                isolate_one(tx, projection, earlier, origin, decoded, outcome).await?;
            }
        }
        let mut attempt = Applied::default();
        let mut savepoint = tx.begin().await?;
        match apply_set(
            &mut savepoint,
            &[projection],
            &[(event, origin)],
            decoded,
            &mut attempt,
        )
        .await
        {
            Ok(()) => {
                savepoint.commit().await?;
                outcome.absorb(attempt);
            }
            Err(err) if is_data_error(&err) => {
                savepoint.rollback().await?;
                tracing::warn!(
                    projection,
                    error = %err,
                    event_id = %event.event_id,
                    "the database refuses this event: to the dead letters"
                );
                dead_letter(tx, projection, event, origin, refused_by(&err)).await?;
                outcome.dead_letters += 1;
                guards::advance_many(
                    tx,
                    projection,
                    &[id],
                    &[event.sequence],
                    &[event.global_position],
                )
                .await?;
            }
            Err(err) => return Err(err),
        }
        Ok(())
    })
}

/// The set-based apply of `events` to each of `projections` (see the module documentation).
async fn apply_set(
    tx: &mut PgConnection,
    projections: &[&str],
    events: &[(&RecordedEvent, Origin)],
    decoded: &Decoded<'_>,
    outcome: &mut Applied,
) -> Result<(), sqlx::Error> {
    for &projection in projections {
        let relevant: Vec<(&RecordedEvent, Origin)> = events
            .iter()
            .filter(|(event, _)| names::handles(projection, &event.aggregate_type))
            .copied()
            .collect();
        if relevant.is_empty() {
            continue;
        }
        let ids = ledger_readmodels::distinct_ids(relevant.iter().map(|(event, _)| *event));
        let mut last = guards::lock_many(tx, projection, &ids).await?;
        // What to apply, in order: the batch's events the guards let through, each preceded
        // by the events its aggregate is missing.
        let mut plan: Vec<(Cow<'_, RecordedEvent>, Origin)> = Vec::with_capacity(relevant.len());
        for (event, origin) in relevant {
            let seen = last.get(&event.aggregate_id).copied().unwrap_or(0);
            if event.sequence <= seen {
                outcome.duplicates += 1;
                continue;
            }
            if event.sequence > seen + 1 {
                let missing = ledger_store::events_of(
                    tx,
                    &event.aggregate_type,
                    &event.aggregate_id,
                    seen + 1,
                    event.sequence - 1,
                )
                .await?;
                tracing::warn!(
                    projection,
                    aggregate_id = %event.aggregate_id,
                    from = seen + 1,
                    to = event.sequence - 1,
                    found = missing.len(),
                    "sequence gap: repairing from the store"
                );
                outcome.repaired += missing.len() as u64;
                plan.extend(missing.into_iter().map(|earlier| {
                    (
                        Cow::Owned(earlier),
                        Origin::Store {
                            cursor: LogCursor::default(),
                        },
                    )
                }));
            }
            last.insert(event.aggregate_id.clone(), event.sequence);
            plan.push((Cow::Borrowed(event), origin));
        }
        if plan.is_empty() {
            continue;
        }
        let planned: Vec<&RecordedEvent> = plan.iter().map(|(event, _)| &**event).collect();
        let refused = project_decoded(tx, projection, &planned, decoded).await?;
        outcome.applied += (planned.len() - refused.len()) as u64;
        for (index, reason) in refused {
            dead_letter(tx, projection, planned[index], plan[index].1, reason).await?;
            outcome.dead_letters += 1;
        }
        // Every event handled (applied or dead-lettered) moves its guard.
        let mut handled: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for event in &planned {
            handled.insert(
                event.aggregate_id.as_str(),
                (event.sequence, event.global_position),
            );
        }
        let aggregates: Vec<&str> = handled.keys().copied().collect();
        let sequences: Vec<i64> = handled.values().map(|(s, _)| *s).collect();
        let positions: Vec<i64> = handled.values().map(|(_, p)| *p).collect();
        guards::advance_many(tx, projection, &aggregates, &sequences, &positions).await?;
    }
    Ok(())
}

/// Records `event` as a dead letter of `projection` with `reason`.
async fn dead_letter(
    tx: &mut PgConnection,
    projection: &str,
    event: &RecordedEvent,
    origin: Origin,
    reason: String,
) -> Result<(), sqlx::Error> {
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
    dead_letters::record(tx, &letter).await
}

/// Decodes `events` and applies them to `projection` (its rows only; the guards are the
/// caller's), decrypting personal fields with `keys`. Returns the events refused: (index
/// in `events`, reason).
pub async fn project_batch(
    tx: &mut PgConnection,
    keys: &KeyStore,
    projection: &str,
    events: &[&RecordedEvent],
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    project_decoded(tx, projection, events, &Decoded::empty(keys)).await
}

/// Why a personal field of an event gave no text to show.
enum Unrevealed {
    /// The event's fault (the dead letter's reason): authentication failed, malformed,
    /// unknown subject or version, no data subject. Never holds plaintext or ciphertext.
    Refused(String),
    /// PostgreSQL failed while loading the key: the batch is retried.
    Database(sqlx::Error),
}

/// The text to show for the personal `field` of `event`, sealed under `subject`'s key:
/// the plaintext, or [`ERASED_MARKER`] when the subject's key was destroyed (never a dead
/// letter: a rebuild or replay after an erasure gives the marker, as live apply does).
async fn reveal(
    keys: &KeyStore,
    batch_keys: &mut BatchKeys,
    event: &RecordedEvent,
    subject: Option<&str>,
    field: &str,
    text: &str,
) -> Result<String, Unrevealed> {
    let Some(subject) = subject.and_then(|s| s.parse::<uuid::Uuid>().ok()) else {
        return Err(Unrevealed::Refused(format!(
            "{} {}: no data subject to decrypt its {field} with",
            event.event_type, event.event_id
        )));
    };
    match batch_keys
        .decrypt(keys, subject, event.event_id, field, text)
        .await
    {
        Ok(plaintext) => Ok(plaintext),
        Err(DecryptError::KeyErased { .. }) => Ok(ERASED_MARKER.to_owned()),
        Err(DecryptError::KeyUnavailable(StoreError::Database(err))) => {
            Err(Unrevealed::Database(err))
        }
        Err(err) => {
            let mut reason = format!(
                "{} {}: its {field} cannot be decrypted: {err}",
                event.event_type, event.event_id
            );
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                reason.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            Err(Unrevealed::Refused(reason))
        }
    }
}

/// The data keys one batch has used, by subject and version: each is taken from the key
/// store (its cache, or PostgreSQL) once per batch instead of once per field. Only live and
/// erased keys are kept; a failure is asked again (it ends in a dead letter or a retry).
#[derive(Default)]
struct BatchKeys(HashMap<(uuid::Uuid, u32), Result<ledger_pii::SubjectKey, DateTime<Utc>>>);

impl BatchKeys {
    /// [`KeyStore::decrypt`] through this batch's keys.
    async fn decrypt(
        &mut self,
        keys: &KeyStore,
        subject: uuid::Uuid,
        event_id: uuid::Uuid,
        field: &str,
        text: &str,
    ) -> Result<String, DecryptError> {
        let ciphertext = ledger_pii::Ciphertext::parse(text)?;
        let version = ciphertext.key_version();
        let known = match self.0.entry((subject, version)) {
            std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(match keys.load(subject, version).await {
                    Ok(key) => Ok(key),
                    Err(StoreError::Erased { erased_at, .. }) => Err(erased_at),
                    Err(other) => return Err(other.into()),
                })
            }
        };
        match known {
            Ok(key) => Ok(key.decrypt_parsed(event_id, field, &ciphertext)?),
            Err(erased_at) => Err(DecryptError::KeyErased {
                subject,
                erased_at: *erased_at,
            }),
        }
    }
}

/// [`project_batch`] with the payloads looked up in `decoded` first.
async fn project_decoded(
    tx: &mut PgConnection,
    projection: &str,
    events: &[&RecordedEvent],
    decoded: &Decoded<'_>,
) -> Result<Vec<(usize, String)>, sqlx::Error> {
    let mut refused = Vec::new();
    let mut accounts: Vec<(usize, &RecordedEvent, &AccountEvent)> = Vec::new();
    let mut subject_events: Vec<(usize, &RecordedEvent, &SubjectEvent)> = Vec::new();
    let mut for_subjects: Vec<(usize, &RecordedEvent, &LedgerEvent)> = Vec::new();
    let mut transfer_events: Vec<(usize, &RecordedEvent, &TransferEvent)> = Vec::new();
    // By event id: the text to show for an encrypted field (decrypted, or the marker).
    let mut shown: HashMap<uuid::Uuid, String> = HashMap::new();
    let mut batch_keys = BatchKeys::default();
    let takes_accounts = matches!(
        projection,
        names::ACCOUNT_SUMMARY | names::ACCOUNT_STATEMENT | names::SUBJECT_TOTALS
    );
    let payloads: Vec<Cow<'_, DecodeResult>> =
        events.iter().map(|event| decoded.get(event)).collect();
    for (index, (event, payload)) in events.iter().zip(&payloads).enumerate() {
        // The one personal field of this event this projection shows, if any.
        let sealed: Option<(Option<&str>, &str, &str)> = match (projection, payload.as_ref()) {
            (
                names::ACCOUNT_STATEMENT,
                Ok(LedgerEvent::Account(
                    AccountEvent::MoneyDeposited {
                        reference: Some(text),
                        ..
                    }
                    | AccountEvent::MoneyWithdrawn {
                        reference: Some(text),
                        ..
                    },
                )),
            ) if ledger_pii::is_encrypted(text) => Some((
                event.metadata.data_subject.as_deref(),
                subject_fields::REFERENCE,
                text.as_str(),
            )),
            (
                names::SUBJECTS,
                Ok(LedgerEvent::Subject(SubjectEvent::SubjectRegistered { name })),
            ) => {
                if !ledger_pii::is_encrypted(name) {
                    refused.push((
                        index,
                        format!(
                            "{} {}: its name is not a pii1 ciphertext",
                            event.event_type, event.event_id
                        ),
                    ));
                    continue;
                }
                Some((
                    Some(event.aggregate_id.as_str()),
                    subject_fields::NAME,
                    name.as_str(),
                ))
            }
            _ => None,
        };
        if let Some((subject, field, text)) = sealed {
            match reveal(&decoded.keys, &mut batch_keys, event, subject, field, text).await {
                Ok(text) => {
                    shown.insert(event.event_id, text);
                }
                Err(Unrevealed::Refused(reason)) => {
                    refused.push((index, reason));
                    continue;
                }
                Err(Unrevealed::Database(err)) => return Err(err),
            }
        }
        match payload.as_ref() {
            Err(err) => refused.push((index, err.clone())),
            Ok(ledger @ (LedgerEvent::Account(_) | LedgerEvent::Subject(_)))
                if projection == names::SUBJECTS =>
            {
                for_subjects.push((index, *event, ledger));
            }
            Ok(LedgerEvent::Account(account)) if takes_accounts => {
                accounts.push((index, *event, account));
            }
            Ok(LedgerEvent::Subject(subject)) if projection == names::ACCOUNT_STATEMENT => {
                subject_events.push((index, *event, subject));
            }
            Ok(LedgerEvent::Transfer(transfer)) if projection == names::TRANSFERS => {
                transfer_events.push((index, *event, transfer));
            }
            Ok(_) => refused.push((
                index,
                format!(
                    "projection `{projection}` does not take {} events",
                    event.aggregate_type
                ),
            )),
        }
    }
    if !accounts.is_empty() {
        let batch: Vec<(&RecordedEvent, &AccountEvent)> =
            accounts.iter().map(|(_, e, d)| (*e, *d)).collect();
        let by_model = match projection {
            names::ACCOUNT_SUMMARY => summaries::apply_batch(tx, &batch).await?,
            names::ACCOUNT_STATEMENT => statements::apply_batch(tx, &batch, &shown).await?,
            _ => subject_totals::apply_batch(tx, &batch).await?,
        };
        refused.extend(
            by_model
                .into_iter()
                .map(|(i, reason)| (accounts[i].0, reason)),
        );
    }
    if !subject_events.is_empty() {
        let batch: Vec<(&RecordedEvent, &SubjectEvent)> =
            subject_events.iter().map(|(_, e, d)| (*e, *d)).collect();
        refused.extend(
            statements::apply_subject_batch(tx, &batch)
                .await?
                .into_iter()
                .map(|(i, reason)| (subject_events[i].0, reason)),
        );
    }
    if !for_subjects.is_empty() {
        let mut batch: Vec<(&RecordedEvent, SubjectChange<'_>)> =
            Vec::with_capacity(for_subjects.len());
        let mut indexes = Vec::with_capacity(for_subjects.len());
        for (index, event, ledger) in &for_subjects {
            match SubjectChange::of(ledger, shown.get(&event.event_id).map(String::as_str)) {
                Ok(change) => {
                    batch.push((*event, change));
                    indexes.push(*index);
                }
                Err(reason) => refused.push((*index, reason)),
            }
        }
        refused.extend(
            subjects::apply_batch(tx, &batch)
                .await?
                .into_iter()
                .map(|(i, reason)| (indexes[i], reason)),
        );
    }
    if !transfer_events.is_empty() {
        let batch: Vec<(&RecordedEvent, &TransferEvent)> =
            transfer_events.iter().map(|(_, e, d)| (*e, *d)).collect();
        refused.extend(
            transfers::apply_batch(tx, &batch)
                .await?
                .into_iter()
                .map(|(i, reason)| (transfer_events[i].0, reason)),
        );
    }
    refused.sort_by_key(|(index, _)| *index);
    Ok(refused)
}

/// Decodes `event` and applies it to `projection` alone, without looking at the guard (an
/// operator's retry of a dead letter): the same code as a batch of one.
pub async fn project(
    tx: &mut PgConnection,
    keys: &KeyStore,
    projection: &str,
    event: &RecordedEvent,
) -> Result<(), ApplyError> {
    match project_batch(tx, keys, projection, &[event]).await?.pop() {
        Some((_, reason)) => Err(ApplyError::Refused(reason)),
        None => Ok(()),
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
