//! The transfer process manager: drives each transfer from the log (ADR 0008).
//!
//! It reacts to transfer events, and only to them:
//!
//! - `TransferRequested` → debit the source (`TransferSent`), then mark the transfer
//!   debited; if the source refuses (insufficient funds, closed, unknown, other currency),
//!   fail the transfer.
//! - `TransferDebited` → credit the destination (`TransferReceived`), settle the source
//!   (`TransferSettled`: nothing of it is in flight any more, so the source may be closed),
//!   then complete the transfer; if the destination refuses, refund the source
//!   (`TransferRefunded`), then mark the transfer compensated.
//!
//! Each money-moving step has a deterministic id derived from the transfer id
//! ([`TransferStep`]), and a step is taken by exactly one event, claimed in that event's own
//! transaction (`transfer_steps`): the debit by `TransferSent` *or* `TransferFailed`, the
//! credit by `TransferReceived` *or* `TransferRefunded`. Whatever is re-delivered, and
//! wherever the process dies, a step is never taken twice, and never both ways. Reactions
//! are therefore safe to repeat, and the source (Kafka or the store) commits its position
//! only after they succeed.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use ledger_command::domain::{Account, AccountCommand, Transfer, TransferCommand, TransferError};
use ledger_command::ledger::{Intent, Ledger, LedgerError, RetryPolicy};
use ledger_command::transfer_steps::{self, StepClaim};
use ledger_events::metadata::TRACEPARENT;
use ledger_events::{
    AccountEvent, Metadata, RecordedEvent, TransferEvent, TransferStep, TRANSFER_AGGREGATE_TYPE,
};
use ledger_readmodels::dead_letters::{self, NewDeadLetter};
use ledger_readmodels::progress;
use sqlx::PgPool;
use uuid::Uuid;

use crate::apply::{Applied, Incoming, Origin};

/// How often one reaction is retried in place before its batch fails (and is retried).
const IN_PLACE_ATTEMPTS: u32 = 20;

/// The name of the process manager's progress row and dead letters.
pub const PROCESS_MANAGER: &str = "transfer_process_manager";

/// Why a reaction did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReactionError {
    /// Worth retrying: the database, a lost race, a crash elsewhere.
    #[error("{0}")]
    Transient(String),
    /// Will never work (an undecodable event, a transition the transfer refuses): the
    /// event goes to the dead letters.
    #[error("{0}")]
    Poison(String),
}

impl<E: std::error::Error> From<LedgerError<E>> for ReactionError {
    fn from(err: LedgerError<E>) -> Self {
        match err {
            LedgerError::Rejected(rule) => Self::Poison(rule.to_string()),
            other => Self::Transient(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ReactionError {
    fn from(err: sqlx::Error) -> Self {
        Self::Transient(err.to_string())
    }
}

/// Takes the steps of transfers.
#[derive(Debug, Clone)]
pub struct ProcessManager {
    pool: PgPool,
    accounts: std::sync::Arc<Ledger<Account>>,
    transfers: std::sync::Arc<Ledger<Transfer>>,
    concurrency: usize,
    /// When reading the store directly: the progress row whose cursor to advance.
    store_cursor: bool,
    /// Fault injection: abort after this many money-moving steps (0: never).
    crash_after_steps: u64,
    steps: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Fault injection: awaited before each command that would take a step found free.
    step_gate: StepGate,
}

/// Fault injection for tests: a hook awaited with a step's id (`<transfer id>/debit`,
/// `/credit`) after the step was looked up and found free, just before each command that
/// would take it (for the debit: the debit itself, then, if the source refused, the
/// failure). A test holds one process manager there while another takes the step: the
/// race of two process managers (ADR 0008), made deterministic.
#[derive(Clone, Default)]
pub struct StepGate(
    Option<std::sync::Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync>>,
);

impl std::fmt::Debug for StepGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "StepGate(set)"
        } else {
            "StepGate(none)"
        })
    }
}

impl StepGate {
    async fn pass(&self, step: &str) {
        if let Some(gate) = &self.0 {
            gate(step.to_owned()).await;
        }
    }
}

impl ProcessManager {
    /// A process manager over `pool`, reacting to up to `concurrency` transfers at once;
    /// `store_cursor` when it reads the store's log (it then advances its cursor);
    /// `crash_after_steps` aborts the process after that many money-moving steps (fault
    /// injection for tests; 0 disables it).
    pub fn new(
        pool: PgPool,
        concurrency: usize,
        store_cursor: bool,
        crash_after_steps: u64,
    ) -> Self {
        let retry = RetryPolicy {
            max_retries: 32,
            ..RetryPolicy::default()
        };
        Self {
            accounts: std::sync::Arc::new(Ledger::new(pool.clone(), 100, retry)),
            transfers: std::sync::Arc::new(Ledger::new(pool.clone(), 100, retry)),
            pool,
            concurrency: concurrency.max(1),
            store_cursor,
            crash_after_steps,
            steps: std::sync::Arc::default(),
            step_gate: StepGate::default(),
        }
    }

    /// The same process manager, awaiting `gate(step)` before each command that takes a
    /// step it found free (fault injection for tests; see [`StepGate`]).
    #[must_use]
    pub fn with_step_gate(
        mut self,
        gate: impl Fn(String) -> futures::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Self {
        self.step_gate = StepGate(Some(std::sync::Arc::new(gate)));
        self
    }

    /// Reacts to every transfer event of `batch`: transfers concurrently, each transfer's
    /// events in order. `Err` means some reaction must be retried (the whole batch may be:
    /// reactions already taken are recognised and skipped). Poison events go to the dead
    /// letters. Reading the store, the cursor advances after the reactions.
    pub async fn handle_batch(&self, batch: &[Incoming]) -> Result<Applied, ReactionError> {
        // Reacts to the store's copies only (ADR 0016).
        let checked =
            crate::apply::checked_against_store(&mut *self.pool.acquire().await?, batch).await?;
        let batch: &[Incoming] = &checked;
        let mut by_transfer: BTreeMap<String, Vec<RecordedEvent>> = BTreeMap::new();
        for item in batch {
            if let Incoming::Event { event, .. } = item {
                if event.aggregate_type == TRANSFER_AGGREGATE_TYPE {
                    by_transfer
                        .entry(event.aggregate_id.clone())
                        .or_default()
                        .push(event.as_ref().clone());
                }
            }
        }
        let reactions: Vec<u64> = stream::iter(by_transfer.into_values())
            .map(|events| self.react_in_order(events))
            .buffer_unordered(self.concurrency)
            .try_collect()
            .await?;
        if self.store_cursor {
            self.advance_cursor(batch).await?;
        }
        Ok(Applied {
            applied: reactions.iter().sum(),
            ..Applied::default()
        })
    }

    /// Drives one transfer on from `events` (its latest, read from the store by the sweep
    /// of stuck transfers), as if they had just arrived; see [`Self::react_in_order`].
    pub async fn drive(&self, events: Vec<RecordedEvent>) -> Result<u64, ReactionError> {
        self.react_in_order(events).await
    }

    /// Reacts to one transfer's events, in order; poison ones go to the dead letters. A
    /// transient failure (a lost race past the retries, the database) is retried here, for
    /// this transfer alone, with backoff; after [`IN_PLACE_ATTEMPTS`] it fails the batch.
    async fn react_in_order(&self, events: Vec<RecordedEvent>) -> Result<u64, ReactionError> {
        let mut done = 0u64;
        for event in &events {
            let mut backoff = Duration::from_millis(20);
            let mut attempt = 1;
            loop {
                match self.react(event).await {
                    Ok(()) => {
                        done += 1;
                        break;
                    }
                    Err(ReactionError::Poison(reason)) => {
                        self.dead_letter(event, &reason).await?;
                        break;
                    }
                    Err(transient) if attempt >= IN_PLACE_ATTEMPTS => return Err(transient),
                    Err(transient) => {
                        tracing::warn!(
                            transfer_id = %event.aggregate_id,
                            attempt,
                            error = %transient,
                            "transfer step failed; retrying"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        attempt += 1;
                    }
                }
            }
        }
        Ok(done)
    }

    /// Takes whatever step `event` calls for, if it was not taken already.
    #[tracing::instrument(skip_all, fields(
        transfer_id = %event.aggregate_id,
        event_type = %event.event_type,
        request_id = event.metadata.request_id.as_deref().unwrap_or(""),
    ))]
    pub async fn react(&self, event: &RecordedEvent) -> Result<(), ReactionError> {
        let transfer_id = Uuid::parse_str(&event.aggregate_id)
            .map_err(|err| ReactionError::Poison(format!("transfer id: {err}")))?;
        let decoded = event
            .decode_transfer()
            .map_err(|err| ReactionError::Poison(err.to_string()))?;
        match decoded {
            TransferEvent::TransferRequested { .. } => self.debit(transfer_id, event).await,
            TransferEvent::TransferDebited {} => self.credit(transfer_id, event).await,
            TransferEvent::TransferCompleted {}
            | TransferEvent::TransferFailed { .. }
            | TransferEvent::TransferCompensated { .. } => Ok(()),
        }
    }

    /// The debit step: `TransferSent` on the source, or `TransferFailed` on the transfer.
    async fn debit(&self, transfer_id: Uuid, cause: &RecordedEvent) -> Result<(), ReactionError> {
        let terms = self.terms(transfer_id).await?;
        let step = TransferStep::Debit.id(transfer_id);
        let claim = match transfer_steps::find(&self.pool, &step).await? {
            Some(claim) => claim,
            None => {
                self.step_gate.pass(&step).await;
                let sent = self
                    .accounts
                    .execute(Intent {
                        event_id: None,
                        aggregate_id: terms.from,
                        command: AccountCommand::SendTransfer {
                            transfer_id,
                            to: terms.to,
                            amount: terms.amount,
                            currency: terms.currency,
                        },
                        metadata: step_metadata(cause, Some(&step)),
                    })
                    .await;
                match sent {
                    Ok(_) => {
                        self.step_taken();
                        self.claimed(&step).await?
                    }
                    Err(LedgerError::StepTaken(claim)) => *claim,
                    Err(LedgerError::Rejected(refusal)) => {
                        self.step_gate.pass(&step).await;
                        let failed = self
                            .transfers
                            .execute(Intent {
                                event_id: None,
                                aggregate_id: transfer_id,
                                command: TransferCommand::Fail {
                                    code: refusal.code().to_owned(),
                                    reason: refusal.to_string(),
                                },
                                metadata: step_metadata(cause, Some(&step)),
                            })
                            .await;
                        match failed {
                            Ok(_) => {
                                tracing::info!(code = refusal.code(), "transfer failed");
                                return Ok(());
                            }
                            Err(LedgerError::StepTaken(claim)) => *claim,
                            // The transfer is past `requested`: another reaction took the
                            // debit step after the lookup above and told the transfer (its
                            // debit took the money this one was refused for, its settled
                            // transfer let the source close, or the money came after the
                            // refusal). A lost race, not a poison event: carry on from the
                            // winner's event, as from `StepTaken`.
                            Err(LedgerError::Rejected(refused)) => {
                                match transfer_steps::find(&self.pool, &step).await? {
                                    Some(claim) => {
                                        tracing::info!(
                                            %refusal,
                                            %refused,
                                            taken_by = %claim.event_type,
                                            "debit step taken by another reaction meanwhile"
                                        );
                                        claim
                                    }
                                    None => return Err(ReactionError::Poison(refused.to_string())),
                                }
                            }
                            Err(other) => return Err(other.into()),
                        }
                    }
                    Err(other) => return Err(other.into()),
                }
            }
        };
        match claim.event_type.as_str() {
            AccountEvent::TRANSFER_SENT => {
                self.tell(transfer_id, TransferCommand::MarkDebited, cause)
                    .await
            }
            // The failure itself took the step: the transfer is failed already.
            TransferEvent::FAILED => Ok(()),
            other => Err(ReactionError::Poison(format!(
                "debit step taken by an unexpected {other}"
            ))),
        }
    }

    /// The credit step: `TransferReceived` on the destination, or `TransferRefunded` on the
    /// source.
    async fn credit(&self, transfer_id: Uuid, cause: &RecordedEvent) -> Result<(), ReactionError> {
        let terms = self.terms(transfer_id).await?;
        let step = TransferStep::Credit.id(transfer_id);
        let claim = match transfer_steps::find(&self.pool, &step).await? {
            Some(claim) => claim,
            None => {
                self.step_gate.pass(&step).await;
                let received = self
                    .accounts
                    .execute(Intent {
                        event_id: None,
                        aggregate_id: terms.to,
                        command: AccountCommand::ReceiveTransfer {
                            transfer_id,
                            from: terms.from,
                            amount: terms.amount,
                            currency: terms.currency,
                        },
                        metadata: step_metadata(cause, Some(&step)),
                    })
                    .await;
                match received {
                    Ok(_) => {
                        self.step_taken();
                        self.claimed(&step).await?
                    }
                    Err(LedgerError::StepTaken(claim)) => *claim,
                    Err(LedgerError::Rejected(refusal)) => {
                        let refunded = self
                            .accounts
                            .execute(Intent {
                                event_id: None,
                                aggregate_id: terms.from,
                                command: AccountCommand::RefundTransfer {
                                    transfer_id,
                                    amount: terms.amount,
                                    currency: terms.currency,
                                    code: refusal.code().to_owned(),
                                    reason: refusal.to_string(),
                                },
                                metadata: step_metadata(cause, Some(&step)),
                            })
                            .await;
                        match refunded {
                            Ok(_) => {
                                self.step_taken();
                                self.claimed(&step).await?
                            }
                            Err(LedgerError::StepTaken(claim)) => *claim,
                            Err(other) => return Err(other.into()),
                        }
                    }
                    Err(other) => return Err(other.into()),
                }
            }
        };
        match claim.event_type.as_str() {
            AccountEvent::TRANSFER_RECEIVED => {
                tracing::info!("transfer credited");
                // Settled first: once the transfer says completed, nothing of it is left
                // in flight on the source.
                self.settle(transfer_id, terms.from, cause).await?;
                self.tell(transfer_id, TransferCommand::Complete, cause)
                    .await
            }
            AccountEvent::TRANSFER_REFUNDED => {
                let text = |name: &str| {
                    claim
                        .payload
                        .get(name)
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                tracing::info!(code = %text("code"), "transfer compensated");
                self.tell(
                    transfer_id,
                    TransferCommand::Compensate {
                        code: text("code"),
                        reason: text("reason"),
                    },
                    cause,
                )
                .await
            }
            other => Err(ReactionError::Poison(format!(
                "credit step taken by an unexpected {other}"
            ))),
        }
    }

    /// The settle step: `TransferSettled` on the source `from`.
    async fn settle(
        &self,
        transfer_id: Uuid,
        from: Uuid,
        cause: &RecordedEvent,
    ) -> Result<(), ReactionError> {
        let step = TransferStep::Settle.id(transfer_id);
        if transfer_steps::find(&self.pool, &step).await?.is_some() {
            return Ok(());
        }
        let settled = self
            .accounts
            .execute(Intent {
                event_id: None,
                aggregate_id: from,
                command: AccountCommand::SettleTransfer { transfer_id },
                metadata: step_metadata(cause, Some(&step)),
            })
            .await;
        match settled {
            Ok(_) | Err(LedgerError::StepTaken(_)) => Ok(()),
            Err(other) => Err(other.into()),
        }
    }

    /// Tells the transfer what happened (idempotent: a repeat records nothing).
    async fn tell(
        &self,
        transfer_id: Uuid,
        command: TransferCommand,
        cause: &RecordedEvent,
    ) -> Result<(), ReactionError> {
        self.transfers
            .execute(Intent {
                event_id: None,
                aggregate_id: transfer_id,
                command,
                metadata: step_metadata(cause, None),
            })
            .await
            .map(|_| ())
            .map_err(|err| match err {
                LedgerError::Rejected(
                    refusal @ (TransferError::InvalidTransition { .. } | TransferError::NotFound),
                ) => ReactionError::Poison(refusal.to_string()),
                other => other.into(),
            })
    }

    /// The transfer's terms, from its own events.
    async fn terms(&self, transfer_id: Uuid) -> Result<Terms, ReactionError> {
        let (transfer, _) = self.transfers.load(transfer_id).await?;
        match (
            transfer.from,
            transfer.to,
            transfer.amount,
            transfer.currency,
        ) {
            (Some(from), Some(to), Some(amount), Some(currency)) => Ok(Terms {
                from,
                to,
                amount,
                currency,
            }),
            _ => Err(ReactionError::Poison(format!(
                "transfer {transfer_id} was never requested"
            ))),
        }
    }

    /// Counts a committed money-moving step (and aborts here when the fault is injected).
    fn step_taken(&self) {
        let taken = self.steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if self.crash_after_steps != 0 && taken == self.crash_after_steps {
            tracing::error!(
                taken,
                "fault injection: aborting between a step and the transfer"
            );
            std::process::abort();
        }
    }

    async fn claimed(&self, step: &str) -> Result<StepClaim, ReactionError> {
        transfer_steps::find(&self.pool, step)
            .await?
            .ok_or_else(|| ReactionError::Transient(format!("step {step} committed but not found")))
    }

    async fn dead_letter(&self, event: &RecordedEvent, reason: &str) -> Result<(), ReactionError> {
        tracing::error!(%reason, event_id = %event.event_id, "transfer event to the dead letters");
        let mut tx = self.pool.begin().await?;
        dead_letters::record(
            &mut tx,
            &NewDeadLetter {
                projection: PROCESS_MANAGER.into(),
                reason: reason.to_owned(),
                event_id: Some(event.event_id),
                aggregate_id: Some(event.aggregate_id.clone()),
                sequence: Some(event.sequence),
                global_position: Some(event.global_position),
                event_type: Some(event.event_type.clone()),
                event_version: Some(event.event_version.clone()),
                raw_value: Some(event.payload.to_string()),
                source: "process_manager".into(),
                ..NewDeadLetter::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn advance_cursor(&self, batch: &[Incoming]) -> Result<(), ReactionError> {
        let last = batch.iter().rev().find_map(|item| match item {
            Incoming::Event {
                event,
                origin: Origin::Store { cursor },
            } => Some((event, *cursor)),
            _ => None,
        });
        if let Some((event, cursor)) = last {
            let mut tx = self.pool.begin().await?;
            progress::advance(
                &mut tx,
                PROCESS_MANAGER,
                event.global_position,
                event.recorded_at,
                i64::try_from(batch.len()).unwrap_or(i64::MAX),
                Some((cursor.transaction_id, cursor.global_position)),
            )
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

/// What a transfer moves, where.
struct Terms {
    from: Uuid,
    to: Uuid,
    amount: ledger_events::Amount,
    currency: ledger_events::Currency,
}

/// Metadata of a step's command: the transfer request's ids and trace carry on, caused by
/// the event reacted to.
fn step_metadata(cause: &RecordedEvent, step: Option<&str>) -> Metadata {
    let mut metadata = Metadata {
        request_id: cause.metadata.request_id.clone(),
        correlation_id: cause
            .metadata
            .correlation_id
            .clone()
            .or_else(|| Some(cause.aggregate_id.clone())),
        causation_id: Some(cause.event_id.to_string()),
        transfer_step: step.map(str::to_owned),
        ..Metadata::default()
    };
    if let Some(traceparent) = cause.metadata.traceparent() {
        metadata
            .extra
            .insert(TRACEPARENT.to_owned(), traceparent.to_owned());
    }
    metadata
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_commands_carry_the_request_and_are_caused_by_the_event() {
        let event = RecordedEvent {
            event_id: Uuid::from_u128(5),
            aggregate_type: TRANSFER_AGGREGATE_TYPE.into(),
            aggregate_id: Uuid::from_u128(9).to_string(),
            sequence: 1,
            global_position: 3,
            recorded_at: chrono::Utc::now(),
            event_type: TransferEvent::REQUESTED.into(),
            event_version: "1".into(),
            payload: serde_json::Value::Null,
            metadata: Metadata {
                request_id: Some("req-1".into()),
                extra: [(
                    TRACEPARENT.to_owned(),
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
                )]
                .into(),
                ..Metadata::default()
            },
        };
        let metadata = step_metadata(&event, Some("x/debit"));
        assert_eq!(metadata.request_id.as_deref(), Some("req-1"));
        assert_eq!(metadata.causation_id, Some(Uuid::from_u128(5).to_string()));
        assert_eq!(metadata.correlation_id, Some(event.aggregate_id.clone()));
        assert_eq!(metadata.transfer_step.as_deref(), Some("x/debit"));
        assert!(metadata.traceparent().is_some());
    }

    #[test]
    fn refusals_are_poison_and_the_rest_transient() {
        let refused: ReactionError =
            LedgerError::<TransferError>::Rejected(TransferError::NotFound).into();
        assert!(matches!(refused, ReactionError::Poison(_)));
        let lost: ReactionError = LedgerError::<TransferError>::Conflict { attempts: 3 }.into();
        assert!(matches!(lost, ReactionError::Transient(_)));
    }
}
