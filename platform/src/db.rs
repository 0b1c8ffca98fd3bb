//! The PostgreSQL pool, the embedded migrations, and the start-up schema check.
//!
//! Migrations are a separate step (`<service> migrate`): sqlx takes an advisory lock while it
//! migrates, so several instances running it at once apply each migration exactly once.
//! Services never migrate at boot; they refuse to start on a schema that is behind.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Every migration under `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Why the database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The connection failed.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The schema is behind this binary.
    #[error(
        "the database schema is not current: migration(s) {0} not applied; run the `migrate` subcommand first"
    )]
    SchemaBehind(String),
    /// Any other database error.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Opens a pool of at most `max_connections`, failing fast when PostgreSQL is unreachable.
pub async fn connect(
    options: PgConnectOptions,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

/// Applies every pending migration (under sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Checks that every embedded migration has been applied.
pub async fn ensure_schema_current(pool: &PgPool) -> Result<(), DbError> {
    let applied: BTreeSet<i64> =
        match sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(versions) => versions.into_iter().collect(),
            // 42P01: undefined_table, nothing was ever migrated.
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P01") => {
                BTreeSet::new()
            }
            Err(err) => return Err(err.into()),
        };
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DbError::SchemaBehind(missing.join(", ")))
    }
}

/// Whether `err` means PostgreSQL is unreachable or saturated (answer 503), rather than a
/// bug or bad data (answer 500).
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
    )
}

/// Whether PostgreSQL answers a trivial query within `timeout`.
pub async fn ping(pool: &PgPool, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, sqlx::query("SELECT 1").execute(pool)).await,
        Ok(Ok(_))
    )
}
