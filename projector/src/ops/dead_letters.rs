//! Dead letters: list, show, retry (after a fix), skip. Every action is recorded in
//! `dead_letter_actions` with who and when.

use std::collections::HashMap;

use ledger_events::RecordedEvent;
use ledger_readmodels::dead_letters::{self as letters, DeadLetter};
use ledger_readmodels::{forget_aggregate, guards, names};
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgPool};

use super::OpError;
use crate::apply::{is_data_error, project_batch};
use crate::transfers::{ProcessManager, ReactionError, PROCESS_MANAGER};

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

/// Retries a pending dead letter (after a fix was deployed), exactly once and in order
/// (ADR 0014). Applied → the letter is `retried`; refused again → it stays pending and the
/// new reason is recorded; not pending (e.g. a concurrent retry won) → refused.
///
/// - A projection's letter: under the aggregate's guard (the live projector's lock order:
///   guards first), the aggregate's rows are projected again from its whole history in the
///   store, up to where the guard stands, with the live code. Later events that were applied
///   on top of the gap are folded again in order; the result is what a rebuild gives.
/// - A letter of the transfer process manager: the reaction is taken again (its steps are
///   claimed once, whatever is repeated).
pub async fn retry(
    pool: &PgPool,
    keys: &ledger_pii::KeyStore,
    id: i64,
    actor: &str,
) -> Result<Shown, OpError> {
    let letter = letters::get(pool, id)
        .await?
        .ok_or(OpError::NoSuchDeadLetter(id))?;
    pending(&letter)?;
    let event = match letter.event_id {
        Some(event_id) => ledger_store::event_by_id(pool, event_id).await?,
        None => None,
    };
    let mut tx = pool.begin().await?;
    let outcome = match (event, letter.aggregate_id.as_deref()) {
        (Some(event), Some(aggregate_id)) if names::tables(&letter.projection).is_some() => {
            reproject(&mut tx, keys, &letter, &event, aggregate_id, actor).await?
        }
        (Some(event), _) if letter.projection == PROCESS_MANAGER => {
            pending(&lock(&mut tx, id).await?)?;
            let manager = ProcessManager::new(pool.clone(), 1, false, 0);
            match manager.react(&event).await {
                Ok(()) => {
                    letters::set_status(&mut tx, id, "retried").await?;
                    "applied".to_owned()
                }
                Err(ReactionError::Poison(reason)) => format!("refused again: {reason}"),
                Err(ReactionError::Transient(reason)) => {
                    return Err(OpError::Unavailable(reason));
                }
            }
        }
        _ => {
            pending(&lock(&mut tx, id).await?)?;
            "refused: not an event of the store (skip it)".to_owned()
        }
    };
    record(&mut tx, id, "retry", actor, &outcome).await?;
    tx.commit().await?;
    show(pool, id).await
}

fn pending(letter: &DeadLetter) -> Result<(), OpError> {
    if letter.status == "pending" {
        Ok(())
    } else {
        Err(OpError::Invalid(format!(
            "dead letter {} is {}, not pending",
            letter.id, letter.status
        )))
    }
}

async fn lock(tx: &mut PgConnection, id: i64) -> Result<DeadLetter, OpError> {
    letters::lock(tx, id)
        .await?
        .ok_or(OpError::NoSuchDeadLetter(id))
}

/// Projects `aggregate_id` again from its whole history for the letter's projection (see
/// [`retry`]); returns the outcome to record.
async fn reproject(
    tx: &mut PgConnection,
    keys: &ledger_pii::KeyStore,
    letter: &DeadLetter,
    event: &RecordedEvent,
    aggregate_id: &str,
    actor: &str,
) -> Result<String, OpError> {
    let projection = letter.projection.as_str();
    // The guard first, as the live projector and the rebuild's swap take it: the live
    // batch on this aggregate finishes, the next waits; a concurrent retry waits here and
    // then finds the letter no longer pending.
    let last = guards::lock_many(tx, projection, &[aggregate_id])
        .await?
        .get(aggregate_id)
        .copied()
        .unwrap_or(0);
    pending(&lock(tx, letter.id).await?)?;
    let upto = last.max(event.sequence);
    let history = ledger_store::events_of(tx, &event.aggregate_type, aggregate_id, 1, upto).await?;
    let ids: Vec<uuid::Uuid> = history.iter().map(|e| e.event_id).collect();
    let skipped = letters::skipped(tx, projection, &ids).await?;
    let history: Vec<&RecordedEvent> = history
        .iter()
        .filter(|e| !skipped.contains(&e.event_id))
        .collect();
    let Some(newest) = history.last().map(|e| (e.sequence, e.global_position)) else {
        return Ok("refused again: the event is no longer in the store".to_owned());
    };
    let mut savepoint = tx.begin().await?;
    forget_aggregate(&mut savepoint, projection, aggregate_id).await?;
    let refused = match project_batch(&mut savepoint, keys, projection, &history).await {
        Ok(refused) => refused,
        Err(err) if is_data_error(&err) => {
            savepoint.rollback().await?;
            return Ok(format!("refused again: the database refused it: {err}"));
        }
        Err(err) => return Err(err.into()),
    };
    let refused: HashMap<uuid::Uuid, String> = refused
        .into_iter()
        .map(|(index, reason)| (history[index].event_id, reason))
        .collect();
    if let Some(reason) = refused.get(&event.event_id) {
        savepoint.rollback().await?;
        return Ok(format!("refused again: {reason}"));
    }
    savepoint.commit().await?;
    // The aggregate's other pending letters of this projection: applied now, or still
    // refused (they stay pending).
    for (other, event_id) in letters::pending_of(tx, projection, aggregate_id).await? {
        if other != letter.id && !refused.contains_key(&event_id) {
            letters::set_status(tx, other, "retried").await?;
            record(
                tx,
                other,
                "retry",
                actor,
                &format!("applied with dead letter {}", letter.id),
            )
            .await?;
        }
    }
    letters::set_status(tx, letter.id, "retried").await?;
    guards::advance_many(tx, projection, &[aggregate_id], &[newest.0], &[newest.1]).await?;
    ledger_readmodels::notify_change(tx, aggregate_id).await?;
    Ok("applied".to_owned())
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
    pending(&lock(&mut tx, id).await?)?;
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
