//! The key store against a real PostgreSQL: create, load, erase (twice), unknown subjects,
//! KEK rotation, and the cache never outliving an erasure.
//!
//! Like the other crates' database tests, each test makes its own migrated database with
//! `ledger_platform::testing::fresh_database` (`scripts/test.sh` drops them).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use ledger_pii::{
    CacheSettings, DecryptError, Erasure, Kek, KekId, KeyStore, Keyring, StoreError, UnwrapError,
    ERASED_MARKER, ERASURE_CHANNEL,
};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use uuid::Uuid;

/// A test's own migrated database.
struct TestDb {
    pool: PgPool,
}

impl TestDb {
    async fn new() -> Self {
        let (_url, pool) = ledger_platform::testing::fresh_database().await;
        Self { pool }
    }

    /// Closes the test's connections (the database itself is dropped by `scripts/test.sh`).
    async fn close(self) {
        self.pool.close().await;
    }
}

fn kek(id: &str, byte: u8) -> Kek {
    Kek::new(KekId::new(id).unwrap(), [byte; 32])
}

fn ring(current: Kek, previous: Vec<Kek>) -> Keyring {
    Keyring::new(current, previous).unwrap()
}

fn store(pool: &PgPool, keyring: Keyring) -> KeyStore {
    KeyStore::new(pool.clone(), keyring, CacheSettings::default())
}

#[tokio::test]
async fn a_key_is_created_loaded_erased_and_erasing_again_answers_the_same() {
    let db = TestDb::new().await;
    let keys = store(&db.pool, ring(kek("k1", 1), vec![]));
    let subject = Uuid::new_v4();
    let event = Uuid::new_v4();

    let created = keys.create(subject).await.unwrap();
    assert_eq!((created.subject(), created.version()), (subject, 1));
    let text = keys
        .encrypt(subject, event, "owner", "Zoë Q. Distinctive")
        .await
        .unwrap();
    assert!(text.starts_with("pii1.1."), "{text}");
    // Another process (no cache) reads it through the table.
    let other = store(&db.pool, ring(kek("k1", 1), vec![]));
    assert_eq!(
        other.decrypt(subject, event, "owner", &text).await.unwrap(),
        "Zoë Q. Distinctive"
    );
    assert!(matches!(
        keys.create(subject).await,
        Err(StoreError::AlreadyExists { subject: s }) if s == subject
    ));

    let first = keys.erase(subject).await.unwrap();
    assert!(matches!(first, Erasure::ErasedNow { .. }), "{first:?}");
    let (bytes, erased_at): (Option<Vec<u8>>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT wrapped_key, erased_at FROM subject_keys WHERE subject_id = $1")
            .bind(subject)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((bytes, erased_at), (None, Some(first.at())));

    // Erasing again answers the same erasure; nothing can bring the key back.
    for store in [&keys, &other] {
        assert_eq!(
            store.erase(subject).await.unwrap(),
            Erasure::AlreadyErased { at: first.at() }
        );
    }
    let fresh = store(&db.pool, ring(kek("k1", 1), vec![]));
    for store in [&keys, &fresh] {
        assert!(matches!(
            store.load(subject, 1).await,
            Err(StoreError::Erased { erased_at, .. }) if erased_at == first.at()
        ));
        assert!(matches!(
            store.decrypt(subject, event, "owner", &text).await,
            Err(DecryptError::KeyErased { subject: s, .. }) if s == subject
        ));
    }
    assert!(matches!(
        keys.encrypt(subject, event, "owner", "x").await,
        Err(StoreError::Erased { .. })
    ));
    assert!(matches!(
        keys.create(subject).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(ERASED_MARKER, "[erased]");
    db.close().await;
}

#[tokio::test]
async fn an_unknown_subject_is_told_apart_from_an_erased_one() {
    let db = TestDb::new().await;
    let keys = store(&db.pool, ring(kek("k1", 1), vec![]));
    let unknown = Uuid::new_v4();
    assert!(
        matches!(keys.erase(unknown).await, Err(StoreError::UnknownSubject { subject }) if subject == unknown)
    );
    assert!(matches!(
        keys.load(unknown, 1).await,
        Err(StoreError::UnknownSubject { .. })
    ));
    let known = Uuid::new_v4();
    let text = keys
        .create(known)
        .await
        .unwrap()
        .encrypt(Uuid::nil(), "owner", "A");
    assert!(matches!(
        keys.decrypt(unknown, Uuid::nil(), "owner", &text).await,
        Err(DecryptError::UnknownSubject { .. })
    ));
    assert!(matches!(
        keys.decrypt(
            known,
            Uuid::nil(),
            "owner",
            &text.replacen("pii1.1.", "pii1.2.", 1)
        )
        .await,
        Err(DecryptError::UnknownKeyVersion { version: 2, .. })
    ));
    assert!(matches!(
        keys.decrypt(known, Uuid::new_v4(), "owner", &text).await,
        Err(DecryptError::Field(
            ledger_pii::FieldError::AuthenticationFailed
        ))
    ));
    // The unknown subject is still unknown: nothing was written for it.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM subject_keys WHERE subject_id = $1")
        .bind(unknown)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    db.close().await;
}

#[tokio::test]
async fn after_rotation_rewrap_all_moves_every_live_key_so_the_new_kek_alone_loads_them() {
    let db = TestDb::new().await;
    let before = store(&db.pool, ring(kek("k1", 1), vec![]));
    let event = Uuid::new_v4();
    let mut texts = Vec::new();
    for n in 0..5 {
        let subject = Uuid::new_v4();
        let key = before.create(subject).await.unwrap();
        texts.push((subject, key.encrypt(event, "owner", &format!("person {n}"))));
    }
    let erased = texts.pop().unwrap().0;
    before.erase(erased).await.unwrap();

    // Without the rotation, the new KEK alone cannot read the keys.
    let new_only = || store(&db.pool, ring(kek("k2", 2), vec![]));
    assert!(matches!(
        new_only().load(texts[0].0, 1).await,
        Err(StoreError::Unwrap { source: UnwrapError::UnknownKek(id), .. }) if id.as_str() == "k1"
    ));

    let rotating = store(&db.pool, ring(kek("k2", 2), vec![kek("k1", 1)]));
    let report = rotating.rewrap_all(3).await.unwrap();
    assert_eq!(report.rewrapped, 4);
    assert_eq!(report.batches, 2);
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(
        report.live_by_kek.into_iter().collect::<Vec<_>>(),
        vec![("k2".to_owned(), 4)]
    );
    // Idempotent: nothing left to move.
    let again = rotating.rewrap_all(3).await.unwrap();
    assert_eq!((again.rewrapped, again.batches), (0, 0));

    for keyring_after in [new_only(), rotating.clone()] {
        for (n, (subject, text)) in texts.iter().enumerate() {
            let plain = keyring_after
                .decrypt(*subject, event, "owner", text)
                .await
                .unwrap();
            assert_eq!(plain, format!("person {n}"));
        }
        // The erased subject stays erased: rotation rewraps no tombstone.
        assert!(matches!(
            keyring_after.load(erased, 1).await,
            Err(StoreError::Erased { .. })
        ));
    }
    db.close().await;
}

#[tokio::test]
async fn a_key_under_a_kek_no_longer_configured_is_reported_by_rewrap_and_left_as_it_is() {
    let db = TestDb::new().await;
    let lost = Uuid::new_v4();
    store(&db.pool, ring(kek("k0", 9), vec![]))
        .create(lost)
        .await
        .unwrap();
    let kept = Uuid::new_v4();
    store(&db.pool, ring(kek("k1", 1), vec![]))
        .create(kept)
        .await
        .unwrap();

    let rotating = store(&db.pool, ring(kek("k2", 2), vec![kek("k1", 1)]));
    let report = rotating.rewrap_all(100).await.unwrap();
    assert_eq!(report.rewrapped, 1);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(
        (report.failed[0].subject, report.failed[0].version),
        (lost, 1)
    );
    assert_eq!(
        report.failed[0].error,
        UnwrapError::UnknownKek(KekId::new("k0").unwrap())
    );
    let counts: Vec<(String, u64)> = report.live_by_kek.into_iter().collect();
    assert_eq!(counts, vec![("k0".to_owned(), 1), ("k2".to_owned(), 1)]);
    // The key under the missing KEK is untouched: with that KEK back it loads.
    store(&db.pool, ring(kek("k0", 9), vec![]))
        .load(lost, 1)
        .await
        .unwrap();
    db.close().await;
}

#[tokio::test]
async fn an_erased_key_is_not_loadable_even_from_a_warm_cache() {
    let db = TestDb::new().await;
    let keyring = || ring(kek("k1", 1), vec![]);
    let this = store(&db.pool, keyring());
    let short_ttl = CacheSettings {
        ttl: Duration::from_millis(300),
        ..CacheSettings::default()
    };
    let listening = KeyStore::new(db.pool.clone(), keyring(), CacheSettings::default());
    let not_listening = KeyStore::new(db.pool.clone(), keyring(), short_ttl);
    let subject = Uuid::new_v4();
    this.create(subject).await.unwrap();
    for store in [&this, &listening, &not_listening] {
        store.load(subject, 1).await.unwrap(); // warm
    }
    let mut listener = PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(ERASURE_CHANNEL).await.unwrap();

    this.erase(subject).await.unwrap();
    assert!(matches!(
        this.load(subject, 1).await,
        Err(StoreError::Erased { .. })
    ));

    // Another process learns it from the notification…
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note.payload(), subject.to_string());
    assert!(
        listening.load(subject, 1).await.is_ok(),
        "the listening store's cache was warm"
    );
    listening.forget(Uuid::parse_str(note.payload()).unwrap());
    assert!(matches!(
        listening.load(subject, 1).await,
        Err(StoreError::Erased { .. })
    ));

    // …or at the latest when its entry expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match not_listening.load(subject, 1).await {
            Err(StoreError::Erased { .. }) => break,
            Ok(_) => assert!(Instant::now() < deadline, "the erased key stayed cached"),
            Err(other) => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The listener holds one of the pool's connections: closing the pool waits for it.
    drop(listener);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loads_racing_an_erasure_never_put_the_erased_key_back_in_the_cache() {
    let db = TestDb::new().await;
    let keys = store(&db.pool, ring(kek("k1", 1), vec![]));
    for _ in 0..150 {
        let subject = Uuid::new_v4();
        keys.create(subject).await.unwrap();
        let loads: Vec<_> = (0..6)
            .map(|_| {
                let keys = keys.clone();
                tokio::spawn(async move { keys.load(subject, 1).await.map(|_| ()) })
            })
            .collect();
        keys.erase(subject).await.unwrap();
        for load in loads {
            // Each load may see the key (it began first) or the erasure.
            match load.await.unwrap() {
                Ok(()) | Err(StoreError::Erased { .. }) => {}
                Err(other) => panic!("{other:?}"),
            }
        }
        assert!(
            matches!(keys.load(subject, 1).await, Err(StoreError::Erased { .. })),
            "a load that read the key before the erasure cached it after"
        );
    }
    db.close().await;
}

#[tokio::test]
async fn an_erasure_in_the_callers_transaction_is_undone_by_its_rollback_and_kept_by_its_commit() {
    let db = TestDb::new().await;
    let keys = store(&db.pool, ring(kek("k1", 1), vec![]));
    let subject = Uuid::new_v4();
    keys.create(subject).await.unwrap();
    keys.load(subject, 1).await.unwrap(); // cached

    let mut tx = db.pool.begin().await.unwrap();
    let erased = KeyStore::erase_in(&mut tx, subject).await.unwrap();
    assert!(matches!(erased, Erasure::ErasedNow { .. }));
    tx.rollback().await.unwrap();
    // Nothing was erased: the key still loads, from the cache and from the table.
    keys.load(subject, 1).await.unwrap();
    store(&db.pool, ring(kek("k1", 1), vec![]))
        .load(subject, 1)
        .await
        .unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let erased = KeyStore::erase_in(&mut tx, subject).await.unwrap();
    tx.commit().await.unwrap();
    keys.forget(subject);
    assert!(matches!(
        keys.load(subject, 1).await,
        Err(StoreError::Erased { erased_at, .. }) if erased_at == erased.at()
    ));
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        KeyStore::erase_in(&mut tx, subject).await.unwrap(),
        Erasure::AlreadyErased { at: erased.at() }
    );
    tx.commit().await.unwrap();
    db.close().await;
}

#[tokio::test]
async fn the_start_up_check_refuses_a_missing_or_wrong_kek_and_names_it() {
    let db = TestDb::new().await;
    store(&db.pool, ring(kek("k0", 9), vec![]))
        .create(Uuid::new_v4())
        .await
        .unwrap();
    store(&db.pool, ring(kek("k1", 1), vec![]))
        .create(Uuid::new_v4())
        .await
        .unwrap();

    let ids = store(&db.pool, ring(kek("k1", 1), vec![kek("k0", 9)]))
        .verify_keyring()
        .await
        .unwrap();
    assert_eq!(
        ids.iter().map(KekId::as_str).collect::<Vec<_>>(),
        ["k0", "k1"]
    );

    let missing = store(&db.pool, ring(kek("k1", 1), vec![]))
        .verify_keyring()
        .await
        .unwrap_err();
    assert!(matches!(
        &missing,
        StoreError::Unwrap { source: UnwrapError::UnknownKek(id), .. } if id.as_str() == "k0"
    ));
    let wrong = store(&db.pool, ring(kek("k1", 1), vec![kek("k0", 8)]))
        .verify_keyring()
        .await
        .unwrap_err();
    let StoreError::Unwrap { source, .. } = &wrong else {
        panic!("{wrong:?}")
    };
    assert_eq!(
        source,
        &UnwrapError::AuthenticationFailed(KekId::new("k0").unwrap())
    );
    assert!(source.to_string().contains("`k0`"), "{source}");
    db.close().await;
}

#[tokio::test]
async fn a_generated_key_is_stored_in_the_callers_transaction_or_not_at_all() {
    let db = TestDb::new().await;
    let keys = store(&db.pool, ring(kek("k1", 1), vec![]));
    let subject = Uuid::new_v4();
    let event = Uuid::new_v4();
    let key = KeyStore::generate(subject);
    assert_eq!((key.subject(), key.version()), (subject, 1));
    let text = key.encrypt(event, "name", "Zoë Q. Transactional");

    // Rolled back with the rest of the transaction: the subject stays unknown.
    let mut tx = db.pool.begin().await.unwrap();
    keys.store_in(&mut tx, &key).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(
        keys.current(subject).await,
        Err(StoreError::UnknownSubject { subject: s }) if s == subject
    ));

    // Committed: another process (no cache) decrypts what the key sealed before it was
    // stored.
    let mut tx = db.pool.begin().await.unwrap();
    keys.store_in(&mut tx, &key).await.unwrap();
    tx.commit().await.unwrap();
    let other = store(&db.pool, ring(kek("k1", 1), vec![]));
    assert_eq!(
        other.decrypt(subject, event, "name", &text).await.unwrap(),
        "Zoë Q. Transactional"
    );
    let mut conn = db.pool.acquire().await.unwrap();
    assert!(matches!(
        keys.store_in(&mut conn, &KeyStore::generate(subject)).await,
        Err(StoreError::AlreadyExists { subject: s }) if s == subject
    ));
    drop(conn);
    db.close().await;
}
