//! An event as recorded in the store, with everything a reader needs to place it.

use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::account::{AccountEvent, ACCOUNT_AGGREGATE_TYPE};
use crate::metadata::Metadata;
use crate::subject::{SubjectEvent, SUBJECT_AGGREGATE_TYPE};
use crate::transfer::{TransferEvent, TRANSFER_AGGREGATE_TYPE};
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

/// An event of any aggregate of the ledger, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerEvent {
    /// An account event.
    Account(AccountEvent),
    /// A transfer event.
    Transfer(TransferEvent),
    /// A data subject event.
    Subject(SubjectEvent),
}

impl RecordedEvent {
    /// Reads the event, whatever its aggregate, through the upcaster chain.
    pub fn decode(&self) -> Result<LedgerEvent, DecodeError> {
        match self.aggregate_type.as_str() {
            ACCOUNT_AGGREGATE_TYPE => self.decode_account().map(LedgerEvent::Account),
            TRANSFER_AGGREGATE_TYPE => self.decode_transfer().map(LedgerEvent::Transfer),
            SUBJECT_AGGREGATE_TYPE => self.decode_subject().map(LedgerEvent::Subject),
            other => Err(DecodeError::UnknownAggregate(other.to_owned())),
        }
    }

    /// Reads an account event through the upcaster chain.
    pub fn decode_account(&self) -> Result<AccountEvent, DecodeError> {
        self.decode_as(
            ACCOUNT_AGGREGATE_TYPE,
            AccountEvent::current_version,
            AccountEvent::type_name,
        )
    }

    /// Reads a transfer event through the upcaster chain.
    pub fn decode_transfer(&self) -> Result<TransferEvent, DecodeError> {
        self.decode_as(
            TRANSFER_AGGREGATE_TYPE,
            TransferEvent::current_version,
            TransferEvent::type_name,
        )
    }

    /// Reads a data subject event through the upcaster chain.
    pub fn decode_subject(&self) -> Result<SubjectEvent, DecodeError> {
        self.decode_as(
            SUBJECT_AGGREGATE_TYPE,
            SubjectEvent::current_version,
            SubjectEvent::type_name,
        )
    }

    fn decode_as<E: DeserializeOwned>(
        &self,
        aggregate_type: &str,
        current_version: fn(&str) -> Option<&'static str>,
        type_name: fn(&E) -> &'static str,
    ) -> Result<E, DecodeError> {
        if self.aggregate_type != aggregate_type {
            return Err(DecodeError::UnknownAggregate(self.aggregate_type.clone()));
        }
        let expected = current_version(&self.event_type)
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
        let event: E = serde_json::from_value(serialized.payload).map_err(|source| {
            DecodeError::Malformed {
                event_type: self.event_type.clone(),
                version: self.event_version.clone(),
                source,
            }
        })?;
        if type_name(&event) != self.event_type {
            return Err(DecodeError::UnknownType(format!(
                "{} (payload says {})",
                self.event_type,
                type_name(&event)
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
    fn a_v1_account_opened_reads_as_its_owners_legacy_subject() {
        let v1 = recorded(
            "AccountOpened",
            "1",
            json!({"type": "AccountOpened", "owner": "Ada Lovelace", "currency": "EUR"}),
        );
        assert_eq!(
            v1.decode_account().unwrap(),
            AccountEvent::AccountOpened {
                subject_id: crate::subject::legacy_subject_id("Ada Lovelace"),
                currency: "EUR".parse().unwrap(),
                legacy_owner: Some("Ada Lovelace".into()),
            }
        );
        let v2 = recorded(
            "AccountOpened",
            "2",
            json!({"type": "AccountOpened", "subject_id": Uuid::nil(), "currency": "EUR"}),
        );
        assert_eq!(
            v2.decode_account().unwrap(),
            AccountEvent::AccountOpened {
                subject_id: Uuid::nil(),
                currency: "EUR".parse().unwrap(),
                legacy_owner: None,
            }
        );
    }

    #[test]
    fn a_v2_deposit_with_a_reference_in_clear_still_reads() {
        let v2 = recorded(
            "MoneyDeposited",
            "2",
            json!({"type": "MoneyDeposited", "amount": 5, "currency": "EUR", "reference": "inv 7"}),
        );
        assert_eq!(
            v2.decode_account().unwrap(),
            AccountEvent::MoneyDeposited {
                amount: Amount::new(5).unwrap(),
                currency: "EUR".parse().unwrap(),
                reference: Some("inv 7".into()),
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
            "4",
            json!({"type": "MoneyDeposited", "amount": 1, "currency": "EUR", "reference": null}),
        );
        assert!(matches!(
            future.decode_account(),
            Err(DecodeError::UnsupportedVersion { .. })
        ));

        let negative = recorded(
            "MoneyDeposited",
            "3",
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

    #[test]
    fn decode_reads_each_aggregate_type_and_refuses_unknown_ones() {
        let mut transfer = recorded("TransferDebited", "1", json!({"type": "TransferDebited"}));
        transfer.aggregate_type = TRANSFER_AGGREGATE_TYPE.into();
        assert_eq!(
            transfer.decode().unwrap(),
            LedgerEvent::Transfer(TransferEvent::TransferDebited {})
        );
        let account = recorded("AccountClosed", "1", json!({"type": "AccountClosed"}));
        assert_eq!(
            account.decode().unwrap(),
            LedgerEvent::Account(AccountEvent::AccountClosed {})
        );
        let mut alien = account.clone();
        alien.aggregate_type = "invoice".into();
        assert!(matches!(
            alien.decode(),
            Err(DecodeError::UnknownAggregate(_))
        ));
    }
}
