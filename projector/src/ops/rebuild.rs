//! Rebuilding a projection without downtime.
//!
//! The shadow copy lives in schema `rebuild_<projection>`: the projection's tables plus its
//! own guards, checkpoint and dead letters, created `LIKE` the live ones. Events are read
//! from the event store (the source of truth) in commit-safe order and applied with the
//! very code the live projector uses ([`apply_events`], batch by batch), by running it with
//! `search_path` set to the shadow schema first. Each batch commits with the shadow's cursor, so a rebuild killed half way
//! resumes where it stopped. The swap is one transaction: lock the live tables (the live
//! projector and readers wait a moment), apply what arrived since, replace the live tables
//! and guards with the shadow's, record the projection's version, drop the shadow. Readers
//! see the old model or the new one, never a half-built one. A session advisory lock
//! refuses a second rebuild of the same projection.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use ledger_readmodels::{dead_letters, guards, names};
use ledger_store::LogCursor;
use serde::Serialize;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};

use super::{known, OpError};
use crate::apply::{apply_events, Applied, Origin};

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
    projection: &str,
    batch_size: i64,
    dry_run: bool,
    on_progress: impl FnMut(Progress) + Send,
) -> Result<Report, OpError> {
    let mode = if dry_run {
        Mode::DryRun(&mut |_: Difference<'_>| {})
    } else {
        Mode::Swap
    };
    run_locked(pool, projection, batch_size, mode, on_progress).await
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
    projection: &str,
    batch_size: i64,
    on_progress: impl FnMut(Progress) + Send,
    on_difference: &mut (dyn FnMut(Difference<'_>) + Send),
) -> Result<Report, OpError> {
    run_locked(
        pool,
        projection,
        batch_size,
        Mode::DryRun(on_difference),
        on_progress,
    )
    .await
}

/// What to do with the shadow once built.
enum Mode<'a> {
    Swap,
    DryRun(&'a mut (dyn FnMut(Difference<'_>) + Send)),
}

async fn run_locked(
    pool: &PgPool,
    projection: &str,
    batch_size: i64,
    mode: Mode<'_>,
    mut on_progress: impl FnMut(Progress) + Send,
) -> Result<Report, OpError> {
    let tables = known(projection)?;
    let schema = shadow_schema(projection);

    // One rebuild per projection at a time, held for the whole run.
    let mut lock = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
        .bind(format!("ledger-rebuild:{projection}"))
        .fetch_one(&mut lock)
        .await?;
    if !locked {
        return Err(OpError::AlreadyRunning(projection.to_owned()));
    }

    let result = run(
        pool,
        projection,
        tables,
        &schema,
        batch_size,
        mode,
        &mut on_progress,
    )
    .await;
    let _ = lock.close().await;
    result
}

async fn run(
    pool: &PgPool,
    projection: &str,
    tables: &[&str],
    schema: &str,
    batch_size: i64,
    mode: Mode<'_>,
    on_progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Report, OpError> {
    create_shadow(pool, schema, tables).await?;
    let (total, _) = ledger_store::head(pool).await?;
    let (mut cursor, mut events) = shadow_cursor(pool, schema, projection).await?;
    let mut progress = Progress {
        events,
        total,
        position: cursor.global_position,
    };
    on_progress(progress);
    loop {
        let batch = ledger_store::read_after(pool, cursor, batch_size).await?;
        if batch.is_empty() {
            break;
        }
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        use_schema(&mut tx, schema).await?;
        let applied = apply_batch(&mut tx, projection, &batch).await?;
        let last = batch.last().map_or(cursor, |e| e.cursor);
        save_cursor(&mut tx, projection, last, applied).await?;
        tx.commit().await?;
        cursor = last;
        events += applied;
        progress = Progress {
            events,
            total: total.max(events),
            position: cursor.global_position,
        };
        on_progress(progress);
    }

    let mut report = Report {
        projection: projection.to_owned(),
        progress,
        ..Report::default()
    };
    if let Mode::DryRun(on_difference) = mode {
        let compared = compare(
            pool,
            projection,
            tables,
            schema,
            cursor,
            &mut report,
            on_difference,
        )
        .await;
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(pool)
            .await?;
        compared?;
        return Ok(report);
    }
    // A swap waits for the live projector's batches; should PostgreSQL still break a lock
    // cycle (or a lock wait time out), the whole swap rolls back and is tried again.
    let mut backoff = std::time::Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        let before = report.progress;
        match swap(pool, projection, tables, schema, cursor, &mut report).await {
            Ok(()) => break,
            Err(err) if is_lock_conflict(&err) && attempt < SWAP_ATTEMPTS => {
                tracing::warn!(projection, attempt, error = %err, "swap rolled back; trying again");
                report.progress = before;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
                attempt += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
    report.swapped = true;
    on_progress(report.progress);
    Ok(report)
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
        apply_events(tx, &[projection], before, &mut outcome).await?;
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
    apply_events(tx, &[projection], rest, &mut outcome).await?;
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
        let applied = apply_batch(tx, projection, &batch).await?;
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
    catch_up_shadow(pool, &mut tx, projection, schema, cursor, report).await?;
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
async fn compare(
    pool: &PgPool,
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
    catch_up_shadow(pool, &mut tx, projection, schema, cursor, report).await?;
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
    apply_events(&mut tx, &[projection], &behind, &mut Applied::default()).await?;
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
