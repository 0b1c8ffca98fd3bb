//! `ledger-bench`: measures the ledger against ceilings taken in the same run, on this
//! machine. Run it through `scripts/bench.sh`, which builds in release mode and sets up
//! PostgreSQL and the broker.
//!
//! - `relay`: events/s from the store to the broker through `ledger-relay`, beside a
//!   produce-only ceiling: the same messages, already in memory, sent by the same producer
//!   code to the same broker.
//! - `rebuild`: a projection rebuilt from at least 1,000,000 events, beside the ordered-read
//!   ceiling of the same store (the same commit-safe reads, applying nothing).
//! - `commands`: command throughput and latency at 1 and 32 clients beside a pgbench
//!   single-row INSERT ceiling and plain cqrs-es, and a hot account (see `commands.rs`).
//! - `visible`: command-to-visible latency in the query API under a steady command rate,
//!   through relay, broker and projector (see `pipeline.rs`).
//! - `reads`: the query API's cached reads beside its static route, same load generator.

// A command-line report: printing is its output.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ledger_e2e::broker::Broker;
use ledger_e2e::services::migrated_database;
use ledger_e2e::{binary, free_port, Process};
use ledger_relay::config::Settings as RelaySettings;
use ledger_store::{read_after, LogCursor, LogEntry};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "ledger-bench", about)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Relay throughput beside a produce-only ceiling.
    Relay {
        /// Accounts to spread the events over.
        #[arg(long, default_value_t = 1_000)]
        accounts: i64,
        /// Events per account.
        #[arg(long, default_value_t = 100)]
        events_per_account: i64,
        /// Topic partitions.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
    },
    /// Rebuild rate beside the ordered-read ceiling of the same store.
    Rebuild {
        /// Accounts to spread the events over.
        #[arg(long, default_value_t = 1_000)]
        accounts: i64,
        /// Events per account.
        #[arg(long, default_value_t = 1_000)]
        events_per_account: i64,
        /// The projection to rebuild, or `all` (each in turn, then all at once, then all in
        /// one pass over the log).
        #[arg(long, default_value = "account_summary")]
        projection: String,
        /// Events per rebuild transaction.
        #[arg(long, default_value_t = 1_000)]
        batch_size: i64,
        /// References on the deposits: `none`, `clear` (as written before subjects) or
        /// `encrypted` (under 100 subjects' keys, as today's command API writes them). The
        /// accounts belong to 100 data subjects either way; compare `clear` with
        /// `encrypted` for the cost of decryption.
        #[arg(long, default_value = "none", value_parser = ["none", "clear", "encrypted"])]
        references: String,
    },
    /// Command throughput at 1 and 32 clients beside a pgbench single-row ceiling and plain
    /// cqrs-es, and a hot account (32 clients on one account).
    Commands {
        /// Accounts the deposits are spread over.
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        /// Seconds per measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Command-to-visible latency (command sent → query API answers with it) under a steady
    /// command rate, through relay, broker and projector.
    Visible {
        /// Accounts the deposits are spread over.
        #[arg(long, default_value_t = 1_000)]
        accounts: usize,
        /// Commands per second, sent open-loop.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The projector reads the store's log instead of the broker.
        #[arg(long)]
        from_store: bool,
        /// Measure both, from the store's log first, then through the broker, and print
        /// what the broker hop adds.
        #[arg(long, conflicts_with = "from_store")]
        compare: bool,
        /// The projector's `PROJECTOR_BATCH_LINGER` (Kafka source), e.g. `5ms`.
        #[arg(long, default_value = "0ms")]
        linger: String,
    },
    /// Transfers requested open-loop at a steady rate: all reach a terminal state? Request
    /// to terminal state p50/p99 (store clock), money conserved.
    Transfers {
        /// Funded accounts the transfers move money between.
        #[arg(long, default_value_t = 1_000)]
        accounts: usize,
        /// Transfers requested per second, open loop.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// The process manager's `TRANSFERS_CONCURRENCY`.
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
    },
    /// The live projector under `commands`' 32-client load: events accepted and applied
    /// per second, and how far behind the projector is, during the load and while it drains.
    Keepup {
        /// Accounts the deposits are spread over.
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Concurrent clients (wrk connections).
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Most seconds to wait for the projector to catch up after the load.
        #[arg(long, default_value_t = 120)]
        drain: u64,
    },
    /// A projector killed with SIGKILL and restarted: seconds until it has its partitions
    /// back and applies new events, with dynamic and with static group membership.
    Rejoin {
        /// Kills per membership mode.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Query API cached reads/s and p99 beside its static `/healthz`, same load generator.
    Reads {
        /// Accounts read (all cached).
        #[arg(long, default_value_t = 1_000)]
        accounts: usize,
        /// Seconds per measure.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
}

mod commands;
mod keepup;
mod pipeline;
mod transfers;

#[tokio::main]
async fn main() {
    match Cli::parse().bench {
        Bench::Commands { accounts, seconds } => commands::commands(accounts, seconds).await,
        Bench::Visible {
            accounts,
            rate,
            seconds,
            from_store,
            compare,
            linger,
        } => {
            if compare {
                let (store_p50, store_p99) =
                    pipeline::visible(accounts, rate, seconds, true, &linger).await;
                println!();
                let (broker_p50, broker_p99) =
                    pipeline::visible(accounts, rate, seconds, false, &linger).await;
                println!();
                println!(
                    "the broker hop adds {:.2} ms at p50 and {:.2} ms at p99",
                    broker_p50 - store_p50,
                    broker_p99 - store_p99
                );
            } else {
                pipeline::visible(accounts, rate, seconds, from_store, &linger).await;
            }
        }
        Bench::Rejoin { rounds } => pipeline::rejoin(rounds).await,
        Bench::Keepup {
            accounts,
            seconds,
            clients,
            drain,
        } => keepup::keepup(accounts, seconds, clients, drain).await,
        Bench::Transfers {
            accounts,
            rate,
            seconds,
            concurrency,
        } => transfers::transfers(accounts, rate, seconds, concurrency).await,
        Bench::Reads {
            accounts,
            seconds,
            connections,
        } => pipeline::reads(accounts, seconds, connections).await,
        Bench::Relay {
            accounts,
            events_per_account,
            partitions,
        } => relay(accounts, events_per_account, partitions).await,
        Bench::Rebuild {
            accounts,
            events_per_account,
            projection,
            batch_size,
            references,
        } => {
            rebuild(
                accounts,
                events_per_account,
                &projection,
                batch_size,
                &references,
            )
            .await
        }
    }
}

/// Writes `accounts × per_account` deposit events straight into the store.
async fn seed(url: &str, accounts: i64, per_account: i64) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'account', 'bench-' || a, s, 'MoneyDeposited', '2',
                json_build_object('type', 'MoneyDeposited', 'amount', s, 'currency', 'EUR', 'reference', null),
                json_build_object('request_id', 'bench-' || a || '-' || s, 'correlation_id', 'bench')
           FROM generate_series(1, $1) a, generate_series(1, $2) s",
    )
    .bind(accounts)
    .bind(per_account)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Seeds `accounts` accounts of 100 data subjects (keys stored, no registration events),
/// each opened and then given `per_account - 1` deposits with a reference, encrypted under
/// the subject's key and bound to the event's id when `encrypted`, in clear (v2) otherwise.
async fn seed_with_references(
    pool: &sqlx::PgPool,
    keys: &ledger_pii::KeyStore,
    accounts: i64,
    per_account: i64,
    encrypted: bool,
) {
    use ledger_events::subject::fields;
    let mut subjects = Vec::new();
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..100 {
        let key = ledger_pii::KeyStore::generate(Uuid::now_v7());
        keys.store_in(&mut conn, &key).await.unwrap();
        subjects.push(key);
    }
    drop(conn);
    let slice = 50;
    let mut first = 1;
    while first <= accounts {
        let last = (first + slice - 1).min(accounts);
        let mut columns: [Vec<String>; 5] = Default::default();
        let mut ids = Vec::new();
        let mut sequences = Vec::new();
        for a in first..=last {
            let key = &subjects[usize::try_from(a).unwrap_or(0) % subjects.len()];
            let subject = key.subject().to_string();
            for s in 1..=per_account {
                let event_id = Uuid::now_v7();
                let (event_type, version, payload) = if s == 1 {
                    (
                        "AccountOpened",
                        "2",
                        json!({"type": "AccountOpened", "subject_id": subject, "currency": "EUR"}),
                    )
                } else {
                    let text = format!("invoice {a}-{s} for the bench");
                    let reference = if encrypted {
                        key.encrypt(event_id, fields::REFERENCE, &text)
                    } else {
                        text
                    };
                    (
                        "MoneyDeposited",
                        if encrypted { "3" } else { "2" },
                        json!({"type": "MoneyDeposited", "amount": s, "currency": "EUR",
                               "reference": reference}),
                    )
                };
                let metadata = if encrypted && s > 1 {
                    json!({"request_id": "bench", "data_subject": subject})
                } else {
                    json!({"request_id": "bench"})
                };
                ids.push(event_id);
                sequences.push(s);
                columns[0].push(format!("bench-{a}"));
                columns[1].push(event_type.to_owned());
                columns[2].push(version.to_owned());
                columns[3].push(payload.to_string());
                columns[4].push(metadata.to_string());
            }
        }
        sqlx::query(
            "INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             SELECT e.id, 'account', e.aggregate_id, e.sequence, e.event_type, e.version,
                    e.payload::json, e.metadata::json
               FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                           $6::text[], $7::text[])
                    AS e(id, aggregate_id, sequence, event_type, version, payload, metadata)",
        )
        .bind(&ids)
        .bind(&columns[0])
        .bind(&sequences)
        .bind(&columns[1])
        .bind(&columns[2])
        .bind(&columns[3])
        .bind(&columns[4])
        .execute(pool)
        .await
        .unwrap();
        first = last + 1;
    }
}

async fn relay(accounts: i64, per_account: i64, partitions: i32) {
    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let total = seed(&url, accounts, per_account).await;
    println!(
        "relay benchmark: {total} events over {accounts} accounts, {partitions} partitions, broker Apache Kafka {} (single node, scripts/kafka.sh)",
        std::env::var("KAFKA_VERSION").unwrap_or_else(|_| "?".into())
    );

    // Ceiling: the same messages, read into memory first, produced by the relay's own
    // producer code, in the relay's batch size.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut entries: Vec<LogEntry> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut cursor = LogCursor::default();
    loop {
        let batch = read_after(&pool, cursor, 10_000).await.unwrap();
        let Some(last) = batch.last() else { break };
        cursor = last.cursor;
        entries.extend(batch);
    }
    let settings: RelaySettings = ledger_platform::config::try_parse_from([
        "ledger-relay",
        "--database-url",
        url.as_str(),
        "--kafka-brokers",
        broker.address.as_str(),
        "--kafka-topic",
        "ceiling",
        "--kafka-topic-partitions",
        &partitions.to_string(),
    ])
    .map_err(|e| format!("{e:?}"))
    .unwrap();
    ledger_relay::kafka::ensure_topic(&settings).await.unwrap();
    let producer = ledger_relay::kafka::producer(&settings).unwrap();
    let started = Instant::now();
    for batch in entries.chunks(usize::try_from(settings.batch_size).unwrap_or(500)) {
        ledger_relay::kafka::publish(&producer, "ceiling", "/bench", batch)
            .await
            .unwrap();
    }
    let ceiling = started.elapsed();

    // The relay, as deployed: a release binary reading the store from the start.
    let started = Instant::now();
    let status_addr = format!("127.0.0.1:{}", free_port());
    let partitions = partitions.to_string();
    let mut relay = Process::start(
        &binary("ledger-relay"),
        &[],
        &[
            ("DATABASE_URL", url.as_str()),
            ("KAFKA_BROKERS", broker.address.as_str()),
            ("KAFKA_TOPIC", "relay"),
            ("KAFKA_TOPIC_PARTITIONS", partitions.as_str()),
            ("RELAY_LISTEN_ADDR", status_addr.as_str()),
            ("RUST_LOG", "warn"),
        ],
    );
    let last_position: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    loop {
        let done: Option<i64> = sqlx::query_scalar(
            "SELECT global_position FROM relay_checkpoints WHERE relay_name = 'main'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        if done == Some(last_position) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "relay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relayed = started.elapsed();
    relay.signal(nix_sigterm());
    let _ = relay.exit_code(Duration::from_secs(30)).await;

    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!();
    println!("| measure | events | seconds | events/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| produce-only ceiling (in-memory messages, same producer code) | {total} | {:.2} | {:.0} |",
        ceiling.as_secs_f64(),
        rate(ceiling)
    );
    println!(
        "| ledger-relay (store → broker, checkpointed; includes process start) | {total} | {:.2} | {:.0} |",
        relayed.as_secs_f64(),
        rate(relayed)
    );
    println!();
    println!(
        "relay / ceiling = {:.2}",
        ceiling.as_secs_f64() / relayed.as_secs_f64()
    );
}

async fn rebuild(
    accounts: i64,
    per_account: i64,
    projection: &str,
    batch_size: i64,
    references: &str,
) {
    let url = migrated_database().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&url)
        .await
        .unwrap();
    // Rebuilds decrypt personal fields. The bench's scratch database gets the test keyring.
    let keys = ledger_pii::testing::test_key_store(&pool);
    if references != "none" {
        seed_with_references(
            &pool,
            &keys,
            accounts,
            per_account,
            references == "encrypted",
        )
        .await;
    }
    // Seed in slices, one transaction each, like many commands would.
    let slice = 50;
    let mut first = if references == "none" {
        1
    } else {
        accounts + 1
    };
    while first <= accounts {
        let last = (first + slice - 1).min(accounts);
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'account', 'bench-' || a, s,
                    CASE WHEN s = 1 THEN 'AccountOpened' ELSE 'MoneyDeposited' END,
                    CASE WHEN s = 1 THEN '1' ELSE '2' END,
                    CASE WHEN s = 1
                         THEN json_build_object('type', 'AccountOpened', 'owner', 'owner-' || (a % 100), 'currency', 'EUR')
                         ELSE json_build_object('type', 'MoneyDeposited', 'amount', s, 'currency', 'EUR', 'reference', null) END,
                    json_build_object('request_id', 'bench')
               FROM generate_series($1, $2) a, generate_series(1, $3) s",
        )
        .bind(first)
        .bind(last)
        .bind(per_account)
        .execute(&pool)
        .await
        .unwrap();
        first = last + 1;
    }
    sqlx::query("VACUUM ANALYZE events")
        .execute(&pool)
        .await
        .unwrap();
    let (total, _) = ledger_store::head(&pool).await.unwrap();
    println!("rebuild benchmark: {total} events over {accounts} accounts; projection {projection}; batch {batch_size}; references {references}");

    // Ceiling: the same ordered reads the rebuild makes, applying nothing.
    let started = Instant::now();
    let mut cursor = LogCursor::default();
    let mut read = 0usize;
    loop {
        let batch = read_after(&pool, cursor, batch_size).await.unwrap();
        let Some(last) = batch.last() else { break };
        cursor = last.cursor;
        read += batch.len();
    }
    let ceiling = started.elapsed();
    assert_eq!(i64::try_from(read).unwrap_or(0), total);

    // `all`: every projection in turn, each a full rebuild of its own (one log read each).
    let projections: Vec<&str> = if projection == "all" {
        ledger_readmodels::names::ALL.to_vec()
    } else {
        vec![projection]
    };
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    let mut rows = Vec::new();
    let mut rebuilt = Duration::ZERO;
    for name in &projections {
        let started = Instant::now();
        let report =
            ledger_projector::ops::rebuild::rebuild(&pool, &keys, name, batch_size, false, |_| {})
                .await
                .unwrap();
        let took = started.elapsed();
        assert!(report.swapped);
        rebuilt += took;
        rows.push((*name, took));
    }
    println!();
    println!("| measure | events | seconds | events/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| ordered-read ceiling (commit-safe reads by position, batches of {batch_size}) | {total} | {:.2} | {:.0} |",
        ceiling.as_secs_f64(),
        rate(ceiling)
    );
    for (name, took) in &rows {
        println!(
            "| rebuild {name} (shadow schema, guards, swap) | {total} | {:.2} | {:.0} |",
            took.as_secs_f64(),
            rate(*took)
        );
    }
    println!();
    for (name, took) in &rows {
        println!(
            "rebuild {name} / ceiling = {:.2}",
            ceiling.as_secs_f64() / took.as_secs_f64()
        );
    }
    if rows.len() > 1 {
        println!(
            "all {} projections one after the other: {:.2} s; / one log read = {:.2}; / {} log reads = {:.2}",
            rows.len(),
            rebuilt.as_secs_f64(),
            ceiling.as_secs_f64() / rebuilt.as_secs_f64(),
            rows.len(),
            rows.len() as f64 * ceiling.as_secs_f64() / rebuilt.as_secs_f64()
        );
        // The same rebuilds at once (each projection has its own lock, shadow and cursor,
        // as when an operator starts them from several shells).
        let started = Instant::now();
        let reports = futures::future::join_all(projections.iter().map(|name| {
            ledger_projector::ops::rebuild::rebuild(&pool, &keys, name, batch_size, false, |_| {})
        }))
        .await;
        let together = started.elapsed();
        assert!(reports.into_iter().all(|r| r.unwrap().swapped));
        println!(
            "all {} projections at once: {:.2} s; / one log read = {:.2}",
            rows.len(),
            together.as_secs_f64(),
            ceiling.as_secs_f64() / together.as_secs_f64()
        );
        // One pass (ADR 0018): the log read once, a batch ahead, each batch decoded once and
        // applied to every shadow on its own connection.
        let started = Instant::now();
        let reports = ledger_projector::ops::rebuild::rebuild_many(
            &pool,
            &keys,
            &projections,
            batch_size,
            |_, _| {},
        )
        .await
        .unwrap();
        let one_pass = started.elapsed();
        assert!(reports.iter().all(|r| r.swapped));
        println!(
            "all {} projections in one pass: {:.2} s; / one log read = {:.2}",
            rows.len(),
            one_pass.as_secs_f64(),
            ceiling.as_secs_f64() / one_pass.as_secs_f64()
        );
    }
}

fn nix_sigterm() -> ledger_e2e::process::Signal {
    ledger_e2e::process::Signal::SIGTERM
}
