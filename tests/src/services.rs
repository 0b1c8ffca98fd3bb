//! The ledger's processes with test settings.

use std::time::Duration;

use serde_json::{json, Value};

use crate::process::{binary, free_port, wait_until_ready, Process};

/// Starts `binary` listening on a free port given in `listen_var`, with `env` overridden by
/// `extra` (nothing inherited), and waits until `ready_path` answers 200. Returns the
/// process and its base URL.
async fn launch(
    binary_name: &str,
    listen_var: &str,
    env: &[(&str, &str)],
    extra: &[(&str, &str)],
    ready_path: &str,
) -> (Process, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut all: Vec<(&str, &str)> = env.to_vec();
    all.push((listen_var, addr.as_str()));
    for (key, value) in extra {
        all.retain(|(k, _)| k != key);
        all.push((key, value));
    }
    let process = Process::start_clean(&binary(binary_name), &[], &all);
    let base = format!("http://{addr}");
    wait_until_ready(&format!("{base}{ready_path}"), Duration::from_secs(30)).await;
    (process, base)
}

/// A migrated database for the processes; returns its URL.
pub async fn migrated_database() -> String {
    let (url, pool) = crate::fresh_database().await;
    pool.close().await;
    url
}

/// A running command API.
#[derive(Debug)]
pub struct CommandApi {
    pub process: Process,
    pub base: String,
    pub client: reqwest::Client,
    /// The data subject [`CommandApi::open_account`] opens accounts for, registered on first
    /// use.
    subject: tokio::sync::OnceCell<String>,
}

impl CommandApi {
    /// Starts `ledger-command` over `database_url`; returns once it is ready.
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(database_url, &[]).await
    }

    /// Like [`CommandApi::start`], with `extra` environment (e.g. `AUTH_MODE`).
    pub async fn start_with(database_url: &str, extra: &[(&str, &str)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut env = vec![
            ("DATABASE_URL", database_url),
            ("COMMAND_LISTEN_ADDR", addr.as_str()),
        ];
        env.extend_from_slice(extra);
        let process = Process::start(&binary("ledger-command"), &[], &env);
        let base = format!("http://{addr}");
        wait_until_ready(&format!("{base}/readyz"), Duration::from_secs(30)).await;
        Self {
            process,
            base,
            client: reqwest::Client::new(),
            subject: tokio::sync::OnceCell::new(),
        }
    }

    /// Registers a data subject named `name`; returns its id.
    pub async fn register_subject(&self, name: &str) -> String {
        let response = self
            .client
            .post(format!("{}/v1/subjects", self.base))
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.unwrap();
        answer["subject_id"].as_str().unwrap().to_owned()
    }

    /// The subject every [`CommandApi::open_account`] of this API opens for (named `e2e`).
    pub async fn subject(&self) -> String {
        self.subject
            .get_or_init(|| self.register_subject("e2e"))
            .await
            .clone()
    }

    /// Opens an EUR account for [`CommandApi::subject`]; returns its id.
    pub async fn open_account(&self) -> String {
        let subject = self.subject().await;
        let response = self
            .client
            .post(format!("{}/v1/accounts", self.base))
            .json(&json!({"subject_id": subject, "currency": "EUR"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.unwrap();
        answer["account_id"].as_str().unwrap().to_owned()
    }

    /// Deposits; panics unless answered 200.
    pub async fn deposit(&self, account: &str, amount: i64) -> Value {
        let response = self
            .client
            .post(format!("{}/v1/accounts/{account}/deposits", self.base))
            .json(&json!({"amount": amount, "currency": "EUR"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    pub process: Process,
    pub base: String,
}

/// The name that keeps one test's Kafka topic and consumer groups apart from the others' on
/// the shared broker: the test's database name (each test has a database of its own).
fn test_name(database_url: &str) -> &str {
    database_url
        .rsplit('/')
        .next()
        .and_then(|name| name.split('?').next())
        .unwrap_or("ledger")
}

/// The topic the test's relay publishes to and its projectors consume.
pub fn topic(database_url: &str) -> String {
    format!("ledger.events.{}", test_name(database_url))
}

/// The test's projector consumer group (`KAFKA_GROUP_ID`).
pub fn projector_group(database_url: &str) -> String {
    format!("ledger-projector.{}", test_name(database_url))
}

/// The test's transfer process manager consumer group (`TRANSFERS_GROUP_ID`).
pub fn transfers_group(database_url: &str) -> String {
    format!("ledger-transfers.{}", test_name(database_url))
}

impl Relay {
    /// Starts `ledger-relay` with test settings plus `extra` environment.
    pub async fn start(database_url: &str, brokers: &str, extra: &[(&str, &str)]) -> Self {
        let topic = topic(database_url);
        let env = [
            ("DATABASE_URL", database_url),
            ("KAFKA_BROKERS", brokers),
            ("KAFKA_TOPIC", topic.as_str()),
            ("RELAY_POLL_INTERVAL", "100ms"),
            ("RELAY_STANDBY_INTERVAL", "200ms"),
            ("KAFKA_MESSAGE_TIMEOUT", "5s"),
        ];
        let (process, base) =
            launch("ledger-relay", "RELAY_LISTEN_ADDR", &env, extra, "/healthz").await;
        Self { process, base }
    }

    /// The `/status` document.
    pub async fn status(&self) -> Value {
        reqwest::get(format!("{}/status", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `/status` satisfies `condition`.
    pub async fn wait_status(
        &self,
        what: &str,
        deadline: Duration,
        condition: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Ok(response) = reqwest::get(format!("{}/status", self.base)).await {
                if let Ok(status) = response.json::<Value>().await {
                    if condition(&status) {
                        return status;
                    }
                }
            }
            assert!(start.elapsed() < deadline, "relay never reached: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A running projector.
#[derive(Debug)]
pub struct Projector {
    pub process: Process,
    pub base: String,
}

impl Projector {
    /// Starts `ledger-projector` over `database_url`, consuming `brokers` when given (else
    /// reading the store directly), plus `extra` environment.
    pub async fn start(database_url: &str, brokers: Option<&str>, extra: &[(&str, &str)]) -> Self {
        let (topic, group, transfers) = (
            topic(database_url),
            projector_group(database_url),
            transfers_group(database_url),
        );
        let mut env = vec![
            ("DATABASE_URL", database_url),
            ("KAFKA_TOPIC", topic.as_str()),
            ("KAFKA_GROUP_ID", group.as_str()),
            ("TRANSFERS_GROUP_ID", transfers.as_str()),
            ("PROJECTOR_POLL_INTERVAL", "100ms"),
        ];
        if let Some(brokers) = brokers {
            env.push(("KAFKA_BROKERS", brokers));
        }
        let (process, base) = launch(
            "ledger-projector",
            "PROJECTOR_LISTEN_ADDR",
            &env,
            extra,
            "/healthz",
        )
        .await;
        Self { process, base }
    }

    /// The `/status` document.
    pub async fn status(&self) -> Value {
        reqwest::get(format!("{}/status", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A running query API.
#[derive(Debug)]
pub struct QueryApi {
    pub process: Process,
    pub base: String,
    pub client: reqwest::Client,
}

impl QueryApi {
    /// Starts `ledger-query` over `database_url`.
    pub async fn start(database_url: &str, extra: &[(&str, &str)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut env = vec![
            ("DATABASE_URL", database_url),
            ("QUERY_LISTEN_ADDR", addr.as_str()),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key, value));
        }
        let process = Process::start_clean(&binary("ledger-query"), &[], &env);
        let base = format!("http://{addr}");
        wait_until_ready(&format!("{base}/readyz"), Duration::from_secs(30)).await;
        Self {
            process,
            base,
            client: reqwest::Client::new(),
        }
    }

    /// GETs `path`; returns status, headers and JSON body.
    pub async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }
}

/// Every balance computed from the store's events, by account id.
pub async fn balances_from_events(database_url: &str) -> std::collections::BTreeMap<String, i64> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id,
                coalesce(sum(CASE WHEN event_type IN ('MoneyDeposited', 'TransferReceived',
                                                     'TransferRefunded')
                                  THEN (payload->>'amount')::bigint
                                  WHEN event_type IN ('MoneyWithdrawn', 'TransferSent')
                                  THEN -(payload->>'amount')::bigint
                                  ELSE 0 END), 0)::bigint
           FROM events WHERE aggregate_type = 'account' AND event_type IN
                ('AccountOpened', 'MoneyDeposited', 'MoneyWithdrawn', 'AccountClosed',
                 'TransferSent', 'TransferReceived', 'TransferRefunded', 'TransferSettled')
          GROUP BY aggregate_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// Every balance in the read model, by account id.
pub async fn balances_in_read_model(database_url: &str) -> std::collections::BTreeMap<String, i64> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, balance FROM account_summaries")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// Waits until the read model's balances equal the ones computed from the events.
pub async fn wait_until_projected(database_url: &str, deadline: Duration) {
    if let Err(why) = try_until_projected(database_url, deadline).await {
        panic!("{why}");
    }
}

/// Like [`wait_until_projected`], returning why not instead of panicking.
pub async fn try_until_projected(database_url: &str, deadline: Duration) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        let expected = balances_from_events(database_url).await;
        let actual = balances_in_read_model(database_url).await;
        if expected == actual {
            return Ok(());
        }
        if start.elapsed() >= deadline {
            return Err(format!(
                "read model never matched the events: expected {expected:?}, projected {actual:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `ledger-admin` printed.
#[derive(Debug)]
pub struct AdminRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl AdminRun {
    /// stdout as JSON (for `--json` runs).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| {
            panic!("not JSON ({err}): {}\nstderr: {}", self.stdout, self.stderr)
        })
    }
}

/// Runs `ledger-admin` with `args` against `database_url`, to completion.
pub async fn admin(database_url: &str, args: &[&str]) -> AdminRun {
    admin_with(database_url, &[], args).await
}

/// Like [`admin`], with more environment (e.g. `KAFKA_BROKERS`).
pub async fn admin_with(database_url: &str, env: &[(&str, &str)], args: &[&str]) -> AdminRun {
    let output = tokio::process::Command::new(binary("ledger-admin"))
        .args(args)
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("USER", "tester")
        .env(
            ledger_pii::keyring::CURRENT_SETTING,
            crate::process::TEST_KEK,
        )
        .envs(env.iter().copied())
        .output()
        .await
        .expect("ledger-admin runs");
    AdminRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Seeds `accounts` accounts with `deposits` deposits of 1 each straight into the store,
/// one transaction per account; returns the account ids.
pub async fn seed(database_url: &str, accounts: usize, deposits: i64) -> Vec<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
    let mut ids = Vec::with_capacity(accounts);
    for n in 0..accounts {
        let id = format!("seeded-{n}-{}", uuid::Uuid::new_v4().simple());
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'account', $1, 1, 'AccountOpened', '1',
                    json_build_object('type','AccountOpened','owner','seed','currency','EUR'), '{}'::json
             UNION ALL
             SELECT 'account', $1, s, 'MoneyDeposited', '2',
                    json_build_object('type','MoneyDeposited','amount',1,'currency','EUR','reference',null), '{}'::json
               FROM generate_series(2, $2 + 1) s",
        )
        .bind(&id)
        .bind(deposits)
        .execute(&mut conn)
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

/// Extra environment for each process of a [`Stack`].
#[derive(Debug, Default, Clone, Copy)]
pub struct StackEnv<'a> {
    pub command: &'a [(&'a str, &'a str)],
    pub relay: &'a [(&'a str, &'a str)],
    pub projector: &'a [(&'a str, &'a str)],
    pub query: &'a [(&'a str, &'a str)],
}

/// The whole ledger over one fresh database and the run's shared broker: the command API,
/// a relay (leading, so the topic exists), a projector consuming the topic and the query
/// API.
#[derive(Debug)]
pub struct Stack {
    pub url: String,
    pub broker: crate::broker::Broker,
    pub api: CommandApi,
    pub relay: Relay,
    pub projector: Projector,
    pub query: QueryApi,
}

impl Stack {
    /// Starts every process with `env`; returns once the relay leads.
    pub async fn start(env: StackEnv<'_>) -> Self {
        let broker = crate::broker::Broker::shared().await;
        let url = migrated_database().await;
        let api = CommandApi::start_with(&url, env.command).await;
        let relay = Relay::start(&url, &broker.address, env.relay).await;
        // The relay creates the topic; the projector subscribes to it.
        relay
            .wait_status("leader", Duration::from_secs(90), |s| s["leader"] == true)
            .await;
        let projector = Projector::start(&url, Some(&broker.address), env.projector).await;
        let query = QueryApi::start(&url, env.query).await;
        Self {
            url,
            broker,
            api,
            relay,
            projector,
            query,
        }
    }
}
