//! The event contract shared by every part of the ledger.
//!
//! Events are the source of truth: the command side appends them, the relay publishes them,
//! projectors fold them into read models. Everything that must agree on their shape lives
//! here, and nothing else does.
//!
//! # Layout
//!
//! - [`money`]: [`Currency`] (ISO 4217) and [`Amount`] (positive integer minor units).
//! - [`account`]: the account events ([`AccountEvent`]), their type names and schema versions.
//! - [`transfer`]: the transfer events ([`TransferEvent`]) and the money-moving steps of a
//!   transfer ([`TransferStep`]), each taken at most once.
//! - [`subject`]: data subjects ([`SubjectEvent`]), the people accounts belong to; their
//!   personal data is encrypted per subject (ADR 0019).
//! - [`metadata`]: what travels with every event besides its payload (request, correlation
//!   and causation ids, idempotency key).
//! - [`envelope`]: [`RecordedEvent`], an event as stored: id, aggregate, per-aggregate
//!   sequence, global position, time, metadata.
//! - [`upcast`]: how payloads written by older versions are read by today's code.
//! - [`kafka`]: the Kafka message format (CloudEvents binary mode) and its decoding.
//!
//! # Versioning rules
//!
//! A payload is JSON with a `type` member naming the event. Its schema version is stored
//! beside it (`event_version`). A change a reader could misread gets a new version and an
//! upcaster from the previous one; old payloads are never rewritten in place.

pub mod account;
pub mod envelope;
pub mod kafka;
pub mod metadata;
pub mod money;
pub mod subject;
pub mod transfer;
pub mod upcast;

pub use account::{AccountEvent, ACCOUNT_AGGREGATE_TYPE};
pub use envelope::{DecodeError, LedgerEvent, RecordedEvent};
pub use metadata::Metadata;
pub use money::{Amount, AmountError, Currency, CurrencyError};
pub use subject::{SubjectEvent, SUBJECT_AGGREGATE_TYPE};
pub use transfer::{TransferEvent, TransferStep, TRANSFER_AGGREGATE_TYPE};
