//! `POST /v1/transfers`: accepted (202) with the transfer id and position; refused with a
//! problem and nothing written; idempotent under its required key.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, TestApp};

fn transfer(from: Uuid, to: Uuid, amount: Value) -> Value {
    json!({"from": from, "to": to, "amount": amount, "currency": "EUR"})
}

async fn transfer_events(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'transfer'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_is_accepted_with_its_id_and_position_and_recorded_as_requested() {
    let app = spawn_app().await;
    let (from, to) = (app.new_account().await, app.new_account().await);
    let answer = app
        .post(
            "/v1/transfers",
            &transfer(from, to, json!(250)),
            Some("t-1"),
        )
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let id = answer.body["transfer_id"].as_str().unwrap().to_owned();
    assert_eq!(answer.body["status"], "requested");
    assert_eq!(answer.body["amount"], 250);
    assert_eq!(answer.body["from"], json!(from));
    let position = answer.body["position"].as_i64().unwrap();
    assert_eq!(
        answer.headers["location"].to_str().unwrap(),
        format!("/v1/transfers/{id}")
    );
    assert_eq!(
        answer.headers["ledger-position"].to_str().unwrap(),
        position.to_string()
    );
    let (event_type, stored_position, payload): (String, i64, Value) = sqlx::query_as(
        "SELECT event_type, global_position, payload::jsonb FROM events
          WHERE aggregate_type = 'transfer' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(event_type, "TransferRequested");
    assert_eq!(stored_position, position);
    assert_eq!(payload["to"], json!(to));

    // The same key and request: the same answer, no second transfer.
    let again = app
        .post(
            "/v1/transfers",
            &transfer(from, to, json!(250)),
            Some("t-1"),
        )
        .await;
    assert_eq!(again.status, 202);
    assert_eq!(again.body, answer.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    // The same key, another request: 422.
    app.post(
        "/v1/transfers",
        &transfer(from, to, json!(251)),
        Some("t-1"),
    )
    .await
    .assert_problem(422, "idempotency_key_reused");
    assert_eq!(transfer_events(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transfers_get_a_problem_and_write_nothing() {
    let app = spawn_app().await;
    let (a, b) = (app.new_account().await, app.new_account().await);
    let cases: Vec<(&str, Value, Option<&str>, u16, &str)> = vec![
        (
            "no key",
            transfer(a, b, json!(5)),
            None,
            400,
            "idempotency_key_required",
        ),
        (
            "same account",
            transfer(a, a, json!(5)),
            Some("k-same"),
            422,
            "same_account",
        ),
        (
            "zero",
            transfer(a, b, json!(0)),
            Some("k-zero"),
            422,
            "amount_not_positive",
        ),
        (
            "fraction",
            transfer(a, b, json!(1.5)),
            Some("k-frac"),
            400,
            "amount_not_integer",
        ),
        (
            "bad currency",
            json!({"from": a, "to": b, "amount": 5, "currency": "EURO"}),
            Some("k-cur"),
            400,
            "invalid_currency",
        ),
        (
            "not a uuid",
            json!({"from": "alice", "to": b, "amount": 5, "currency": "EUR"}),
            Some("k-uuid"),
            400,
            "invalid_field",
        ),
        (
            "unknown field",
            json!({"from": a, "to": b, "amount": 5, "currency": "EUR", "memo": "x"}),
            Some("k-field"),
            400,
            "invalid_field",
        ),
    ];
    for (case, body, key, status, code) in cases {
        let answer = app.post("/v1/transfers", &body, key).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.text);
        answer.assert_problem(status, code);
    }
    assert_eq!(transfer_events(&app).await, 0, "nothing written");
}
