//! Building and running the relay; tests start it the same way `main` does.

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::Settings;
use crate::kafka;
use crate::relay::Relay;
use crate::status::{self, StatusState};

pub use ledger_platform::startup::StartupError;

/// A relay ready to run.
#[derive(Debug)]
pub struct Application {
    relay: Relay,
    listener: TcpListener,
    router: axum::Router,
}

impl Application {
    /// Connects to PostgreSQL (schema must be current), configures the producer, creates the
    /// topic if the broker is up (if not, publishing waits for it), binds the status port.
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let pool = ledger_platform::startup::pool(
            settings.database_url.0.clone(),
            settings.database_max_connections,
            std::time::Duration::from_secs(5),
        )
        .await?;
        // For readiness checks only; the relay makes its own producers.
        let producer = kafka::producer(&settings).map_err(kafka_error)?;
        if let Err(err) = kafka::ensure_topic(&settings).await {
            tracing::warn!(error = %err, "cannot create the topic now; publishing waits for the broker");
        }
        let listener = ledger_platform::startup::bind(settings.listen_addr).await?;
        let topic = settings.kafka_topic.clone();
        let relay = Relay::new(settings, pool.clone());
        let router = status::router(StatusState {
            status: relay.status(),
            pool,
            producer,
            topic,
        });
        Ok(Self {
            relay,
            listener,
            router,
        })
    }

    /// The bound status port.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Runs until `shutdown` resolves; then finishes the batch in flight and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        tracing::info!(addr = %self.listener.local_addr()?, "relay status listening");
        let mut server_stop = stop_rx.clone();
        let server = axum::serve(self.listener, self.router).with_graceful_shutdown(async move {
            let _ = server_stop.wait_for(|stopped| *stopped).await;
        });
        let server = tokio::spawn(async move { server.await });
        self.relay.run(stop_rx).await;
        server.await.unwrap_or(Ok(()))
    }
}

fn kafka_error(err: rdkafka::error::KafkaError) -> StartupError {
    StartupError::Client(format!("Kafka client: {err}"))
}
