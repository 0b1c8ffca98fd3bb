//! `ledger-bench transfers`: transfers requested open-loop at a steady rate through the
//! whole pipeline (command API, relay, Kafka, the transfer process manager in the
//! projector): whether every one reaches a terminal state, and how long from request to
//! terminal state (read-side issue, transfers target).
//!
//! Request to terminal state is measured in the store, from the `TransferRequested`
//! event's `recorded_at` to the terminal event's: both stamped by the same PostgreSQL clock,
//! so nothing is polled and the generator's own delays do not count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger_e2e::broker::Broker;
use ledger_e2e::services::{migrated_database, CommandApi, Projector, Relay};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::commands::seed;
use crate::pipeline::open_loop;

/// Requests `rate` transfers per second for `seconds` between `accounts` funded accounts,
/// waits until every one is terminal (or `deadline`), and reports.
pub async fn transfers(accounts: usize, rate: u64, seconds: u64, concurrency: u32) {
    let url = migrated_database().await;
    let ids = Arc::new(seed(&url, accounts).await);
    let broker = Broker::shared().await;
    let open = [("AUTH_MODE", "disabled"), ("RUST_LOG", "warn")];
    let _relay = Relay::start(&url, &broker.address, &open).await;
    let concurrency = concurrency.to_string();
    let projector_env = [
        ("AUTH_MODE", "disabled"),
        ("RUST_LOG", "warn"),
        ("TRANSFERS_CONCURRENCY", concurrency.as_str()),
    ];
    let _projector = Projector::start(&url, Some(&broker.address), &projector_env).await;
    let command = CommandApi::start_with(&url, &open).await;
    let pool = PgPool::connect(&url).await.unwrap();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        u64,
    >::new()));
    let (n, sent_for) = open_loop(rate, seconds, |n| {
        // Pairs walk the accounts so that no account is in every transfer.
        let from = ids[n.wrapping_mul(7919) % ids.len()];
        let to = ids[(n.wrapping_mul(7919) + 1) % ids.len()];
        let (client, base) = (client.clone(), command.base.clone());
        let (accepted, refused) = (accepted.clone(), refused.clone());
        async move {
            let answer = client
                .post(format!("{base}/v1/transfers"))
                .header("Idempotency-Key", Uuid::new_v4().to_string())
                .json(&json!({"from": from, "to": to, "amount": 1, "currency": "EUR"}))
                .send()
                .await;
            let refusal = match answer {
                Ok(r) if r.status() == 202 => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    format!("{status} {}", body["code"].as_str().unwrap_or(""))
                }
                Err(err) => format!("transport: {err}"),
            };
            *refused.lock().unwrap().entry(refusal).or_default() += 1;
        }
    })
    .await;
    let accepted = accepted.load(Ordering::Relaxed);
    println!(
        "accounts: {accounts}; TRANSFERS_CONCURRENCY {concurrency}; target rate {rate} transfers/s for {seconds} s; sent {n} in {sent_for:.1} s ({:.0}/s); {accepted} accepted (202); not accepted: {:?}",
        n as f64 / sent_for,
        refused.lock().unwrap()
    );

    // Every accepted transfer must end; wait for it with a deadline.
    let deadline = Instant::now() + Duration::from_secs(300);
    let waiting_since = Instant::now();
    let terminal = loop {
        let terminal: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events
              WHERE aggregate_type = 'transfer'
                AND event_type IN ('TransferCompleted', 'TransferFailed', 'TransferCompensated')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if u64::try_from(terminal).unwrap_or(0) >= accepted || Instant::now() > deadline {
            break terminal;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "terminal: {terminal} of {accepted} ({:.1} s after the last request was answered)",
        waiting_since.elapsed().as_secs_f64()
    );
    let (p50, p99, max, completed, failed, compensated): (f64, f64, f64, i64, i64, i64) =
        sqlx::query_as(
            "WITH ends AS (
                 SELECT r.aggregate_id, t.event_type,
                        extract(epoch FROM t.recorded_at - r.recorded_at) * 1000 AS ms
                   FROM events r
                   JOIN events t ON t.aggregate_type = 'transfer' AND t.aggregate_id = r.aggregate_id
                    AND t.event_type IN ('TransferCompleted', 'TransferFailed', 'TransferCompensated')
                  WHERE r.aggregate_type = 'transfer' AND r.event_type = 'TransferRequested')
             SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0)::float8,
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0)::float8,
                    coalesce(max(ms), 0)::float8,
                    count(*) FILTER (WHERE event_type = 'TransferCompleted'),
                    count(*) FILTER (WHERE event_type = 'TransferFailed'),
                    count(*) FILTER (WHERE event_type = 'TransferCompensated')
               FROM ends",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "request to terminal state (store clock): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; {completed} completed, {failed} failed, {compensated} compensated"
    );
    // Where the time goes: request to debited (first reaction), and the terminal events
    // recorded per second of the run (a late start shows as leading zeros).
    let (to_debited_p50, to_debited_p99): (f64, f64) = sqlx::query_as(
        "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0)::float8,
                coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0)::float8
           FROM (SELECT extract(epoch FROM d.recorded_at - r.recorded_at) * 1000 AS ms
                   FROM events r
                   JOIN events d ON d.aggregate_type = 'transfer' AND d.aggregate_id = r.aggregate_id
                    AND d.event_type = 'TransferDebited'
                  WHERE r.aggregate_type = 'transfer' AND r.event_type = 'TransferRequested') x",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!("request to debited: p50 {to_debited_p50:.1} ms, p99 {to_debited_p99:.1} ms");
    let per_second: Vec<(i64, i64, i64)> = sqlx::query_as(
        "WITH start AS (SELECT min(recorded_at) AS t FROM events WHERE event_type = 'TransferRequested')
         SELECT floor(extract(epoch FROM e.recorded_at - start.t))::bigint AS second,
                count(*) FILTER (WHERE e.event_type = 'TransferRequested'),
                count(*) FILTER (WHERE e.event_type IN ('TransferCompleted', 'TransferFailed', 'TransferCompensated'))
           FROM events e, start
          WHERE e.aggregate_type = 'transfer'
          GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    println!(
        "per second (store clock), requested / terminal: {}",
        per_second
            .iter()
            .map(|(second, requested, terminal)| format!("{second}s {requested}/{terminal}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    // Money is conserved: the seeded balances plus nothing (transfers only move money).
    let (sum, expected): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(CASE WHEN event_type IN ('MoneyDeposited', 'TransferReceived', 'TransferRefunded')
                                   THEN (payload ->> 'amount')::bigint
                                   WHEN event_type IN ('MoneyWithdrawn', 'TransferSent')
                                   THEN -(payload ->> 'amount')::bigint END), 0)::bigint,
                (SELECT count(*) * 1000000 FROM events WHERE event_type = 'AccountOpened')::bigint
           FROM events WHERE aggregate_type = 'account'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    println!(
        "money: {sum} in the accounts, {expected} deposited (conserved: {})",
        sum == expected
    );
    drop(broker);
}
