//! Moving names and references written in clear before subjects existed into subjects and
//! ciphertext (`ledger_pii::legacy`), against a real PostgreSQL.

#![allow(clippy::unwrap_used)]

use ledger_events::subject::legacy_subject_id;
use ledger_pii::legacy::{migrate, LegacyReport};
use ledger_pii::{DecryptError, KeyStore};
use ledger_platform::testing::fresh_database;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

fn key_store(pool: &PgPool) -> KeyStore {
    ledger_pii::testing::test_key_store(pool)
}

async fn event(
    pool: &PgPool,
    aggregate: &str,
    sequence: i64,
    version: &str,
    payload: Value,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('account', $1, $2, $3::json->>'type', $4, $3::json, '{\"request_id\": \"r\"}')
         RETURNING event_id",
    )
    .bind(aggregate)
    .bind(sequence)
    .bind(payload.to_string())
    .bind(version)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The tables (among those that could hold it) one of whose rows contains `needle`.
async fn holding(pool: &PgPool, needle: &str) -> Vec<&'static str> {
    let mut found = Vec::new();
    for table in ["events", "snapshots", "idempotency_keys", "dead_letters"] {
        let hit: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} t WHERE strpos(t::text, $1) > 0)"
        ))
        .bind(needle)
        .fetch_one(pool)
        .await
        .unwrap();
        if hit {
            found.push(table);
        }
    }
    found
}

#[tokio::test]
async fn legacy_owners_and_references_move_into_subjects_and_ciphertext_once() {
    let (_url, pool) = fresh_database().await;
    let tag = Uuid::new_v4().simple().to_string();
    let lou = format!("Legacy Lou {}", &tag[..8]);
    let olga = format!("Other Olga {}", &tag[8..16]);
    let invoice = format!("lou invoice {}", &tag[16..24]);
    let (a1, a2, a3) = ("acc-1", "acc-2", "acc-3");

    event(
        &pool,
        a1,
        1,
        "1",
        serde_json::json!({"type": "AccountOpened", "owner": lou, "currency": "EUR"}),
    )
    .await;
    event(
        &pool,
        a2,
        1,
        "1",
        serde_json::json!({"type": "AccountOpened", "owner": lou, "currency": "USD"}),
    )
    .await;
    event(
        &pool,
        a3,
        1,
        "1",
        serde_json::json!({"type": "AccountOpened", "owner": olga, "currency": "EUR"}),
    )
    .await;
    let deposit = event(&pool, a1, 2, "2", serde_json::json!({"type": "MoneyDeposited", "amount": 5, "currency": "EUR", "reference": invoice})).await;
    event(&pool, a1, 3, "2", serde_json::json!({"type": "MoneyDeposited", "amount": 6, "currency": "EUR", "reference": null})).await;
    event(
        &pool,
        a1,
        4,
        "1",
        serde_json::json!({"type": "MoneyWithdrawn", "amount": 1, "currency": "EUR"}),
    )
    .await;
    // What older code left beside the events: a snapshot, a stored answer and a dead letter,
    // each with the data in clear.
    sqlx::query(
        "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
         VALUES ('account', $1, 2, 1, json_build_object('owner', $2::text, 'balance', 5))",
    )
    .bind(a1)
    .bind(&lou)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, client_scope, request_hash, aggregate_type, aggregate_id,
                                       response_status, response_body)
         VALUES ('k1', 'anonymous', 'h', 'account', $1, 201, json_build_object('account_id', $1::text, 'owner', $2::text))",
    )
    .bind(a1)
    .bind(&lou)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO dead_letters (projection, reason, event_id, aggregate_id, source, raw_value)
         VALUES ('account_statement', 'test', $1, $2, 'store', $3)",
    )
    .bind(deposit)
    .bind(a1)
    .bind(format!("{{\"reference\": \"{invoice}\"}}"))
    .execute(&pool)
    .await
    .unwrap();
    for needle in [&lou, &olga, &invoice] {
        assert!(
            !holding(&pool, needle).await.is_empty(),
            "the set-up holds {needle}"
        );
    }

    let keys = key_store(&pool);
    let report = migrate(&pool, &keys, 1).await.unwrap();
    assert_eq!(
        report,
        LegacyReport {
            subjects: 2,
            erased_subjects: 0,
            openings: 3,
            references: 1,
            snapshots: 1,
            answers: 1,
            dead_letters: 1,
        }
    );
    for needle in [&lou, &olga, &invoice] {
        assert_eq!(
            holding(&pool, needle).await,
            Vec::<&str>::new(),
            "{needle} left in clear"
        );
    }

    // The subject is real now, under the id its accounts already had, and everything reads.
    let subject = legacy_subject_id(&lou);
    let (registration, name): (Uuid, String) = sqlx::query_as(
        "SELECT event_id, payload->>'name' FROM events
          WHERE aggregate_type = 'subject' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(subject.to_string())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        keys.decrypt(subject, registration, "name", &name)
            .await
            .unwrap(),
        lou
    );
    let rows: Vec<(Uuid, String, String, Value, Value)> = sqlx::query_as(
        "SELECT event_id, aggregate_id, event_version, payload::jsonb, metadata::jsonb FROM events
          WHERE aggregate_type = 'account' ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (event_id, account, version, payload, metadata) in rows {
        if payload["type"] == "AccountOpened" {
            assert_eq!(version, "2");
            let owner = if account == a3 { &olga } else { &lou };
            assert_eq!(payload["subject_id"], legacy_subject_id(owner).to_string());
            assert!(payload.get("owner").is_none());
        }
        if event_id == deposit {
            assert_eq!(version, "3");
            assert_eq!(metadata["data_subject"], subject.to_string());
            assert_eq!(
                metadata["request_id"], "r",
                "the rest of the metadata is kept"
            );
            let sealed = payload["reference"].as_str().unwrap();
            assert_eq!(
                keys.decrypt(subject, deposit, "reference", sealed)
                    .await
                    .unwrap(),
                invoice
            );
        }
    }
    let answer: Value = sqlx::query_scalar("SELECT response_body::jsonb FROM idempotency_keys")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(answer["subject_id"], subject.to_string());
    assert_eq!(answer["account_id"], a1);

    // Nothing left to do the second time.
    assert_eq!(
        migrate(&pool, &keys, 10).await.unwrap(),
        LegacyReport::default()
    );

    // And now the legacy subject can be forgotten like any other.
    keys.erase(subject).await.unwrap();
    let sealed: String =
        sqlx::query_scalar("SELECT payload->>'reference' FROM events WHERE event_id = $1")
            .bind(deposit)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(matches!(
        keys.decrypt(subject, deposit, "reference", &sealed).await,
        Err(DecryptError::KeyErased { .. })
    ));
    pool.close().await;
}
