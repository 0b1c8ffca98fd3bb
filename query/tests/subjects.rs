//! The data-subject routes of the query API against a real PostgreSQL (read-model rows
//! seeded directly): the subject and its totals by id, the export under its own scope, the
//! erased marker in place of the name, 404 for an unknown subject, and the owner totals
//! route gone (410) without echoing the name.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ledger_platform::auth::{self, Auth, AuthMode, RateLimit, Scope};
use ledger_platform::testing::fresh_database;
use ledger_query::changes::Changes;
use ledger_query::http::{router, AppState};
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt;
use uuid::Uuid;

const ACCOUNT: &str = "00000000-0000-0000-0000-0000000000a1";
const OTHER: &str = "00000000-0000-0000-0000-0000000000a2";

async fn app(pool: &PgPool) -> axum::Router {
    router(
        AppState {
            auth: Auth::new(
                pool.clone(),
                AuthMode::ApiKeys,
                RateLimit {
                    per_second: 0,
                    burst: 0,
                },
            ),
            pool: pool.clone(),
            changes: Changes::new(100, Duration::from_secs(60)),
            read_wait_timeout: Duration::from_secs(1),
        },
        Duration::from_secs(10),
    )
}

async fn get(app: &axum::Router, key: &str, path: &str) -> (StatusCode, String, Value) {
    let response = app
        .clone()
        .oneshot(
            Request::get(path)
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// A subject with one account (a deposit with a reference, a transfer out), and another
/// subject's account that must not show up in the export.
async fn seed(pool: &PgPool, subject: Uuid, other: Uuid, name: &str) {
    for statement in [
        "INSERT INTO subjects VALUES ($1, $3, false, now(), NULL, 3, now()),
                                     ($2, 'Someone Else', false, now(), NULL, 4, now())",
        "INSERT INTO account_summaries (account_id, subject_id, currency, balance, status, version, last_position, updated_at)
         VALUES ('00000000-0000-0000-0000-0000000000a1', $1, 'EUR', 495, 'open', 3, 9, now()),
                ('00000000-0000-0000-0000-0000000000a2', $2, 'EUR', 5, 'open', 2, 10, now())",
        "INSERT INTO account_statements (account_id, sequence, global_position, event_id, entry_type, amount, balance_after, reference, recorded_at, data_subject)
         VALUES ('00000000-0000-0000-0000-0000000000a1', 1, 5, gen_random_uuid(), 'opened', 0, 0, NULL, now(), NULL),
                ('00000000-0000-0000-0000-0000000000a1', 2, 6, gen_random_uuid(), 'deposit', 500, 500, 'rent for ' || $3, now(), $1),
                ('00000000-0000-0000-0000-0000000000a1', 3, 9, gen_random_uuid(), 'transfer_sent', -5, 495, NULL, now(), NULL),
                ('00000000-0000-0000-0000-0000000000a2', 1, 7, gen_random_uuid(), 'opened', 0, 0, NULL, now(), NULL)",
        "INSERT INTO transfers (transfer_id, from_account, to_account, amount, currency, state, version, last_position, requested_at, updated_at)
         VALUES ('00000000-0000-0000-0000-0000000000f1', '00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-0000000000a2', 5, 'EUR', 'completed', 3, 11, now(), now()),
                ('00000000-0000-0000-0000-0000000000f2', '00000000-0000-0000-0000-0000000000a2', '00000000-0000-0000-0000-0000000000a3', 1, 'EUR', 'requested', 1, 12, now(), now())",
        "INSERT INTO subject_totals VALUES ($1, 'EUR', 1, 1, 495, 9, now())",
    ] {
        sqlx::query(statement)
            .bind(subject)
            .bind(other)
            .bind(name)
            .execute(pool)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn subjects_answer_by_id_export_needs_its_own_scope_and_owner_totals_are_gone() {
    let (_url, pool) = fresh_database().await;
    let (subject, other) = (Uuid::now_v7(), Uuid::now_v7());
    seed(&pool, subject, other, "Zelda Quixote").await;
    let app = app(&pool).await;
    let reader = auth::create(&pool, "reader", &[Scope::Read])
        .await
        .unwrap()
        .key;
    let exporter = auth::create(&pool, "exporter", &[Scope::Export])
        .await
        .unwrap()
        .key;

    let (status, _, account) = get(&app, &reader, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(status, StatusCode::OK, "{account}");
    assert_eq!(account["owner"], "Zelda Quixote");
    assert_eq!(account["subject_id"], subject.to_string());

    let (status, _, found) = get(&app, &reader, &format!("/v1/subjects/{subject}")).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["name"], "Zelda Quixote");
    assert_eq!(found["legacy"], false);
    assert!(found["erased_at"].is_null());

    let (status, _, totals) = get(&app, &reader, &format!("/v1/subjects/{subject}/totals")).await;
    assert_eq!(status, StatusCode::OK, "{totals}");
    assert_eq!(totals["totals"][0]["balance"], 495);

    let unknown = Uuid::now_v7();
    for path in [
        format!("/v1/subjects/{unknown}"),
        format!("/v1/subjects/{unknown}/totals"),
    ] {
        let (status, content_type, problem) = get(&app, &reader, &path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(problem["code"], "subject_not_found", "{problem}");
    }
    let (status, _, problem) =
        get(&app, &exporter, &format!("/v1/subjects/{unknown}/export")).await;
    assert_eq!(
        (status, &problem["code"]),
        (StatusCode::NOT_FOUND, &Value::from("subject_not_found"))
    );

    // The export: the read scope is not enough; the export scope gets one document with
    // the subject's accounts, whole statements and transfers, and nobody else's.
    let (status, _, _) = get(&app, &reader, &format!("/v1/subjects/{subject}/export")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = get(&app, &exporter, &format!("/v1/subjects/{subject}")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, export) = get(&app, &exporter, &format!("/v1/subjects/{subject}/export")).await;
    assert_eq!(status, StatusCode::OK, "{export}");
    assert_eq!(export["subject"]["name"], "Zelda Quixote");
    let accounts = export["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 1, "{export}");
    assert_eq!(accounts[0]["summary"]["account_id"], ACCOUNT);
    assert_eq!(accounts[0]["statement"].as_array().unwrap().len(), 3);
    assert_eq!(
        accounts[0]["statement"][1]["reference"],
        "rent for Zelda Quixote"
    );
    let transfers = export["transfers"].as_array().unwrap();
    assert_eq!(
        transfers.len(),
        1,
        "only transfers touching its accounts: {export}"
    );
    assert!(!export.to_string().contains("Someone Else"));
    assert!(!export.to_string().contains(OTHER) || transfers[0]["to_account"] == OTHER);

    // Owner totals by name: gone, pointing at the new route, without echoing the name.
    let (status, content_type, gone) =
        get(&app, &reader, "/v1/owners/Zelda%20Quixote/totals").await;
    assert_eq!(status, StatusCode::GONE, "{gone}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(gone["code"], "gone");
    assert!(gone["detail"]
        .as_str()
        .unwrap()
        .contains("/v1/subjects/{subject_id}/totals"));
    assert!(!gone.to_string().contains("Zelda"), "{gone}");

    // The OpenAPI document describes the export.
    let (_, _, doc) = get(&app, &reader, "/openapi.json").await;
    assert!(doc["paths"]["/v1/subjects/{subject_id}/export"]["get"].is_object());
    assert!(
        doc["components"]["schemas"]["SubjectExport"].is_object(),
        "export schema documented"
    );
}

#[tokio::test]
async fn an_erased_subject_shows_the_marker_and_the_money_and_its_accounts_etag_changes() {
    let (_url, pool) = fresh_database().await;
    let (subject, other) = (Uuid::now_v7(), Uuid::now_v7());
    seed(&pool, subject, other, "Zelda Quixote").await;
    let app = app(&pool).await;
    let reader = auth::create(&pool, "reader", &[Scope::Read])
        .await
        .unwrap()
        .key;
    let exporter = auth::create(&pool, "exporter", &[Scope::Export])
        .await
        .unwrap()
        .key;
    let etag = |app: axum::Router| {
        let reader = reader.clone();
        async move {
            let response = app
                .oneshot(
                    Request::get(format!("/v1/accounts/{ACCOUNT}"))
                        .header("authorization", format!("Bearer {reader}"))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            response.headers()["etag"].to_str().unwrap().to_owned()
        }
    };
    let before = etag(app.clone()).await;
    // What the projector's erasure leaves (rows rewritten, accounts notified; the cache is
    // not in play: a fresh application).
    sqlx::query("UPDATE subjects SET name = '[erased]', erased_at = now() WHERE subject_id = $1")
        .bind(subject)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE account_statements SET reference = '[erased]' WHERE data_subject = $1")
        .bind(subject)
        .execute(&pool)
        .await
        .unwrap();
    let app = self::app(&pool).await;
    assert_ne!(
        etag(app.clone()).await,
        before,
        "the tag covers the owner's name"
    );
    let (_, _, account) = get(&app, &reader, &format!("/v1/accounts/{ACCOUNT}")).await;
    assert_eq!(
        (account["owner"].as_str(), account["balance"].as_i64()),
        (Some("[erased]"), Some(495))
    );
    let (_, _, found) = get(&app, &reader, &format!("/v1/subjects/{subject}")).await;
    assert_eq!(found["name"], "[erased]");
    assert!(found["erased_at"].is_string());
    let (status, _, export) = get(&app, &exporter, &format!("/v1/subjects/{subject}/export")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!export.to_string().contains("Zelda"), "{export}");
    assert_eq!(
        export["accounts"][0]["statement"][1]["reference"],
        "[erased]"
    );
    assert_eq!(export["accounts"][0]["statement"][1]["amount"], 500);
    assert_eq!(export["accounts"][0]["summary"]["balance"], 495);
}
