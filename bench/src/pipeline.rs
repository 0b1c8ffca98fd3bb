//! `ledger-bench visible` and `ledger-bench reads` (issue 8, items 3 and 5).
//!
//! - `visible`: every process running (command API, relay, Kafka broker, projector, query
//!   API). Deposits are sent open-loop at a steady rate; each one's answer carries its
//!   position, and the same client then reads the account from the query API with that
//!   position, which answers once the read model has it. Command-to-visible is the time
//!   from sending the command to that read's answer.
//! - `reads`: the query API's cached account reads beside its static `/healthz` route, both
//!   driven by the same load generator (`wrk`, same threads and connections), over accounts
//!   the cache already holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger_e2e::broker::Broker;
use ledger_e2e::services::{
    migrated_database, wait_until_projected, CommandApi, Projector, QueryApi, Relay,
};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::commands::{percentile, seed};

/// Item 3: command to visible in the query API under a steady `rate` commands/s. Returns
/// p50 and p99 of command-to-visible, in ms.
pub async fn visible(
    accounts: usize,
    rate: u64,
    seconds: u64,
    store: bool,
    linger: &str,
) -> (f64, f64) {
    let url = migrated_database().await;
    let ids = Arc::new(seed(&url, accounts).await);
    let broker = Broker::shared().await;
    let open = [("AUTH_MODE", "disabled"), ("RUST_LOG", "warn")];
    let _relay = Relay::start(&url, &broker.address, &open).await;
    // The projector follows the broker (the design), or the store's log (`--from-store`,
    // to tell the broker's share of the latency from the projector's).
    let source = (!store).then_some(broker.address.as_str());
    let projector_env = [
        ("AUTH_MODE", "disabled"),
        ("RUST_LOG", "warn"),
        ("PROJECTOR_BATCH_LINGER", linger),
    ];
    let _projector = Projector::start(&url, source, &projector_env).await;
    let query = QueryApi::start(
        &url,
        &[
            ("AUTH_MODE", "disabled"),
            ("RUST_LOG", "warn"),
            ("READ_WAIT_TIMEOUT", "10s"),
        ],
    )
    .await;
    let command = CommandApi::start_with(&url, &open).await;
    wait_until_projected(&url, Duration::from_secs(120)).await;

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let (n, sent_for) = open_loop(rate, seconds, |n| {
        let id = ids[n.wrapping_mul(7919) % ids.len()];
        let (client, command, query) = (client.clone(), command.base.clone(), query.base.clone());
        let (samples, failures) = (samples.clone(), failures.clone());
        async move {
            let sent = Instant::now();
            let answer = client
                .post(format!("{command}/v1/accounts/{id}/deposits"))
                .json(&json!({"amount": 1, "currency": "EUR"}))
                .send()
                .await;
            let position = match answer {
                Ok(r) if r.status().is_success() => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|body| body["position"].as_i64()),
                _ => None,
            };
            let acknowledged = sent.elapsed();
            let Some(position) = position else {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            };
            let read = client
                .get(format!("{query}/v1/accounts/{id}?position={position}"))
                .send()
                .await;
            if read.is_ok_and(|r| r.status().is_success()) {
                let second = sent.duration_since(started).as_secs();
                samples
                    .lock()
                    .await
                    .push((acknowledged, sent.elapsed(), second));
            } else {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
    .await;
    let samples = samples.lock().await;
    let acknowledged: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    let visible: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    println!(
        "accounts: {accounts}; target rate {rate} commands/s for {seconds} s; projector reads {}",
        if store {
            "the store's log".to_owned()
        } else {
            format!("the broker (batch linger {linger})")
        }
    );
    println!(
        "sent {n} commands in {sent_for:.1} s ({:.0}/s); {} visible, {} failed",
        n as f64 / sent_for,
        samples.len(),
        failures.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!(
        "command acknowledged: p50 {:.2} ms, p99 {:.2} ms",
        percentile(&acknowledged, 0.5),
        percentile(&acknowledged, 0.99)
    );
    println!(
        "command to visible in the query API: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&visible, 0.5),
        percentile(&visible, 0.99),
        percentile(&visible, 1.0)
    );
    // Lag over time: whether the read side keeps up (flat) or falls behind (growing).
    let by_second: Vec<String> = (0..seconds)
        .map(|second| {
            let of_second: Vec<Duration> = samples
                .iter()
                .filter(|s| s.2 == second)
                .map(|s| s.1)
                .collect();
            format!(
                "{}s p50 {:.0} / p99 {:.0}",
                second + 1,
                percentile(&of_second, 0.5),
                percentile(&of_second, 0.99)
            )
        })
        .collect();
    println!(
        "command to visible per second sent, ms: {}",
        by_second.join("; ")
    );
    drop(broker);
    (percentile(&visible, 0.5), percentile(&visible, 0.99))
}

/// How fast a projector killed with SIGKILL and started again gets its partitions back:
/// from the restart to the moment a deposit into each of 30 accounts (spread over 3
/// partitions) made right after it is in the read model, with dynamic and with static group
/// membership (`KAFKA_GROUP_INSTANCE_ID`), `rounds` kills each.
pub async fn rejoin(rounds: usize) {
    use ledger_e2e::process::Signal;
    println!("kill -9 and restart of the projector, {rounds} rounds per mode; session timeout 10 s (default)");
    println!(
        "{:<48} {:>9} {:>9} {:>9}",
        "membership", "min s", "median s", "max s"
    );
    for (name, env) in [
        (
            "dynamic (no KAFKA_GROUP_INSTANCE_ID)",
            vec![("RUST_LOG", "warn")],
        ),
        (
            "static (KAFKA_GROUP_INSTANCE_ID=bench-1)",
            vec![("RUST_LOG", "warn"), ("KAFKA_GROUP_INSTANCE_ID", "bench-1")],
        ),
    ] {
        let url = migrated_database().await;
        let broker = Broker::shared().await;
        let open = [("AUTH_MODE", "disabled"), ("RUST_LOG", "warn")];
        let relay = Relay::start(
            &url,
            &broker.address,
            &[
                ("AUTH_MODE", "disabled"),
                ("RUST_LOG", "warn"),
                ("KAFKA_TOPIC_PARTITIONS", "3"),
            ],
        )
        .await;
        relay
            .wait_status("leader", Duration::from_secs(60), |s| s["leader"] == true)
            .await;
        let command = CommandApi::start_with(&url, &open).await;
        let ids: Vec<String> = seed(&url, 30)
            .await
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut projector = Projector::start(&url, Some(&broker.address), &env).await;
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            wait_until_projected(&url, Duration::from_secs(120)).await;
            projector.process.signal(Signal::SIGKILL);
            projector.process.exit_code(Duration::from_secs(10)).await;
            let started = Instant::now();
            projector = Projector::start(&url, Some(&broker.address), &env).await;
            futures::future::join_all(ids.iter().map(|id| command.deposit(id, 1))).await;
            wait_until_projected(&url, Duration::from_secs(120)).await;
            times.push(started.elapsed());
        }
        times.sort();
        println!(
            "{name:<48} {:>9.2} {:>9.2} {:>9.2}",
            times[0].as_secs_f64(),
            times[times.len() / 2].as_secs_f64(),
            times[times.len() - 1].as_secs_f64()
        );
    }
}

/// Item 5: cached account reads beside the static `/healthz`, same load generator.
pub async fn reads(accounts: usize, seconds: u64, connections: usize) {
    let url = migrated_database().await;
    let ids = seed(&url, accounts).await;
    let projector = Projector::start(&url, None, &[("RUST_LOG", "warn")]).await;
    wait_until_projected(&url, Duration::from_secs(120)).await;
    drop(projector);
    let query = QueryApi::start(
        &url,
        &[
            ("AUTH_MODE", "disabled"),
            ("RATE_LIMIT_PER_SECOND", "0"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    // Warm the cache: every account read once.
    for id in &ids {
        let (status, _, _) = query.get(&format!("/v1/accounts/{id}")).await;
        assert_eq!(status, 200);
    }
    let paths = std::env::temp_dir().join(format!("ledger-bench-reads-{}.lua", std::process::id()));
    let list = ids
        .iter()
        .map(|id| format!("\"/v1/accounts/{id}\""))
        .collect::<Vec<_>>()
        .join(",");
    std::fs::write(
        &paths,
        format!(
            "local paths = {{{list}}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(nil, paths[(i % #paths) + 1])\nend\n"
        ),
    )
    .unwrap();

    println!("accounts: {accounts} (all cached); wrk -t2 -c{connections} -d{seconds}s --latency");
    let static_route = wrk(&query.base, "/healthz", None, seconds, 2, connections);
    let cached = wrk(&query.base, "/", Some(&paths), seconds, 2, connections);
    println!(
        "{:<40} {:>12} {:>9} {:>9} {:>8}",
        "measure", "requests/s", "p50 ms", "p99 ms", "errors"
    );
    for (name, run) in [
        ("static route GET /healthz (ceiling)", &static_route),
        ("cached GET /v1/accounts/{id}", &cached),
    ] {
        println!(
            "{name:<40} {:>12.0} {:>9.2} {:>9.2} {:>8}",
            run.rate, run.p50, run.p99, run.errors
        );
    }
    println!(
        "cached reads / static route = {:.2}",
        cached.rate / static_route.rate
    );
    let _ = std::fs::remove_file(paths);
}

/// What wrk measured.
pub struct WrkRun {
    /// Requests per second (all answers).
    pub rate: f64,
    /// Answers that were not 2xx/3xx.
    pub errors: u64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile latency, ms.
    pub p99: f64,
}

/// Runs wrk (`threads` threads, `connections` connections) against `base` + `path`, or
/// the requests `script` makes, and reads its report.
pub fn wrk(
    base: &str,
    path: &str,
    script: Option<&std::path::Path>,
    seconds: u64,
    threads: usize,
    connections: usize,
) -> WrkRun {
    let mut command = std::process::Command::new("wrk");
    command.args([
        &format!("-t{threads}"),
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command
        .arg(format!("{base}{path}"))
        .output()
        .expect("wrk runs (Debian package wrk; scripts/bench.sh installs it)");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let field = |prefix: &str, index: usize| -> Option<&str> {
        text.lines()
            .map(str::trim)
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.split_whitespace().nth(index))
    };
    let rate = field("Requests/sec:", 1).and_then(|v| v.parse().ok());
    let p50 = field("50%", 1).and_then(millis);
    let p99 = field("99%", 1).and_then(millis);
    let errors = field("Non-2xx or 3xx responses:", 4)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match (rate, p50, p99) {
        (Some(rate), Some(p50), Some(p99)) => WrkRun {
            rate,
            errors,
            p50,
            p99,
        },
        _ => panic!("cannot read wrk's report:\n{text}"),
    }
}

/// wrk's latency ("812.00us", "1.20ms", "2.00s") in milliseconds.
fn millis(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_alphabetic())?);
    let number: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(number / 1000.0),
        "ms" => Some(number),
        "s" => Some(number * 1000.0),
        _ => None,
    }
}

/// Sends open-loop at `rate` per second for `seconds`: every 10 ms a tick starts
/// `rate / 100` calls of `send(n)` (n counting from 1) as tasks, whether or not earlier ones
/// were answered, so the rate does not bend to latency. Waits for every task; returns how
/// many were sent and how long sending took, in seconds.
pub async fn open_loop<F, Fut>(rate: u64, seconds: u64, mut send: F) -> (usize, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let per_tick = (rate / 100).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut n = 0usize;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        for _ in 0..per_tick {
            n += 1;
            tasks.push(tokio::spawn(send(n)));
        }
    }
    let sent_for = started.elapsed().as_secs_f64();
    futures::future::join_all(tasks).await;
    (n, sent_for)
}
