//! The log reader against a real PostgreSQL: commit-safe order, no skipping, lag, wake-ups.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ledger_platform::testing::fresh_database;
use ledger_store::{lag, read_after, LogCursor, LogNotifications};
use sqlx::{Connection, PgConnection, PgPool};

/// Appends a deposit of `amount` to aggregate `id` at `sequence` on `conn`; returns its
/// global position.
async fn append(conn: &mut PgConnection, id: &str, sequence: i64, amount: i64) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, $2, 'MoneyDeposited', '2',
                 json_build_object('type','MoneyDeposited','amount',$3::bigint,'currency','EUR','reference',null),
                 '{\"request_id\":\"r\"}')
         RETURNING global_position",
    )
    .bind(id)
    .bind(sequence)
    .bind(amount)
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn positions(pool: &PgPool, after: LogCursor) -> (Vec<i64>, LogCursor) {
    let entries = read_after(pool, after, 100).await.unwrap();
    let cursor = entries.last().map_or(after, |e| e.cursor);
    (
        entries.iter().map(|e| e.event.global_position).collect(),
        cursor,
    )
}

/// Reads until `count` events have come, within a deadline. The watermark is cluster-wide:
/// a write transaction left open by a test on another database delays (never hides) events
/// here, so reads that expect events wait for them.
async fn read_count(pool: &PgPool, after: LogCursor, count: usize) -> (Vec<i64>, LogCursor) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut read, mut cursor) = (Vec::new(), after);
    while read.len() < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {read:?} of {count} events came"
        );
        let (more, next) = positions(pool, cursor).await;
        if more.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        read.extend(more);
        cursor = next;
    }
    (read, cursor)
}

#[tokio::test]
async fn the_reader_stops_at_an_open_transaction_and_then_reads_everything_in_commit_order() {
    let (url, pool) = fresh_database().await;
    let mut auto = PgConnection::connect(&url).await.unwrap();
    let first = append(&mut auto, "a", 1, 1).await;

    // T1 takes the next position and stays open.
    let mut slow = PgConnection::connect(&url).await.unwrap();
    let mut t1 = slow.begin().await.unwrap();
    let gap = append(&mut t1, "b", 1, 2).await;
    // T2 and T3 take later positions and commit.
    let later_1 = append(&mut auto, "c", 1, 3).await;
    let later_2 = append(&mut auto, "a", 2, 4).await;
    assert!(first < gap && gap < later_1 && later_1 < later_2);

    // A reader by position alone would now return later_1 and later_2 and skip `gap` for
    // good. The log reader returns nothing past the open transaction.
    let (read, cursor) = read_count(&pool, LogCursor::default(), 1).await;
    assert_eq!(read, vec![first]);
    let (read, _) = positions(&pool, cursor).await;
    assert!(read.is_empty(), "read past an open transaction: {read:?}");

    t1.commit().await.unwrap();
    let (read, cursor) = read_count(&pool, cursor, 3).await;
    assert_eq!(read, vec![gap, later_1, later_2]);
    let (read, _) = positions(&pool, cursor).await;
    assert!(read.is_empty());
}

#[tokio::test]
async fn an_aborted_transaction_leaves_no_hole_and_blocks_nothing_after_it_ends() {
    let (url, pool) = fresh_database().await;
    let mut auto = PgConnection::connect(&url).await.unwrap();
    let mut slow = PgConnection::connect(&url).await.unwrap();
    let mut t1 = slow.begin().await.unwrap();
    append(&mut t1, "b", 1, 2).await;
    let after = append(&mut auto, "c", 1, 3).await;
    assert!(positions(&pool, LogCursor::default()).await.0.is_empty());
    t1.rollback().await.unwrap();
    assert_eq!(
        read_count(&pool, LogCursor::default(), 1).await.0,
        vec![after]
    );
}

#[tokio::test]
async fn one_aggregates_events_come_in_sequence_order_with_their_envelope() {
    let (url, pool) = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    for sequence in 1..=5 {
        append(&mut conn, "acc", sequence, sequence * 10).await;
    }
    read_count(&pool, LogCursor::default(), 5).await;
    let entries = read_after(&pool, LogCursor::default(), 3).await.unwrap();
    assert_eq!(entries.len(), 3, "the limit is honoured");
    let rest = read_after(&pool, entries[2].cursor, 100).await.unwrap();
    let all: Vec<_> = entries.iter().chain(rest.iter()).collect();
    assert_eq!(
        all.iter().map(|e| e.event.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let event = &all[1].event;
    assert_eq!(event.aggregate_id, "acc");
    assert_eq!(event.payload["amount"], 20);
    assert_eq!(event.metadata.request_id.as_deref(), Some("r"));
    assert!(event.decode_account().is_ok());
}

#[tokio::test]
async fn lag_counts_the_events_after_a_cursor() {
    let (url, pool) = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    for sequence in 1..=4 {
        append(&mut conn, "acc", sequence, 1).await;
    }
    read_count(&pool, LogCursor::default(), 4).await;
    let entries = read_after(&pool, LogCursor::default(), 1).await.unwrap();
    let behind = lag(&pool, entries[0].cursor).await.unwrap();
    assert_eq!(behind.events, 3);
    assert!(behind.oldest.is_some());
    let end = read_after(&pool, LogCursor::default(), 100).await.unwrap();
    assert_eq!(lag(&pool, end[3].cursor).await.unwrap().events, 0);
}

#[tokio::test]
async fn a_commit_wakes_a_waiting_reader() {
    let (url, pool) = fresh_database().await;
    let mut notifications = LogNotifications::new(&pool).await;
    let waiter = tokio::spawn(async move {
        let started = std::time::Instant::now();
        notifications.wait(Duration::from_secs(120)).await;
        started.elapsed()
    });
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // The listener may not be registered the instant the task starts; keep appending
    // until it wakes (each append notifies).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut sequence = 1;
    while !waiter.is_finished() {
        assert!(std::time::Instant::now() < deadline, "no wake-up");
        append(&mut conn, "acc", sequence, 1).await;
        sequence += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(waiter.await.unwrap() < Duration::from_secs(120));
}

/// ADR 0017: a transaction that writes only elsewhere (like the projector's batches) and
/// stays open does not hold the log back. With the old cluster-wide watermark
/// (`pg_snapshot_xmin`) the reader returned nothing until it ended.
#[tokio::test]
async fn a_transaction_that_writes_elsewhere_does_not_hold_the_log_back() {
    let (url, pool) = fresh_database().await;
    let mut other = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE elsewhere (n int)")
        .execute(&mut other)
        .await
        .unwrap();
    let mut open = other.begin().await.unwrap();
    sqlx::query("INSERT INTO elsewhere VALUES (1)")
        .execute(&mut *open)
        .await
        .unwrap();

    let mut auto = PgConnection::connect(&url).await.unwrap();
    let first = append(&mut auto, "a", 1, 1).await;
    let second = append(&mut auto, "b", 1, 2).await;
    // No waiting: the very first read returns both (a read held back by the open
    // transaction would return nothing).
    let (read, _) = positions(&pool, LogCursor::default()).await;
    assert_eq!(read, vec![first, second]);
    open.rollback().await.unwrap();
}

/// The invariant the watermark rests on (ADR 0017): a transaction that wrote elsewhere
/// first cannot append, because its id would be older than its lock on `events` and a
/// reader could pass its events. Nothing is written; appending first and writing elsewhere
/// afterwards stays allowed.
#[tokio::test]
async fn an_append_after_another_write_in_the_same_transaction_is_refused() {
    let (url, pool) = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE elsewhere (n int)")
        .execute(&mut conn)
        .await
        .unwrap();

    let mut tx = conn.begin().await.unwrap();
    sqlx::query("INSERT INTO elsewhere VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let refused = sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', 'late', 1, 'MoneyDeposited', '2', '{}', '{}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap_err();
    let code = refused
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("55000"), "{refused}");
    tx.rollback().await.unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 0);

    // Appending first, then writing elsewhere, then appending again: allowed.
    let mut tx = conn.begin().await.unwrap();
    append(&mut tx, "first", 1, 1).await;
    sqlx::query("INSERT INTO elsewhere VALUES (2)")
        .execute(&mut *tx)
        .await
        .unwrap();
    append(&mut tx, "first", 2, 1).await;
    tx.commit().await.unwrap();
    assert_eq!(read_count(&pool, LogCursor::default(), 2).await.0.len(), 2);
}

/// A transaction that appended and stays open still holds the log back after it also
/// writes elsewhere, and a later writer's committed events wait behind it.
#[tokio::test]
async fn an_open_events_writer_holds_back_later_commits_even_after_writing_elsewhere() {
    let (url, pool) = fresh_database().await;
    let mut slow = PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE elsewhere (n int)")
        .execute(&mut slow)
        .await
        .unwrap();
    let mut t1 = slow.begin().await.unwrap();
    let gap = append(&mut t1, "a", 1, 1).await;
    sqlx::query("INSERT INTO elsewhere VALUES (1)")
        .execute(&mut *t1)
        .await
        .unwrap();
    let mut auto = PgConnection::connect(&url).await.unwrap();
    let later = append(&mut auto, "b", 1, 2).await;
    assert!(positions(&pool, LogCursor::default()).await.0.is_empty());
    t1.commit().await.unwrap();
    assert_eq!(
        read_count(&pool, LogCursor::default(), 2).await.0,
        vec![gap, later]
    );
}
