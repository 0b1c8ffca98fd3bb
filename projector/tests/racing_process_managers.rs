//! Two process managers racing on one transfer (ADR 0008, ADR 0016): the one that looked a
//! step up and found it free, then lost it to the other, must carry on from the winner's
//! event. A refusal its late command meets (the source short of the money the winner
//! debited, or closed once the winner's transfer settled) is the shadow of the lost race,
//! not a poison event: no dead letter, the transfer terminal, money conserved.
//!
//! The race is made deterministic with the process manager's step gate: the loser is held
//! just after its lookup (or just before it fails the transfer for a refusal) while the
//! winner takes the transfer to its end. The credit case is a guard: there the refund the
//! loser tries is refused by the step claim (`StepTaken`), and it already carried on.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger_command::domain::{Account, AccountCommand, Transfer, TransferCommand, TransferStatus};
use ledger_command::ledger::{Intent, Ledger, RetryPolicy};
use ledger_events::{
    Amount, Currency, Metadata, RecordedEvent, ACCOUNT_AGGREGATE_TYPE, TRANSFER_AGGREGATE_TYPE,
};
use ledger_platform::testing::fresh_database;
use ledger_projector::transfers::ProcessManager;
use sqlx::PgPool;
use tokio::sync::Notify;
use uuid::Uuid;

const AMOUNT: i64 = 100;

/// Waits for `future`, failing the test after a generous deadline.
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within 30 s"))
}

fn eur() -> Currency {
    "EUR".parse().unwrap()
}

fn amount(minor_units: i64) -> Amount {
    Amount::new(minor_units).unwrap()
}

/// The accounts and transfer of one race.
struct Race {
    pool: PgPool,
    accounts: Ledger<Account>,
    transfers: Ledger<Transfer>,
    source: Uuid,
    destination: Uuid,
    transfer: Uuid,
}

impl Race {
    /// A source holding exactly `AMOUNT`, an empty destination, and a transfer of `AMOUNT`
    /// between them, requested.
    async fn new() -> Self {
        let (_url, pool) = fresh_database().await;
        let race = Self {
            accounts: Ledger::new(pool.clone(), 100, RetryPolicy::default()),
            transfers: Ledger::new(pool.clone(), 100, RetryPolicy::default()),
            pool,
            source: Uuid::now_v7(),
            destination: Uuid::now_v7(),
            transfer: Uuid::now_v7(),
        };
        // Accounts hold no personal data: a subject id is all they need here.
        for id in [race.source, race.destination] {
            race.account(
                id,
                AccountCommand::Open {
                    subject_id: Uuid::now_v7(),
                    currency: eur(),
                },
            )
            .await;
        }
        race.account(
            race.source,
            AccountCommand::Deposit {
                amount: amount(AMOUNT),
                currency: eur(),
                reference: None,
            },
        )
        .await;
        race.transfers
            .execute(Intent {
                event_id: None,
                aggregate_id: race.transfer,
                command: TransferCommand::Request {
                    from: race.source,
                    to: race.destination,
                    amount: amount(AMOUNT),
                    currency: eur(),
                },
                metadata: Metadata::default(),
            })
            .await
            .unwrap();
        race
    }

    async fn account(&self, id: Uuid, command: AccountCommand) {
        self.accounts
            .execute(Intent {
                event_id: None,
                aggregate_id: id,
                command,
                metadata: Metadata::default(),
            })
            .await
            .unwrap();
    }

    /// Empties `id` and closes it (the winner's transfer being settled, it may close).
    async fn empty_and_close(&self, id: Uuid) {
        let (state, _) = self.accounts.load(id).await.unwrap();
        if state.balance > 0 {
            self.account(
                id,
                AccountCommand::Withdraw {
                    amount: amount(state.balance),
                    currency: eur(),
                    reference: None,
                },
            )
            .await;
        }
        self.account(id, AccountCommand::Close).await;
    }

    /// Withdraws the source's whole balance, leaving it open and empty.
    async fn empty_the_source(&self) {
        self.account(
            self.source,
            AccountCommand::Withdraw {
                amount: amount(AMOUNT),
                currency: eur(),
                reference: None,
            },
        )
        .await;
    }

    /// The transfer's event of type `event_type`, as stored.
    async fn transfer_event(&self, event_type: &str) -> RecordedEvent {
        let mut conn = self.pool.acquire().await.unwrap();
        ledger_store::events_of(
            &mut conn,
            TRANSFER_AGGREGATE_TYPE,
            &self.transfer.to_string(),
            1,
            i64::MAX,
        )
        .await
        .unwrap()
        .into_iter()
        .find(|event| event.event_type == event_type)
        .unwrap_or_else(|| panic!("no {event_type} stored"))
    }

    async fn status(&self) -> TransferStatus {
        self.transfers.load(self.transfer).await.unwrap().0.status
    }

    async fn dead_letters(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT reason FROM dead_letters ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Asserts conservation from the store: balances + in flight = deposits − withdrawals,
    /// with nothing in flight; returns the (source, destination) balances.
    async fn assert_money_conserved(&self) -> (i64, i64) {
        let sum = |event_type: &'static str| {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce(sum((payload->>'amount')::bigint), 0)::bigint
                   FROM events WHERE aggregate_type = $1 AND event_type = $2",
            )
            .bind(ACCOUNT_AGGREGATE_TYPE)
            .bind(event_type)
            .fetch_one(&self.pool)
        };
        let deposits = sum("MoneyDeposited").await.unwrap();
        let withdrawals = sum("MoneyWithdrawn").await.unwrap();
        let in_flight = sum("TransferSent").await.unwrap()
            - sum("TransferReceived").await.unwrap()
            - sum("TransferRefunded").await.unwrap();
        let (source, _) = self.accounts.load(self.source).await.unwrap();
        let (destination, _) = self.accounts.load(self.destination).await.unwrap();
        assert_eq!(in_flight, 0, "money left in flight");
        assert_eq!(
            source.balance + destination.balance + in_flight,
            deposits - withdrawals,
            "money not conserved"
        );
        assert!(source.outgoing.is_empty(), "{:?}", source.outgoing);
        assert_eq!(source.transfers_in_flight, 0);
        (source.balance, destination.balance)
    }
}

/// A process manager held at the `nth` command (from 1) that would take the step ending in
/// `suffix`, until `release` is notified; it notifies `arrived` when it gets there.
fn held_at(
    pool: &PgPool,
    suffix: &'static str,
    nth: usize,
) -> (ProcessManager, Arc<Notify>, Arc<Notify>) {
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let passed = Arc::new(AtomicUsize::new(0));
    let (at, go) = (arrived.clone(), release.clone());
    let manager = ProcessManager::new(pool.clone(), 1, false, 0).with_step_gate(move |step| {
        let (at, go) = (at.clone(), go.clone());
        let hold = step.ends_with(suffix) && passed.fetch_add(1, Ordering::SeqCst) + 1 == nth;
        Box::pin(async move {
            if hold {
                at.notify_one();
                go.notified().await;
            }
        })
    });
    (manager, arrived, release)
}

/// The loser looks the debit step up and finds it free; the winner then debits, credits,
/// settles and completes; `meanwhile` runs; the loser goes on with its debit.
async fn lose_the_debit(race: &Race, meanwhile: impl std::future::Future<Output = ()>) {
    let requested = race.transfer_event("TransferRequested").await;
    let winner = ProcessManager::new(race.pool.clone(), 1, false, 0);
    let (loser, arrived, release) = held_at(&race.pool, "/debit", 1);

    let late = tokio::spawn({
        let requested = requested.clone();
        async move { loser.drive(vec![requested]).await }
    });
    within("the loser reaches the debit step", arrived.notified()).await;

    assert_eq!(winner.drive(vec![requested]).await.unwrap(), 1);
    let debited = race.transfer_event("TransferDebited").await;
    assert_eq!(winner.drive(vec![debited]).await.unwrap(), 1);
    assert_eq!(race.status().await, TransferStatus::Completed);
    meanwhile.await;

    release.notify_one();
    let outcome = within("the loser's reaction ends", late).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[tokio::test]
async fn a_process_manager_that_lost_the_debit_to_another_leaves_no_dead_letter() {
    let race = Race::new().await;
    // The winner's debit leaves the source short: the loser's debit is refused.
    lose_the_debit(&race, async {}).await;

    assert_eq!(race.dead_letters().await, Vec::<String>::new());
    assert_eq!(race.status().await, TransferStatus::Completed);
    assert_eq!(race.assert_money_conserved().await, (0, AMOUNT));
}

#[tokio::test]
async fn a_lost_debit_refused_because_the_source_closed_meanwhile_leaves_no_dead_letter() {
    let race = Race::new().await;
    // The winner's transfer settled, so its source could close: the loser's debit meets a
    // closed account.
    lose_the_debit(&race, race.empty_and_close(race.source)).await;

    assert_eq!(race.dead_letters().await, Vec::<String>::new());
    assert_eq!(race.status().await, TransferStatus::Completed);
    assert_eq!(race.assert_money_conserved().await, (0, AMOUNT));
}

#[tokio::test]
async fn a_lost_credit_refused_because_the_destination_closed_meanwhile_refunds_nothing() {
    let race = Race::new().await;
    let winner = ProcessManager::new(race.pool.clone(), 1, false, 0);
    assert_eq!(
        winner
            .drive(vec![race.transfer_event("TransferRequested").await])
            .await
            .unwrap(),
        1
    );
    let debited = race.transfer_event("TransferDebited").await;
    let (loser, arrived, release) = held_at(&race.pool, "/credit", 1);
    let late = tokio::spawn({
        let debited = debited.clone();
        async move { loser.drive(vec![debited]).await }
    });
    within("the loser reaches the credit step", arrived.notified()).await;

    assert_eq!(winner.drive(vec![debited]).await.unwrap(), 1);
    assert_eq!(race.status().await, TransferStatus::Completed);
    // The destination spends the money and closes: the loser's credit meets a closed
    // account, and a refund now would pay the source twice.
    race.empty_and_close(race.destination).await;
    release.notify_one();
    let outcome = within("the loser's reaction ends", late).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");

    assert_eq!(race.dead_letters().await, Vec::<String>::new());
    assert_eq!(race.status().await, TransferStatus::Completed);
    assert_eq!(race.assert_money_conserved().await, (0, 0));
}

#[tokio::test]
async fn a_debit_refused_for_want_of_funds_then_taken_by_another_leaves_no_dead_letter() {
    let race = Race::new().await;
    race.empty_the_source().await;
    let requested = race.transfer_event("TransferRequested").await;
    // The loser's debit is refused for want of funds, the step still free: it is held just
    // before it fails the transfer (its second command that would take the debit step).
    let (loser, arrived, release) = held_at(&race.pool, "/debit", 2);
    let late = tokio::spawn({
        let requested = requested.clone();
        async move { loser.drive(vec![requested]).await }
    });
    within(
        "the loser is about to fail the transfer",
        arrived.notified(),
    )
    .await;

    // The money arrives; the winner debits and completes.
    race.account(
        race.source,
        AccountCommand::Deposit {
            amount: amount(AMOUNT),
            currency: eur(),
            reference: None,
        },
    )
    .await;
    let winner = ProcessManager::new(race.pool.clone(), 1, false, 0);
    assert_eq!(winner.drive(vec![requested]).await.unwrap(), 1);
    let debited = race.transfer_event("TransferDebited").await;
    assert_eq!(winner.drive(vec![debited]).await.unwrap(), 1);
    assert_eq!(race.status().await, TransferStatus::Completed);

    release.notify_one();
    let outcome = within("the loser's reaction ends", late).await.unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");

    assert_eq!(race.dead_letters().await, Vec::<String>::new());
    assert_eq!(race.status().await, TransferStatus::Completed);
    assert_eq!(race.assert_money_conserved().await, (0, AMOUNT));
}
