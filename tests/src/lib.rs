//! Helpers for the end-to-end tests: start the real binaries (and a real Apache Kafka
//! broker) as child processes against fresh databases, and observe them from outside.
//!
//! - [`process`]: start a binary, read its JSON log lines, signal it, wait for its exit.
//! - [`broker`]: Apache Kafka: the run's shared broker, or a test's own that it can stop and
//!   start again.
//! - [`kafka`]: read every message of a topic and check per-aggregate order.
//! - [`services`]: the ledger's processes with test settings.

#![allow(clippy::unwrap_used)]

pub mod broker;
pub mod kafka;
pub mod process;
pub mod services;

pub use ledger_platform::testing::{empty_database, fresh_database};
pub use process::{binary, free_port, wait_until_ready, Process};

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `probe` every 50 ms until it gives `Ok`, and returns that; panics after `deadline`
/// with `what` and the last `Err` (what was observed instead).
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                start.elapsed() < deadline,
                "never {what} within {deadline:?}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
