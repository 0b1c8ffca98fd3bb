//! Helpers for the end-to-end tests: start the real binaries (and a real Kafka-protocol
//! broker) as child processes against fresh databases, and observe them from outside.
//!
//! - [`process`]: start a binary, read its JSON log lines, signal it, wait for its exit.
//! - [`broker`]: a tansu broker per test on a free port, with durable storage, that can be
//!   stopped and started again.
//! - [`kafka`]: read every message of a topic and check per-aggregate order.
//! - [`services`]: the ledger's processes with test settings.

#![allow(clippy::unwrap_used)]

pub mod broker;
pub mod kafka;
pub mod process;
pub mod services;

pub use ledger_platform::testing::{empty_database, fresh_database};
pub use process::{binary, free_port, wait_until_ready, Process};
