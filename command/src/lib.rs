//! The ledger's command side: an HTTP API that validates intents and appends events.
//!
//! # Layout
//!
//! - [`config`]: settings from the environment, validated at start.
//! - [`domain`]: the account and transfer aggregates: commands in, events or a rule broken
//!   out (cqrs-es's `Aggregate` trait, tested with its `TestFramework`).
//! - [`ledger`]: executes one intent through its writer; retries lost version races; loads
//!   an aggregate or an earlier outcome from the store.
//! - [`writer`]: group commit with aggregates kept in memory (ADR 0010): the queue and
//!   batching loop, the pure decide step (`writer::decide`), and the statements of
//!   `ledger_store::aggregates`, through which every load and append goes.
//! - [`idempotency`]: the `idempotency_keys` table and request fingerprints.
//! - [`subjects`]: data subjects (ADR 0019): registering and erasing them (each one
//!   transaction with the subject's key), the account → subject look-up and sealing
//!   references under the subject's key. Names and references are never logged.
//! - [`http`]: the axum routes, the `ApiError` → problem+json mapping, request headers.
//! - [`startup`]: [`startup::Application`], which `main` and the tests both start.
//!
//! # Flow of a command
//!
//! `POST /v1/accounts/{id}/deposits` → [`http::accounts`] validates the body (400/415/413
//! before anything else) → looks up the `Idempotency-Key` (replay or 422) →
//! [`ledger::Ledger::execute`] hands the command to the account's writer ([`writer`]),
//! which decides it with [`domain::Account::decide`] on the account's state (kept in memory,
//! checked against the store) together with the commands queued beside it, and appends all
//! their events in one statement (group commit); a 404/422 refusal writes nothing. The key
//! is claimed in that same transaction by a trigger.
//! Only after the commit does the client get its 2xx, carrying the account's new state and
//! the global position of the last event.

pub mod config;
pub mod domain;
pub mod http;
pub mod idempotency;
pub mod ledger;
pub mod startup;
pub mod subjects;
pub mod transfer_steps;
pub mod writer;
