//! Plumbing every ledger process shares, so each service crate holds only its own logic.
//!
//! # Layout
//!
//! - [`config`]: turns a clap/env parse failure into a message that names the environment
//!   variable at fault.
//! - [`telemetry`]: JSON (or human) logs through `tracing`.
//! - [`shutdown`]: a future that resolves on SIGTERM or SIGINT.
//! - [`startup`]: a pool on a current schema, a bound listener, and their errors.
//! - [`db`]: the connection pool, the embedded migrations (`migrate` subcommands) and the
//!   start-up check that the schema is current.
//! - [`http`]: RFC 9457 problem details, the JSON extractor whose rejections are problems,
//!   request ids, fallbacks and the health routes.
//! - [`testing`]: fresh databases for tests.

pub mod auth;
pub mod config;
pub mod db;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod testing;
