//! The read side across the real processes: command API, relay, a real broker, projector,
//! query API (promises 4, 8 and 9).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::future::join_all;
use ledger_e2e::broker::Broker;
use ledger_e2e::eventually;
use ledger_e2e::services::{
    balances_from_events, balances_in_read_model, migrated_database, topic, wait_until_projected,
    CommandApi, Projector, QueryApi, Relay, Stack, StackEnv,
};
use ledger_events::subject::legacy_subject_id;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

const DEADLINE: Duration = Duration::from_secs(90);

async fn stack() -> Stack {
    stack_with(&[], "3").await
}

/// A projector restarted under this name gets its partitions back without a rebalance
/// (static group membership).
const STATIC_MEMBER: (&str, &str) = ("KAFKA_GROUP_INSTANCE_ID", "projector-1");

/// The stack with `projector_env` for the projector and a topic of `partitions` partitions.
async fn stack_with(projector_env: &[(&str, &str)], partitions: &str) -> Stack {
    Stack::start(StackEnv {
        relay: &[("KAFKA_TOPIC_PARTITIONS", partitions)],
        projector: projector_env,
        ..StackEnv::default()
    })
    .await
}

async fn withdraw(api: &CommandApi, account: &str, amount: i64) -> Value {
    let response = api
        .client
        .post(format!("{}/v1/accounts/{account}/withdrawals", api.base))
        .json(&json!({"amount": amount, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_with_the_commands_position_sees_the_new_balance_the_first_time() {
    let s = stack().await;
    let account = s.api.open_account().await;
    let mut expected = 0;
    for round in 1..=15 {
        let answer = if round % 4 == 0 {
            expected -= 3;
            withdraw(&s.api, &account, 3).await
        } else {
            expected += 10;
            s.api.deposit(&account, 10).await
        };
        let position = answer["position"].as_i64().unwrap();
        let (status, headers, body) = s
            .query
            .get(&format!("/v1/accounts/{account}?position={position}"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["balance"], expected,
            "round {round}: stale read {body}"
        );
        assert!(body["last_position"].as_i64().unwrap() >= position);
        assert!(headers.get("etag").is_some());
    }
    // The header form of the token works too, and so does the statement.
    let answer = s.api.deposit(&account, 1).await;
    let response = s
        .query
        .client
        .get(format!("{}/v1/accounts/{account}/statement", s.query.base))
        .header("Ledger-Position", answer["position"].to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 17);
    assert_eq!(entries.last().unwrap()["balance_after"], expected + 1);
    // The cross-account model with the account the write went to.
    let (status, _, totals) = s
        .query
        .get(&format!(
            "/v1/subjects/{}/totals?position={}&account={account}",
            s.api.subject().await,
            answer["position"]
        ))
        .await;
    assert_eq!(status, 200, "{totals}");
    assert_eq!(totals["totals"][0]["balance"], expected + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_read_model_has_not_reached_is_answered_412_with_the_current_position() {
    let s = stack().await;
    let account = s.api.open_account().await;
    let answer = s.api.deposit(&account, 5).await;
    let reached = answer["position"].as_i64().unwrap();
    // Reached once the deposit has gone through the relay, Kafka and the projector: on a
    // loaded machine that can take longer than one read's own wait, so ask until it is.
    eventually(DEADLINE, "read the deposit at its position", || {
        let url = format!("/v1/accounts/{account}?position={reached}");
        let query = &s.query;
        async move {
            match query.get(&url).await {
                (200, _, _) => Ok(()),
                (status, _, body) => Err(format!("{status} {body}")),
            }
        }
    })
    .await;
    let (status, headers, body) = s
        .query
        .get(&format!(
            "/v1/accounts/{account}?position={}",
            reached + 1_000_000
        ))
        .await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(body["code"], "read_model_behind");
    assert_eq!(body["current_position"], reached);
    assert_eq!(body["requested_position"], reached + 1_000_000);
    for bad in ["-1", "abc", "1.5"] {
        let (status, _, body) = s
            .query
            .get(&format!("/v1/accounts/{account}?position={bad}"))
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["code"], "invalid_parameter");
    }
    let (status, _, body) = s
        .query
        .get(&format!(
            "/v1/subjects/{}/totals?position={reached}",
            s.api.subject().await
        ))
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_answer_304_on_a_matching_etag_and_never_serve_an_older_balance() {
    let s = stack().await;
    let account = s.api.open_account().await;
    let first = s.api.deposit(&account, 7).await;
    let (_, headers, _) = s
        .query
        .get(&format!(
            "/v1/accounts/{account}?position={}",
            first["position"]
        ))
        .await;
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let not_modified = s
        .query
        .client
        .get(format!("{}/v1/accounts/{account}", s.query.base))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    // A write later: the cached entry must not be served for a read that asks for it.
    let second = s.api.deposit(&account, 8).await;
    let changed = s
        .query
        .client
        .get(format!(
            "{}/v1/accounts/{account}?position={}",
            s.query.base, second["position"]
        ))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
    let body: Value = changed.json().await.unwrap();
    assert_eq!(body["balance"], 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivering_every_event_again_changes_no_balance() {
    let mut s = stack().await;
    let accounts = join_all((0..5).map(|_| s.api.open_account())).await;
    for account in &accounts {
        for amount in 1..=6 {
            s.api.deposit(account, amount).await;
        }
    }
    wait_until_projected(&s.url, DEADLINE).await;
    let before = balances_in_read_model(&s.url).await;
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    let entries_before: i64 = sqlx::query_scalar("SELECT count(*) FROM account_statements")
        .fetch_one(&mut conn)
        .await
        .unwrap();

    // The relay forgets its checkpoint and publishes everything a second time.
    s.relay.process.signal(Signal::SIGTERM);
    s.relay.process.exit_code(Duration::from_secs(30)).await;
    sqlx::query("DELETE FROM relay_checkpoints")
        .execute(&mut conn)
        .await
        .unwrap();
    s.relay = Relay::start(
        &s.url,
        &s.broker.address,
        &[("KAFKA_TOPIC_PARTITIONS", "3")],
    )
    .await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let projector = &s.projector;
    eventually(DEADLINE, "re-delivered", || async move {
        let status = projector.status().await;
        // Three projections skip each re-delivered event.
        (status["process"]["duplicates"].as_i64().unwrap() >= events * 3)
            .then_some(())
            .ok_or_else(|| status.to_string())
    })
    .await;
    assert_eq!(balances_in_read_model(&s.url).await, before);
    assert_eq!(
        balances_in_read_model(&s.url).await,
        balances_from_events(&s.url).await
    );
    let entries_after: i64 = sqlx::query_scalar("SELECT count(*) FROM account_statements")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries_after, entries_before);
    let (_, _, totals) = s
        .query
        .get(&format!("/v1/subjects/{}/totals", s.api.subject().await))
        .await;
    assert_eq!(totals["totals"][0]["balance"], before.values().sum::<i64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_mid_stream_resumes_and_every_balance_equals_the_events() {
    let mut s = stack_with(&[STATIC_MEMBER], "3").await;
    let accounts = join_all((0..8).map(|_| s.api.open_account())).await;
    let writers = {
        let accounts = accounts.clone();
        let base = s.api.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for round in 0..40 {
                for account in &accounts {
                    let response = client
                        .post(format!("{base}/v1/accounts/{account}/deposits"))
                        .json(&json!({"amount": round + 1, "currency": "EUR"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                }
            }
        })
    };
    // Kill it once it has applied some, while writes go on.
    let projector = &s.projector;
    eventually(DEADLINE, "started applying", || async move {
        let applied = projector.status().await["process"]["applied"]
            .as_i64()
            .unwrap();
        (applied > 60)
            .then_some(())
            .ok_or_else(|| applied.to_string())
    })
    .await;
    s.projector.process.signal(Signal::SIGKILL);
    s.projector.process.exit_code(Duration::from_secs(10)).await;
    s.projector = Projector::start(&s.url, Some(&s.broker.address), &[STATIC_MEMBER]).await;
    writers.await.unwrap();
    wait_until_projected(&s.url, DEADLINE).await;

    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    let (entries, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM account_statements),
                (SELECT count(*) FROM events WHERE aggregate_type = 'account')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        entries, events,
        "every event is one statement entry, none twice"
    );
    let total: i64 = balances_from_events(&s.url).await.values().sum();
    let (_, _, totals) = s
        .query
        .get(&format!("/v1/subjects/{}/totals", s.api.subject().await))
        .await;
    assert_eq!(totals["totals"][0]["balance"], total);
    assert_eq!(totals["totals"][0]["accounts"], 8);
    // The status endpoint says it is caught up, at the head of the log.
    let head: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let projector = &s.projector;
    eventually(DEADLINE, "caught up in /status", || async move {
        let status = projector.status().await;
        let caught_up =
            status["projections"].as_array().unwrap().iter().all(|p| {
                p["lag_events"] == 0 && p["last_position"] == head && p["lag_seconds"] == 0.0
            });
        caught_up.then_some(()).ok_or_else(|| status.to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_and_an_unreadable_message_go_to_dead_letters_and_the_projector_moves_on() {
    let s = stack().await;
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    // An event no version of the contract knows, in the store: the relay publishes it.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', 'poison-1', 1, 'MoneyTeleported', '1', '{\"type\":\"MoneyTeleported\"}', '{}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // A message that is not an event at all, straight onto the topic.
    {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &s.broker.address)
            .create()
            .unwrap();
        producer
            .send(
                FutureRecord::to(&topic(&s.url))
                    .key("garbage")
                    .payload("not json at all"),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    // Ordinary traffic after both.
    let account = s.api.open_account().await;
    let answer = s.api.deposit(&account, 42).await;
    let (status, _, body) = s
        .query
        .get(&format!(
            "/v1/accounts/{account}?position={}",
            answer["position"]
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balance"], 42);

    let url = s.url.as_str();
    let letters: Vec<(String, String, Option<String>, Option<i32>)> =
        eventually(DEADLINE, "five dead letters", || async move {
            let mut conn = PgConnection::connect(url).await.unwrap();
            let letters: Vec<(String, String, Option<String>, Option<i32>)> = sqlx::query_as(
                "SELECT projection, reason, event_type, kafka_partition FROM dead_letters ORDER BY id",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            if letters.len() >= 5 {
                Ok(letters)
            } else {
                Err(format!("{letters:?}"))
            }
        })
        .await;
    let poison: Vec<_> = letters
        .iter()
        .filter(|l| l.2.as_deref() == Some("MoneyTeleported"))
        .collect();
    // Every projection that takes account events: summary, statement, totals, subjects.
    assert_eq!(poison.len(), 4, "one per projection: {letters:?}");
    assert!(
        poison.iter().all(|l| l.1.contains("unknown event type")),
        "{letters:?}"
    );
    let unreadable: Vec<_> = letters.iter().filter(|l| l.0 == "*").collect();
    assert_eq!(unreadable.len(), 1, "{letters:?}");
    assert!(unreadable[0].3.is_some(), "the partition is kept");
    let status = s.projector.status().await;
    assert_eq!(status["unreadable_messages"], 1, "{status}");
    // An account event reaches the account projections only (not `transfers`).
    for projection in status["projections"].as_array().unwrap() {
        let expected = if projection["name"] == "transfers" {
            0
        } else {
            1
        };
        assert_eq!(projection["dead_letters"], expected, "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_a_1000_entry_statement_while_appends_continue_sees_no_gap_and_no_duplicate() {
    let s = stack().await;
    let account = s.api.open_account().await;
    // 999 deposits straight into the store (as if made earlier), after the opening.
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'account', $1, s, 'MoneyDeposited', '2',
                json_build_object('type','MoneyDeposited','amount',1,'currency','EUR','reference',null), '{}'
           FROM generate_series(2, 1000) s",
    )
    .bind(&account)
    .execute(&mut conn)
    .await
    .unwrap();
    wait_until_projected(&s.url, DEADLINE).await;

    let appender = {
        let base = s.api.base.clone();
        let account = account.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for _ in 0..100 {
                let response = client
                    .post(format!("{base}/v1/accounts/{account}/deposits"))
                    .json(&json!({"amount": 1, "currency": "EUR"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/accounts/{account}/statement?limit=37&after={c}"),
            None => format!("/v1/accounts/{account}/statement?limit=37"),
        };
        let (status, _, page) = s.query.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for entry in page["entries"].as_array().unwrap() {
            seen.push(entry["sequence"].as_i64().unwrap());
        }
        cursor = Some(page["next_cursor"].as_str().unwrap().to_owned());
        if page["has_more"] == false && appender.is_finished() {
            break;
        }
    }
    appender.await.unwrap();
    wait_until_projected(&s.url, DEADLINE).await;
    // Read whatever was appended after the walk ended, from the same cursor.
    let (_, _, rest) = s
        .query
        .get(&format!(
            "/v1/accounts/{account}/statement?limit=500&after={}",
            cursor.unwrap()
        ))
        .await;
    for entry in rest["entries"].as_array().unwrap() {
        seen.push(entry["sequence"].as_i64().unwrap());
    }
    assert_eq!(
        seen,
        (1..=1100).collect::<Vec<i64>>(),
        "gap or duplicate in the walk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_the_projector_reads_the_store_and_reads_see_writes() {
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let projector = Projector::start(&url, None, &[]).await;
    let query = QueryApi::start(&url, &[]).await;
    let account = api.open_account().await;
    for amount in [5, 6, 7] {
        let answer = api.deposit(&account, amount).await;
        let (status, _, body) = query
            .get(&format!(
                "/v1/accounts/{account}?position={}",
                answer["position"]
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["last_position"], answer["position"]);
    }
    let status = projector.status().await;
    assert_eq!(status["source"], "store");
    wait_until_projected(&url, DEADLINE).await;
}

/// One member leaves the group (SIGTERM: it finishes its batches, commits its offsets and
/// leaves) while writes go on; the other takes its partitions over. (A member killed with
/// SIGKILL is replaced once the broker expires its session, or at once when it comes back
/// under the same `KAFKA_GROUP_INSTANCE_ID`: the kill -9 and crash-loop tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_projectors_in_one_group_share_the_work_and_survive_one_leaving() {
    let s = stack().await;
    let second = Projector::start(&s.url, Some(&s.broker.address), &[]).await;
    let accounts = join_all((0..6).map(|_| s.api.open_account())).await;
    for account in &accounts {
        for amount in 1..=5 {
            s.api.deposit(account, amount).await;
        }
    }
    wait_until_projected(&s.url, DEADLINE).await;
    let mut first = s.projector;
    first.process.signal(Signal::SIGTERM);
    for account in &accounts {
        for amount in 6..=8 {
            s.api.deposit(account, amount).await;
        }
    }
    assert_eq!(first.process.exit_code(Duration::from_secs(40)).await, 0);
    if let Err(why) = ledger_e2e::services::try_until_projected(&s.url, DEADLINE).await {
        let status = second.status().await;
        let mut second = second;
        second.process.signal(Signal::SIGKILL);
        let logs = second.process.drain().await;
        panic!(
            "{why}\nsurvivor status: {status}\nsurvivor log tail:\n{}",
            logs[logs.len().saturating_sub(40)..].join("\n")
        );
    }
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    let (entries, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM account_statements),
                (SELECT count(*) FROM events WHERE aggregate_type = 'account')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(entries, events);
    assert!(
        second.status().await["process"]["applied"]
            .as_i64()
            .unwrap()
            > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_sequence_is_repaired_from_the_store_never_skipped() {
    let mut s = stack().await;
    // Stop the relay: this test publishes by hand, leaving a hole.
    s.relay.process.signal(Signal::SIGTERM);
    s.relay.process.exit_code(Duration::from_secs(30)).await;
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', 'holey', 1, 'AccountOpened', '1', '{\"type\":\"AccountOpened\",\"owner\":\"h\",\"currency\":\"EUR\"}', '{}'),
                ('account', 'holey', 2, 'MoneyDeposited', '2', '{\"type\":\"MoneyDeposited\",\"amount\":20,\"currency\":\"EUR\",\"reference\":null}', '{}'),
                ('account', 'holey', 3, 'MoneyDeposited', '2', '{\"type\":\"MoneyDeposited\",\"amount\":300,\"currency\":\"EUR\",\"reference\":null}', '{}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let events = ledger_store::events_of(&mut conn, "account", "holey", 1, 3)
        .await
        .unwrap();
    {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &s.broker.address)
            .create()
            .unwrap();
        // Sequence 2 never reaches Kafka.
        for event in [&events[0], &events[2]] {
            let message = ledger_events::kafka::encode(event, "/test");
            let mut headers = OwnedHeaders::new();
            for (key, value) in &message.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            producer
                .send(
                    FutureRecord::to(&topic(&s.url))
                        .key(&message.key)
                        .payload(&message.value)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    let query = &s.query;
    let body = eventually(DEADLINE, "projected to version 3", || async move {
        let (status, _, body) = query.get("/v1/accounts/holey").await;
        if status == 200 && body["version"] == 3 {
            Ok(body)
        } else {
            Err(body.to_string())
        }
    })
    .await;
    assert_eq!(
        body["balance"], 320,
        "the missing deposit was applied: {body}"
    );
    let (_, _, page) = s.query.get("/v1/accounts/holey/statement").await;
    let sequences: Vec<i64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, vec![1, 2, 3]);
    let status = s.projector.status().await;
    assert!(
        status["process"]["repaired"].as_i64().unwrap() >= 3,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_projector_and_the_query_api_cleanly() {
    let s = stack().await;
    let account = s.api.open_account().await;
    let answer = s.api.deposit(&account, 9).await;
    let (status, _, _) = s
        .query
        .get(&format!(
            "/v1/accounts/{account}?position={}",
            answer["position"]
        ))
        .await;
    assert_eq!(status, 200);
    let (mut projector, mut query) = (s.projector, s.query);
    projector.process.signal(Signal::SIGTERM);
    query.process.signal(Signal::SIGTERM);
    assert_eq!(
        projector.process.exit_code(Duration::from_secs(40)).await,
        0
    );
    assert_eq!(query.process.exit_code(Duration::from_secs(40)).await, 0);
    let logs = projector.process.drain().await.join("\n");
    assert!(
        logs.contains("consumer stopped") && logs.contains("projector stopped"),
        "{logs}"
    );
    let logs = query.process.drain().await.join("\n");
    assert!(logs.contains("query API stopped"), "{logs}");
}

/// Deposits 1 into each of `accounts`, `rounds` times.
async fn deposits(api: &CommandApi, accounts: &[String], rounds: usize) {
    for _ in 0..rounds {
        join_all(accounts.iter().map(|account| api.deposit(account, 1))).await;
    }
}

/// Kills the projector twice within a few seconds (a crash loop), then starts it a third
/// time with `env`: it gets its partitions back, resumes, and says it is ready.
async fn crash_loop(env: &[(&str, &str)]) {
    let mut s = stack_with(env, "3").await;
    let accounts = join_all((0..6).map(|_| s.api.open_account())).await;
    deposits(&s.api, &accounts, 3).await;
    wait_until_projected(&s.url, DEADLINE).await;
    for _ in 0..2 {
        s.projector.process.signal(Signal::SIGKILL);
        s.projector.process.exit_code(Duration::from_secs(10)).await;
        deposits(&s.api, &accounts, 1).await;
        // Killed again as soon as it is up: before its first rebalance has settled.
        s.projector = Projector::start(&s.url, Some(&s.broker.address), env).await;
    }
    s.projector.process.signal(Signal::SIGKILL);
    s.projector.process.exit_code(Duration::from_secs(10)).await;
    s.projector = Projector::start(&s.url, Some(&s.broker.address), env).await;
    deposits(&s.api, &accounts, 2).await;
    if let Err(why) = ledger_e2e::services::try_until_projected(&s.url, DEADLINE).await {
        let status = s.projector.status().await;
        s.projector.process.signal(Signal::SIGKILL);
        let logs = s.projector.process.drain().await;
        panic!(
            "{why}\nstatus: {status}\nlog tail:\n{}",
            logs[logs.len().saturating_sub(40)..].join("\n")
        );
    }
    let ready = reqwest::get(format!("{}/readyz", s.projector.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let total: i64 = balances_from_events(&s.url).await.values().sum();
    assert_eq!(total, 6 * (3 + 2 + 2));
    assert_eq!(
        balances_in_read_model(&s.url).await,
        balances_from_events(&s.url).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_in_a_crash_loop_with_a_static_member_name_gets_its_partitions_back() {
    crash_loop(&[STATIC_MEMBER]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_in_a_crash_loop_with_dynamic_membership_gets_its_partitions_back() {
    crash_loop(&[]).await;
}

/// A member of the projector's group that holds the only partition and never makes progress
/// (a wedged replica): the projector receives nothing while the group's lag grows. It says
/// so (`/readyz` 503, the metric, a log line), leaves and rejoins, and once the wedged member
/// is gone it gets the partition and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_receives_nothing_while_the_group_lags_is_reported_and_rejoins() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let broker = Broker::shared().await;
    let url = migrated_database().await;
    let api = CommandApi::start(&url).await;
    let relay = Relay::start(&url, &broker.address, &[("KAFKA_TOPIC_PARTITIONS", "1")]).await;
    relay
        .wait_status("leader", DEADLINE, |s| s["leader"] == true)
        .await;
    // The wedged member joins first and sorts first (range assignment by member id), so it
    // keeps the partition through every rebalance. It polls (so it stays in the group) and
    // throws away what it gets, committing nothing.
    let group = ledger_e2e::services::projector_group(&url);
    let stop_wedged = Arc::new(AtomicBool::new(false));
    let (assigned_tx, assigned_rx) = std::sync::mpsc::channel();
    let wedged = {
        let (brokers, topic, group, stop) = (
            broker.address.clone(),
            topic(&url),
            group.clone(),
            stop_wedged.clone(),
        );
        std::thread::spawn(move || {
            let consumer: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .set("client.id", "aaa-wedged")
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .set("partition.assignment.strategy", "range")
                .create()
                .unwrap();
            consumer.subscribe(&[&topic]).unwrap();
            let mut told = false;
            while !stop.load(Ordering::SeqCst) {
                let _ = consumer.poll(Duration::from_millis(100));
                if !told && consumer.assignment().is_ok_and(|a| a.count() == 1) {
                    let _ = assigned_tx.send(());
                    told = true;
                }
            }
            consumer.unsubscribe();
        })
    };
    tokio::task::spawn_blocking(move || assigned_rx.recv_timeout(DEADLINE))
        .await
        .unwrap()
        .expect("the wedged member got the partition");
    let mut projector = Projector::start(
        &url,
        Some(&broker.address),
        &[("KAFKA_STALL_TIMEOUT", "2s")],
    )
    .await;
    let accounts = join_all((0..3).map(|_| api.open_account())).await;
    deposits(&api, &accounts, 2).await;

    let ready = format!("{}/readyz", projector.base);
    let reason = eventually(DEADLINE, "readyz 503 naming the stall", || {
        let ready = ready.clone();
        async move {
            let response = reqwest::get(&ready).await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            (status == 503 && body["checks"]["consumer"] == "stalled")
                .then(|| body["detail"].as_str().unwrap_or("").to_owned())
                .ok_or_else(|| format!("{status} {body}"))
        }
    })
    .await;
    assert!(reason.contains("events waiting"), "{reason}");
    projector
        .process
        .wait_for_line("consumer stalled", DEADLINE)
        .await;
    let metrics = reqwest::get(format!("{}/metrics", projector.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ledger_projector_consumer_stalled{consumer=\"projector\"} 1"),
        "{metrics}"
    );
    let base = projector.base.clone();
    eventually(DEADLINE, "a rejoin counted", || {
        let base = base.clone();
        async move {
            let status: Value = reqwest::get(format!("{base}/status"))
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            (status["process"]["rejoins"].as_u64().unwrap_or(0) >= 1)
                .then_some(())
                .ok_or_else(|| status["process"].to_string())
        }
    })
    .await;
    // Nothing was applied while the wedged member held the partition.
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM account_statements")
        .fetch_one(&mut PgConnection::connect(&url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(applied, 0);

    // The wedged member goes away: the projector gets the partition and catches up.
    stop_wedged.store(true, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || wedged.join())
        .await
        .unwrap()
        .unwrap();
    wait_until_projected(&url, DEADLINE).await;
    eventually(DEADLINE, "ready again", || {
        let ready = ready.clone();
        async move {
            let status = reqwest::get(&ready)
                .await
                .map_err(|e| e.to_string())?
                .status()
                .as_u16();
            (status == 200)
                .then_some(())
                .ok_or_else(|| status.to_string())
        }
    })
    .await;
    assert!(projector.status().await["process"]["stalled"].is_null());
}

/// Inserts `rows` (aggregate id, sequence, event type, version, payload as JSON text) into
/// the store in one transaction, in this order: the projector reads them as one batch.
async fn store_events(url: &str, rows: &[(&str, i64, &str, &str, String)]) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    for (aggregate, sequence, event_type, version, payload) in rows {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('account', $1, $2, $3, $4, $5::json, '{}')",
        )
        .bind(aggregate)
        .bind(sequence)
        .bind(event_type)
        .bind(version)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
}

fn opened(owner: &str) -> String {
    json!({"type": "AccountOpened", "owner": owner, "currency": "EUR"}).to_string()
}

fn deposited(amount: i64, reference: &str) -> String {
    json!({"type": "MoneyDeposited", "amount": amount, "currency": "EUR", "reference": reference})
        .to_string()
}

/// Waits until the summary of `account` exists; returns its (balance, version).
async fn summary_of(url: &str, account: &str) -> (i64, i64) {
    eventually(DEADLINE, &format!("{account} projected"), || async move {
        let mut conn = PgConnection::connect(url).await.unwrap();
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT balance, version FROM account_summaries WHERE account_id = $1")
                .bind(account)
                .fetch_optional(&mut conn)
                .await
                .unwrap();
        row.ok_or_else(|| "not yet".to_owned())
    })
    .await
}

/// One batch holds a deposit whose reference carries a NUL (PostgreSQL text cannot hold
/// it: the statement's insert fails) and a deposit that would take a balance past a
/// bigint. Each is dead-lettered by the projections it poisons, with the reason, and every
/// other event of the batch is applied; the projector carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_poison_event_in_the_middle_applies_every_other_event() {
    let url = migrated_database().await;
    let mut rows = vec![("poisoned", 1, "AccountOpened", "1", opened("p"))];
    for sequence in 2..=100 {
        let reference = if sequence == 50 { "nul \0 here" } else { "ok" };
        rows.push((
            "poisoned",
            sequence,
            "MoneyDeposited",
            "2",
            deposited(1, reference),
        ));
    }
    rows.push(("brimful", 1, "AccountOpened", "1", opened("q")));
    rows.push((
        "brimful",
        2,
        "MoneyDeposited",
        "2",
        deposited(i64::MAX, "all"),
    ));
    rows.push((
        "brimful",
        3,
        "MoneyDeposited",
        "2",
        deposited(1, "one more"),
    ));
    rows.push((
        "brimful",
        4,
        "AccountClosed",
        "1",
        json!({"type": "AccountClosed"}).to_string(),
    ));
    store_events(&url, &rows).await;
    let _projector = Projector::start(&url, None, &[]).await;
    store_events(&url, &[("later", 1, "AccountOpened", "1", opened("p"))]).await;

    summary_of(&url, "later").await;
    assert_eq!(summary_of(&url, "poisoned").await, (99, 100));
    assert_eq!(summary_of(&url, "brimful").await, (i64::MAX, 4));
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM account_statements WHERE account_id = 'poisoned' ORDER BY sequence",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        sequences,
        (1..=100).filter(|s| *s != 50).collect::<Vec<i64>>()
    );
    let last: i64 = sqlx::query_scalar(
        "SELECT balance_after FROM account_statements WHERE account_id = 'poisoned' AND sequence = 100",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        last, 98,
        "the running balance leaves out the dead-lettered entry"
    );
    let letters: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT projection, aggregate_id, sequence, reason FROM dead_letters
          ORDER BY aggregate_id, projection",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let found: Vec<(&str, &str, i64)> = letters
        .iter()
        .map(|(p, a, s, _)| (p.as_str(), a.as_str(), *s))
        .collect();
    assert_eq!(
        found,
        vec![
            ("account_statement", "brimful", 3),
            ("account_summary", "brimful", 3),
            ("subject_totals", "brimful", 3),
            ("account_statement", "poisoned", 50),
        ],
        "{letters:?}"
    );
    assert!(
        letters[3].3.starts_with("the database refused it (22"),
        "{letters:?}"
    );
    assert!(letters[1].3.contains("bigint"), "{letters:?}");
    // The v1 openings name the owners `p` and `q`: their legacy subjects.
    let mut totals = Vec::new();
    for owner in ["p", "q"] {
        let balance: String =
            sqlx::query_scalar("SELECT balance::text FROM subject_totals WHERE subject_id = $1")
                .bind(legacy_subject_id(owner))
                .fetch_one(&mut conn)
                .await
                .unwrap();
        totals.push(balance);
    }
    assert_eq!(totals, vec!["99".to_owned(), i64::MAX.to_string()]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM subject_totals")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

/// Three accounts of one owner hold 2 × (2^63 − 1) + 5 minor units together: more than a
/// bigint holds. The owner's total is exact (a `numeric` column), the query API answers it,
/// and the projector carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_whose_accounts_together_hold_more_than_a_bigint_gets_the_exact_total() {
    let url = migrated_database().await;
    let _projector = Projector::start(&url, None, &[]).await;
    let query = QueryApi::start(&url, &[]).await;
    let mut rows = Vec::new();
    for (account, amount) in [("rich-1", i64::MAX), ("rich-2", i64::MAX), ("rich-3", 5)] {
        rows.push((account, 1, "AccountOpened", "1", opened("rich")));
        rows.push((account, 2, "MoneyDeposited", "2", deposited(amount, "x")));
    }
    store_events(&url, &rows).await;
    store_events(
        &url,
        &[("after-rich", 1, "AccountOpened", "1", opened("rich"))],
    )
    .await;
    summary_of(&url, "after-rich").await;

    let expected = (2 * i128::from(i64::MAX) + 5).to_string();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let (balance, accounts): (String, i64) =
        sqlx::query_as("SELECT balance::text, accounts FROM subject_totals WHERE subject_id = $1")
            .bind(legacy_subject_id("rich"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((balance.as_str(), accounts), (expected.as_str(), 4));
    let letters: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(letters, 0);
    let body = query
        .client
        .get(format!(
            "{}/v1/subjects/{}/totals",
            query.base,
            legacy_subject_id("rich")
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains(&format!("\"balance\":{expected}")), "{body}");
}

/// Eight owners' accounts spread over eight partitions, deposits in random order, four
/// workers: every batch touches several owners' totals. Batches lock rows in one global
/// order, so PostgreSQL never has to break a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_under_load_apply_without_a_deadlock() {
    let s = stack_with(&[("PROJECTOR_WORKERS", "4")], "8").await;
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         SELECT 'account', 'load-' || a, 1, 'AccountOpened', '1',
                json_build_object('type','AccountOpened','owner','owner-' || (a % 8),'currency','EUR'),
                '{}'::json
           FROM generate_series(0, 63) a ORDER BY random()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for round in 0..3 {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'account', 'load-' || a, s, 'MoneyDeposited', '2',
                    json_build_object('type','MoneyDeposited','amount',1,'currency','EUR','reference',null),
                    '{}'::json
               FROM generate_series(0, 63) a, generate_series($1, $1 + 19) s
              ORDER BY s, random()",
        )
        .bind(2 + round * 20)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    wait_until_projected(&s.url, DEADLINE).await;
    let totals: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT subject_id::text, balance::text, accounts FROM subject_totals ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(totals.len(), 8, "{totals:?}");
    assert!(
        totals.iter().all(|(_, b, a)| b == "480" && *a == 8),
        "{totals:?}"
    );
    let mut projector = s.projector;
    projector.process.signal(Signal::SIGTERM);
    assert_eq!(
        projector.process.exit_code(Duration::from_secs(40)).await,
        0
    );
    let logs = projector.process.drain().await;
    let deadlocks: Vec<&String> = logs
        .iter()
        .filter(|line| line.contains("deadlock detected"))
        .collect();
    assert!(deadlocks.is_empty(), "{deadlocks:#?}");
}

/// A batch that keeps failing (its table is gone) is retried; SIGTERM still stops the
/// projector at once, long before its shutdown timeout, leaving the batch uncommitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_projector_that_is_retrying_a_failing_batch() {
    let s = stack_with(&[("SHUTDOWN_TIMEOUT", "300s")], "3").await;
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    sqlx::query("ALTER TABLE account_summaries RENAME TO account_summaries_gone")
        .execute(&mut conn)
        .await
        .unwrap();
    s.api.open_account().await;
    let mut projector = s.projector;
    projector
        .process
        .wait_for_line("batch failed; retrying", DEADLINE)
        .await;
    projector.process.signal(Signal::SIGTERM);
    assert_eq!(
        projector.process.exit_code(Duration::from_secs(30)).await,
        0
    );
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM account_statements")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, 0, "nothing of the failing batch was committed");
}
