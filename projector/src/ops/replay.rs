//! Re-applying a range of positions to the live model through the guards: events already
//! applied are recognised and skipped, so running a replay twice changes nothing; events
//! the model lacks (e.g. after a lost or rolled-back change) are applied.

use serde::Serialize;
use sqlx::PgPool;

use super::{known, OpError};
use crate::apply::{apply_events, Applied, Origin};

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Events read.
    pub events: u64,
    /// Applied because the model lacked them.
    pub applied: u64,
    /// Skipped: already in the model.
    pub duplicates: u64,
    /// Dead-lettered.
    pub dead_letters: u64,
}

/// Replays positions `from..=to` into `projection`.
pub async fn replay(
    pool: &PgPool,
    keys: &ledger_pii::KeyStore,
    projection: &str,
    from: i64,
    to: i64,
) -> Result<ReplayReport, OpError> {
    known(projection)?;
    if from > to || from < 0 {
        return Err(OpError::Invalid(format!("empty range {from}..={to}")));
    }
    let mut report = ReplayReport::default();
    let mut next = from;
    loop {
        let events = ledger_store::read_positions(pool, next, to, 500).await?;
        let Some(last) = events.last().map(|e| e.global_position) else {
            break;
        };
        let mut tx = pool.begin().await?;
        let mut outcome = Applied::default();
        let origin = Origin::Store {
            cursor: ledger_store::LogCursor::default(),
        };
        let batch: Vec<_> = events.iter().map(|event| (event, origin)).collect();
        apply_events(&mut tx, keys, &[projection], &batch, &mut outcome).await?;
        let touched = ledger_readmodels::distinct_ids(events.iter());
        ledger_readmodels::notify_changes(&mut tx, &touched).await?;
        tx.commit().await?;
        report.events += events.len() as u64;
        report.applied += outcome.applied;
        report.duplicates += outcome.duplicates;
        report.dead_letters += outcome.dead_letters;
        next = last + 1;
    }
    Ok(report)
}
