//! Promise 2: one writer wins.

use futures::future::join_all;
use sqlx::Connection;

use crate::durability::{hold_next_sequence, wait_for_lock_waiter};
use crate::helpers::{spawn_app, spawn_app_on, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_withdrawals_of_10_from_100_give_exactly_10_successes() {
    // Two replicas over one database, so conflicts are settled by the store, not by chance
    // scheduling inside one process.
    let first = spawn_app().await;
    let second = spawn_app_on(&first.database_url, first.pool.clone(), &[]).await;
    let id = first.new_account().await;
    assert_eq!(first.deposit(id, 100, None).await.status, 200);

    let withdrawals = (0..50).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        app.withdraw(id, 10, None)
    });
    let answers = join_all(withdrawals).await;

    let successes = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(
        successes,
        10,
        "statuses: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for refused in answers.iter().filter(|a| a.status != 200) {
        refused.assert_problem(422, "insufficient_funds");
    }
    let mut balances: Vec<i64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.body["balance"].as_i64().unwrap())
        .collect();
    balances.sort_unstable();
    assert_eq!(
        balances,
        (0..10).map(|n| n * 10).collect::<Vec<_>>(),
        "each success saw a distinct version"
    );
    // balance_from_events also asserts the balance never went negative at any sequence.
    assert_eq!(first.balance_from_events(id).await, 0);
    assert_eq!(first.events_of(id).await.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_loses_the_race_with_no_retries_left_is_answered_409_and_writes_nothing() {
    let app = spawn_app_with(&["--command-max-retries", "0"]).await;
    let id = app.new_account().await;
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, id, 2).await;
    let request = app.spawn_deposit(id, 500);
    wait_for_lock_waiter(&app.pool).await;
    tx.commit().await.unwrap(); // the rival wins version 2
    request
        .await
        .unwrap()
        .assert_problem(409, "concurrency_conflict");
    // Only the rival's deposit of 1 is there.
    assert_eq!(app.events_of(id).await.len(), 2);
    assert_eq!(app.balance_from_events(id).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_loses_the_race_is_retried_on_the_new_state() {
    let app = spawn_app_with(&["--command-max-retries", "3"]).await;
    let id = app.new_account().await;
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, id, 2).await;
    let request = app.spawn_deposit(id, 500);
    wait_for_lock_waiter(&app.pool).await;
    tx.commit().await.unwrap();
    let answer = request.await.unwrap();
    let (status, body) = (answer.status, answer.body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 3);
    assert_eq!(body["balance"], 501);
    assert_eq!(app.balance_from_events(id).await, 501);
}
