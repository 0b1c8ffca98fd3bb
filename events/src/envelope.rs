//! An event as recorded in the store, with everything a reader needs to place it.

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::account::{AccountEvent, ACCOUNT_AGGREGATE_TYPE};
use crate::metadata::Metadata;
use crate::upcast::upcasters;

/// One stored event: the payload as written plus its place in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Unique id of the event, stable across re-deliveries (the dedup key downstream).
    pub event_id: Uuid,
    /// The kind of aggregate, e.g. `account`.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// 1-based position within the aggregate; gap-free.
    pub sequence: i64,
    /// Position in the whole store; increasing but not gap-free, and allocated before
    /// commit, so it is not commit order.
    pub global_position: i64,
    /// When the event was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Type name, e.g. `MoneyDeposited`.
    pub event_type: String,
    /// Schema version of `payload` as written.
    pub event_version: String,
    /// The payload as written (possibly an older version).
    pub payload: Value,
    /// Request, correlation and causation ids and the like.
    pub metadata: Metadata,
}

/// Why a recorded event could not be read by today's code.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// An aggregate type this code does not know.
    #[error("unknown aggregate type `{0}`")]
    UnknownAggregate(String),
    /// An event type this code does not know.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    /// A version newer than this code, or one no upcaster lifts.
    #[error(
        "event type `{event_type}` version `{version}` is not supported (expected `{expected}`)"
    )]
    UnsupportedVersion {
        event_type: String,
        version: String,
        expected: &'static str,
    },
    /// The payload does not match its declared type and version.
    #[error("payload does not match {event_type} v{version}: {source}")]
    Malformed {
        event_type: String,
        version: String,
        source: serde_json::Error,
    },
}

impl RecordedEvent {
    /// Reads an account event through the upcaster chain.
    pub fn decode_account(&self) -> Result<AccountEvent, DecodeError> {
        if self.aggregate_type != ACCOUNT_AGGREGATE_TYPE {
            return Err(DecodeError::UnknownAggregate(self.aggregate_type.clone()));
        }
        let expected = AccountEvent::current_version(&self.event_type)
            .ok_or_else(|| DecodeError::UnknownType(self.event_type.clone()))?;
        let mut serialized = SerializedEvent::new(
            self.aggregate_id.clone(),
            usize::try_from(self.sequence).unwrap_or_default(),
            self.aggregate_type.clone(),
            self.event_type.clone(),
            self.event_version.clone(),
            self.payload.clone(),
            Value::Null,
        );
        for upcaster in upcasters() {
            if upcaster.can_upcast(&serialized.event_type, &serialized.event_version) {
                serialized = upcaster.upcast(serialized);
            }
        }
        if serialized.event_version != expected
            && serialized.event_version != format!("{expected}.0.0")
        {
            return Err(DecodeError::UnsupportedVersion {
                event_type: self.event_type.clone(),
                version: self.event_version.clone(),
                expected,
            });
        }
        let event: AccountEvent = serde_json::from_value(serialized.payload).map_err(|source| {
            DecodeError::Malformed {
                event_type: self.event_type.clone(),
                version: self.event_version.clone(),
                source,
            }
        })?;
        if event.type_name() != self.event_type {
            return Err(DecodeError::UnknownType(format!(
                "{} (payload says {})",
                self.event_type,
                event.type_name()
            )));
        }
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Amount;
    use serde_json::json;

    fn recorded(event_type: &str, version: &str, payload: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::nil(),
            aggregate_type: ACCOUNT_AGGREGATE_TYPE.into(),
            aggregate_id: "a".into(),
            sequence: 2,
            global_position: 7,
            recorded_at: DateTime::<Utc>::UNIX_EPOCH,
            event_type: event_type.into(),
            event_version: version.into(),
            payload,
            metadata: Metadata::default(),
        }
    }

    #[test]
    fn a_v1_deposit_payload_is_read_by_todays_code() {
        // Exactly what version 1 of the contract wrote: no `reference` member.
        let v1 = recorded(
            "MoneyDeposited",
            "1",
            json!({"type": "MoneyDeposited", "amount": 250, "currency": "EUR"}),
        );
        assert_eq!(
            v1.decode_account().unwrap(),
            AccountEvent::MoneyDeposited {
                amount: Amount::new(250).unwrap(),
                currency: "EUR".parse().unwrap(),
                reference: None,
            }
        );
    }

    #[test]
    fn unknown_types_future_versions_and_bad_payloads_are_told_apart() {
        let unknown = recorded("MoneyTeleported", "1", json!({"type": "MoneyTeleported"}));
        assert!(matches!(
            unknown.decode_account(),
            Err(DecodeError::UnknownType(_))
        ));

        let future = recorded(
            "MoneyDeposited",
            "3",
            json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null}),
        );
        assert!(matches!(
            future.decode_account(),
            Err(DecodeError::UnsupportedVersion { .. })
        ));

        let negative = recorded(
            "MoneyDeposited",
            "2",
            json!({"type": "MoneyDeposited", "amount": -1, "currency": "EUR", "reference": null}),
        );
        assert!(matches!(
            negative.decode_account(),
            Err(DecodeError::Malformed { .. })
        ));

        let mislabelled = recorded(
            "MoneyDeposited",
            "1",
            json!({"type": "AccountOpened", "owner": "x", "currency": "EUR"}),
        );
        assert!(mislabelled.decode_account().is_err());
    }
}
