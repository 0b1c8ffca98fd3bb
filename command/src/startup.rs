//! Building and running the service. Tests start it the same way `main` does, on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::http::{self, AppState, Limits};
use crate::idempotency;
use crate::ledger::{Ledger, RetryPolicy};
use crate::writer::WriterConfig;

pub use ledger_platform::startup::StartupError;

/// A bound, ready-to-run command service.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    pool: PgPool,
    idempotency_retention: Duration,
    shutdown_timeout: Duration,
}

impl Application {
    /// Connects to PostgreSQL, checks the schema is current, binds the listener.
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let pool = ledger_platform::startup::pool(
            settings.database_url.0.clone(),
            settings.database_max_connections,
            settings.database_acquire_timeout,
        )
        .await?;
        Self::with_pool(settings, pool).await
    }

    /// Binds the listener over an existing pool.
    pub async fn with_pool(settings: &Settings, pool: PgPool) -> Result<Self, StartupError> {
        let retry = RetryPolicy {
            max_retries: settings.command_max_retries,
            ..RetryPolicy::default()
        };
        let writers = WriterConfig {
            writers: usize::from(settings.command_writers),
            batch_max: usize::from(settings.command_batch_max),
            pipeline_depth: usize::from(settings.command_pipeline_depth),
            cache_capacity: settings.command_cache_capacity,
            snapshot_every: i64::try_from(settings.snapshot_every).unwrap_or(i64::MAX),
            queue_max: usize::try_from(settings.command_queue_max).unwrap_or(usize::MAX),
            fault_lost_commits: settings.command_fault_lost_commits,
            fault_failed_checks: settings.command_fault_failed_checks,
        };
        let router = http::router(
            AppState {
                auth: settings.auth.auth(pool.clone()),
                ledger: Arc::new(Ledger::with_writers(pool.clone(), retry, writers)),
                transfers: Arc::new(Ledger::with_writers(pool.clone(), retry, writers)),
            },
            Limits {
                max_body_bytes: usize::try_from(settings.max_body_bytes).unwrap_or(usize::MAX),
                request_timeout: settings.request_timeout,
            },
        );
        let listener = ledger_platform::startup::bind(settings.listen_addr).await?;
        Ok(Self {
            listener,
            router,
            pool,
            idempotency_retention: settings.idempotency_retention,
            shutdown_timeout: settings.shutdown_timeout,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests
    /// finish (for at most the shutdown timeout) and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let purge = tokio::spawn(purge_idempotency_keys(
            self.pool.clone(),
            self.idempotency_retention,
            stop_rx.clone(),
        ));
        tracing::info!(addr = %self.listener.local_addr()?, "command API listening");
        let mut drained = stop_rx.clone();
        let serve = axum::serve(self.listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let deadline = async move {
            let _ = drained.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(self.shutdown_timeout).await;
        };
        let result = tokio::select! {
            result = serve => result,
            () = deadline => {
                tracing::warn!("in-flight requests did not finish within the shutdown timeout");
                Ok(())
            }
        };
        purge.abort();
        self.pool.close().await;
        tracing::info!("command API stopped");
        result
    }
}

/// Forgets expired idempotency keys, every `retention / 4` (between 1 s and 5 min).
async fn purge_idempotency_keys(
    pool: PgPool,
    retention: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(every) => {}
        }
        match idempotency::purge_expired(&pool, retention).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "expired idempotency keys forgotten"),
            Err(err) => tracing::warn!(error = %err, "could not purge idempotency keys"),
        }
    }
}
