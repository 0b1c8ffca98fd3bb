//! Account events: what happened to an account, in the past tense.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::{Amount, Currency};

/// The aggregate type under which account events are stored (`events.aggregate_type`).
pub const ACCOUNT_AGGREGATE_TYPE: &str = "account";

/// Everything that can happen to an account.
///
/// Serialized with an internal `type` tag, so a stored payload reads on its own, e.g.
/// `{"type":"MoneyDeposited","amount":500,"currency":"EUR","reference":null}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AccountEvent {
    /// An account was opened for the data subject `subject_id`, holding money in `currency`
    /// only. v2; v1 named the holder in clear (`owner`) and reads as the legacy subject of
    /// that name ([`crate::subject::legacy_subject_id`]) with `legacy_owner` set.
    AccountOpened {
        subject_id: Uuid,
        currency: Currency,
        /// The holder's name from a v1 payload, in clear (never written by today's code).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        legacy_owner: Option<String>,
    },
    /// Money arrived. `reference` (since v2) is the payer's free-text reference; since v3
    /// it is ciphertext (`pii1.…`) under the account's subject's key (field `reference`,
    /// subject in the metadata's `data_subject`). A v2 reference is in clear.
    MoneyDeposited {
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// Money left. `reference` as in [`AccountEvent::MoneyDeposited`].
    MoneyWithdrawn {
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// The account was closed at a zero balance; it accepts nothing after this.
    AccountClosed {},
    /// The source leg of a transfer: money left this account for `to`. The transfer's
    /// process manager settles or refunds it later.
    TransferSent {
        transfer_id: Uuid,
        to: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// The destination leg of a transfer: money arrived from `from`.
    TransferReceived {
        transfer_id: Uuid,
        from: Uuid,
        amount: Amount,
        currency: Currency,
    },
    /// A transfer sent from this account could not be credited to its destination; the
    /// money came back. `code` and `reason` are the destination's refusal.
    TransferRefunded {
        transfer_id: Uuid,
        amount: Amount,
        currency: Currency,
        code: String,
        reason: String,
    },
    /// A transfer sent from this account was credited to its destination: nothing of it is
    /// in flight any more (moves no money).
    TransferSettled { transfer_id: Uuid },
}

impl AccountEvent {
    /// Type name of [`AccountEvent::AccountOpened`].
    pub const OPENED: &'static str = "AccountOpened";
    /// Type name of [`AccountEvent::MoneyDeposited`].
    pub const DEPOSITED: &'static str = "MoneyDeposited";
    /// Type name of [`AccountEvent::MoneyWithdrawn`].
    pub const WITHDRAWN: &'static str = "MoneyWithdrawn";
    /// Type name of [`AccountEvent::AccountClosed`].
    pub const CLOSED: &'static str = "AccountClosed";
    /// Type name of [`AccountEvent::TransferSent`].
    pub const TRANSFER_SENT: &'static str = "TransferSent";
    /// Type name of [`AccountEvent::TransferReceived`].
    pub const TRANSFER_RECEIVED: &'static str = "TransferReceived";
    /// Type name of [`AccountEvent::TransferRefunded`].
    pub const TRANSFER_REFUNDED: &'static str = "TransferRefunded";
    /// Type name of [`AccountEvent::TransferSettled`].
    pub const TRANSFER_SETTLED: &'static str = "TransferSettled";

    /// The type name stored in `events.event_type` and in the payload's `type` member.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::AccountOpened { .. } => Self::OPENED,
            Self::MoneyDeposited { .. } => Self::DEPOSITED,
            Self::MoneyWithdrawn { .. } => Self::WITHDRAWN,
            Self::AccountClosed {} => Self::CLOSED,
            Self::TransferSent { .. } => Self::TRANSFER_SENT,
            Self::TransferReceived { .. } => Self::TRANSFER_RECEIVED,
            Self::TransferRefunded { .. } => Self::TRANSFER_REFUNDED,
            Self::TransferSettled { .. } => Self::TRANSFER_SETTLED,
        }
    }

    /// How the event changes the balance, in signed minor units (positive in, negative
    /// out, 0 for events that move no money).
    pub fn balance_delta(&self) -> i64 {
        match self {
            Self::MoneyDeposited { amount, .. }
            | Self::TransferReceived { amount, .. }
            | Self::TransferRefunded { amount, .. } => amount.minor_units(),
            Self::MoneyWithdrawn { amount, .. } | Self::TransferSent { amount, .. } => {
                -amount.minor_units()
            }
            Self::AccountOpened { .. } | Self::AccountClosed {} | Self::TransferSettled { .. } => 0,
        }
    }

    /// The transfer this event is a leg of, if any.
    pub fn transfer_id(&self) -> Option<Uuid> {
        match self {
            Self::TransferSent { transfer_id, .. }
            | Self::TransferReceived { transfer_id, .. }
            | Self::TransferRefunded { transfer_id, .. }
            | Self::TransferSettled { transfer_id } => Some(*transfer_id),
            _ => None,
        }
    }

    /// The schema version today's code writes for this event type.
    pub fn current_version(event_type: &str) -> Option<&'static str> {
        match event_type {
            // v2 replaced `owner` by `subject_id`.
            Self::OPENED => Some("2"),
            Self::CLOSED
            | Self::TRANSFER_SENT
            | Self::TRANSFER_RECEIVED
            | Self::TRANSFER_REFUNDED
            | Self::TRANSFER_SETTLED => Some("1"),
            // v2 added `reference`; v3 encrypts it.
            Self::DEPOSITED | Self::WITHDRAWN => Some("3"),
            _ => None,
        }
    }
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
        // Every variant's type name is listed in `current_version`.
        Self::current_version(self.type_name())
            .unwrap_or("1")
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_carry_their_type_and_read_on_their_own() {
        let event = AccountEvent::MoneyDeposited {
            amount: Amount::new(500).unwrap(),
            currency: "EUR".parse().unwrap(),
            reference: Some("invoice 7".into()),
        };
        let payload = serde_json::to_value(&event).unwrap();
        assert_eq!(
            payload,
            json!({"type": "MoneyDeposited", "amount": 500, "currency": "EUR", "reference": "invoice 7"})
        );
        assert_eq!(
            serde_json::from_value::<AccountEvent>(payload).unwrap(),
            event
        );
        assert_eq!(event.event_version(), "3");
    }

    #[test]
    fn every_event_type_has_a_current_version() {
        let events = [
            json!({"type": "AccountOpened", "subject_id": Uuid::nil(), "currency": "EUR"}),
            json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null}),
            json!({"type": "MoneyWithdrawn", "amount": 1, "currency": "EUR", "reference": null}),
            json!({"type": "AccountClosed"}),
            json!({"type": "TransferSent", "transfer_id": Uuid::nil(), "to": Uuid::nil(), "amount": 1, "currency": "EUR"}),
            json!({"type": "TransferReceived", "transfer_id": Uuid::nil(), "from": Uuid::nil(), "amount": 1, "currency": "EUR"}),
            json!({"type": "TransferRefunded", "transfer_id": Uuid::nil(), "amount": 1, "currency": "EUR", "code": "account_closed", "reason": "closed"}),
            json!({"type": "TransferSettled", "transfer_id": Uuid::nil()}),
        ];
        for payload in events {
            let event: AccountEvent = serde_json::from_value(payload).unwrap();
            assert!(AccountEvent::current_version(event.type_name()).is_some());
        }
    }
}
