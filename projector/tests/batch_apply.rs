//! The batch apply against a real PostgreSQL: one batch gives exactly the rows, guards and
//! dead letters that the same events applied one at a time give (promise 5 holds by
//! construction only if batching changes nothing), duplicates and a gap included.

#![allow(clippy::unwrap_used)]

use ledger_platform::testing::fresh_database;
use ledger_projector::apply::{apply_events, Applied, Origin};
use ledger_readmodels::names;
use ledger_store::LogCursor;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

/// The data keys, under the test KEK.
fn keys(pool: &sqlx::PgPool) -> ledger_pii::KeyStore {
    ledger_pii::testing::test_key_store(pool)
}

const A: &str = "00000000-0000-0000-0000-00000000000a";
const B: &str = "00000000-0000-0000-0000-00000000000b";
const T: &str = "00000000-0000-0000-0000-0000000000f1";

/// Events of several accounts and a transfer, interleaved, with refusals among them.
fn events() -> Vec<(&'static str, &'static str, i64, Value)> {
    let eur = "EUR";
    vec![
        (
            "account",
            A,
            1,
            json!({"type": "AccountOpened", "owner": "o1", "currency": eur}),
        ),
        (
            "account",
            B,
            1,
            json!({"type": "AccountOpened", "owner": "o1", "currency": eur}),
        ),
        (
            "account",
            A,
            2,
            json!({"type": "MoneyDeposited", "amount": 10, "currency": eur, "reference": "r1"}),
        ),
        (
            "transfer",
            T,
            1,
            json!({"type": "TransferRequested", "from": A, "to": B, "amount": 5, "currency": eur}),
        ),
        (
            "account",
            A,
            3,
            json!({"type": "MoneyWithdrawn", "amount": 3, "currency": eur, "reference": null}),
        ),
        (
            "account",
            "c",
            1,
            json!({"type": "AccountOpened", "owner": "o2", "currency": eur}),
        ),
        (
            "account",
            A,
            4,
            json!({"type": "TransferSent", "transfer_id": T, "to": B, "amount": 5, "currency": eur}),
        ),
        ("transfer", T, 2, json!({"type": "TransferDebited"})),
        (
            "account",
            B,
            2,
            json!({"type": "TransferReceived", "transfer_id": T, "from": A, "amount": 5, "currency": eur}),
        ),
        (
            "account",
            "c",
            2,
            json!({"type": "AccountOpened", "owner": "o2", "currency": eur}),
        ),
        (
            "account",
            A,
            5,
            json!({"type": "TransferSettled", "transfer_id": T}),
        ),
        ("transfer", T, 3, json!({"type": "TransferCompleted"})),
        (
            "account",
            "never-opened",
            1,
            json!({"type": "MoneyDeposited", "amount": 4, "currency": eur, "reference": null}),
        ),
        (
            "account",
            "c",
            3,
            json!({"type": "MoneyDeposited", "amount": 1, "currency": eur, "reference": null}),
        ),
        ("account", "x", 1, json!({"type": "MoneyTeleported"})),
        (
            "account",
            A,
            6,
            json!({"type": "MoneyDeposited", "amount": 7, "currency": eur, "reference": null}),
        ),
        ("account", B, 3, json!({"type": "AccountClosed"})),
        (
            "account",
            A,
            7,
            json!({"type": "MoneyWithdrawn", "amount": 2, "currency": eur, "reference": "r2"}),
        ),
    ]
}

fn version(payload: &Value) -> &'static str {
    match payload["type"].as_str() {
        Some("MoneyDeposited" | "MoneyWithdrawn") => "2",
        _ => "1",
    }
}

/// Every read-model row, guard and dead letter, as JSON (without the letters' ids and times).
async fn snapshot(conn: &mut PgConnection) -> Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object(
            'summaries', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM account_summaries t),
            'statements', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id, sequence) FROM account_statements t),
            'totals', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id, currency) FROM subject_totals t),
            'total_accounts', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM subject_total_accounts t),
            'subjects', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id) FROM subjects t),
            'transfers', (SELECT jsonb_agg(to_jsonb(t) ORDER BY transfer_id) FROM transfers t),
            'guards', (SELECT jsonb_agg(to_jsonb(t) ORDER BY projection, aggregate_id) FROM projection_guards t),
            'letters', (SELECT jsonb_agg(jsonb_build_object('p', projection, 'a', aggregate_id,
                                                            's', sequence, 'r', reason)
                                         ORDER BY projection, aggregate_id, sequence)
                          FROM dead_letters))",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn one_batch_gives_the_rows_guards_and_dead_letters_of_one_event_at_a_time() {
    let (url, pool) = fresh_database().await;
    for (aggregate_type, id, sequence, payload) in events() {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ($1, $2, $3, $4, $5, $6, '{}')",
        )
        .bind(aggregate_type)
        .bind(id)
        .bind(sequence)
        .bind(payload["type"].as_str().unwrap())
        .bind(version(&payload))
        .bind(&payload)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Reads are commit-safe: they wait for transactions older than the inserts to end, on
    // the whole server.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let stored = loop {
        let stored = ledger_store::read_after(&pool, LogCursor::default(), 1_000)
            .await
            .unwrap();
        if stored.len() == events().len() {
            break stored;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} events readable",
            stored.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // What a source might hand over: A's withdrawal (sequence 3) never arrives (a gap the
    // guard repairs from the store), and the first five events come a second time.
    let mut delivered: Vec<_> = stored
        .iter()
        .filter(|e| !(e.event.aggregate_id == A && e.event.sequence == 3))
        .map(|e| {
            (
                &e.event,
                Origin::Store {
                    cursor: LogCursor::default(),
                },
            )
        })
        .collect();
    let again: Vec<_> = delivered[..5].to_vec();
    delivered.extend(again);

    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut batched = Applied::default();
    let mut tx = conn.begin().await.unwrap();
    apply_events(&mut tx, &keys(&pool), &names::ALL, &delivered, &mut batched)
        .await
        .unwrap();
    let in_one_batch = snapshot(&mut tx).await;
    tx.rollback().await.unwrap();

    let mut one_by_one = Applied::default();
    let mut tx = conn.begin().await.unwrap();
    for event in &delivered {
        apply_events(
            &mut tx,
            &keys(&pool),
            &names::ALL,
            &[*event],
            &mut one_by_one,
        )
        .await
        .unwrap();
    }
    let one_at_a_time = snapshot(&mut tx).await;
    tx.rollback().await.unwrap();

    assert_eq!(in_one_batch, one_at_a_time);
    assert_eq!(batched, one_by_one);
    // And those rows are the right ones.
    let summaries = in_one_batch["summaries"].as_array().unwrap();
    let a = summaries.iter().find(|s| s["account_id"] == A).unwrap();
    assert_eq!(
        (a["balance"].as_i64(), a["version"].as_i64()),
        (Some(7), Some(7))
    );
    let statement_of_a: Vec<i64> = in_one_batch["statements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["account_id"] == A)
        .map(|s| s["balance_after"].as_i64().unwrap())
        .collect();
    assert_eq!(statement_of_a, vec![0, 10, 7, 2, 9, 7]);
    assert_eq!(in_one_batch["totals"][0]["balance"], 12);
    assert_eq!(in_one_batch["transfers"][0]["state"], "completed");
    assert_eq!(
        batched.repaired, 4,
        "the missing withdrawal, once per projection of account events (subjects included)"
    );
    assert!(batched.duplicates > 0);
    // never-opened: 3 projections; c opened twice: summary and subject_totals; x: 4 (the
    // subjects projection reads account events too).
    assert_eq!(in_one_batch["letters"].as_array().unwrap().len(), 9);
}

/// Promise 5 across partitions: two accounts of one owner live on different Kafka
/// partitions, so their events may be applied in either order. Both orders give the same
/// rows (owner totals included, whose `updated_at` is the latest event's time, not the last
/// applied one's), and so does a rebuild, which applies in log order.
#[tokio::test]
async fn the_order_in_which_partitions_are_applied_changes_no_row() {
    let (url, pool) = fresh_database().await;
    let eur = "EUR";
    let written = [
        (
            A,
            1,
            json!({"type": "AccountOpened", "owner": "o1", "currency": eur}),
        ),
        (
            B,
            1,
            json!({"type": "AccountOpened", "owner": "o1", "currency": eur}),
        ),
        (
            A,
            2,
            json!({"type": "MoneyDeposited", "amount": 10, "currency": eur, "reference": null}),
        ),
        (
            B,
            2,
            json!({"type": "MoneyDeposited", "amount": 20, "currency": eur, "reference": null}),
        ),
    ];
    // One transaction each: every event has its own `recorded_at`.
    for (id, sequence, payload) in &written {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', $1, $2, $3, $4, $5, '{}')",
        )
        .bind(id)
        .bind(sequence)
        .bind(payload["type"].as_str().unwrap())
        .bind(version(payload))
        .bind(payload)
        .execute(&pool)
        .await
        .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let stored = loop {
        let stored = ledger_store::read_after(&pool, LogCursor::default(), 1_000)
            .await
            .unwrap();
        if stored.len() == written.len() {
            break stored;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} events readable",
            stored.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let of = |id: &str| -> Vec<_> {
        stored
            .iter()
            .filter(|e| e.event.aggregate_id == id)
            .map(|e| {
                (
                    &e.event,
                    Origin::Store {
                        cursor: LogCursor::default(),
                    },
                )
            })
            .collect()
    };
    let in_log_order: Vec<_> = stored
        .iter()
        .map(|e| {
            (
                &e.event,
                Origin::Store {
                    cursor: LogCursor::default(),
                },
            )
        })
        .collect();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut snapshots = Vec::new();
    for batches in [
        vec![in_log_order.clone()],
        vec![of(A), of(B)],
        vec![of(B), of(A)],
    ] {
        let mut tx = conn.begin().await.unwrap();
        let mut applied = Applied::default();
        for batch in &batches {
            apply_events(&mut tx, &keys(&pool), &names::ALL, batch, &mut applied)
                .await
                .unwrap();
        }
        snapshots.push(snapshot(&mut tx).await);
        tx.rollback().await.unwrap();
    }
    assert_eq!(snapshots[0]["totals"][0]["balance"], 30);
    assert_eq!(
        snapshots[1], snapshots[0],
        "A's partition first differs from the log order"
    );
    assert_eq!(
        snapshots[2], snapshots[0],
        "B's partition first differs from the log order"
    );
}
