//! The event store: extra columns, upcasting, snapshots, a batch against a newer snapshot, the key trigger.

use ledger_command::domain::{Account, AccountCommand, AccountStatus};
use ledger_command::ledger::{Intent, Ledger, RetryPolicy};
use ledger_events::{Amount, Metadata};
use ledger_store::aggregates::{self, Batch, NewEvent};
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use crate::helpers::{fresh_database, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_gets_an_id_a_global_position_and_its_transaction_id() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    app.deposit(id, 1, None).await;
    let rows: Vec<(Uuid, i64, String)> = sqlx::query_as(
        "SELECT event_id, global_position, transaction_id::text FROM events
          WHERE aggregate_type = 'account' ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_ne!(rows[0].0, rows[1].0);
    assert!(rows[0].1 < rows[1].1);
    assert_ne!(rows[0].2, rows[1].2, "two commands, two transactions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_written_by_version_1_of_the_contract_is_loaded_by_todays_code() {
    let app = spawn_app().await;
    let id = Uuid::new_v4();
    // Exactly what v1 wrote: MoneyDeposited without `reference`.
    for (sequence, event_type, payload) in [
        (
            1,
            "AccountOpened",
            json!({"type": "AccountOpened", "owner": "old", "currency": "EUR"}),
        ),
        (
            2,
            "MoneyDeposited",
            json!({"type": "MoneyDeposited", "amount": 70, "currency": "EUR"}),
        ),
        (
            3,
            "MoneyWithdrawn",
            json!({"type": "MoneyWithdrawn", "amount": 20, "currency": "EUR"}),
        ),
    ] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', $1, $2, $3, '1', $4::json, '{}')",
        )
        .bind(id.to_string())
        .bind(sequence)
        .bind(event_type)
        .bind(payload.to_string())
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let ledger: Ledger<Account> = Ledger::new(app.pool.clone(), 100, RetryPolicy::default());
    let (state, version) = ledger.load(id).await.unwrap();
    assert_eq!(
        (state.balance, state.status, version),
        (50, AccountStatus::Open, 3)
    );
    let answer = app.withdraw(id, 50, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["balance"], 0);
    // A v1 account's holder is the legacy subject of its owner name.
    assert_eq!(
        answer.body["subject_id"],
        json!(ledger_events::subject::legacy_subject_id("old"))
    );
    assert_eq!(answer.body["version"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_taken_every_n_events_and_loading_from_them_gives_the_same_state() {
    let app = spawn_app_with(&["--snapshot-every", "5"]).await;
    let id = app.new_account().await;
    for _ in 0..11 {
        assert_eq!(app.deposit(id, 3, None).await.status, 200);
    }
    let (last_sequence, payload): (i64, serde_json::Value) = sqlx::query_as(
        "SELECT last_sequence, payload::jsonb FROM snapshots WHERE aggregate_id = $1",
    )
    .bind(id.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(last_sequence, 10);
    assert_eq!(payload["balance"], 27);
    // Loading (snapshot at 10 + events 11 and 12) gives the full state.
    let answer = app.withdraw(id, 33, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["balance"], 0);

    // The snapshot is read when an account is not in memory (a new process, an evicted
    // entry): corrupt its balance, and a fresh ledger's answer shows it was used.
    sqlx::query("UPDATE snapshots SET payload = json_build_object('status','open','owner','alice','currency','EUR','balance', 1000)")
        .execute(&app.pool)
        .await
        .unwrap();
    let cold: Ledger = Ledger::new(app.pool.clone(), 5, RetryPolicy::default());
    let outcome = cold
        .execute(Intent {
            aggregate_id: id,
            command: AccountCommand::Withdraw {
                amount: Amount::new(1).unwrap(),
                currency: "EUR".parse().unwrap(),
                reference: None,
            },
            metadata: Metadata::default(),
            event_id: None,
        })
        .await
        .expect("the snapshot's balance was not used");
    // 1000 (snapshot at 10) + 3 (event 11) + 3 (event 12) - 33 (event 13) - 1
    assert_eq!(outcome.state.balance, 972);
    assert_eq!(outcome.version, 14);
}

fn deposit_of(id: &str, sequence: i64, command_id: &str) -> NewEvent {
    NewEvent {
        event_id: NewEvent::fresh_id(),
        aggregate_id: id.to_owned(),
        sequence,
        event_type: "MoneyDeposited".into(),
        event_version: "2".into(),
        payload:
            json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null})
                .to_string(),
        metadata: json!({"command_id": command_id}).to_string(),
        command_id: command_id.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_row_ahead_of_the_batch_never_fails_its_events_and_a_taken_sequence_does() {
    // The snapshot is a cache and the events the truth: a batch whose snapshot is older
    // than the stored one commits its events and leaves the newer snapshot alone.
    let (_, pool) = fresh_database().await;
    let id = Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
         VALUES ('account', $1, 5, 2, '{}')",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    let mut batch = Batch::default();
    batch.push_event(deposit_of(&id, 1, "attempt-1"));
    batch.push_snapshot(&id, 1, "{\"stale\": true}".into());
    let positions = aggregates::append(&pool, "account", &batch).await.unwrap();
    assert_eq!(positions.len(), 1);
    let (last_sequence, payload): (i64, String) = sqlx::query_as(
        "SELECT last_sequence, payload::text FROM snapshots WHERE aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((last_sequence, payload.as_str()), (5, "{}"));
    assert_eq!(
        aggregates::find_appended(&pool, "account", &batch)
            .await
            .unwrap(),
        positions,
        "a committed batch is found by its command attempts"
    );

    // Another attempt at the same sequence conflicts, writes nothing, and is not mistaken
    // for committed when its outcome is checked.
    let mut rival = Batch::default();
    rival.push_event(deposit_of(&id, 1, "attempt-2"));
    let err = aggregates::append(&pool, "account", &rival)
        .await
        .unwrap_err();
    assert!(
        err.as_database_error()
            .is_some_and(|db| db.is_unique_violation()),
        "{err}"
    );
    assert!(aggregates::find_appended(&pool, "account", &rival)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        aggregates::versions(&pool, "account", std::slice::from_ref(&id))
            .await
            .unwrap()[&id],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_claimed_by_one_transaction_only() {
    let (url, pool) = fresh_database().await;
    let insert = |aggregate: &'static str, sequence: i64| {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', $1, $2, 'AccountClosed', '1', '{\"type\":\"AccountClosed\"}',
                     '{\"idempotency_key\":\"shared\",\"request_hash\":\"h\"}')",
        )
        .bind(aggregate)
        .bind(sequence)
    };
    // One transaction may append several events under its key.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    insert("a", 1).execute(&mut *tx).await.unwrap();
    insert("a", 2).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let (sequence, position): (i64, i64) = sqlx::query_as(
        "SELECT last_sequence, last_position FROM idempotency_keys WHERE idempotency_key = 'shared'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sequence, 2);
    let last: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(position, last);
    // Another transaction may not, on any aggregate.
    let err = insert("b", 1).execute(&pool).await.unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23505")
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_may_not_claim_a_key_for_two_aggregates_nor_a_step_twice() {
    // The claims run once per statement over its rows: a batch is judged as a whole, and
    // a duplicate inside it fails the statement exactly as a duplicate across statements.
    let (_, pool) = fresh_database().await;
    let insert_two = |metadata_a: &str, metadata_b: &str, aggregate_b: &str| {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', 'a', 1, 'AccountClosed', '1', '{\"type\":\"AccountClosed\"}', $1::json),
                    ('account', $3, 2, 'AccountClosed', '1', '{\"type\":\"AccountClosed\"}', $2::json)",
        )
        .bind(metadata_a.to_owned())
        .bind(metadata_b.to_owned())
        .bind(aggregate_b.to_owned())
    };
    let key = r#"{"idempotency_key":"k","idempotency_scope":"key:1","request_hash":"h"}"#;
    let step = r#"{"transfer_step":"t:debit"}"#;
    for (a, b, aggregate_b, what) in [
        (key, key, "b", "one key for two aggregates"),
        (step, step, "a", "one step twice"),
    ] {
        let err = insert_two(a, b, aggregate_b)
            .execute(&pool)
            .await
            .expect_err(what);
        assert_eq!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("23505"),
            "{what}: {err}"
        );
    }
    let written: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM idempotency_keys),
                (SELECT count(*) FROM transfer_steps)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(written, (0, 0, 0), "a refused statement writes nothing");

    // Two events of one aggregate under one key, and two different steps, are fine; the
    // key records the last of them.
    insert_two(key, key, "a").execute(&pool).await.unwrap();
    let claimed: (i64, String) = sqlx::query_as(
        "SELECT last_sequence, client_scope FROM idempotency_keys WHERE idempotency_key = 'k'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(claimed, (2, "key:1".to_owned()));
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('transfer', 't', 1, 'TransferDebited', '1', '{}', '{\"transfer_step\":\"t:1\"}'),
                ('transfer', 't', 2, 'TransferCompleted', '1', '{}', '{\"transfer_step\":\"t:2\"}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_steps")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(steps, 2);
}
