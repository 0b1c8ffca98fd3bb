//! Building and running the query API; tests start it the same way `main` does.

use std::future::Future;

use tokio::net::TcpListener;

use crate::changes::Changes;
use crate::config::Settings;
use crate::http::{self, AppState};

pub use ledger_platform::startup::StartupError;

/// A bound, ready-to-run query API.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    changes: Changes,
    pool: sqlx::PgPool,
    shutdown_timeout: std::time::Duration,
}

impl Application {
    /// Connects, checks the schema, binds.
    pub async fn build(settings: &Settings) -> Result<Self, StartupError> {
        let pool = ledger_platform::startup::pool(
            settings.database_url.0.clone(),
            settings.database_max_connections,
            std::time::Duration::from_secs(5),
        )
        .await?;
        let changes = Changes::new(settings.cache_max_entries, settings.cache_ttl);
        let router = http::router(
            AppState {
                auth: settings.auth.auth(pool.clone()),
                pool: pool.clone(),
                changes: changes.clone(),
                read_wait_timeout: settings.read_wait_timeout,
            },
            settings.request_timeout,
        );
        let listener = ledger_platform::startup::bind(settings.listen_addr).await?;
        Ok(Self {
            listener,
            router,
            changes,
            pool,
            shutdown_timeout: settings.shutdown_timeout,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown`; in-flight requests finish (up to the shutdown timeout).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener_task = tokio::spawn(self.changes.clone().listen(self.pool.clone()));
        tracing::info!(addr = %self.listener.local_addr()?, "query API listening");
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let serve = axum::serve(self.listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let timeout = self.shutdown_timeout;
        let deadline = async move {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(timeout).await;
        };
        let result = tokio::select! {
            result = serve => result,
            () = deadline => Ok(()),
        };
        listener_task.abort();
        self.pool.close().await;
        tracing::info!("query API stopped");
        result
    }
}
