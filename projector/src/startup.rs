//! Building and running the projector; tests start it the same way `main` does.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use crate::apply::Applier;
use crate::config::Settings;
use crate::status::{self, Counters, StatusState};
use crate::{source_kafka, source_store};

pub use ledger_platform::startup::StartupError;

/// A projector ready to run.
#[derive(Debug)]
pub struct Application {
    settings: Settings,
    pool: sqlx::PgPool,
    listener: TcpListener,
    state: StatusState,
}

impl Application {
    /// Connects, checks the schema, configures the source, binds the status port.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let pool = ledger_platform::startup::pool(
            settings.database_url.0.clone(),
            settings.database_max_connections,
            std::time::Duration::from_secs(5),
        )
        .await?;
        let kafka = match &settings.kafka_brokers {
            Some(brokers) => Some((
                Arc::new(
                    source_kafka::consumer(&settings, brokers)
                        .map_err(|err| StartupError::Client(format!("Kafka client: {err}")))?,
                ),
                settings.kafka_group_id.clone(),
                settings.kafka_topic.clone(),
            )),
            None => None,
        };
        match crate::ops::overview::check_versions(&pool).await {
            Ok(stale) if settings.auto_rebuild => {
                for projection in stale {
                    let pool = pool.clone();
                    let batch_size = settings.batch_size;
                    tokio::spawn(async move {
                        tracing::info!(%projection, "rebuilding: built by another version");
                        match crate::ops::rebuild::rebuild(
                            &pool,
                            &projection,
                            batch_size,
                            false,
                            |_| {},
                        )
                        .await
                        {
                            Ok(report) => {
                                tracing::info!(%projection, events = report.progress.events, "rebuilt and swapped in")
                            }
                            Err(err) => {
                                tracing::error!(%projection, error = %err, "automatic rebuild failed")
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
            pool: pool.clone(),
            kafka,
        };
        Ok(Self {
            settings,
            pool,
            listener,
            state,
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
        let admin = crate::admin::router(
            self.pool.clone(),
            self.settings.admin_token.clone(),
            self.settings.batch_size,
        );
        let server = axum::serve(self.listener, status::router(self.state.clone(), admin))
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stopped| *stopped).await;
            });
        let server = tokio::spawn(async move { server.await });
        match &self.state.kafka {
            Some((consumer, group, topic)) => {
                let applier = Applier::new(self.pool.clone(), Some((group.clone(), topic.clone())));
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
                let applier = Applier::new(self.pool.clone(), None);
                source_store::run(
                    applier,
                    self.pool.clone(),
                    self.settings.batch_size,
                    self.settings.poll_interval,
                    self.state.counters.clone(),
                    stop_rx,
                )
                .await;
            }
        }
        let result = server.await.unwrap_or(Ok(()));
        self.pool.close().await;
        tracing::info!("projector stopped");
        result
    }
}
