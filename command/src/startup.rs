//! Building and running the service. Tests start it the same way `main` does, on port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ledger_pii::{CacheSettings, KeyStore, Keyring, KeyringError};
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::config::Settings;
use crate::http::{self, AppState, Limits};
use crate::idempotency;
use crate::ledger::{Ledger, RetryPolicy};
use crate::subjects::Subjects;
use crate::writer::WriterConfig;

/// Why the command service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The database, the listener: what every service needs.
    #[error(transparent)]
    Platform(#[from] ledger_platform::startup::StartupError),
    /// `PII_KEK` / `PII_KEK_PREVIOUS` do not give a keyring (the message names the
    /// setting, never its value).
    #[error("configuration error: {0}")]
    Keyring(#[from] KeyringError),
    /// The keyring cannot unwrap the data keys stored in `subject_keys` (a KEK missing
    /// from `PII_KEK_PREVIOUS`, or wrong key material under a known id), or they could not
    /// be read.
    #[error("the key-encryption keys (PII_KEK, PII_KEK_PREVIOUS) do not unwrap the stored data keys: {}", with_cause(.0))]
    Keys(#[source] ledger_pii::StoreError),
}

/// An error's message followed by its cause's (which names the KEK id and the settings).
fn with_cause(err: &dyn std::error::Error) -> String {
    match err.source() {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// The keyring from `PII_KEK` and `PII_KEK_PREVIOUS` (ADR 0019), as `main` reads it before
/// serving.
///
/// # Errors
/// [`StartupError::Keyring`], whose message names the setting.
pub fn keyring_from_env() -> Result<Keyring, StartupError> {
    Ok(Keyring::from_env()?)
}

/// A bound, ready-to-run command service.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    pool: PgPool,
    keys: KeyStore,
    idempotency_retention: Duration,
    shutdown_timeout: Duration,
}

impl Application {
    /// Connects to PostgreSQL, checks the schema is current, checks that `keyring` unwraps
    /// the stored data keys, binds the listener.
    pub async fn build(settings: &Settings, keyring: Keyring) -> Result<Self, StartupError> {
        let pool = ledger_platform::startup::pool(
            settings.database_url.0.clone(),
            settings.database_max_connections,
            settings.database_acquire_timeout,
        )
        .await?;
        let app = Self::with_pool(settings, pool, keyring).await?;
        let checked = app
            .keys
            .verify_keyring()
            .await
            .map_err(StartupError::Keys)?;
        tracing::info!(
            keks = checked.len(),
            "the key-encryption keys unwrap the stored data keys"
        );
        Ok(app)
    }

    /// Binds the listener over an existing pool. Unlike [`Application::build`] it does not
    /// check the keyring against the stored keys (tests start it over a database that may
    /// be unreachable on purpose).
    pub async fn with_pool(
        settings: &Settings,
        pool: PgPool,
        keyring: Keyring,
    ) -> Result<Self, StartupError> {
        let keys = KeyStore::new(pool.clone(), keyring, CacheSettings::default());
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
                subjects: Arc::new(Subjects::new(
                    pool.clone(),
                    keys.clone(),
                    settings.command_cache_capacity,
                )),
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
            keys,
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
        let erasures = tokio::spawn(forget_erased_subjects(
            self.pool.clone(),
            self.keys.clone(),
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
        // The listener holds a connection of the pool: stop it before closing the pool.
        erasures.abort();
        let _ = erasures.await;
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

/// Listens on `ledger_pii::ERASURE_CHANNEL` and drops each erased subject's key from this
/// process's cache, so an erasure by another process is seen at once rather than when the
/// cache entry expires (its TTL bounds the window when a notification is missed: while
/// the listener reconnects, say).
async fn forget_erased_subjects(
    pool: PgPool,
    keys: KeyStore,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listening = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(ledger_pii::ERASURE_CHANNEL).await?;
            tracing::debug!("listening for erasures of data subjects");
            loop {
                let notification = listener.recv().await?;
                match Uuid::parse_str(notification.payload()) {
                    Ok(subject) => {
                        keys.forget(subject);
                        tracing::info!(%subject, "erased data subject's key forgotten");
                    }
                    Err(_) => tracing::warn!("erasure notification without a subject id"),
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            result = listening => {
                if let Err(err) = result {
                    tracing::warn!(error = %err, "erasure listener failed; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
