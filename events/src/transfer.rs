//! Transfer events: the life of one transfer between two accounts.
//!
//! The money itself moves on the accounts (`TransferSent`, `TransferReceived`,
//! `TransferRefunded` in [`crate::account`]); the transfer aggregate records where the
//! transfer is: requested → debited → completed, or requested → failed (the source could
//! not be debited), or requested → debited → compensated (the destination could not be
//! credited and the source was refunded).

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{Amount, Currency};

/// The aggregate type under which transfer events are stored (`events.aggregate_type`).
pub const TRANSFER_AGGREGATE_TYPE: &str = "transfer";

/// Everything that can happen to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TransferEvent {
    /// A client asked to move `amount` from `from` to `to`.
    TransferRequested {
        from: Uuid,
        to: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// The source account was debited (its `TransferSent` is committed).
    TransferDebited {},
    /// The destination account was credited: the transfer is done.
    TransferCompleted {},
    /// The source could not be debited; no money moved. `code` is the source's refusal
    /// (e.g. `insufficient_funds`), `reason` its message.
    TransferFailed { code: String, reason: String },
    /// The destination could not be credited and the source was refunded: no money moved
    /// in the end. `code` and `reason` are the destination's refusal.
    TransferCompensated { code: String, reason: String },
}

impl TransferEvent {
    /// Type name of [`TransferEvent::TransferRequested`].
    pub const REQUESTED: &'static str = "TransferRequested";
    /// Type name of [`TransferEvent::TransferDebited`].
    pub const DEBITED: &'static str = "TransferDebited";
    /// Type name of [`TransferEvent::TransferCompleted`].
    pub const COMPLETED: &'static str = "TransferCompleted";
    /// Type name of [`TransferEvent::TransferFailed`].
    pub const FAILED: &'static str = "TransferFailed";
    /// Type name of [`TransferEvent::TransferCompensated`].
    pub const COMPENSATED: &'static str = "TransferCompensated";

    /// The type name stored in `events.event_type` and in the payload's `type` member.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::TransferRequested { .. } => Self::REQUESTED,
            Self::TransferDebited {} => Self::DEBITED,
            Self::TransferCompleted {} => Self::COMPLETED,
            Self::TransferFailed { .. } => Self::FAILED,
            Self::TransferCompensated { .. } => Self::COMPENSATED,
        }
    }

    /// The schema version today's code writes for this event type.
    pub fn current_version(event_type: &str) -> Option<&'static str> {
        match event_type {
            Self::REQUESTED
            | Self::DEBITED
            | Self::COMPLETED
            | Self::FAILED
            | Self::COMPENSATED => Some("1"),
            _ => None,
        }
    }
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        Self::current_version(self.type_name())
            .unwrap_or("1")
            .to_owned()
    }
}

/// The steps of a transfer that move money, each taken at most once (see
/// [`crate::Metadata::transfer_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStep {
    /// Settled by the source's `TransferSent`, or by the transfer's `TransferFailed`.
    Debit,
    /// Settled by the destination's `TransferReceived`, or by the source's
    /// `TransferRefunded`.
    Credit,
    /// Settled by the source's `TransferSettled`.
    Settle,
}

impl TransferStep {
    /// The step's deterministic id for `transfer_id`, e.g. `<transfer id>/debit`.
    pub fn id(self, transfer_id: Uuid) -> String {
        let name = match self {
            Self::Debit => "debit",
            Self::Credit => "credit",
            Self::Settle => "settle",
        };
        format!("{transfer_id}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_carry_their_type_and_every_type_has_a_version() {
        let requested = TransferEvent::TransferRequested {
            from: Uuid::nil(),
            to: Uuid::max(),
            amount: Amount::new(5).unwrap(),
            currency: "EUR".parse().unwrap(),
        };
        let payload = serde_json::to_value(&requested).unwrap();
        assert_eq!(payload["type"], "TransferRequested");
        assert_eq!(payload["amount"], 5);
        for payload in [
            payload,
            json!({"type": "TransferDebited"}),
            json!({"type": "TransferCompleted"}),
            json!({"type": "TransferFailed", "code": "insufficient_funds", "reason": "r"}),
            json!({"type": "TransferCompensated", "code": "account_closed", "reason": "r"}),
        ] {
            let event: TransferEvent = serde_json::from_value(payload).unwrap();
            assert!(TransferEvent::current_version(event.type_name()).is_some());
        }
    }

    #[test]
    fn step_ids_are_derived_from_the_transfer_id() {
        let id = Uuid::nil();
        assert_eq!(
            TransferStep::Debit.id(id),
            "00000000-0000-0000-0000-000000000000/debit"
        );
        assert_ne!(TransferStep::Credit.id(id), TransferStep::Settle.id(id));
    }
}
