//! The happy paths of the command API.

use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_an_account_answers_201_with_its_state_and_position() {
    let app = spawn_app().await;
    let answer = app.open_account("Alice Example", "EUR").await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    assert_eq!(answer.content_type(), "application/json");
    let id = answer.account_id();
    assert_eq!(
        answer.headers["location"].to_str().unwrap(),
        format!("/v1/accounts/{id}")
    );
    assert_eq!(answer.body["subject_id"].as_str().unwrap().len(), 36);
    assert!(answer.body.get("owner").is_none(), "{}", answer.text);
    assert_eq!(answer.body["currency"], "EUR");
    assert_eq!(answer.body["balance"], 0);
    assert_eq!(answer.body["status"], "open");
    assert_eq!(answer.body["version"], 1);
    assert!(answer.body["position"].as_i64().unwrap() > 0);
    assert_eq!(
        answer.headers["ledger-position"].to_str().unwrap(),
        answer.body["position"].to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposits_and_withdrawals_answer_the_new_balance_and_increasing_positions() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let deposited = app.deposit(id, 1_000, None).await;
    assert_eq!(deposited.status, 200, "{}", deposited.text);
    assert_eq!(deposited.body["balance"], 1_000);
    assert_eq!(deposited.body["version"], 2);
    let withdrawn = app.withdraw(id, 250, None).await;
    assert_eq!(withdrawn.status, 200, "{}", withdrawn.text);
    assert_eq!(withdrawn.body["balance"], 750);
    assert_eq!(withdrawn.body["version"], 3);
    assert!(withdrawn.body["position"].as_i64() > deposited.body["position"].as_i64());
    assert_eq!(app.balance_from_events(id).await, 750);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_is_kept_on_the_event_encrypted() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let answer = app
        .post(
            &format!("/v1/accounts/{id}/deposits"),
            &json!({"amount": 5, "currency": "EUR", "reference": "invoice 42"}),
            None,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let events = app.events_of(id).await;
    let reference = events[1].2["reference"].as_str().unwrap();
    assert!(ledger_pii::is_encrypted(reference), "{reference}");
    assert_eq!(events[1].1, "MoneyDeposited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_at_zero_balance_closes_the_account_for_good() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    app.deposit(id, 10, None).await;
    app.withdraw(id, 10, None).await;
    let closed = app.close(id, None).await;
    assert_eq!(closed.status, 200, "{}", closed.text);
    assert_eq!(closed.body["status"], "closed");
    app.deposit(id, 10, None)
        .await
        .assert_problem(422, "account_closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_echoed_and_stored_in_event_metadata() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let answer = app
        .send(
            app.client
                .post(format!("{}/v1/accounts/{id}/deposits", app.address))
                .header("X-Request-Id", "req-abc-123")
                .header("X-Correlation-Id", "flow-9")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .json(&json!({"amount": 7, "currency": "EUR"})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.headers["x-request-id"], "req-abc-123");
    let events = app.events_of(id).await;
    let metadata = &events[1].3;
    assert_eq!(metadata["request_id"], "req-abc-123");
    assert_eq!(metadata["correlation_id"], "flow-9");
    assert_eq!(
        metadata["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert!(metadata["command_id"].as_str().is_some());
    assert!(metadata["causation_id"].as_str().is_some());

    // Without one, a fresh id is made and still echoed and stored.
    let answer = app.deposit(id, 1, None).await;
    let generated = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok());
    let events = app.events_of(id).await;
    assert_eq!(events[2].3["request_id"], generated.as_str());
    // ...and a new trace is started.
    let traceparent = events[2].3["traceparent"].as_str().unwrap();
    assert!(
        ledger_events::metadata::is_valid_traceparent(traceparent),
        "{traceparent}"
    );
}
