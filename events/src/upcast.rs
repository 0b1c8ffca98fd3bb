//! Reading payloads written by older versions of the contract.
//!
//! Each upcaster lifts one event type from the version before to the next; the chain runs
//! in order, so a v1 payload passes every step up to today's version. The same chain serves
//! the command side (loading aggregates through cqrs-es) and every reader of the log.

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster};
use serde_json::Value;

use crate::account::AccountEvent;

/// Every upcaster of the contract, in the order they must run.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![
        Box::new(SemanticVersionEventUpcaster::new(
            AccountEvent::OPENED,
            "2",
            Box::new(owner_to_legacy_subject),
        )),
        Box::new(SemanticVersionEventUpcaster::new(
            AccountEvent::DEPOSITED,
            "2",
            Box::new(add_null_reference),
        )),
        Box::new(SemanticVersionEventUpcaster::new(
            AccountEvent::WITHDRAWN,
            "2",
            Box::new(add_null_reference),
        )),
        Box::new(SemanticVersionEventUpcaster::new(
            AccountEvent::DEPOSITED,
            "3",
            Box::new(std::convert::identity),
        )),
        Box::new(SemanticVersionEventUpcaster::new(
            AccountEvent::WITHDRAWN,
            "3",
            Box::new(std::convert::identity),
        )),
    ]
}

/// v1 → v2 of `AccountOpened`: v1 named the holder (`owner`) in clear. It reads as the legacy
/// subject of that name, with the name kept as `legacy_owner` (ADR 0019: such names stay in
/// clear until `ledger-admin pii migrate-legacy` moves them into subjects).
fn owner_to_legacy_subject(mut payload: Value) -> Value {
    if let Value::Object(fields) = &mut payload {
        if let Some(Value::String(owner)) = fields.remove("owner") {
            fields.insert(
                "subject_id".into(),
                Value::String(crate::subject::legacy_subject_id(&owner).to_string()),
            );
            fields.insert("legacy_owner".into(), Value::String(owner));
        }
    }
    payload
}

/// v1 → v2 of `MoneyDeposited` and `MoneyWithdrawn`: v1 had no `reference`; it reads as none.
fn add_null_reference(mut payload: Value) -> Value {
    if let Value::Object(fields) = &mut payload {
        fields.entry("reference").or_insert(Value::Null);
    }
    payload
}
