//! `ledger-bench keepup` (read-side issue): does the live projector keep up with the write
//! side under `bench commands`' 32-client load?
//!
//! Every process of the write and read path runs (command API, relay, Apache Kafka,
//! projector; the query API is not needed). wrk drives deposits with 32 connections, closed
//! loop, as `bench commands` does, for `seconds`; then the load stops and the projector
//! drains. Every second the bench reads, from the database:
//! - accepted: the store's highest global position (each deposit is one event; positions of
//!   rolled-back batches are skipped, so this may overstate by a few);
//! - applied: the events the slowest projection has applied (`events_applied` of its
//!   checkpoint, committed with each batch; the three account projections, since the
//!   transfers projection has no work in a deposit);
//! - lag: how many positions the slowest projection is behind the store's head, and how old
//!   the newest event it applied is.

use std::time::{Duration, Instant};

use ledger_e2e::broker::Broker;
use ledger_e2e::services::{migrated_database, wait_until_projected, CommandApi, Projector, Relay};
use sqlx::PgPool;

use crate::commands::{deposit_script, seed};
use crate::pipeline::wrk;

/// One second's reading.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    head: i64,
    applied: i64,
    behind: i64,
}

async fn sample(pool: &PgPool, started: Instant) -> Sample {
    let (head, applied, slowest): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(max(global_position), 0) FROM events),
                coalesce(min(events_applied), 0)::bigint,
                coalesce(min(last_position), 0)::bigint
           FROM projection_checkpoints
          WHERE projection IN ('account_summary', 'account_statement', 'owner_totals')",
    )
    .fetch_one(pool)
    .await
    .expect("progress readable");
    Sample {
        at: started.elapsed().as_secs_f64(),
        head,
        applied,
        behind: (head - slowest).max(0),
    }
}

/// Runs the load for `seconds` with `clients` connections, then waits up to `drain` for
/// the projector to catch up, printing a line per second.
pub async fn keepup(accounts: usize, seconds: u64, clients: usize, drain: u64) {
    let url = migrated_database().await;
    let ids = seed(&url, accounts).await;
    let broker = Broker::shared().await;
    let env = [("AUTH_MODE", "disabled"), ("RUST_LOG", "warn")];
    let _relay = Relay::start(&url, &broker.address, &env).await;
    let _projector = Projector::start(&url, Some(&broker.address), &env).await;
    let command = CommandApi::start_with(&url, &env).await;
    wait_until_projected(&url, Duration::from_secs(120)).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();

    let script = deposit_script(&ids, "keepup", None);

    println!(
        "accounts: {accounts}; {clients} clients (wrk, closed loop) for {seconds} s, then up to {drain} s to drain; relay → Apache Kafka → projector, all on this machine"
    );
    println!(
        "{:>6} {:>14} {:>14} {:>16} {:>12}",
        "second", "accepted/s", "applied/s", "behind (events)", "stage"
    );
    let started = Instant::now();
    let base = command.base.clone();
    let load = tokio::task::spawn_blocking(move || {
        wrk(&base, "/", Some(&script), seconds, clients.min(2), clients)
    });
    let mut previous = sample(&pool, started).await;
    let (first_head, first_applied) = (previous.head, previous.applied);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut loaded = true;
    let mut load_end: Option<Sample> = None;
    let mut worst_behind = 0i64;
    let mut caught_up_after: Option<f64> = None;
    let deadline = Duration::from_secs(seconds + drain);
    while started.elapsed() < deadline {
        tick.tick().await;
        let now = sample(&pool, started).await;
        let span = (now.at - previous.at).max(1e-3);
        let accepted = (now.head - previous.head) as f64 / span;
        let applied = (now.applied - previous.applied) as f64 / span;
        if loaded && load.is_finished() {
            loaded = false;
            load_end = Some(now);
        }
        worst_behind = worst_behind.max(now.behind);
        println!(
            "{:>6.0} {:>14.0} {:>14.0} {:>16} {:>12}",
            now.at,
            accepted,
            applied,
            now.behind,
            if loaded { "load" } else { "drain" }
        );
        previous = now;
        if !loaded && now.behind == 0 {
            caught_up_after = load_end.map(|end| now.at - end.at);
            break;
        }
    }
    let run = load.await.expect("wrk ran");
    let end = previous;
    let during = load_end.unwrap_or(end);
    let load_seconds = during.at.max(1e-3);
    let accepted_rate = (during.head - first_head) as f64 / load_seconds;
    let applied_rate = (during.applied - first_applied) as f64 / load_seconds;
    println!(
        "wrk: {:.0} commands/s accepted, p50 {:.2} ms, p99 {:.2} ms, {} errors",
        run.rate, run.p50, run.p99, run.errors
    );
    println!(
        "during the load: accepted {accepted_rate:.0} events/s, applied {applied_rate:.0} events/s (slowest projection); applied / accepted = {:.2}; most behind {worst_behind} events",
        applied_rate / accepted_rate.max(1.0)
    );
    match caught_up_after {
        Some(after) => println!("caught up {after:.1} s after the load stopped"),
        None => println!(
            "NOT caught up {drain} s after the load stopped: {} events behind",
            end.behind
        ),
    }
}
