//! The real `ledger-command` binary: migrations, configuration errors, logs, and graceful
//! shutdown under load.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::future::join_all;
use ledger_e2e::{binary, empty_database, free_port, wait_until_ready, Process};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sqlx::Connection;

fn command_binary() -> std::path::PathBuf {
    binary("ledger-command")
}

async fn migrated_database() -> String {
    let url = empty_database().await;
    let mut migrate = Process::start(&command_binary(), &["migrate"], &[("DATABASE_URL", &url)]);
    assert_eq!(
        migrate.exit_code(Duration::from_secs(60)).await,
        0,
        "{:?}",
        migrate.drain().await
    );
    url
}

#[tokio::test]
async fn concurrent_migrate_runs_apply_each_migration_once() {
    let url = empty_database().await;
    let mut runs: Vec<Process> = (0..3)
        .map(|_| Process::start(&command_binary(), &["migrate"], &[("DATABASE_URL", &url)]))
        .collect();
    for run in &mut runs {
        assert_eq!(
            run.exit_code(Duration::from_secs(60)).await,
            0,
            "{:?}",
            run.drain().await
        );
    }
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let applied: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT version, count(*) FROM _sqlx_migrations GROUP BY version ORDER BY version",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(applied.len() >= 2, "{applied:?}");
    assert!(applied.iter().all(|(_, n)| *n == 1), "{applied:?}");
}

#[tokio::test]
async fn serve_refuses_an_unmigrated_database_and_says_so() {
    let url = empty_database().await;
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Process::start(
        &command_binary(),
        &[],
        &[("DATABASE_URL", &url), ("COMMAND_LISTEN_ADDR", &addr)],
    );
    assert_ne!(server.exit_code(Duration::from_secs(30)).await, 0);
    let logs = server.drain().await.join("\n");
    assert!(logs.contains("migrate"), "{logs}");
}

#[tokio::test]
async fn bad_configuration_stops_start_up_with_the_variable_named() {
    let cases = [
        ("DATABASE_MAX_CONNECTIONS", "lots"),
        ("COMMAND_LISTEN_ADDR", "everywhere:80"),
        ("IDEMPOTENCY_RETENTION", "forever"),
        ("SNAPSHOT_EVERY", "0"),
        ("DATABASE_URL", "mysql://root@localhost/db"),
    ];
    for (variable, value) in cases {
        let mut env = vec![(
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )];
        env.retain(|(k, _)| *k != variable);
        env.push((variable, value));
        let mut process = Process::start_clean(&command_binary(), &[], &env);
        assert_eq!(
            process.exit_code(Duration::from_secs(10)).await,
            2,
            "{variable}"
        );
        let output = process.drain().await.join("\n");
        assert!(
            output.contains(&format!("configuration error: {variable}=")),
            "{variable}: {output}"
        );
        assert!(!output.contains("root@"), "the URL leaked: {output}");
    }
    // A missing required variable (nothing inherited from the test's environment).
    let mut process = Process::start_clean(&command_binary(), &[], &[]);
    assert_eq!(process.exit_code(Duration::from_secs(10)).await, 2);
    let output = process.drain().await.join("\n");
    assert!(
        output.contains("missing required environment variable DATABASE_URL"),
        "{output}"
    );
}

#[tokio::test]
async fn sigterm_under_load_drains_in_flight_requests_and_loses_no_acknowledged_command() {
    let url = migrated_database().await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let base = format!("http://{addr}");
    let mut server = Process::start(
        &command_binary(),
        &[],
        &[("DATABASE_URL", &url), ("COMMAND_LISTEN_ADDR", &addr)],
    );
    wait_until_ready(&format!("{base}/readyz"), Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let opened: Value = client
        .post(format!("{base}/v1/accounts"))
        .json(&json!({"owner": "load", "currency": "EUR"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = opened["account_id"].as_str().unwrap().to_owned();

    // Clients keep depositing 1 until the server stops answering.
    let workers = (0..8).map(|_| {
        let client = client.clone();
        let url = format!("{base}/v1/accounts/{id}/deposits");
        tokio::spawn(async move {
            let mut acknowledged = 0i64;
            let mut server_errors = 0;
            for _ in 0..10_000 {
                match client
                    .post(&url)
                    .json(&json!({"amount": 1, "currency": "EUR"}))
                    .send()
                    .await
                {
                    Ok(response) if response.status().is_success() => acknowledged += 1,
                    Ok(response) if response.status().is_server_error() => server_errors += 1,
                    Ok(_) => {}
                    Err(_) => break, // connection refused/closed: the server has stopped
                }
            }
            (acknowledged, server_errors)
        })
    });
    let workers: Vec<_> = workers.collect();
    // Let load build up: wait until some deposits are committed.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if n > 50 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "load never built up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal(Signal::SIGTERM);
    assert_eq!(server.exit_code(Duration::from_secs(30)).await, 0);

    let results = join_all(workers).await;
    let acknowledged: i64 = results.iter().map(|r| r.as_ref().unwrap().0).sum();
    let server_errors: i64 = results.iter().map(|r| r.as_ref().unwrap().1).sum();
    assert_eq!(
        server_errors, 0,
        "in-flight clients got 5xx during shutdown"
    );
    let deposits: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MoneyDeposited'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    // Every acknowledged deposit is in the store; a deposit whose connection was cut after
    // commit may be there unacknowledged, so the store may hold more, never fewer.
    assert!(
        deposits >= acknowledged,
        "acknowledged {acknowledged}, stored {deposits}"
    );
    assert!(acknowledged > 50);
    let logs = server.drain().await.join("\n");
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(logs.contains("command API stopped"), "{logs}");
}

#[tokio::test]
async fn logs_are_json_lines_carrying_the_request_id() {
    let url = migrated_database().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{addr}");
    let mut server = Process::start(
        &command_binary(),
        &[],
        &[("DATABASE_URL", &url), ("COMMAND_LISTEN_ADDR", &addr)],
    );
    wait_until_ready(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/accounts"))
        .header("X-Request-Id", "trace-me-42")
        .json(&json!({"owner": "logs", "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let line = server
        .wait_for_line("trace-me-42", Duration::from_secs(10))
        .await;
    let parsed: Value = serde_json::from_str(&line).expect("log line is JSON");
    assert_eq!(parsed["span"]["request_id"], "trace-me-42", "{line}");
    assert!(parsed["timestamp"].is_string());
    assert!(parsed["level"].is_string());
    // The password never appears in logs.
    assert!(server.seen.iter().all(|l| !l.contains("DATABASE_URL=")));
}
