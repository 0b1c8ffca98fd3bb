//! Data subjects and personal data on the write side (issue 17, ADR 0019): registering and
//! erasing subjects, accounts by subject, references sealed under the subject's key, the
//! erasure notification between processes, and the key-encryption key at start-up.

use std::time::Duration;

use ledger_pii::{CacheSettings, DecryptError, KeyStore, Keyring};
use ledger_platform::auth::{self, Scope};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    eventually, spawn_app, spawn_app_on, spawn_app_with, test_keyring, TestApp, TEST_KEK,
};

/// A key store as another process (the projector) would have it: no cache shared with
/// the app.
fn reader(app: &TestApp) -> KeyStore {
    KeyStore::new(app.pool.clone(), test_keyring(), CacheSettings::default())
}

/// Every event of one aggregate: (event_id, sequence, event_type, payload, metadata).
async fn events(
    app: &TestApp,
    aggregate_type: &str,
    id: Uuid,
) -> Vec<(Uuid, i64, String, Value, Value)> {
    sqlx::query_as(
        "SELECT event_id, sequence, event_type, payload::jsonb, metadata::jsonb FROM events
          WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// Whether `text` occurs anywhere in the events, snapshots or stored answers.
async fn stored_anywhere(app: &TestApp, text: &str) -> bool {
    let pattern = format!("%{text}%");
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE payload::text LIKE $1 OR metadata::text LIKE $1)
             OR EXISTS (SELECT 1 FROM snapshots WHERE payload::text LIKE $1)
             OR EXISTS (SELECT 1 FROM idempotency_keys WHERE response_body::text LIKE $1)",
    )
    .bind(pattern)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_subject_stores_its_name_only_encrypted_under_its_own_key_bound_to_the_event()
{
    let app = spawn_app().await;
    let name = "Zoë Registered-Distinctive";
    let answer = app.register_subject(name, None).await;
    assert_eq!(answer.status, 201, "{}", answer.text);
    let subject = answer.subject_id();
    assert_eq!(subject.get_version_num(), 7, "a server-chosen UUID v7");
    assert!(answer.body["position"].as_i64().unwrap() > 0);
    assert!(
        !answer.text.contains("Zoë"),
        "the name is not answered: {}",
        answer.text
    );

    let stored = events(&app, "subject", subject).await;
    assert_eq!(stored.len(), 1);
    let (event_id, sequence, event_type, payload, metadata) = &stored[0];
    assert_eq!((*sequence, event_type.as_str()), (1, "SubjectRegistered"));
    assert_eq!(
        answer.body["position"],
        json!(position_of(&app, *event_id).await)
    );
    let ciphertext = payload["name"].as_str().unwrap();
    assert!(ledger_pii::is_encrypted(ciphertext), "{ciphertext}");
    let keys = reader(&app);
    assert_eq!(
        keys.decrypt(subject, *event_id, "name", ciphertext)
            .await
            .unwrap(),
        name
    );
    // Bound to its event: under another event id it does not authenticate.
    assert!(matches!(
        keys.decrypt(subject, Uuid::now_v7(), "name", ciphertext)
            .await,
        Err(DecryptError::Field(_))
    ));
    assert!(metadata.get("data_subject").is_none(), "{metadata}");
    assert!(!stored_anywhere(&app, "Registered-Distinctive").await);
}

async fn position_of(app: &TestApp, event_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT global_position FROM events WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_key_cannot_be_stored_writes_no_event_either() {
    let app = spawn_app().await;
    // The key row fails after the event was appended in the same transaction.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_keys() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'no keys today'; END $$;
         CREATE TRIGGER refuse_keys BEFORE INSERT ON subject_keys
           FOR EACH ROW EXECUTE FUNCTION refuse_keys();",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let answer = app.register_subject("Nobody Stored", None).await;
    answer.assert_problem(500, "internal_error");
    assert_eq!(app.event_count().await, 0, "the event went with the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_name_is_checked_like_an_owner_and_a_bad_one_writes_nothing() {
    let app = spawn_app().await;
    for (body, status, code) in [
        (json!({"name": "  "}), 400, "invalid_field"),
        (json!({"name": "x".repeat(201)}), 400, "invalid_field"),
        (json!({"name": "a\u{0007}b"}), 400, "invalid_field"),
        (
            json!({"name": "Ann", "subject_id": Uuid::now_v7()}),
            400,
            "invalid_field",
        ),
        (json!({}), 400, "invalid_field"),
    ] {
        let answer = app.post("/v1/subjects", &body, None).await;
        answer.assert_problem(status, code);
        assert!(!answer.text.contains("xxxxxxxx"), "the name is not echoed");
    }
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_twice_with_one_idempotency_key_registers_once_and_answers_the_same() {
    let app = spawn_app().await;
    let first = app.register_subject("Ida Empotent", Some("reg-1")).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = app.register_subject("Ida Empotent", Some("reg-1")).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    app.register_subject("Someone Else", Some("reg-1"))
        .await
        .assert_problem(422, "idempotency_key_reused");
    assert_eq!(app.event_count().await, 1);
    assert!(!stored_anywhere(&app, "Empotent").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_a_subject_destroys_its_key_and_erasing_again_answers_the_same() {
    let app = spawn_app().await;
    let subject = app.new_subject("Erin Erased").await;
    let registered = events(&app, "subject", subject).await;

    let first = app.erase_subject(subject, None).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.body["subject_id"], json!(subject));
    let stored = events(&app, "subject", subject).await;
    assert_eq!(stored.len(), 2);
    assert_eq!((stored[1].1, stored[1].2.as_str()), (2, "SubjectErased"));
    assert_eq!(stored[1].3, json!({"type": "SubjectErased"}));
    assert_eq!(
        first.body["position"],
        json!(position_of(&app, stored[1].0).await)
    );
    let erased_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(first.body["erased_at"].clone()).unwrap();
    let (wrapped, at): (Option<Vec<u8>>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT wrapped_key, erased_at FROM subject_keys WHERE subject_id = $1")
            .bind(subject)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!((wrapped, at), (None, Some(erased_at)));
    // The name is gone for every reader.
    let name = registered[0].3["name"].as_str().unwrap();
    assert!(matches!(
        reader(&app)
            .decrypt(subject, registered[0].0, "name", name)
            .await,
        Err(DecryptError::KeyErased { .. })
    ));

    let again = app.erase_subject(subject, None).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body, first.body);
    assert_eq!(events(&app, "subject", subject).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_an_unknown_or_legacy_subject_is_404() {
    let app = spawn_app().await;
    app.erase_subject(Uuid::now_v7(), None)
        .await
        .assert_problem(404, "subject_not_found");
    // A holder known only by the name in a v1 `AccountOpened` has no key: not a
    // registered subject.
    let account = seed_v1_account(&app, "Legacy Lee").await;
    let legacy = ledger_events::subject::legacy_subject_id("Legacy Lee");
    app.erase_subject(legacy, None)
        .await
        .assert_problem(404, "subject_not_found");
    assert_eq!(
        app.event_count().await,
        1,
        "only the seeded event: {account}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasures_racing_each_other_all_answer_the_first_erasure() {
    let app = spawn_app().await;
    let other = spawn_app_on(&app.database_url, app.pool.clone(), &[]).await;
    let subject = app.new_subject("Rae Racing").await;
    let answers = futures::future::join_all((0..8).map(|i| {
        let target = if i % 2 == 0 { &app } else { &other };
        target.erase_subject(subject, None)
    }))
    .await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.body, answers[0].body);
    }
    assert_eq!(events(&app, "subject", subject).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_needs_the_admin_scope_and_registration_the_write_scope() {
    let app = spawn_app_with(&["--auth-mode", "api-keys"]).await;
    let writer = auth::create(&app.pool, "writer", &[Scope::Write])
        .await
        .unwrap()
        .key;
    let operator = auth::create(&app.pool, "operator", &[Scope::Admin])
        .await
        .unwrap()
        .key;
    let registered = app
        .post_as(
            &writer,
            "/v1/subjects",
            &json!({"name": "Scoped Sam"}),
            None,
        )
        .await;
    assert_eq!(registered.status, 201, "{}", registered.text);
    let subject = registered.subject_id();
    let erasure = format!("/v1/subjects/{subject}/erasure");
    app.post_as(&writer, &erasure, &Value::Null, None)
        .await
        .assert_problem(403, "forbidden");
    app.post_as(&operator, "/v1/subjects", &json!({"name": "Op"}), None)
        .await
        .assert_problem(403, "forbidden");
    let erased = app.post_as(&operator, &erasure, &Value::Null, None).await;
    assert_eq!(erased.status, 200, "{}", erased.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_opened_for_a_registered_subject_only() {
    let app = spawn_app().await;
    let subject = app.new_subject("Ola Opener").await;
    let opened = app.open_account_for(subject, "EUR").await;
    assert_eq!(opened.status, 201, "{}", opened.text);
    assert_eq!(opened.body["subject_id"], json!(subject));
    assert!(opened.body.get("owner").is_none());
    let account = opened.account_id();
    let stored = app.events_of(account).await;
    assert_eq!(
        stored[0].2,
        json!({"type": "AccountOpened", "subject_id": subject, "currency": "EUR"})
    );
    let before = app.event_count().await;

    app.open_account_for(Uuid::now_v7(), "EUR")
        .await
        .assert_problem(422, "subject_not_found");
    for body in [
        json!({"subject_id": subject, "owner": "Ola Opener", "currency": "EUR"}),
        json!({"currency": "EUR"}),
    ] {
        let answer = app.post("/v1/accounts", &body, None).await;
        answer.assert_problem(400, "invalid_field");
        assert_eq!(answer.body["field"], "subject_id");
        assert!(!answer.text.contains("Ola"), "{}", answer.text);
    }
    assert_eq!(app.event_count().await, before);

    assert_eq!(app.erase_subject(subject, None).await.status, 200);
    let before = app.event_count().await;
    app.open_account_for(subject, "EUR")
        .await
        .assert_problem(422, "subject_erased");
    assert_eq!(app.event_count().await, before);
    // Money stays: the erased subject's account still takes deposits without a reference.
    let deposited = app.deposit(account, 10, None).await;
    assert_eq!(deposited.status, 200, "{}", deposited.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deprecated_owner_path_registers_a_new_subject_for_the_name() {
    let app = spawn_app().await;
    let opened = app
        .post(
            "/v1/accounts",
            &json!({"owner": "Olga Oldclient", "currency": "EUR"}),
            Some("old-1"),
        )
        .await;
    assert_eq!(opened.status, 201, "{}", opened.text);
    let subject = opened.subject_id();
    assert!(!opened.text.contains("Olga"), "{}", opened.text);
    let registered = events(&app, "subject", subject).await;
    assert_eq!(registered.len(), 1);
    let name = registered[0].3["name"].as_str().unwrap();
    assert_eq!(
        reader(&app)
            .decrypt(subject, registered[0].0, "name", name)
            .await
            .unwrap(),
        "Olga Oldclient"
    );
    // A retry replays the answer: no second subject, no second account.
    let again = app
        .post(
            "/v1/accounts",
            &json!({"owner": "Olga Oldclient", "currency": "EUR"}),
            Some("old-1"),
        )
        .await;
    assert_eq!(again.body, opened.body);
    assert_eq!(app.event_count().await, 2);
    assert!(!stored_anywhere(&app, "Oldclient").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_is_sealed_under_the_accounts_subject_and_bound_to_its_event() {
    let app = spawn_app_with(&["--snapshot-every", "2"]).await;
    let subject = app.new_subject("Rita Reference").await;
    let account = app.open_account_for(subject, "EUR").await.account_id();
    let answer = app
        .deposit_with_reference(account, 5, "invoice 42 for Rita", Some("ref-1"))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let replay = app
        .deposit_with_reference(account, 5, "invoice 42 for Rita", Some("ref-1"))
        .await;
    assert_eq!(replay.body, answer.body);
    let withdrawn = app
        .post(
            &format!("/v1/accounts/{account}/withdrawals"),
            &json!({"amount": 2, "currency": "EUR", "reference": "refund to Rita"}),
            None,
        )
        .await;
    assert_eq!(withdrawn.status, 200, "{}", withdrawn.text);

    let stored = events(&app, "account", account).await;
    assert_eq!(stored.len(), 3);
    let keys = reader(&app);
    for ((event_id, _, event_type, payload, metadata), plain) in stored[1..]
        .iter()
        .zip(["invoice 42 for Rita", "refund to Rita"])
    {
        let sealed = payload["reference"].as_str().unwrap();
        assert!(ledger_pii::is_encrypted(sealed), "{event_type}: {sealed}");
        assert_eq!(metadata["data_subject"], json!(subject.to_string()));
        // The event is stored under the id the reference is bound to.
        assert_eq!(
            keys.decrypt(subject, *event_id, "reference", sealed)
                .await
                .unwrap(),
            plain
        );
    }
    assert!(!stored_anywhere(&app, "Rita").await);
    assert!(!stored_anywhere(&app, "invoice 42").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_for_an_erased_subject_is_refused_and_money_without_one_still_moves() {
    let app = spawn_app().await;
    let subject = app.new_subject("Ernie Erased").await;
    let account = app.open_account_for(subject, "EUR").await.account_id();
    assert_eq!(app.deposit(account, 100, None).await.status, 200);
    assert_eq!(app.erase_subject(subject, None).await.status, 200);
    let before = app.event_count().await;
    let refused = app
        .deposit_with_reference(account, 5, "for Ernie", None)
        .await;
    refused.assert_problem(422, "subject_erased");
    assert_eq!(refused.body["subject_id"], json!(subject));
    app.post(
        &format!("/v1/accounts/{account}/withdrawals"),
        &json!({"amount": 5, "currency": "EUR", "reference": "for Ernie"}),
        None,
    )
    .await
    .assert_problem(422, "subject_erased");
    assert_eq!(app.event_count().await, before);
    let withdrawn = app.withdraw(account, 30, None).await;
    assert_eq!(withdrawn.status, 200, "{}", withdrawn.text);
    assert_eq!(withdrawn.body["balance"], 70);
    // An unknown account is still 404, reference or not.
    app.deposit_with_reference(Uuid::now_v7(), 5, "x", None)
        .await
        .assert_problem(404, "account_not_found");
}

/// Seeds an account opened by version 1 of the contract (`owner` in clear) and returns its
/// id.
async fn seed_v1_account(app: &TestApp, owner: &str) -> Uuid {
    let account = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('account', $1, 1, 'AccountOpened', '1', $2::json, '{}')",
    )
    .bind(account.to_string())
    .bind(json!({"type": "AccountOpened", "owner": owner, "currency": "EUR"}).to_string())
    .execute(&app.pool)
    .await
    .unwrap();
    account
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_on_an_account_of_a_legacy_owner_is_refused_as_not_migrated() {
    let app = spawn_app().await;
    let account = seed_v1_account(&app, "Lena Legacy").await;
    let refused = app
        .deposit_with_reference(account, 5, "for Lena", None)
        .await;
    refused.assert_problem(422, "subject_not_migrated");
    assert_eq!(
        refused.body["subject_id"],
        json!(ledger_events::subject::legacy_subject_id("Lena Legacy"))
    );
    assert!(!refused.text.contains("Lena"), "{}", refused.text);
    let deposited = app.deposit(account, 5, None).await;
    assert_eq!(deposited.status, 200, "{}", deposited.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_by_another_process_reaches_this_ones_key_cache_at_once() {
    let app = spawn_app().await;
    let other = spawn_app_on(&app.database_url, app.pool.clone(), &[]).await;
    let subject = app.new_subject("Nora Notified").await;
    let account = app.open_account_for(subject, "EUR").await.account_id();
    // The key is now cached by `app` (for 30 s).
    let sealed = app.deposit_with_reference(account, 1, "first", None).await;
    assert_eq!(sealed.status, 200, "{}", sealed.text);
    assert_eq!(other.erase_subject(subject, None).await.status, 200);
    // Well within the cache's TTL: only the notification can tell `app`.
    eventually(
        Duration::from_secs(10),
        "the erasure to reach the other process",
        || async {
            let answer = app.deposit_with_reference(account, 1, "again", None).await;
            answer.status == 422 && answer.code() == "subject_erased"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_malformed_key_encryption_key_stops_start_up_naming_the_setting() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let secret = "KioqKioqKioqKioqKioqKioqKioqKioqKioq";
    for kek in [
        None,
        Some(format!("test:{secret}")),
        Some("no separator".into()),
    ] {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger-command"));
        command
            .env_clear()
            .env("DATABASE_URL", &url)
            .env("COMMAND_LISTEN_ADDR", "127.0.0.1:0")
            .kill_on_drop(true);
        if let Some(kek) = &kek {
            command.env("PII_KEK", kek);
        }
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("the process exits")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{kek:?}: {stderr}");
        assert!(stderr.contains("PII_KEK"), "{kek:?}: {stderr}");
        assert!(!stderr.contains(secret), "the value leaked: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_encryption_key_refuses_to_start_and_the_right_one_starts() {
    let app = spawn_app().await;
    app.new_subject("Kay Keyed").await;
    let settings = crate::helpers::settings(&app.database_url, &[]);
    // The right id with other key material: the stored key does not unwrap.
    let wrong = Keyring::parse(
        Some("test:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        None,
    )
    .unwrap();
    let refused = ledger_command::startup::Application::build(&settings, wrong)
        .await
        .expect_err("a wrong KEK must not start");
    assert!(
        matches!(refused, ledger_command::startup::StartupError::Keys(_)),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("PII_KEK"), "{refused}");
    // Another id altogether: the KEK the key names is missing.
    let missing = Keyring::parse(Some(&TEST_KEK.replacen("test", "other", 1)), None).unwrap();
    assert!(
        ledger_command::startup::Application::build(&settings, missing)
            .await
            .is_err()
    );
    let started = ledger_command::startup::Application::build(&settings, test_keyring()).await;
    assert!(started.is_ok(), "{:?}", started.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_subjects_and_accounts_by_subject() {
    let app = spawn_app().await;
    let doc: Value = app
        .client
        .get(format!("{}/openapi.json", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/subjects"]["post"].is_object(), "{doc}");
    assert!(doc["paths"]["/v1/subjects/{subject_id}/erasure"]["post"].is_object());
    let schemas = &doc["components"]["schemas"];
    let account = &schemas["AccountResponse"]["properties"];
    assert!(
        account["subject_id"].is_object() && account["owner"].is_null(),
        "{account}"
    );
    assert_eq!(
        schemas["OpenAccountRequest"]["properties"]["owner"]["deprecated"],
        json!(true)
    );
    for schema in [
        "SubjectResponse",
        "ErasureResponse",
        "RegisterSubjectRequest",
    ] {
        assert!(schemas[schema].is_object(), "{schema}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_never_logs_a_name_or_a_reference() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let (url, _pool) = crate::helpers::fresh_database().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ledger-command"))
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("COMMAND_LISTEN_ADDR", "127.0.0.1:0")
        .env("AUTH_MODE", "disabled")
        .env("PII_KEK", TEST_KEK)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let address = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the service starts")
            .unwrap()
            .expect("the service is running");
        log.push(line.clone());
        if line.contains("command API listening") {
            let entry: Value = serde_json::from_str(&line).unwrap();
            break format!("http://{}", entry["addr"].as_str().unwrap());
        }
    };
    let client = reqwest::Client::new();
    let post = |path: String, body: Value| {
        let request = client.post(format!("{address}{path}")).json(&body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let name = "Quintessa Logsearch";
    let subject = post("/v1/subjects".into(), json!({"name": name})).await["subject_id"].clone();
    let account = post(
        "/v1/accounts".into(),
        json!({"subject_id": subject, "currency": "EUR"}),
    )
    .await["account_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deprecated = post(
        "/v1/accounts".into(),
        json!({"owner": "Quintessa Oldpath", "currency": "EUR"}),
    )
    .await;
    assert!(deprecated["subject_id"].is_string(), "{deprecated}");
    // Letters only: a number could turn up in a timing or an id of the log by chance.
    let reference = "invoice Quintessa-Zqxwv";
    post(
        format!("/v1/accounts/{account}/deposits"),
        json!({"amount": 5, "currency": "EUR", "reference": reference}),
    )
    .await;
    // Refused requests too: a bad name, a reference after erasure.
    post(
        "/v1/subjects".into(),
        json!({"name": "Quintessa\u{0007}Bad"}),
    )
    .await;
    let subject = subject.as_str().unwrap().to_owned();
    post(format!("/v1/subjects/{subject}/erasure"), Value::Null).await;
    let refused = post(
        format!("/v1/accounts/{account}/deposits"),
        json!({"amount": 5, "currency": "EUR", "reference": reference}),
    )
    .await;
    assert_eq!(refused["code"], "subject_erased");

    // Stop it and read everything it wrote.
    child.start_kill().unwrap();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
    {
        log.push(line);
    }
    let log = log.join("\n");
    assert!(log.contains("data subject erased"), "{log}");
    for secret in ["Quintessa", "Logsearch", "Oldpath", "Zqxwv"] {
        assert!(!log.contains(secret), "`{secret}` was logged:\n{log}");
    }
}
