//! Each projection's state for operators: position, lag, live or rebuilding, version, dead
//! letters.

use serde::Serialize;
use sqlx::PgPool;

use ledger_readmodels::names;

use super::rebuild;

/// One projection, as `ledger-admin status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectionState {
    /// The projection.
    pub name: String,
    /// `live`, or `rebuilding` while a shadow copy exists.
    pub state: String,
    /// Highest global position applied to the live model.
    pub position: i64,
    /// Committed events above that position.
    pub lag_events: i64,
    /// Seconds since the oldest of them was recorded.
    pub lag_seconds: f64,
    /// While rebuilding: the shadow's position.
    pub rebuild_position: Option<i64>,
    /// The version of the code that built the deployed model.
    pub deployed_version: Option<i32>,
    /// The version today's code declares.
    pub code_version: i32,
    /// The versions differ: rebuild the projection.
    pub needs_rebuild: bool,
    /// Pending dead letters.
    pub dead_letters: i64,
}

/// Every projection's state.
pub async fn overview(pool: &PgPool) -> Result<Vec<ProjectionState>, sqlx::Error> {
    let checkpoints = ledger_readmodels::progress::all(pool).await?;
    let letters = ledger_readmodels::dead_letters::pending_counts(pool).await?;
    let mut states = Vec::new();
    for name in names::ALL {
        let position = checkpoints
            .iter()
            .find(|c| c.projection == name)
            .map_or(0, |c| c.last_position);
        let (lag_events, lag_seconds): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8
               FROM events WHERE global_position > $1",
        )
        .bind(position)
        .fetch_one(pool)
        .await?;
        let deployed: Option<i32> =
            sqlx::query_scalar("SELECT version FROM projection_versions WHERE projection = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?;
        let rebuild_position = rebuild::in_progress(pool, name).await?;
        let code_version = names::version(name);
        states.push(ProjectionState {
            name: name.to_owned(),
            state: if rebuild_position.is_some() {
                "rebuilding"
            } else {
                "live"
            }
            .to_owned(),
            position,
            lag_events,
            lag_seconds: lag_seconds.unwrap_or(0.0).max(0.0),
            rebuild_position,
            deployed_version: deployed,
            code_version,
            needs_rebuild: deployed.is_some_and(|v| v != code_version),
            dead_letters: letters
                .iter()
                .find(|(p, _)| p == name)
                .map_or(0, |(_, n)| *n),
        });
    }
    Ok(states)
}

/// At projector start: records the code's versions on a first start, and says which
/// projections were built by other code and need a rebuild.
pub async fn check_versions(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let mut stale = Vec::new();
    for name in names::ALL {
        let code = names::version(name);
        let deployed: Option<i32> =
            sqlx::query_scalar("SELECT version FROM projection_versions WHERE projection = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?;
        match deployed {
            None => {
                sqlx::query(
                    "INSERT INTO projection_versions (projection, version) VALUES ($1, $2)
                     ON CONFLICT (projection) DO NOTHING",
                )
                .bind(name)
                .bind(code)
                .execute(pool)
                .await?;
            }
            Some(version) if version != code => {
                tracing::warn!(
                    projection = name,
                    deployed = version,
                    code,
                    "read model built by another version: run `ledger-admin rebuild {name}`"
                );
                stale.push(name.to_owned());
            }
            Some(_) => {}
        }
    }
    Ok(stale)
}
