//! Group commit and the in-memory aggregates (ADR 0010): batching never costs correctness,
//! and a cache made stale by another process never decides anything on its own.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use ledger_command::domain::AccountCommand;
use ledger_command::ledger::{Intent, Ledger, LedgerError, RetryPolicy};
use ledger_events::{Amount, Metadata};
use sqlx::Connection;

use crate::durability::{hold_next_sequence, wait_for_lock_waiter};
use crate::helpers::{eventually, spawn_app, spawn_app_on, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_share_transactions_and_keep_every_version() {
    let app = spawn_app().await;
    let hot = app.new_account().await;
    let others = [app.new_account().await, app.new_account().await];
    let requests = (0..60).map(|i| {
        let account = if i % 3 == 0 { others[i % 2] } else { hot };
        app.deposit(account, 1, None)
    });
    let answers = join_all(requests).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.text);
    }

    // Every command on the hot account got its own version, in one unbroken run.
    let mut versions: Vec<i64> = answers
        .iter()
        .filter(|a| a.body["account_id"] == hot.to_string())
        .map(|a| a.body["version"].as_i64().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<_>>());
    assert_eq!(app.balance_from_events(hot).await, 40);
    for other in others {
        assert_eq!(app.balance_from_events(other).await, 10);
    }

    // Each answer's position is its own event's position.
    for answer in &answers {
        let (position,): (i64,) = sqlx::query_as(
            "SELECT global_position FROM events WHERE aggregate_id = $1 AND sequence = $2",
        )
        .bind(answer.body["account_id"].as_str().unwrap())
        .bind(answer.body["version"].as_i64().unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(answer.body["position"], position);
    }

    // Group commit: 60 deposits in flight together were not 60 transactions.
    let transactions: HashSet<String> = sqlx::query_scalar::<_, String>(
        "SELECT transaction_id::text FROM events WHERE event_type = 'MoneyDeposited'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(
        transactions.len() < 60,
        "60 concurrent deposits took {} transactions",
        transactions.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_cache_is_stale_builds_on_the_other_replicas_events() {
    let first = spawn_app().await;
    let second = spawn_app_on(&first.database_url, first.pool.clone(), &[]).await;
    let stale = first.new_account().await;
    let bystander = first.new_account().await;
    assert_eq!(first.deposit(stale, 10, None).await.status, 200);
    assert_eq!(first.deposit(bystander, 10, None).await.status, 200);
    // The second replica moves the account on; the first still holds version 2.
    let moved = second.deposit(stale, 5, None).await;
    assert_eq!(moved.body["version"], 3, "{}", moved.text);

    // Batched beside commands on an account whose entry is current.
    let requests = (0..20).map(|i| {
        let account = if i % 2 == 0 { stale } else { bystander };
        first.deposit(account, 1, None)
    });
    for answer in join_all(requests).await {
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    assert_eq!(first.balance_from_events(stale).await, 25);
    assert_eq!(first.balance_from_events(bystander).await, 20);
    let answer = first.withdraw(stale, 25, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["version"], 14);
    assert_eq!(answer.body["balance"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_never_decided_on_a_stale_cache() {
    let first = spawn_app().await;
    let second = spawn_app_on(&first.database_url, first.pool.clone(), &[]).await;
    let id = first.new_account().await;
    first
        .withdraw(id, 50, None)
        .await
        .assert_problem(422, "insufficient_funds");
    // Money arrives through the other replica; the first one's memory says 0.
    assert_eq!(second.deposit(id, 100, None).await.status, 200);
    let answer = first.withdraw(id, 50, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["balance"], 50);
    assert_eq!(answer.body["version"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_stale_cache_would_accept_is_decided_on_the_current_state() {
    let first = spawn_app().await;
    let second = spawn_app_on(&first.database_url, first.pool.clone(), &[]).await;
    let id = first.new_account().await;
    assert_eq!(second.deposit(id, 7, None).await.status, 200);
    // Closing needs a zero balance: the first replica's memory has 0, the store has 7. The
    // append on the stale version fails, and the command is decided again, on 7.
    first
        .close(id, None)
        .await
        .assert_problem(422, "balance_not_zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_under_one_key_never_share_a_batch() {
    // The key trigger lets a transaction add events under a key it claimed itself, so two
    // first-time duplicates committed in one batch would both be appended.
    let app = spawn_app().await;
    let (blocker, target) = (app.new_account().await, app.new_account().await);
    let ledger: std::sync::Arc<Ledger> =
        std::sync::Arc::new(Ledger::new(app.pool.clone(), 100, RetryPolicy::default()));
    let deposit = |account, key: Option<&str>| Intent {
        aggregate_id: account,
        command: AccountCommand::Deposit {
            amount: Amount::new(250).unwrap(),
            currency: "EUR".parse().unwrap(),
            reference: None,
        },
        metadata: Metadata {
            idempotency_key: key.map(str::to_owned),
            ..Metadata::default()
        },
        event_id: None,
    };
    // Keep the writer busy: its statement waits on a rival holding the blocker's version 2.
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, blocker, 2).await;
    let busy = {
        let (ledger, intent) = (ledger.clone(), deposit(blocker, None));
        tokio::spawn(async move { ledger.execute(intent).await })
    };
    wait_for_lock_waiter(&app.pool).await;
    // One poll queues all twenty behind the blocked statement (a submit enqueues before it
    // waits); then the rival gives way and they are taken together.
    let mut duplicates = Box::pin(join_all(
        (0..20).map(|_| ledger.execute(deposit(target, Some("one-batch")))),
    ));
    assert!(futures::poll!(&mut duplicates).is_pending());
    tx.rollback().await.unwrap();
    let duplicates = duplicates.await;
    busy.await.unwrap().unwrap();
    let appended = duplicates.iter().filter(|r| r.is_ok()).count();
    assert_eq!(appended, 1, "{duplicates:?}");
    for refused in duplicates.iter().filter(|r| r.is_err()) {
        assert!(matches!(refused, Err(LedgerError::KeyTaken)), "{refused:?}");
    }
    assert_eq!(app.balance_from_events(target).await, 250);
    assert_eq!(app.events_of(target).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_answered_503_with_retry_after_and_nothing_is_queued() {
    // One batch at a time, so that one stuck statement is a stuck writer (with a pipeline,
    // the writer would go on committing other accounts' batches beside it).
    let app = spawn_app_with(&["--command-queue-max", "1", "--command-pipeline-depth", "1"]).await;
    let (blocked, other) = (app.new_account().await, app.new_account().await);
    // The writer is stuck: its statement waits on a rival holding the blocked account's
    // version 2.
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, blocked, 2).await;
    let stuck = app.spawn_deposit(blocked, 5);
    wait_for_lock_waiter(&app.pool).await;

    // Room for one more: of two commands sent now, one waits and the other is refused.
    let contenders = [app.spawn_deposit(other, 1), app.spawn_deposit(other, 1)];
    eventually(Duration::from_secs(10), "one command to be refused", || {
        let finished = contenders.iter().filter(|c| c.is_finished()).count();
        async move { finished > 0 }
    })
    .await;
    assert_eq!(
        contenders.iter().filter(|c| c.is_finished()).count(),
        1,
        "the queue held more than its bound"
    );
    let (refused, waiting): (Vec<_>, Vec<_>) =
        contenders.into_iter().partition(|c| c.is_finished());
    let refused = refused.into_iter().next().unwrap().await.unwrap();
    refused.assert_problem(503, "overloaded");
    assert_eq!(refused.headers["retry-after"], "1");

    tx.rollback().await.unwrap();
    assert_eq!(stuck.await.unwrap().status, 200);
    for waiting in waiting {
        let answer = waiting.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    assert_eq!(
        app.balance_from_events(other).await,
        1,
        "the refused deposit was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_caller_has_gone_before_it_started_is_never_committed() {
    let app = spawn_app().await;
    let (blocked, target) = (app.new_account().await, app.new_account().await);
    let ledger: Ledger = Ledger::new(app.pool.clone(), 100, RetryPolicy::default());
    let deposit = |account, amount| Intent {
        aggregate_id: account,
        command: AccountCommand::Deposit {
            amount: Amount::new(amount).unwrap(),
            currency: "EUR".parse().unwrap(),
            reference: None,
        },
        metadata: Metadata::default(),
        event_id: None,
    };
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, blocked, 2).await;
    let mut stuck = Box::pin(ledger.execute(deposit(blocked, 5)));
    assert!(futures::poll!(&mut stuck).is_pending());
    wait_for_lock_waiter(&app.pool).await;

    // Queued behind the stuck batch (one poll enqueues it; its account is in that batch, so
    // even a pipelined writer holds it back), then its caller goes away, as a request
    // timeout or a dropped connection drops the handler.
    let mut gone = Box::pin(ledger.execute(deposit(blocked, 50)));
    assert!(futures::poll!(&mut gone).is_pending());
    drop(gone);

    tx.rollback().await.unwrap();
    stuck.await.unwrap();
    // Queued after the abandoned command, so answered only once it has been dealt with.
    let later = ledger.execute(deposit(blocked, 1)).await.unwrap();
    assert_eq!(
        later.state.balance, 6,
        "the abandoned deposit was committed"
    );
    assert_eq!(app.balance_from_events(blocked).await, 6);
    assert_eq!(app.events_of(blocked).await.len(), 3);
    assert_eq!(app.events_of(target).await.len(), 1);
}

/// A deposit of `amount` into `account` with the given metadata.
fn deposit_with(account: uuid::Uuid, amount: i64, metadata: Metadata) -> Intent {
    Intent {
        aggregate_id: account,
        command: AccountCommand::Deposit {
            amount: Amount::new(amount).unwrap(),
            currency: "EUR".parse().unwrap(),
            reference: None,
        },
        metadata,
        event_id: None,
    }
}

/// Runs `then` while the ledger's writer is stuck on a rival holding `blocker`'s version 2,
/// so that every command `then` submits (one poll each) lands in the writer's next batch.
async fn in_one_batch<T>(
    app: &crate::helpers::TestApp,
    ledger: &Ledger,
    blocker: uuid::Uuid,
    then: impl std::future::Future<Output = T>,
) -> T {
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, blocker, 2).await;
    let mut busy = Box::pin(ledger.execute(deposit_with(blocker, 1, Metadata::default())));
    assert!(futures::poll!(&mut busy).is_pending());
    wait_for_lock_waiter(&app.pool).await;
    let mut then = Box::pin(then);
    assert!(futures::poll!(&mut then).is_pending());
    tx.rollback().await.unwrap();
    busy.await.unwrap();
    then.await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_or_step_claimed_elsewhere_fails_only_its_command_and_the_rest_commit_together() {
    let app = spawn_app().await;
    let blocker = app.new_account().await;
    let target = app.new_account().await;
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(app.new_account().await);
    }
    let ledger: Ledger = Ledger::new(app.pool.clone(), 100, RetryPolicy::default());
    let keyed = Metadata {
        idempotency_key: Some("claimed".into()),
        ..Metadata::default()
    };
    let stepped = Metadata {
        transfer_step: Some(format!("{}/credit", uuid::Uuid::now_v7())),
        ..Metadata::default()
    };
    // The key and the step are taken first (as by another replica's earlier commands).
    ledger
        .execute(deposit_with(target, 10, keyed.clone()))
        .await
        .unwrap();
    ledger
        .execute(deposit_with(target, 20, stepped.clone()))
        .await
        .unwrap();

    let (key_dup, step_dup, rest) = in_one_batch(&app, &ledger, blocker, async {
        futures::join!(
            ledger.execute(deposit_with(target, 10, keyed.clone())),
            ledger.execute(deposit_with(target, 20, stepped.clone())),
            join_all(others.iter().map(|&other| ledger.execute(deposit_with(
                other,
                3,
                Metadata::default()
            ))))
        )
    })
    .await;
    assert!(matches!(key_dup, Err(LedgerError::KeyTaken)), "{key_dup:?}");
    assert!(
        matches!(step_dup, Err(LedgerError::StepTaken(_))),
        "{step_dup:?}"
    );
    for outcome in &rest {
        assert_eq!(outcome.as_ref().unwrap().state.balance, 3);
    }
    assert_eq!(app.balance_from_events(target).await, 30);
    let other_ids: Vec<String> = others.iter().map(ToString::to_string).collect();
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id::text) FROM events
          WHERE event_type = 'MoneyDeposited' AND aggregate_id = ANY($1)",
    )
    .bind(&other_ids)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        transactions, 1,
        "the rest of the batch paid for the duplicates: committed one by one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_aggregate_fails_only_its_own_commands() {
    let app = spawn_app().await;
    let blocker = app.new_account().await;
    let healthy = app.new_account().await;
    let broken = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, 1, 'MoneyDeposited', '2', '{\"type\":\"MoneyDeposited\",\"amount\":\"lots\"}', '{}')",
    )
    .bind(broken.to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    let ledger: Ledger = Ledger::new(app.pool.clone(), 100, RetryPolicy::default());

    let (on_broken, on_healthy) = in_one_batch(&app, &ledger, blocker, async {
        futures::join!(
            ledger.execute(deposit_with(broken, 5, Metadata::default())),
            ledger.execute(deposit_with(healthy, 5, Metadata::default())),
        )
    })
    .await;
    assert!(
        matches!(on_broken, Err(LedgerError::Internal(_))),
        "{on_broken:?}"
    );
    assert_eq!(on_healthy.unwrap().state.balance, 5);
    assert_eq!(app.balance_from_events(healthy).await, 5);
}

/// Pipelining (`COMMAND_PIPELINE_DEPTH=2`): while one batch waits on a lock, the writer
/// commits the next batch for other accounts; a command on an account still in a committing
/// batch waits for it and is decided on what it left. With a depth of 1 the other account's
/// deposit waits too (the first `eventually` fails); with the in-flight aggregate not held
/// back, the withdrawal is decided on the balance before the stuck deposit and refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_writer_commits_other_accounts_while_a_batch_waits_and_holds_back_its_account()
{
    let app = spawn_app_with(&["--command-pipeline-depth", "2"]).await;
    let (blocked, other) = (app.new_account().await, app.new_account().await);
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, blocked, 2).await;
    let stuck = app.spawn_deposit(blocked, 5);
    wait_for_lock_waiter(&app.pool).await;

    // Needs the deposit before it: it may only be decided once that batch has committed.
    let withdrawal = app.spawn_withdraw(blocked, 5);
    // Sent after the withdrawal, answered while the first batch still waits.
    let free = app.spawn_deposit(other, 7);
    eventually(
        Duration::from_secs(10),
        "a deposit on another account to commit while a batch waits",
        || {
            let done = free.is_finished();
            async move { done }
        },
    )
    .await;
    assert_eq!(free.await.unwrap().status, 200);
    assert!(!stuck.is_finished(), "the stuck batch was answered early");

    tx.rollback().await.unwrap();
    let (stuck, withdrawal) = (stuck.await.unwrap(), withdrawal.await.unwrap());
    assert_eq!(stuck.status, 200, "{}", stuck.text);
    assert_eq!(withdrawal.status, 200, "{}", withdrawal.text);
    let kinds: Vec<(i64, String)> = app
        .events_of(blocked)
        .await
        .into_iter()
        .map(|(sequence, kind, _, _)| (sequence, kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "AccountOpened".to_owned()),
            (2, "MoneyDeposited".to_owned()),
            (3, "MoneyWithdrawn".to_owned())
        ]
    );
    assert_eq!(app.balance_from_events(blocked).await, 0);
    assert_eq!(app.balance_from_events(other).await, 7);
}

/// With a pipeline, commands waiting for an aggregate that a committing batch holds are
/// held back by the writer; at most a batch of them, the rest stay in the bounded queue, so
/// a full queue is still refused at once. (Without the limit the writer drained the queue
/// into its own unbounded list and nothing was ever refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_writer_holds_back_at_most_a_batch_and_the_queue_bound_still_refuses() {
    let app = spawn_app_with(&[
        "--command-queue-max",
        "1",
        "--command-batch-max",
        "1",
        "--command-pipeline-depth",
        "2",
    ])
    .await;
    let blocked = app.new_account().await;
    let mut rival = sqlx::PgConnection::connect(&app.database_url)
        .await
        .unwrap();
    let mut tx = rival.begin().await.unwrap();
    hold_next_sequence(&mut tx, blocked, 2).await;
    let stuck = app.spawn_deposit(blocked, 5);
    wait_for_lock_waiter(&app.pool).await;

    // One is held back by the writer (a batch of 1), one waits in the queue (room for 1),
    // one is refused.
    let contenders = [
        app.spawn_deposit(blocked, 1),
        app.spawn_deposit(blocked, 1),
        app.spawn_deposit(blocked, 1),
    ];
    eventually(Duration::from_secs(10), "one command to be refused", || {
        let finished = contenders.iter().filter(|c| c.is_finished()).count();
        async move { finished > 0 }
    })
    .await;
    let (refused, waiting): (Vec<_>, Vec<_>) =
        contenders.into_iter().partition(|c| c.is_finished());
    assert_eq!(refused.len(), 1, "more than the bound was refused");
    let refused = refused.into_iter().next().unwrap().await.unwrap();
    refused.assert_problem(503, "overloaded");

    tx.rollback().await.unwrap();
    assert_eq!(stuck.await.unwrap().status, 200);
    for waiting in waiting {
        let answer = waiting.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    assert_eq!(app.balance_from_events(blocked).await, 7);
}
