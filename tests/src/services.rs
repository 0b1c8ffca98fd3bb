//! The ledger's processes with test settings.

use std::time::Duration;

use serde_json::{json, Value};

use crate::process::{binary, free_port, wait_until_ready, Process};

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
}

impl CommandApi {
    /// Starts `ledger-command` over `database_url`; returns once it is ready.
    pub async fn start(database_url: &str) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let process = Process::start(
            &binary("ledger-command"),
            &[],
            &[
                ("DATABASE_URL", database_url),
                ("COMMAND_LISTEN_ADDR", &addr),
            ],
        );
        let base = format!("http://{addr}");
        wait_until_ready(&format!("{base}/readyz"), Duration::from_secs(30)).await;
        Self {
            process,
            base,
            client: reqwest::Client::new(),
        }
    }

    /// Opens an EUR account; returns its id.
    pub async fn open_account(&self) -> String {
        let answer: Value = self
            .client
            .post(format!("{}/v1/accounts", self.base))
            .json(&json!({"owner": "e2e", "currency": "EUR"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
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

/// The topic every test relay publishes to (each test has its own broker).
pub const TOPIC: &str = "ledger.events";

impl Relay {
    /// Starts `ledger-relay` with test settings plus `extra` environment.
    pub async fn start(database_url: &str, brokers: &str, extra: &[(&str, &str)]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut env = vec![
            ("DATABASE_URL", database_url),
            ("KAFKA_BROKERS", brokers),
            ("KAFKA_TOPIC", TOPIC),
            ("RELAY_LISTEN_ADDR", addr.as_str()),
            ("RELAY_POLL_INTERVAL", "100ms"),
            ("RELAY_STANDBY_INTERVAL", "200ms"),
            ("KAFKA_MESSAGE_TIMEOUT", "5s"),
        ];
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key, value));
        }
        let process = Process::start(&binary("ledger-relay"), &[], &env);
        let base = format!("http://{addr}");
        wait_until_ready(&format!("{base}/healthz"), Duration::from_secs(30)).await;
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
