//! Operators: rebuild without downtime, dry runs, resuming, replay, dead letters, the admin
//! API and projection versions (promise 5), against the real processes.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use ledger_e2e::services::{
    admin, admin_with, balances_from_events, migrated_database, seed, wait_until_projected,
    CommandApi, Projector, QueryApi,
};
use ledger_e2e::{binary, eventually, Process};
use ledger_events::subject::legacy_subject_id;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(120);

/// The read models as JSON, for row-for-row comparisons.
async fn snapshot(url: &str) -> Value {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT jsonb_build_object(
            'summaries', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM account_summaries t),
            'statements', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id, sequence) FROM account_statements t),
            'totals', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id, currency) FROM subject_totals t),
            'subjects', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id) FROM subjects t))",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

fn no_differences(report: &Value) -> bool {
    report["differences"]
        .as_object()
        .unwrap()
        .values()
        .all(|d| {
            d["missing"].as_array().unwrap().is_empty()
                && d["extra"].as_array().unwrap().is_empty()
                && d["different"].as_array().unwrap().is_empty()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_traffic_fails_no_query_and_equals_a_fresh_build_row_for_row() {
    let url = migrated_database().await;
    seed(&url, 20, 100).await;
    let api = CommandApi::start(&url).await;
    let _projector = Projector::start(&url, None, &[]).await;
    let query = Arc::new(QueryApi::start(&url, &[]).await);
    let accounts = join_all((0..4).map(|_| api.open_account())).await;
    wait_until_projected(&url, DEADLINE).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writers = {
        let (stop, base, accounts) = (stop.clone(), api.base.clone(), accounts.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let account = &accounts[n % accounts.len()];
                let response = client
                    .post(format!("{base}/v1/accounts/{account}/deposits"))
                    .json(&json!({"amount": 1, "currency": "EUR"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                n += 1;
            }
            n
        })
    };
    let readers = {
        let (stop, query, accounts) = (stop.clone(), query.clone(), accounts.clone());
        tokio::spawn(async move {
            let mut last = vec![0i64; accounts.len()];
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                for (i, account) in accounts.iter().enumerate() {
                    let (status, _, body) = query.get(&format!("/v1/accounts/{account}")).await;
                    assert_eq!(status, 200, "a read failed during the rebuild: {body}");
                    let balance = body["balance"].as_i64().unwrap();
                    assert!(
                        balance >= last[i],
                        "a read went back in time: {balance} < {}",
                        last[i]
                    );
                    last[i] = balance;
                    // The seeded accounts are v1 openings of the owner `seed`: its legacy
                    // subject.
                    let (status, _, totals) = query
                        .get(&format!(
                            "/v1/subjects/{}/totals",
                            legacy_subject_id("seed")
                        ))
                        .await;
                    assert_eq!(status, 200, "{totals}");
                    assert_eq!(
                        totals["totals"][0]["balance"], 2000,
                        "half-built totals: {totals}"
                    );
                    reads += 1;
                }
            }
            reads
        })
    };
    for projection in [
        "account_summary",
        "subject_totals",
        "account_statement",
        "subjects",
    ] {
        let run = admin(
            &url,
            &["--json", "rebuild", projection, "--batch-size", "200"],
        )
        .await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(run.json()["swapped"], true);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(writers.await.unwrap() > 0);
    assert!(readers.await.unwrap() > 0);
    wait_until_projected(&url, DEADLINE).await;
    for projection in [
        "account_summary",
        "subject_totals",
        "account_statement",
        "subjects",
    ] {
        let dry = admin(&url, &["--json", "rebuild", projection, "--dry-run"]).await;
        assert_eq!(dry.code, 0, "{}", dry.stderr);
        assert!(
            no_differences(&dry.json()),
            "{projection} differs: {}",
            dry.stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_after_corrupting_one_row_reports_exactly_that_row_and_changes_nothing() {
    let url = migrated_database().await;
    let accounts = seed(&url, 5, 10).await;
    let _projector = Projector::start(&url, None, &[]).await;
    wait_until_projected(&url, DEADLINE).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE account_summaries SET balance = balance + 1 WHERE account_id = $1")
        .bind(&accounts[2])
        .execute(&mut conn)
        .await
        .unwrap();
    let before = snapshot(&url).await;
    let dry = admin(&url, &["--json", "rebuild", "account_summary", "--dry-run"]).await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let diff = &dry.json()["differences"]["account_summaries"];
    assert!(diff["missing"].as_array().unwrap().is_empty(), "{diff}");
    assert!(diff["extra"].as_array().unwrap().is_empty(), "{diff}");
    let different = diff["different"].as_array().unwrap();
    assert_eq!(different.len(), 1, "{diff}");
    assert_eq!(different[0]["live"]["account_id"], accounts[2].as_str());
    assert_eq!(different[0]["live"]["balance"], 11);
    assert_eq!(different[0]["rebuilt"]["balance"], 10);
    assert_eq!(
        snapshot(&url).await,
        before,
        "a dry run changed the live model"
    );
    let status = admin(&url, &["--json", "status"]).await.json();
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "live"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_half_way_resumes_and_finishes_with_the_same_result() {
    let url = migrated_database().await;
    seed(&url, 8, 500).await; // 4,008 events
    let _projector = Projector::start(&url, None, &[("PROJECTOR_BATCH_SIZE", "2000")]).await;
    wait_until_projected(&url, DEADLINE).await;
    let expected = snapshot(&url).await;

    let mut first = Process::start_clean(
        &binary("ledger-admin"),
        &["rebuild", "account_statement", "--batch-size", "50"],
        &[("DATABASE_URL", url.as_str())],
    );
    // Kill it once the shadow holds some, not all, of the events.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let shadow = &pool;
    eventually(DEADLINE, "progressed 300 events", || async move {
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT events_applied FROM rebuild_account_statement.projection_checkpoints",
        )
        .fetch_optional(shadow)
        .await
        .unwrap_or(None);
        done.filter(|n| *n >= 300)
            .map(|_| ())
            .ok_or_else(|| format!("{done:?}"))
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.exit_code(Duration::from_secs(10)).await;
    let status = admin(&url, &["--json", "status"]).await.json();
    let statement = status
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "account_statement")
        .unwrap()
        .clone();
    assert_eq!(statement["state"], "rebuilding", "{status}");
    let halfway = statement["rebuild_position"].as_i64().unwrap();
    assert!(halfway > 0 && halfway < 4_008, "{statement}");

    let resumed = admin(
        &url,
        &[
            "--json",
            "rebuild",
            "account_statement",
            "--batch-size",
            "2000",
        ],
    )
    .await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    let report = resumed.json();
    assert_eq!(report["swapped"], true);
    assert_eq!(
        report["progress"]["events"], 4_008,
        "resumed, not restarted from zero: {report}"
    );
    assert_eq!(snapshot(&url).await, expected);
    let status = admin(&url, &["--json", "status"]).await.json();
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "live"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_range_twice_leaves_the_model_unchanged_and_repairs_what_was_lost() {
    let url = migrated_database().await;
    let accounts = seed(&url, 3, 20).await;
    let _projector = Projector::start(&url, None, &[]).await;
    wait_until_projected(&url, DEADLINE).await;
    let expected = snapshot(&url).await;
    for _ in 0..2 {
        let run = admin(
            &url,
            &["--json", "replay", "account_statement", "--from", "1"],
        )
        .await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        let report = run.json();
        assert_eq!(report["applied"], 0, "{report}");
        assert_eq!(report["duplicates"], 63);
        assert_eq!(snapshot(&url).await, expected);
    }
    // A statement row lost (with its guard set back) is put back by a replay of its range.
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query("DELETE FROM account_statements WHERE account_id = $1 AND sequence = 21")
        .bind(&accounts[1])
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE projection_guards SET last_sequence = 20 WHERE projection = 'account_statement' AND aggregate_id = $1")
        .bind(&accounts[1])
        .execute(&mut conn)
        .await
        .unwrap();
    let run = admin(
        &url,
        &[
            "--json",
            "replay",
            "account_statement",
            "--from",
            "1",
            "--to",
            "1000",
        ],
    )
    .await;
    assert_eq!(run.json()["applied"], 1);
    assert_eq!(snapshot(&url).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_of_the_same_projection_is_refused() {
    let url = migrated_database().await;
    let mut holder = PgConnection::connect(&url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('ledger-rebuild:subject_totals'))")
        .execute(&mut holder)
        .await
        .unwrap();
    let run = admin(&url, &["rebuild", "subject_totals"]).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("already running"), "{}", run.stderr);
    let unknown = admin(&url, &["rebuild", "balances"]).await;
    assert_ne!(unknown.code, 0);
    assert!(
        unknown.stderr.contains("unknown projection"),
        "{}",
        unknown.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_retried_and_skipped_with_who_and_when() {
    let url = migrated_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // Money for an account the read models never saw opened: every projection refuses it.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', 'orphan', 1, 'MoneyDeposited', '2',
                 '{\"type\":\"MoneyDeposited\",\"amount\":50,\"currency\":\"EUR\",\"reference\":null}', '{}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let _projector = Projector::start(&url, None, &[]).await;
    let db = url.as_str();
    let letters = eventually(DEADLINE, "three dead letters", || async move {
        let letters = admin(db, &["--json", "dead-letters", "list"]).await.json();
        if letters.as_array().unwrap().len() == 3 {
            Ok(letters)
        } else {
            Err(letters.to_string())
        }
    })
    .await;
    let id_of = |projection: &str| {
        letters
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["projection"] == projection)
            .unwrap()["id"]
            .as_i64()
            .unwrap()
            .to_string()
    };
    let shown = admin(&url, &["dead-letters", "show", &id_of("account_summary")])
        .await
        .json();
    assert!(
        shown["reason"].as_str().unwrap().contains("orphan"),
        "{shown}"
    );
    assert!(
        shown["raw_value"]
            .as_str()
            .unwrap()
            .contains("\"amount\":50"),
        "{shown}"
    );

    // Retrying before a fix is refused again and recorded; after the operator's fix it applies.
    let retried = admin(
        &url,
        &[
            "--json",
            "dead-letters",
            "retry",
            &id_of("account_summary"),
            "--actor",
            "alice",
        ],
    )
    .await
    .json();
    assert_eq!(retried["status"], "pending");
    assert!(retried["actions"][0]["outcome"]
        .as_str()
        .unwrap()
        .starts_with("refused again"));
    // The fix restores the account's missing opening in the store (a retry projects the
    // account again from its history, ADR 0014; a hand-edited read model is not history).
    sqlx::query("UPDATE events SET sequence = 2 WHERE aggregate_id = 'orphan'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', 'orphan', 1, 'AccountOpened', '1',
                 '{\"type\":\"AccountOpened\",\"owner\":\"fixed\",\"currency\":\"EUR\"}', '{}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let retried = admin(
        &url,
        &[
            "--json",
            "dead-letters",
            "retry",
            &id_of("account_summary"),
            "--actor",
            "alice",
        ],
    )
    .await
    .json();
    assert_eq!(retried["status"], "retried", "{retried}");
    assert_eq!(retried["actions"][1]["outcome"], "applied");
    assert_eq!(retried["actions"][1]["actor"], "alice");
    let balance: i64 =
        sqlx::query_scalar("SELECT balance FROM account_summaries WHERE account_id = 'orphan'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(balance, 50);

    let skipped = admin(
        &url,
        &["--json", "dead-letters", "skip", &id_of("subject_totals")],
    )
    .await
    .json();
    assert_eq!(skipped["status"], "skipped");
    assert_eq!(skipped["actions"][0]["actor"], "tester");
    assert!(skipped["actions"][0]["at"].as_str().is_some());
    let pending = admin(&url, &["--json", "dead-letters", "list"])
        .await
        .json();
    assert_eq!(pending.as_array().unwrap().len(), 1);
    let again = admin(&url, &["dead-letters", "skip", &id_of("subject_totals")]).await;
    assert_ne!(again.code, 0, "skipping twice is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token_and_runs_a_dry_run_rebuild() {
    let url = migrated_database().await;
    seed(&url, 3, 5).await;
    let projector = Projector::start(&url, None, &[("ADMIN_TOKEN", "s3cret-admin")]).await;
    wait_until_projected(&url, DEADLINE).await;
    let client = reqwest::Client::new();
    let projections = format!("{}/admin/projections", projector.base);
    assert_eq!(client.get(&projections).send().await.unwrap().status(), 401);
    let wrong = client
        .get(&projections)
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401, "an unknown token is no credential");
    let ok: Value = client
        .get(&projections)
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ok["projections"].as_array().unwrap().len(),
        ledger_readmodels::names::ALL.len()
    );

    let started = client
        .post(format!(
            "{}/admin/projections/subject_totals/rebuild?dry_run=true",
            projector.base
        ))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let (client, base) = (&client, projector.base.as_str());
    let job = eventually(DEADLINE, "finished the dry run", || async move {
        let job: Value = client
            .get(format!("{base}/admin/projections/subject_totals/rebuild"))
            .bearer_auth("s3cret-admin")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["running"] == false {
            Ok(job)
        } else {
            Err(job.to_string())
        }
    })
    .await;
    assert!(job["error"].is_null(), "{job}");
    assert!(no_differences(&job["report"]), "{job}");
    assert_eq!(job["progress"]["events"], 18);
    let unknown = client
        .post(format!("{}/admin/projections/nope/rebuild", projector.base))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_built_by_another_version_is_reported_and_a_rebuild_clears_it() {
    let url = migrated_database().await;
    seed(&url, 2, 3).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO projection_versions (projection, version) VALUES ('account_summary', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut projector = Projector::start(&url, None, &[]).await;
    projector
        .process
        .wait_for_line(
            "ledger-admin rebuild account_summary",
            Duration::from_secs(30),
        )
        .await;
    let status = admin(&url, &["--json", "status"]).await.json();
    let summary = status
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "account_summary")
        .unwrap()
        .clone();
    assert_eq!(summary["needs_rebuild"], true, "{summary}");
    wait_until_projected(&url, DEADLINE).await;
    assert_eq!(admin(&url, &["rebuild", "account_summary"]).await.code, 0);
    let status = admin(&url, &["--json", "status"]).await.json();
    assert!(
        status
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["needs_rebuild"] == false),
        "{status}"
    );
    assert_eq!(balances_from_events(&url).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_configured_to_rebuilds_a_stale_model_by_itself() {
    let url = migrated_database().await;
    seed(&url, 2, 3).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO projection_versions (projection, version) VALUES ('subject_totals', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut projector = Projector::start(&url, None, &[("PROJECTOR_AUTO_REBUILD", "true")]).await;
    projector
        .process
        .wait_for_line("rebuilt and swapped in", Duration::from_secs(60))
        .await;
    let version: i32 = sqlx::query_scalar(
        "SELECT version FROM projection_versions WHERE projection = 'subject_totals'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        version,
        ledger_readmodels::names::version(ledger_readmodels::names::SUBJECT_TOTALS)
    );
    wait_until_projected(&url, DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republish_sends_the_events_from_a_position_to_kafka_again() {
    let broker = ledger_e2e::broker::Broker::shared().await;
    let url = migrated_database().await;
    seed(&url, 2, 9).await; // positions 1..=20
    let relay = ledger_e2e::services::Relay::start(&url, &broker.address, &[]).await;
    relay
        .wait_status("published", DEADLINE, |s| s["published"] == 20)
        .await;
    let before =
        ledger_e2e::kafka::message_count(&broker.address, &ledger_e2e::services::topic(&url));
    assert_eq!(before, 20);
    let topic = ledger_e2e::services::topic(&url);
    let run = admin_with(
        &url,
        &[
            ("KAFKA_BROKERS", broker.address.as_str()),
            ("KAFKA_TOPIC", topic.as_str()),
        ],
        &["--json", "republish", "--from", "16"],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["republished"], 5);
    // The 5 re-sent events arrive again after the 20, each with its id, in order.
    let received = ledger_e2e::kafka::read_available(
        &broker.address,
        &ledger_e2e::services::topic(&url),
        Duration::from_secs(2),
        DEADLINE,
    );
    assert_eq!(received.len(), 25);
    ledger_e2e::kafka::assert_per_aggregate_order(&received);
}
