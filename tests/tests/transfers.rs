//! Transfers across the real processes (promise 6: money is conserved): command API →
//! relay → a real broker (or the store's log) → the projector's transfer process manager (which debits, credits
//! or refunds, settles) and read models → query API.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use ledger_e2e::eventually;
use ledger_e2e::services::{
    admin, migrated_database, projector_group, transfers_group, wait_until_projected, CommandApi,
    Projector, QueryApi, Stack, StackEnv,
};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(180);

async fn stack(projector_env: &[(&str, &str)]) -> Stack {
    Stack::start(StackEnv {
        relay: &[("KAFKA_TOPIC_PARTITIONS", "3")],
        projector: projector_env,
        ..StackEnv::default()
    })
    .await
}

async fn post(api: &CommandApi, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut request = api.client.post(format!("{}{path}", api.base)).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn open(api: &CommandApi, currency: &str) -> String {
    let (status, body) = post(
        api,
        "/v1/accounts",
        json!({"owner": "t", "currency": currency}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["account_id"].as_str().unwrap().to_owned()
}

async fn deposit(api: &CommandApi, account: &str, amount: i64, currency: &str) {
    let (status, body) = post(
        api,
        &format!("/v1/accounts/{account}/deposits"),
        json!({"amount": amount, "currency": currency}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn request_transfer(api: &CommandApi, from: &str, to: &str, amount: i64) -> Value {
    let key = uuid::Uuid::new_v4().to_string();
    let body = json!({"from": from, "to": to, "amount": amount, "currency": "EUR"});
    let (status, answer) = post(api, "/v1/transfers", body, Some(&key)).await;
    assert_eq!(status, 202, "{answer}");
    answer
}

/// 50 accounts: 44 in EUR with money, 3 in USD with money, 3 in EUR opened and closed.
/// Returns (all ids, closed ids, usd ids).
async fn accounts(api: &CommandApi, rng: &mut StdRng) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut all = Vec::new();
    let mut closed = Vec::new();
    let mut usd = Vec::new();
    for n in 0..50 {
        let currency = if (44..47).contains(&n) { "USD" } else { "EUR" };
        let id = open(api, currency).await;
        if n >= 47 {
            let (status, body) =
                post(api, &format!("/v1/accounts/{id}/close"), Value::Null, None).await;
            assert_eq!(status, 200, "{body}");
            closed.push(id.clone());
        } else {
            deposit(api, &id, rng.gen_range(100..=2_000), currency).await;
            if currency == "USD" {
                usd.push(id.clone());
            }
        }
        all.push(id);
    }
    (all, closed, usd)
}

/// Fires `count` random EUR transfers among `accounts`, 32 at a time; returns their ids.
async fn random_transfers(
    api: &CommandApi,
    accounts: &[String],
    count: usize,
    seed: u64,
) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plans: Vec<(String, String, i64)> = (0..count)
        .map(|_| {
            let from = rng.gen_range(0..accounts.len());
            let mut to = rng.gen_range(0..accounts.len() - 1);
            if to >= from {
                to += 1;
            }
            (
                accounts[from].clone(),
                accounts[to].clone(),
                rng.gen_range(1..=600),
            )
        })
        .collect();
    stream::iter(plans)
        .map(|(from, to, amount)| async move {
            request_transfer(api, &from, &to, amount).await["transfer_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// Waits until every transfer in the read model is in a terminal state; returns the count
/// per state.
async fn wait_all_terminal(url: &str, expected: usize) -> BTreeMap<String, i64> {
    eventually(DEADLINE, "every transfer terminal", || async move {
        let mut conn = PgConnection::connect(url).await.unwrap();
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM transfers GROUP BY state")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let states: BTreeMap<String, i64> = states.into_iter().collect();
        let terminal: i64 = ["completed", "failed", "compensated"]
            .iter()
            .filter_map(|s| states.get(*s))
            .sum();
        if usize::try_from(terminal).unwrap() == expected {
            Ok(states)
        } else {
            // What the store says of one unfinished transfer, to tell a stuck process
            // manager from a stuck projection.
            let stuck: Option<(String, Vec<String>, Vec<String>)> = sqlx::query_as(
                "SELECT t.transfer_id,
                        array(SELECT event_type FROM events e
                               WHERE e.aggregate_type = 'transfer' AND e.aggregate_id = t.transfer_id
                               ORDER BY sequence),
                        array(SELECT step || ':' || event_type FROM transfer_steps s
                               WHERE s.step LIKE t.transfer_id || '/%')
                   FROM transfers t WHERE state NOT IN ('completed', 'failed', 'compensated')
                  LIMIT 1",
            )
            .fetch_optional(&mut conn)
            .await
            .unwrap();
            Err(format!("{states:?}; one unfinished: {stuck:?}"))
        }
    })
    .await
}

/// Checks promise 6 and "nothing applied twice" from the event store (the truth) and the
/// read models, once everything is quiet.
async fn check_conservation(url: &str, transfers: &[String]) {
    let mut conn = PgConnection::connect(url).await.unwrap();

    // Per currency: balances + in flight = deposits − withdrawals, from the events.
    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT payload->>'currency',
                coalesce(sum((payload->>'amount')::bigint) FILTER (WHERE event_type = 'MoneyDeposited'), 0)::bigint,
                coalesce(sum((payload->>'amount')::bigint) FILTER (WHERE event_type = 'MoneyWithdrawn'), 0)::bigint,
                coalesce(sum((payload->>'amount')::bigint) FILTER (WHERE event_type = 'TransferSent'), 0)::bigint,
                coalesce(sum((payload->>'amount')::bigint) FILTER (WHERE event_type IN ('TransferReceived', 'TransferRefunded')), 0)::bigint
           FROM events WHERE aggregate_type = 'account' AND payload->>'currency' IS NOT NULL
          GROUP BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let read_balances: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT currency, sum(balance)::bigint FROM account_summaries GROUP BY currency",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let in_flight: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT currency, coalesce(sum(amount), 0)::bigint FROM transfers
          WHERE state IN ('requested', 'debited') GROUP BY currency",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for (currency, deposits, withdrawals, sent, landed) in &rows {
        let flight_from_events = sent - landed;
        assert_eq!(
            flight_from_events, 0,
            "{currency}: money still in flight at a quiescent point"
        );
        let balances = read_balances.get(currency).copied().unwrap_or(0);
        let flight = in_flight.get(currency).copied().unwrap_or(0);
        assert_eq!(
            balances + flight,
            deposits - withdrawals,
            "{currency}: balances {balances} + in flight {flight} != deposits {deposits} - withdrawals {withdrawals}"
        );
    }

    // Per transfer: the legs its final state calls for, each exactly once.
    let legs: Vec<(String, String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.transfer_id, t.state,
                count(*) FILTER (WHERE e.event_type = 'TransferSent'),
                count(*) FILTER (WHERE e.event_type = 'TransferReceived'),
                count(*) FILTER (WHERE e.event_type = 'TransferRefunded'),
                count(*) FILTER (WHERE e.event_type = 'TransferSettled'),
                (SELECT count(*) FROM events f
                  WHERE f.aggregate_type = 'transfer' AND f.aggregate_id = t.transfer_id
                    AND f.event_type IN ('TransferCompleted', 'TransferFailed', 'TransferCompensated'))
           FROM transfers t
           LEFT JOIN events e ON e.aggregate_type = 'account'
                             AND e.payload->>'transfer_id' = t.transfer_id
          GROUP BY t.transfer_id, t.state",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        legs.len(),
        transfers.len(),
        "every transfer in the read model"
    );
    for (id, state, sent, received, refunded, settled, terminal) in &legs {
        let expected = match state.as_str() {
            "completed" => (1, 1, 0, 1),
            "compensated" => (1, 0, 1, 0),
            "failed" => (0, 0, 0, 0),
            other => panic!("transfer {id} is {other}"),
        };
        assert_eq!(
            (*sent, *received, *refunded, *settled),
            expected,
            "transfer {id} ({state}): legs sent/received/refunded/settled"
        );
        assert_eq!(*terminal, 1, "transfer {id}: one terminal event");
    }

    // Nobody ever overdrew: every running balance in every statement is ≥ 0.
    let negative: i64 =
        sqlx::query_scalar("SELECT count(*) FROM account_statements WHERE balance_after < 0")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(negative, 0, "an account went below zero");
    // Both legs of a completed transfer are in the statements, with the transfer id.
    let legs_in_statements: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM account_statements s JOIN transfers t
             ON s.transfer_id::text = t.transfer_id
          WHERE t.state = 'completed' AND s.entry_type IN ('transfer_sent', 'transfer_received')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let completed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transfers WHERE state = 'completed'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(legs_in_statements, 2 * completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_concurrent_transfers_conserve_money_and_all_end() {
    // The biggest load of the suite, through the whole path: relay, Kafka, process manager.
    let mut s = stack(&[]).await;
    let mut rng = StdRng::seed_from_u64(6);
    let (all, _, _) = accounts(&s.api, &mut rng).await;
    let transfers = random_transfers(&s.api, &all, 1_000, 61).await;
    let url = s.url.clone();
    let expected = transfers.len();
    let waited = tokio::spawn(async move { wait_all_terminal(&url, expected).await }).await;
    let states = match waited {
        Ok(states) => states,
        Err(panic) => {
            let status = s.projector.status().await;
            s.projector.process.signal(Signal::SIGKILL);
            let logs = s.projector.process.drain().await;
            panic!(
                "{panic:?}\nprojector status: {status}\nprojector log tail:\n{}",
                logs[logs.len().saturating_sub(40)..].join("\n")
            );
        }
    };
    for state in ["completed", "failed", "compensated"] {
        assert!(
            states.get(state).copied().unwrap_or(0) > 0,
            "some transfers must be {state}: {states:?}"
        );
    }
    wait_until_projected(&s.url, DEADLINE).await;
    check_conservation(&s.url, &transfers).await;
    // Promise 5 for the models transfers touch: a fresh build from the events equals the
    // live one, row for row.
    for projection in ledger_readmodels::names::ALL {
        let dry = admin(&s.url, &["--json", "rebuild", projection, "--dry-run"]).await;
        assert_eq!(dry.code, 0, "{}", dry.stderr);
        let report = dry.json();
        let tables = ledger_readmodels::names::tables(projection).unwrap();
        for table in tables {
            let diff = &report["differences"][*table];
            for kind in ["missing", "extra", "different"] {
                assert!(
                    diff[kind].as_array().is_some_and(Vec::is_empty),
                    "{projection}: {table} {kind}: {diff}"
                );
            }
        }
    }
    // The query API tells a transfer's state and why it failed.
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    let (failed, code): (String, String) = sqlx::query_as(
        "SELECT transfer_id, failure_code FROM transfers WHERE state = 'failed' LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let (status, _, body) = s.query.get(&format!("/v1/transfers/{failed}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["terminal"], true);
    assert_eq!(body["failure"]["code"], code.as_str());
    assert!(body["failure"]["reason"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    let _ = &s.broker;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_survive_the_process_manager_being_killed_again_and_again() {
    // The first projector aborts right after its 40th money-moving step commits, before it
    // tells the transfer: the crash between steps.
    let Stack {
        url,
        broker,
        api,
        relay: _relay,
        mut projector,
        query: _query,
    } = stack(&[("TRANSFERS_CRASH_AFTER_STEPS", "40")]).await;
    let mut rng = StdRng::seed_from_u64(7);
    let (all, _, _) = accounts(&api, &mut rng).await;
    let sender = random_transfers(&api, &all, 1_000, 71);
    let killer = async {
        let exit = projector.process.exit_code(DEADLINE).await;
        assert_ne!(exit, 0, "the injected fault aborts the projector");
        // Then three kill -9 at moments of progress. Each restart joins fresh consumer
        // groups and so gets every event again from the start: every reaction is
        // re-delivered, the harshest case for "never twice" (resuming from committed offsets
        // after a kill is covered by the read-side tests, through the same consumer code).
        let restart = |round: i64| {
            let url = url.clone();
            let brokers = broker.address.clone();
            async move {
                let group = format!("{}-r{round}", projector_group(&url));
                let transfers_group = format!("{}-r{round}", transfers_group(&url));
                Projector::start(
                    &url,
                    Some(&brokers),
                    &[
                        ("KAFKA_GROUP_ID", group.as_str()),
                        ("TRANSFERS_GROUP_ID", transfers_group.as_str()),
                    ],
                )
                .await
            }
        };
        for round in 1..=3i64 {
            projector = restart(round).await;
            let target = 40 + round * 150;
            let started = std::time::Instant::now();
            loop {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM transfer_steps")
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
                if steps >= target {
                    break;
                }
                if started.elapsed() > Duration::from_secs(45) {
                    let status = projector.status().await;
                    projector.process.signal(Signal::SIGKILL);
                    let logs = projector.process.drain().await;
                    panic!(
                        "round {round}: {steps} steps, status {status}\n{}",
                        logs[logs.len().saturating_sub(60)..].join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            projector.process.signal(Signal::SIGKILL);
            projector.process.exit_code(Duration::from_secs(10)).await;
        }
        restart(4).await
    };
    let (transfers, _last) = tokio::join!(sender, killer);
    wait_all_terminal(&url, transfers.len()).await;
    wait_until_projected(&url, DEADLINE).await;
    check_conservation(&url, &transfers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_a_closed_account_is_compensated_and_the_source_restored() {
    let s = stack(&[]).await;
    let source = open(&s.api, "EUR").await;
    deposit(&s.api, &source, 1_000, "EUR").await;
    let closed = open(&s.api, "EUR").await;
    let (status, _) = post(
        &s.api,
        &format!("/v1/accounts/{closed}/close"),
        Value::Null,
        None,
    )
    .await;
    assert_eq!(status, 200);

    let accepted = request_transfer(&s.api, &source, &closed, 300).await;
    let id = accepted["transfer_id"].as_str().unwrap().to_owned();
    // Read your write: the transfer exists at the request's position.
    let (status, _, body) = s
        .query
        .get(&format!(
            "/v1/transfers/{id}?position={}",
            accepted["position"]
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let query = &s.query;
    let path = format!("/v1/transfers/{id}");
    let done = eventually(DEADLINE, "the transfer compensated", || {
        let path = path.clone();
        async move {
            let (_, _, body) = query.get(&path).await;
            (body["status"] == "compensated")
                .then(|| body.clone())
                .ok_or_else(|| body.to_string())
        }
    })
    .await;
    assert_eq!(done["failure"]["code"], "account_closed");
    assert_eq!(done["terminal"], true);

    // The source has all its money back, and its statement shows both legs of the refund.
    let source_summary = eventually(DEADLINE, "the refund projected", || {
        let path = format!("/v1/accounts/{source}");
        async move {
            let (_, _, body) = query.get(&path).await;
            (body["balance"] == 1_000)
                .then(|| body.clone())
                .ok_or_else(|| body.to_string())
        }
    })
    .await;
    assert_eq!(source_summary["status"], "open", "{source_summary}");
    let (_, _, statement) = s
        .query
        .get(&format!("/v1/accounts/{source}/statement"))
        .await;
    let entries: Vec<(String, i64, String)> = statement["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["transfer_id"].is_null())
        .map(|e| {
            (
                e["entry_type"].as_str().unwrap().to_owned(),
                e["amount"].as_i64().unwrap(),
                e["transfer_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            ("transfer_sent".to_owned(), -300, id.clone()),
            ("transfer_refunded".to_owned(), 300, id.clone()),
        ]
    );
    // The closed account received nothing.
    let (_, _, closed_summary) = s.query.get(&format!("/v1/accounts/{closed}")).await;
    assert_eq!(closed_summary["balance"], 0);
    let _ = &s.broker;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_the_process_manager_follows_the_stores_log() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let _projector = Projector::start(&url, None, &[]).await;
    let query = QueryApi::start(&url, &[]).await;
    let from = open(&api, "EUR").await;
    let to = open(&api, "EUR").await;
    deposit(&api, &from, 500, "EUR").await;
    let completed = request_transfer(&api, &from, &to, 200).await;
    let failed = request_transfer(&api, &from, &to, 10_000).await;
    for (answer, state) in [(&completed, "completed"), (&failed, "failed")] {
        let path = format!("/v1/transfers/{}", answer["transfer_id"].as_str().unwrap());
        let query = &query;
        eventually(DEADLINE, state, || {
            let path = path.clone();
            async move {
                let (_, _, body) = query.get(&path).await;
                (body["status"] == state)
                    .then_some(())
                    .ok_or_else(|| body.to_string())
            }
        })
        .await;
    }
    wait_until_projected(&url, DEADLINE).await;
    check_conservation(&url, &[completed, failed].map(|a| a.to_string())).await;
    let (_, _, body) = query.get(&format!("/v1/accounts/{to}")).await;
    assert_eq!(body["balance"], 200);
}
