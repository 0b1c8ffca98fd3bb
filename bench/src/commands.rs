//! `ledger-bench commands`: the command side under load, each figure beside a ceiling or a
//! peer measured in the same run (issue 8, items 1 and 2):
//!
//! - the real `ledger-command` binary, HTTP deposits on random accounts out of N, at 1 and
//!   32 concurrent clients: accepted commands/s, p50 and p99;
//! - ceiling: pgbench, one single-row INSERT per transaction, same clients, same database;
//! - peer: plain cqrs-es + postgres-es, the same aggregate through `CqrsFramework::execute`
//!   in process (no HTTP, no batching, no cache, no retries);
//! - hot account: 32 clients depositing into one account: successes/s, 409s, version-conflict
//!   retries (from the process's `/metrics`), lost updates (must be 0);
//! - overload: deposits offered open-loop at 4x the 32-client rate: accepted/s with p50 and
//!   p99, refusals (503 with `Retry-After`), the process's resident memory before and after.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use ledger_command::domain::{Account, AccountCommand};
use ledger_e2e::services::{migrated_database, CommandApi};

use crate::pipeline::wrk;
use ledger_events::Amount;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// One measured run.
struct Run {
    ok: u64,
    failed: u64,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies, p)
    }
}

/// The `p` quantile of `latencies`, in milliseconds (0 when there are none).
pub fn percentile(latencies: &[Duration], p: f64) -> f64 {
    if latencies.is_empty() {
        return 0.0;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Runs `clients` loops of `op` for `seconds`, counting successes and latencies.
async fn drive<F, Fut>(clients: usize, seconds: u64, op: F) -> Run
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (stop, op) = (stop.clone(), op.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
                let mut n = client;
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    if op(n).await {
                        ok += 1;
                        latencies.push(at.elapsed());
                    } else {
                        failed += 1;
                    }
                    n = n.wrapping_add(clients);
                }
                (ok, failed, latencies)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut run = Run {
        ok: 0,
        failed: 0,
        seconds: 0.0,
        latencies: Vec::new(),
    };
    for task in join_all(tasks).await {
        let (ok, failed, latencies) = task.unwrap();
        run.ok += ok;
        run.failed += failed;
        run.latencies.extend(latencies);
    }
    run.seconds = started.elapsed().as_secs_f64();
    run
}

/// Writes a wrk script posting deposits of 1 to `ids`, walked with a stride of 7,919 (the
/// order the peer's driver uses), each with `reference` when given, and returns its path.
pub fn deposit_script(ids: &[Uuid], name: &str, reference: Option<&str>) -> std::path::PathBuf {
    let script =
        std::env::temp_dir().join(format!("ledger-bench-{name}-{}.lua", std::process::id()));
    let list = ids
        .iter()
        .map(|id| format!("\"{id}\""))
        .collect::<Vec<_>>()
        .join(",");
    let reference = reference_member(reference);
    std::fs::write(
        &script,
        format!(
            "local ids = {{{list}}}\nlocal i = 0\nwrk.method = \"POST\"\nwrk.body = '{{\"amount\": 1, \"currency\": \"EUR\"{reference}}}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\nrequest = function()\n  i = i + 7919\n  return wrk.format(nil, \"/v1/accounts/\" .. ids[(i % #ids) + 1] .. \"/deposits\")\nend\n"
        ),
    )
    .unwrap();
    script
}

/// The `, "reference": "…"` member of a deposit body, or nothing.
fn reference_member(reference: Option<&str>) -> String {
    reference.map_or_else(String::new, |text| format!(", \"reference\": \"{text}\""))
}

/// Opens `count` EUR accounts with 1,000,000 in each, straight into the store, for 100 data
/// subjects: written as before subjects (v1 openings naming `bench-0` … `bench-99`), then
/// moved into subjects with keys by the legacy migration, so that deposits may carry a
/// reference (encrypted under the subject's key).
pub async fn seed(url: &str, count: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let mut conn = PgConnection::connect(url).await.unwrap();
    for chunk in ids.chunks(1_000) {
        let strings: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'account', id, 1, 'AccountOpened', '1',
                    json_build_object('type','AccountOpened','owner','bench-' || (n % 100),'currency','EUR'), '{}'::json
               FROM unnest($1::text[]) WITH ORDINALITY AS o(id, n)
             UNION ALL
             SELECT 'account', id, 2, 'MoneyDeposited', '2',
                    json_build_object('type','MoneyDeposited','amount',1000000,'currency','EUR','reference',null), '{}'::json
               FROM unnest($1::text[]) id",
        )
        .bind(&strings)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let keys = ledger_pii::testing::test_key_store(&pool);
    ledger_pii::legacy::migrate(&pool, &keys, 100)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    pool.close().await;
    sqlx::query("VACUUM ANALYZE events")
        .execute(&mut conn)
        .await
        .unwrap();
    ids
}

/// pgbench: one single-row INSERT per transaction, `clients` clients, `seconds` seconds.
fn pgbench(url: &str, clients: usize, seconds: u64) -> f64 {
    let script = std::env::temp_dir().join(format!("ledger-bench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "INSERT INTO bench_rows (account, amount) VALUES (gen_random_uuid(), 1);\n",
    )
    .unwrap();
    let output = std::process::Command::new("pgbench")
        .args(["-n", "-f"])
        .arg(&script)
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
            url,
        ])
        .output()
        .expect("pgbench runs (Debian package postgresql-client)");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|line| line.starts_with("tps = "))
        .and_then(|line| line.split_whitespace().nth(2))
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
}

/// The sum of `ledger_command_conflicts_total` in a `/metrics` text.
async fn conflicts(base: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("ledger_command_conflicts_total"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// The benchmark.
pub async fn commands(accounts: usize, seconds: u64) {
    let url = migrated_database().await;
    let ids = Arc::new(seed(&url, accounts).await);
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE bench_rows (id bigserial PRIMARY KEY, account uuid NOT NULL,
                                  amount bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    // COMMAND_QUEUE_MAX and COMMAND_PIPELINE_DEPTH pass through from the bench's own
    // environment, to compare settings.
    let queue_max = std::env::var("COMMAND_QUEUE_MAX").unwrap_or_else(|_| "512".into());
    let depth = std::env::var("COMMAND_PIPELINE_DEPTH").unwrap_or_else(|_| "2".into());
    println!("command API: COMMAND_QUEUE_MAX={queue_max} COMMAND_PIPELINE_DEPTH={depth}");
    let command = CommandApi::start_with(
        &url,
        &[
            ("AUTH_MODE", "disabled"),
            ("DATABASE_MAX_CONNECTIONS", "40"),
            ("RUST_LOG", "warn"),
            ("COMMAND_QUEUE_MAX", &queue_max),
            ("COMMAND_PIPELINE_DEPTH", &depth),
        ],
    )
    .await;
    let base = command.base.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(40)
        .connect(&url)
        .await
        .unwrap();
    let plain = Arc::new(postgres_es::postgres_cqrs::<Account>(pool, vec![], ()));

    // The HTTP load generator is wrk (as pgbench is the ceiling's): deposits of 1 into the
    // same accounts in the same order as the peer.
    let script = deposit_script(&ids, "deposits", None);
    println!("accounts: {accounts}; {seconds} s per measure");
    println!(
        "{:<44} {:>8} {:>12} {:>9} {:>9} {:>8}",
        "measure", "clients", "commands/s", "p50 ms", "p99 ms", "errors"
    );
    let mut table = Vec::new();
    for clients in [1usize, 32] {
        let ceiling = pgbench(&url, clients, seconds);
        println!(
            "{:<44} {:>8} {:>12.0} {:>9} {:>9} {:>8}",
            "pgbench single-row INSERT (ceiling)", clients, ceiling, "-", "-", "-"
        );
        let (ids2, plain2) = (ids.clone(), plain.clone());
        let baseline = drive(clients, seconds, move |n| {
            let (ids, plain) = (ids2.clone(), plain2.clone());
            async move {
                let id = ids[n.wrapping_mul(7919) % ids.len()].to_string();
                plain
                    .execute(
                        &id,
                        AccountCommand::Deposit {
                            amount: Amount::new(1).unwrap(),
                            currency: "EUR".parse().unwrap(),
                            reference: None,
                        },
                    )
                    .await
                    .is_ok()
            }
        })
        .await;
        report("plain cqrs-es + postgres-es (peer)", clients, &baseline);
        let ledger = wrk(&base, "/", Some(&script), seconds, clients.min(2), clients);
        println!(
            "{:<44} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>8}",
            "ledger-command over HTTP (wrk)",
            clients,
            ledger.rate,
            ledger.p50,
            ledger.p99,
            ledger.errors
        );
        table.push((clients, ceiling, baseline.rate(), ledger.rate));
    }
    for (clients, ceiling, baseline, ledger) in &table {
        println!(
            "{clients} clients: ledger / plain cqrs-es = {:.2}; ledger / single-row ceiling = {:.2}",
            ledger / baseline,
            ledger / ceiling
        );
    }

    // Personal data (ADR 0019): the same 32-client load with a 30-character reference on
    // every deposit, which the command API seals under the account's subject's key (found
    // through its account-to-subject and key caches) and binds to the event's id. Runs
    // alternate, two of each, beside the same load without a reference.
    let sealed_script = deposit_script(&ids, "sealed", Some("invoice 2026-117 of the bench"));
    // The first deposits with a reference on each account fill the process's
    // account-to-subject cache (one read of the account's opening each): a one-time cost
    // per account and process, measured on its own.
    let warm_up = wrk(&base, "/", Some(&sealed_script), seconds, 2, 32);
    println!(
        "{:<44} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>8}",
        "32 clients, reference, caches filling",
        32,
        warm_up.rate,
        warm_up.p50,
        warm_up.p99,
        warm_up.errors
    );
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        for (name, script, runs) in [
            ("32 clients, no reference", &script, &mut without),
            ("32 clients, reference encrypted", &sealed_script, &mut with),
        ] {
            let run = wrk(&base, "/", Some(script), seconds, 2, 32);
            println!(
                "{:<44} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>8}",
                name, 32, run.rate, run.p50, run.p99, run.errors
            );
            runs.push(run.rate);
        }
    }
    let mean = |runs: &[f64]| runs.iter().sum::<f64>() / runs.len() as f64;
    println!(
        "32 clients: with an encrypted reference / without = {:.2} ({:.0} vs {:.0} commands/s, mean of 2 runs each)",
        mean(&with) / mean(&without),
        mean(&with),
        mean(&without)
    );

    // Hot account: everyone on one account, which starts with 100; deposits of 1 and
    // withdrawals of 2 alternate, so it runs dry and overdrafts are attempted all along.
    let hot = command.open_account().await;
    command.deposit(&hot, 100).await;
    let conflicts_before = conflicts(&base).await;
    let counts = Arc::new([(); 4].map(|()| std::sync::atomic::AtomicU64::new(0)));
    let (client2, base2, counts2, hot2) =
        (client.clone(), base.clone(), counts.clone(), hot.clone());
    let run = drive(32, seconds, move |n| {
        let (client, base, counts, hot) = (
            client2.clone(),
            base2.clone(),
            counts2.clone(),
            hot2.clone(),
        );
        async move {
            let (path, amount, slot) = if n % 2 == 0 {
                ("deposits", 1, 0)
            } else {
                ("withdrawals", 2, 1)
            };
            let response = client
                .post(format!("{base}/v1/accounts/{hot}/{path}"))
                .json(&json!({"amount": amount, "currency": "EUR"}))
                .send()
                .await;
            let slot = match response {
                Ok(r) if r.status().is_success() => slot,
                Ok(r) if r.status() == 422 => 2,
                Ok(r) if r.status() == 409 => 3,
                _ => return false,
            };
            counts[slot].fetch_add(1, Ordering::Relaxed);
            slot < 2
        }
    })
    .await;
    let retries = conflicts(&base).await - conflicts_before;
    report("hot account, ledger-command over HTTP", 32, &run);
    let [deposits, withdrawals, refused, conflicted] =
        [0, 1, 2, 3].map(|i| i64::try_from(counts[i].load(Ordering::Relaxed)).unwrap());
    let (balance, lowest) = running_balance(&mut conn, &hot).await;
    let lost = (100 + deposits - 2 * withdrawals) - balance;
    println!(
        "hot account: {deposits} deposits and {withdrawals} withdrawals accepted, {refused} refused (insufficient funds), {conflicted} answered 409, {retries:.0} version-conflict retries; lost updates {lost}; lowest balance {lowest} (overdraft if < 0); accepted / 1-client rate = {:.2}",
        run.rate() / table[0].3
    );

    let sustainable = table.last().map_or(1.0, |row| row.3);
    let pid = command
        .process
        .child
        .id()
        .expect("ledger-command is running");
    println!(
        "overload: COMMAND_QUEUE_MAX={queue_max}; two rounds, to tell retained memory from growth"
    );
    for round in 1..=2 {
        println!("overload round {round}:");
        overload(&base, &ids, pid, 4.0 * sustainable, seconds).await;
    }
}

/// The resident memory of process `pid`, in MiB (Linux).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Overload: deposits offered open-loop at `rate` per second (4x what 32 clients
/// sustained) for `seconds`, each request sent on its schedule whether or not earlier ones
/// were answered. Reports what was really offered (the generator shares the 2 cores), the
/// accepted commands with their p50 and p99, the refusals (503 with `Retry-After`), and
/// the command API's resident memory before, right after, and 5 s after.
async fn overload(base: &str, ids: &Arc<Vec<Uuid>>, pid: u32, rate: f64, seconds: u64) {
    // Connections are kept for reuse up to the in-flight cap, so the generator does not
    // churn through ports.
    const IN_FLIGHT_MAX: usize = 2048;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT_MAX)
        .build()
        .unwrap();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    let mut not_sent = 0u64;
    let rss_before = rss_mib(pid);
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let counts = Arc::new([(); 4].map(|()| std::sync::atomic::AtomicU64::new(0)));
    // 1 ms ticks; each tick sends what the schedule owes by then.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < deadline {
        tick.tick().await;
        let owed = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent + not_sent < owed {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                // The generator's own cap: counted apart, never sent.
                not_sent += 1;
                continue;
            };
            let id = ids[(sent as usize).wrapping_mul(7919) % ids.len()];
            let (client, url) = (client.clone(), format!("{base}/v1/accounts/{id}/deposits"));
            let (accepted, counts) = (accepted.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                let at = Instant::now();
                let response = client
                    .post(url)
                    .json(&json!({"amount": 1, "currency": "EUR"}))
                    .send()
                    .await;
                let slot = match response {
                    Ok(r) if r.status().is_success() => {
                        accepted.lock().unwrap().push(at.elapsed());
                        0
                    }
                    Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => 1,
                    Ok(_) => 2,
                    Err(_) => 3,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
                drop(permit);
            }));
            sent += 1;
        }
    }
    let offered_seconds = started.elapsed().as_secs_f64();
    join_all(tasks).await;
    let rss_after = rss_mib(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_later = rss_mib(pid);
    let accepted = accepted.lock().unwrap().clone();
    let [ok, refused, other, failed] = [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    println!(
        "overload: target {rate:.0}/s offered open-loop, really offered {:.0}/s for {offered_seconds:.1} s ({sent} requests; {not_sent} not sent, {IN_FLIGHT_MAX} already in flight)",
        sent as f64 / offered_seconds
    );
    println!(
        "overload: accepted {:.0}/s ({ok}), p50 {:.2} ms, p99 {:.2} ms; refused 503 with Retry-After {refused}; other answers {other}; transport errors {failed}",
        ok as f64 / offered_seconds,
        percentile(&accepted, 0.5),
        percentile(&accepted, 0.99),
    );
    println!(
        "overload: ledger-command RSS {rss_before:.1} MiB before, {rss_after:.1} MiB right after, {rss_later:.1} MiB 5 s later"
    );
}

fn report(name: &str, clients: usize, run: &Run) {
    println!(
        "{:<44} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>8}",
        name,
        clients,
        run.rate(),
        run.percentile(0.5),
        run.percentile(0.99),
        run.failed
    );
}

/// An account's balance from its events (the truth), and the lowest it ever was.
async fn running_balance(conn: &mut PgConnection, id: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce((array_agg(running ORDER BY sequence DESC))[1], 0)::bigint,
                coalesce(min(running), 0)::bigint
           FROM (SELECT sequence,
                        sum(CASE event_type WHEN 'MoneyDeposited' THEN (payload->>'amount')::bigint
                                            WHEN 'MoneyWithdrawn' THEN -(payload->>'amount')::bigint
                                            ELSE 0 END) OVER (ORDER BY sequence) AS running
                   FROM events
                  WHERE aggregate_type = 'account' AND aggregate_id = $1) balances",
    )
    .bind(id)
    .fetch_one(conn)
    .await
    .unwrap()
}
