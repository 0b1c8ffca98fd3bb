//! Defects an outside review found on the read side and at the HTTP edge, each shown against
//! the real processes: reads wait on the position of the model they read (not the
//! summary's), a rebuild reaches the query cache and the ETags, and hostile input (control
//! bytes in paths and queries, `-0`, a lower-case `bearer`, requests that are not valid
//! HTTP) is answered with a 4xx problem, never a 5xx or the wrong answer.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ledger_e2e::eventually;
use ledger_e2e::services::{admin, migrated_database, CommandApi, QueryApi};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(10);

/// Opens an EUR account for `owner` (the deprecated path, which registers a subject of that
/// name); returns its id, the position of its opening and its subject's id.
async fn open(api: &CommandApi, owner: &str) -> (String, i64, String) {
    let answer: Value = api
        .client
        .post(format!("{}/v1/accounts", api.base))
        .json(&json!({"owner": owner, "currency": "EUR"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        answer["account_id"].as_str().unwrap().to_owned(),
        answer["position"].as_i64().unwrap(),
        answer["subject_id"].as_str().unwrap().to_owned(),
    )
}

/// `ledger-admin replay PROJECTION --from FROM --to TO`, which must succeed.
async fn replay(url: &str, projection: &str, from: i64, to: i64) {
    let (from, to) = (from.to_string(), to.to_string());
    let run = admin(url, &["replay", projection, "--from", &from, "--to", &to]).await;
    assert_eq!(run.code, 0, "{run:?}");
}

/// `ledger-admin rebuild PROJECTION`, which must succeed.
async fn rebuild(url: &str, projection: &str) {
    let run = admin(url, &["--json", "rebuild", projection]).await;
    assert_eq!(run.code, 0, "{run:?}");
}

fn assert_behind(answer: &(u16, reqwest::header::HeaderMap, Value), current: i64, what: &str) {
    let (status, headers, body) = answer;
    assert_eq!(*status, 412, "{what}: {body}");
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "{what}"
    );
    assert_eq!(body["code"], "read_model_behind", "{what}: {body}");
    assert_eq!(body["current_position"], current, "{what}: {body}");
}

async fn event_count(url: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_read_waits_on_the_position_of_the_model_it_reads() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let query = QueryApi::start(&url, &[("READ_WAIT_TIMEOUT", "200ms")]).await;
    let (account, opened, subject) = open(&api, "ryw").await;
    let deposited = api.deposit(&account, 40).await["position"]
        .as_i64()
        .unwrap();

    // No projector runs: the operator's replays put the models at different positions, as a
    // summary-only replay, retry or rebuild does. The summary has the deposit; the statement
    // and the owner's totals stop at the opening.
    replay(&url, "account_summary", 1, deposited).await;
    replay(&url, "account_statement", 1, opened).await;
    replay(&url, "subject_totals", 1, opened).await;

    let (status, _, summary) = query
        .get(&format!("/v1/accounts/{account}?position={deposited}"))
        .await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["balance"], 40);
    let statement = query
        .get(&format!(
            "/v1/accounts/{account}/statement?position={deposited}"
        ))
        .await;
    assert_behind(
        &statement,
        opened,
        "statement while only the summary has the deposit",
    );
    let totals = query
        .get(&format!(
            "/v1/subjects/{subject}/totals?account={account}&position={deposited}"
        ))
        .await;
    assert_behind(
        &totals,
        opened,
        "totals while only the summary has the deposit",
    );
    // What the statement has reached is answered.
    let (status, _, page) = query
        .get(&format!(
            "/v1/accounts/{account}/statement?position={opened}"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);

    // Once they catch up, the same reads answer with the deposit.
    replay(&url, "account_statement", 1, deposited).await;
    replay(&url, "subject_totals", 1, deposited).await;
    let (status, _, page) = query
        .get(&format!(
            "/v1/accounts/{account}/statement?position={deposited}"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["entries"][1]["balance_after"], 40, "{page}");
    let (status, _, totals) = query
        .get(&format!(
            "/v1/subjects/{subject}/totals?account={account}&position={deposited}"
        ))
        .await;
    assert_eq!(status, 200, "{totals}");
    assert_eq!(totals["totals"][0]["balance"], 40, "{totals}");

    // A summary-only rebuild reads the store, so the summary gets ahead of the others.
    let again = api.deposit(&account, 2).await["position"].as_i64().unwrap();
    rebuild(&url, "account_summary").await;
    let (status, _, summary) = query
        .get(&format!("/v1/accounts/{account}?position={again}"))
        .await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["balance"], 42);
    let statement = query
        .get(&format!(
            "/v1/accounts/{account}/statement?position={again}"
        ))
        .await;
    assert_behind(
        &statement,
        deposited,
        "statement after a summary-only rebuild",
    );
    let totals = query
        .get(&format!(
            "/v1/subjects/{subject}/totals?account={account}&position={again}"
        ))
        .await;
    assert_behind(&totals, deposited, "totals after a summary-only rebuild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_changes_a_row_changes_what_readers_get_and_its_etag() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    // Cached entries would outlive the test: only the rebuild's notification can drop them.
    let query = QueryApi::start(&url, &[("CACHE_TTL", "1h")]).await;
    let (account, _, _) = open(&api, "etag").await;
    let deposited = api.deposit(&account, 40).await["position"]
        .as_i64()
        .unwrap();
    replay(&url, "account_summary", 1, deposited).await;
    // A projection bug: the live row holds a wrong balance at the right version.
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE account_summaries SET balance = 999 WHERE account_id = $1")
        .bind(&account)
        .execute(&mut conn)
        .await
        .unwrap();
    let path = format!("{}/v1/accounts/{account}", query.base);
    let (status, headers, wrong) = query.get(&format!("/v1/accounts/{account}")).await;
    assert_eq!(status, 200, "{wrong}");
    assert_eq!(wrong["balance"], 999);
    let stale_tag = headers["etag"].to_str().unwrap().to_owned();
    let again = query
        .client
        .get(&path)
        .header("If-None-Match", &stale_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // The fixed projection is rebuilt: readers get the right row, from the cache too.
    rebuild(&url, "account_summary").await;
    eventually(DEADLINE, "the rebuilt balance answered", || async {
        let (status, _, body) = query.get(&format!("/v1/accounts/{account}")).await;
        if status == 200 && body["balance"] == 40 {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
    // And the copy a client kept from before is not confirmed as current.
    let revalidated = query
        .client
        .get(&path)
        .header("If-None-Match", &stale_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), 200, "a 304 confirmed the stale copy");
    let new_tag = revalidated.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(new_tag, stale_tag);
    let body: Value = revalidated.json().await.unwrap();
    assert_eq!(body["balance"], 40);
    let current = query
        .client
        .get(&path)
        .header("If-None-Match", &new_tag)
        .send()
        .await
        .unwrap();
    assert_eq!(current.status(), 304);
}

/// Every C0 control, DEL and two C1 controls, percent-encoded.
fn control_bytes() -> Vec<String> {
    (0u8..0x20)
        .chain([0x7f])
        .map(|b| format!("%{b:02X}"))
        .chain(["%C2%80".to_owned(), "%C2%85".to_owned()])
        .collect()
}

async fn assert_4xx_problem(response: reqwest::Response, what: &str) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.text().await.unwrap();
    assert!((400..500).contains(&status), "{what}: {status} {body}");
    assert_eq!(content_type, "application/problem+json", "{what}: {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["code"].is_string(), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bytes_in_any_path_segment_or_query_parameter_get_a_4xx_problem_on_both_apis() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let query = QueryApi::start(&url, &[("READ_WAIT_TIMEOUT", "50ms")]).await;
    let (account, _, subject) = open(&api, "controls").await;
    let transfer = uuid::Uuid::new_v4();
    let written = event_count(&url).await;
    for c in control_bytes() {
        for path in [
            format!("/v1/accounts/{c}"),
            format!("/v1/accounts/{c}/statement"),
            format!("/v1/accounts/x{c}y"),
            format!("/v1/owners/{c}/totals"),
            format!("/v1/owners/a{c}/totals"),
            format!("/v1/transfers/{c}"),
            format!("/v1/accounts/{account}?position={c}"),
            format!("/v1/accounts/{account}?position=1{c}"),
            format!("/v1/accounts/{account}/statement?after={c}"),
            format!("/v1/accounts/{account}/statement?limit=5{c}"),
            format!("/v1/accounts/{account}/statement?position={c}"),
            format!("/v1/subjects/{c}"),
            format!("/v1/subjects/{c}/totals"),
            format!("/v1/subjects/{c}/export"),
            format!("/v1/subjects/{subject}/totals?account={c}&position=1"),
            format!("/v1/subjects/{subject}/totals?account={c}"),
            format!("/v1/subjects/{subject}/totals?position={c}&account={account}"),
            format!("/v1/transfers/{transfer}?position={c}"),
            format!("/v1/accounts/{account}?{c}=1"),
        ] {
            let response = query
                .client
                .get(format!("{}{path}", query.base))
                .send()
                .await
                .unwrap();
            assert_4xx_problem(response, &format!("query API GET {path}")).await;
        }
        let deposit = json!({"amount": 1, "currency": "EUR"});
        for (path, body) in [
            (format!("/v1/accounts/{c}/deposits"), deposit.clone()),
            (format!("/v1/accounts/{c}/close"), json!({})),
            (
                format!("/v1/accounts/{account}/deposits?reference={c}"),
                deposit.clone(),
            ),
            (
                format!("/v1/accounts/{account}/withdrawals?{c}=1"),
                deposit.clone(),
            ),
            (
                format!("/v1/accounts?owner={c}"),
                json!({"owner": "o", "currency": "EUR"}),
            ),
            (
                format!("/v1/transfers?from={c}"),
                json!({"from": account, "to": account, "amount": 1, "currency": "EUR"}),
            ),
        ] {
            let response = api
                .client
                .post(format!("{}{path}", api.base))
                .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_4xx_problem(response, &format!("command API POST {path}")).await;
        }
    }
    assert_eq!(event_count(&url).await, written, "a refused request wrote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minus_zero_is_422_amount_not_positive_and_writes_nothing() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let (account, _, _) = open(&api, "zero").await;
    let (other, _, _) = open(&api, "zero").await;
    let written = event_count(&url).await;
    for (path, body) in [
        (
            format!("/v1/accounts/{account}/deposits"),
            r#"{"amount": -0, "currency": "EUR"}"#.to_owned(),
        ),
        (
            format!("/v1/accounts/{account}/withdrawals"),
            r#"{"amount": -0, "currency": "EUR"}"#.to_owned(),
        ),
        (
            format!("/v1/accounts/{account}/deposits"),
            r#"{"amount": -0.0, "currency": "EUR"}"#.to_owned(),
        ),
        (
            "/v1/transfers".to_owned(),
            format!(r#"{{"from": "{account}", "to": "{other}", "amount": -0, "currency": "EUR"}}"#),
        ),
    ] {
        let response = api
            .client
            .post(format!("{}{path}", api.base))
            .header("content-type", "application/json")
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{path} {body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "amount_not_positive", "{path} {body}");
    }
    assert_eq!(event_count(&url).await, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_parameter_that_does_not_parse_gets_the_code_the_readme_documents_on_both_apis() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let query = QueryApi::start(&url, &[]).await;
    let readme = include_str!("../../README.md");
    let (status, headers, body) = query.get("/v1/transfers/not-a-uuid").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    let code = body["code"].as_str().unwrap();
    assert_eq!(code, "invalid_path_parameter");
    let response = api
        .client
        .post(format!("{}/v1/accounts/not-a-uuid/deposits", api.base))
        .json(&json!({"amount": 1, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code);
    // The query API's list of errors names it for a transfer id that is not a UUID.
    let query_errors = readme
        .split("**Paging.**")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap();
    assert!(
        query_errors.contains(&format!("`{code}` (a transfer id that is not a UUID")),
        "README's query errors: {query_errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_case_bearer_scheme_is_accepted_on_both_apis() {
    let url = migrated_database().await;
    let run = admin(
        &url,
        &[
            "--json",
            "keys",
            "create",
            "--name",
            "lower",
            "--scope",
            "write,read",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let key = run.json()["key"].as_str().unwrap().to_owned();
    let api = CommandApi::start_with(&url, &[("AUTH_MODE", "api-keys")]).await;
    let query = QueryApi::start(&url, &[("AUTH_MODE", "api-keys")]).await;
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let opened = api
            .client
            .post(format!("{}/v1/accounts", api.base))
            .header("authorization", format!("{scheme} {key}"))
            .json(&json!({"owner": "lower", "currency": "EUR"}))
            .send()
            .await
            .unwrap();
        assert_eq!(opened.status(), 201, "{scheme}");
        let account: Value = opened.json().await.unwrap();
        let read = query
            .client
            .get(format!(
                "{}/v1/accounts/{}/statement?position={}",
                query.base,
                account["account_id"].as_str().unwrap(),
                0
            ))
            .header("authorization", format!("{scheme} {key}"))
            .send()
            .await
            .unwrap();
        assert_ne!(read.status(), 401, "{scheme}");
        assert_ne!(read.status(), 403, "{scheme}");
    }
    // Another scheme is still no key.
    let refused = query
        .client
        .get(format!("{}/v1/owners/lower/totals", query.base))
        .header("authorization", format!("Basic {key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
}

/// Sends `raw` on a fresh connection to `base` and reads the answer until the server closes
/// it (or 5 s pass): (status, head, body).
async fn raw_http(base: &str, raw: &[u8]) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read all of a huge request.
    // (No half-close: hyper takes the end of the input for a client that has gone.)
    let _ = stream.write_all(raw).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_valid_http_get_a_4xx_and_a_problem_wherever_the_service_sees_them() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let query = QueryApi::start(&url, &[]).await;
    let many_headers: Vec<u8> = (0..2000)
        .flat_map(|n| format!("x-h{n}: v\r\n").into_bytes())
        .collect();
    for base in [&api.base, &query.base] {
        // Refused by hyper while parsing, before the service sees a request: a bare 4xx
        // with no body and the connection closed (README, "Requests that are not HTTP").
        let unparsable: Vec<(&str, Vec<u8>, u16)> = vec![
            ("bare CR in a header", b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: a\rb\r\n\r\n".to_vec(), 400),
            ("NUL in a header", b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: a\0b\r\n\r\n".to_vec(), 400),
            ("NUL in the request line", b"GET /v1/accounts/a\0b HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(), 400),
            ("Content-Length not a number", b"POST /v1/accounts HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n".to_vec(), 400),
            ("two Content-Lengths", b"POST /v1/accounts HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n{}".to_vec(), 400),
            ("2,000 headers", [b"GET /healthz HTTP/1.1\r\nhost: x\r\n".to_vec(), many_headers.clone(), b"\r\n".to_vec()].concat(), 431),
            ("a 70,000-byte URI", [b"GET /v1/accounts/".to_vec(), vec![b'a'; 70_000], b" HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()].concat(), 414),
        ];
        for (case, raw, status) in unparsable {
            let (seen, head, _) = raw_http(base, &raw).await;
            assert_eq!(seen, status, "{base} {case}: {head}");
            assert!(head.contains("connection: close"), "{base} {case}: {head}");
        }
        // What hyper passes on, the service limits and answers with a problem.
        let seen: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            (
                "a 20,000-byte URI",
                [
                    b"GET /v1/accounts/".to_vec(),
                    vec![b'a'; 20_000],
                    b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
                ]
                .concat(),
                414,
                "uri_too_long",
            ),
            (
                "a 40,000-byte header",
                [
                    b"GET /v1/owners/x/totals HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: "
                        .to_vec(),
                    vec![b'a'; 40_000],
                    b"\r\n\r\n".to_vec(),
                ]
                .concat(),
                431,
                "request_headers_too_large",
            ),
            (
                "a %00 path segment",
                b"GET /v1/accounts/%00 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".to_vec(),
                400,
                "invalid_path_parameter",
            ),
        ];
        for (case, raw, status, code) in seen {
            let (seen, head, body) = raw_http(base, &raw).await;
            assert_eq!(seen, status, "{base} {case}: {head}\n{body}");
            assert!(
                head.contains("content-type: application/problem+json"),
                "{base} {case}: {head}"
            );
            let problem: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(problem["code"], code, "{base} {case}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_in_paths_and_queries_never_get_a_5xx_on_either_api() {
    use rand::{Rng, SeedableRng};
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let query = QueryApi::start(&url, &[("READ_WAIT_TIMEOUT", "20ms")]).await;
    let (account, _, subject) = open(&api, "random").await;
    let written = event_count(&url).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0c7b_17e5);
    for round in 0..300 {
        // 1 to 6 bytes of any value, control bytes twice as likely, percent-encoded.
        let value: String = (0..rng.gen_range(1..=6))
            .map(|_| {
                let byte: u8 = if rng.gen_bool(0.5) {
                    rng.gen_range(0..0x20)
                } else {
                    rng.gen()
                };
                format!("%{byte:02X}")
            })
            .collect();
        let get = [
            format!("/v1/accounts/{value}"),
            format!("/v1/accounts/{value}/statement"),
            format!("/v1/owners/{value}/totals"),
            format!("/v1/transfers/{value}"),
            format!("/v1/accounts/{account}?position={value}"),
            format!("/v1/accounts/{account}/statement?after={value}&limit={value}"),
            format!("/v1/subjects/{subject}/totals?account={value}&position=1"),
            format!("/v1/subjects/{value}"),
        ];
        let path = &get[round % get.len()];
        let response = query
            .client
            .get(format!("{}{path}", query.base))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(status < 500, "query API GET {path}: {status}");
        if status >= 400 {
            assert_4xx_problem(response, &format!("query API GET {path}")).await;
        }
        let post = [
            format!("/v1/accounts/{value}/deposits"),
            format!("/v1/accounts/{account}/withdrawals?x={value}"),
            format!("/v1/accounts/{value}/close"),
        ];
        let path = &post[round % post.len()];
        let response = api
            .client
            .post(format!("{}{path}", api.base))
            .json(&json!({"amount": 1_000_000, "currency": "EUR"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!(status < 500, "command API POST {path}: {status}");
        assert_4xx_problem(response, &format!("command API POST {path}")).await;
    }
    assert_eq!(event_count(&url).await, written);
}
