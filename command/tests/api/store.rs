//! The event store: extra columns, upcasting, snapshots, the snapshot race, the key trigger.

use cqrs_es::persist::{PersistedEventRepository, PersistenceError, SerializedEvent};
use ledger_command::domain::{Account, AccountCommand};
use ledger_command::ledger::{Intent, Ledger, RetryPolicy};
use ledger_command::store::LedgerRepository;
use ledger_events::{Amount, Metadata};
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
        "SELECT event_id, global_position, transaction_id::text FROM events ORDER BY global_position",
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
    let answer = app.withdraw(id, 50, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["balance"], 0);
    assert_eq!(answer.body["owner"], "old");
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
        })
        .await
        .expect("the snapshot's balance was not used");
    // 1000 (snapshot at 10) + 3 (event 11) + 3 (event 12) - 33 (event 13) - 1
    assert_eq!(outcome.state.balance, 972);
    assert_eq!(outcome.version, 14);
}

fn event(id: &str, sequence: usize, command_id: Option<&str>) -> SerializedEvent {
    let metadata = match command_id {
        Some(command_id) => json!({"command_id": command_id}),
        None => json!({}),
    };
    SerializedEvent::new(
        id.to_owned(),
        sequence,
        "account".into(),
        "MoneyDeposited".into(),
        "2".into(),
        json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null}),
        metadata,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_snapshot_after_a_durable_commit_is_not_reported_as_a_conflict() {
    // postgres-es commits the events, then finds the snapshot row moved on and reports a
    // conflict. The events are durable, so the caller must be told so (or it would retry
    // and apply the command twice).
    let (_, pool) = fresh_database().await;
    let repo = LedgerRepository::new(pool.clone());
    let id = Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
         VALUES ('account', $1, 0, 2, '{}')",
    )
    .bind(&id)
    .execute(&pool)
    .await
    .unwrap();
    // This writer believes the snapshot is at 1 and wants to move it to 2.
    let result = repo
        .persist::<Account>(
            &[event(&id, 1, Some("attempt-1"))],
            Some((id.clone(), json!({}), 2)),
        )
        .await;
    assert!(result.is_ok(), "{result:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);

    // A real conflict (the sequence is taken by another attempt) is still a conflict.
    let result = repo
        .persist::<Account>(
            &[event(&id, 1, Some("attempt-2"))],
            Some((id.clone(), json!({}), 3)),
        )
        .await;
    assert!(
        matches!(result, Err(PersistenceError::OptimisticLockError)),
        "{result:?}"
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
