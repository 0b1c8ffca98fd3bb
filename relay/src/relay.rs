//! The relay loop: stand by until leader, then read the log after the checkpoint, publish,
//! wait for the broker's confirmation, checkpoint, repeat.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use ledger_store::{LogCursor, LogNotifications};
use rdkafka::producer::{FutureProducer, Producer};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::checkpoint;
use crate::config::Settings;
use crate::kafka;
use crate::leader::Leadership;

/// What the relay reports on `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The relay's name (checkpoint and lock identity).
    pub name: String,
    /// Whether this instance is the one publishing.
    pub leader: bool,
    /// Everything up to here is confirmed by the broker.
    pub transaction_id: i64,
    /// Global position of the last confirmed event.
    pub global_position: i64,
    /// Events confirmed by this process.
    pub published: u64,
    /// Reads of the log by this process (useful to know it has looked since a commit).
    pub polls: u64,
    /// Committed events not yet confirmed.
    pub lag_events: i64,
    /// Age of the oldest of them, in seconds.
    pub lag_seconds: f64,
    /// The last publishing or database error, cleared by the next success.
    pub last_error: Option<String>,
}

/// Shared, cheaply readable status.
pub type SharedStatus = Arc<Mutex<Status>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut Status)) {
    if let Ok(mut status) = status.lock() {
        f(&mut status);
    }
}

/// The relay's moving parts.
pub struct Relay {
    settings: Settings,
    pool: PgPool,
    status: SharedStatus,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.settings.relay_name)
            .finish_non_exhaustive()
    }
}

/// How often lag is recomputed while publishing.
const LAG_EVERY: Duration = Duration::from_secs(1);
/// Longest pause between retries after an error.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Relay {
    /// A relay over `pool`. It makes its own producer when it becomes leader, and a fresh
    /// one after every failed batch: an idempotent producer can be left unusable by a
    /// broker that lost its state (unknown producer id), and the batch is re-sent from the
    /// checkpoint anyway.
    pub fn new(settings: Settings, pool: PgPool) -> Self {
        let status = Arc::new(Mutex::new(Status {
            name: settings.relay_name.clone(),
            ..Status::default()
        }));
        Self {
            settings,
            pool,
            status,
        }
    }

    /// The status handle the HTTP endpoints read.
    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Runs until `stop` turns true. In-flight work is confirmed and checkpointed (within the
    /// shutdown timeout) before it returns.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        while !*stop.borrow() {
            match Leadership::try_acquire(&self.settings.database_url.0, &self.settings.relay_name)
                .await
            {
                Ok(Some(leadership)) => {
                    tracing::info!(relay = %self.settings.relay_name, "leadership taken");
                    update(&self.status, |s| s.leader = true);
                    self.lead(leadership, &mut stop).await;
                    update(&self.status, |s| s.leader = false);
                    backoff = Duration::from_millis(100);
                }
                Ok(None) => {
                    tracing::debug!("another relay leads; standing by");
                    let _ = tokio::time::timeout(
                        self.settings.standby_interval,
                        stop.wait_for(|stopped| *stopped),
                    )
                    .await;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reach PostgreSQL for leadership");
                    update(&self.status, |s| s.last_error = Some(err.to_string()));
                    let _ = tokio::time::timeout(backoff, stop.wait_for(|stopped| *stopped)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        tracing::info!("relay stopped");
    }

    /// Publishes while leader; returns on stop or when leadership is lost.
    async fn lead(&self, mut leadership: Leadership, stop: &mut watch::Receiver<bool>) {
        let relay = &self.settings.relay_name;
        let mut cursor = match checkpoint::load(&self.pool, relay).await {
            Ok(cursor) => cursor,
            Err(err) => {
                tracing::warn!(error = %err, "cannot load the checkpoint");
                leadership.release().await;
                return;
            }
        };
        self.report_position(cursor);
        let mut producer = match crate::kafka::producer(&self.settings) {
            Ok(producer) => producer,
            Err(err) => {
                tracing::error!(error = %err, "cannot configure the producer");
                leadership.release().await;
                return;
            }
        };
        let mut notifications = LogNotifications::new(&self.pool).await;
        let mut backoff = Duration::from_millis(100);
        let mut batches = 0u64;
        let mut lag_at = tokio::time::Instant::now();
        loop {
            if *stop.borrow() {
                break;
            }
            if !leadership.still_held().await {
                tracing::warn!("leadership connection lost; standing down");
                kafka::dispose(producer);
                return;
            }
            if lag_at.elapsed() >= LAG_EVERY {
                self.report_lag(cursor).await;
                lag_at = tokio::time::Instant::now();
            }
            let batch = match ledger_store::read_after(&self.pool, cursor, self.settings.batch_size)
                .await
            {
                Ok(batch) => batch,
                Err(err) => {
                    self.failed(&err.to_string(), &mut backoff, stop).await;
                    continue;
                }
            };
            update(&self.status, |s| s.polls += 1);
            let Some(last) = batch.last().map(|entry| entry.cursor) else {
                self.report_lag(cursor).await;
                tokio::select! {
                    () = notifications.wait(self.settings.poll_interval) => {}
                    _ = stop.wait_for(|stopped| *stopped) => {}
                }
                continue;
            };
            // Once produced, a batch is confirmed and checkpointed even if a stop arrives
            // meanwhile (bounded by the shutdown timeout).
            let published = tokio::time::timeout(
                self.settings
                    .shutdown_timeout
                    .max(self.settings.kafka_message_timeout),
                kafka::publish(
                    &producer,
                    &self.settings.kafka_topic,
                    &self.settings.cloudevents_source,
                    &batch,
                ),
            )
            .await;
            match published {
                Ok(Ok(())) => {
                    batches += 1;
                    if self.settings.crash_after_batch != 0
                        && batches == self.settings.crash_after_batch
                    {
                        tracing::error!(batches, "fault injection: aborting before the checkpoint");
                        std::process::abort();
                    }
                    if let Err(err) = checkpoint::save(&self.pool, relay, last).await {
                        // The batch will be sent again: at least once, never skipped.
                        self.failed(&err.to_string(), &mut backoff, stop).await;
                        continue;
                    }
                    cursor = last;
                    backoff = Duration::from_millis(100);
                    let count = batch.len() as u64;
                    update(&self.status, |s| {
                        s.published += count;
                        s.last_error = None;
                    });
                    self.report_position(cursor);
                    tracing::debug!(count, position = last.global_position, "batch published");
                }
                Ok(Err(err)) => {
                    self.failed(&err.to_string(), &mut backoff, stop).await;
                    producer = self.renew(producer);
                }
                Err(_) => {
                    self.failed("broker confirmation timed out", &mut backoff, stop)
                        .await;
                    producer = self.renew(producer);
                }
            }
        }
        let flushed = tokio::task::spawn_blocking({
            let timeout = self.settings.shutdown_timeout;
            move || producer.flush(timeout)
        })
        .await;
        if !matches!(flushed, Ok(Ok(()))) {
            tracing::warn!("producer queue not empty at shutdown; the next leader re-sends");
        }
        leadership.release().await;
    }

    /// A fresh producer in place of `old` (kept if a new one cannot be configured); `old` is
    /// destroyed on a blocking thread ([`kafka::dispose`]).
    fn renew(&self, old: FutureProducer) -> FutureProducer {
        match crate::kafka::producer(&self.settings) {
            Ok(fresh) => {
                tracing::info!("producer renewed after a failed batch");
                kafka::dispose(old);
                fresh
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot renew the producer; keeping the old one");
                old
            }
        }
    }

    async fn failed(&self, error: &str, backoff: &mut Duration, stop: &mut watch::Receiver<bool>) {
        tracing::warn!(
            error,
            retry_in_ms = backoff.as_millis() as u64,
            "publishing paused"
        );
        update(&self.status, |s| s.last_error = Some(error.to_owned()));
        let _ = tokio::time::timeout(*backoff, stop.wait_for(|stopped| *stopped)).await;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }

    fn report_position(&self, cursor: LogCursor) {
        update(&self.status, |s| {
            s.transaction_id = cursor.transaction_id;
            s.global_position = cursor.global_position;
        });
    }

    async fn report_lag(&self, cursor: LogCursor) {
        match ledger_store::lag(&self.pool, cursor).await {
            Ok(lag) => {
                let seconds = lag.seconds(Utc::now());
                update(&self.status, |s| {
                    s.lag_events = lag.events;
                    s.lag_seconds = seconds;
                });
                if lag.events > 0 {
                    tracing::info!(lag_events = lag.events, lag_seconds = seconds, "relay lag");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot compute lag"),
        }
    }
}
