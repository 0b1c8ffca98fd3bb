//! The account aggregate: opened in one currency, credited, debited, closed at zero.

use std::collections::BTreeMap;

use ledger_events::{
    AccountEvent, Amount, Currency, DecodeError, RecordedEvent, ACCOUNT_AGGREGATE_TYPE,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Decider;

/// What a client asks of an account (imperative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open a new account for `owner` in `currency`.
    Open { owner: String, currency: Currency },
    /// Credit `amount`; `currency` must be the account's.
    Deposit {
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// Debit `amount`; never below zero.
    Withdraw {
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// Close the account; only at a zero balance with no transfer of its in flight.
    Close,
    /// The source leg of a transfer: debit `amount` (never below zero).
    SendTransfer {
        transfer_id: Uuid,
        to: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// The destination leg of a transfer: credit `amount`.
    ReceiveTransfer {
        transfer_id: Uuid,
        from: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// Give back a transfer this account sent, which its destination refused. Accepted in
    /// any state: the money was this account's (and it cannot be closed meanwhile).
    RefundTransfer {
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
        code: String,
        reason: String,
    },
    /// A transfer this account sent reached its destination.
    SettleTransfer { transfer_id: Uuid },
}

/// Where an account is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    /// No `AccountOpened` yet: the account does not exist.
    #[default]
    Unopened,
    /// Open for business.
    Open,
    /// Closed; refuses everything.
    Closed,
}

/// A domain rule the command would break. Each variant has a stable [`code`](Self::code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The account was never opened.
    #[error("no account with this id exists")]
    NotFound,
    /// Opening an account that exists.
    #[error("an account with this id already exists")]
    AlreadyExists,
    /// Any command on a closed account.
    #[error("the account is closed")]
    Closed,
    /// Money in another currency than the account's.
    #[error("the account holds {expected}, not {given}")]
    CurrencyMismatch { expected: Currency, given: Currency },
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: the balance is {balance}, the withdrawal {requested}")]
    InsufficientFunds { balance: i64, requested: i64 },
    /// A credit that would take the balance, plus the money in flight from this account
    /// (which a refund may bring back), past the largest representable amount (ADR 0016).
    #[error(
        "the credit would take the balance, with the money in flight from it, past the largest supported amount"
    )]
    BalanceOverflow { balance: i64, requested: i64 },
    /// Closing an account that still holds money.
    #[error("the account can only be closed at a zero balance; it holds {balance}")]
    BalanceNotZero { balance: i64 },
    /// Closing an account with transfers sent but not yet credited or refunded.
    #[error(
        "the account has {count} outgoing transfer(s) in flight; close it once they are settled"
    )]
    TransfersInFlight { count: u32 },
}

impl AccountError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "account_not_found",
            Self::AlreadyExists => "account_already_exists",
            Self::Closed => "account_closed",
            Self::CurrencyMismatch { .. } => "currency_mismatch",
            Self::InsufficientFunds { .. } => "insufficient_funds",
            Self::BalanceOverflow { .. } => "balance_overflow",
            Self::BalanceNotZero { .. } => "balance_not_zero",
            Self::TransfersInFlight { .. } => "transfers_in_flight",
        }
    }
}

/// The account's state, folded from its events. Also the snapshot payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Where the account is in its life.
    pub status: AccountStatus,
    /// Who owns it (as given at opening).
    pub owner: String,
    /// The only currency it holds; `None` until opened.
    pub currency: Option<Currency>,
    /// Minor units; never negative.
    pub balance: i64,
    /// Transfers sent and neither settled nor refunded yet (absent in older snapshots).
    #[serde(default)]
    pub transfers_in_flight: u32,
    /// The amounts of those transfers, by transfer id: money that may come back by a refund,
    /// so credits keep room for it (ADR 0016). Absent in older snapshots.
    #[serde(default)]
    pub outgoing: BTreeMap<Uuid, i64>,
}

impl Decider for Account {
    /// The events `command` produces from this state, or the rule it breaks.
    fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner, currency } => match self.status {
                AccountStatus::Unopened => {
                    // Placeholder of the read half (h42) so the workspace compiles; the write
                    // half (h41) replaces `owner` by a subject id chosen by the API.
                    Ok(vec![AccountEvent::AccountOpened {
                        subject_id: ledger_events::subject::legacy_subject_id(&owner),
                        currency,
                        legacy_owner: None,
                    }])
                }
                AccountStatus::Open | AccountStatus::Closed => Err(AccountError::AlreadyExists),
            },
            AccountCommand::Deposit {
                amount,
                currency,
                reference,
            } => {
                self.check_credit(amount, currency)?;
                Ok(vec![AccountEvent::MoneyDeposited {
                    amount,
                    currency,
                    reference,
                }])
            }
            AccountCommand::Withdraw {
                amount,
                currency,
                reference,
            } => {
                self.check_debit(amount, currency)?;
                Ok(vec![AccountEvent::MoneyWithdrawn {
                    amount,
                    currency,
                    reference,
                }])
            }
            AccountCommand::Close => {
                self.check_open()?;
                if self.balance != 0 {
                    return Err(AccountError::BalanceNotZero {
                        balance: self.balance,
                    });
                }
                if self.transfers_in_flight > 0 {
                    return Err(AccountError::TransfersInFlight {
                        count: self.transfers_in_flight,
                    });
                }
                Ok(vec![AccountEvent::AccountClosed {}])
            }
            AccountCommand::SendTransfer {
                transfer_id,
                to,
                amount,
                currency,
            } => {
                self.check_debit(amount, currency)?;
                Ok(vec![AccountEvent::TransferSent {
                    transfer_id,
                    to,
                    amount,
                    currency,
                }])
            }
            AccountCommand::ReceiveTransfer {
                transfer_id,
                from,
                amount,
                currency,
            } => {
                self.check_credit(amount, currency)?;
                Ok(vec![AccountEvent::TransferReceived {
                    transfer_id,
                    from,
                    amount,
                    currency,
                }])
            }
            AccountCommand::RefundTransfer {
                transfer_id,
                amount,
                currency,
                code,
                reason,
            } => {
                if self.status == AccountStatus::Unopened {
                    return Err(AccountError::NotFound);
                }
                Ok(vec![AccountEvent::TransferRefunded {
                    transfer_id,
                    amount,
                    currency,
                    code,
                    reason,
                }])
            }
            AccountCommand::SettleTransfer { transfer_id } => {
                if self.status == AccountStatus::Unopened {
                    return Err(AccountError::NotFound);
                }
                Ok(vec![AccountEvent::TransferSettled { transfer_id }])
            }
        }
    }

    /// Folds one event into the state. Events are facts: this never fails. Arithmetic
    /// saturates rather than wrapping, though `decide` never lets it get there: credits keep
    /// room for every refund still possible (ADR 0016).
    fn fold(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::AccountOpened {
                subject_id,
                currency,
                legacy_owner,
            } => {
                self.status = AccountStatus::Open;
                self.owner = legacy_owner
                    .clone()
                    .unwrap_or_else(|| subject_id.to_string());
                self.currency = Some(*currency);
            }
            AccountEvent::MoneyDeposited { amount, .. } => {
                self.balance = self.balance.saturating_add(amount.minor_units());
            }
            AccountEvent::MoneyWithdrawn { amount, .. } => {
                self.balance = self.balance.saturating_sub(amount.minor_units());
            }
            AccountEvent::AccountClosed {} => self.status = AccountStatus::Closed,
            AccountEvent::TransferSent {
                transfer_id,
                amount,
                ..
            } => {
                self.balance = self.balance.saturating_sub(amount.minor_units());
                self.transfers_in_flight = self.transfers_in_flight.saturating_add(1);
                self.outgoing.insert(*transfer_id, amount.minor_units());
            }
            AccountEvent::TransferReceived { amount, .. } => {
                self.balance = self.balance.saturating_add(amount.minor_units());
            }
            AccountEvent::TransferRefunded {
                transfer_id,
                amount,
                ..
            } => {
                self.balance = self.balance.saturating_add(amount.minor_units());
                self.transfers_in_flight = self.transfers_in_flight.saturating_sub(1);
                self.outgoing.remove(transfer_id);
            }
            AccountEvent::TransferSettled { transfer_id } => {
                self.transfers_in_flight = self.transfers_in_flight.saturating_sub(1);
                self.outgoing.remove(transfer_id);
            }
        }
    }

    fn read(event: &RecordedEvent) -> Result<Self::Event, DecodeError> {
        event.decode_account()
    }
}

impl Account {
    /// The money in flight from this account: what refunds may still bring back.
    fn outgoing_in_flight(&self) -> i64 {
        self.outgoing
            .values()
            .fold(0i64, |sum, amount| sum.saturating_add(*amount))
    }

    /// A credit must leave room for every refund still possible: the balance plus the money
    /// in flight from the account stays within `i64` (ADR 0016), so a refund always fits.
    fn check_credit(&self, amount: Amount, currency: Currency) -> Result<(), AccountError> {
        self.check_accepts(currency)?;
        let headroom = self.balance.checked_add(self.outgoing_in_flight());
        if headroom
            .and_then(|held| held.checked_add(amount.minor_units()))
            .is_none()
        {
            return Err(AccountError::BalanceOverflow {
                balance: self.balance,
                requested: amount.minor_units(),
            });
        }
        Ok(())
    }

    fn check_debit(&self, amount: Amount, currency: Currency) -> Result<(), AccountError> {
        self.check_accepts(currency)?;
        if amount.minor_units() > self.balance {
            return Err(AccountError::InsufficientFunds {
                balance: self.balance,
                requested: amount.minor_units(),
            });
        }
        Ok(())
    }

    fn check_open(&self) -> Result<(), AccountError> {
        match self.status {
            AccountStatus::Unopened => Err(AccountError::NotFound),
            AccountStatus::Closed => Err(AccountError::Closed),
            AccountStatus::Open => Ok(()),
        }
    }

    fn check_accepts(&self, currency: Currency) -> Result<(), AccountError> {
        self.check_open()?;
        match self.currency {
            Some(expected) if expected != currency => Err(AccountError::CurrencyMismatch {
                expected,
                given: currency,
            }),
            _ => Ok(()),
        }
    }
}

super::aggregate_via_decider!(
    Account,
    ACCOUNT_AGGREGATE_TYPE,
    AccountCommand,
    AccountEvent,
    AccountError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type AccountTest = TestFramework<Account>;

    fn eur() -> Currency {
        "EUR".parse().unwrap()
    }

    fn usd() -> Currency {
        "USD".parse().unwrap()
    }

    fn amount(units: i64) -> Amount {
        Amount::new(units).unwrap()
    }

    fn opened() -> AccountEvent {
        AccountEvent::AccountOpened {
            owner: "alice".into(),
            currency: eur(),
        }
    }

    fn deposited(units: i64) -> AccountEvent {
        AccountEvent::MoneyDeposited {
            amount: amount(units),
            currency: eur(),
            reference: None,
        }
    }

    fn withdrawn(units: i64) -> AccountEvent {
        AccountEvent::MoneyWithdrawn {
            amount: amount(units),
            currency: eur(),
            reference: None,
        }
    }

    fn deposit(units: i64, currency: Currency) -> AccountCommand {
        AccountCommand::Deposit {
            amount: amount(units),
            currency,
            reference: None,
        }
    }

    fn withdraw(units: i64) -> AccountCommand {
        AccountCommand::Withdraw {
            amount: amount(units),
            currency: eur(),
            reference: None,
        }
    }

    #[test]
    fn opening_a_new_account_records_owner_and_currency() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(AccountCommand::Open {
                owner: "alice".into(),
                currency: eur(),
            })
            .then_expect_events(vec![opened()]);
    }

    #[test]
    fn opening_an_existing_account_is_refused() {
        AccountTest::with(())
            .given(vec![opened()])
            .when(AccountCommand::Open {
                owner: "bob".into(),
                currency: usd(),
            })
            .then_expect_error(AccountError::AlreadyExists);
    }

    #[test]
    fn depositing_into_an_open_account_credits_it() {
        AccountTest::with(())
            .given(vec![opened()])
            .when(deposit(500, eur()))
            .then_expect_events(vec![deposited(500)]);
    }

    #[test]
    fn depositing_into_an_unknown_account_is_not_found() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(deposit(500, eur()))
            .then_expect_error(AccountError::NotFound);
    }

    #[test]
    fn depositing_another_currency_is_a_currency_mismatch() {
        AccountTest::with(())
            .given(vec![opened()])
            .when(deposit(500, usd()))
            .then_expect_error(AccountError::CurrencyMismatch {
                expected: eur(),
                given: usd(),
            });
    }

    #[test]
    fn depositing_past_the_largest_balance_is_refused() {
        AccountTest::with(())
            .given(vec![opened(), deposited(i64::MAX - 10)])
            .when(deposit(11, eur()))
            .then_expect_error(AccountError::BalanceOverflow {
                balance: i64::MAX - 10,
                requested: 11,
            });
    }

    #[test]
    fn withdrawing_up_to_the_balance_debits_it() {
        AccountTest::with(())
            .given(vec![opened(), deposited(100), withdrawn(30)])
            .when(withdraw(70))
            .then_expect_events(vec![withdrawn(70)]);
    }

    #[test]
    fn withdrawing_more_than_the_balance_is_insufficient_funds() {
        AccountTest::with(())
            .given(vec![opened(), deposited(100)])
            .when(withdraw(101))
            .then_expect_error(AccountError::InsufficientFunds {
                balance: 100,
                requested: 101,
            });
    }

    #[test]
    fn closing_at_zero_balance_closes_the_account() {
        AccountTest::with(())
            .given(vec![opened(), deposited(100), withdrawn(100)])
            .when(AccountCommand::Close)
            .then_expect_events(vec![AccountEvent::AccountClosed {}]);
    }

    #[test]
    fn closing_with_money_left_is_refused() {
        AccountTest::with(())
            .given(vec![opened(), deposited(100)])
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::BalanceNotZero { balance: 100 });
    }

    #[test]
    fn a_closed_account_refuses_everything() {
        for command in [deposit(1, eur()), withdraw(1), AccountCommand::Close] {
            AccountTest::with(())
                .given(vec![opened(), AccountEvent::AccountClosed {}])
                .when(command)
                .then_expect_error(AccountError::Closed);
        }
    }

    fn sent(units: i64) -> AccountEvent {
        AccountEvent::TransferSent {
            transfer_id: Uuid::from_u128(7),
            to: Uuid::from_u128(9),
            amount: amount(units),
            currency: eur(),
        }
    }

    #[test]
    fn a_transfer_is_sent_only_from_what_the_account_holds() {
        AccountTest::with(())
            .given(vec![opened(), deposited(100)])
            .when(AccountCommand::SendTransfer {
                transfer_id: Uuid::from_u128(7),
                to: Uuid::from_u128(9),
                amount: amount(100),
                currency: eur(),
            })
            .then_expect_events(vec![sent(100)]);
        AccountTest::with(())
            .given(vec![opened(), deposited(100), sent(60)])
            .when(AccountCommand::SendTransfer {
                transfer_id: Uuid::from_u128(8),
                to: Uuid::from_u128(9),
                amount: amount(41),
                currency: eur(),
            })
            .then_expect_error(AccountError::InsufficientFunds {
                balance: 40,
                requested: 41,
            });
    }

    #[test]
    fn a_closed_or_foreign_currency_account_refuses_to_receive() {
        let receive = |currency| AccountCommand::ReceiveTransfer {
            transfer_id: Uuid::from_u128(7),
            from: Uuid::from_u128(9),
            amount: amount(5),
            currency,
        };
        AccountTest::with(())
            .given(vec![opened(), AccountEvent::AccountClosed {}])
            .when(receive(eur()))
            .then_expect_error(AccountError::Closed);
        AccountTest::with(())
            .given(vec![opened()])
            .when(receive(usd()))
            .then_expect_error(AccountError::CurrencyMismatch {
                expected: eur(),
                given: usd(),
            });
    }

    #[test]
    fn an_account_with_a_transfer_in_flight_cannot_be_closed_until_it_settles() {
        AccountTest::with(())
            .given(vec![opened(), deposited(10), sent(10)])
            .when(AccountCommand::Close)
            .then_expect_error(AccountError::TransfersInFlight { count: 1 });
        AccountTest::with(())
            .given(vec![
                opened(),
                deposited(10),
                sent(10),
                AccountEvent::TransferSettled {
                    transfer_id: Uuid::from_u128(7),
                },
            ])
            .when(AccountCommand::Close)
            .then_expect_events(vec![AccountEvent::AccountClosed {}]);
    }

    #[test]
    fn a_refund_restores_the_balance_and_ends_the_flight() {
        let mut account = Account::default();
        for event in [
            opened(),
            deposited(10),
            sent(10),
            AccountEvent::TransferRefunded {
                transfer_id: Uuid::from_u128(7),
                amount: amount(10),
                currency: eur(),
                code: "account_closed".into(),
                reason: "closed".into(),
            },
        ] {
            account.fold(&event);
        }
        assert_eq!(account.balance, 10);
        assert_eq!(account.transfers_in_flight, 0);
    }

    #[test]
    fn folding_events_gives_the_balance() {
        let mut account = Account::default();
        for event in [opened(), deposited(100), withdrawn(40), deposited(5)] {
            account.fold(&event);
        }
        assert_eq!(account.balance, 65);
        assert_eq!(account.status, AccountStatus::Open);
        assert_eq!(account.currency, Some(eur()));
    }

    const MAX: i64 = i64::MAX;

    fn sent_as(id: u128, units: i64) -> AccountEvent {
        AccountEvent::TransferSent {
            transfer_id: Uuid::from_u128(id),
            to: Uuid::from_u128(9),
            amount: amount(units),
            currency: eur(),
        }
    }

    fn refund(id: u128, units: i64) -> AccountCommand {
        AccountCommand::RefundTransfer {
            transfer_id: Uuid::from_u128(id),
            amount: amount(units),
            currency: eur(),
            code: "account_closed".into(),
            reason: "the account is closed".into(),
        }
    }

    fn refunded(id: u128, units: i64) -> AccountEvent {
        AccountEvent::TransferRefunded {
            transfer_id: Uuid::from_u128(id),
            amount: amount(units),
            currency: eur(),
            code: "account_closed".into(),
            reason: "the account is closed".into(),
        }
    }

    #[test]
    fn a_deposit_that_would_leave_no_room_for_a_refund_in_flight_is_refused() {
        // Everything sent: the balance is 0 but MAX may come back.
        AccountTest::with(())
            .given(vec![opened(), deposited(MAX), sent_as(7, MAX)])
            .when(deposit(1, eur()))
            .then_expect_error(AccountError::BalanceOverflow {
                balance: 0,
                requested: 1,
            });
        AccountTest::with(())
            .given(vec![opened(), deposited(10), sent_as(7, 10)])
            .when(deposit(MAX - 9, eur()))
            .then_expect_error(AccountError::BalanceOverflow {
                balance: 0,
                requested: MAX - 9,
            });
    }

    #[test]
    fn a_transfer_received_that_would_leave_no_room_for_a_refund_in_flight_is_refused() {
        AccountTest::with(())
            .given(vec![opened(), deposited(10), sent_as(7, 4)])
            .when(AccountCommand::ReceiveTransfer {
                transfer_id: Uuid::from_u128(8),
                from: Uuid::from_u128(9),
                amount: amount(MAX - 9),
                currency: eur(),
            })
            .then_expect_error(AccountError::BalanceOverflow {
                balance: 6,
                requested: MAX - 9,
            });
    }

    #[test]
    fn credits_up_to_the_room_left_by_the_flight_are_accepted_and_a_refund_then_fits_exactly() {
        AccountTest::with(())
            .given(vec![opened(), deposited(10), sent_as(7, 10)])
            .when(deposit(MAX - 10, eur()))
            .then_expect_events(vec![deposited(MAX - 10)]);
        AccountTest::with(())
            .given(vec![
                opened(),
                deposited(10),
                sent_as(7, 10),
                deposited(MAX - 10),
            ])
            .when(refund(7, 10))
            .then_expect_events(vec![refunded(7, 10)]);
        let mut account = Account::default();
        for event in [
            opened(),
            deposited(10),
            sent_as(7, 10),
            deposited(MAX - 10),
            refunded(7, 10),
        ] {
            account.fold(&event);
        }
        assert_eq!(account.balance, MAX, "not one unit lost to saturation");
        assert_eq!(account.transfers_in_flight, 0);
    }

    #[test]
    fn a_settled_transfer_frees_its_room_for_credits() {
        AccountTest::with(())
            .given(vec![
                opened(),
                deposited(10),
                sent_as(7, 10),
                AccountEvent::TransferSettled {
                    transfer_id: Uuid::from_u128(7),
                },
            ])
            .when(deposit(MAX, eur()))
            .then_expect_events(vec![deposited(MAX)]);
    }

    /// Conservation at the edge, for every legal input of a small exhaustive grammar: from
    /// every reachable state, every command `decide` accepts folds without saturating, and
    /// the balance plus the money in flight equals credits minus debits in exact (i128)
    /// arithmetic.
    #[test]
    fn no_accepted_command_near_the_edge_loses_money_to_saturation() {
        let amounts = [1, MAX - 1, MAX];
        let mut commands = Vec::new();
        for &units in &amounts {
            commands.push(deposit(units, eur()));
            commands.push(withdraw(units));
            for id in [7u128, 8] {
                commands.push(AccountCommand::SendTransfer {
                    transfer_id: Uuid::from_u128(id),
                    to: Uuid::from_u128(9),
                    amount: amount(units),
                    currency: eur(),
                });
                commands.push(AccountCommand::ReceiveTransfer {
                    transfer_id: Uuid::from_u128(id + 10),
                    from: Uuid::from_u128(9),
                    amount: amount(units),
                    currency: eur(),
                });
            }
        }
        // (state, exact balance + in flight, sent and not yet settled or refunded)
        let mut frontier = vec![(
            {
                let mut account = Account::default();
                account.fold(&opened());
                account
            },
            0i128,
            Vec::<(u128, i64)>::new(),
        )];
        for _depth in 0..4 {
            let mut next = Vec::new();
            for (account, held, open) in &frontier {
                let mut tries: Vec<AccountCommand> = commands.clone();
                for (id, units) in open {
                    tries.push(refund(*id, *units));
                    tries.push(AccountCommand::SettleTransfer {
                        transfer_id: Uuid::from_u128(*id),
                    });
                }
                for command in tries {
                    let Ok(events) = account.decide(command.clone()) else {
                        continue;
                    };
                    // A refund or settle of an unknown transfer, or a second send with
                    // the same id, is not a legal input: the process manager takes each
                    // step once.
                    let mut open = open.clone();
                    let mut held = *held;
                    let mut legal = true;
                    for event in &events {
                        match event {
                            AccountEvent::MoneyDeposited { amount, .. }
                            | AccountEvent::TransferReceived { amount, .. } => {
                                held += i128::from(amount.minor_units());
                            }
                            AccountEvent::MoneyWithdrawn { amount, .. } => {
                                held -= i128::from(amount.minor_units());
                            }
                            AccountEvent::TransferSent {
                                transfer_id,
                                amount,
                                ..
                            } => {
                                let id = transfer_id.as_u128();
                                legal &= open.iter().all(|(o, _)| *o != id);
                                open.push((id, amount.minor_units()));
                            }
                            AccountEvent::TransferRefunded { transfer_id, .. } => {
                                open.retain(|(o, _)| *o != transfer_id.as_u128());
                            }
                            AccountEvent::TransferSettled { transfer_id } => {
                                let id = transfer_id.as_u128();
                                if let Some((_, units)) = open.iter().find(|(o, _)| *o == id) {
                                    held -= i128::from(*units);
                                }
                                open.retain(|(o, _)| *o != id);
                            }
                            _ => {}
                        }
                    }
                    if !legal {
                        continue;
                    }
                    let mut after = account.clone();
                    for event in &events {
                        after.fold(event);
                    }
                    let in_flight: i128 = open.iter().map(|(_, units)| i128::from(*units)).sum();
                    assert_eq!(
                        i128::from(after.balance) + in_flight,
                        held,
                        "{command:?} from {account:?} lost money"
                    );
                    assert!(held <= i128::from(MAX), "{command:?} from {account:?}");
                    next.push((after, held, open));
                }
            }
            next.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            next.dedup_by(|a, b| format!("{a:?}") == format!("{b:?}"));
            frontier = next;
        }
        assert!(!frontier.is_empty());
    }
}
