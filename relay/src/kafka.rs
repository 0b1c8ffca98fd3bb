//! The Kafka side: an idempotent producer, topic creation, publishing one batch in order.

use std::time::Duration;

use futures::future::join_all;
use ledger_events::kafka::encode;
use ledger_store::LogEntry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::Settings;

/// Why a batch was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused or did not confirm a message in time.
    #[error("message at global position {position} not delivered: {source}")]
    Delivery {
        position: i64,
        #[source]
        source: KafkaError,
    },
    /// The producer was dropped while messages were in flight.
    #[error("producer closed with messages in flight")]
    Canceled,
}

/// The producer: idempotent (`enable.idempotence`), `acks=all`, so a retry inside the
/// client never duplicates or reorders a partition's messages.
pub fn producer(settings: &Settings) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .set("client.id", format!("ledger-relay-{}", settings.relay_name))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            settings.kafka_message_timeout.as_millis().to_string(),
        )
        .create()
}

/// Lets go of `client` (a producer) on a blocking thread, so that its destruction never
/// stalls a tokio worker: dropping the last handle of a librdkafka producer purges its
/// queues, flushes for up to 500 ms and joins the client's threads. The handle resolves
/// once it is gone.
pub fn dispose<T: Send + 'static>(client: T) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || drop(client))
}

/// Creates the topic unless it exists, with the configured partitions and replication
/// (brokers should not auto-create it: compose turns that off, and an auto-created topic
/// would get the broker's default partition count).
pub async fn ensure_topic(settings: &Settings) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka_brokers)
        .create()?;
    let topic = NewTopic::new(
        &settings.kafka_topic,
        settings.kafka_topic_partitions,
        TopicReplication::Fixed(settings.kafka_replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic exists");
            }
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(topic = %name, %code, "cannot create topic");
                });
            }
        }
    }
    Ok(())
}

/// Whether the broker answers a metadata request for the topic within `timeout`.
pub async fn reachable(producer: &FutureProducer, topic: &str, timeout: Duration) -> bool {
    let producer = producer.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), timeout)
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// Sends `batch` in log order and waits until the broker confirmed every message.
/// Messages are keyed by aggregate id, so one aggregate's events share a partition.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    source: &str,
    batch: &[LogEntry],
) -> Result<(), PublishError> {
    let mut deliveries = Vec::with_capacity(batch.len());
    for entry in batch {
        let message = encode(&entry.event, source);
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (key, value) in &message.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(topic)
            .key(message.key.as_str())
            .payload(message.value.as_slice())
            .headers(headers);
        let position = entry.event.global_position;
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push((position, delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let it drain, then enqueue again (in order).
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((source, _)) => return Err(PublishError::Delivery { position, source }),
            }
        }
    }
    let positions: Vec<i64> = deliveries.iter().map(|(p, _)| *p).collect();
    let results = join_all(deliveries.into_iter().map(|(_, d)| d)).await;
    for (position, result) in positions.into_iter().zip(results) {
        match result {
            Ok(Ok(_)) => {}
            Ok(Err((source, _))) => return Err(PublishError::Delivery { position, source }),
            Err(_) => return Err(PublishError::Canceled),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer for a broker that never answers, with a message in its queue: what the
    /// relay holds when it renews its producer after a failed batch.
    fn stuck_producer() -> FutureProducer {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "60000")
            .create()
            .expect("a producer");
        let record = FutureRecord::to("ledger.events").key("k").payload("{}");
        let delivery = producer.send_result(record).expect("enqueued");
        // Only the producer's own drop may end the delivery.
        std::mem::forget(delivery);
        producer
    }

    /// Something whose drop blocks until it is released, or gives up after a deadline and
    /// records that nobody released it.
    struct SlowToDrop {
        release: std::sync::mpsc::Receiver<()>,
        released: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Drop for SlowToDrop {
        fn drop(&mut self) {
            let released = self.release.recv_timeout(Duration::from_secs(10)).is_ok();
            self.released
                .store(released, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn disposing_never_blocks_the_runtime_thread_on_the_drop() {
        // The drop waits for a signal that is sent only after `dispose` has returned: had
        // `dispose` dropped in place, it would have waited out its deadline instead.
        let (release, waiting) = std::sync::mpsc::channel();
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gone = dispose(SlowToDrop {
            release: waiting,
            released: released.clone(),
        });
        release.send(()).expect("the drop is still waiting");
        gone.await.expect("dropped");
        assert!(
            released.load(std::sync::atomic::Ordering::SeqCst),
            "the drop ran on the caller's thread, before dispose returned"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_producer_with_undelivered_messages_is_disposed_of() {
        dispose(stuck_producer())
            .await
            .expect("the producer is dropped");
    }
}
