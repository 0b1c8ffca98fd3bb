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
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use crate::apply::{BatchHandler, Incoming, Origin};
use crate::config::Settings;
use crate::status::SharedStatus;

/// The consumer for `settings` in consumer group `group`: offsets stored by the workers
/// after their commits, committed by the client every second (ADR 0011 gives the reasons for
/// each setting, with measurements).
pub fn consumer(
    settings: &Settings,
    brokers: &str,
    group: &str,
) -> Result<StreamConsumer, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("client.id", "ledger-projector")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set(
            "session.timeout.ms",
            settings.kafka_session_timeout.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "1000");
    if let Some(instance) = &settings.kafka_group_instance_id {
        config.set("group.instance.id", instance);
    }
    config.create()
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
            settings.batch_linger,
            applier.clone(),
            consumer.clone(),
            settings.kafka_topic.clone(),
            status.clone(),
            stop.clone(),
        )));
    }
    let mut watchdog = Watchdog::new(settings.kafka_stall_timeout);
    let mut tick = tokio::time::interval(watchdog.check_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = tick.tick() => None,
            message = consumer.recv() => Some(message),
        };
        let Some(message) = message else {
            watchdog
                .check(&consumer, &settings.kafka_topic, &status)
                .await;
            continue;
        };
        match message {
            Ok(message) => {
                watchdog.received(&status);
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

/// Finds a consumer that receives nothing while its group has events waiting and nobody in
/// the group moves them on (e.g. it sits in the group assigned nothing, or a member holding
/// the partitions does no work), says so (`/readyz`, the metric, a log line) and makes it
/// leave and rejoin the group.
struct Watchdog {
    timeout: Duration,
    last_received: std::time::Instant,
    /// The group's committed offsets summed over the topic's partitions, and since when.
    committed: Option<(i64, std::time::Instant)>,
}

impl Watchdog {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            last_received: std::time::Instant::now(),
            committed: None,
        }
    }

    fn check_every(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    fn received(&mut self, status: &SharedStatus) {
        self.last_received = std::time::Instant::now();
        crate::status::unstalled(status);
    }

    async fn check(&mut self, consumer: &Arc<StreamConsumer>, topic: &str, status: &SharedStatus) {
        let probe = consumer.clone();
        let name = topic.to_owned();
        let Ok(Some(progress)) =
            tokio::task::spawn_blocking(move || group_progress(&probe, &name)).await
        else {
            return; // The broker did not answer: the consumer's own errors say so.
        };
        let now = std::time::Instant::now();
        let moved =
            !matches!(self.committed, Some((committed, _)) if committed == progress.committed);
        if moved {
            self.committed = Some((progress.committed, now));
        }
        let since_progress = self.committed.map_or(Duration::ZERO, |(_, at)| now - at);
        let idle = now - self.last_received;
        if progress.lag > 0 && idle >= self.timeout && since_progress >= self.timeout {
            let reason = format!(
                "received nothing for {}s while the group has {} events waiting and committed none of them for {}s; assigned partitions: {}; leaving and rejoining the group",
                idle.as_secs(),
                progress.lag,
                since_progress.as_secs(),
                progress.assigned
            );
            tracing::warn!(
                lag = progress.lag,
                assigned = progress.assigned,
                "consumer stalled: {reason}"
            );
            crate::status::stalled(status, &reason);
            consumer.unsubscribe();
            if let Err(err) = consumer.subscribe(&[topic]) {
                tracing::warn!(error = %err, "cannot subscribe again");
            }
            // Give the rejoin a full period before judging again.
            self.last_received = now;
            self.committed = Some((progress.committed, now));
        }
    }
}

/// The group's position on the topic: events waiting (high watermarks minus committed
/// offsets, the low watermark where nothing is committed) and the committed offsets' sum.
struct GroupProgress {
    lag: i64,
    committed: i64,
    assigned: usize,
}

fn group_progress(consumer: &StreamConsumer, topic: &str) -> Option<GroupProgress> {
    let timeout = Duration::from_secs(5);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let mut partitions = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        partitions.add_partition(topic, partition.id());
    }
    if partitions.count() == 0 {
        return None;
    }
    let committed = consumer.committed_offsets(partitions, timeout).ok()?;
    let (mut lag, mut sum) = (0i64, 0i64);
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(topic, element.partition(), timeout)
            .ok()?;
        let next = match element.offset() {
            Offset::Offset(offset) => offset.max(low),
            _ => low,
        };
        lag += (high - next).max(0);
        sum += next;
    }
    let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
    Some(GroupProgress {
        lag,
        committed: sum,
        assigned,
    })
}

/// Adds to `batch` (which holds the message that started it) what is queued, up to
/// `batch_size`; with a `linger`, waits up to that long after the first message for more,
/// so that light load is still applied at once (linger 0, the default) or in fewer, larger
/// batches (`PROJECTOR_BATCH_LINGER`). Under load the queue fills while the previous batch
/// is applied, so batches grow with the load either way.
async fn fill<T>(
    rx: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    batch_size: usize,
    linger: Duration,
) {
    let until = tokio::time::Instant::now() + linger;
    while batch.len() < batch_size {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(mpsc::error::TryRecvError::Empty) if !linger.is_zero() => {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    Ok(None) | Err(_) => break,
                }
            }
            Err(_) => break,
        }
    }
}

/// A worker: applies its partitions' messages in batches, storing offsets after commits.
/// A batch that fails is retried with backoff until it commits or `stop` turns true; then
/// the worker leaves it uncommitted (its offsets not stored, so it is delivered again).
#[allow(clippy::too_many_arguments)]
async fn work<H: BatchHandler>(
    mut rx: mpsc::Receiver<Incoming>,
    batch_size: usize,
    linger: Duration,
    applier: H,
    consumer: Arc<StreamConsumer>,
    topic: String,
    status: SharedStatus,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push(first);
        fill(&mut rx, &mut batch, batch_size, linger).await;
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
                    let stopping = tokio::select! {
                        () = tokio::time::sleep(backoff) => false,
                        _ = stop.wait_for(|stopped| *stopped) => true,
                    };
                    if stopping {
                        tracing::info!(
                            events = batch.len(),
                            "stopping with a failing batch uncommitted: it is delivered again"
                        );
                        return;
                    }
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
    incoming(message.partition(), message.offset(), &headers, value)
}

/// The message at `partition`/`offset` with `headers` and `value`, read into an event, or
/// kept raw (with why) when it is not one.
pub fn incoming(partition: i32, offset: i64, headers: &[(&str, &[u8])], value: &[u8]) -> Incoming {
    let origin = Origin::Kafka { partition, offset };
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

#[cfg(test)]
mod batching_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn without_a_linger_a_batch_is_what_is_queued() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(2).await.unwrap();
        tokio::spawn({
            let tx = tx.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                tx.send(3).await.unwrap();
            }
        });
        let mut batch = vec![1];
        fill(&mut rx, &mut batch, 10, Duration::ZERO).await;
        assert_eq!(batch, vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_linger_waits_for_more_up_to_its_end_or_a_full_batch() {
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for (at, n) in [(2, 2), (4, 3), (20, 4)] {
                tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(at))
                    .await;
                tx.send(n).await.unwrap();
            }
        });
        let start = tokio::time::Instant::now();
        let mut batch = vec![1];
        fill(&mut rx, &mut batch, 10, Duration::from_millis(10)).await;
        assert_eq!(
            batch,
            vec![1, 2, 3],
            "the message after the linger waits for the next batch"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(10));

        let (tx, mut rx) = mpsc::channel(16);
        tx.send(2).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut batch = vec![1];
        fill(&mut rx, &mut batch, 2, Duration::from_secs(60)).await;
        assert_eq!(batch, vec![1, 2]);
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a full batch does not linger"
        );
    }
}
