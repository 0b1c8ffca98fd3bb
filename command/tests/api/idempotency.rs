//! Promise 7: idempotent intents.

use std::time::Duration;

use futures::future::join_all;
use ledger_command::domain::AccountCommand;
use ledger_command::idempotency;
use ledger_command::ledger::{Intent, Ledger, RetryPolicy};
use ledger_events::{Amount, Metadata};
use serde_json::json;

use ledger_platform::auth::{self, Scope};

use crate::helpers::{
    spawn_app, spawn_app_on, spawn_app_with, spawn_app_with_keyring, test_keyring, TEST_KEK,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_and_request_get_the_same_answer_and_one_set_of_events() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let first = app.deposit(id, 300, Some("k-1")).await;
    let second = app.deposit(id, 300, Some("k-1")).await;
    assert_eq!(first.status, 200);
    assert_eq!(second.status, first.status);
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers["idempotent-replayed"], "true");
    assert_eq!(app.events_of(id).await.len(), 2);
    assert_eq!(app.balance_from_events(id).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicates_of_a_deposit_append_once_and_all_get_the_first_answer() {
    let first = spawn_app().await;
    let second = spawn_app_on(&first.database_url, first.pool.clone(), &[]).await;
    let id = first.new_account().await;
    let answers = join_all((0..20).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        app.deposit(id, 250, Some("race-deposit"))
    }))
    .await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.body, answers[0].body);
    }
    assert_eq!(first.events_of(id).await.len(), 2);
    assert_eq!(first.balance_from_events(id).await, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicates_of_an_account_opening_open_one_account() {
    let first = spawn_app().await;
    let second = spawn_app_on(&first.database_url, first.pool.clone(), &[]).await;
    let body = json!({"owner": "bob", "currency": "USD"});
    let answers = join_all((0..20).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        app.post("/v1/accounts", &body, Some("race-open"))
    }))
    .await;
    for answer in &answers {
        assert_eq!(answer.status, 201, "{}", answer.text);
        assert_eq!(answer.body, answers[0].body);
        assert_eq!(answer.headers["location"], answers[0].headers["location"]);
    }
    // One account (each racer that found the key free registered a subject for the
    // deprecated `owner` first: the losers' subjects hold no account).
    assert_eq!(first.account_event_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_a_different_request_is_422_and_writes_nothing() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    assert_eq!(app.deposit(id, 300, Some("k-2")).await.status, 200);
    let before = app.event_count().await;
    app.deposit(id, 301, Some("k-2"))
        .await
        .assert_problem(422, "idempotency_key_reused");
    app.withdraw(id, 300, Some("k-2"))
        .await
        .assert_problem(422, "idempotency_key_reused");
    assert_eq!(app.event_count().await, before);
    assert_eq!(app.balance_from_events(id).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_answered_the_same_way_when_repeated() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let refused = app.withdraw(id, 50, Some("k-3")).await;
    refused.assert_problem(422, "insufficient_funds");
    assert_eq!(app.deposit(id, 100, None).await.status, 200);
    // The funds are there now, but the key's answer stands.
    let repeated = app.withdraw(id, 50, Some("k-3")).await;
    assert_eq!(repeated.status, 422);
    assert_eq!(repeated.body, refused.body);
    assert_eq!(app.balance_from_events(id).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_committed_before_the_process_died_is_answered_from_its_events() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    app.deposit(id, 40, None).await;
    // What a process that died between commit and response leaves behind: events claimed
    // under the key, and no stored answer.
    let path = format!("/v1/accounts/{id}/deposits");
    let body = json!({"amount": 60, "currency": "EUR"});
    let fingerprints = idempotency::fingerprints(&test_keyring(), "POST", &path, &body);
    let ledger: Ledger = Ledger::new(app.pool.clone(), 100, RetryPolicy::default());
    let committed = ledger
        .execute(Intent {
            aggregate_id: id,
            command: ledger_command::domain::AccountCommand::Deposit {
                amount: ledger_events::Amount::new(60).unwrap(),
                currency: "EUR".parse().unwrap(),
                reference: None,
            },
            metadata: Metadata {
                idempotency_key: Some("k-died".into()),
                idempotency_scope: Some(idempotency::ANONYMOUS_SCOPE.into()),
                request_hash: Some(fingerprints[0].clone()),
                ..Metadata::default()
            },
            event_id: None,
        })
        .await
        .unwrap();
    let key = idempotency::ClientKey::new(idempotency::ANONYMOUS_SCOPE, "k-died");
    let record = idempotency::find(&app.pool, &key, &fingerprints)
        .await
        .unwrap()
        .unwrap();
    assert!(record.response.is_none(), "no answer was stored");

    let answer = app.post(&path, &body, Some("k-died")).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["balance"], 100);
    assert_eq!(answer.body["version"], committed.version);
    assert_eq!(answer.body["position"], committed.position);
    assert_eq!(
        app.events_of(id).await.len(),
        3,
        "the deposit was not applied again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_forgotten_after_the_retention_and_may_be_used_again() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    assert_eq!(app.deposit(id, 5, Some("k-old")).await.status, 200);
    assert_eq!(
        idempotency::purge_expired(&app.pool, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '2 hours'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        idempotency::purge_expired(&app.pool, Duration::from_secs(3600))
            .await
            .unwrap(),
        1
    );
    let again = app.deposit(id, 5, Some("k-old")).await;
    assert_eq!(again.status, 200);
    assert!(again.headers.get("idempotent-replayed").is_none());
    assert_eq!(app.balance_from_events(id).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_idempotency_key_is_400() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let long = "k".repeat(256);
    for key in ["", "with space", long.as_str()] {
        app.deposit(id, 5, Some(key))
            .await
            .assert_problem(400, "invalid_idempotency_key");
    }
    assert_eq!(app.balance_from_events(id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_is_not_remembered_and_the_same_key_gets_the_real_outcome_once_the_conflict_is_gone()
{
    let app = spawn_app().await;
    let id = app.new_account().await;
    assert_eq!(app.deposit(id, 100, None).await.status, 200);
    // A transfer leaves the account (as the process manager would send it): balance 0, one
    // transfer in flight, so closing is a 409 until it settles.
    let ledger: Ledger = Ledger::new(app.pool.clone(), 100, RetryPolicy::default());
    let transfer_id = uuid::Uuid::now_v7();
    let account_command = |command| Intent {
        aggregate_id: id,
        command,
        metadata: Metadata::default(),
        event_id: None,
    };
    ledger
        .execute(account_command(AccountCommand::SendTransfer {
            transfer_id,
            to: uuid::Uuid::now_v7(),
            amount: Amount::new(100).unwrap(),
            currency: "EUR".parse().unwrap(),
        }))
        .await
        .unwrap();
    app.close(id, Some("k-close"))
        .await
        .assert_problem(409, "transfers_in_flight");
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM idempotency_keys WHERE idempotency_key = 'k-close'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "the 409 was stored as the key's answer");

    ledger
        .execute(account_command(AccountCommand::SettleTransfer {
            transfer_id,
        }))
        .await
        .unwrap();
    let closed = app.close(id, Some("k-close")).await;
    assert_eq!(closed.status, 200, "{}", closed.text);
    assert_eq!(closed.body["status"], "closed");
    assert!(closed.headers.get("idempotent-replayed").is_none());
    let replayed = app.close(id, Some("k-close")).await;
    assert_eq!(replayed.body, closed.body);
    assert_eq!(replayed.headers["idempotent-replayed"], "true");
    let last = app.events_of(id).await.pop().unwrap();
    assert_eq!(last.1, "AccountClosed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_from_two_api_keys_is_two_requests_and_no_client_sees_the_others_answer() {
    let app = spawn_app_with(&["--auth-mode", "api-keys"]).await;
    let a = auth::create(&app.pool, "client-a", &[Scope::Write])
        .await
        .unwrap()
        .key;
    let b = auth::create(&app.pool, "client-b", &[Scope::Write])
        .await
        .unwrap()
        .key;
    let open = json!({"owner": "alice", "currency": "EUR"});

    let first_a = app.post_as(&a, "/v1/accounts", &open, Some("shared")).await;
    assert_eq!(first_a.status, 201, "{}", first_a.text);
    let first_b = app.post_as(&b, "/v1/accounts", &open, Some("shared")).await;
    assert_eq!(first_b.status, 201, "{}", first_b.text);
    assert!(
        first_b.headers.get("idempotent-replayed").is_none(),
        "client B was handed client A's answer: {}",
        first_b.text
    );
    assert_ne!(first_b.account_id(), first_a.account_id());
    assert_eq!(
        app.account_event_count().await,
        2,
        "two requests, two accounts"
    );

    // Each client's retry gets its own first answer.
    let again_a = app.post_as(&a, "/v1/accounts", &open, Some("shared")).await;
    assert_eq!(again_a.body, first_a.body);
    assert_eq!(again_a.headers["idempotent-replayed"], "true");
    let again_b = app.post_as(&b, "/v1/accounts", &open, Some("shared")).await;
    assert_eq!(again_b.body, first_b.body);
    assert_eq!(again_b.headers["idempotent-replayed"], "true");

    // Another request under a key the other client used is not a reuse: it is carried out.
    let deposit = |amount: i64| json!({"amount": amount, "currency": "EUR"});
    let path =
        |answer: &crate::helpers::Answer| format!("/v1/accounts/{}/deposits", answer.account_id());
    let paid_a = app
        .post_as(&a, &path(&first_a), &deposit(300), Some("pay"))
        .await;
    assert_eq!(paid_a.status, 200, "{}", paid_a.text);
    let paid_b = app
        .post_as(&b, &path(&first_b), &deposit(5), Some("pay"))
        .await;
    assert_eq!(paid_b.status, 200, "{}", paid_b.text);
    assert_eq!(paid_b.body["balance"], 5);
    assert_eq!(app.balance_from_events(first_a.account_id()).await, 300);
    assert_eq!(app.balance_from_events(first_b.account_id()).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stored_before_keys_were_scoped_answers_its_own_request_and_no_other() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let first = app.deposit(id, 70, Some("k-legacy")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    // What the scoping migration leaves of a key stored before it.
    sqlx::query("UPDATE idempotency_keys SET client_scope = 'legacy'")
        .execute(&app.pool)
        .await
        .unwrap();

    // A retry across the upgrade is answered from the first attempt, not carried out twice.
    let retried = app.deposit(id, 70, Some("k-legacy")).await;
    assert_eq!(retried.body, first.body);
    assert_eq!(retried.headers["idempotent-replayed"], "true");
    assert_eq!(app.balance_from_events(id).await, 70);
    // Another request under the key cannot be tied to the legacy key's client: carried out.
    let other = app.deposit(id, 30, Some("k-legacy")).await;
    assert_eq!(other.status, 200, "{}", other.text);
    assert!(other.headers.get("idempotent-replayed").is_none());
    assert_eq!(app.balance_from_events(id).await, 100);
}

/// Promise 7 across a KEK rotation: request fingerprints are keyed by the KEK (ADR 0019),
/// so a replica with a new `PII_KEK` (the old one in `PII_KEK_PREVIOUS`) must still see a
/// retry as the same request, and another request under the key as another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_kek_rotation_is_the_same_request_and_another_body_is_still_refused() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let path = format!("/v1/accounts/{id}/deposits");
    let body = json!({"amount": 25, "currency": "EUR", "reference": "before the rotation"});
    let first = app.post(&path, &body, Some("k-rotation")).await;
    assert_eq!(first.status, 200, "{}", first.text);

    let rotated = ledger_pii::Keyring::parse(
        Some("next:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
        Some(TEST_KEK),
    )
    .unwrap();
    let after = spawn_app_with_keyring(&app.database_url, app.pool.clone(), &[], rotated).await;
    let again = after.post(&path, &body, Some("k-rotation")).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body, first.body);
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    let other = json!({"amount": 26, "currency": "EUR", "reference": "before the rotation"});
    let reused = after.post(&path, &other, Some("k-rotation")).await;
    assert_eq!(reused.status, 422, "{}", reused.text);
    assert_eq!(reused.body["code"], "idempotency_key_reused");
    assert_eq!(app.balance_from_events(id).await, 25, "one deposit");
}
