//! Transfers whose messages the log lost (defect 6 of the review, ADR 0016): the process
//! manager finds transfers that are not terminal and older than a threshold in the store,
//! not in Kafka, and drives them on.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ledger_e2e::broker::Broker;
use ledger_e2e::eventually;
use ledger_e2e::services::{
    balances_from_events, migrated_database, topic, CommandApi, Projector, Relay,
};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(90);

async fn post(api: &CommandApi, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut request = api.client.post(format!("{}{path}", api.base)).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn open(api: &CommandApi) -> String {
    let (status, body) = post(
        api,
        "/v1/accounts",
        json!({"owner": "t", "currency": "EUR"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["account_id"].as_str().unwrap().to_owned()
}

/// Requests a transfer; returns (transfer id, position).
async fn transfer(api: &CommandApi, from: &str, to: &str, amount: i64) -> (String, i64) {
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({"from": from, "to": to, "amount": amount, "currency": "EUR"});
    let (status, answer) = post(api, "/v1/transfers", body, Some(&key)).await;
    assert_eq!(status, 202, "{answer}");
    (
        answer["transfer_id"].as_str().unwrap().to_owned(),
        answer["position"].as_i64().unwrap(),
    )
}

/// Deletes every message of `topic` published so far (Kafka's DeleteRecords up to each
/// partition's high watermark), as a retention would; returns how many were deleted.
async fn delete_every_message(brokers: &str, topic: &str) -> i64 {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let (offsets, deleted) = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
        move || {
            let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .unwrap();
            let timeout = Duration::from_secs(10);
            let metadata =
                rdkafka::consumer::Consumer::fetch_metadata(&consumer, Some(&topic), timeout)
                    .unwrap();
            let mut offsets = TopicPartitionList::new();
            let mut deleted = 0;
            for partition in metadata.topics()[0].partitions() {
                let (low, high) = rdkafka::consumer::Consumer::fetch_watermarks(
                    &consumer,
                    &topic,
                    partition.id(),
                    timeout,
                )
                .unwrap();
                deleted += high - low;
                offsets
                    .add_partition_offset(&topic, partition.id(), Offset::Offset(high))
                    .unwrap();
            }
            (offsets, deleted)
        }
    })
    .await
    .unwrap();
    let result = admin
        .delete_records(
            &offsets,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for element in result.elements() {
        assert!(element.error().is_ok(), "{element:?}");
    }
    deleted
}

/// Each transfer's latest event type, from the store.
async fn latest_transfer_events(url: &str) -> BTreeMap<String, String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (aggregate_id) aggregate_id, event_type FROM events
          WHERE aggregate_type = 'transfer' ORDER BY aggregate_id, sequence DESC",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.into_iter().collect()
}

#[tokio::test]
async fn transfers_whose_messages_the_log_lost_are_still_driven_to_an_end_from_the_store() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let rich = open(&api).await;
    let (status, body) = post(
        &api,
        &format!("/v1/accounts/{rich}/deposits"),
        json!({"amount": 1_000, "currency": "EUR"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let dest = open(&api).await;
    let poor = open(&api).await;
    let closed = open(&api).await;
    let (status, body) = post(
        &api,
        &format!("/v1/accounts/{closed}/close"),
        Value::Null,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (completes, _) = transfer(&api, &rich, &dest, 300).await;
    let (fails, _) = transfer(&api, &poor, &dest, 50).await;
    let (compensated, last) = transfer(&api, &rich, &closed, 200).await;

    // The relay publishes everything; then the topic loses it all, before any process
    // manager has read it.
    let relay = Relay::start(&url, &broker.address, &[("KAFKA_TOPIC_PARTITIONS", "3")]).await;
    relay
        .wait_status("every event published", DEADLINE, |s| {
            s["global_position"].as_i64() >= Some(last)
        })
        .await;
    let deleted = delete_every_message(&broker.address, &topic(&url)).await;
    assert!(deleted >= 3, "{deleted} messages deleted");

    // A process manager in a new consumer group: the early messages are gone.
    let projector = Projector::start(
        &url,
        Some(&broker.address),
        &[
            ("TRANSFERS_STUCK_AFTER", "1s"),
            ("TRANSFERS_SWEEP_INTERVAL", "200ms"),
        ],
    )
    .await;

    let expected: BTreeMap<String, String> = [
        (completes, "TransferCompleted"),
        (fails, "TransferFailed"),
        (compensated, "TransferCompensated"),
    ]
    .into_iter()
    .map(|(id, state)| (id, state.to_owned()))
    .collect();
    eventually(DEADLINE, "every transfer terminal in the store", || {
        let (url, expected) = (url.clone(), expected.clone());
        async move {
            let latest = latest_transfer_events(&url).await;
            if latest == expected {
                Ok(())
            } else {
                Err(format!("{latest:?}"))
            }
        }
    })
    .await;

    // Money is conserved: every unit deposited is on an account, none in flight.
    let balances = balances_from_events(&url).await;
    assert_eq!(balances.get(&rich), Some(&700), "{balances:?}");
    assert_eq!(balances.get(&dest), Some(&300), "{balances:?}");
    assert_eq!(balances.values().sum::<i64>(), 1_000, "{balances:?}");

    // The sweep says what it found and did.
    let status = projector.status().await;
    let counters = &status["transfer_process_manager"]["counters"];
    assert!(
        counters["swept_transfers"].as_u64() >= Some(3),
        "{status:#}"
    );
    assert!(counters["stuck_transfers"].is_u64(), "{status:#}");
}
