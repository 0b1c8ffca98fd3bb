//! Promise 1: durable before acknowledged.

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;

use crate::helpers::{eventually, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_command_is_already_committed() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    // A separate connection, opened before the commands: it can only see committed rows.
    let mut observer = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    for amount in 1..=20 {
        let answer = app.deposit(id, amount, None).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let position = answer.body["position"].as_i64().unwrap();
        let version = answer.body["version"].as_i64().unwrap();
        let stored: Option<(String, i64, serde_json::Value)> = sqlx::query_as(
            "SELECT aggregate_id, sequence, payload::jsonb FROM events WHERE global_position = $1",
        )
        .bind(position)
        .fetch_optional(&mut observer)
        .await
        .unwrap();
        let (aggregate_id, sequence, payload) =
            stored.unwrap_or_else(|| panic!("acknowledged position {position} is not committed"));
        assert_eq!(aggregate_id, id.to_string());
        assert_eq!(sequence, version);
        assert_eq!(payload["amount"], json!(amount));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_is_never_acknowledged_and_leaves_nothing() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    // The database refuses the next write (as a full disk or a lost primary would).
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'disk full (simulated)'; END $$",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let before = app.event_count().await;
    let answer = app.deposit(id, 100, Some("deposit-1")).await;
    assert!(
        !(200..300).contains(&answer.status),
        "acknowledged a failed commit: {}",
        answer.text
    );
    assert_eq!(answer.status, 500);
    assert_eq!(answer.content_type(), "application/problem+json");
    assert!(
        !answer.text.contains("disk full"),
        "internal detail leaked: {}",
        answer.text
    );
    assert_eq!(app.event_count().await, before);

    // Once the database accepts writes again, the same request succeeds exactly once.
    sqlx::query("DROP TRIGGER refuse ON events")
        .execute(&app.pool)
        .await
        .unwrap();
    let retried = app.deposit(id, 100, Some("deposit-1")).await;
    assert_eq!(retried.status, 200, "{}", retried.text);
    assert_eq!(retried.body["balance"], 100);
    assert_eq!(app.event_count().await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_waits_for_the_commit() {
    // Another transaction holds the account's next sequence uncommitted: the service's
    // insert must wait for it, and the client must not be answered meanwhile.
    let app = spawn_app().await;
    let id = app.new_account().await;
    let mut blocker = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = blocker.begin().await.unwrap();
    hold_next_sequence(&mut tx, id, 2).await;
    let request = app.spawn_deposit(id, 5);
    wait_for_lock_waiter(&app.pool).await;
    assert!(
        !request.is_finished(),
        "answered before its commit could happen"
    );
    tx.rollback().await.unwrap();
    assert_eq!(request.await.unwrap().status, 200);
    assert_eq!(app.balance_from_events(id).await, 5);
}

/// Inserts (uncommitted, in `tx`) a deposit of 1 at `sequence` of `account`.
pub async fn hold_next_sequence(tx: &mut sqlx::PgConnection, account: uuid::Uuid, sequence: i64) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, $2, 'MoneyDeposited', '2',
                 '{\"type\":\"MoneyDeposited\",\"amount\":1,\"currency\":\"EUR\",\"reference\":null}', '{}')",
    )
    .bind(account.to_string())
    .bind(sequence)
    .execute(tx)
    .await
    .unwrap();
}

/// Waits until some session of this database waits on a lock.
pub async fn wait_for_lock_waiter(pool: &sqlx::PgPool) {
    eventually(
        Duration::from_secs(10),
        "a session to wait on a lock",
        || {
            let pool = pool.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND datname = current_database()",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                waiting > 0
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_connection_is_lost_afterwards_is_answered_with_its_real_outcome() {
    // The batch statement commits, then its connection is reported lost (fault injection):
    // the writer reads the store, finds the events and answers the success they are.
    let app = spawn_app_with(&["--command-fault-lost-commits", "1"]).await;
    let opened = app.open_account("alice", "EUR").await;
    assert_eq!(opened.status, 201, "{}", opened.text);
    let id = opened.account_id();
    let events = app.events_of(id).await;
    assert_eq!(events.len(), 1);
    let position: i64 =
        sqlx::query_scalar("SELECT global_position FROM events WHERE aggregate_id = $1")
            .bind(id.to_string())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(opened.body["position"], position);
    assert_eq!(opened.body["version"], 1);
    // The writer builds on it.
    let deposit = app.deposit(id, 5, None).await;
    assert_eq!(deposit.body["version"], 2, "{}", deposit.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_outcome_cannot_be_learned_is_answered_outcome_unknown_and_the_key_tells_it()
{
    // The connection is lost after the commit and the store cannot be read at once either.
    let app = spawn_app_with(&[
        "--command-fault-lost-commits",
        "1",
        "--command-fault-failed-checks",
        "1",
    ])
    .await;
    let body = json!({"owner": "bob", "currency": "EUR"});
    let unknown = app.post("/v1/accounts", &body, Some("k-lost")).await;
    unknown.assert_problem(503, "outcome_unknown");
    assert_eq!(unknown.headers["retry-after"], "1");
    assert!(
        !unknown.text.contains("nothing was written"),
        "{}",
        unknown.text
    );
    assert_eq!(
        app.account_event_count().await,
        1,
        "the account was in fact opened"
    );

    // The retry with the key learns the real outcome and opens nothing more.
    let retried = app.post("/v1/accounts", &body, Some("k-lost")).await;
    assert_eq!(retried.status, 201, "{}", retried.text);
    assert_eq!(retried.headers["idempotent-replayed"], "true");
    let id = retried.account_id();
    assert_eq!(app.events_of(id).await.len(), 1);
    assert_eq!(app.account_event_count().await, 1);
    // The writer decides the next command on what the store holds: the account exists.
    let deposit = app.deposit(id, 5, None).await;
    assert_eq!(deposit.status, 200, "{}", deposit.text);
    assert_eq!(deposit.body["version"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_connection_is_killed_before_it_commits_is_answered_nothing_written() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, id, 2).await;
    let request = app.spawn_deposit(id, 5);
    wait_for_lock_waiter(&app.pool).await;
    // Kill the writer's connection while its statement waits (before any commit).
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event_type = 'Lock'
            AND query LIKE 'WITH appended%'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    let answer = request.await.unwrap();
    answer.assert_problem(503, "service_unavailable");
    tx.rollback().await.unwrap();
    assert_eq!(app.events_of(id).await.len(), 1, "nothing was written");
    assert_eq!(app.deposit(id, 5, None).await.status, 200);
    assert_eq!(app.balance_from_events(id).await, 5);
}
