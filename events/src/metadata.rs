//! What travels with every event besides its payload.
//!
//! Stored as a flat JSON object of strings (`events.metadata`), which is also what cqrs-es
//! hands around as `HashMap<String, String>`. Unknown keys are kept, so newer writers do not
//! lose information when older code copies metadata along.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Metadata of one event. Every field is optional so that events written before a field
/// existed still read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id of the HTTP request (or process-manager step) that produced the event; the
    /// thread to follow through logs of every process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Groups every event of one business flow (e.g. both legs of a transfer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the command or event that directly caused this event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The client's `Idempotency-Key`, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Whose keys `idempotency_key` is among: `key:<API key id>`, or `anonymous` when the
    /// command API runs without authentication. The same key from two clients is two keys.
    /// Events written before scopes existed have none (the `legacy` scope).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_scope: Option<String>,
    /// Fingerprint of the request the key was first used with (method, path, body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
    /// The id of the command attempt that appended the event, unique per attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// The transfer step (`<transfer id>/debit|credit|settle`) this event settles. A trigger
    /// claims it in `transfer_steps` in the event's own transaction, so each step is taken
    /// at most once, whichever aggregate takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_step: Option<String>,
    /// The data subject whose key encrypts the event's personal fields (`pii1.…` values),
    /// when it has any and is not itself a subject event: the reader decrypts without a
    /// look-up, and the relay names it in the Kafka headers. An id, never a name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_subject: Option<String>,
    /// Any other keys, preserved as they are.
    #[serde(flatten)]
    pub extra: HashMap<String, String>,
}

impl Metadata {
    /// The flat string map cqrs-es stores.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = self.extra.clone();
        let fields = [
            ("request_id", &self.request_id),
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
            ("idempotency_key", &self.idempotency_key),
            ("idempotency_scope", &self.idempotency_scope),
            ("request_hash", &self.request_hash),
            ("command_id", &self.command_id),
            ("transfer_step", &self.transfer_step),
            ("data_subject", &self.data_subject),
        ];
        for (key, value) in fields {
            if let Some(value) = value {
                map.insert(key.to_owned(), value.clone());
            }
        }
        map
    }

    /// The W3C trace context of the request that produced the event, when it had one.
    pub fn traceparent(&self) -> Option<&str> {
        self.extra
            .get(TRACEPARENT)
            .map(String::as_str)
            .filter(|value| is_valid_traceparent(value))
    }

    /// Reads the flat string map back.
    pub fn from_map(mut map: HashMap<String, String>) -> Self {
        Self {
            request_id: map.remove("request_id"),
            correlation_id: map.remove("correlation_id"),
            causation_id: map.remove("causation_id"),
            idempotency_key: map.remove("idempotency_key"),
            idempotency_scope: map.remove("idempotency_scope"),
            request_hash: map.remove("request_hash"),
            command_id: map.remove("command_id"),
            transfer_step: map.remove("transfer_step"),
            data_subject: map.remove("data_subject"),
            extra: map,
        }
    }
}

/// The metadata key of the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";

/// Whether `value` is a version-00 W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`, with
/// neither id all zeros.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// A new `traceparent` starting a trace (random ids, sampled).
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string();
    format!("00-{trace}-{}-01", &span[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_the_flat_map_keeping_unknown_keys() {
        let mut extra = HashMap::new();
        extra.insert("traceparent".to_owned(), "00-abc-def-01".to_owned());
        let metadata = Metadata {
            request_id: Some("req-1".into()),
            correlation_id: Some("corr-1".into()),
            causation_id: None,
            idempotency_key: Some("key-1".into()),
            idempotency_scope: Some("anonymous".into()),
            request_hash: None,
            command_id: Some("cmd-1".into()),
            transfer_step: Some("t/debit".into()),
            data_subject: Some("0190c0de-0000-7000-8000-000000000001".into()),
            extra,
        };
        let map = metadata.to_map();
        assert_eq!(map.get("request_id").map(String::as_str), Some("req-1"));
        assert_eq!(
            map.get("traceparent").map(String::as_str),
            Some("00-abc-def-01")
        );
        assert!(!map.contains_key("causation_id"));
        assert_eq!(Metadata::from_map(map), metadata);
        let json = serde_json::to_value(&metadata).unwrap();
        assert_eq!(serde_json::from_value::<Metadata>(json).unwrap(), metadata);
    }

    #[test]
    fn traceparents_are_validated_and_new_ones_are_valid() {
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad}");
        }
        assert!(is_valid_traceparent(&new_traceparent()));
    }
}
