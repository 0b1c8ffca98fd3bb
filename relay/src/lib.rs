//! The relay: publishes every committed event from the PostgreSQL store to Kafka.
//!
//! # Layout
//!
//! - [`config`]: settings from the environment.
//! - [`leader`]: an advisory lock makes one relay of a name the publisher; others stand by
//!   and take over within seconds when it dies.
//! - [`relay`]: the loop: read the log after the checkpoint in commit-safe order
//!   (`ledger_store::read_after`), publish the batch, wait for the broker to confirm every
//!   message, then write the checkpoint. A crash between confirmation and checkpoint
//!   re-sends the batch (at least once; a duplicate carries the same `ce_id`).
//! - [`kafka`]: the idempotent `acks=all` producer, topic creation, ordered publishing.
//! - [`checkpoint`]: the `relay_checkpoints` table (never moves backwards).
//! - [`status`]: `/healthz`, `/readyz`, `/status` (position, lag, leadership, last error).
//! - [`startup`]: [`startup::Application`], started by `main` and by tests.
//!
//! A broker outage never blocks commands (they only write PostgreSQL): the relay retries
//! with backoff from its checkpoint, its lag grows, and it drains the backlog in order when
//! the broker returns.

pub mod checkpoint;
pub mod config;
pub mod kafka;
pub mod leader;
pub mod relay;
pub mod startup;
pub mod status;
