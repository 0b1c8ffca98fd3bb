//! SQL for the `idempotency_keys` table, and request fingerprints.
//!
//! A key is claimed either by the trigger on `events` (in the transaction that appends the
//! request's events) or by [`record_refusal`] (a request refused by a domain rule appends
//! nothing). Either way the first claim wins and every later request with the key gets the
//! first one's answer, or a 422 when its fingerprint differs.
//!
//! Keys are scoped per client ([`ClientKey`]): the same key sent with two API keys is two
//! keys, and one client never sees another's answer (ADR 0012).

use std::collections::HashSet;
use std::time::Duration;

use ledger_events::Metadata;
use ledger_pii::Keyring;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// The one scope of every request when the API runs without authentication.
pub const ANONYMOUS_SCOPE: &str = "anonymous";
/// The scope of keys stored before keys were scoped (migration `..._idempotency_key_scopes`),
/// and of events whose metadata names no scope.
pub const LEGACY_SCOPE: &str = "legacy";

/// The scope of a request authenticated by the API key `api_key`, or of an unauthenticated
/// one (`None`, `AUTH_MODE=disabled`).
pub fn client_scope(api_key: Option<Uuid>) -> String {
    api_key.map_or_else(|| ANONYMOUS_SCOPE.to_owned(), |id| format!("key:{id}"))
}

/// An `Idempotency-Key` as the client that sent it owns it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Whose key it is ([`client_scope`]).
    pub scope: String,
    /// The key as sent.
    pub key: String,
}

impl ClientKey {
    /// `key` in `scope`.
    pub fn new(scope: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            scope: scope.into(),
            key: key.into(),
        }
    }

    /// The key events with `metadata` claim, in the scope the trigger on `events` uses
    /// (metadata without a scope claims in [`LEGACY_SCOPE`]).
    pub fn of(metadata: &Metadata) -> Option<Self> {
        metadata.idempotency_key.as_ref().map(|key| {
            let scope = metadata
                .idempotency_scope
                .as_deref()
                .unwrap_or(LEGACY_SCOPE);
            Self::new(scope, key.clone())
        })
    }
}

/// The answer given to a request, kept so duplicates get the same one.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body (an account summary or a problem).
    pub body: Value,
}

/// What is known about a key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// The key as stored: the client's own, or a legacy key with the same request.
    pub key: ClientKey,
    /// Fingerprint of the request that first used the key.
    pub request_hash: String,
    /// For a key claimed by appended events: the aggregate and its last event under the key.
    pub appended: Option<Appended>,
    /// The answer, once stored.
    pub response: Option<StoredResponse>,
}

/// Where the events appended under a key ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The aggregate the events belong to.
    pub aggregate_id: String,
    /// Sequence of its last event under the key.
    pub last_sequence: i64,
    /// Global position of that event.
    pub last_position: i64,
}

/// A request's fingerprints over method, path and the canonical JSON of the body (object
/// keys sorted, no insignificant white space): keyed digests under each configured KEK
/// ([`Keyring::fingerprints`], the current one's first, which is the one stored), then the
/// unkeyed SHA-256 that keys stored before keyed fingerprints hold (accepted, never stored
/// again). A body may hold a name or a reference, and fingerprints are stored and
/// published with the events: an unkeyed hash would let anyone confirm a guessed name
/// (ADR 0019).
pub fn fingerprints(keyring: &Keyring, method: &str, path: &str, body: &Value) -> Vec<String> {
    let message = format!("{method}\n{path}\n{body}");
    let mut accepted = keyring.fingerprints(message.as_bytes());
    accepted.push(hex::encode(Sha256::digest(message.as_bytes())));
    accepted
}

/// One row of `idempotency_keys`, as read.
#[derive(sqlx::FromRow)]
struct KeyRow {
    client_scope: String,
    request_hash: String,
    aggregate_id: Option<String>,
    last_sequence: Option<i64>,
    last_position: Option<i64>,
    response_status: Option<i16>,
    response_body: Option<Value>,
}

/// The record for `key`, if its client used it; failing that, a legacy key (stored before
/// keys were scoped, so of unknown client) used with the same request `request_hash`, which
/// is this client retrying across the upgrade or a request identical in every byte.
pub async fn find(
    pool: &PgPool,
    key: &ClientKey,
    request_hashes: &[String],
) -> Result<Option<KeyRecord>, sqlx::Error> {
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT client_scope, request_hash, aggregate_id, last_sequence, last_position,
                response_status, response_body
           FROM idempotency_keys
          WHERE idempotency_key = $1
            AND (client_scope = $2 OR (client_scope = $3 AND request_hash = ANY($4)))
          ORDER BY client_scope = $3
          LIMIT 1",
    )
    .bind(&key.key)
    .bind(&key.scope)
    .bind(LEGACY_SCOPE)
    .bind(request_hashes)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| KeyRecord {
        key: ClientKey::new(row.client_scope, key.key.clone()),
        request_hash: row.request_hash,
        appended: match (row.aggregate_id, row.last_sequence, row.last_position) {
            (Some(aggregate_id), Some(last_sequence), Some(last_position)) => Some(Appended {
                aggregate_id,
                last_sequence,
                last_position,
            }),
            _ => None,
        },
        response: match (row.response_status, row.response_body) {
            (Some(status), Some(body)) => Some(StoredResponse {
                status: u16::try_from(status).unwrap_or(500),
                body,
            }),
            _ => None,
        },
    }))
}

/// Whether `key` has been claimed in its scope (by committed events or a stored refusal).
pub async fn is_claimed(pool: &PgPool, key: &ClientKey) -> Result<bool, sqlx::Error> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM idempotency_keys WHERE idempotency_key = $1 AND client_scope = $2",
    )
    .bind(&key.key)
    .bind(&key.scope)
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some())
}

/// Which of `keys` are claimed (one query for a whole batch).
pub async fn claimed_among(
    pool: &PgPool,
    keys: &[ClientKey],
) -> Result<HashSet<ClientKey>, sqlx::Error> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let (names, scopes): (Vec<&str>, Vec<&str>) = keys
        .iter()
        .map(|k| (k.key.as_str(), k.scope.as_str()))
        .unzip();
    let claimed: Vec<(String, String)> = sqlx::query_as(
        "SELECT k.idempotency_key, k.client_scope
           FROM idempotency_keys k
           JOIN unnest($1::text[], $2::text[]) AS w(idempotency_key, client_scope)
          USING (idempotency_key, client_scope)",
    )
    .bind(&names)
    .bind(&scopes)
    .fetch_all(pool)
    .await?;
    Ok(claimed
        .into_iter()
        .map(|(key, scope)| ClientKey::new(scope, key))
        .collect())
}

/// Stores the answer for a key claimed by appended events (first answer wins).
pub async fn save_response(
    pool: &PgPool,
    key: &ClientKey,
    response: &StoredResponse,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys SET response_status = $3, response_body = $4
          WHERE idempotency_key = $1 AND client_scope = $2 AND response_status IS NULL",
    )
    .bind(&key.key)
    .bind(&key.scope)
    .bind(i16::try_from(response.status).unwrap_or(500))
    .bind(&response.body)
    .execute(pool)
    .await?;
    Ok(())
}

/// Claims `key` for a refused request with its answer. `false` when the key was claimed
/// first by another request of the same client (whose answer then stands).
pub async fn record_refusal(
    pool: &PgPool,
    key: &ClientKey,
    request_hash: &str,
    response: &StoredResponse,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, client_scope, request_hash,
                                       response_status, response_body)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (idempotency_key, client_scope) DO NOTHING",
    )
    .bind(&key.key)
    .bind(&key.scope)
    .bind(request_hash)
    .bind(i16::try_from(response.status).unwrap_or(500))
    .bind(&response.body)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Forgets keys older than `retention`; they may be used again afterwards.
pub async fn purge_expired(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let seconds = retention.as_secs_f64();
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(seconds)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fingerprints_ignore_key_order_and_see_every_field() {
        let keyring = ledger_pii::testing::test_keyring();
        let fingerprint = |method: &str, path: &str, body: &Value| {
            fingerprints(&keyring, method, path, body)[0].clone()
        };
        let a: Value = serde_json::from_str(r#"{"amount": 5, "currency": "EUR"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "currency":"EUR","amount":5 }"#).unwrap();
        assert_eq!(fingerprint("POST", "/x", &a), fingerprint("POST", "/x", &b));
        let c = json!({"amount": 6, "currency": "EUR"});
        assert_ne!(fingerprint("POST", "/x", &a), fingerprint("POST", "/x", &c));
        assert_ne!(fingerprint("POST", "/x", &a), fingerprint("POST", "/y", &a));
    }

    #[test]
    fn the_stored_fingerprint_is_keyed_and_the_unkeyed_one_is_only_accepted() {
        let keyring = ledger_pii::testing::test_keyring();
        let body = json!({"name": "Ada Lovelace"});
        let accepted = fingerprints(&keyring, "POST", "/v1/subjects", &body);
        let unkeyed = hex::encode(Sha256::digest(
            format!("POST\n/v1/subjects\n{body}").as_bytes(),
        ));
        assert_ne!(
            accepted[0], unkeyed,
            "what is stored needs the KEK to compute"
        );
        assert_eq!(
            accepted.last(),
            Some(&unkeyed),
            "keys stored before still match"
        );
    }
}
