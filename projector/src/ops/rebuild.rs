//! Rebuilding projections without downtime.
//!
//! The shadow copy of a projection lives in schema `rebuild_<projection>`: the projection's
//! tables plus its own guards, checkpoint and dead letters, created `LIKE` the live ones.
//! Events are read from the event store (the source of truth) in commit-safe order and
//! applied with the very code the live projector uses ([`apply_decoded`], batch by batch),
//! by running it with `search_path` set to the shadow schema first. Each batch commits with
//! the shadow's cursor, so a rebuild killed half way resumes where it stopped.
//!
//! Several projections rebuild in ONE pass over the log ([`rebuild_many`], ADR 0018): the
//! log is read once, a batch ahead of the one being applied (on a connection of its own),
//! each batch's payloads are decoded once, and the batch is applied to every shadow at
//! once, each on its own connection in its own transaction with its own cursor. A rebuild
//! of one projection is the same pass with one shadow.
//!
//! The swap is one transaction per projection: lock the live tables (the live projector
//! and readers wait a moment), apply what arrived since, replace the live tables and guards
//! with the shadow's, record the projection's version, drop the shadow. Readers see the old
//! model or the new one, never a half-built one. A session advisory lock per projection
//! refuses a second rebuild of the same projection; a pass takes all of its projections'
//! locks, in [`names::ALL`] order, or refuses to start.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use ledger_pii::KeyStore;
use ledger_readmodels::{dead_letters, guards, names};
use ledger_store::LogCursor;
use serde::Serialize;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};

use super::{known, OpError};
use crate::apply::{apply_decoded, apply_events, Applied, Decoded, Origin};

/// Where a rebuild is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Events read from the store so far (including before a resume).
    pub events: i64,
    /// Events in the store when the rebuild started.
    pub total: i64,
    /// Global position of the last event applied to the shadow.
    pub position: i64,
}

/// How many rows of a dry run differ, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
}

/// How a dry run's shadow differs from the live model, per table. The rows are the first
/// [`SAMPLES`] of each kind (the report stays small whatever the table's size); every
/// difference goes to the dry run's sink as it is found ([`dry_run`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Differences {
    /// Rows the rebuilt model has and the live one lacks.
    pub missing: Vec<Value>,
    /// Rows the live model has and the rebuilt one lacks.
    pub extra: Vec<Value>,
    /// Rows present in both with different values: `{live, rebuilt}`.
    pub different: Vec<Value>,
    /// How many of each kind there are in all.
    pub counts: Counts,
    /// Whether some rows were left out of the lists above (see `counts`).
    pub truncated: bool,
}

/// Rows of each kind a report keeps per table.
pub const SAMPLES: usize = 100;

impl Differences {
    /// No difference at all.
    pub fn is_empty(&self) -> bool {
        self.counts == Counts::default()
    }

    fn add(&mut self, kind: &str, row: Value) {
        let (list, count) = match kind {
            "missing" => (&mut self.missing, &mut self.counts.missing),
            "extra" => (&mut self.extra, &mut self.counts.extra),
            _ => (&mut self.different, &mut self.counts.different),
        };
        *count += 1;
        if list.len() < SAMPLES {
            list.push(row);
        } else {
            self.truncated = true;
        }
    }
}

/// One difference a dry run found, as it is found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference<'a> {
    pub table: &'a str,
    /// `missing`, `extra` or `different`.
    pub kind: &'a str,
    pub row: &'a Value,
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// The projection.
    pub projection: String,
    /// Final progress.
    pub progress: Progress,
    /// Whether the shadow was swapped in (false for a dry run).
    pub swapped: bool,
    /// For a dry run: the differences, by table.
    pub differences: BTreeMap<String, Differences>,
}

/// The shadow schema of `projection`.
pub fn shadow_schema(projection: &str) -> String {
    format!("rebuild_{projection}")
}

/// Whether a shadow of `projection` exists (a rebuild running, or stopped half way).
pub async fn in_progress(pool: &PgPool, projection: &str) -> Result<Option<i64>, sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(shadow_schema(projection))
            .fetch_one(pool)
            .await?;
    if !exists {
        return Ok(None);
    }
    let position: Option<i64> = sqlx::query_scalar(&format!(
        "SELECT global_position FROM {}.projection_checkpoints WHERE projection = $1",
        shadow_schema(projection)
    ))
    .bind(projection)
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    Ok(Some(position.unwrap_or(0)))
}

/// Rebuilds `projection` (or, with `dry_run`, builds and compares), calling `on_progress`
/// after every batch.
pub async fn rebuild(
    pool: &PgPool,
    keys: &KeyStore,
    projection: &str,
    batch_size: i64,
    dry_run: bool,
    mut on_progress: impl FnMut(Progress) + Send,
) -> Result<Report, OpError> {
    let mode = if dry_run {
        Mode::DryRun(&mut |_: Difference<'_>| {})
    } else {
        Mode::Swap
    };
    let mut reports = run_locked(
        pool,
        keys,
        &[projection],
        batch_size,
        mode,
        &mut |_, progress| {
            on_progress(progress);
        },
    )
    .await?;
    reports
        .pop()
        .ok_or_else(|| OpError::UnknownProjection(projection.to_owned()))
}

/// The projections an operator names: `all`, or names separated by commas; in
/// [`names::ALL`] order, each once (the order every lock and swap takes them in).
pub fn selection(names_given: &str) -> Result<Vec<&'static str>, OpError> {
    let given: Vec<&str> = names_given.split(',').map(str::trim).collect();
    if given == ["all"] {
        return Ok(names::ALL.to_vec());
    }
    for name in &given {
        known(name)?;
    }
    Ok(names::ALL
        .into_iter()
        .filter(|name| given.contains(name))
        .collect())
}

/// Rebuilds several projections in ONE pass over the log (ADR 0018): each batch is read
/// once (the next one read meanwhile on its own connection), its payloads decoded once, and
/// applied to every projection's shadow concurrently, each in its own transaction on its
/// own connection with its own checkpoint (so each resumes on its own after a kill). Once
/// the pass reaches the store's head, the shadows are swapped in one after the other, each
/// in its own transaction as [`rebuild`] does. Takes every projection's lock first, in
/// [`names::ALL`] order, and refuses to start if any is held. `on_progress` is called with
/// each projection's progress after every batch. A dry run compares one projection at a
/// time: use [`dry_run`].
pub async fn rebuild_many(
    pool: &PgPool,
    keys: &KeyStore,
    projections: &[&str],
    batch_size: i64,
    mut on_progress: impl FnMut(&str, Progress) + Send,
) -> Result<Vec<Report>, OpError> {
    run_locked(
        pool,
        keys,
        projections,
        batch_size,
        Mode::Swap,
        &mut on_progress,
    )
    .await
}

/// Builds a shadow of `projection` and compares it with the live model without changing
/// it, calling `on_progress` after every batch and `on_difference` for every row that
/// differs, as the comparison finds it (nothing is held in memory but the report's samples).
///
/// The comparison runs in one transaction that holds the live projector back (the guards
/// lock of the swap), brings the shadow to the store's head and the live model to the same
/// point (the events it lags behind on, applied through its guards), compares, and rolls
/// back: lag is never reported as a difference, and the live model is left as it was.
pub async fn dry_run(
    pool: &PgPool,
    keys: &KeyStore,
    projection: &str,
    batch_size: i64,
    mut on_progress: impl FnMut(Progress) + Send,
    on_difference: &mut (dyn FnMut(Difference<'_>) + Send),
) -> Result<Report, OpError> {
    let mut reports = run_locked(
        pool,
        keys,
        &[projection],
        batch_size,
        Mode::DryRun(on_difference),
        &mut |_, progress| on_progress(progress),
    )
    .await?;
    reports
        .pop()
        .ok_or_else(|| OpError::UnknownProjection(projection.to_owned()))
}

/// What to do with the shadow once built.
enum Mode<'a> {
    Swap,
    DryRun(&'a mut (dyn FnMut(Difference<'_>) + Send)),
}

/// Batches read ahead of the one being applied.
const READ_AHEAD: usize = 2;

async fn run_locked(
    pool: &PgPool,
    keys: &KeyStore,
    projections: &[&str],
    batch_size: i64,
    mode: Mode<'_>,
    on_progress: &mut (dyn FnMut(&str, Progress) + Send),
) -> Result<Vec<Report>, OpError> {
    let mut selected = Vec::new();
    for projection in projections {
        selected.extend(selection(projection)?);
    }
    let selected: Vec<&'static str> = names::ALL
        .into_iter()
        .filter(|name| selected.contains(name))
        .collect();
    if selected.is_empty() {
        return Err(OpError::Invalid("no projection named".into()));
    }
    if matches!(mode, Mode::DryRun(_)) && selected.len() != 1 {
        return Err(OpError::Invalid(
            "a dry run compares one projection at a time".into(),
        ));
    }

    // One rebuild per projection at a time, held for the whole run: every lock taken on one
    // connection of its own, in `names::ALL` order, or none (closing it releases them).
    let options = pool.connect_options();
    let mut lock = PgConnection::connect_with(&options).await?;
    for projection in &selected {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(format!("ledger-rebuild:{projection}"))
            .fetch_one(&mut lock)
            .await?;
        if !locked {
            let _ = lock.close().await;
            return Err(OpError::AlreadyRunning((*projection).to_owned()));
        }
    }

    // Connections of its own: the read ahead, one per shadow, one for the swap's reads; so
    // a rebuild never starves the pool of the process it runs in (the projector's admin API).
    let connections = u32::try_from(selected.len()).unwrap_or(4) + 2;
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_lazy_with((*options).clone());
    let result = run(&own, keys, &selected, batch_size, mode, on_progress).await;
    own.close().await;
    let _ = lock.close().await;
    result
}

/// One projection's shadow, as the pass builds it.
struct Shadow {
    projection: &'static str,
    tables: &'static [&'static str],
    schema: String,
    /// The last event applied to it.
    cursor: LogCursor,
    /// Events read for it so far (including before a resume).
    events: i64,
}

impl Shadow {
    fn progress(&self, total: i64) -> Progress {
        Progress {
            events: self.events,
            total: total.max(self.events),
            position: self.cursor.global_position,
        }
    }
}

async fn run(
    pool: &PgPool,
    keys: &KeyStore,
    selected: &[&'static str],
    batch_size: i64,
    mode: Mode<'_>,
    on_progress: &mut (dyn FnMut(&str, Progress) + Send),
) -> Result<Vec<Report>, OpError> {
    let mut shadows = Vec::with_capacity(selected.len());
    for &projection in selected {
        let tables = known(projection)?;
        let schema = shadow_schema(projection);
        create_shadow(pool, &schema, tables).await?;
        let (cursor, events) = shadow_cursor(pool, &schema, projection).await?;
        shadows.push(Shadow {
            projection,
            tables,
            schema,
            cursor,
            events,
        });
    }
    let (total, _) = ledger_store::head(pool).await?;
    load(pool, keys, &mut shadows, total, batch_size, on_progress).await?;

    let mut reports = Vec::with_capacity(shadows.len());
    if let Mode::DryRun(on_difference) = mode {
        for shadow in &shadows {
            let mut report = Report {
                projection: shadow.projection.to_owned(),
                progress: shadow.progress(total),
                ..Report::default()
            };
            let compared = compare(
                pool,
                keys,
                shadow.projection,
                shadow.tables,
                &shadow.schema,
                shadow.cursor,
                &mut report,
                &mut *on_difference,
            )
            .await;
            sqlx::query(&format!("DROP SCHEMA {} CASCADE", shadow.schema))
                .execute(pool)
                .await?;
            compared?;
            reports.push(report);
        }
        return Ok(reports);
    }
    // Each shadow swaps in its own transaction, one after the other (ADR 0018).
    for shadow in &shadows {
        let mut report = Report {
            projection: shadow.projection.to_owned(),
            progress: shadow.progress(total),
            ..Report::default()
        };
        swap_with_retries(pool, keys, shadow, &mut report).await?;
        report.swapped = true;
        on_progress(shadow.projection, report.progress);
        reports.push(report);
    }
    Ok(reports)
}

/// The pass: reads the log from the earliest shadow's cursor to the head, a batch ahead of
/// the one being applied, and applies each batch to every shadow still behind it.
async fn load(
    pool: &PgPool,
    keys: &KeyStore,
    shadows: &mut [Shadow],
    total: i64,
    batch_size: i64,
    on_progress: &mut (dyn FnMut(&str, Progress) + Send),
) -> Result<(), OpError> {
    for shadow in shadows.iter() {
        on_progress(shadow.projection, shadow.progress(total));
    }
    let start = shadows.iter().map(|s| s.cursor).min().unwrap_or_default();
    let mut batches = ReadAhead::start(pool.clone(), start, batch_size);
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        let decoded = Decoded::of(keys, batch.iter().map(|entry| &entry.event));
        let applied = futures::future::try_join_all(
            shadows
                .iter()
                .map(|shadow| apply_to_shadow(pool, shadow, &batch, &decoded)),
        )
        .await?;
        for (shadow, applied) in shadows.iter_mut().zip(applied) {
            if let Some((cursor, events)) = applied {
                shadow.cursor = cursor;
                shadow.events += events;
                on_progress(shadow.projection, shadow.progress(total));
            }
        }
    }
    Ok(())
}

/// Applies the entries of `batch` past `shadow`'s cursor to it, with its cursor, in one
/// transaction of its own; returns its new cursor and how many events it took.
async fn apply_to_shadow(
    pool: &PgPool,
    shadow: &Shadow,
    batch: &[ledger_store::LogEntry],
    decoded: &Decoded<'_>,
) -> Result<Option<(LogCursor, i64)>, sqlx::Error> {
    let rest = &batch[batch.partition_point(|entry| entry.cursor <= shadow.cursor)..];
    let Some(last) = rest.last().map(|entry| entry.cursor) else {
        return Ok(None);
    };
    let mut tx = pool.begin().await?;
    use_schema(&mut tx, &shadow.schema).await?;
    let applied = apply_batch(&mut tx, shadow.projection, rest, decoded).await?;
    save_cursor(&mut tx, shadow.projection, last, applied).await?;
    tx.commit().await?;
    Ok(Some((last, applied)))
}

/// The log read a batch ahead, on a connection of its own, into a channel of
/// [`READ_AHEAD`] batches: batch n+1 is read while batch n is applied. The reading task
/// ends at the head, on an error (handed over as the last item), or when this is dropped.
struct ReadAhead {
    batches: tokio::sync::mpsc::Receiver<Result<Vec<ledger_store::LogEntry>, sqlx::Error>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ReadAhead {
    fn start(pool: PgPool, mut cursor: LogCursor, batch_size: i64) -> Self {
        let (sender, batches) = tokio::sync::mpsc::channel(READ_AHEAD);
        let reader = tokio::spawn(async move {
            loop {
                let batch = ledger_store::read_after(&pool, cursor, batch_size).await;
                let next = match &batch {
                    Ok(entries) => match entries.last() {
                        Some(last) => Some(last.cursor),
                        None => break,
                    },
                    Err(_) => None,
                };
                if sender.send(batch).await.is_err() {
                    break;
                }
                match next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
        });
        Self { batches, reader }
    }

    async fn next(&mut self) -> Option<Result<Vec<ledger_store::LogEntry>, sqlx::Error>> {
        self.batches.recv().await
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The swap (see [`swap`]), tried again when PostgreSQL rolled it back for a lock conflict:
/// a swap waits for the live projector's batches; should PostgreSQL still break a lock
/// cycle (or a lock wait time out), the whole swap rolls back and is tried again.
async fn swap_with_retries(
    pool: &PgPool,
    keys: &KeyStore,
    shadow: &Shadow,
    report: &mut Report,
) -> Result<(), sqlx::Error> {
    let mut backoff = std::time::Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        let before = report.progress;
        match swap(
            pool,
            keys,
            shadow.projection,
            shadow.tables,
            &shadow.schema,
            shadow.cursor,
            report,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(err) if is_lock_conflict(&err) && attempt < SWAP_ATTEMPTS => {
                tracing::warn!(projection = shadow.projection, attempt, error = %err, "swap rolled back; trying again");
                report.progress = before;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

/// How often a swap PostgreSQL rolled back for a lock conflict is tried.
const SWAP_ATTEMPTS: u32 = 10;

/// A deadlock, a serialization failure or a lock wait that timed out: the swap's state, not
/// its fault, so it is tried again.
fn is_lock_conflict(err: &sqlx::Error) -> bool {
    matches!(
        err.as_database_error().and_then(|db| db.code()).as_deref(),
        Some("40P01" | "40001" | "55P03")
    )
}

async fn create_shadow(pool: &PgPool, schema: &str, tables: &[&str]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await?;
    for table in tables.iter().chain(
        [
            "projection_guards",
            "projection_checkpoints",
            "dead_letters",
        ]
        .iter(),
    ) {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{table} (LIKE public.{table} INCLUDING ALL)"
        ))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

async fn use_schema(tx: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("SET LOCAL search_path TO {schema}, public"))
        .execute(tx)
        .await?;
    Ok(())
}

async fn shadow_cursor(
    pool: &PgPool,
    schema: &str,
    projection: &str,
) -> Result<(LogCursor, i64), sqlx::Error> {
    let row: Option<(Option<i64>, i64, i64)> = sqlx::query_as(&format!(
        "SELECT transaction_id::text::bigint, global_position, events_applied
           FROM {schema}.projection_checkpoints WHERE projection = $1"
    ))
    .bind(projection)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((Some(transaction_id), global_position, events)) => (
            LogCursor {
                transaction_id,
                global_position,
            },
            events,
        ),
        _ => (LogCursor::default(), 0),
    })
}

async fn apply_batch(
    tx: &mut PgConnection,
    projection: &str,
    batch: &[ledger_store::LogEntry],
    decoded: &Decoded<'_>,
) -> Result<i64, sqlx::Error> {
    let mut outcome = Applied::default();
    let events: Vec<_> = batch
        .iter()
        .map(|entry| {
            (
                &entry.event,
                Origin::Store {
                    cursor: entry.cursor,
                },
            )
        })
        .collect();
    // Events an operator skipped for this projection stay out of the rebuilt model as they
    // are out of the live one (ADR 0014): their guard moves past them, nothing else.
    let ids: Vec<uuid::Uuid> = events.iter().map(|(e, _)| e.event_id).collect();
    let skipped = dead_letters::skipped(tx, projection, &ids).await?;
    let mut rest = events.as_slice();
    while let Some(at) = rest.iter().position(|(e, _)| skipped.contains(&e.event_id)) {
        let (before, after) = rest.split_at(at);
        apply_decoded(tx, &[projection], before, decoded, &mut outcome).await?;
        let (event, _) = after[0];
        if names::handles(projection, &event.aggregate_type) {
            let id = event.aggregate_id.as_str();
            guards::lock_many(tx, projection, &[id]).await?;
            guards::advance_many(
                tx,
                projection,
                &[id],
                &[event.sequence],
                &[event.global_position],
            )
            .await?;
        }
        rest = &after[1..];
    }
    apply_decoded(tx, &[projection], rest, decoded, &mut outcome).await?;
    Ok(i64::try_from(batch.len()).unwrap_or(i64::MAX))
}

async fn save_cursor(
    tx: &mut PgConnection,
    projection: &str,
    cursor: LogCursor,
    events: i64,
) -> Result<(), sqlx::Error> {
    ledger_readmodels::progress::advance(
        tx,
        projection,
        cursor.global_position,
        chrono::Utc::now(),
        events,
        Some((cursor.transaction_id, cursor.global_position)),
    )
    .await
}

/// Applies to the shadow in `schema`, inside `tx` (which holds the guards lock), what
/// committed after `cursor`. Used by the swap and the dry run, so both swap or compare a
/// shadow that is at the store's head.
async fn catch_up_shadow(
    pool: &PgPool,
    keys: &KeyStore,
    tx: &mut PgConnection,
    projection: &str,
    schema: &str,
    mut cursor: LogCursor,
    report: &mut Report,
) -> Result<(), sqlx::Error> {
    use_schema(tx, schema).await?;
    loop {
        let batch = ledger_store::read_after(pool, cursor, 1000).await?;
        let Some(last) = batch.last().map(|e| e.cursor) else {
            break;
        };
        let decoded = Decoded::of(keys, batch.iter().map(|entry| &entry.event));
        let applied = apply_batch(tx, projection, &batch, &decoded).await?;
        save_cursor(tx, projection, last, applied).await?;
        cursor = last;
        report.progress.events += applied;
        report.progress.position = cursor.global_position;
    }
    sqlx::query("SET LOCAL search_path TO public")
        .execute(tx)
        .await?;
    Ok(())
}

/// The atomic swap (see the module documentation).
async fn swap(
    pool: &PgPool,
    keys: &KeyStore,
    projection: &str,
    tables: &[&str],
    schema: &str,
    cursor: LogCursor,
    report: &mut Report,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Guards before tables, the order in which the live projector takes its locks (ADR
    // 0013): a projector batch that holds guards and waits for a live table would otherwise
    // deadlock with this swap replacing those guards. SHARE ROW EXCLUSIVE waits for the
    // batches in flight and holds the next ones back; readers are not blocked by it.
    sqlx::query("LOCK TABLE public.projection_guards IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let live: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        live.join(", ")
    ))
    .execute(&mut *tx)
    .await?;
    // What committed since the last batch, applied under the lock.
    catch_up_shadow(pool, keys, &mut tx, projection, schema, cursor, report).await?;
    for table in tables {
        // `LIKE … INCLUDING ALL` names the shadow's indexes after their columns; the live
        // names come back after the move, so migrations that name an index still find it.
        let names = index_names(&mut tx, table).await?;
        sqlx::query(&format!("DROP TABLE public.{table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
            .execute(&mut *tx)
            .await?;
        for (moved, definition) in index_names(&mut tx, table).await? {
            let live = names.iter().find(|(_, d)| *d == definition);
            if let Some((name, _)) = live.filter(|(name, _)| *name != moved) {
                sqlx::query(&format!("ALTER INDEX public.{moved} RENAME TO {name}"))
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    sqlx::query("DELETE FROM public.projection_guards WHERE projection = $1")
        .bind(projection)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO public.projection_guards SELECT * FROM {schema}.projection_guards"
    ))
    .execute(&mut *tx)
    .await?;
    // Dead letters of the rebuilt model replace the pending ones of the old model.
    sqlx::query("UPDATE public.dead_letters SET status = 'superseded' WHERE projection = $1 AND status = 'pending'")
        .bind(projection)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!(
        "INSERT INTO public.dead_letters
             (projection, reason, event_id, aggregate_id, sequence, global_position, event_type,
              event_version, source, kafka_partition, kafka_offset, raw_headers, raw_value)
         SELECT projection, reason, event_id, aggregate_id, sequence, global_position, event_type,
                event_version, source, kafka_partition, kafka_offset, raw_headers, raw_value
           FROM {schema}.dead_letters
         ON CONFLICT DO NOTHING"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "UPDATE public.projection_checkpoints p
            SET last_position = greatest(p.last_position, s.last_position),
                last_event_at = greatest(p.last_event_at, s.last_event_at),
                updated_at = now()
           FROM {schema}.projection_checkpoints s
          WHERE p.projection = s.projection"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO projection_versions (projection, version, built_at) VALUES ($1, $2, now())
         ON CONFLICT (projection) DO UPDATE SET version = EXCLUDED.version, built_at = now()",
    )
    .bind(projection)
    .bind(names::version(projection))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut *tx)
        .await?;
    // Readers drop cached rows built from the old model.
    sqlx::query("SELECT pg_notify($1, '*')")
        .bind(ledger_readmodels::CHANGES_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The indexes of `public.table`: (name, definition without the name).
async fn index_names(
    tx: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT indexname::text, regexp_replace(indexdef, 'INDEX \\S+ ON ', 'INDEX ON ')
           FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1",
    )
    .bind(table)
    .fetch_all(tx)
    .await
}

/// The dry run's comparison (see [`dry_run`]): under the guards lock, the shadow and the
/// live model are both brought to the store's head, compared table by table with the
/// differences streamed to `on_difference`, and everything rolled back.
// The key store joined the seven it had; bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
async fn compare(
    pool: &PgPool,
    keys: &KeyStore,
    projection: &str,
    tables: &[&str],
    schema: &str,
    cursor: LogCursor,
    report: &mut Report,
    on_difference: &mut (dyn FnMut(Difference<'_>) + Send),
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // As the swap: the live projector's batches in flight finish, the next ones wait.
    sqlx::query("LOCK TABLE public.projection_guards IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    catch_up_shadow(pool, keys, &mut tx, projection, schema, cursor, report).await?;
    // The live model's lag: aggregates whose live guard is behind the shadow's, brought to
    // the same sequence through the live guards (rolled back at the end).
    let lagging: Vec<(String, String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT e.aggregate_type, s.aggregate_id, coalesce(l.last_sequence, 0), s.last_sequence
           FROM {schema}.projection_guards s
           JOIN events e ON e.aggregate_id = s.aggregate_id AND e.sequence = s.last_sequence
           LEFT JOIN public.projection_guards l
                  ON l.projection = s.projection AND l.aggregate_id = s.aggregate_id
          WHERE s.projection = $1 AND s.last_sequence > coalesce(l.last_sequence, 0)"
    ))
    .bind(projection)
    .fetch_all(&mut *tx)
    .await?;
    let mut behind = Vec::new();
    for (aggregate_type, aggregate_id, live, shadow) in &lagging {
        behind.extend(
            ledger_store::events_of(&mut tx, aggregate_type, aggregate_id, live + 1, *shadow)
                .await?,
        );
    }
    behind.sort_by_key(|event| event.global_position);
    let origin = Origin::Store {
        cursor: LogCursor::default(),
    };
    let behind: Vec<_> = behind.iter().map(|event| (event, origin)).collect();
    apply_events(
        &mut tx,
        keys,
        &[projection],
        &behind,
        &mut Applied::default(),
    )
    .await?;
    if !lagging.is_empty() {
        tracing::info!(
            projection,
            aggregates = lagging.len(),
            events = behind.len(),
            "dry run: the live model lags; compared as of the store's head"
        );
    }
    for table in tables {
        let mut differences = Differences::default();
        let query = differences_query(schema, table);
        let mut rows = sqlx::query_as::<_, (String, Value)>(&query).fetch(&mut *tx);
        while let Some((kind, row)) = rows.try_next().await? {
            on_difference(Difference {
                table,
                kind: &kind,
                row: &row,
            });
            differences.add(&kind, row);
        }
        drop(rows);
        report.differences.insert((*table).to_owned(), differences);
    }
    tx.rollback().await
}

/// The rows of `table` that differ between the live model and the shadow, paired by key.
fn differences_query(schema: &str, table: &str) -> String {
    let key = names::primary_key(table);
    let join = key
        .iter()
        .map(|c| format!("l.{c} = s.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    format!(
        "SELECT 'missing', to_jsonb(s) FROM {schema}.{table} s
          WHERE NOT EXISTS (SELECT 1 FROM public.{table} l WHERE {join})
         UNION ALL
         SELECT 'extra', to_jsonb(l) FROM public.{table} l
          WHERE NOT EXISTS (SELECT 1 FROM {schema}.{table} s WHERE {join})
         UNION ALL
         SELECT 'different', jsonb_build_object('live', to_jsonb(l), 'rebuilt', to_jsonb(s))
           FROM public.{table} l JOIN {schema}.{table} s ON {join}
          WHERE to_jsonb(l) <> to_jsonb(s)"
    )
}
