//! Personal data in the read models (issue 17, ADR 0019) against a real PostgreSQL: the
//! projector decrypts names and references into the read models, an erasure writes the
//! marker in their place (also when the projector decrypted with a key cached before the
//! erasure, and when the erasure races the reference's writer), money is untouched, a
//! rebuild after the erasure equals live, and a ciphertext that fails authentication is a
//! dead letter of the statement alone, with a reason that holds no personal data.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ledger_events::subject::fields;
use ledger_pii::{KeyStore, ERASED_MARKER};
use ledger_platform::testing::fresh_database;
use ledger_projector::apply::{apply_events, Applied, Applier, Incoming, Origin};
use ledger_projector::ops::rebuild;
use ledger_readmodels::names;
use ledger_store::LogCursor;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

const NAME: &str = "Zelda Quixote-Umbridge";
const REFERENCE: &str = "invoice 4711 for Zelda";

/// The data keys, under the test KEK.
fn keys(pool: &sqlx::PgPool) -> KeyStore {
    ledger_pii::testing::test_key_store(pool)
}

/// Appends one event with a chosen id and metadata (a row of `events`, column by column).
#[allow(clippy::too_many_arguments)]
async fn append(
    conn: &mut sqlx::PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
    version: &str,
    event_id: Uuid,
    payload: Value,
    metadata: Value,
) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(sequence)
    .bind(payload["type"].as_str().unwrap())
    .bind(version)
    .bind(&payload)
    .bind(&metadata)
    .bind(event_id)
    .execute(conn)
    .await
    .unwrap();
}

/// A subject with its key and registration, and `accounts` accounts opened for it.
async fn register(pool: &PgPool, keys: &KeyStore, accounts: &[Uuid]) -> Uuid {
    let subject = Uuid::now_v7();
    let key = keys.create(subject).await.unwrap();
    let event_id = Uuid::now_v7();
    let mut conn = pool.acquire().await.unwrap();
    append(
        &mut conn,
        "subject",
        &subject.to_string(),
        1,
        "1",
        event_id,
        json!({"type": "SubjectRegistered", "name": key.encrypt(event_id, fields::NAME, NAME)}),
        json!({}),
    )
    .await;
    for account in accounts {
        append(
            &mut conn,
            "account",
            &account.to_string(),
            1,
            "2",
            Uuid::now_v7(),
            json!({"type": "AccountOpened", "subject_id": subject, "currency": "EUR"}),
            json!({}),
        )
        .await;
    }
    subject
}

/// A v3 deposit with `reference` sealed under the subject's key (or `sealed` as given).
async fn deposit(
    pool: &PgPool,
    keys: &KeyStore,
    subject: Uuid,
    account: Uuid,
    sequence: i64,
    amount: i64,
    tamper: bool,
) -> Uuid {
    let event_id = Uuid::now_v7();
    let mut sealed =
        keys.current(subject)
            .await
            .unwrap()
            .encrypt(event_id, fields::REFERENCE, REFERENCE);
    if tamper {
        // Another event's ciphertext pasted in: it does not authenticate under this id.
        sealed = keys.current(subject).await.unwrap().encrypt(
            Uuid::now_v7(),
            fields::REFERENCE,
            REFERENCE,
        );
    }
    let mut conn = pool.acquire().await.unwrap();
    append(
        &mut conn,
        "account",
        &account.to_string(),
        sequence,
        "3",
        event_id,
        json!({"type": "MoneyDeposited", "amount": amount, "currency": "EUR", "reference": sealed}),
        json!({"data_subject": subject.to_string()}),
    )
    .await;
    event_id
}

/// Erases the subject as the command side does: its keys destroyed and `SubjectErased`
/// appended in one transaction.
async fn erase(pool: &PgPool, subject: Uuid, sequence: i64) {
    let mut tx = pool.begin().await.unwrap();
    // The append first: it must be the transaction's first write (ADR 0017).
    append(
        &mut tx,
        "subject",
        &subject.to_string(),
        sequence,
        "1",
        Uuid::now_v7(),
        json!({"type": "SubjectErased"}),
        json!({}),
    )
    .await;
    KeyStore::erase_in(&mut tx, subject).await.unwrap();
    tx.commit().await.unwrap();
}

/// Every event of the store, once all are readable in commit-safe order.
async fn log(pool: &PgPool, expected: usize) -> Vec<ledger_store::LogEntry> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entries = ledger_store::read_after(pool, LogCursor::default(), 10_000)
            .await
            .unwrap();
        if entries.len() >= expected {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "the events never became readable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Applies what the log holds after `cursor` as the live projector does in store mode,
/// with `keys`; returns the new cursor.
async fn project(pool: &PgPool, keys: &KeyStore, cursor: LogCursor, expected: usize) -> LogCursor {
    let entries = log(pool, expected).await;
    let incoming: Vec<Incoming> = entries
        .into_iter()
        .filter(|entry| entry.cursor > cursor)
        .map(|entry| Incoming::Event {
            origin: Origin::Store {
                cursor: entry.cursor,
            },
            event: Box::new(entry.event),
        })
        .collect();
    let last = incoming.last().map_or(cursor, |item| match item.origin() {
        Origin::Store { cursor } => cursor,
        Origin::Kafka { .. } => cursor,
    });
    Applier::new(pool.clone(), keys.clone(), None)
        .apply_batch(&incoming)
        .await
        .unwrap();
    last
}

/// Every read-model row, guard and pending dead letter, as JSON.
async fn models(pool: &PgPool) -> Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object(
            'summaries', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM account_summaries t),
            'statements', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id, sequence) FROM account_statements t),
            'totals', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id, currency) FROM subject_totals t),
            'total_accounts', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM subject_total_accounts t),
            'subjects', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id) FROM subjects t),
            'guards', (SELECT jsonb_agg(to_jsonb(t) ORDER BY projection, aggregate_id) FROM projection_guards t),
            'letters', (SELECT jsonb_agg(jsonb_build_object('p', projection, 'e', event_id, 'r', reason)
                                         ORDER BY projection, global_position)
                          FROM dead_letters WHERE status = 'pending'))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn references(pool: &PgPool, account: Uuid) -> Vec<Option<String>> {
    sqlx::query_scalar(
        "SELECT reference FROM account_statements
          WHERE account_id = $1 AND entry_type = 'deposit' ORDER BY sequence",
    )
    .bind(account.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn name(pool: &PgPool, subject: Uuid) -> String {
    sqlx::query_scalar("SELECT name FROM subjects WHERE subject_id = $1")
        .bind(subject)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn balance(pool: &PgPool, account: Uuid) -> i64 {
    sqlx::query_scalar("SELECT balance FROM account_summaries WHERE account_id = $1")
        .bind(account.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_references_are_decrypted_and_an_erasure_writes_the_marker_in_every_copy_keeping_the_money(
) {
    let (_url, pool) = fresh_database().await;
    let keys = keys(&pool);
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let subject = register(&pool, &keys, &[a, b]).await;
    deposit(&pool, &keys, subject, a, 2, 500, false).await;
    deposit(&pool, &keys, subject, b, 2, 70, false).await;
    let cursor = project(&pool, &keys, LogCursor::default(), 5).await;

    assert_eq!(name(&pool, subject).await, NAME);
    assert_eq!(references(&pool, a).await, vec![Some(REFERENCE.to_owned())]);
    let owner: Option<String> = ledger_readmodels::summaries::find(&pool, &a.to_string())
        .await
        .unwrap()
        .unwrap()
        .owner;
    assert_eq!(
        owner.as_deref(),
        Some(NAME),
        "the summary joins the subject"
    );

    // The erasure: notified accounts, the marker everywhere, the money as it was.
    let mut changes = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    changes
        .listen(ledger_readmodels::CHANGES_CHANNEL)
        .await
        .unwrap();
    erase(&pool, subject, 2).await;
    project(&pool, &keys, cursor, 6).await;
    assert_eq!(name(&pool, subject).await, ERASED_MARKER);
    assert_eq!(references(&pool, a).await, vec![Some(ERASED_MARKER.into())]);
    assert_eq!(references(&pool, b).await, vec![Some(ERASED_MARKER.into())]);
    assert_eq!(
        (balance(&pool, a).await, balance(&pool, b).await),
        (500, 70)
    );
    let totals = ledger_readmodels::subject_totals::for_subject(&pool, subject)
        .await
        .unwrap();
    assert_eq!(totals[0].balance, 570);
    let mut notified = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while notified.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let note = tokio::time::timeout(left, changes.recv())
            .await
            .expect("the erased subject's accounts are notified")
            .unwrap();
        if note.payload() == a.to_string() || note.payload() == b.to_string() {
            notified.insert(note.payload().to_owned());
        }
    }
    let live = models(&pool).await;
    let text = live.to_string();
    assert!(!text.contains("Zelda"), "plaintext left behind: {text}");
    assert!(
        live["letters"].is_null(),
        "an erased key is never a dead letter: {live}"
    );

    // A rebuild after the erasure (by another process: `ledger-admin`, with no key cached)
    // decrypts nothing and gives the same rows (promise 5).
    let reports = rebuild::rebuild_many(&pool, &self::keys(&pool), &["all"], 2, |_, _| {})
        .await
        .unwrap();
    assert!(reports.iter().all(|r| r.swapped));
    assert_eq!(models(&pool).await, live, "rebuild after erasure differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_decrypted_with_a_key_cached_before_the_erasure_is_written_as_the_marker() {
    let (_url, pool) = fresh_database().await;
    let keys = keys(&pool);
    let account = Uuid::now_v7();
    let subject = register(&pool, &keys, &[account]).await;
    let cursor = project(&pool, &keys, LogCursor::default(), 2).await;
    deposit(&pool, &keys, subject, account, 2, 40, false).await;
    // This process still holds the key in its cache (no notification reached it), and the
    // erasure is projected (by another partition's worker) before the deposit is.
    keys.current(subject).await.unwrap();
    erase(&pool, subject, 2).await;
    let entries = log(&pool, 4).await;
    let erasure: Vec<_> = entries
        .iter()
        .filter(|e| e.cursor > cursor && e.event.aggregate_type == "subject")
        .map(|e| (&e.event, Origin::Store { cursor: e.cursor }))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    apply_events(
        &mut tx,
        &keys,
        &names::ALL,
        &erasure,
        &mut Applied::default(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let deposit: Vec<_> = entries
        .iter()
        .filter(|e| e.cursor > cursor && e.event.aggregate_type == "account")
        .map(|e| (&e.event, Origin::Store { cursor: e.cursor }))
        .collect();
    let mut tx = pool.begin().await.unwrap();
    apply_events(
        &mut tx,
        &keys,
        &names::ALL,
        &deposit,
        &mut Applied::default(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        references(&pool, account).await,
        vec![Some(ERASED_MARKER.into())],
        "decrypted with the cached key, written in clear after the erasure"
    );
    assert_eq!(balance(&pool, account).await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_projected_while_a_reference_is_being_written_waits_for_it_and_erases_it() {
    let (_url, pool) = fresh_database().await;
    let keys = keys(&pool);
    let account = Uuid::now_v7();
    let subject = register(&pool, &keys, &[account]).await;
    let cursor = project(&pool, &keys, LogCursor::default(), 2).await;
    deposit(&pool, &keys, subject, account, 2, 40, false).await;
    let entries = log(&pool, 3).await;
    let deposit: Vec<_> = entries
        .iter()
        .filter(|e| e.cursor > cursor)
        .map(|e| (&e.event, Origin::Store { cursor: e.cursor }))
        .collect();
    // One partition's worker writes the reference in clear (the key is live) and has not
    // committed yet...
    let mut writer = pool.begin().await.unwrap();
    apply_events(
        &mut writer,
        &keys,
        &names::ALL,
        &deposit,
        &mut Applied::default(),
    )
    .await
    .unwrap();
    // ...when the subject is erased, and another worker projects the erasure.
    erase(&pool, subject, 2).await;
    let entries = log(&pool, 4).await;
    let erasure: Vec<(ledger_events::RecordedEvent, Origin)> = entries
        .iter()
        .filter(|e| e.event.aggregate_type == "subject" && e.event.sequence == 2)
        .map(|e| (e.event.clone(), Origin::Store { cursor: e.cursor }))
        .collect();
    let eraser = {
        let pool = pool.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            let batch: Vec<(&ledger_events::RecordedEvent, Origin)> =
                erasure.iter().map(|(e, o)| (e, *o)).collect();
            let mut tx = pool.begin().await.unwrap();
            apply_events(&mut tx, &keys, &names::ALL, &batch, &mut Applied::default())
                .await
                .unwrap();
            tx.commit().await.unwrap();
        })
    };
    // The erasure waits for the writer's transaction (its erasure lock)...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            !eraser.is_finished(),
            "the erasure was projected without waiting for the reference's writer"
        );
        assert!(Instant::now() < deadline, "the erasure never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and once it has committed, finds the reference and erases it.
    writer.commit().await.unwrap();
    eraser.await.unwrap();
    assert_eq!(
        references(&pool, account).await,
        vec![Some(ERASED_MARKER.into())],
        "the reference written while the erasure was projected stayed in clear"
    );
    assert_eq!(balance(&pool, account).await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_that_fails_authentication_is_a_dead_letter_of_the_statement_alone_without_personal_data(
) {
    let (_url, pool) = fresh_database().await;
    let keys = keys(&pool);
    let account = Uuid::now_v7();
    let subject = register(&pool, &keys, &[account]).await;
    let tampered = deposit(&pool, &keys, subject, account, 2, 30, true).await;
    deposit(&pool, &keys, subject, account, 3, 5, false).await;
    // A v3 reference without the subject that sealed it.
    let orphan = Uuid::now_v7();
    let sealed = keys
        .current(subject)
        .await
        .unwrap()
        .encrypt(orphan, fields::REFERENCE, REFERENCE);
    let mut conn = pool.acquire().await.unwrap();
    append(
        &mut conn,
        "account",
        &account.to_string(),
        4,
        "3",
        orphan,
        json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": sealed}),
        json!({}),
    )
    .await;
    drop(conn);
    project(&pool, &keys, LogCursor::default(), 5).await;

    let letters: Vec<(String, Uuid, String)> = sqlx::query_as(
        "SELECT projection, event_id, reason FROM dead_letters ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0].0, names::ACCOUNT_STATEMENT);
    assert_eq!(letters[0].1, tampered);
    assert!(
        letters[0].2.contains("authentication"),
        "the reason says why: {}",
        letters[0].2
    );
    assert_eq!(letters[1].0, names::ACCOUNT_STATEMENT);
    assert_eq!(letters[1].1, orphan);
    assert!(letters[1].2.contains("no data subject"), "{}", letters[1].2);
    for (_, _, reason) in &letters {
        assert!(
            !reason.contains("Zelda") && !reason.contains("pii1."),
            "{reason}"
        );
    }
    // The money applied everywhere; the good reference is there, never an empty one.
    assert_eq!(balance(&pool, account).await, 36);
    assert_eq!(
        references(&pool, account).await,
        vec![Some(REFERENCE.to_owned())]
    );
}
