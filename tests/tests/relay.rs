//! The relay against a real PostgreSQL and a real Kafka-protocol broker (promise 3: the log
//! never skips).

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use ledger_e2e::broker::Broker;
use ledger_e2e::kafka::{assert_per_aggregate_order, message_count, read_all};
use ledger_e2e::services::{migrated_database, topic, CommandApi, Relay};
use nix::sys::signal::Signal;
use sqlx::{Connection, PgConnection};

/// Deadline for anything that crosses the broker (group-free reads are fast; restarts are
/// not).
const KAFKA: Duration = Duration::from_secs(90);

async fn event_ids(url: &str) -> HashSet<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM events")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

/// Opens `accounts` accounts and makes `deposits` deposits in each, concurrently across
/// accounts; returns the account ids. The first call on an API also registers the data
/// subject the accounts belong to: one event more (the counts below say `+ 1`).
async fn traffic(api: &CommandApi, accounts: usize, deposits: i64) -> Vec<String> {
    let ids = join_all((0..accounts).map(|_| api.open_account())).await;
    join_all(ids.iter().map(|id| async move {
        for amount in 1..=deposits {
            api.deposit(id, amount).await;
        }
    }))
    .await;
    ids
}

fn assert_same_events(received: &[ledger_e2e::kafka::Received], stored: &HashSet<String>) {
    let published: HashSet<String> = received.iter().map(|m| m.event_id().to_owned()).collect();
    assert_eq!(
        &published, stored,
        "published events differ from stored events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_published_once_with_readable_cloudevents_headers() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let relay = Relay::start(&url, &broker.address, &[]).await;
    traffic(&api, 4, 5).await;
    let stored = event_ids(&url).await;
    assert_eq!(stored.len(), 24 + 1);

    let received = read_all(&broker.address, &topic(&url), stored.len(), KAFKA);
    assert_same_events(&received, &stored);
    assert_eq!(
        received.len(),
        stored.len(),
        "no duplicates without a crash"
    );
    assert_per_aggregate_order(&received);
    let deposit = received
        .iter()
        .find(|m| m.header("ledger_event_type") == "MoneyDeposited")
        .unwrap();
    assert_eq!(deposit.header("ce_specversion"), "1.0");
    assert_eq!(deposit.header("ce_type"), "ledger.account.MoneyDeposited");
    assert_eq!(deposit.header("ce_subject"), deposit.key);
    assert_eq!(deposit.header("content-type"), "application/json");
    assert_eq!(deposit.header("ledger_event_version"), "3");
    assert!(!deposit.header("ledger_request_id").is_empty());
    assert!(ledger_events::metadata::is_valid_traceparent(
        deposit.header("traceparent")
    ));
    assert_eq!(deposit.value["type"], "MoneyDeposited");
    assert!(deposit.value["amount"].as_i64().is_some());

    let status = relay
        .wait_status("caught up", KAFKA, |s| {
            s["lag_events"] == 0 && s["published"] == 24 + 1
        })
        .await;
    assert_eq!(status["leader"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holding_an_earlier_position_stops_publication_until_it_commits() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    // One partition: the relay's publication order is the topic's order.
    let relay = Relay::start(&url, &broker.address, &[("KAFKA_TOPIC_PARTITIONS", "1")]).await;
    let before = traffic(&api, 1, 2).await;
    read_all(&broker.address, &topic(&url), 3 + 1, KAFKA);

    // A transaction takes the next position and stays open...
    let mut slow = PgConnection::connect(&url).await.unwrap();
    let mut open = slow.begin().await.unwrap();
    let gap: i64 = sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, 4, 'MoneyDeposited', '2',
                 '{\"type\":\"MoneyDeposited\",\"amount\":9,\"currency\":\"EUR\",\"reference\":null}', '{}')
         RETURNING global_position",
    )
    .bind(&before[0])
    .fetch_one(&mut *open)
    .await
    .unwrap();
    // ...while later transactions commit.
    let later = traffic(&api, 2, 2).await;
    assert_eq!(later.len(), 2);
    let polls = relay.status().await["polls"].as_i64().unwrap();
    relay
        .wait_status("two more reads of the log", KAFKA, |s| {
            s["polls"].as_i64().unwrap() >= polls + 2
        })
        .await;
    assert_eq!(
        message_count(&broker.address, &topic(&url)),
        3 + 1,
        "the relay published past a transaction that was still open"
    );

    open.commit().await.unwrap();
    let received = read_all(&broker.address, &topic(&url), 3 + 1 + 1 + 6, KAFKA);
    let positions: Vec<i64> = received
        .iter()
        .map(|m| m.header("ledger_global_position").parse().unwrap())
        .collect();
    assert_eq!(
        positions[4], gap,
        "the held event comes first once committed: {positions:?}"
    );
    assert!(positions[5..].iter().all(|p| *p > gap));
    assert_per_aggregate_order(&received);
    assert_same_events(&received, &event_ids(&url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_checkpoint_resends_and_skips_nothing() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    traffic(&api, 3, 3).await; // 12 events + 1
    let stored = event_ids(&url).await;

    let mut crashing = Relay::start(
        &url,
        &broker.address,
        &[("RELAY_BATCH_SIZE", "5"), ("RELAY_CRASH_AFTER_BATCH", "1")],
    )
    .await;
    let code = crashing.process.exit_code(KAFKA).await;
    assert_ne!(code, 0, "the fault injection did not fire");
    assert_eq!(
        message_count(&broker.address, &topic(&url)),
        5,
        "the first batch reached the broker"
    );
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let checkpoints: i64 = sqlx::query_scalar("SELECT count(*) FROM relay_checkpoints")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(checkpoints, 0, "it died before its checkpoint");

    let _relay = Relay::start(&url, &broker.address, &[("RELAY_BATCH_SIZE", "5")]).await;
    let received = read_all(&broker.address, &topic(&url), stored.len(), KAFKA);
    assert_same_events(&received, &stored);
    assert_eq!(
        received.len(),
        12 + 1 + 5,
        "the unacknowledged batch was sent again"
    );
    assert_per_aggregate_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_delays_publication_loses_nothing_and_never_blocks_commands() {
    let mut broker = Broker::start().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let relay = Relay::start(&url, &broker.address, &[]).await;
    let accounts = traffic(&api, 2, 2).await;
    read_all(&broker.address, &topic(&url), 6 + 1, KAFKA);

    broker.stop().await;
    // Commands keep succeeding while the broker is down.
    for account in &accounts {
        for amount in 10..15 {
            api.deposit(account, amount).await;
        }
    }
    let more = traffic(&api, 2, 3).await;
    assert_eq!(more.len(), 2);
    let stored = event_ids(&url).await;
    assert_eq!(stored.len(), 6 + 1 + 10 + 8);
    relay
        .wait_status("lag reported during the outage", KAFKA, |s| {
            s["lag_events"].as_i64().unwrap_or(0) > 0
        })
        .await;

    broker.resume().await;
    let brokers = broker.address.clone();
    let expected = stored.len();
    let topic_name = topic(&url);
    let reading =
        tokio::task::spawn_blocking(move || read_all(&brokers, &topic_name, expected, KAFKA));
    let received = match reading.await {
        Ok(received) => received,
        Err(panic) => {
            let mut relay = relay;
            relay.process.signal(Signal::SIGKILL);
            let logs = relay.process.drain().await;
            panic!(
                "{panic:?}\nrelay log tail:\n{}\nbroker log tail:\n{}",
                logs[logs.len().saturating_sub(30)..].join("\n"),
                broker.log_tail(30)
            );
        }
    };
    assert_same_events(&received, &stored);
    assert_per_aggregate_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_when_the_leader_dies_and_skips_nothing() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let first = Relay::start(&url, &broker.address, &[]).await;
    first
        .wait_status("leadership", KAFKA, |s| s["leader"] == true)
        .await;
    let mut second = Relay::start(&url, &broker.address, &[]).await;
    assert_eq!(
        second.status().await["leader"],
        false,
        "two leaders at once"
    );
    traffic(&api, 2, 3).await;
    read_all(&broker.address, &topic(&url), 8 + 1, KAFKA);

    // Kill the leader outright; commands go on meanwhile.
    let (mut leader, standby) = (first, &mut second);
    leader.process.signal(Signal::SIGKILL);
    leader.process.exit_code(Duration::from_secs(10)).await;
    traffic(&api, 2, 3).await;
    standby
        .wait_status("takeover", KAFKA, |s| s["leader"] == true)
        .await;
    let stored = event_ids(&url).await;
    assert_eq!(stored.len(), 16 + 1);
    let received = read_all(&broker.address, &topic(&url), stored.len(), KAFKA);
    assert_same_events(&received, &stored);
    assert_per_aggregate_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_relay_cleanly_with_its_checkpoint_written() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let mut relay = Relay::start(&url, &broker.address, &[]).await;
    traffic(&api, 2, 2).await;
    relay
        .wait_status("published", KAFKA, |s| s["published"] == 6 + 1)
        .await;
    relay.process.signal(Signal::SIGTERM);
    assert_eq!(relay.process.exit_code(Duration::from_secs(30)).await, 0);
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // The checkpoint is the cursor of the last event in commit order, (transaction id,
    // position): with batches committing side by side (a pipelined writer), that is not
    // always the highest position.
    let checkpoint: (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM relay_checkpoints",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let last: (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events
          ORDER BY events.transaction_id DESC, events.global_position DESC LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(checkpoint, last);
}

/// An operator's own tool reads the topic: Debian's kcat (librdkafka's command-line client)
/// sees each event keyed by its aggregate id, with the CloudEvents and ledger headers the
/// README lists and the stored payload as the JSON value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_reads_each_event_keyed_by_aggregate_with_the_documented_headers_and_value() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let _relay = Relay::start(&url, &broker.address, &[]).await;
    traffic(&api, 3, 2).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let stored: Vec<(uuid::Uuid, String, i64, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id, aggregate_id, sequence, payload::jsonb FROM events ORDER BY global_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(stored.len(), 9 + 1);
    read_all(&broker.address, &topic(&url), stored.len(), KAFKA);

    let output = tokio::process::Command::new("kcat")
        .args(["-C", "-b", &broker.address, "-t", &topic(&url)])
        .args(["-o", "beginning", "-e", "-q", "-J"])
        .output()
        .await
        .expect("kcat is installed by scripts/kafka.sh (Debian package kcat)");
    assert!(
        output.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let messages: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(messages.len(), stored.len(), "{messages:?}");
    let documented = [
        "ce_id",
        "ce_source",
        "ce_specversion",
        "ce_subject",
        "ce_time",
        "ce_type",
        "content-type",
        "ledger_aggregate_type",
        "ledger_correlation_id",
        "ledger_event_type",
        "ledger_event_version",
        "ledger_global_position",
        "ledger_metadata",
        "ledger_request_id",
        "ledger_sequence",
        "traceparent",
    ];
    for message in &messages {
        // kcat -J gives headers as a flat [name, value, name, value, …] array.
        let flat = message["headers"].as_array().unwrap();
        let headers: std::collections::BTreeMap<&str, &str> = flat
            .chunks(2)
            .map(|pair| (pair[0].as_str().unwrap(), pair[1].as_str().unwrap_or("")))
            .collect();
        let (_, aggregate, sequence, payload) = stored
            .iter()
            .find(|(id, ..)| id.to_string() == headers["ce_id"])
            .unwrap_or_else(|| panic!("{} is not a stored event", headers["ce_id"]));
        // A payload with personal fields (ciphertext) also names its data subject and key
        // version (ADR 0019): the subject's registration here.
        let personal = payload
            .as_object()
            .unwrap()
            .values()
            .any(|value| value.as_str().is_some_and(|text| text.starts_with("pii1.")));
        let mut expected: Vec<&str> = documented.to_vec();
        if personal {
            expected.extend(["ledger_data_subject", "ledger_pii_key_version"]);
            expected.sort_unstable();
            assert_eq!(headers["ledger_data_subject"], aggregate);
        }
        let names: Vec<&str> = headers.keys().copied().collect();
        assert_eq!(names, expected, "header names of {message}");
        assert_eq!(
            message["key"],
            aggregate.as_str(),
            "the key is the aggregate id"
        );
        assert_eq!(headers["ce_subject"], aggregate);
        assert_eq!(headers["ce_source"], "/ledger");
        assert_eq!(headers["ledger_sequence"], sequence.to_string());
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            headers["ce_type"],
            format!(
                "ledger.{}.{}",
                headers["ledger_aggregate_type"], headers["ledger_event_type"]
            )
        );
        let value: serde_json::Value =
            serde_json::from_str(message["payload"].as_str().unwrap()).unwrap();
        assert_eq!(&value, payload, "the value is the stored payload");
    }
}
