//! Rebuilding every projection in one pass over the log (ADR 0018) against a real
//! PostgreSQL: the models equal what the live projector built (promise 5), a pass stopped
//! half way resumes to the same result, and the per-projection locks keep a second rebuild
//! out.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger_platform::testing::fresh_database;
use ledger_projector::apply::{Applier, Incoming};
use ledger_projector::ops::rebuild::{self, Progress};
use ledger_projector::ops::OpError;
use ledger_readmodels::names;
use ledger_store::LogCursor;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::Notify;

const T: &str = "00000000-0000-0000-0000-0000000000f1";
const U: &str = "00000000-0000-0000-0000-0000000000f2";

/// The data keys, under the test KEK.
fn keys(pool: &sqlx::PgPool) -> ledger_pii::KeyStore {
    ledger_pii::testing::test_key_store(pool)
}

/// Accounts of two owners with openings, deposits and withdrawals, a completed transfer, a
/// failed one, and events every projection or some refuse (dead letters): money for an
/// account never opened, an account opened twice, an event type nobody knows, an aggregate
/// type nobody knows.
fn events() -> Vec<(String, String, Value)> {
    let account = |n: usize| format!("00000000-0000-0000-0000-0000000000a{n}");
    let mut events = Vec::new();
    for n in 0..6 {
        let owner = if n % 2 == 0 { "o1" } else { "o2" };
        events.push((
            "account".to_owned(),
            account(n),
            json!({"type": "AccountOpened", "owner": owner, "currency": "EUR"}),
        ));
    }
    for i in 0..120usize {
        let amount = i64::try_from(i).unwrap() + 10;
        events.push((
            "account".to_owned(),
            account(i % 6),
            json!({"type": "MoneyDeposited", "amount": amount, "currency": "EUR",
                   "reference": format!("r{i}")}),
        ));
        if i % 7 == 3 {
            events.push((
                "account".to_owned(),
                account(i % 6),
                json!({"type": "MoneyWithdrawn", "amount": 3, "currency": "EUR", "reference": null}),
            ));
        }
        if i == 40 {
            let (from, to) = (account(0), account(1));
            events.extend([
                (
                    "transfer".to_owned(),
                    T.to_owned(),
                    json!({"type": "TransferRequested", "from": from, "to": to, "amount": 5,
                           "currency": "EUR"}),
                ),
                (
                    "account".to_owned(),
                    from.clone(),
                    json!({"type": "TransferSent", "transfer_id": T, "to": to, "amount": 5,
                           "currency": "EUR"}),
                ),
                (
                    "transfer".to_owned(),
                    T.to_owned(),
                    json!({"type": "TransferDebited"}),
                ),
                (
                    "account".to_owned(),
                    to.clone(),
                    json!({"type": "TransferReceived", "transfer_id": T, "from": from,
                           "amount": 5, "currency": "EUR"}),
                ),
                (
                    "account".to_owned(),
                    from.clone(),
                    json!({"type": "TransferSettled", "transfer_id": T}),
                ),
                (
                    "transfer".to_owned(),
                    T.to_owned(),
                    json!({"type": "TransferCompleted"}),
                ),
                (
                    "transfer".to_owned(),
                    U.to_owned(),
                    json!({"type": "TransferRequested", "from": to, "to": from, "amount": 9,
                           "currency": "EUR"}),
                ),
            ]);
        }
        if i == 80 {
            events.extend([
                (
                    "account".to_owned(),
                    "never-opened".to_owned(),
                    json!({"type": "MoneyDeposited", "amount": 4, "currency": "EUR",
                           "reference": null}),
                ),
                (
                    "account".to_owned(),
                    account(2),
                    json!({"type": "AccountOpened", "owner": "o1", "currency": "EUR"}),
                ),
                (
                    "account".to_owned(),
                    account(3),
                    json!({"type": "MoneyTeleported"}),
                ),
                (
                    "gadget".to_owned(),
                    "g-1".to_owned(),
                    json!({"type": "GadgetBuilt"}),
                ),
            ]);
        }
    }
    events
}

fn version(payload: &Value) -> &'static str {
    match payload["type"].as_str() {
        Some("MoneyDeposited" | "MoneyWithdrawn") => "2",
        _ => "1",
    }
}

/// Stores `events()` (each aggregate's sequences in order) and waits until all are readable
/// in commit-safe order; returns how many there are.
async fn store_events(pool: &PgPool) -> i64 {
    let mut sequences = std::collections::HashMap::new();
    let events = events();
    for (aggregate_type, id, payload) in &events {
        let sequence = sequences.entry(id.clone()).or_insert(0i64);
        *sequence += 1;
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ($1, $2, $3, $4, $5, $6, '{}')",
        )
        .bind(aggregate_type)
        .bind(id)
        .bind(*sequence)
        .bind(payload["type"].as_str().unwrap())
        .bind(version(payload))
        .bind(payload)
        .execute(pool)
        .await
        .unwrap();
    }
    let total = i64::try_from(events.len()).unwrap();
    // Reads are commit-safe: they wait for transactions older than the inserts to end, on
    // the whole server.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger_store::read_after(pool, LogCursor::default(), 10_000)
        .await
        .unwrap()
        .len()
        < events.len()
    {
        assert!(
            Instant::now() < deadline,
            "the events never became readable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    total
}

/// What the live projector does in store mode: the log in small batches through
/// `Applier::apply_batch`, every projection in each batch's transaction.
async fn project_live(pool: &PgPool) {
    let applier = Applier::new(pool.clone(), keys(pool), None);
    let mut cursor = LogCursor::default();
    loop {
        let batch = ledger_store::read_after(pool, cursor, 13).await.unwrap();
        let Some(last) = batch.last().map(|entry| entry.cursor) else {
            break;
        };
        let incoming: Vec<Incoming> = batch.into_iter().map(Incoming::from_log).collect();
        applier.apply_batch(&incoming).await.unwrap();
        cursor = last;
    }
}

/// Every projection's rows, guards and pending dead letters, as JSON.
async fn models(pool: &PgPool) -> Value {
    sqlx::query_scalar(
        "SELECT jsonb_build_object(
            'summaries', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM account_summaries t),
            'statements', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id, sequence) FROM account_statements t),
            'totals', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id, currency) FROM subject_totals t),
            'total_accounts', (SELECT jsonb_agg(to_jsonb(t) ORDER BY account_id) FROM subject_total_accounts t),
            'subjects', (SELECT jsonb_agg(to_jsonb(t) ORDER BY subject_id) FROM subjects t),
            'transfers', (SELECT jsonb_agg(to_jsonb(t) ORDER BY transfer_id) FROM transfers t),
            'guards', (SELECT jsonb_agg(to_jsonb(t) ORDER BY projection, aggregate_id) FROM projection_guards t),
            'letters', (SELECT jsonb_agg(jsonb_build_object('p', projection, 'e', event_id, 'r', reason)
                                         ORDER BY projection, global_position)
                          FROM dead_letters WHERE status = 'pending'))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Shadow schemas left (rebuilds stopped half way) and their checkpoints' event counts.
async fn shadows(pool: &PgPool) -> Vec<(String, i64)> {
    let mut found = Vec::new();
    for projection in names::ALL {
        if rebuild::in_progress(pool, projection)
            .await
            .unwrap()
            .is_some()
        {
            let applied: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT events_applied FROM {}.projection_checkpoints",
                rebuild::shadow_schema(projection)
            ))
            .fetch_optional(pool)
            .await
            .unwrap();
            found.push((projection.to_owned(), applied.unwrap_or(0)));
        }
    }
    found
}

/// Runs `rebuild` until `stop` is notified (from its progress callback, after a committed
/// batch), then drops it at its next wait, as a killed process would stop: the batch in
/// flight rolled back, the committed ones kept.
async fn stopped_half_way(
    pool: &PgPool,
    rebuild: impl std::future::Future<Output = Result<Vec<rebuild::Report>, OpError>>,
    stop: Arc<Notify>,
) {
    let pool = tokio::select! {
        finished = rebuild => panic!("finished before it was stopped: {finished:?}"),
        () = stop.notified() => pool,
    };
    // Its connections are gone; their sessions (and locks) end once PostgreSQL notices.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
              WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if held == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped rebuild's locks stay held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pass_rebuild_of_all_projections_equals_live_and_resumes_after_a_stop_half_way() {
    let (_url, pool) = fresh_database().await;
    let total = store_events(&pool).await;
    project_live(&pool).await;
    let live = models(&pool).await;
    assert_eq!(live["transfers"].as_array().unwrap().len(), 2, "{live}");
    assert!(
        live["letters"].as_array().unwrap().len() >= 7,
        "the poison events are dead letters: {}",
        live["letters"]
    );

    // The live models go wrong (a corrupted balance, lost statement lines, a lost transfer):
    // only a real rebuild puts them right.
    sqlx::query("UPDATE account_summaries SET balance = balance + 1")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM account_statements WHERE sequence > 10")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM transfers")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE subject_totals SET balance = 0")
        .execute(&pool)
        .await
        .unwrap();

    // First, a rebuild of account_statement alone, stopped at about a quarter...
    let stop = Arc::new(Notify::new());
    let flag = stop.clone();
    stopped_half_way(
        &pool,
        async {
            rebuild::rebuild(
                &pool,
                &keys(&pool),
                names::ACCOUNT_STATEMENT,
                10,
                false,
                move |p| {
                    if p.events >= total / 4 {
                        flag.notify_one();
                    }
                },
            )
            .await
            .map(|report| vec![report])
        },
        stop,
    )
    .await;
    // ... then a pass over all of them, stopped once account_summary is half way (the
    // statement's shadow resumes from its own cursor inside the same pass)...
    let stop = Arc::new(Notify::new());
    let flag = stop.clone();
    stopped_half_way(
        &pool,
        rebuild::rebuild_many(
            &pool,
            &keys(&pool),
            &names::ALL,
            10,
            move |projection, p| {
                if projection == names::ACCOUNT_SUMMARY && p.events >= total / 2 {
                    flag.notify_one();
                }
            },
        ),
        stop,
    )
    .await;
    let left = shadows(&pool).await;
    assert_eq!(
        left.len(),
        names::ALL.len(),
        "every shadow is left half built: {left:?}"
    );
    for (projection, events) in &left {
        assert!(
            *events > 0 && *events < total,
            "{projection} is half way: {left:?} of {total}"
        );
    }

    // ... and the pass again: it resumes each shadow where it stopped and swaps them all in.
    let mut seen: Vec<(String, Progress)> = Vec::new();
    let reports = rebuild::rebuild_many(&pool, &keys(&pool), &["all"], 10, |projection, p| {
        seen.push((projection.to_owned(), p));
    })
    .await
    .unwrap();
    let rebuilt: Vec<&str> = reports.iter().map(|r| r.projection.as_str()).collect();
    assert_eq!(rebuilt, names::ALL);
    for report in &reports {
        assert!(report.swapped, "{report:?}");
        assert_eq!(
            report.progress.events, total,
            "{} resumed, not restarted from zero: {report:?}",
            report.projection
        );
    }
    for projection in names::ALL {
        assert!(
            seen.iter().filter(|(p, _)| p == projection).count() > 2,
            "progress reported per batch for {projection}"
        );
    }
    assert!(shadows(&pool).await.is_empty(), "no shadow left");
    assert_eq!(
        models(&pool).await,
        live,
        "the rebuilt models differ from live"
    );

    // And the dry run agrees, projection by projection.
    for projection in names::ALL {
        let report = rebuild::dry_run(&pool, &keys(&pool), projection, 50, |_| {}, &mut |_| {})
            .await
            .unwrap();
        assert!(
            report.differences.values().all(|d| d.is_empty()),
            "{projection}: {report:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_of_one_projection_is_refused_while_a_pass_over_all_holds_it_and_back() {
    let (_url, pool) = fresh_database().await;
    store_events(&pool).await;
    project_live(&pool).await;
    let live = models(&pool).await;

    // A pass running, held after taking its locks: the test holds the event store, which
    // the pass reads next. A rebuild of one of its projections is refused, and so is a
    // second pass over some of them.
    let mut hold = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *hold)
        .await
        .unwrap();
    let pass = {
        let pool = pool.clone();
        tokio::spawn(async move {
            rebuild::rebuild_many(&pool, &keys(&pool), &["all"], 50, |_, _| {}).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let locks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
              WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if locks == i64::try_from(names::ALL.len()).unwrap() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pass never took its locks: {locks}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Bounded: a rebuild let through would wait for the held store.
    let bounded = Duration::from_secs(30);
    let one = tokio::time::timeout(
        bounded,
        rebuild::rebuild(
            &pool,
            &keys(&pool),
            names::SUBJECT_TOTALS,
            50,
            false,
            |_| {},
        ),
    )
    .await
    .expect("refused at once, not let through");
    assert!(
        matches!(&one, Err(OpError::AlreadyRunning(p)) if p == names::SUBJECT_TOTALS),
        "{one:?}"
    );
    let second = tokio::time::timeout(
        bounded,
        rebuild::rebuild_many(
            &pool,
            &keys(&pool),
            &["transfers,account_statement"],
            50,
            |_, _| {},
        ),
    )
    .await
    .expect("refused at once, not let through");
    assert!(
        matches!(&second, Err(OpError::AlreadyRunning(p)) if p == names::ACCOUNT_STATEMENT),
        "{second:?}"
    );
    hold.rollback().await.unwrap();
    let reports = pass.await.unwrap().unwrap();
    assert!(reports.iter().all(|r| r.swapped), "{reports:?}");
    assert_eq!(models(&pool).await, live);

    // One projection's rebuild running (its lock held): a pass over all is refused before it
    // builds anything, and leaves none of the other locks held.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtext('ledger-rebuild:subject_totals'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let refused = rebuild::rebuild_many(&pool, &keys(&pool), &["all"], 50, |_, _| {}).await;
    assert!(
        matches!(&refused, Err(OpError::AlreadyRunning(p)) if p == names::SUBJECT_TOTALS),
        "{refused:?}"
    );
    assert!(
        shadows(&pool).await.is_empty(),
        "a refused pass built nothing"
    );
    let alone = rebuild::rebuild(
        &pool,
        &keys(&pool),
        names::ACCOUNT_SUMMARY,
        50,
        false,
        |_| {},
    )
    .await
    .unwrap();
    assert!(alone.swapped, "the refused pass released the locks it took");
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut *holder)
        .await
        .unwrap();

    // Names are checked before anything is locked; a dry run takes one projection.
    assert!(matches!(
        rebuild::rebuild_many(&pool, &keys(&pool), &["account_summary,balances"], 50, |_, _| {}).await,
        Err(OpError::UnknownProjection(p)) if p == "balances"
    ));
    assert!(matches!(
        rebuild::dry_run(&pool, &keys(&pool), "all", 50, |_| {}, &mut |_| {}).await,
        Err(OpError::Invalid(_))
    ));
}
