//! Production readiness across the real processes: API keys with scopes, rate limits,
//! Prometheus metrics on every process, the request id followed from a command into the
//! projector's log, OpenAPI documents.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ledger_e2e::broker::Broker;
use ledger_e2e::eventually;
use ledger_e2e::services::{admin, migrated_database, CommandApi, Projector, QueryApi, Relay};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(60);

/// Creates a key with `scopes` through the operator CLI; returns (id, key).
async fn key(url: &str, name: &str, scopes: &str) -> (String, String) {
    let run = admin(
        url,
        &[
            "--json", "keys", "create", "--name", name, "--scope", scopes,
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let created = run.json();
    (
        created["id"].as_str().unwrap().to_owned(),
        created["key"].as_str().unwrap().to_owned(),
    )
}

/// A command API requiring keys, with a small rate limit.
async fn command_with_keys(url: &str) -> CommandApi {
    CommandApi::start_with(
        url,
        &[
            ("AUTH_MODE", "api-keys"),
            ("RATE_LIMIT_PER_SECOND", "1"),
            ("RATE_LIMIT_BURST", "5"),
        ],
    )
    .await
}

async fn send(request: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

fn assert_problem(answer: &(u16, reqwest::header::HeaderMap, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.2);
    assert_eq!(
        answer.1["content-type"], "application/problem+json",
        "{}",
        answer.2
    );
    assert_eq!(answer.2["code"], code, "{}", answer.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_gate_every_api_by_scope_and_are_never_logged() {
    let url = migrated_database().await;
    let (_, writer) = key(&url, "writer", "write").await;
    let (reader_id, reader) = key(&url, "reader", "read").await;
    let (_, operator) = key(&url, "operator", "admin").await;
    let mut command = command_with_keys(&url).await;
    let base = command.base.clone();
    let query = QueryApi::start(&url, &[("AUTH_MODE", "api-keys")]).await;
    let projector = Projector::start(&url, None, &[]).await;
    let client = reqwest::Client::new();
    let open = || {
        client
            .post(format!("{base}/v1/accounts"))
            .json(&json!({"owner": "k", "currency": "EUR"}))
    };

    // Command API: no key, an unknown key, a key without `write`.
    let none = send(open()).await;
    assert_problem(&none, 401, "unauthenticated");
    assert_eq!(none.1["www-authenticate"], "Bearer");
    assert_problem(
        &send(open().bearer_auth("lk_000000000000_00000000000000000000000000000000")).await,
        401,
        "unauthenticated",
    );
    assert_problem(&send(open().bearer_auth(&reader)).await, 403, "forbidden");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(events, 0, "refused requests wrote nothing");
    let opened = send(open().bearer_auth(&writer)).await;
    assert_eq!(opened.0, 201, "{}", opened.2);
    assert!(opened.1.contains_key("ratelimit-remaining"));
    let account = opened.2["account_id"].as_str().unwrap().to_owned();

    // Query API: `read` reads, `write` does not.
    let path = format!("/v1/accounts/{account}?position={}", opened.2["position"]);
    let read = |key: &str| {
        query
            .client
            .get(format!("{}{path}", query.base))
            .bearer_auth(key)
    };
    assert_problem(&send(read(&writer)).await, 403, "forbidden");
    let answer = send(read(&reader)).await;
    assert_eq!(answer.0, 200, "{}", answer.2);
    assert_problem(
        &send(query.client.get(format!("{}{path}", query.base))).await,
        401,
        "unauthenticated",
    );

    // Admin API: only `admin`.
    let projections = format!("{}/admin/projections", projector.base);
    assert_problem(
        &send(client.get(&projections).bearer_auth(&reader)).await,
        403,
        "forbidden",
    );
    assert_eq!(
        send(client.get(&projections).bearer_auth(&operator))
            .await
            .0,
        200
    );

    // A revoked key stops working (within the verification cache's few seconds).
    let revoked = admin(&url, &["keys", "revoke", &reader_id]).await;
    assert_eq!(revoked.code, 0, "{revoked:?}");
    let reader_ref = &reader;
    let read = &read;
    eventually(
        Duration::from_secs(15),
        "the revoked key refused",
        || async move {
            let status = send(read(reader_ref)).await.0;
            (status == 401).then_some(()).ok_or(status.to_string())
        },
    )
    .await;

    // Only hashes are stored, and no key appears in any log line.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE key_hash IN ($1, $2, $3)")
            .bind(&writer)
            .bind(&reader)
            .bind(&operator)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(stored, 0);
    command.process.signal(nix::sys::signal::Signal::SIGTERM);
    command.process.exit_code(DEADLINE).await;
    let logs = command.process.drain().await.join("\n");
    assert!(logs.contains("request handled"), "the log is there");
    for secret in [&writer, &reader, &operator] {
        let tail = &secret[secret.len() - 32..];
        assert!(!logs.contains(tail), "a key leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_with_retry_after_and_nothing_is_done() {
    let url = migrated_database().await;
    let (_, writer) = key(&url, "busy", "write").await;
    let command = command_with_keys(&url).await;
    let base = command.base.clone();
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..8 {
        let answer = send(
            client
                .post(format!("{base}/v1/accounts"))
                .bearer_auth(&writer)
                .json(&json!({"owner": "r", "currency": "EUR"})),
        )
        .await;
        statuses.push(answer.0);
        if answer.0 == 429 {
            limited.get_or_insert(answer);
        }
    }
    // A burst of 5, refilled at 1 per second: the 8 quick requests cannot all pass.
    let accepted = statuses.iter().filter(|s| **s == 201).count();
    assert!((5..=6).contains(&accepted), "{statuses:?}");
    let limited = limited.expect("some request was limited");
    assert_problem(&limited, 429, "rate_limited");
    let retry_after: u64 = limited.1["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(limited.1["ratelimit-remaining"], "0");
    assert_eq!(limited.1["ratelimit-limit"], "5");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let opened: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'account'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        usize::try_from(opened).unwrap(),
        accepted,
        "429s wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_and_the_request_id_reaches_the_projectors_log() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let relay = Relay::start(&url, &broker.address, &[]).await;
    relay
        .wait_status("leader", DEADLINE, |s| s["leader"] == true)
        .await;
    let mut projector = Projector::start(
        &url,
        Some(&broker.address),
        &[("RUST_LOG", "info,ledger_projector=debug")],
    )
    .await;
    let query = QueryApi::start(&url, &[]).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let request_id = format!("follow-me-{}", uuid::Uuid::new_v4().simple());
    let opened = send(
        api.client
            .post(format!("{}/v1/accounts", api.base))
            .header("x-request-id", &request_id)
            .header("traceparent", traceparent)
            .json(&json!({"owner": "m", "currency": "EUR"})),
    )
    .await;
    assert_eq!(opened.0, 201);
    assert_eq!(opened.1["x-request-id"], request_id.as_str());
    // Command → event metadata → Kafka headers → the projector's log line.
    let line = projector.process.wait_for_line(&request_id, DEADLINE).await;
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["traceparent"], traceparent, "{line}");
    let account = opened.2["account_id"].as_str().unwrap();
    let read = query
        .get(&format!(
            "/v1/accounts/{account}?position={}",
            opened.2["position"]
        ))
        .await;
    assert_eq!(read.0, 200);
    let _ = query.get(&format!("/v1/accounts/{account}")).await;

    let scrape = |base: String| async move {
        let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    };
    let command_metrics = scrape(api.base.clone()).await;
    for needle in [
        "http_requests_total{method=\"POST\",route=\"/v1/accounts\",status=\"201\"}",
        "http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/accounts\"",
        "ledger_events_appended_total{aggregate_type=\"account\"} 1",
    ] {
        assert!(
            command_metrics.contains(needle),
            "{needle} in\n{command_metrics}"
        );
    }
    let query_metrics = scrape(query.base.clone()).await;
    for needle in [
        "route=\"/v1/accounts/{account_id}\"",
        "ledger_query_cache_hits_total",
        "ledger_query_cache_misses_total",
    ] {
        assert!(
            query_metrics.contains(needle),
            "{needle} in\n{query_metrics}"
        );
    }
    let relay_metrics = scrape(relay.base.clone()).await;
    for needle in [
        "ledger_relay_lag_events",
        "ledger_relay_lag_seconds",
        "ledger_relay_leader 1",
    ] {
        assert!(
            relay_metrics.contains(needle),
            "{needle} in\n{relay_metrics}"
        );
    }
    let projector_metrics = scrape(projector.base.clone()).await;
    for needle in [
        "ledger_projector_partition_lag_events{partition=\"0\"}",
        "ledger_projector_lag_events{projection=\"account_summary\"}",
        "ledger_projector_dead_letters{projection=\"account_summary\"} 0",
        "ledger_projector_applied_total",
    ] {
        assert!(
            projector_metrics.contains(needle),
            "{needle} in\n{projector_metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_otlp_endpoint_configured_spans_are_exported_in_the_callers_trace() {
    // A stand-in OpenTelemetry collector: records every OTLP/HTTP export it receives.
    let received = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let store = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                store.lock().await.push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let url = migrated_database().await;
    let command = CommandApi::start_with(
        &url,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = send(
        reqwest::Client::new()
            .post(format!("{}/v1/accounts", command.base))
            .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
            .json(&json!({"owner": "o", "currency": "EUR"})),
    )
    .await;
    assert_eq!(answer.0, 201, "{}", answer.2);
    // The export carries the service's name and the caller's trace id (binary, 16 bytes).
    let wanted = hex::decode(trace_id).unwrap();
    let received = &received;
    let wanted = &wanted;
    eventually(
        DEADLINE,
        "a span of the caller's trace exported",
        || async move {
            let exports = received.lock().await;
            let found = exports.iter().any(|body| {
                body.windows(wanted.len()).any(|w| w == wanted.as_slice())
                    && body.windows(14).any(|w| w == b"ledger-command")
            });
            found
                .then_some(())
                .ok_or_else(|| format!("{} exports", exports.len()))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_stops_relay_projector_and_query_cleanly_and_loses_nothing() {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let mut relay = Relay::start(&url, &broker.address, &[]).await;
    relay
        .wait_status("leader", DEADLINE, |s| s["leader"] == true)
        .await;
    let mut projector = Projector::start(&url, Some(&broker.address), &[]).await;
    let mut query = QueryApi::start(&url, &[]).await;
    let account = api.open_account().await;

    // Writers and readers keep going while the three processes are told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, client, base, account) = (
            stop.clone(),
            api.client.clone(),
            api.base.clone(),
            account.clone(),
        );
        tokio::spawn(async move {
            let mut acknowledged = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = client
                    .post(format!("{base}/v1/accounts/{account}/deposits"))
                    .json(&json!({"amount": 1, "currency": "EUR"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                acknowledged += 1;
            }
            acknowledged
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, client, base, account) = (
                stop.clone(),
                query.client.clone(),
                query.base.clone(),
                account.clone(),
            );
            tokio::spawn(async move {
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match client
                        .get(format!("{base}/v1/accounts/{account}"))
                        .send()
                        .await
                    {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            assert!(status < 500, "a reader got {status} during shutdown");
                            answered += 1;
                        }
                        // No answer at all: the listener is closed or an idle keep-alive
                        // connection was closed as the request went out (not a request the
                        // server had taken): the process is going away, stop reading.
                        Err(_) => break,
                    }
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for process in [&relay.process, &projector.process, &query.process] {
        process.signal(nix::sys::signal::Signal::SIGTERM);
    }
    for (name, process) in [
        ("relay", &mut relay.process),
        ("projector", &mut projector.process),
        ("query", &mut query.process),
    ] {
        assert_eq!(
            process.exit_code(Duration::from_secs(40)).await,
            0,
            "{name}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged = writer.await.unwrap();
    for reader in readers {
        reader.await.unwrap();
    }
    // Restarted, they pick up where their checkpoints and committed offsets say: every
    // acknowledged deposit is in the balance, once.
    let _relay = Relay::start(&url, &broker.address, &[]).await;
    let _projector = Projector::start(&url, Some(&broker.address), &[]).await;
    ledger_e2e::services::wait_until_projected(&url, Duration::from_secs(120)).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let balance: i64 =
        sqlx::query_scalar("SELECT balance FROM account_summaries WHERE account_id = $1")
            .bind(&account)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(balance, acknowledged, "every acknowledged deposit, once");
}
