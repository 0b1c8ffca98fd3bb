//! Building and running the projector; tests start it the same way `main` does.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use crate::apply::Applier;
use crate::config::Settings;
use crate::status::{self, Counters, StatusState};
use crate::transfers::{ProcessManager, PROCESS_MANAGER};
use crate::{source_kafka, source_store};

pub use ledger_platform::startup::StartupError;

/// Why the projector does not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The database, a client or the listen address.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// `PII_KEK` / `PII_KEK_PREVIOUS` are missing or malformed (the message names the
    /// setting, never its value).
    #[error(transparent)]
    Keyring(#[from] ledger_pii::KeyringError),
    /// The configured key-encryption keys do not open the data keys stored in
    /// `subject_keys` (a KEK missing from `PII_KEK_PREVIOUS`, or wrong key material).
    #[error("the personal-data keys cannot be checked: {detail}")]
    Keys {
        /// The error's chain of causes, which names the KEK id and the settings.
        detail: String,
        /// The key store's error.
        #[source]
        source: ledger_pii::StoreError,
    },
}

/// `err` and its causes, one after the other.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A projector ready to run.
pub struct Application {
    settings: Settings,
    pool: sqlx::PgPool,
    /// The data keys personal fields are decrypted with (checked at start-up).
    keys: ledger_pii::KeyStore,
    listener: TcpListener,
    state: StatusState,
    transfers_consumer: Option<Arc<rdkafka::consumer::StreamConsumer>>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("settings", &self.settings)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects, checks the schema, configures the source, binds the status port.
    pub async fn build(settings: Settings) -> Result<Self, BuildError> {
        // The keyring first: a missing or malformed key-encryption key refuses to start
        // before anything else is tried.
        let keyring = ledger_pii::Keyring::from_env()?;
        let pool = ledger_platform::startup::pool(
            settings.database_url.0.clone(),
            settings.database_max_connections,
            std::time::Duration::from_secs(5),
        )
        .await?;
        let keys =
            ledger_pii::KeyStore::new(pool.clone(), keyring, ledger_pii::CacheSettings::default());
        let checked = keys
            .verify_keyring()
            .await
            .map_err(|source| BuildError::Keys {
                detail: chain(&source),
                source,
            })?;
        tracing::info!(
            kek_ids = ?checked.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
            "key-encryption keys checked against the stored data keys"
        );
        let kafka_client = |group: &str| match &settings.kafka_brokers {
            Some(brokers) => source_kafka::consumer(&settings, brokers, group)
                .map(|consumer| Some(Arc::new(consumer)))
                .map_err(|err| StartupError::Client(format!("Kafka client: {err}"))),
            None => Ok(None),
        };
        let kafka = kafka_client(&settings.kafka_group_id)?.map(|consumer| {
            (
                consumer,
                settings.kafka_group_id.clone(),
                settings.kafka_topic.clone(),
            )
        });
        let transfers_consumer = if settings.transfers {
            kafka_client(&settings.transfers_group_id)?
        } else {
            None
        };
        match crate::ops::overview::check_versions(&pool).await {
            Ok(stale) if settings.auto_rebuild => {
                for projection in stale {
                    let pool = pool.clone();
                    let keys = keys.clone();
                    let batch_size = settings.batch_size;
                    tokio::spawn(async move {
                        tracing::info!(%projection, "rebuilding: built by another version");
                        // A failed rebuild is tried again (it resumes from its shadow), with
                        // backoff, until it succeeds or another process is running it.
                        let mut backoff = std::time::Duration::from_secs(1);
                        loop {
                            match crate::ops::rebuild::rebuild(
                                &pool,
                                &keys,
                                &projection,
                                batch_size,
                                false,
                                |_| {},
                            )
                            .await
                            {
                                Ok(report) => {
                                    tracing::info!(%projection, events = report.progress.events, "rebuilt and swapped in");
                                    break;
                                }
                                Err(err @ crate::ops::OpError::AlreadyRunning(_)) => {
                                    tracing::info!(%projection, reason = %err, "automatic rebuild left to the other run");
                                    break;
                                }
                                Err(err) => {
                                    tracing::error!(%projection, error = %err, retry_in = ?backoff, "automatic rebuild failed; trying again");
                                    tokio::time::sleep(backoff).await;
                                    backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
                                }
                            }
                        }
                    });
                }
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot check projection versions"),
        }
        let listener = ledger_platform::startup::bind(settings.listen_addr).await?;
        let state = StatusState {
            counters: Arc::new(Mutex::new(Counters::default())),
            process_manager: Arc::new(Mutex::new(Counters::default())),
            pool: pool.clone(),
            kafka,
        };
        Ok(Self {
            settings,
            pool,
            keys,
            listener,
            state,
            transfers_consumer,
        })
    }

    /// The bound status port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Runs until `shutdown` resolves; batches in flight commit, offsets are committed.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        tracing::info!(
            addr = %self.listener.local_addr()?,
            source = if self.state.kafka.is_some() { "kafka" } else { "store" },
            "projector status listening"
        );
        let mut server_stop = stop_rx.clone();
        // The admin API always needs a key, whatever AUTH_MODE says for the public APIs.
        let mut auth_settings = self.settings.auth.clone();
        auth_settings.auth_mode = ledger_platform::auth::AuthMode::ApiKeys;
        let admin = crate::admin::router(
            self.pool.clone(),
            self.keys.clone(),
            auth_settings
                .auth(self.pool.clone())
                .with_admin_token(self.settings.admin_token.clone()),
            self.settings.batch_size,
        );
        let server = axum::serve(self.listener, status::router(self.state.clone(), admin))
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stopped| *stopped).await;
            });
        let server = tokio::spawn(async move { server.await });
        let erasures = tokio::spawn(forget_erased(
            self.pool.clone(),
            self.keys.clone(),
            stop_rx.clone(),
        ));
        let process_manager = self.settings.transfers.then(|| {
            tokio::spawn(run_process_manager(
                self.settings.clone(),
                self.pool.clone(),
                self.transfers_consumer.clone(),
                self.state.process_manager.clone(),
                stop_rx.clone(),
            ))
        });
        match &self.state.kafka {
            Some((consumer, group, topic)) => {
                let applier = Applier::new(
                    self.pool.clone(),
                    self.keys.clone(),
                    Some((group.clone(), topic.clone())),
                );
                if let Err(err) = source_kafka::run(
                    self.settings.clone(),
                    consumer.clone(),
                    applier,
                    self.state.counters.clone(),
                    stop_rx,
                )
                .await
                {
                    tracing::error!(error = %err, "consumer failed");
                }
            }
            None => {
                let applier = Applier::new(self.pool.clone(), self.keys.clone(), None);
                source_store::run(
                    applier,
                    crate::apply::STORE_READER,
                    self.pool.clone(),
                    self.settings.batch_size,
                    self.settings.poll_interval,
                    self.state.counters.clone(),
                    stop_rx,
                )
                .await;
            }
        }
        if let Some(process_manager) = process_manager {
            if let Err(err) = process_manager.await {
                tracing::error!(error = %err, "transfer process manager panicked");
            }
        }
        if let Err(err) = erasures.await {
            tracing::error!(error = %err, "erasure listener panicked");
        }
        let result = server.await.unwrap_or(Ok(()));
        self.pool.close().await;
        tracing::info!("projector stopped");
        result
    }
}

/// The transfer process manager's loop: its own consumer group, or its own store cursor.
async fn run_process_manager(
    settings: Settings,
    pool: sqlx::PgPool,
    consumer: Option<Arc<rdkafka::consumer::StreamConsumer>>,
    status: crate::status::SharedStatus,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let concurrency = usize::try_from(settings.transfers_concurrency).unwrap_or(8);
    // Transfers the log left behind are found in the store and driven on (ADR 0016).
    let sweep = tokio::spawn(crate::sweep::run(
        pool.clone(),
        ProcessManager::new(pool.clone(), concurrency, false, 0),
        settings.transfers_stuck_after,
        settings.transfers_sweep_interval,
        status.clone(),
        stop.clone(),
    ));
    match consumer {
        Some(consumer) => {
            let manager = ProcessManager::new(
                pool,
                concurrency,
                false,
                settings.transfers_crash_after_steps,
            );
            if let Err(err) = source_kafka::run(settings, consumer, manager, status, stop).await {
                tracing::error!(error = %err, "transfer process manager consumer failed");
            }
        }
        None => {
            let manager = ProcessManager::new(
                pool.clone(),
                concurrency,
                true,
                settings.transfers_crash_after_steps,
            );
            source_store::run(
                manager,
                PROCESS_MANAGER,
                pool,
                settings.batch_size,
                settings.poll_interval,
                status,
                stop,
            )
            .await;
        }
    }
    if let Err(err) = sweep.await {
        tracing::error!(error = %err, "sweep of stuck transfers panicked");
    }
}

/// Drops a subject's cached data keys as soon as another process erases it (a notification
/// on [`ledger_pii::ERASURE_CHANNEL`]), so decryption stops at once rather than when the
/// cache entry expires. Reconnects after a lost connection; a notification missed meanwhile
/// is covered by the cache's TTL, and the statement projection never relies on this for
/// correctness (it checks `subject_keys` under the erasure lock).
async fn forget_erased(
    pool: sqlx::PgPool,
    keys: ledger_pii::KeyStore,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = std::time::Duration::from_millis(200);
    while !*stop.borrow() {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen(ledger_pii::ERASURE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match listener.await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "erasure listener cannot connect");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|stopped| *stopped) => return,
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                continue;
            }
        };
        backoff = std::time::Duration::from_millis(200);
        loop {
            tokio::select! {
                notification = listener.recv() => match notification {
                    Ok(notification) => match notification.payload().parse::<uuid::Uuid>() {
                        Ok(subject) => {
                            keys.forget(subject);
                            tracing::info!(subject = %subject, "erased subject's keys forgotten");
                        }
                        Err(_) => tracing::warn!("erasure notification without a subject id"),
                    },
                    Err(err) => {
                        tracing::warn!(error = %err, "erasure listener lost its connection");
                        break;
                    }
                },
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }
}
