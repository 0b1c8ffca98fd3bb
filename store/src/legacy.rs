//! The statements of the one sanctioned rewrite of stored payloads: moving personal data
//! written in clear before data subjects existed (a v1 `AccountOpened`'s `owner`, a v2
//! reference) into subjects and ciphertext (ADR 0019, `ledger-admin pii migrate-legacy`).
//!
//! Event ids, sequences, positions, amounts and types stay as they are; only the payload,
//! its version and the metadata of the rewritten rows change. Everything here runs inside
//! the caller's transaction, so one legacy owner is migrated whole or not at all.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// A v1 `AccountOpened`: the holder's name in clear.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LegacyOpening {
    /// The account.
    pub aggregate_id: String,
    /// The opening event.
    pub event_id: Uuid,
    /// The holder's name as written.
    pub owner: String,
    /// The account's currency code.
    pub currency: String,
}

/// An event of an account whose payload holds a reference in clear.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PlainReference {
    /// The event.
    pub event_id: Uuid,
    /// The account.
    pub aggregate_id: String,
    /// The payload as stored.
    pub payload: Value,
    /// The metadata as stored.
    pub metadata: Value,
}

/// Up to `limit` owner names still written in clear in a v1 `AccountOpened`, oldest first.
pub async fn legacy_owners(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT owner FROM (
             SELECT payload->>'owner' AS owner, min(global_position) AS first
               FROM events
              WHERE aggregate_type = 'account' AND event_type = 'AccountOpened'
                AND payload->>'owner' IS NOT NULL
              GROUP BY 1) o
          ORDER BY first
          LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Every v1 `AccountOpened` naming `owner`, locked against a concurrent migration.
pub async fn openings_of(
    conn: &mut PgConnection,
    owner: &str,
) -> Result<Vec<LegacyOpening>, sqlx::Error> {
    sqlx::query_as(
        "SELECT aggregate_id, event_id, payload->>'owner' AS owner,
                payload->>'currency' AS currency
           FROM events
          WHERE aggregate_type = 'account' AND event_type = 'AccountOpened'
            AND payload->>'owner' = $1
          ORDER BY global_position
            FOR UPDATE",
    )
    .bind(owner)
    .fetch_all(conn)
    .await
}

/// The deposits and withdrawals of `accounts` whose reference is text not yet encrypted
/// (not starting with `pii1.`), locked.
pub async fn plain_references(
    conn: &mut PgConnection,
    accounts: &[String],
) -> Result<Vec<PlainReference>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_id, aggregate_id, payload::jsonb AS payload, metadata::jsonb AS metadata
           FROM events
          WHERE aggregate_type = 'account' AND aggregate_id = ANY($1)
            AND event_type IN ('MoneyDeposited', 'MoneyWithdrawn')
            AND json_typeof(payload->'reference') = 'string'
            AND left(payload->>'reference', 5) <> 'pii1.'
          ORDER BY global_position
            FOR UPDATE",
    )
    .bind(accounts)
    .fetch_all(conn)
    .await
}

/// Appends one event with the id the caller chose, unless the aggregate already has an
/// event at `sequence`; `true` when it appended. Call it before any other write of the
/// transaction (the `events_append_first` trigger, ADR 0017).
#[allow(clippy::too_many_arguments)]
pub async fn append_one(
    conn: &mut PgConnection,
    event_id: Uuid,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: i64,
    event_type: &str,
    event_version: &str,
    payload: &Value,
) -> Result<bool, sqlx::Error> {
    let appended = sqlx::query(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type,
                             event_version, payload, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7::json, '{}'::json)
         ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(sequence)
    .bind(event_type)
    .bind(event_version)
    .bind(payload.to_string())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(appended == 1)
}

/// Replaces one event's payload, version and metadata in place.
pub async fn rewrite(
    conn: &mut PgConnection,
    event_id: Uuid,
    event_version: &str,
    payload: &Value,
    metadata: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE events SET event_version = $2, payload = $3::json, metadata = $4::json
          WHERE event_id = $1",
    )
    .bind(event_id)
    .bind(event_version)
    .bind(payload.to_string())
    .bind(metadata.to_string())
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the snapshots of `accounts` (written by older code, they may hold the name in
/// clear); the next load reads the events and writes new ones. Returns how many.
pub async fn drop_snapshots(
    conn: &mut PgConnection,
    accounts: &[String],
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM snapshots WHERE aggregate_type = 'account' AND aggregate_id = ANY($1)",
    )
    .bind(accounts)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Replaces `owner` by `subject_id` in the answers stored for idempotency keys of commands
/// on `accounts` (older code put the name in every account answer). Returns how many.
pub async fn scrub_answers(
    conn: &mut PgConnection,
    accounts: &[String],
    subject: Uuid,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE idempotency_keys
            SET response_body = ((response_body::jsonb - 'owner')
                                 || jsonb_build_object('subject_id', $2::text))::json
          WHERE aggregate_type = 'account' AND aggregate_id = ANY($1)
            AND response_body::jsonb ? 'owner'",
    )
    .bind(accounts)
    .bind(subject.to_string())
    .execute(conn)
    .await?
    .rows_affected())
}

/// Replaces the raw value of the dead letters of `event_id` by its rewritten payload (they
/// keep the message as it was read, in clear for a legacy event). Returns how many.
pub async fn scrub_dead_letters(
    conn: &mut PgConnection,
    event_id: Uuid,
    payload: &Value,
) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("UPDATE dead_letters SET raw_value = $2 WHERE event_id = $1")
            .bind(event_id)
            .bind(payload.to_string())
            .execute(conn)
            .await?
            .rows_affected(),
    )
}
