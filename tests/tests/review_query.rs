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

/// Opens an EUR account for `owner`; returns its id and the position of its opening.
async fn open(api: &CommandApi, owner: &str) -> (String, i64) {
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
    let (account, opened) = open(&api, "ryw").await;
    let deposited = api.deposit(&account, 40).await["position"]
        .as_i64()
        .unwrap();

    // No projector runs: the operator's replays put the models at different positions, as a
    // summary-only replay, retry or rebuild does. The summary has the deposit; the statement
    // and the owner's totals stop at the opening.
    replay(&url, "account_summary", 1, deposited).await;
    replay(&url, "account_statement", 1, opened).await;
    replay(&url, "owner_totals", 1, opened).await;

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
            "/v1/owners/ryw/totals?account={account}&position={deposited}"
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
    replay(&url, "owner_totals", 1, deposited).await;
    let (status, _, page) = query
        .get(&format!(
            "/v1/accounts/{account}/statement?position={deposited}"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["entries"][1]["balance_after"], 40, "{page}");
    let (status, _, totals) = query
        .get(&format!(
            "/v1/owners/ryw/totals?account={account}&position={deposited}"
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
            "/v1/owners/ryw/totals?account={account}&position={again}"
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
    let (account, _) = open(&api, "etag").await;
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