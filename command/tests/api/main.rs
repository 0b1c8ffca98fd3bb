//! Integration tests of the command API against a real PostgreSQL, one fresh database per
//! test (compiled as one binary). Run them through `scripts/test.sh`, which sets
//! `DATABASE_URL` to a server where databases may be created.

// Test helpers outside #[test] functions may unwrap: a failure is the test failing.
#![allow(clippy::unwrap_used)]

mod accounts;
mod bad_input;
mod concurrency;
mod durability;
mod health;
mod helpers;
mod idempotency;
mod store;
mod subjects;
mod transfers;
mod writer;
