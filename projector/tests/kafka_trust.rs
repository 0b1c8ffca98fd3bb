//! A Kafka message is not trusted (ADR 0016): the store is the source of truth. A message
//! whose event the store does not hold, or holds elsewhere, or that is malformed (a sequence
//! below one, a NUL byte in a header), becomes a dead letter with its reason, the batch
//! commits, and the aggregate's real events still apply.

#![allow(clippy::unwrap_used)]

use ledger_events::kafka::encode;
use ledger_events::RecordedEvent;
use ledger_platform::testing::fresh_database;
use ledger_projector::apply::{Applier, Incoming};
use ledger_projector::source_kafka::incoming;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// The data keys, under the test KEK.
fn keys(pool: &sqlx::PgPool) -> ledger_pii::KeyStore {
    ledger_pii::testing::test_key_store(pool)
}

const A: &str = "00000000-0000-0000-0000-0000000000a1";

/// Stores A's events: opened, +10, +5; returns them as stored.
async fn store_account(pool: &PgPool) -> Vec<RecordedEvent> {
    let payloads = [
        json!({"type": "AccountOpened", "owner": "o1", "currency": "EUR"}),
        json!({"type": "MoneyDeposited", "amount": 10, "currency": "EUR", "reference": null}),
        json!({"type": "MoneyDeposited", "amount": 5, "currency": "EUR", "reference": null}),
    ];
    for (index, payload) in payloads.iter().enumerate() {
        let version = if index == 0 { "1" } else { "2" };
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', $1, $2, $3, $4, $5, '{}')",
        )
        .bind(A)
        .bind(index as i64 + 1)
        .bind(payload["type"].as_str().unwrap())
        .bind(version)
        .bind(payload)
        .execute(pool)
        .await
        .unwrap();
    }
    let mut conn = pool.acquire().await.unwrap();
    ledger_store::events_of(&mut conn, "account", A, 1, 3)
        .await
        .unwrap()
}

/// `event` as the consumer reads it off the topic at `offset`, with header `tamper`
/// (name, value) changed if given.
fn message(event: &RecordedEvent, offset: i64, tamper: Option<(&str, &str)>) -> Incoming {
    let message = encode(event, "/ledger");
    let headers: Vec<(&str, &[u8])> = message
        .headers
        .iter()
        .map(|(name, value)| match tamper {
            Some((changed, to)) if changed == *name => (*name, to.as_bytes()),
            _ => (*name, value.as_bytes()),
        })
        .collect();
    incoming(0, offset, &headers, &message.value)
}

async fn balance(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT balance FROM account_summaries WHERE account_id = $1")
        .bind(A)
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn letters(pool: &PgPool) -> Vec<(String, Option<i64>, Option<String>)> {
    sqlx::query_as(
        "SELECT reason, kafka_offset, raw_headers->>'ce_subject' FROM dead_letters ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_message_whose_event_the_store_does_not_hold_is_dead_lettered_and_repairs_nothing_past_it(
) {
    let (_url, pool) = fresh_database().await;
    let stored = store_account(&pool).await;
    let applier = Applier::new(pool.clone(), keys(&pool), Some(("g".into(), "t".into())));

    // A forged event far ahead of the store: a gap from 1 to 9 that the store cannot fill.
    let mut forged = stored[2].clone();
    forged.event_id = Uuid::new_v4();
    forged.sequence = 9;
    forged.global_position = 900;
    forged.payload =
        json!({"type": "MoneyDeposited", "amount": 1000, "currency": "EUR", "reference": null});
    // A real event's id claimed at another sequence.
    let mut moved = stored[2].clone();
    moved.sequence = 7;
    let applied = applier
        .apply_batch(&[
            message(&stored[0], 0, None),
            message(&forged, 1, None),
            message(&moved, 2, None),
        ])
        .await
        .unwrap();
    assert_eq!(applied.dead_letters, 2, "{applied:?}");
    assert_eq!(
        balance(&pool).await,
        Some(0),
        "nothing of the forgery applied"
    );

    // The real events arrive afterwards and are applied, not skipped as duplicates.
    applier
        .apply_batch(&[message(&stored[1], 3, None), message(&stored[2], 4, None)])
        .await
        .unwrap();
    assert_eq!(balance(&pool).await, Some(15));
    let reasons: Vec<String> = letters(&pool).await.into_iter().map(|l| l.0).collect();
    assert!(reasons[0].contains("not in the event store"), "{reasons:?}");
    assert!(
        reasons[1].contains("differs from the event store"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_message_with_a_sequence_below_one_is_dead_lettered_not_dropped() {
    let (_url, pool) = fresh_database().await;
    let stored = store_account(&pool).await;
    let applier = Applier::new(pool.clone(), keys(&pool), Some(("g".into(), "t".into())));
    applier
        .apply_batch(&[message(&stored[0], 0, None)])
        .await
        .unwrap();
    let mut zero = stored[1].clone();
    zero.sequence = 0;
    let applied = applier
        .apply_batch(&[
            message(&zero, 1, None),
            message(&stored[1], 2, Some(("ledger_sequence", "-3"))),
        ])
        .await
        .unwrap();
    assert_eq!(applied.dead_letters, 2, "{applied:?}");
    let letters = letters(&pool).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters
            .iter()
            .all(|(reason, _, _)| reason.contains("ledger_sequence")),
        "{letters:?}"
    );
    assert_eq!(
        letters.iter().map(|l| l.1).collect::<Vec<_>>(),
        vec![Some(1), Some(2)]
    );
}

#[tokio::test]
async fn a_nul_byte_in_a_header_is_dead_lettered_and_the_partition_moves_on() {
    let (_url, pool) = fresh_database().await;
    let stored = store_account(&pool).await;
    let applier = Applier::new(pool.clone(), keys(&pool), Some(("g".into(), "t".into())));
    let poisoned = format!("{A}\0");
    let batch = [
        message(&stored[0], 0, None),
        message(&stored[1], 1, Some(("ce_subject", poisoned.as_str()))),
        message(
            &stored[1],
            2,
            Some(("ledger_event_type", "Money\0Deposited")),
        ),
        message(&stored[1], 3, None),
        message(&stored[2], 4, None),
    ];
    let applied = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        applier.apply_batch(&batch),
    )
    .await
    .expect("the batch is handled")
    .expect("the batch commits");
    assert_eq!(applied.dead_letters, 2, "{applied:?}");
    assert_eq!(balance(&pool).await, Some(15));
    let letters = letters(&pool).await;
    assert!(
        letters.iter().all(|(reason, _, _)| reason.contains("NUL")),
        "{letters:?}"
    );
    // The letter keeps what it can of the raw header.
    assert_eq!(
        letters[0].2.as_deref(),
        Some(format!("{A}\u{FFFD}").as_str()),
        "{letters:?}"
    );
}
