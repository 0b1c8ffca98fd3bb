//! Dead letters: list, show, retry (after a fix), skip. Every action is recorded in
//! `dead_letter_actions` with who and when.

use ledger_readmodels::dead_letters::{self as letters, DeadLetter};
use ledger_readmodels::ApplyError;
use serde::Serialize;
use sqlx::PgPool;

use super::OpError;
use crate::apply::project;

/// An audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Action {
    pub action: String,
    pub actor: String,
    pub outcome: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A dead letter with its history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shown {
    #[serde(flatten)]
    pub letter: DeadLetter,
    pub actions: Vec<Action>,
}

/// The dead letters with `status` (`pending`, `retried`, `skipped`, `superseded`, or all).
pub async fn list(
    pool: &PgPool,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, OpError> {
    Ok(letters::list(pool, status, limit).await?)
}

/// One dead letter and what was done to it.
pub async fn show(pool: &PgPool, id: i64) -> Result<Shown, OpError> {
    let letter = letters::get(pool, id)
        .await?
        .ok_or(OpError::NoSuchDeadLetter(id))?;
    let actions = sqlx::query_as(
        "SELECT action, actor, outcome, at FROM dead_letter_actions
          WHERE dead_letter_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(Shown { letter, actions })
}

/// Applies the event again to its projection (after a fix was deployed). Succeeds → the
/// letter is `retried`; refused again → it stays pending, with the new reason recorded.
pub async fn retry(pool: &PgPool, id: i64, actor: &str) -> Result<Shown, OpError> {
    let letter = letters::get(pool, id)
        .await?
        .ok_or(OpError::NoSuchDeadLetter(id))?;
    if letter.status != "pending" {
        return Err(OpError::Invalid(format!(
            "dead letter {id} is {}, not pending",
            letter.status
        )));
    }
    let event = match letter.event_id {
        Some(event_id) => ledger_store::event_by_id(pool, event_id).await?,
        None => None,
    };
    let mut tx = pool.begin().await?;
    let outcome = match event {
        None => "refused: not an event of the store (skip it)".to_owned(),
        Some(event) => match project(&mut tx, &letter.projection, &event).await {
            Ok(()) => {
                letters::set_status(&mut tx, id, "retried").await?;
                ledger_readmodels::notify_change(&mut tx, &event.aggregate_id).await?;
                "applied".to_owned()
            }
            Err(ApplyError::Refused(reason)) => format!("refused again: {reason}"),
            Err(ApplyError::Database(err)) => return Err(err.into()),
        },
    };
    record(&mut tx, id, "retry", actor, &outcome).await?;
    tx.commit().await?;
    show(pool, id).await
}

/// Gives up on a dead letter: it stays recorded, marked `skipped`.
pub async fn skip(pool: &PgPool, id: i64, actor: &str) -> Result<Shown, OpError> {
    let letter = letters::get(pool, id)
        .await?
        .ok_or(OpError::NoSuchDeadLetter(id))?;
    if letter.status != "pending" {
        return Err(OpError::Invalid(format!(
            "dead letter {id} is {}, not pending",
            letter.status
        )));
    }
    let mut tx = pool.begin().await?;
    letters::set_status(&mut tx, id, "skipped").await?;
    record(&mut tx, id, "skip", actor, "skipped").await?;
    tx.commit().await?;
    show(pool, id).await
}

async fn record(
    tx: &mut sqlx::PgConnection,
    id: i64,
    action: &str,
    actor: &str,
    outcome: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letter_actions (dead_letter_id, action, actor, outcome) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(action)
    .bind(actor)
    .bind(outcome)
    .execute(tx)
    .await?;
    Ok(())
}
