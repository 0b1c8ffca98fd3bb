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

/// How a dry run's shadow differs from the live model, per table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Differences {
    /// Rows the rebuilt model has and the live one lacks.
    pub missing: Vec<Value>,
    /// Rows the live model has and the rebuilt one lacks.
    pub extra: Vec<Value>,
    /// Rows present in both with different values: `{live, rebuilt}`.
    pub different: Vec<Value>,
}

impl Differences {
    /// No difference at all.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }
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
        dry_run,
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
    dry_run: bool,
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
    if dry_run {
        for table in tables {
            report
                .differences
                .insert((*table).to_owned(), differences(pool, schema, table).await?);
        }
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(pool)
            .await?;
        return Ok(report);
    }
    swap(pool, projection, tables, schema, cursor, &mut report).await?;
    report.swapped = true;
    on_progress(report.progress);
    Ok(report)
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

/// The atomic swap (see the module documentation).
async fn swap(
    pool: &PgPool,
    projection: &str,
    tables: &[&str],
    schema: &str,
    mut cursor: LogCursor,
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
    use_schema(&mut tx, schema).await?;
    loop {
        let batch = ledger_store::read_after(pool, cursor, 1000).await?;
        let Some(last) = batch.last().map(|e| e.cursor) else {
            break;
        };
        let applied = apply_batch(&mut tx, projection, &batch).await?;
        save_cursor(&mut tx, projection, last, applied).await?;
        cursor = last;
        report.progress.events += applied;
        report.progress.position = cursor.global_position;
    }
    sqlx::query("SET LOCAL search_path TO public")
        .execute(&mut *tx)
        .await?;
    for table in tables {
        sqlx::query(&format!("DROP TABLE public.{table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public"))
            .execute(&mut *tx)
            .await?;
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
           FROM {schema}.dead_letters"
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

/// Rows of `table` that differ between the live model and the shadow, paired by key.
async fn differences(pool: &PgPool, schema: &str, table: &str) -> Result<Differences, sqlx::Error> {
    let key = names::primary_key(table);
    let join = key
        .iter()
        .map(|c| format!("l.{c} = s.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let rows: Vec<(String, Value)> = sqlx::query_as(&format!(
        "SELECT 'missing', to_jsonb(s) FROM {schema}.{table} s
          WHERE NOT EXISTS (SELECT 1 FROM public.{table} l WHERE {join})
         UNION ALL
         SELECT 'extra', to_jsonb(l) FROM public.{table} l
          WHERE NOT EXISTS (SELECT 1 FROM {schema}.{table} s WHERE {join})
         UNION ALL
         SELECT 'different', jsonb_build_object('live', to_jsonb(l), 'rebuilt', to_jsonb(s))
           FROM public.{table} l JOIN {schema}.{table} s ON {join}
          WHERE to_jsonb(l) <> to_jsonb(s)"
    ))
    .fetch_all(pool)
    .await?;
    let mut differences = Differences::default();
    for (kind, row) in rows {
        match kind.as_str() {
            "missing" => differences.missing.push(row),
            "extra" => differences.extra.push(row),
            _ => differences.different.push(row),
        }
    }
    Ok(differences)
}
