//! Reading what reached the topic, straight from the partitions (no consumer group).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// One message as read.
#[derive(Debug, Clone)]
pub struct Received {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: serde_json::Value,
    pub headers: HashMap<String, String>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn event_id(&self) -> &str {
        self.header("ce_id")
    }

    pub fn sequence(&self) -> i64 {
        self.header("ledger_sequence").parse().unwrap_or(-1)
    }
}

/// Number of messages in the topic (sum of high watermarks).
pub fn message_count(brokers: &str, topic: &str) -> i64 {
    let consumer = consumer(brokers);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .map(|(low, high)| high - low)
                .unwrap_or(0)
        })
        .sum()
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ledger-e2e-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Reads every message of `topic` until at least `distinct` different event ids have been
/// seen (duplicates are kept), or panics at `deadline`. In offset order per partition.
pub fn read_all(brokers: &str, topic: &str, distinct: usize, deadline: Duration) -> Vec<Received> {
    let mut ids = std::collections::HashSet::new();
    read_until(brokers, topic, deadline, |message| {
        if let Some(message) = message {
            ids.insert(message.event_id().to_owned());
        }
        ids.len() >= distinct
    })
    .unwrap_or_else(|seen| {
        panic!(
            "only {} of {distinct} events reached {topic} within {deadline:?}",
            seen.iter()
                .map(Received::event_id)
                .collect::<std::collections::HashSet<_>>()
                .len()
        )
    })
}

/// Reads `topic` from the beginning until no message came for `idle` (or `deadline`).
pub fn read_available(
    brokers: &str,
    topic: &str,
    idle: Duration,
    deadline: Duration,
) -> Vec<Received> {
    let mut last = Instant::now();
    read_until(brokers, topic, deadline, |message| {
        if message.is_some() {
            last = Instant::now();
        }
        last.elapsed() >= idle
    })
    .unwrap_or_else(|seen| seen)
}

/// Reads from the beginning of every partition, giving `done` each message (or `None` after
/// an empty poll) until it says so. `Err` with what was read when `deadline` passes first.
fn read_until(
    brokers: &str,
    topic: &str,
    deadline: Duration,
    mut done: impl FnMut(Option<&Received>) -> bool,
) -> Result<Vec<Received>, Vec<Received>> {
    let consumer = consumer(brokers);
    let start = Instant::now();
    let partitions: Vec<i32> = loop {
        if let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            let ids: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions())
                .map(|p| p.id())
                .collect();
            if !ids.is_empty() {
                break ids;
            }
        }
        assert!(start.elapsed() < deadline, "topic {topic} never appeared");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in &partitions {
        assignment
            .add_partition_offset(topic, *partition, Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
    let mut received = Vec::new();
    loop {
        if start.elapsed() >= deadline {
            return Err(received);
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            if done(None) {
                return Ok(received);
            }
            continue;
        };
        {
            // Transient client errors (e.g. while the broker restarts) only delay reading.
            let Ok(message) = result else { continue };
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|header| {
                            (
                                header.key.to_owned(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let item = Received {
                partition: message.partition(),
                offset: message.offset(),
                key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                value: serde_json::from_slice(message.payload().unwrap_or_default())
                    .unwrap_or(serde_json::Value::Null),
                headers,
            };
            let stop = done(Some(&item));
            received.push(item);
            if stop {
                return Ok(received);
            }
        }
    }
}

/// Asserts that, per aggregate, the first delivery of each event comes in sequence order
/// 1, 2, 3… with nothing missing, and that every duplicate repeats an earlier event exactly.
pub fn assert_per_aggregate_order(messages: &[Received]) {
    let mut by_partition: BTreeMap<i32, Vec<&Received>> = BTreeMap::new();
    for message in messages {
        by_partition
            .entry(message.partition)
            .or_default()
            .push(message);
    }
    let mut next: HashMap<&str, i64> = HashMap::new();
    let mut first_seen: HashMap<&str, &Received> = HashMap::new();
    for partition in by_partition.values_mut() {
        partition.sort_by_key(|m| m.offset);
        for message in partition.iter() {
            if let Some(first) = first_seen.get(message.event_id()) {
                assert_eq!(first.key, message.key, "duplicate changed key");
                assert_eq!(first.value, message.value, "duplicate changed value");
                assert_eq!(
                    first.sequence(),
                    message.sequence(),
                    "duplicate changed sequence"
                );
                continue;
            }
            first_seen.insert(message.event_id(), message);
            let expected = next.entry(message.key.as_str()).or_insert(1);
            assert_eq!(
                message.sequence(),
                *expected,
                "aggregate {} out of order at partition {} offset {}",
                message.key,
                message.partition,
                message.offset
            );
            *expected += 1;
        }
    }
}
