//! Promise 8: bad input is answered with a 4xx problem, never obeyed, never a 5xx.

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, Answer, TestApp};

/// (case, content type, body, expected status, expected code)
type RawCase = (
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
);

/// Sends a raw body with a content type to `path`.
async fn raw(app: &TestApp, path: &str, content_type: Option<&str>, body: Vec<u8>) -> Answer {
    let mut request = app.client.post(format!("{}{path}", app.address)).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    app.send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_requests_get_a_clear_problem_and_write_nothing() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    assert_eq!(app.deposit(id, 100, None).await.status, 200);
    let deposits = format!("/v1/accounts/{id}/deposits");
    let withdrawals = format!("/v1/accounts/{id}/withdrawals");
    let unknown = format!("/v1/accounts/{}/deposits", uuid::Uuid::new_v4());
    let long_owner = "x".repeat(201);
    let before = app.event_count().await;

    let json_cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "unknown field",
            &deposits,
            json!({"amount": 1, "currency": "EUR", "extra": 1}),
            400,
            "invalid_field",
        ),
        (
            "missing amount",
            &deposits,
            json!({"currency": "EUR"}),
            400,
            "invalid_field",
        ),
        (
            "amount as string",
            &deposits,
            json!({"amount": "100", "currency": "EUR"}),
            400,
            "invalid_field",
        ),
        (
            "fractional amount",
            &deposits,
            json!({"amount": 1.5, "currency": "EUR"}),
            400,
            "amount_not_integer",
        ),
        (
            "zero amount",
            &deposits,
            json!({"amount": 0, "currency": "EUR"}),
            422,
            "amount_not_positive",
        ),
        (
            "negative amount",
            &withdrawals,
            json!({"amount": -5, "currency": "EUR"}),
            422,
            "amount_not_positive",
        ),
        (
            "amount past i64",
            &deposits,
            json!({"amount": 9_223_372_036_854_775_808_u64, "currency": "EUR"}),
            422,
            "amount_overflow",
        ),
        (
            "huge amount",
            &deposits,
            json!({"amount": 1e300, "currency": "EUR"}),
            422,
            "amount_overflow",
        ),
        (
            "lower-case currency",
            &deposits,
            json!({"amount": 1, "currency": "eur"}),
            400,
            "invalid_currency",
        ),
        (
            "unknown currency",
            &deposits,
            json!({"amount": 1, "currency": "XQQ"}),
            400,
            "invalid_currency",
        ),
        (
            "currency mismatch",
            &deposits,
            json!({"amount": 1, "currency": "USD"}),
            422,
            "currency_mismatch",
        ),
        (
            "insufficient funds",
            &withdrawals,
            json!({"amount": 101, "currency": "EUR"}),
            422,
            "insufficient_funds",
        ),
        (
            "balance overflow",
            &deposits,
            json!({"amount": i64::MAX, "currency": "EUR"}),
            422,
            "balance_overflow",
        ),
        (
            "unknown account",
            &unknown,
            json!({"amount": 1, "currency": "EUR"}),
            404,
            "account_not_found",
        ),
        (
            "control characters",
            &deposits,
            json!({"amount": 1, "currency": "EUR", "reference": "a\u{0000}b"}),
            400,
            "invalid_field",
        ),
        (
            "blank owner",
            "/v1/accounts",
            json!({"owner": "  ", "currency": "EUR"}),
            400,
            "invalid_field",
        ),
        (
            "owner too long",
            "/v1/accounts",
            json!({"owner": long_owner, "currency": "EUR"}),
            400,
            "invalid_field",
        ),
        (
            "owner with NUL",
            "/v1/accounts",
            json!({"owner": "a\u{0000}", "currency": "EUR"}),
            400,
            "invalid_field",
        ),
        ("array body", &deposits, json!([1, 2]), 400, "invalid_field"),
        ("null body", &deposits, Value::Null, 400, "invalid_field"),
        (
            "not a uuid",
            "/v1/accounts/not-a-uuid/deposits",
            json!({"amount": 1, "currency": "EUR"}),
            400,
            "invalid_path_parameter",
        ),
    ];
    for (case, path, body, status, code) in json_cases {
        let answer = app.post(path, &body, None).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.text);
        answer.assert_problem(status, code);
    }

    let close_with_money = app.close(id, None).await;
    close_with_money.assert_problem(422, "balance_not_zero");
    assert_eq!(close_with_money.body["balance"], 100);

    let raw_cases: Vec<RawCase> = vec![
        (
            "malformed json",
            Some("application/json"),
            b"{\"amount\": 1,".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "not json at all",
            Some("application/json"),
            b"amount=1".to_vec(),
            400,
            "malformed_json",
        ),
        (
            "invalid utf-8",
            Some("application/json"),
            vec![0x7b, 0xff, 0xfe, 0x7d],
            400,
            "malformed_json",
        ),
        (
            "wrong content type",
            Some("text/plain"),
            b"{\"amount\": 1, \"currency\": \"EUR\"}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            None,
            b"{\"amount\": 1, \"currency\": \"EUR\"}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "too large",
            Some("application/json"),
            format!(
                "{{\"amount\": 1, \"currency\": \"EUR\", \"reference\": \"{}\"}}",
                "x".repeat(20_000)
            )
            .into_bytes(),
            413,
            "payload_too_large",
        ),
        (
            "deeply nested",
            Some("application/json"),
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            400,
            "invalid_field",
        ),
        (
            "deeply nested field",
            Some("application/json"),
            format!(
                "{{\"reference\": {}{}}}",
                "[".repeat(5000),
                "]".repeat(5000)
            )
            .into_bytes(),
            400,
            "invalid_field",
        ),
    ];
    for (case, content_type, body, status, code) in raw_cases {
        let answer = raw(&app, &deposits, content_type, body).await;
        assert_eq!(answer.status, status, "{case}: {}", answer.text);
        answer.assert_problem(status, code);
    }

    app.send(app.client.get(format!("{}/v1/nowhere", app.address)))
        .await
        .assert_problem(404, "route_not_found");
    app.send(app.client.get(format!("{}{deposits}", app.address)))
        .await
        .assert_problem(405, "method_not_allowed");

    assert_eq!(
        app.event_count().await,
        before,
        "a rejected request wrote events"
    );
    assert_eq!(app.balance_from_events(id).await, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_is_configurable() {
    let app = spawn_app_with(&["--max-body-bytes", "64"]).await;
    let answer = app
        .post(
            "/v1/accounts",
            &json!({"owner": "o".repeat(100), "currency": "EUR"}),
            None,
        )
        .await;
    answer.assert_problem(413, "payload_too_large");
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bodies_never_cause_a_5xx_or_a_write() {
    let app = spawn_app().await;
    let id = app.new_account().await;
    let before = app.event_count().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1ed6e7);
    let paths = [
        "/v1/accounts".to_owned(),
        format!("/v1/accounts/{id}/deposits"),
        format!("/v1/accounts/{id}/withdrawals"),
    ];
    let fragments: [&[u8]; 12] = [
        b"{",
        b"}",
        b"\"amount\":",
        b"\"currency\":\"EUR\"",
        b",",
        b"-1",
        b"1e999",
        b"null",
        b"\"owner\":",
        b"[",
        b"\"\\u0000\"",
        b"99999999999999999999",
    ];
    for round in 0..300 {
        let body: Vec<u8> = if round % 2 == 0 {
            (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect()
        } else {
            (0..rng.gen_range(1..10))
                .flat_map(|_| fragments[rng.gen_range(0..fragments.len())].to_vec())
                .collect()
        };
        let path = &paths[round % paths.len()];
        let answer = raw(&app, path, Some("application/json"), body.clone()).await;
        assert!(
            (400..500).contains(&answer.status),
            "body {:?} to {path} got {}: {}",
            String::from_utf8_lossy(&body),
            answer.status,
            answer.text
        );
        assert_eq!(answer.content_type(), "application/problem+json");
    }
    assert_eq!(app.event_count().await, before);
}
