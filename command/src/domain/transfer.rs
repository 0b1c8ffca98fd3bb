//! The transfer aggregate: where one transfer between two accounts is.
//!
//! It moves no money itself; the accounts do (see [`super::account`]). It is told by the
//! process manager what happened to each leg, and every such command is idempotent: telling
//! it again what it already knows produces no event. A transition that contradicts what it
//! knows (completing a failed transfer) is refused, which would reveal a bug rather than
//! move money.

use ledger_events::{
    Amount, Currency, DecodeError, RecordedEvent, TransferEvent, TRANSFER_AGGREGATE_TYPE,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Decider;

/// What is asked of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferCommand {
    /// A client asks to move `amount` from `from` to `to`.
    Request {
        from: Uuid,
        to: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// The source was debited.
    MarkDebited,
    /// The destination was credited.
    Complete,
    /// The source could not be debited.
    Fail { code: String, reason: String },
    /// The destination could not be credited; the source was refunded.
    Compensate { code: String, reason: String },
}

/// Where a transfer is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// Not requested: the transfer does not exist.
    #[default]
    Unrequested,
    /// Requested; the source is not debited yet.
    Requested,
    /// The source is debited; the destination not credited yet.
    Debited,
    /// Done: the money is at the destination.
    Completed,
    /// The source could not be debited; no money moved.
    Failed,
    /// The destination refused the money; the source got it back.
    Compensated,
}

impl TransferStatus {
    /// Whether nothing more will happen to the transfer.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Compensated)
    }

    /// The name used in the API and the read model.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unrequested => "unrequested",
            Self::Requested => "requested",
            Self::Debited => "debited",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Compensated => "compensated",
        }
    }
}

/// A rule a transfer command would break.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// A transfer from an account to itself.
    #[error("a transfer needs two different accounts")]
    SameAccount,
    /// Requesting a transfer id that exists.
    #[error("a transfer with this id already exists")]
    AlreadyExists,
    /// A step for a transfer never requested.
    #[error("no transfer with this id exists")]
    NotFound,
    /// A step that contradicts the transfer's state.
    #[error("a {status} transfer cannot be {step}")]
    InvalidTransition {
        status: &'static str,
        step: &'static str,
    },
}

impl TransferError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::SameAccount => "same_account",
            Self::AlreadyExists => "transfer_already_exists",
            Self::NotFound => "transfer_not_found",
            Self::InvalidTransition { .. } => "invalid_transfer_transition",
        }
    }
}

/// The transfer's state, folded from its events. Also the snapshot payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Where it is.
    pub status: TransferStatus,
    /// Source account.
    pub from: Option<Uuid>,
    /// Destination account.
    pub to: Option<Uuid>,
    /// How much (minor units).
    pub amount: Option<Amount>,
    /// In which currency.
    pub currency: Option<Currency>,
    /// Why it failed or was compensated: (code, message).
    pub failure: Option<(String, String)>,
}

impl Decider for Transfer {
    fn decide(&self, command: TransferCommand) -> Result<Vec<TransferEvent>, TransferError> {
        use TransferStatus as S;
        let invalid = |step: &'static str| TransferError::InvalidTransition {
            status: self.status.as_str(),
            step,
        };
        match command {
            TransferCommand::Request {
                from,
                to,
                amount,
                currency,
            } => match self.status {
                S::Unrequested if from == to => Err(TransferError::SameAccount),
                S::Unrequested => Ok(vec![TransferEvent::TransferRequested {
                    from,
                    to,
                    amount,
                    currency,
                }]),
                _ => Err(TransferError::AlreadyExists),
            },
            TransferCommand::MarkDebited => match self.status {
                S::Unrequested => Err(TransferError::NotFound),
                S::Requested => Ok(vec![TransferEvent::TransferDebited {}]),
                S::Debited | S::Completed | S::Compensated => Ok(vec![]),
                S::Failed => Err(invalid("debited")),
            },
            TransferCommand::Complete => match self.status {
                S::Unrequested => Err(TransferError::NotFound),
                S::Debited => Ok(vec![TransferEvent::TransferCompleted {}]),
                S::Completed => Ok(vec![]),
                S::Requested | S::Failed | S::Compensated => Err(invalid("completed")),
            },
            TransferCommand::Fail { code, reason } => match self.status {
                S::Unrequested => Err(TransferError::NotFound),
                S::Requested => Ok(vec![TransferEvent::TransferFailed { code, reason }]),
                S::Failed => Ok(vec![]),
                S::Debited | S::Completed | S::Compensated => Err(invalid("failed")),
            },
            TransferCommand::Compensate { code, reason } => match self.status {
                S::Unrequested => Err(TransferError::NotFound),
                S::Debited => Ok(vec![TransferEvent::TransferCompensated { code, reason }]),
                S::Compensated => Ok(vec![]),
                S::Requested | S::Failed | S::Completed => Err(invalid("compensated")),
            },
        }
    }

    fn fold(&mut self, event: &TransferEvent) {
        match event {
            TransferEvent::TransferRequested {
                from,
                to,
                amount,
                currency,
            } => {
                self.status = TransferStatus::Requested;
                self.from = Some(*from);
                self.to = Some(*to);
                self.amount = Some(*amount);
                self.currency = Some(*currency);
            }
            TransferEvent::TransferDebited {} => self.status = TransferStatus::Debited,
            TransferEvent::TransferCompleted {} => self.status = TransferStatus::Completed,
            TransferEvent::TransferFailed { code, reason } => {
                self.status = TransferStatus::Failed;
                self.failure = Some((code.clone(), reason.clone()));
            }
            TransferEvent::TransferCompensated { code, reason } => {
                self.status = TransferStatus::Compensated;
                self.failure = Some((code.clone(), reason.clone()));
            }
        }
    }

    fn read(event: &RecordedEvent) -> Result<Self::Event, DecodeError> {
        event.decode_transfer()
    }
}

super::aggregate_via_decider!(
    Transfer,
    TRANSFER_AGGREGATE_TYPE,
    TransferCommand,
    TransferEvent,
    TransferError
);

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type TransferTest = TestFramework<Transfer>;

    fn ids() -> (Uuid, Uuid) {
        (Uuid::from_u128(1), Uuid::from_u128(2))
    }

    fn requested() -> TransferEvent {
        let (from, to) = ids();
        TransferEvent::TransferRequested {
            from,
            to,
            amount: Amount::new(10).unwrap(),
            currency: "EUR".parse().unwrap(),
        }
    }

    fn request(from: Uuid, to: Uuid) -> TransferCommand {
        TransferCommand::Request {
            from,
            to,
            amount: Amount::new(10).unwrap(),
            currency: "EUR".parse().unwrap(),
        }
    }

    fn failed() -> TransferEvent {
        TransferEvent::TransferFailed {
            code: "insufficient_funds".into(),
            reason: "r".into(),
        }
    }

    fn compensated() -> TransferEvent {
        TransferEvent::TransferCompensated {
            code: "account_closed".into(),
            reason: "r".into(),
        }
    }

    #[test]
    fn a_request_between_two_accounts_is_recorded() {
        let (from, to) = ids();
        TransferTest::with(())
            .given_no_previous_events()
            .when(request(from, to))
            .then_expect_events(vec![requested()]);
    }

    #[test]
    fn a_transfer_to_the_same_account_is_refused() {
        let (from, _) = ids();
        TransferTest::with(())
            .given_no_previous_events()
            .when(request(from, from))
            .then_expect_error(TransferError::SameAccount);
    }

    #[test]
    fn the_happy_path_is_requested_debited_completed() {
        TransferTest::with(())
            .given(vec![requested()])
            .when(TransferCommand::MarkDebited)
            .then_expect_events(vec![TransferEvent::TransferDebited {}]);
        TransferTest::with(())
            .given(vec![requested(), TransferEvent::TransferDebited {}])
            .when(TransferCommand::Complete)
            .then_expect_events(vec![TransferEvent::TransferCompleted {}]);
    }

    #[test]
    fn repeating_a_step_already_taken_records_nothing() {
        let debited = vec![requested(), TransferEvent::TransferDebited {}];
        TransferTest::with(())
            .given(debited.clone())
            .when(TransferCommand::MarkDebited)
            .then_expect_events(vec![]);
        let mut completed = debited.clone();
        completed.push(TransferEvent::TransferCompleted {});
        TransferTest::with(())
            .given(completed)
            .when(TransferCommand::Complete)
            .then_expect_events(vec![]);
        TransferTest::with(())
            .given(vec![requested(), failed()])
            .when(TransferCommand::Fail {
                code: "x".into(),
                reason: "y".into(),
            })
            .then_expect_events(vec![]);
        let mut refunded = debited;
        refunded.push(compensated());
        TransferTest::with(())
            .given(refunded)
            .when(TransferCommand::Compensate {
                code: "x".into(),
                reason: "y".into(),
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn contradicting_transitions_are_refused() {
        TransferTest::with(())
            .given(vec![requested(), failed()])
            .when(TransferCommand::MarkDebited)
            .then_expect_error(TransferError::InvalidTransition {
                status: "failed",
                step: "debited",
            });
        TransferTest::with(())
            .given(vec![requested()])
            .when(TransferCommand::Complete)
            .then_expect_error(TransferError::InvalidTransition {
                status: "requested",
                step: "completed",
            });
        TransferTest::with(())
            .given(vec![requested(), TransferEvent::TransferDebited {}])
            .when(TransferCommand::Fail {
                code: "x".into(),
                reason: "y".into(),
            })
            .then_expect_error(TransferError::InvalidTransition {
                status: "debited",
                step: "failed",
            });
        TransferTest::with(())
            .given(vec![
                requested(),
                TransferEvent::TransferDebited {},
                TransferEvent::TransferCompleted {},
            ])
            .when(TransferCommand::Compensate {
                code: "x".into(),
                reason: "y".into(),
            })
            .then_expect_error(TransferError::InvalidTransition {
                status: "completed",
                step: "compensated",
            });
    }

    #[test]
    fn steps_of_an_unknown_transfer_are_not_found() {
        TransferTest::with(())
            .given_no_previous_events()
            .when(TransferCommand::MarkDebited)
            .then_expect_error(TransferError::NotFound);
    }

    #[test]
    fn folding_keeps_the_terms_and_the_failure() {
        let mut transfer = Transfer::default();
        for event in [
            requested(),
            TransferEvent::TransferDebited {},
            compensated(),
        ] {
            transfer.fold(&event);
        }
        assert_eq!(transfer.status, TransferStatus::Compensated);
        assert!(transfer.status.is_terminal());
        assert_eq!(transfer.from, Some(ids().0));
        assert_eq!(
            transfer.failure,
            Some(("account_closed".into(), "r".into()))
        );
    }
}
