//! The query API: serves the read models the projector builds; never reads the event store.
//!
//! # Layout
//!
//! - [`config`]: settings from the environment.
//! - [`changes`]: the moka cache of account summaries and the projector's change
//!   notifications that invalidate it and wake waiting reads.
//! - [`http`]: routes (`accounts`, `owners`), read-your-writes ([`http::consistency`]),
//!   problem+json errors.
//! - [`startup`]: [`startup::Application`], started by `main` and by tests.

pub mod changes;
pub mod config;
pub mod http;
pub mod startup;
