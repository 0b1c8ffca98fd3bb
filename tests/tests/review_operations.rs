//! Operations under review: dead-letter retries applied once and in order, the process
//! manager's letters retried, swaps under live load, dry runs under load, and the small
//! things around them (ADR 0014).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::future::join_all;
use ledger_e2e::eventually;
use ledger_e2e::services::{admin, migrated_database, CommandApi, Projector};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(120);

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

/// Appends one event straight into the store.
async fn append(
    conn: &mut PgConnection,
    aggregate: (&str, &str),
    sequence: i64,
    event_type: &str,
    version: &str,
    payload: Value,
) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, '{}')",
    )
    .bind(aggregate.0)
    .bind(aggregate.1)
    .bind(sequence)
    .bind(event_type)
    .bind(version)
    .bind(payload)
    .execute(conn)
    .await
    .unwrap();
}

/// The pending dead letters, once there are `count` of them.
async fn pending_letters(url: &str, count: usize) -> Vec<Value> {
    eventually(
        DEADLINE,
        &format!("{count} pending dead letters"),
        || async move {
            let letters = admin(url, &["--json", "dead-letters", "list"]).await.json();
            let letters = letters.as_array().unwrap().clone();
            if letters.len() == count {
                Ok(letters)
            } else {
                Err(format!("{letters:?}"))
            }
        },
    )
    .await
}

fn letter_of(letters: &[Value], projection: &str) -> String {
    letters
        .iter()
        .find(|l| l["projection"] == projection)
        .unwrap_or_else(|| panic!("no letter of {projection} in {letters:?}"))["id"]
        .as_i64()
        .unwrap()
        .to_string()
}

async fn dry_run_is_clean(url: &str, projection: &str) {
    let dry = admin(url, &["--json", "rebuild", projection, "--dry-run"]).await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(
        no_differences(&dry.json()),
        "{projection} differs from a rebuild: {}",
        dry.stdout
    );
}

/// The rolling-deploy case: the old projector cannot read a new event version, dead-letters
/// that one event and applies the account's later events; after the upgrade the operator
/// retries (several times at once, by accident) and skips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_letter_is_applied_once_in_order_and_a_dry_run_then_finds_no_difference() {
    let url = migrated_database().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let account = ("account", "rolling-deploy");
    let money = |kind: &str, amount: i64| json!({"type": kind, "amount": amount, "currency": "EUR", "reference": null});
    append(
        &mut conn,
        account,
        1,
        "AccountOpened",
        "1",
        json!({"type": "AccountOpened", "owner": "ops", "currency": "EUR"}),
    )
    .await;
    // A version this projector cannot read yet.
    append(
        &mut conn,
        account,
        2,
        "MoneyDeposited",
        "4",
        money("MoneyDeposited", 100),
    )
    .await;
    append(
        &mut conn,
        account,
        3,
        "MoneyWithdrawn",
        "2",
        money("MoneyWithdrawn", 30),
    )
    .await;
    append(
        &mut conn,
        account,
        4,
        "MoneyDeposited",
        "2",
        money("MoneyDeposited", 5),
    )
    .await;
    let _projector = Projector::start(&url, None, &[]).await;
    // One per projection that takes account events: summary, statement, totals, subjects.
    let letters = pending_letters(&url, 4).await;
    let guards_at_4 = || async {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_guards WHERE aggregate_id = 'rolling-deploy'
                AND last_sequence = 4",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if n == 4 {
            Ok(())
        } else {
            Err(format!("{n} guards at 4"))
        }
    };
    eventually(DEADLINE, "applied the later events", guards_at_4).await;

    // The upgrade: the event is now readable.
    sqlx::query("UPDATE events SET event_version = '2' WHERE aggregate_id = 'rolling-deploy' AND sequence = 2")
        .execute(&mut conn)
        .await
        .unwrap();
    let summary = letter_of(&letters, "account_summary");
    let args = [
        "--json",
        "dead-letters",
        "retry",
        &summary,
        "--actor",
        "ops",
    ];
    let runs = join_all((0..4).map(|_| admin(&url, &args))).await;
    let applied = runs.iter().filter(|run| run.code == 0).count();
    assert_eq!(
        applied,
        1,
        "concurrent retries of one letter: {:?}",
        runs.iter().map(|r| &r.stderr).collect::<Vec<_>>()
    );
    let retried = admin(
        &url,
        &[
            "--json",
            "dead-letters",
            "retry",
            &letter_of(&letters, "account_statement"),
        ],
    )
    .await
    .json();
    assert_eq!(retried["status"], "retried", "{retried}");
    let skipped = admin(
        &url,
        &[
            "--json",
            "dead-letters",
            "skip",
            &letter_of(&letters, "subject_totals"),
        ],
    )
    .await
    .json();
    assert_eq!(skipped["status"], "skipped", "{skipped}");
    let skipped = admin(
        &url,
        &[
            "--json",
            "dead-letters",
            "skip",
            &letter_of(&letters, "subjects"),
        ],
    )
    .await
    .json();
    assert_eq!(skipped["status"], "skipped", "{skipped}");

    let last_position: i64 = sqlx::query_scalar(
        "SELECT global_position FROM events WHERE aggregate_id = 'rolling-deploy' AND sequence = 4",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (balance, version, position): (i64, i64, i64) = sqlx::query_as(
        "SELECT balance, version, last_position FROM account_summaries WHERE account_id = 'rolling-deploy'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        (balance, version, position),
        (75, 4, last_position),
        "counted once, and version and position never go back"
    );
    let running: Vec<i64> = sqlx::query_scalar(
        "SELECT balance_after FROM account_statements WHERE account_id = 'rolling-deploy' ORDER BY sequence",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(running, [0, 100, 70, 75], "running balances in order");
    for projection in [
        "account_summary",
        "account_statement",
        "subject_totals",
        "subjects",
    ] {
        dry_run_is_clean(&url, projection).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_letter_of_the_transfer_process_manager_can_be_retried() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let _projector = Projector::start(&url, None, &[]).await;
    let (from, to) = (api.open_account().await, api.open_account().await);
    api.deposit(&from, 500).await;
    let transfer = uuid::Uuid::new_v4().to_string();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    // A request this process manager cannot read yet.
    append(
        &mut conn,
        ("transfer", &transfer),
        1,
        "TransferRequested",
        "9",
        json!({"type": "TransferRequested", "from": from, "to": to, "amount": 200, "currency": "EUR"}),
    )
    .await;
    let letters = pending_letters(&url, 2).await;
    sqlx::query("UPDATE events SET event_version = '1' WHERE aggregate_id = $1")
        .bind(&transfer)
        .execute(&mut conn)
        .await
        .unwrap();
    for projection in ["transfer_process_manager", "transfers"] {
        let retried = admin(
            &url,
            &[
                "--json",
                "dead-letters",
                "retry",
                &letter_of(&letters, projection),
            ],
        )
        .await;
        assert_eq!(retried.code, 0, "{}", retried.stderr);
        assert_eq!(retried.json()["status"], "retried", "{}", retried.stdout);
    }
    let (db, id) = (url.as_str(), transfer.as_str());
    eventually(DEADLINE, "completed the transfer", || async move {
        let mut conn = PgConnection::connect(db).await.unwrap();
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM transfers WHERE transfer_id = $1")
                .bind(id)
                .fetch_optional(&mut conn)
                .await
                .unwrap();
        (state.as_deref() == Some("completed"))
            .then_some(())
            .ok_or_else(|| format!("{state:?}"))
    })
    .await;
    let balances = ledger_e2e::services::balances_from_events(&url).await;
    assert_eq!((balances[&from], balances[&to]), (300, 200));
    dry_run_is_clean(&url, "transfers").await;
}

/// Deposits 1 into `accounts` in turn until `stop`; returns how many.
fn deposit_until(
    api: &CommandApi,
    accounts: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let (base, client) = (api.base.clone(), api.client.clone());
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_under_load_reports_no_difference_and_streams_the_ones_there_are() {
    let url = migrated_database().await;
    let seeded = ledger_e2e::services::seed(&url, 10, 20).await;
    let api = CommandApi::start(&url).await;
    // One event per batch: the live model lags behind the writers.
    let _projector = Projector::start(&url, None, &[("PROJECTOR_BATCH_SIZE", "1")]).await;
    let accounts = join_all((0..4).map(|_| api.open_account())).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = deposit_until(&api, accounts, stop.clone());
    for _ in 0..3 {
        for projection in ["subject_totals", "account_summary", "account_statement"] {
            dry_run_is_clean(&url, projection).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writers.await.unwrap() > 0);

    // The projector applies one event per batch: let it reach the head before a row is
    // corrupted, or the seeded account's row may not exist yet (nothing to corrupt).
    ledger_e2e::services::wait_until_projected(&url, DEADLINE).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let corrupted =
        sqlx::query("UPDATE account_summaries SET balance = balance + 1 WHERE account_id = $1")
            .bind(&seeded[3])
            .execute(&mut conn)
            .await
            .unwrap();
    assert_eq!(corrupted.rows_affected(), 1, "the row to corrupt exists");
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    let dry = admin(
        &url,
        &[
            "--json",
            "rebuild",
            "account_summary",
            "--dry-run",
            "--differences",
            path,
        ],
    )
    .await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let streamed: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(streamed.len(), 1, "{streamed:?}");
    assert_eq!(streamed[0]["table"], "account_summaries");
    assert_eq!(streamed[0]["kind"], "different");
    assert_eq!(streamed[0]["row"]["live"]["account_id"], seeded[3].as_str());
    assert_eq!(streamed[0]["row"]["live"]["balance"], 21);
    assert_eq!(streamed[0]["row"]["rebuilt"]["balance"], 20);
    let report = dry.json();
    assert_eq!(
        report["differences"]["account_summaries"]["counts"]["different"],
        1
    );
}

/// The read-model tables' index names.
async fn index_names(url: &str) -> Vec<(String, String)> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_as(
        "SELECT tablename::text, indexname::text FROM pg_indexes
          WHERE schemaname = 'public' AND tablename = ANY($1) ORDER BY 1, 2",
    )
    .bind(
        [
            "account_summaries",
            "account_statements",
            "subject_totals",
            "subject_total_accounts",
            "transfers",
            "subjects",
        ]
        .as_slice(),
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_live_load_all_succeed_and_keep_every_dead_letter_and_index_name() {
    let url = migrated_database().await;
    ledger_e2e::services::seed(&url, 10, 20).await;
    let api = CommandApi::start(&url).await;
    let _projector = Projector::start(&url, None, &[]).await;
    let accounts = join_all((0..4).map(|_| api.open_account())).await;
    ledger_e2e::services::wait_until_projected(&url, DEADLINE).await;
    let indexes = index_names(&url).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = deposit_until(&api, accounts, stop.clone());
    let projections = [
        "account_summary",
        "subject_totals",
        "account_statement",
        "transfers",
        "subjects",
    ];
    for n in 0..20 {
        let projection = projections[n % projections.len()];
        // A poison event (money for an account never opened) lands while the rebuild runs:
        // its letters must survive the swap, once each.
        let poison = async {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            append(
                &mut conn,
                ("account", &format!("orphan-{n}")),
                1,
                "MoneyDeposited",
                "2",
                json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null}),
            )
            .await;
        };
        let args = ["--json", "rebuild", projection, "--batch-size", "200"];
        let (run, ()) = tokio::join!(admin(&url, &args), poison);
        assert_eq!(
            run.code, 0,
            "swap {n} of {projection} failed: {}",
            run.stderr
        );
        assert_eq!(run.json()["swapped"], true);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writers.await.unwrap() > 0);
    let db = url.as_str();
    eventually(
        DEADLINE,
        "one pending letter per poison event and projection",
        || async move {
            let mut conn = PgConnection::connect(db).await.unwrap();
            let letters: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT projection, aggregate_id, count(*) FILTER (WHERE status = 'pending')
               FROM dead_letters GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let right = letters.len() == 60 && letters.iter().all(|(_, _, pending)| *pending == 1);
            right.then_some(()).ok_or_else(|| format!("{letters:?}"))
        },
    )
    .await;
    assert_eq!(index_names(&url).await, indexes, "a swap renamed indexes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_unreadable_message_or_process_manager_letter_is_recorded_once() {
    use ledger_readmodels::dead_letters::{record, NewDeadLetter};
    let (_, pool) = ledger_e2e::fresh_database().await;
    let unreadable = NewDeadLetter {
        projection: "*".into(),
        reason: "not JSON".into(),
        source: "kafka".into(),
        kafka_partition: Some(3),
        kafka_offset: Some(41),
        raw_value: Some("{oops".into()),
        ..NewDeadLetter::default()
    };
    let reaction = NewDeadLetter {
        projection: "transfer_process_manager".into(),
        reason: "transfer was never requested".into(),
        event_id: Some(uuid::Uuid::new_v4()),
        source: "process_manager".into(),
        ..NewDeadLetter::default()
    };
    for _ in 0..2 {
        for letter in [&unreadable, &reaction] {
            let mut tx = pool.begin().await.unwrap();
            record(&mut tx, letter).await.unwrap();
            tx.commit().await.unwrap();
        }
    }
    let per_projection: Vec<(String, i64)> =
        sqlx::query_as("SELECT projection, count(*) FROM dead_letters GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        per_projection,
        [
            ("*".to_owned(), 1),
            ("transfer_process_manager".to_owned(), 1)
        ]
    );
}
