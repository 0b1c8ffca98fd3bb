//! The guard against a real PostgreSQL: two transactions handling one event at once (as two
//! projector instances may during a rebalance) apply it once.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ledger_platform::testing::fresh_database;
use ledger_readmodels::guards::{advance, check, Verdict};
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn the_second_of_two_concurrent_handlers_of_one_event_sees_a_duplicate() {
    let (url, pool) = fresh_database().await;
    let mut first_conn = PgConnection::connect(&url).await.unwrap();
    let mut first = first_conn.begin().await.unwrap();
    assert_eq!(
        check(&mut first, "p", "acc", 1).await.unwrap(),
        Verdict::Apply
    );

    let second = tokio::spawn(async move {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let verdict = check(&mut tx, "p", "acc", 1).await.unwrap();
        tx.commit().await.unwrap();
        verdict
    });
    // The second handler waits on the first's guard row.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the second handler never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    advance(&mut first, "p", "acc", 1, 10).await.unwrap();
    first.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), Verdict::Duplicate);
}

#[tokio::test]
async fn verdicts_follow_the_last_handled_sequence() {
    let (_, pool) = fresh_database().await;
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(check(&mut conn, "p", "a", 1).await.unwrap(), Verdict::Apply);
    assert_eq!(
        check(&mut conn, "p", "a", 3).await.unwrap(),
        Verdict::Gap { from: 1 }
    );
    advance(&mut conn, "p", "a", 2, 5).await.unwrap();
    assert_eq!(
        check(&mut conn, "p", "a", 2).await.unwrap(),
        Verdict::Duplicate
    );
    assert_eq!(check(&mut conn, "p", "a", 3).await.unwrap(), Verdict::Apply);
    // Guards are per projection.
    assert_eq!(check(&mut conn, "q", "a", 1).await.unwrap(), Verdict::Apply);
}
