//! `spawn_app()`, fresh databases, named request helpers.

use std::time::Duration;

use ledger_command::config::Cli;
use ledger_command::startup::Application;
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use uuid::Uuid;

pub use ledger_platform::testing::fresh_database;

pub use ledger_pii::testing::{test_keyring, TEST_KEK};

/// A running command API on a random port over its own database.
pub struct TestApp {
    pub address: String,
    pub pool: PgPool,
    pub database_url: String,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Settings for a test app over `database_url`, with extra `--flag value` pairs.
pub fn settings(database_url: &str, extra: &[&str]) -> ledger_command::config::Settings {
    let mut args = vec![
        "ledger-command",
        "--database-url",
        database_url,
        "--listen-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    // API keys have their own tests; the others run without.
    if !extra.contains(&"--auth-mode") {
        args.extend_from_slice(&["--auth-mode", "disabled"]);
    }
    // Tests run in parallel against one server: keep each app's share of connections small.
    if !extra.contains(&"--database-max-connections") {
        args.extend_from_slice(&["--database-max-connections", "8"]);
    }
    let cli: Cli = ledger_platform::config::try_parse_from(args).expect("test settings parse");
    cli.settings
}

/// A command API on a fresh database with default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// A command API on a fresh database, with extra settings (`["--snapshot-every", "5"]`).
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    let (url, pool) = fresh_database().await;
    spawn_app_on(&url, pool, extra).await
}

/// Another command API instance over an existing database (a second replica).
pub async fn spawn_app_on(database_url: &str, pool: PgPool, extra: &[&str]) -> TestApp {
    spawn_app_with_keyring(database_url, pool, extra, test_keyring()).await
}

/// [`spawn_app_on`] with its own keyring (`PII_KEK`, `PII_KEK_PREVIOUS`): a replica after a
/// KEK rotation.
pub async fn spawn_app_with_keyring(
    database_url: &str,
    pool: PgPool,
    extra: &[&str],
    keyring: ledger_pii::Keyring,
) -> TestApp {
    let settings = settings(database_url, extra);
    let app_pool = PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .connect_with(settings.database_url.0.clone())
        .await
        .expect("app pool");
    let app = Application::with_pool(&settings, app_pool, keyring)
        .await
        .expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        pool,
        database_url: database_url.to_owned(),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client"),
        stop: Some(stop),
        server: Some(server),
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// A decoded answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn subject_id(&self) -> Uuid {
        Uuid::parse_str(
            self.body["subject_id"]
                .as_str()
                .expect("subject_id in body"),
        )
        .expect("subject_id is a uuid")
    }

    pub fn account_id(&self) -> Uuid {
        Uuid::parse_str(
            self.body["account_id"]
                .as_str()
                .expect("account_id in body"),
        )
        .expect("account_id is a uuid")
    }

    /// Asserts an RFC 9457 problem answer with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status of {}", self.text);
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "{}",
            self.text
        );
        assert_eq!(self.code(), code, "{}", self.text);
        assert_eq!(self.body["status"], json!(status));
        assert_eq!(
            self.body["type"],
            json!(format!("urn:ledger:problem:{code}"))
        );
        assert!(self.body["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(self.body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    }
}

impl TestApp {
    /// POSTs a JSON body with optional Idempotency-Key.
    pub async fn post(&self, path: &str, body: &Value, key: Option<&str>) -> Answer {
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        answer(request.send().await.expect("request sent")).await
    }

    /// POSTs a JSON body as the client holding API key `token`, with optional Idempotency-Key.
    pub async fn post_as(
        &self,
        token: &str,
        path: &str,
        body: &Value,
        key: Option<&str>,
    ) -> Answer {
        let mut request = self
            .client
            .post(format!("{}{path}", self.address))
            .bearer_auth(token)
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        answer(request.send().await.expect("request sent")).await
    }

    /// Sends a raw request.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        answer(request.send().await.expect("request sent")).await
    }

    /// Opens an account the deprecated way: by the holder's name (`owner`).
    pub async fn open_account(&self, owner: &str, currency: &str) -> Answer {
        self.post(
            "/v1/accounts",
            &json!({"owner": owner, "currency": currency}),
            None,
        )
        .await
    }

    /// `POST /v1/subjects`.
    pub async fn register_subject(&self, name: &str, key: Option<&str>) -> Answer {
        self.post("/v1/subjects", &json!({"name": name}), key).await
    }

    /// Registers a subject named `name` and returns its id.
    pub async fn new_subject(&self, name: &str) -> Uuid {
        let answer = self.register_subject(name, None).await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        answer.subject_id()
    }

    /// `POST /v1/subjects/{id}/erasure`.
    pub async fn erase_subject(&self, subject: Uuid, key: Option<&str>) -> Answer {
        self.post(
            &format!("/v1/subjects/{subject}/erasure"),
            &Value::Null,
            key,
        )
        .await
    }

    /// Opens an account for `subject`.
    pub async fn open_account_for(&self, subject: Uuid, currency: &str) -> Answer {
        self.post(
            "/v1/accounts",
            &json!({"subject_id": subject, "currency": currency}),
            None,
        )
        .await
    }

    /// Opens an EUR account for a new subject and returns its id.
    pub async fn new_account(&self) -> Uuid {
        let subject = self.new_subject("alice").await;
        let answer = self.open_account_for(subject, "EUR").await;
        assert_eq!(answer.status, 201, "{}", answer.text);
        answer.account_id()
    }

    /// A deposit with a reference.
    pub async fn deposit_with_reference(
        &self,
        account: Uuid,
        amount: i64,
        reference: &str,
        key: Option<&str>,
    ) -> Answer {
        self.post(
            &format!("/v1/accounts/{account}/deposits"),
            &json!({"amount": amount, "currency": "EUR", "reference": reference}),
            key,
        )
        .await
    }

    pub async fn deposit(&self, account: Uuid, amount: i64, key: Option<&str>) -> Answer {
        self.post(
            &format!("/v1/accounts/{account}/deposits"),
            &json!({"amount": amount, "currency": "EUR"}),
            key,
        )
        .await
    }

    pub async fn withdraw(&self, account: Uuid, amount: i64, key: Option<&str>) -> Answer {
        self.post(
            &format!("/v1/accounts/{account}/withdrawals"),
            &json!({"amount": amount, "currency": "EUR"}),
            key,
        )
        .await
    }

    /// Sends a deposit in a task of its own, for tests that block it in the database and
    /// watch it wait.
    pub fn spawn_deposit(&self, account: Uuid, amount: i64) -> tokio::task::JoinHandle<Answer> {
        let request = self
            .client
            .post(format!("{}/v1/accounts/{account}/deposits", self.address))
            .json(&json!({"amount": amount, "currency": "EUR"}));
        tokio::spawn(async move { answer(request.send().await.expect("request sent")).await })
    }

    /// Sends a withdrawal in a task of its own (see [`Self::spawn_deposit`]).
    pub fn spawn_withdraw(&self, account: Uuid, amount: i64) -> tokio::task::JoinHandle<Answer> {
        let request = self
            .client
            .post(format!(
                "{}/v1/accounts/{account}/withdrawals",
                self.address
            ))
            .json(&json!({"amount": amount, "currency": "EUR"}));
        tokio::spawn(async move { answer(request.send().await.expect("request sent")).await })
    }

    pub async fn close(&self, account: Uuid, key: Option<&str>) -> Answer {
        self.post(&format!("/v1/accounts/{account}/close"), &Value::Null, key)
            .await
    }

    /// Number of account events in the store (opening an account by `owner` also
    /// registers a data subject, whose event this does not count).
    pub async fn account_event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'account'")
            .fetch_one(&self.pool)
            .await
            .expect("count events")
    }

    /// Number of events in the store.
    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .expect("count events")
    }

    /// The events of one account: (sequence, event_type, payload, metadata), in order.
    pub async fn events_of(&self, account: Uuid) -> Vec<(i64, String, Value, Value)> {
        sqlx::query_as(
            "SELECT sequence, event_type, payload::jsonb, metadata::jsonb FROM events
              WHERE aggregate_type = 'account' AND aggregate_id = $1 ORDER BY sequence",
        )
        .bind(account.to_string())
        .fetch_all(&self.pool)
        .await
        .expect("read events")
    }

    /// The balance of an account computed from its events, asserting it never went negative.
    pub async fn balance_from_events(&self, account: Uuid) -> i64 {
        let mut balance = 0i64;
        for (sequence, event_type, payload, _) in self.events_of(account).await {
            let amount = payload["amount"].as_i64().unwrap_or(0);
            match event_type.as_str() {
                "MoneyDeposited" => balance += amount,
                "MoneyWithdrawn" => balance -= amount,
                _ => {}
            }
            assert!(balance >= 0, "balance negative after sequence {sequence}");
        }
        balance
    }
}

async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body read");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

/// Waits until `condition` holds, polling, or panics after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !condition().await {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
