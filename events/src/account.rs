//! Account events: what happened to an account, in the past tense.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

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
    /// An account was opened for `owner`, holding money in `currency` only.
    AccountOpened { owner: String, currency: Currency },
    /// Money arrived. `reference` (since v2) is the payer's free-text reference.
    MoneyDeposited {
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// Money left. `reference` (since v2) is the free-text reference.
    MoneyWithdrawn {
        amount: Amount,
        currency: Currency,
        reference: Option<String>,
    },
    /// The account was closed at a zero balance; it accepts nothing after this.
    AccountClosed {},
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

    /// The type name stored in `events.event_type` and in the payload's `type` member.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::AccountOpened { .. } => Self::OPENED,
            Self::MoneyDeposited { .. } => Self::DEPOSITED,
            Self::MoneyWithdrawn { .. } => Self::WITHDRAWN,
            Self::AccountClosed {} => Self::CLOSED,
        }
    }

    /// The schema version today's code writes for this event type.
    pub fn current_version(event_type: &str) -> Option<&'static str> {
        match event_type {
            Self::OPENED | Self::CLOSED => Some("1"),
            // v2 added `reference`.
            Self::DEPOSITED | Self::WITHDRAWN => Some("2"),
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
        assert_eq!(event.event_version(), "2");
    }

    #[test]
    fn every_event_type_has_a_current_version() {
        let events = [
            json!({"type": "AccountOpened", "owner": "a", "currency": "EUR"}),
            json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null}),
            json!({"type": "MoneyWithdrawn", "amount": 1, "currency": "EUR", "reference": null}),
            json!({"type": "AccountClosed"}),
        ];
        for payload in events {
            let event: AccountEvent = serde_json::from_value(payload).unwrap();
            assert!(AccountEvent::current_version(event.type_name()).is_some());
        }
    }
}
