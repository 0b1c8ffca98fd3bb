//! Reading the store's log directly (no broker configured): the same commit-safe order as
//! the relay, with the cursor committed in each batch's transaction.

use std::time::Duration;

use ledger_store::{LogCursor, LogNotifications};
use tokio::sync::watch;

use crate::apply::{BatchHandler, Incoming};
use crate::status::SharedStatus;

/// Runs until `stop` turns true; `reader` names the progress row holding the cursor (the
/// handler advances it with each batch).
pub async fn run<H: BatchHandler>(
    applier: H,
    reader: &'static str,
    pool: sqlx::PgPool,
    batch_size: i64,
    poll_interval: Duration,
    status: SharedStatus,
    mut stop: watch::Receiver<bool>,
) {
    let mut notifications = LogNotifications::new(&pool).await;
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        let cursor = match ledger_readmodels::progress::cursor(&pool, reader).await {
            Ok((transaction_id, global_position)) => LogCursor {
                transaction_id,
                global_position,
            },
            Err(err) => {
                crate::status::failed(&status, &err.to_string());
                pause(&mut stop, &mut backoff).await;
                continue;
            }
        };
        let batch = match ledger_store::read_after(&pool, cursor, batch_size).await {
            Ok(batch) => batch,
            Err(err) => {
                crate::status::failed(&status, &err.to_string());
                pause(&mut stop, &mut backoff).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = notifications.wait(poll_interval) => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
            }
            continue;
        }
        let incoming: Vec<Incoming> = batch.into_iter().map(Incoming::from_log).collect();
        match applier.handle(&incoming).await {
            Ok(applied) => {
                crate::status::applied(&status, incoming.len(), applied);
                backoff = Duration::from_millis(100);
            }
            Err(err) => {
                crate::status::failed(&status, &err.to_string());
                pause(&mut stop, &mut backoff).await;
            }
        }
    }
    tracing::info!("store reader stopped");
}

async fn pause(stop: &mut watch::Receiver<bool>, backoff: &mut Duration) {
    let _ = tokio::time::timeout(*backoff, stop.wait_for(|stopped| *stopped)).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}
