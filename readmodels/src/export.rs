//! Everything the read models hold about one data subject, as one document (the right of
//! access and to data portability): the subject, each of its accounts with its whole
//! statement, and every transfer touching those accounts. Read in one REPEATABLE READ
//! transaction, so the parts agree with each other; only this subject's rows are read.

use serde::Serialize;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

use crate::statements::StatementEntry;
use crate::subjects::Subject;
use crate::summaries::AccountSummary;
use crate::transfers::TransferRow;

/// The export of one subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SubjectExport {
    /// The subject (its name is `[erased]` once erased).
    pub subject: Subject,
    /// Its accounts, by account id.
    pub accounts: Vec<AccountExport>,
    /// Every transfer from or to one of its accounts, oldest request first.
    pub transfers: Vec<TransferRow>,
}

/// One account of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AccountExport {
    /// The account as `GET /v1/accounts/{id}` answers it.
    pub summary: AccountSummary,
    /// Every statement entry, oldest first (references `[erased]` once erased).
    pub statement: Vec<StatementEntry>,
}

/// The export of `subject_id`, or `None` when the read models do not know the subject.
pub async fn of_subject(
    pool: &PgPool,
    subject_id: Uuid,
) -> Result<Option<SubjectExport>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let subject: Option<Subject> = sqlx::query_as(
        "SELECT subject_id, name, legacy, registered_at, erased_at, last_position, updated_at
           FROM subjects WHERE subject_id = $1",
    )
    .bind(subject_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(subject) = subject else {
        return Ok(None);
    };
    let summaries: Vec<AccountSummary> = sqlx::query_as(
        "SELECT a.account_id, a.subject_id, s.name AS owner, a.currency, a.balance, a.status,
                a.version, a.last_position, a.updated_at
           FROM account_summaries a LEFT JOIN subjects s USING (subject_id)
          WHERE a.subject_id = $1 ORDER BY a.account_id",
    )
    .bind(subject_id)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<&str> = summaries.iter().map(|s| s.account_id.as_str()).collect();
    let entries: Vec<(String, StatementEntry)> = sqlx::query_as::<
        _,
        (
            String,
            i64,
            i64,
            Uuid,
            String,
            i64,
            i64,
            Option<String>,
            Option<Uuid>,
            chrono::DateTime<chrono::Utc>,
        ),
    >(
        "SELECT account_id, sequence, global_position, event_id, entry_type, amount,
                balance_after, reference, transfer_id, recorded_at
           FROM account_statements WHERE account_id = ANY($1::text[])
          ORDER BY account_id, sequence",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| {
        (
            r.0,
            StatementEntry {
                sequence: r.1,
                global_position: r.2,
                event_id: r.3,
                entry_type: r.4,
                amount: r.5,
                balance_after: r.6,
                reference: r.7,
                transfer_id: r.8,
                recorded_at: r.9,
            },
        )
    })
    .collect();
    let transfers: Vec<TransferRow> = sqlx::query_as(
        "SELECT transfer_id, from_account, to_account, amount, currency, state, failure_code,
                failure_reason, version, last_position, requested_at, updated_at
           FROM transfers
          WHERE from_account = ANY($1::text[]) OR to_account = ANY($1::text[])
          ORDER BY requested_at, transfer_id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut accounts: Vec<AccountExport> = summaries
        .into_iter()
        .map(|summary| AccountExport {
            summary,
            statement: Vec::new(),
        })
        .collect();
    for (account_id, entry) in entries {
        if let Some(account) = accounts
            .iter_mut()
            .find(|a| a.summary.account_id == account_id)
        {
            account.statement.push(entry);
        }
    }
    Ok(Some(SubjectExport {
        subject,
        accounts,
        transfers,
    }))
}
