//! The projector: builds the read models from the log.
//!
//! # Layout
//!
//! - [`config`]: settings from the environment.
//! - [`source_kafka`]: a consumer group over the relay's topic; partitions are applied
//!   concurrently by workers, each partition in order; offsets are stored only after the
//!   batch's transaction committed.
//! - [`source_store`]: without a broker, the store's log read directly in commit-safe order,
//!   the cursor committed with each batch.
//! - [`apply`]: one transaction per batch, a fixed number of statements per projection
//!   (ADR 0013): the guards of all the batch's aggregates (apply, skip a duplicate, or
//!   repair a gap from the store), the read-model rows folded in memory and written once,
//!   dead letters (an event the database refuses is isolated by bisection), checkpoints and
//!   change notifications. Live apply, replay and rebuild all go through it.
//! - [`status`]: `/healthz`, `/readyz`, `/status` (positions, lag, dead letters, partitions).
//! - [`ops`]: operator actions (rebuild, dry run, replay, republish, dead letters, status),
//!   used by the `ledger-admin` CLI and the admin HTTP API ([`admin`]).
//! - [`transfers`]: the transfer process manager, fed by its own consumer group (or its own
//!   store cursor): debits, credits or refunds, settles; each step taken at most once.
//! - [`sweep`]: finds transfers left not terminal in the store for too long (their events
//!   lost from the log) and drives them on through the process manager.
//! - [`startup`]: [`startup::Application`], started by `main` and by tests.
//!
//! The projections themselves (their tables and SQL) live in `ledger-readmodels`, which the
//! query API reads through.

pub mod admin;
pub mod apply;
pub mod config;
pub mod ops;
pub mod source_kafka;
pub mod source_store;
pub mod startup;
pub mod status;
pub mod sweep;
pub mod transfers;
