//! Personal data (ADR 0019): a person's name and references are in clear only where the
//! read side serves them, never in a log, a Kafka message, an event or a snapshot; after
//! erasure they are nowhere and nothing left anywhere can be decrypted, while every cent
//! stays where it was.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger_e2e::eventually;
use ledger_e2e::kafka::{read_available, Received};
use ledger_e2e::process::binary;
use ledger_e2e::services::{
    admin, balances_from_events, migrated_database, topic, wait_until_projected, CommandApi,
    QueryApi, Stack, StackEnv,
};
use ledger_e2e::Process;
use ledger_pii::{DecryptError, KeyStore, ERASED_MARKER};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

/// Our crates log at debug level here: a name must not leak even there.
const LOGS: (&str, &str) = (
    "RUST_LOG",
    "info,ledger_command=debug,ledger_relay=debug,ledger_projector=debug,ledger_query=debug,\
     ledger_store=debug,ledger_readmodels=debug,ledger_platform=debug,ledger_pii=debug",
);

/// The read-model tables that serve a person's data in clear until the person is erased:
/// the only places a name or a reference may be found before erasure.
const SERVING_TABLES: [&str; 2] = ["public.subjects", "public.account_statements"];

async fn stack() -> Stack {
    Stack::start(StackEnv {
        // A snapshot every second event, so the accounts' snapshots are searched too.
        command: &[("SNAPSHOT_EVERY", "2"), LOGS],
        relay: &[LOGS],
        projector: &[LOGS],
        query: &[LOGS],
    })
    .await
}

async fn post(api: &CommandApi, path: &str, body: Value) -> (u16, Value) {
    let response = api
        .client
        .post(format!("{}{path}", api.base))
        .header("Idempotency-Key", Uuid::new_v4().to_string())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn register(api: &CommandApi, name: &str) -> String {
    let (status, body) = post(api, "/v1/subjects", json!({ "name": name })).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        !body.to_string().contains(name),
        "the answer is stored for the idempotency key: it must not hold the name: {body}"
    );
    body["subject_id"].as_str().unwrap().to_owned()
}

async fn open(api: &CommandApi, subject: &str) -> String {
    let (status, body) = post(
        api,
        "/v1/accounts",
        json!({"subject_id": subject, "currency": "EUR"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["subject_id"], subject, "{body}");
    body["account_id"].as_str().unwrap().to_owned()
}

async fn money(api: &CommandApi, account: &str, kind: &str, amount: i64, reference: &str) {
    let (status, body) = post(
        api,
        &format!("/v1/accounts/{account}/{kind}"),
        json!({"amount": amount, "currency": "EUR", "reference": reference}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_string().contains(reference), "{body}");
}

async fn erase(api: &CommandApi, subject: &str) -> (u16, Value) {
    post(api, &format!("/v1/subjects/{subject}/erasure"), Value::Null).await
}

/// Every table (any schema but the catalog's) one of whose rows, as text, contains
/// `needle`.
async fn tables_holding(url: &str, needle: &str) -> BTreeSet<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables
          WHERE table_type = 'BASE TABLE'
            AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut holding = BTreeSet::new();
    for (schema, table) in tables {
        let found: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM \"{schema}\".\"{table}\" t WHERE strpos(t::text, $1) > 0)"
        ))
        .bind(needle)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if found {
            holding.insert(format!("{schema}.{table}"));
        }
    }
    holding
}

/// Every message of the test's topic, read from the beginning.
fn messages(url: &str, brokers: &str) -> Vec<Received> {
    read_available(brokers, &topic(url), Duration::from_secs(2), DEADLINE)
}

fn message_text(message: &Received) -> String {
    let mut text = format!("{} {}", message.key, message.value);
    for (name, value) in &message.headers {
        text.push_str(&format!(" {name}={value}"));
    }
    text
}

/// Where `needle` is found outside the read models that serve it: each process's log, the
/// Kafka messages and every table but `allowed`.
async fn leaks(s: &mut Stack, needle: &str, allowed: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (name, process) in [
        ("ledger-command", &mut s.api.process),
        ("ledger-relay", &mut s.relay.process),
        ("ledger-projector", &mut s.projector.process),
        ("ledger-query", &mut s.query.process),
    ] {
        let lines = process.lines_so_far();
        assert!(
            !lines.is_empty(),
            "{name} logged nothing: the search would prove nothing"
        );
        if let Some(line) = lines.iter().find(|line| line.contains(needle)) {
            found.push(format!("{name}'s log: {line}"));
        }
    }
    let messages = messages(&s.url, &s.broker.address);
    assert!(!messages.is_empty(), "no message on the topic");
    for message in &messages {
        if message_text(message).contains(needle) {
            found.push(format!("Kafka message {}", message_text(message)));
        }
    }
    for table in tables_holding(&s.url, needle).await {
        if !allowed.contains(&table.as_str()) {
            found.push(format!("table {table}"));
        }
    }
    found
}

/// Every `pii1.` value in the store's payloads: (event id, subject, field, ciphertext).
async fn ciphertexts(url: &str) -> Vec<(Uuid, Uuid, String, String)> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let rows: Vec<(Uuid, String, String, Value, Value)> = sqlx::query_as(
        "SELECT event_id, aggregate_type, aggregate_id, payload::jsonb, metadata::jsonb
           FROM events ORDER BY global_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut found = Vec::new();
    for (event_id, aggregate_type, aggregate_id, payload, metadata) in rows {
        for (field, value) in payload.as_object().unwrap() {
            let Some(text) = value.as_str().filter(|t| t.starts_with("pii1.")) else {
                continue;
            };
            let subject = if aggregate_type == "subject" {
                aggregate_id.clone()
            } else {
                metadata["data_subject"]
                    .as_str()
                    .expect("an encrypted field names its data subject")
                    .to_owned()
            };
            found.push((
                event_id,
                subject.parse().unwrap(),
                field.clone(),
                text.to_owned(),
            ));
        }
    }
    found
}

fn key_store(pool: PgPool) -> KeyStore {
    ledger_pii::testing::test_key_store(&pool)
}

async fn statement_references(query: &QueryApi, account: &str) -> Vec<Value> {
    let (status, _, page) = query
        .get(&format!("/v1/accounts/{account}/statement"))
        .await;
    assert_eq!(status, 200, "{page}");
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["reference"].clone())
        .filter(|reference| !reference.is_null())
        .collect()
}

/// The whole life of a person's data: in clear only where it is served; erased, it is
/// nowhere and nothing is decryptable; the money is untouched; a rebuild gives the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persons_data_is_served_but_never_logged_or_published_and_after_erasure_is_nowhere() {
    let mut s = stack().await;
    let tag = Uuid::new_v4().simple().to_string();
    let name = format!("Quillon Vasquerade {}", &tag[..8]);
    let reference = format!("INVOICE-{}-XQ", &tag[8..16]);
    let other_reference = format!("RENT-{}-ZW", &tag[16..24]);

    let subject = register(&s.api, &name).await;
    let first = open(&s.api, &subject).await;
    let second = open(&s.api, &subject).await;
    money(&s.api, &first, "deposits", 1_000, &reference).await;
    money(&s.api, &first, "withdrawals", 100, &other_reference).await;
    money(&s.api, &second, "deposits", 50, &reference).await;
    let (status, transfer) = post(
        &s.api,
        "/v1/transfers",
        json!({"from": first, "to": second, "amount": 300, "currency": "EUR"}),
    )
    .await;
    assert_eq!(status, 202, "{transfer}");
    let transfer_id = transfer["transfer_id"].as_str().unwrap().to_owned();

    // Served in clear by the read side.
    let query = &s.query;
    eventually(DEADLINE, "the transfer completed", || async {
        let (_, _, t) = query.get(&format!("/v1/transfers/{transfer_id}")).await;
        (t["status"] == "completed")
            .then_some(())
            .ok_or(t.to_string())
    })
    .await;
    wait_until_projected(&s.url, DEADLINE).await;
    eventually(DEADLINE, "the name served", || async {
        let (_, _, subject_doc) = query.get(&format!("/v1/subjects/{subject}")).await;
        let (_, _, account) = query.get(&format!("/v1/accounts/{first}")).await;
        (subject_doc["name"] == name.as_str() && account["owner"] == name.as_str())
            .then_some(())
            .ok_or(format!("{subject_doc} {account}"))
    })
    .await;
    // Each read model keeps its own pace: the statement and the totals are waited for too.
    eventually(
        DEADLINE,
        "the statement and the totals caught up",
        || async {
            let refs = statement_references(query, &first).await;
            let (_, _, totals) = query.get(&format!("/v1/subjects/{subject}/totals")).await;
            (refs.contains(&json!(reference))
                && refs.contains(&json!(other_reference))
                && totals["totals"][0]["balance"] == 950)
                .then_some(())
                .ok_or(format!("{refs:?} {totals}"))
        },
    )
    .await;
    let (status, _, export) = query.get(&format!("/v1/subjects/{subject}/export")).await;
    assert_eq!(status, 200, "{export}");
    let export_text = export.to_string();
    assert!(
        export_text.contains(&name) && export_text.contains(&reference),
        "{export}"
    );
    let (_, _, totals_before) = query.get(&format!("/v1/subjects/{subject}/totals")).await;
    let balances_before = balances_from_events(&s.url).await;
    assert_eq!(balances_before[&first], 600);
    assert_eq!(balances_before[&second], 350);

    // ... but nowhere else: no log, no message, no event, no snapshot. Nor the unkeyed
    // hash of the registration request, which would confirm a guessed name: the stored
    // fingerprint is keyed.
    let guessable = {
        use sha2::Digest;
        let body = json!({ "name": name });
        hex::encode(sha2::Sha256::digest(
            format!("POST\n/v1/subjects\n{body}").as_bytes(),
        ))
    };
    let registrations: i64 = {
        let mut conn = PgConnection::connect(&s.url).await.unwrap();
        sqlx::query_scalar(
            "SELECT count(*) FROM events
              WHERE aggregate_type = 'subject' AND metadata->>'request_hash' IS NOT NULL",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    assert_eq!(
        registrations, 1,
        "the registration was keyed: it carries a fingerprint"
    );
    for needle in [&name, &reference, &other_reference, &guessable] {
        let found = leaks(&mut s, needle, &SERVING_TABLES).await;
        assert!(
            found.is_empty(),
            "{needle:?} found outside the read models: {found:#?}"
        );
    }
    let query = &s.query;
    // The search looks where the data would be: the name is a subject's field.
    let pool = PgPool::connect(&s.url).await.unwrap();
    let sealed = ciphertexts(&s.url).await;
    assert!(
        sealed.len() >= 4,
        "name and three references sealed: {sealed:?}"
    );
    let keys = key_store(pool.clone());
    for (event_id, subject_id, field, text) in &sealed {
        let plain = keys
            .decrypt(*subject_id, *event_id, field, text)
            .await
            .unwrap();
        assert!([&name, &reference, &other_reference].contains(&&plain));
    }
    let messages_before = messages(&s.url, &s.broker.address);
    let registered = messages_before
        .iter()
        .find(|m| m.header("ledger_event_type") == "SubjectRegistered")
        .expect("the registration reached Kafka");
    assert_eq!(registered.header("ledger_data_subject"), subject);
    assert_eq!(registered.header("ledger_pii_key_version"), "1");

    // Erased: the answer holds no personal data and is the same the second time.
    let (status, erased) = erase(&s.api, &subject).await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["subject_id"], subject.as_str());
    let (status, again) = erase(&s.api, &subject).await;
    assert_eq!((status, &again), (200, &erased));
    let (status, unknown) = erase(&s.api, &Uuid::now_v7().to_string()).await;
    assert_eq!(status, 404, "{unknown}");

    eventually(DEADLINE, "the marker served everywhere", || async {
        let (_, _, subject_doc) = query.get(&format!("/v1/subjects/{subject}")).await;
        let (_, _, account) = query.get(&format!("/v1/accounts/{second}")).await;
        let refs = statement_references(query, &first).await;
        (subject_doc["name"] == ERASED_MARKER
            && account["owner"] == ERASED_MARKER
            && refs.iter().all(|r| r == ERASED_MARKER))
        .then_some(())
        .ok_or(format!("{subject_doc} {account} {refs:?}"))
    })
    .await;
    // Money stays.
    assert_eq!(balances_from_events(&s.url).await, balances_before);
    wait_until_projected(&s.url, DEADLINE).await;
    let (_, _, totals_after) = query.get(&format!("/v1/subjects/{subject}/totals")).await;
    assert_eq!(totals_after["totals"], totals_before["totals"]);
    let (status, _, export) = query.get(&format!("/v1/subjects/{subject}/export")).await;
    assert_eq!(status, 200);
    assert_eq!(export["subject"]["name"], ERASED_MARKER, "{export}");
    assert_eq!(export["accounts"].as_array().unwrap().len(), 2, "{export}");

    // Nowhere at all now, read models included, and nothing decrypts.
    for needle in [&name, &reference, &other_reference] {
        let found = leaks(&mut s, needle, &[]).await;
        assert!(
            found.is_empty(),
            "{needle:?} found after erasure: {found:#?}"
        );
    }
    let query = &s.query;
    let keys = key_store(pool.clone());
    for (event_id, subject_id, field, text) in &ciphertexts(&s.url).await {
        let result = keys.decrypt(*subject_id, *event_id, field, text).await;
        assert!(
            matches!(result, Err(DecryptError::KeyErased { .. })),
            "{field} of {event_id} is still decryptable: {result:?}"
        );
    }
    for message in messages(&s.url, &s.broker.address) {
        let Some(reference) = message.value["reference"].as_str() else {
            continue;
        };
        if !reference.starts_with("pii1.") {
            continue;
        }
        let subject_id = message.header("ledger_data_subject").parse().unwrap();
        let event_id = message.event_id().parse().unwrap();
        let result = keys
            .decrypt(subject_id, event_id, "reference", reference)
            .await;
        assert!(matches!(result, Err(DecryptError::KeyErased { .. })));
    }

    // A rebuild from the log after erasure gives the marker, and the same money.
    let (_, _, account_live) = query.get(&format!("/v1/accounts/{first}")).await;
    let run = admin(&s.url, &["--json", "rebuild", "all"]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    wait_until_projected(&s.url, DEADLINE).await;
    let (_, _, account_rebuilt) = query.get(&format!("/v1/accounts/{first}")).await;
    assert_eq!(account_rebuilt["owner"], ERASED_MARKER);
    assert_eq!(account_rebuilt["balance"], account_live["balance"]);
    assert!(statement_references(query, &first)
        .await
        .iter()
        .all(|r| r == ERASED_MARKER));
    for needle in [&name, &reference] {
        assert!(tables_holding(&s.url, needle).await.is_empty());
    }
    pool.close().await;
}

/// Erasure under a stream of deposits, withdrawals and transfers of the subject's accounts
/// loses no money: every account's balance in the read model equals its events, and the
/// sum over the accounts is what was deposited minus what was withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_racing_deposits_and_transfers_loses_no_money() {
    let s = stack().await;
    let subject = register(&s.api, "Racing Person").await;
    let first = open(&s.api, &subject).await;
    let second = open(&s.api, &subject).await;
    money(&s.api, &first, "deposits", 10_000, "opening").await;

    // Traffic runs until told to stop; the erasure lands in the middle of it: after 20
    // answers, and the traffic goes on for 20 answers more.
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (api_base, first, second) = (s.api.base.clone(), first.clone(), second.clone());
        let (answered, stop) = (answered.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let (mut deposited, mut refused) = (0, 0);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let (path, body) = match n % 3 {
                    0 => (
                        format!("/v1/accounts/{second}/deposits"),
                        json!({"amount": 10, "currency": "EUR", "reference": format!("r{n}")}),
                    ),
                    1 => (
                        format!("/v1/accounts/{first}/deposits"),
                        json!({"amount": 10, "currency": "EUR"}),
                    ),
                    _ => (
                        "/v1/transfers".to_owned(),
                        json!({"from": first, "to": second, "amount": 7, "currency": "EUR"}),
                    ),
                };
                n += 1;
                let response = client
                    .post(format!("{api_base}{path}"))
                    .header("Idempotency-Key", Uuid::new_v4().to_string())
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let answer: Value = response.json().await.unwrap_or(Value::Null);
                match status {
                    200 => deposited += 10,
                    202 => {}
                    // A deposit with a reference once the subject is erased: refused, nothing
                    // written.
                    422 => {
                        assert_eq!(answer["code"], "subject_erased", "{answer}");
                        refused += 1;
                    }
                    other => panic!("{other}: {answer}"),
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
            (deposited, refused)
        })
    };
    let count = answered.clone();
    eventually(DEADLINE, "20 answers before the erasure", || {
        let count = count.clone();
        async move {
            let seen = count.load(Ordering::SeqCst);
            (seen >= 20).then_some(()).ok_or(seen.to_string())
        }
    })
    .await;
    let (status, body) = erase(&s.api, &subject).await;
    assert_eq!(status, 200, "{body}");
    let erased_at = answered.load(Ordering::SeqCst);
    eventually(DEADLINE, "20 answers after the erasure", || {
        let count = count.clone();
        async move {
            let seen = count.load(Ordering::SeqCst);
            (seen >= erased_at + 20)
                .then_some(())
                .ok_or(seen.to_string())
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let (deposited, refused) = traffic.await.unwrap();
    assert!(
        refused > 0,
        "no deposit with a reference came after the erasure"
    );

    let query = &s.query;
    eventually(DEADLINE, "every transfer ended", || async {
        let mut conn = PgConnection::connect(&s.url).await.unwrap();
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM transfers WHERE state NOT IN ('completed', 'failed', 'compensated')",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        (open == 0).then_some(()).ok_or(format!("{open} open"))
    })
    .await;
    wait_until_projected(&s.url, DEADLINE).await;
    let balances = balances_from_events(&s.url).await;
    assert_eq!(
        balances[&first] + balances[&second],
        10_000 + deposited,
        "{balances:?}"
    );
    let (_, _, account) = query.get(&format!("/v1/accounts/{second}")).await;
    assert_eq!(account["balance"], balances[&second]);
    // The erasure is projected from the subject's own partition: within the normal lag.
    eventually(DEADLINE, "the marker shown", || async {
        let (_, _, account) = query.get(&format!("/v1/accounts/{second}")).await;
        (account["owner"] == ERASED_MARKER)
            .then_some(())
            .ok_or(account.to_string())
    })
    .await;
}

/// A ciphertext that fails authentication (here: one moved onto another event, whose id it
/// is not bound to) is a dead letter with its reason; the events around it apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ciphertext_that_fails_authentication_is_a_dead_letter_and_the_rest_applies() {
    let s = stack().await;
    let subject = register(&s.api, "Tampered Person").await;
    let account = open(&s.api, &subject).await;
    money(&s.api, &account, "deposits", 5, "genuine").await;
    let mut conn = PgConnection::connect(&s.url).await.unwrap();
    let (sealed, subject_of_event): (String, String) = sqlx::query_as(
        "SELECT payload->>'reference', metadata->>'data_subject' FROM events
          WHERE aggregate_id = $1 AND event_type = 'MoneyDeposited'",
    )
    .bind(&account)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    // The same ciphertext on a new event: its id is not the one the ciphertext is bound to.
    let metadata = json!({ "data_subject": subject_of_event });
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('account', $1, 3, 'MoneyDeposited', '3',
                 json_build_object('type', 'MoneyDeposited', 'amount', 7, 'currency', 'EUR',
                                   'reference', $2::text),
                 $3::json)",
    )
    .bind(&account)
    .bind(&sealed)
    .bind(metadata.to_string())
    .execute(&mut conn)
    .await
    .unwrap();
    money(&s.api, &account, "deposits", 11, "after").await;

    let url = s.url.clone();
    let reason = eventually(DEADLINE, "a dead letter", || async {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::query_scalar::<_, String>("SELECT reason FROM dead_letters LIMIT 1")
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "none yet".to_owned())
    })
    .await;
    assert!(
        reason.contains("authentic"),
        "the reason says what failed: {reason}"
    );
    let query = &s.query;
    // The name comes from the subject's registration, which the projector may apply after
    // the account's events (another partition): wait for both.
    eventually(
        DEADLINE,
        "the deposit after applied and the name shown",
        || async {
            let refs = statement_references(query, &account).await;
            let (_, _, summary) = query.get(&format!("/v1/accounts/{account}")).await;
            (refs.contains(&json!("genuine"))
                && refs.contains(&json!("after"))
                && summary["owner"] == "Tampered Person")
                .then_some(())
                .ok_or(format!("{refs:?} {summary}"))
        },
    )
    .await;
}

/// A process that handles personal data refuses to start without its key-encryption key,
/// or with a wrong one, and says which setting is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_encryption_key_refuses_to_start_naming_the_setting() {
    let url = migrated_database().await;
    // A subject, so there is a wrapped key to verify the keyring against.
    let api = CommandApi::start(&url).await;
    register(&api, "Key Check").await;
    drop(api);

    let wrong = "test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for (binary_name, kek) in [
        ("ledger-command", ""),
        ("ledger-projector", ""),
        ("ledger-command", "no-colon-garbage"),
        ("ledger-command", wrong),
        ("ledger-projector", wrong),
    ] {
        let mut env = vec![("DATABASE_URL", url.as_str()), ("PII_KEK", kek)];
        if binary_name == "ledger-projector" {
            env.push(("PROJECTOR_LISTEN_ADDR", "127.0.0.1:0"));
        } else {
            env.push(("COMMAND_LISTEN_ADDR", "127.0.0.1:0"));
        }
        let mut process = Process::start_clean(&binary(binary_name), &[], &env);
        let code = process.exit_code(DEADLINE).await;
        assert_ne!(code, 0, "{binary_name} started with PII_KEK={kek:?}");
        let lines = process.drain().await.join("\n");
        assert!(
            lines.contains("PII_KEK"),
            "{binary_name} with PII_KEK={kek:?} says nothing of the setting:\n{lines}"
        );
        if !kek.is_empty() {
            assert!(!lines.contains(kek), "the message echoes the key:\n{lines}");
        }
    }
}
