//! How an event travels on Kafka: CloudEvents binary mode.
//!
//! - key: the aggregate id, so one aggregate's events share a partition and keep their order;
//! - value: the event's payload JSON exactly as stored (with its `type` member);
//! - headers: CloudEvents attributes (`ce_specversion`, `ce_id` = event id, `ce_type`,
//!   `ce_source`, `ce_subject` = aggregate id, `ce_time`), `content-type`, the event's place
//!   and version (`ledger_global_position`, `ledger_sequence`, `ledger_event_type`,
//!   `ledger_event_version`, `ledger_aggregate_type`), the request and correlation ids, the
//!   whole metadata as JSON (`ledger_metadata`) and a W3C `traceparent`; when the payload
//!   holds personal fields (ciphertext, ADR 0019), `ledger_data_subject` (the subject's id)
//!   and `ledger_pii_key_version` (the key version the ciphertext names). Never a name.
//!
//! Every header value is UTF-8 text, so `kcat -C -f '%h %s\n'` shows a message a person can
//! read. A re-delivery carries the same `ce_id`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use crate::envelope::RecordedEvent;
use crate::metadata::Metadata;

/// The CloudEvents version spoken.
pub const SPEC_VERSION: &str = "1.0";
/// Media type of every value.
pub const CONTENT_TYPE: &str = "application/json";

/// Header names.
pub mod header {
    pub const SPECVERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const TYPE: &str = "ce_type";
    pub const SOURCE: &str = "ce_source";
    pub const SUBJECT: &str = "ce_subject";
    pub const TIME: &str = "ce_time";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const AGGREGATE_TYPE: &str = "ledger_aggregate_type";
    pub const GLOBAL_POSITION: &str = "ledger_global_position";
    pub const SEQUENCE: &str = "ledger_sequence";
    pub const EVENT_TYPE: &str = "ledger_event_type";
    pub const EVENT_VERSION: &str = "ledger_event_version";
    pub const REQUEST_ID: &str = "ledger_request_id";
    pub const CORRELATION_ID: &str = "ledger_correlation_id";
    pub const METADATA: &str = "ledger_metadata";
    pub const TRACEPARENT: &str = "traceparent";
    pub const DATA_SUBJECT: &str = "ledger_data_subject";
    pub const PII_KEY_VERSION: &str = "ledger_pii_key_version";
}

/// A message ready for a producer.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The aggregate id.
    pub key: String,
    /// The payload JSON.
    pub value: Vec<u8>,
    /// Header names and UTF-8 values, in a stable order.
    pub headers: Vec<(&'static str, String)>,
}

/// Why a message could not be read back into an event.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// A required header is missing.
    #[error("header `{0}` is missing")]
    MissingHeader(&'static str),
    /// A header has a value of the wrong form.
    #[error("header `{name}` has an invalid value: {reason}")]
    InvalidHeader { name: &'static str, reason: String },
    /// The value is not JSON.
    #[error("the message value is not JSON: {0}")]
    InvalidValue(#[from] serde_json::Error),
}

/// The message for `event`; `source` is the CloudEvents source (a URI reference naming the
/// producing system, e.g. `/ledger`).
pub fn encode(event: &RecordedEvent, source: &str) -> Message {
    let mut headers = vec![
        (header::SPECVERSION, SPEC_VERSION.to_owned()),
        (header::ID, event.event_id.to_string()),
        (
            header::TYPE,
            format!("ledger.{}.{}", event.aggregate_type, event.event_type),
        ),
        (header::SOURCE, source.to_owned()),
        (header::SUBJECT, event.aggregate_id.clone()),
        (
            header::TIME,
            event
                .recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
        (header::CONTENT_TYPE, CONTENT_TYPE.to_owned()),
        (header::AGGREGATE_TYPE, event.aggregate_type.clone()),
        (header::GLOBAL_POSITION, event.global_position.to_string()),
        (header::SEQUENCE, event.sequence.to_string()),
        (header::EVENT_TYPE, event.event_type.clone()),
        (header::EVENT_VERSION, event.event_version.clone()),
    ];
    if let Some(id) = &event.metadata.request_id {
        headers.push((header::REQUEST_ID, id.clone()));
    }
    if let Some(id) = &event.metadata.correlation_id {
        headers.push((header::CORRELATION_ID, id.clone()));
    }
    headers.push((
        header::METADATA,
        serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".to_owned()),
    ));
    headers.push((header::TRACEPARENT, traceparent_of(event)));
    if let Some(version) = pii_key_version(&event.payload) {
        let subject = if event.aggregate_type == crate::subject::SUBJECT_AGGREGATE_TYPE {
            Some(event.aggregate_id.clone())
        } else {
            event.metadata.data_subject.clone()
        };
        if let Some(subject) = subject {
            headers.push((header::DATA_SUBJECT, subject));
        }
        headers.push((header::PII_KEY_VERSION, version.to_string()));
    }
    Message {
        key: event.aggregate_id.clone(),
        value: event.payload.to_string().into_bytes(),
        headers,
    }
}

/// The key version named by the first encrypted field (`pii1.<version>.…`) among the
/// payload's top-level members, if any holds one.
fn pii_key_version(payload: &Value) -> Option<u32> {
    let Value::Object(fields) = payload else {
        return None;
    };
    fields.values().find_map(|value| {
        let (version, _) = value.as_str()?.strip_prefix("pii1.")?.split_once('.')?;
        version.parse().ok()
    })
}

/// The event's stored traceparent, or one derived from its id and position (so a
/// re-delivery carries the same one).
fn traceparent_of(event: &RecordedEvent) -> String {
    event
        .metadata
        .traceparent()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            format!(
                "00-{}-{:016x}-01",
                event.event_id.simple(),
                event.global_position.max(1)
            )
        })
}

/// Reads a message back into the event it carries.
pub fn decode<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    value: &[u8],
) -> Result<RecordedEvent, MessageError> {
    let headers: Vec<(&str, &[u8])> = headers.into_iter().collect();
    let text = |name: &'static str| -> Result<String, MessageError> {
        let raw = headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, v)| *v)
            .ok_or(MessageError::MissingHeader(name))?;
        let text = String::from_utf8(raw.to_vec()).map_err(|err| MessageError::InvalidHeader {
            name,
            reason: err.to_string(),
        })?;
        // No event of the store holds a NUL (PostgreSQL text cannot), so a message with one
        // is not an event of ours.
        if text.contains('\0') {
            return Err(MessageError::InvalidHeader {
                name,
                reason: "contains a NUL byte".into(),
            });
        }
        Ok(text)
    };
    // Sequences and global positions start at 1.
    let number = |name: &'static str| -> Result<i64, MessageError> {
        let number: i64 = text(name)?
            .parse()
            .map_err(|err: std::num::ParseIntError| MessageError::InvalidHeader {
                name,
                reason: err.to_string(),
            })?;
        if number < 1 {
            return Err(MessageError::InvalidHeader {
                name,
                reason: format!("{number} is not a positive number"),
            });
        }
        Ok(number)
    };
    let metadata: Metadata = match text(header::METADATA) {
        Ok(json) => serde_json::from_str(&json).map_err(|err| MessageError::InvalidHeader {
            name: header::METADATA,
            reason: err.to_string(),
        })?,
        Err(MessageError::MissingHeader(_)) => Metadata::default(),
        Err(err) => return Err(err),
    };
    let recorded_at: DateTime<Utc> = DateTime::parse_from_rfc3339(&text(header::TIME)?)
        .map_err(|err| MessageError::InvalidHeader {
            name: header::TIME,
            reason: err.to_string(),
        })?
        .with_timezone(&Utc);
    Ok(RecordedEvent {
        event_id: text(header::ID)?.parse().map_err(|err: uuid::Error| {
            MessageError::InvalidHeader {
                name: header::ID,
                reason: err.to_string(),
            }
        })?,
        aggregate_type: text(header::AGGREGATE_TYPE)?,
        aggregate_id: text(header::SUBJECT)?,
        sequence: number(header::SEQUENCE)?,
        global_position: number(header::GLOBAL_POSITION)?,
        recorded_at,
        event_type: text(header::EVENT_TYPE)?,
        event_version: text(header::EVENT_VERSION)?,
        payload: serde_json::from_slice::<Value>(value)?,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn event() -> RecordedEvent {
        RecordedEvent {
            event_id: Uuid::new_v4(),
            aggregate_type: "account".into(),
            aggregate_id: "0193-acc".into(),
            sequence: 3,
            global_position: 41,
            recorded_at: DateTime::parse_from_rfc3339("2026-11-21T10:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            event_type: "MoneyDeposited".into(),
            event_version: "2".into(),
            payload: json!({"type": "MoneyDeposited", "amount": 5, "currency": "EUR", "reference": null}),
            metadata: Metadata {
                request_id: Some("req-1".into()),
                correlation_id: Some("corr-1".into()),
                ..Metadata::default()
            },
        }
    }

    /// The value of the header `name` of `message`, if it has one.
    fn header_of(message: &Message, name: &str) -> Option<String> {
        message
            .headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn a_message_carries_cloudevents_headers_and_reads_back_into_the_same_event() {
        let event = event();
        let message = encode(&event, "/ledger");
        let get = |name: &str| header_of(&message, name).unwrap();
        assert_eq!(message.key, "0193-acc");
        assert_eq!(get("ce_specversion"), "1.0");
        assert_eq!(get("ce_id"), event.event_id.to_string());
        assert_eq!(get("ce_type"), "ledger.account.MoneyDeposited");
        assert_eq!(get("ce_subject"), "0193-acc");
        assert_eq!(get("ce_time"), "2026-11-21T10:00:00.123456Z");
        assert_eq!(get("ledger_global_position"), "41");
        assert_eq!(get("ledger_request_id"), "req-1");
        let traceparent = get("traceparent");
        assert!(
            crate::metadata::is_valid_traceparent(&traceparent),
            "{traceparent}"
        );
        let headers = message.headers.iter().map(|(k, v)| (*k, v.as_bytes()));
        assert_eq!(decode(headers, &message.value).unwrap(), event);
    }

    #[test]
    fn a_message_with_personal_fields_names_the_subject_and_key_version_but_no_person() {
        let mut event = event();
        event.payload = json!({"type": "MoneyDeposited", "amount": 5, "currency": "EUR",
                               "reference": "pii1.3.c2VjcmV0"});
        event.metadata.data_subject = Some("0190-subject".into());
        let message = encode(&event, "/ledger");
        assert_eq!(
            header_of(&message, header::DATA_SUBJECT).as_deref(),
            Some("0190-subject")
        );
        assert_eq!(
            header_of(&message, header::PII_KEY_VERSION).as_deref(),
            Some("3")
        );

        let mut registered = event.clone();
        registered.aggregate_type = "subject".into();
        registered.aggregate_id = "0190-subject".into();
        registered.metadata.data_subject = None;
        registered.payload = json!({"type": "SubjectRegistered", "name": "pii1.1.bmFtZQ"});
        let message = encode(&registered, "/ledger");
        assert!(message
            .headers
            .iter()
            .any(|(k, v)| *k == header::DATA_SUBJECT && v == "0190-subject"));

        // Without a personal field (a reference in clear from v2, or none) there is nothing
        // to name.
        let plain = encode(&self::event(), "/ledger");
        assert!(plain
            .headers
            .iter()
            .all(|(k, _)| *k != header::DATA_SUBJECT && *k != header::PII_KEY_VERSION));
    }

    fn decode_with(name: &str, value: &str) -> Result<RecordedEvent, MessageError> {
        let message = encode(&event(), "/ledger");
        let headers = message
            .headers
            .iter()
            .map(|(k, v)| (*k, if *k == name { value } else { v.as_str() }.as_bytes()));
        decode(headers, &message.value)
    }

    #[test]
    fn a_message_with_a_sequence_or_position_below_one_is_refused() {
        for name in ["ledger_sequence", "ledger_global_position"] {
            for value in ["0", "-1"] {
                let refused = decode_with(name, value);
                assert!(
                    matches!(&refused, Err(MessageError::InvalidHeader { name: n, .. }) if *n == name),
                    "{name}={value}: {refused:?}"
                );
            }
        }
    }

    #[test]
    fn a_message_with_a_nul_byte_in_a_header_is_refused() {
        for name in ["ce_subject", "ledger_aggregate_type", "ledger_event_type"] {
            let refused = decode_with(name, "acc\0ount");
            assert!(
                matches!(&refused, Err(MessageError::InvalidHeader { name: n, reason }) if *n == name && reason.contains("NUL")),
                "{name}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_message_without_its_id_is_refused() {
        let message = encode(&event(), "/ledger");
        let headers = message
            .headers
            .iter()
            .filter(|(k, _)| *k != "ce_id")
            .map(|(k, v)| (*k, v.as_bytes()));
        assert!(matches!(
            decode(headers, &message.value),
            Err(MessageError::MissingHeader("ce_id"))
        ));
    }
}
