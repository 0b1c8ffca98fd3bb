//! The sweep of stuck transfers (ADR 0016): the process manager learns of a transfer's
//! events from Kafka (or its store cursor), but a log can lose them: a retention that
//! deleted a `TransferDebited` nobody handled, a new consumer group that starts after it.
//! So, every `TRANSFERS_SWEEP_INTERVAL`, the store itself is asked for the transfers whose
//! latest event is not terminal (`TransferRequested`, `TransferDebited`) and older than
//! `TRANSFERS_STUCK_AFTER`, and each is driven on from that event exactly as if it had just
//! arrived. Every step is claimed once (ADR 0008), so a sweep racing the consumer, or
//! another projector's sweep, takes nothing twice.

use std::time::Duration;

use ledger_events::{TransferEvent, TRANSFER_AGGREGATE_TYPE};
use tokio::sync::watch;

use crate::status::SharedStatus;
use crate::transfers::{ProcessManager, ReactionError};

/// Most transfers one sweep drives on; the next sweep takes the rest.
const SWEEP_LIMIT: i64 = 1_000;

/// What one sweep found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Transfers not terminal and older than the threshold.
    pub stuck: u64,
    /// Of those, the ones driven on without an error.
    pub driven: u64,
}

/// Finds the transfers stuck for longer than `stuck_after` in the store and drives each on.
pub async fn sweep_once(
    pool: &sqlx::PgPool,
    manager: &ProcessManager,
    stuck_after: Duration,
) -> Result<Swept, ReactionError> {
    let before = chrono::Utc::now()
        - chrono::Duration::from_std(stuck_after).unwrap_or(chrono::Duration::MAX);
    let waiting = ledger_store::waiting_in(
        pool,
        TRANSFER_AGGREGATE_TYPE,
        &[TransferEvent::REQUESTED, TransferEvent::DEBITED],
        before,
        SWEEP_LIMIT,
    )
    .await?;
    let mut swept = Swept {
        stuck: waiting.len() as u64,
        driven: 0,
    };
    for latest in waiting {
        tracing::warn!(
            transfer_id = %latest.aggregate_id,
            state = %latest.event_type,
            since = %latest.recorded_at,
            "transfer stuck: driving it on from the store"
        );
        match manager.drive(vec![latest]).await {
            Ok(_) => swept.driven += 1,
            Err(err) => tracing::warn!(error = %err, "stuck transfer not driven on; next sweep"),
        }
    }
    Ok(swept)
}

/// Sweeps every `interval` until `stop` turns true, reporting on `status`.
pub async fn run(
    pool: sqlx::PgPool,
    manager: ProcessManager,
    stuck_after: Duration,
    interval: Duration,
    status: SharedStatus,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = tick.tick() => {}
        }
        match sweep_once(&pool, &manager, stuck_after).await {
            Ok(swept) => {
                if let Ok(mut counters) = status.lock() {
                    counters.stuck_transfers = swept.stuck;
                    counters.swept_transfers += swept.driven;
                }
            }
            Err(err) => tracing::warn!(error = %err, "sweep of stuck transfers failed"),
        }
    }
}
