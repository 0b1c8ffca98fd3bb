//! Liveness and readiness.

use std::time::Duration;

use ledger_command::startup::Application;
use sqlx::postgres::PgPoolOptions;

use crate::helpers::{settings, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_200_when_postgres_is_up() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz"] {
        let answer = app
            .send(app.client.get(format!("{}{path}", app.address)))
            .await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_and_commands_are_503_when_postgres_is_unreachable() {
    // Nothing listens on port 1.
    let url = "postgres://postgres@127.0.0.1:1/nothing";
    let settings = settings(url, &["--database-acquire-timeout", "300ms"]);
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy_with(settings.database_url.0.clone());
    let app = Application::with_pool(&settings, pool, crate::helpers::test_keyring())
        .await
        .unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let server = tokio::spawn(app.run_until_stopped(std::future::pending()));
    let client = reqwest::Client::new();

    let live = client
        .get(format!("{address}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let ready = client
        .get(format!("{address}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.headers()["content-type"], "application/problem+json");

    let command = client
        .post(format!("{address}/v1/accounts"))
        .json(&serde_json::json!({"owner": "a", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(command.status(), 503);
    assert_eq!(command.headers()["retry-after"], "1");
    let body: serde_json::Value = command.json().await.unwrap();
    assert_eq!(body["code"], "service_unavailable");
    server.abort();
}
