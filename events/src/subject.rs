//! Data subjects: the people accounts belong to (ADR 0019).
//!
//! A subject's personal data lives in its own events, encrypted with its own data key
//! (`ledger-pii`), never in the events of its accounts. Erasing the subject destroys the key
//! and records [`SubjectEvent::SubjectErased`], which holds no personal data.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The aggregate type under which subject events are stored (`events.aggregate_type`).
pub const SUBJECT_AGGREGATE_TYPE: &str = "subject";

/// The names under which personal fields are encrypted: part of each ciphertext's
/// associated data, so a value cannot be moved from one field to another.
pub mod fields {
    /// `SubjectRegistered.name`.
    pub const NAME: &str = "name";
    /// `MoneyDeposited.reference` and `MoneyWithdrawn.reference` (since v3).
    pub const REFERENCE: &str = "reference";
}

/// The namespace of the subject ids given to account holders known only by the `owner`
/// name of a v1 `AccountOpened` (written before subjects existed): the id is the UUID v5 of
/// the name in this namespace, so every account of one legacy owner shares one subject, as
/// owner totals grouped them before.
pub const LEGACY_OWNER_NAMESPACE: Uuid = Uuid::from_u128(0x290e73c3_eb34_4d57_82d5_1b84a29617d1);

/// The subject id of a legacy owner name (see [`LEGACY_OWNER_NAMESPACE`]).
pub fn legacy_subject_id(owner: &str) -> Uuid {
    Uuid::new_v5(&LEGACY_OWNER_NAMESPACE, owner.as_bytes())
}

/// Everything that can happen to a data subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum SubjectEvent {
    /// A person became known to the ledger. `name` is ciphertext (`pii1.…`) under the
    /// subject's key, bound to this event's id and the field [`fields::NAME`].
    SubjectRegistered { name: String },
    /// The subject's keys were destroyed: every personal field of it, in every copy, is
    /// unreadable from now on. Holds no personal data.
    SubjectErased {},
}

impl SubjectEvent {
    /// Type name of [`SubjectEvent::SubjectRegistered`].
    pub const REGISTERED: &'static str = "SubjectRegistered";
    /// Type name of [`SubjectEvent::SubjectErased`].
    pub const ERASED: &'static str = "SubjectErased";

    /// The type name stored in `events.event_type` and in the payload's `type` member.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::SubjectRegistered { .. } => Self::REGISTERED,
            Self::SubjectErased {} => Self::ERASED,
        }
    }

    /// The schema version today's code writes for this event type.
    pub fn current_version(event_type: &str) -> Option<&'static str> {
        match event_type {
            Self::REGISTERED | Self::ERASED => Some("1"),
            _ => None,
        }
    }
}

impl DomainEvent for SubjectEvent {
    fn event_type(&self) -> String {
        self.type_name().to_owned()
    }

    fn event_version(&self) -> String {
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
    fn subject_payloads_read_on_their_own() {
        let registered = SubjectEvent::SubjectRegistered {
            name: "pii1.1.abc".into(),
        };
        assert_eq!(
            serde_json::to_value(&registered).unwrap(),
            json!({"type": "SubjectRegistered", "name": "pii1.1.abc"})
        );
        let erased: SubjectEvent =
            serde_json::from_value(json!({"type": "SubjectErased"})).unwrap();
        assert_eq!(erased, SubjectEvent::SubjectErased {});
        assert_eq!(erased.event_version(), "1");
    }

    #[test]
    fn a_legacy_owner_always_maps_to_the_same_subject_and_two_owners_to_two() {
        assert_eq!(legacy_subject_id("Ada"), legacy_subject_id("Ada"));
        assert_ne!(legacy_subject_id("Ada"), legacy_subject_id("Ada "));
        assert_eq!(legacy_subject_id("Ada").get_version_num(), 5);
    }
}
