//! Consuming the Kafka topic in a consumer group.
//!
//! One loop receives messages and hands each to the worker of its partition (partition
//! modulo the number of workers), so partitions are applied concurrently and each in order.
//! A worker applies what it has (up to the batch size) in one transaction, and only after
//! the commit stores the partitions' offsets for the next (auto) commit. A crash or a
//! rebalance can therefore only re-deliver events whose effect is already committed, and
//! the guards skip those.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ledger_events::kafka::decode;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use crate::apply::{BatchHandler, Incoming, Origin};
use crate::config::Settings;
use crate::status::SharedStatus;

/// The consumer for `settings` in consumer group `group`: offsets stored by the workers
/// after their commits, committed by the client every second.
pub fn consumer(
    settings: &Settings,
    brokers: &str,
    group: &str,
) -> Result<StreamConsumer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("client.id", "ledger-projector")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // A fetch the broker holds open when it has nothing new: short, because tansu
        // answers a held fetch only when this expires, not when data arrives (with the 500 ms
        // default the command-to-visible benchmark measured seconds; Kafka answers early
        // either way, so the only cost is idle fetches).
        .set("fetch.wait.max.ms", "10")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set(
            "session.timeout.ms",
            settings.kafka_session_timeout.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000")
        .create()
}

/// Runs until `stop` turns true; then lets the workers finish, commits offsets and leaves
/// the group.
pub async fn run<H: BatchHandler>(
    settings: Settings,
    consumer: Arc<StreamConsumer>,
    applier: H,
    status: SharedStatus,
    mut stop: watch::Receiver<bool>,
) -> Result<(), KafkaError> {
    consumer.subscribe(&[settings.kafka_topic.as_str()])?;
    let workers = usize::try_from(settings.workers).unwrap_or(1).max(1);
    let batch_size = usize::try_from(settings.batch_size).unwrap_or(500);
    let mut senders = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = mpsc::channel::<Incoming>(batch_size * 2);
        senders.push(tx);
        handles.push(tokio::spawn(work(
            rx,
            batch_size,
            applier.clone(),
            consumer.clone(),
            settings.kafka_topic.clone(),
            status.clone(),
        )));
    }
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            message = consumer.recv() => message,
        };
        match message {
            Ok(message) => {
                let worker = usize::try_from(message.partition()).unwrap_or(0) % workers;
                let incoming = to_incoming(&message);
                if senders[worker].send(incoming).await.is_err() {
                    break;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "consumer error");
                crate::status::failed(&status, &err.to_string());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    drop(senders);
    let drained = tokio::time::timeout(
        settings.shutdown_timeout,
        futures::future::join_all(handles),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("workers did not finish within the shutdown timeout");
    }
    if let Err(err) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %err, "nothing to commit at shutdown");
    }
    consumer.unsubscribe();
    tracing::info!("consumer stopped");
    Ok(())
}

/// A worker: applies its partitions' messages in batches, storing offsets after commits.
async fn work<H: BatchHandler>(
    mut rx: mpsc::Receiver<Incoming>,
    batch_size: usize,
    applier: H,
    consumer: Arc<StreamConsumer>,
    topic: String,
    status: SharedStatus,
) {
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push(first);
        while batch.len() < batch_size {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match applier.handle(&batch).await {
                Ok(applied) => {
                    crate::status::applied(&status, batch.len(), applied);
                    break;
                }
                Err(err) => {
                    // Nothing was committed: the same batch is retried, in order.
                    tracing::warn!(error = %err, "batch failed; retrying");
                    crate::status::failed(&status, &err.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
        for item in &batch {
            if let Origin::Kafka { partition, offset } = item.origin() {
                let entry = offsets.entry(partition).or_insert(offset);
                *entry = (*entry).max(offset);
            }
        }
        for (partition, offset) in offsets {
            if let Err(err) = consumer.store_offset(&topic, partition, offset) {
                // The partition was revoked meanwhile: its new owner re-delivers, the guards
                // skip what is already applied.
                tracing::debug!(partition, error = %err, "offset not stored");
            }
        }
    }
}

/// Reads a message into an event, or keeps it raw when it is not one.
fn to_incoming(message: &BorrowedMessage<'_>) -> Incoming {
    let origin = Origin::Kafka {
        partition: message.partition(),
        offset: message.offset(),
    };
    let headers: Vec<(&str, &[u8])> = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key, h.value.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let value = message.payload().unwrap_or_default();
    match decode(headers.iter().copied(), value) {
        Ok(event) => Incoming::Event {
            event: Box::new(event),
            origin,
        },
        Err(err) => {
            let raw_headers: Map<String, Value> = headers
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        Value::String(String::from_utf8_lossy(v).into_owned()),
                    )
                })
                .collect();
            Incoming::Unreadable {
                reason: err.to_string(),
                origin,
                headers: Some(Value::Object(raw_headers)),
                value: Some(String::from_utf8_lossy(value).into_owned()),
            }
        }
    }
}
