//! Group commit with hot aggregates kept in memory (ADR 0010).
//!
//! Commands are routed by aggregate id to one of a few writer tasks. Each writer owns a
//! bounded cache of aggregate states (state, version, global position of the last event)
//! and runs in a loop: take every command queued since its last round (up to a batch
//! limit), decide each one in arrival order on the cached state (commands on the same
//! aggregate build on each other), and append all their events with **one** statement,
//! which PostgreSQL runs as one transaction. Only after that statement commits are the
//! commands answered and the cache updated. Nothing waits for a batch to fill: a writer that
//! is idle commits a single command at once; under load, commands queue while the previous
//! statement runs, and the next statement carries them all.
//!
//! A writer may have `pipeline_depth` batches committing at once (default 2): while one
//! statement runs, the next batch is decided and sent on another connection. A command
//! whose aggregate, idempotency key or transfer step is in a batch still committing waits
//! for that batch, so it is decided on what that batch left, and in-flight batches never
//! share an aggregate.
//!
//! The cache is never trusted for what it cannot prove:
//! - appends name the sequence numbers they build on, so a stale entry (another process
//!   wrote the aggregate) hits the events' primary key and the whole statement fails; the
//!   writer then forgets every aggregate of the batch, reloads them all (one query) and
//!   decides the batch again; should that fail too (a race on fresh state), each command
//!   is committed alone. A stale entry costs its neighbours a round trip, never a wrong
//!   answer;
//! - a refusal or a no-op decided on a cached entry is confirmed against the store's current
//!   version first (one query for the batch), so a stale cache never refuses a command the
//!   real state would accept.
//!
//! When the connection is lost while a batch statement runs, its outcome is found out from
//! the store (the batch's rows by `command_id`) before anyone is answered: committed
//! batches get their real answers, "nothing was written" is said only when the store shows
//! it, and when the store cannot be read the commands are told their outcome is unknown
//! ([`LedgerError::OutcomeUnknown`]) and their aggregates are forgotten, so the next
//! command on them is decided on what the store holds (ADR 0012).
//!
//! The queue in front of each writer is bounded: a command that finds it full is refused at
//! once ([`LedgerError::Overloaded`]), before anything is queued. A command whose caller has
//! gone (request timeout, dropped connection) before the writer took it into a batch is
//! dropped, never committed; once taken, it is committed and its outcome recorded as usual.
//!
//! Idempotency keys and transfer steps are still claimed by the triggers on `events`, in
//! the same statement. Two commands of one batch never carry the same key or step: the
//! second waits for the next batch, where the trigger treats it like any duplicate. When a
//! batch fails on a conflict, the writer first reads which of its keys and steps other
//! transactions have claimed, answers those commands alone (`KeyTaken`, `StepTaken`) and
//! commits the rest together. An aggregate whose snapshot or events cannot be read fails
//! its own commands only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ledger_store::aggregates::{self, Batch, Positions};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::domain::Decider;
use crate::idempotency::{self, ClientKey};
use crate::ledger::{Intent, LedgerError, Outcome};
use crate::transfer_steps;

mod decide;

pub(crate) use decide::{restore, Entry};
use decide::{Decided, Decision, Known, Reply};

/// How the writers of one aggregate type are sized.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Writer tasks (each commits one statement at a time); aggregates are spread over them.
    pub writers: usize,
    /// Most commands committed by one statement.
    pub batch_max: usize,
    /// Batches one writer may have committing at once (1: one at a time).
    pub pipeline_depth: usize,
    /// Most aggregates kept in memory, over all writers.
    pub cache_capacity: u64,
    /// A snapshot is written when an aggregate's version crosses a multiple of this.
    pub snapshot_every: i64,
    /// Most commands waiting for one writer (besides the batch it is committing); more are
    /// refused with [`LedgerError::Overloaded`].
    pub queue_max: usize,
    /// Fault injection for tests: this many batch statements commit and are then reported
    /// as a lost connection. 0 in production.
    pub fault_lost_commits: u32,
    /// Fault injection for tests: this many checks of a lost commit fail as if the store
    /// could not be read. 0 in production.
    pub fault_failed_checks: u32,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            writers: 1,
            batch_max: 256,
            pipeline_depth: 2,
            cache_capacity: 100_000,
            snapshot_every: 100,
            queue_max: 512,
            fault_lost_commits: 0,
            fault_failed_checks: 0,
        }
    }
}

/// One command waiting for its writer.
struct Job<A: Decider> {
    intent: Intent<A>,
    reply: oneshot::Sender<Reply<A>>,
}

impl<A: Decider> Job<A> {
    /// What must not appear twice in one batch: the idempotency key and the transfer step.
    fn claims(&self) -> impl Iterator<Item = String> + '_ {
        // The key in its client's scope, as the trigger claims it (keys are visible ASCII,
        // so a newline cannot occur in one).
        let key = ClientKey::of(&self.intent.metadata).map(|k| format!("k:{}\n{}", k.scope, k.key));
        let step = self
            .intent
            .metadata
            .transfer_step
            .as_ref()
            .map(|s| format!("s:{s}"));
        key.into_iter().chain(step)
    }

    /// What a batch still committing holds against later batches: its aggregate and its
    /// claims.
    fn holds(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(format!("a:{}", self.intent.aggregate_id)).chain(self.claims())
    }
}

/// The writers of aggregate type `A`.
pub(crate) struct Writers<A: Decider> {
    queues: Vec<mpsc::Sender<Job<A>>>,
}

impl<A: Decider> std::fmt::Debug for Writers<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writers")
            .field("writers", &self.queues.len())
            .finish()
    }
}

impl<A> Writers<A>
where
    A: Decider,
    A::Error: std::error::Error,
{
    /// Starts the writer tasks on the current tokio runtime. They stop when the last
    /// `Writers` handle is dropped, after answering what they already took.
    pub(crate) fn start(pool: PgPool, config: WriterConfig) -> Self {
        let writers = config.writers.max(1);
        let capacity = (config.cache_capacity / writers as u64).max(1);
        let queue_max = config.queue_max.max(1);
        let faults = Arc::new(Faults {
            lost_commits: AtomicU32::new(config.fault_lost_commits),
            failed_checks: AtomicU32::new(config.fault_failed_checks),
        });
        let queues = (0..writers)
            .map(|_| {
                let (tx, rx) = mpsc::channel(queue_max);
                let writer = Writer::<A> {
                    pool: pool.clone(),
                    cache: moka::sync::Cache::new(capacity),
                    batch_max: config.batch_max.max(1),
                    pipeline_depth: config.pipeline_depth.max(1),
                    snapshot_every: config.snapshot_every.max(1),
                    faults: faults.clone(),
                };
                tokio::spawn(writer.run(rx));
                tx
            })
            .collect();
        Self { queues }
    }

    /// Hands one command to its aggregate's writer and waits for the answer. A
    /// [`LedgerError::Conflict`] means the command lost a race with another process even
    /// on fresh state and may be retried; [`LedgerError::Overloaded`] that the writer's
    /// queue was full and the command was not queued. Dropping the returned future before
    /// the writer takes the command into a batch withdraws it.
    pub(crate) async fn submit(&self, intent: Intent<A>) -> Reply<A> {
        let shard = usize::try_from(intent.aggregate_id.as_u128() % self.queues.len() as u128)
            .unwrap_or_default();
        let (reply, answer) = oneshot::channel();
        let job = Job { intent, reply };
        match self.queues[shard].try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("ledger_command_overloaded_total", "aggregate_type" => A::TYPE)
                    .increment(1);
                return Err(LedgerError::Overloaded {
                    queue_max: self.queues[shard].max_capacity(),
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(LedgerError::Internal("the writer has stopped".into()));
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(LedgerError::Internal("the writer has stopped".into())))
    }
}

/// Why a batch did not commit.
enum Failure {
    /// A unique constraint: a stale cache entry, or a key or step claimed elsewhere.
    Conflict,
    /// The database could not be reached or answered an error.
    Database(sqlx::Error),
    /// A stored payload or state could not be read, or an event could not be written.
    Corrupt(String),
}

impl From<sqlx::Error> for Failure {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            // A unique constraint (the events' key, a claimed idempotency key or transfer
            // step), or a transaction PostgreSQL chose to abort: retryable on fresh state.
            sqlx::Error::Database(db)
                if db.is_unique_violation()
                    || matches!(db.code().as_deref(), Some("40001" | "40P01")) =>
            {
                Self::Conflict
            }
            _ => Self::Database(err),
        }
    }
}

impl Failure {
    fn answer<E: std::error::Error>(&self) -> LedgerError<E> {
        match self {
            Self::Conflict => LedgerError::Conflict { attempts: 1 },
            Self::Database(err)
                if ledger_platform::db::is_unavailable(err)
                    || err
                        .as_database_error()
                        .is_some_and(|db| session_ended(db.code().as_deref())) =>
            {
                LedgerError::Unavailable(err.to_string())
            }
            Self::Database(err) => LedgerError::Internal(err.to_string()),
            Self::Corrupt(reason) => LedgerError::Internal(reason.clone()),
        }
    }
}

struct Writer<A: Decider> {
    pool: PgPool,
    cache: moka::sync::Cache<Uuid, Entry<A>>,
    batch_max: usize,
    pipeline_depth: usize,
    snapshot_every: i64,
    faults: Arc<Faults>,
}

impl<A> Writer<A>
where
    A: Decider,
    A::Error: std::error::Error,
{
    /// Takes batches from the queue and commits them, up to `pipeline_depth` at once. A
    /// command whose aggregate, idempotency key or transfer step is in a batch still
    /// committing waits for that batch to end, so it is decided on the state that batch
    /// left (each command sees every earlier command of its aggregate).
    async fn run(self, mut queue: mpsc::Receiver<Job<A>>) {
        let writer = Arc::new(self);
        let mut held: VecDeque<Job<A>> = VecDeque::new();
        // What the batches still committing hold: aggregates and claims.
        let mut busy: HashSet<String> = HashSet::new();
        let mut committing: JoinSet<Vec<String>> = JoinSet::new();
        let mut closed = false;
        loop {
            let room = committing.len() < writer.pipeline_depth;
            if room {
                let mut taken: Vec<Job<A>> = held.drain(..).collect();
                while taken.len() < writer.batch_max {
                    match queue.try_recv() {
                        Ok(job) => taken.push(job),
                        Err(_) => break,
                    }
                }
                let (batch, abandoned) = writer.select(taken, &busy, &mut held);
                if abandoned > 0 {
                    tracing::debug!(abandoned, "commands whose callers have gone were dropped");
                    metrics::counter!("ledger_command_abandoned_total", "aggregate_type" => A::TYPE)
                        .increment(abandoned);
                }
                if !batch.is_empty() {
                    let holds: Vec<String> = batch.iter().flat_map(Job::holds).collect();
                    busy.extend(holds.iter().cloned());
                    let writer = writer.clone();
                    committing.spawn(async move {
                        writer.commit(batch).await;
                        holds
                    });
                    continue;
                }
            }
            if closed && committing.is_empty() && held.is_empty() {
                return;
            }
            tokio::select! {
                done = committing.join_next(), if !committing.is_empty() => match done {
                    Some(Ok(holds)) => {
                        for hold in holds {
                            busy.remove(&hold);
                        }
                    }
                    Some(Err(err)) => {
                        // A batch task panicked: its callers were answered "the writer has
                        // stopped" when their reply channels dropped. What it held cannot be
                        // told from here, so wait for the other batches and start clean.
                        tracing::error!(error = %err, "a batch commit failed unexpectedly");
                        while committing.join_next().await.is_some() {}
                        busy.clear();
                    }
                    None => {}
                },
                // Only while fewer than a batch are held back, so that commands waiting on
                // a committing aggregate stay in the bounded queue (and a full queue still
                // refuses at once) instead of piling up here.
                job = queue.recv(), if room && !closed && held.len() < writer.batch_max => match job {
                    Some(job) => held.push_back(job),
                    None => closed = true,
                },
            }
        }
    }

    /// Splits `taken` into the next batch and the jobs that must wait (`held`, in arrival
    /// order): a job waits when its aggregate or a claim is in a batch still committing, or
    /// when an earlier job of this batch carries the same key or step. Jobs whose callers
    /// have gone are dropped and counted.
    fn select(
        &self,
        taken: Vec<Job<A>>,
        busy: &HashSet<String>,
        held: &mut VecDeque<Job<A>>,
    ) -> (Vec<Job<A>>, u64) {
        let mut claimed = HashSet::new();
        let mut batch = Vec::with_capacity(taken.len());
        let mut abandoned = 0u64;
        for job in taken {
            if job.reply.is_closed() {
                // Its caller has gone (timed out, disconnected) before the command
                // started: nobody will learn of it, so it is not carried out.
                abandoned += 1;
            } else if job.holds().all(|hold| !busy.contains(&hold))
                && job.claims().all(|claim| !claimed.contains(&claim))
            {
                claimed.extend(job.claims());
                batch.push(job);
            } else {
                held.push_back(job);
            }
        }
        (batch, abandoned)
    }

    /// Commits `jobs` together. When the batch fails on a conflict, every aggregate in it
    /// has been forgotten: it is decided again on fresh state (one load for all) and
    /// committed once more; if that fails too, each command is committed alone, so that
    /// only the command that really lost is told so.
    async fn commit(&self, mut jobs: Vec<Job<A>>) {
        metrics::histogram!("ledger_command_batch_size", "aggregate_type" => A::TYPE)
            .record(jobs.len() as f64);
        let mut result = self.try_commit(&jobs).await;
        if matches!(result, Err(Failure::Conflict)) && jobs.len() > 1 {
            metrics::counter!("ledger_command_batch_conflicts_total", "aggregate_type" => A::TYPE)
                .increment(1);
            // A key or step another transaction claimed fails its own command only; the
            // rest of the batch is committed together.
            jobs = self.answer_claimed_elsewhere(jobs).await;
            if jobs.is_empty() {
                return;
            }
            result = self.try_commit(&jobs).await;
        }
        match result {
            Ok(replies) => answer(jobs, replies),
            Err(Failure::Conflict) if jobs.len() > 1 => {
                tracing::debug!(
                    commands = jobs.len(),
                    "batch conflicted on fresh state; committing its commands one by one"
                );
                for job in jobs {
                    let jobs = vec![job];
                    match self.try_commit(&jobs).await {
                        Ok(replies) => answer(jobs, replies),
                        Err(failure) => fail(jobs, &failure),
                    }
                }
            }
            Err(failure) => fail(jobs, &failure),
        }
    }

    /// Answers the jobs whose idempotency key or transfer step another transaction has
    /// claimed (`KeyTaken`, `StepTaken`) and returns the others. When the claims cannot be
    /// read, every job is returned: the one-by-one fallback still sorts them out.
    async fn answer_claimed_elsewhere(&self, jobs: Vec<Job<A>>) -> Vec<Job<A>> {
        let keys: Vec<ClientKey> = jobs
            .iter()
            .filter_map(|job| ClientKey::of(&job.intent.metadata))
            .collect();
        let steps: Vec<String> = jobs
            .iter()
            .filter_map(|job| job.intent.metadata.transfer_step.clone())
            .collect();
        if keys.is_empty() && steps.is_empty() {
            return jobs;
        }
        let claimed = async {
            let keys = idempotency::claimed_among(&self.pool, &keys).await?;
            let steps = transfer_steps::find_many(&self.pool, &steps).await?;
            Ok::<_, sqlx::Error>((keys, steps))
        };
        let (keys, mut steps) = match claimed.await {
            Ok(claimed) => claimed,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the claims of a conflicting batch");
                return jobs;
            }
        };
        let mut kept = Vec::with_capacity(jobs.len());
        for job in jobs {
            let step = job
                .intent
                .metadata
                .transfer_step
                .as_ref()
                .and_then(|step| steps.remove(step));
            if let Some(claim) = step {
                let _ = job.reply.send(Err(LedgerError::StepTaken(Box::new(claim))));
            } else if ClientKey::of(&job.intent.metadata).is_some_and(|key| keys.contains(&key)) {
                let _ = job.reply.send(Err(LedgerError::KeyTaken));
            } else {
                kept.push(job);
            }
        }
        kept
    }

    /// Decides every job in order and appends their events in one statement. On any
    /// failure nothing is written and every aggregate of the batch is forgotten.
    async fn try_commit(&self, jobs: &[Job<A>]) -> Result<Vec<Reply<A>>, Failure> {
        let result = self.decide_and_append(jobs).await;
        if result.is_err() {
            for job in jobs {
                self.cache.invalidate(&job.intent.aggregate_id);
            }
        }
        result
    }

    async fn decide_and_append(&self, jobs: &[Job<A>]) -> Result<Vec<Reply<A>>, Failure> {
        let mut known = Known::default();
        for job in jobs {
            let id = job.intent.aggregate_id;
            if let std::collections::hash_map::Entry::Vacant(slot) = known.entries.entry(id) {
                if let Some(entry) = self.cache.get(&id) {
                    slot.insert(entry);
                }
            }
        }
        metrics::counter!("ledger_command_cache_hits_total", "aggregate_type" => A::TYPE)
            .increment(known.entries.len() as u64);
        loop {
            let missing: Vec<Uuid> = jobs
                .iter()
                .map(|job| job.intent.aggregate_id)
                .filter(|id| !known.entries.contains_key(id) && !known.broken.contains_key(id))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            if !missing.is_empty() {
                metrics::counter!("ledger_command_cache_misses_total", "aggregate_type" => A::TYPE)
                    .increment(missing.len() as u64);
                self.load(&missing, &mut known).await?;
            }

            let Decided {
                decisions,
                batch,
                unconfirmed,
            } = decide::decide(
                jobs.iter().map(|job| &job.intent),
                &known,
                self.snapshot_every,
            )
            .map_err(Failure::Corrupt)?;
            if !unconfirmed.is_empty() {
                let stale = self.stale(&unconfirmed, &known.entries).await?;
                known.fresh.extend(unconfirmed);
                if !stale.is_empty() {
                    for id in &stale {
                        known.entries.remove(id);
                        self.cache.invalidate(id);
                    }
                    continue;
                }
            }
            if batch.is_empty() {
                return Ok(decisions.into_iter().map(Decision::into_reply).collect());
            }
            let positions = match self.append(&batch).await {
                Ok(positions) => positions,
                Err(Failure::Database(err)) if commit_unknown(&err) => {
                    match self.find_out(&batch, err).await? {
                        Some(positions) => positions,
                        None => return Ok(self.outcome_unknown(jobs, decisions, &batch)),
                    }
                }
                Err(failure) => return Err(failure),
            };
            return decisions
                .into_iter()
                .map(|decision| match decision {
                    Decision::Done(reply) => Ok(reply),
                    Decision::Append {
                        aggregate_id,
                        state,
                        version,
                        appended,
                    } => {
                        let position = *positions
                            .get(&(aggregate_id.to_string(), version))
                            .ok_or_else(|| {
                                Failure::Corrupt("an appended event was not returned".into())
                            })?;
                        self.cache.insert(
                            aggregate_id,
                            Entry {
                                state: state.clone(),
                                version,
                                position,
                            },
                        );
                        Ok(Ok(Outcome {
                            aggregate_id,
                            state,
                            version,
                            position,
                            appended,
                        }))
                    }
                })
                .collect();
        }
    }

    /// Loads `ids` from the store (one query) into `known`: each becomes fresh, or broken
    /// with the reason when its snapshot or an event cannot be read.
    async fn load(&self, ids: &[Uuid], known: &mut Known<A>) -> Result<(), Failure> {
        let strings: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let stored = aggregates::load(&self.pool, A::TYPE, &strings).await?;
        let mut restored: HashMap<String, Result<Entry<A>, String>> = stored
            .iter()
            .map(|aggregate| (aggregate.aggregate_id.clone(), restore(aggregate)))
            .collect();
        for (id, string) in ids.iter().zip(&strings) {
            match restored
                .remove(string)
                .unwrap_or_else(|| Ok(Entry::default()))
            {
                Ok(entry) => {
                    known.entries.insert(*id, entry);
                    known.fresh.insert(*id);
                }
                Err(reason) => {
                    tracing::error!(aggregate_type = A::TYPE, aggregate_id = %id, %reason, "an aggregate cannot be read; its commands fail");
                    known.broken.insert(*id, reason);
                }
            }
        }
        Ok(())
    }

    /// The aggregates of `ids` whose stored version differs from the known one.
    async fn stale(
        &self,
        ids: &HashSet<Uuid>,
        entries: &HashMap<Uuid, Entry<A>>,
    ) -> Result<Vec<Uuid>, Failure> {
        let strings: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let current = aggregates::versions(&self.pool, A::TYPE, &strings).await?;
        Ok(ids
            .iter()
            .filter(|id| {
                let stored = current.get(&id.to_string()).copied().unwrap_or(0);
                entries.get(id).map_or(0, |entry| entry.version) != stored
            })
            .copied()
            .collect())
    }

    /// After the batch statement failed in a way that may have come after its commit (the
    /// connection was lost): reads whether the batch's rows are in the store. One statement
    /// is one transaction, so they all are (`Some`: the positions, answered as a success) or
    /// none is (the original error: nothing was written). `None` when the store cannot be
    /// read either: the outcome is unknown.
    async fn find_out(
        &self,
        batch: &Batch,
        lost: sqlx::Error,
    ) -> Result<Option<Positions>, Failure> {
        tracing::warn!(error = %lost, events = batch.len(), "connection lost during a batch commit; reading the store to find out whether it committed");
        let check = if self.faults.take_failed_check() {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "fault injection: the store cannot be read after a lost commit",
            )))
        } else {
            aggregates::find_appended(&self.pool, A::TYPE, batch).await
        };
        match check {
            Ok(found) if found.len() == batch.len() => {
                tracing::warn!(
                    events = found.len(),
                    "the batch had committed; answering its real outcome"
                );
                metrics::counter!("ledger_command_lost_commits_total", "aggregate_type" => A::TYPE, "outcome" => "committed")
                    .increment(1);
                Ok(Some(found))
            }
            Ok(found) if found.is_empty() => {
                metrics::counter!("ledger_command_lost_commits_total", "aggregate_type" => A::TYPE, "outcome" => "not_committed")
                    .increment(1);
                Err(Failure::Database(lost))
            }
            Ok(found) => Err(Failure::Corrupt(format!(
                "{} of {} events of one batch statement are in the store",
                found.len(),
                batch.len()
            ))),
            Err(check) => {
                tracing::error!(error = %lost, check_error = %check, "the outcome of a batch commit is unknown");
                metrics::counter!("ledger_command_lost_commits_total", "aggregate_type" => A::TYPE, "outcome" => "unknown")
                    .increment(1);
                Ok(None)
            }
        }
    }

    /// The answers of a batch whose commit could not be confirmed nor ruled out: every
    /// command on an aggregate the batch wrote to is told its outcome is unknown (a refusal
    /// there was decided on state that may not exist); the others keep their answers. The
    /// aggregates written to are forgotten, so the next command on them is decided on what
    /// the store holds.
    fn outcome_unknown(
        &self,
        jobs: &[Job<A>],
        decisions: Vec<Decision<A>>,
        batch: &Batch,
    ) -> Vec<Reply<A>> {
        let touched: HashSet<&str> = batch.aggregate_ids().iter().map(String::as_str).collect();
        for job in jobs {
            self.cache.invalidate(&job.intent.aggregate_id);
        }
        jobs.iter()
            .zip(decisions)
            .map(|(job, decision)| match decision {
                Decision::Done(reply)
                    if !touched.contains(job.intent.aggregate_id.to_string().as_str()) =>
                {
                    reply
                }
                _ => Err(LedgerError::OutcomeUnknown),
            })
            .collect()
    }

    /// Appends the batch (one statement, one transaction): the global position of every
    /// appended event by (aggregate, sequence).
    async fn append(&self, batch: &Batch) -> Result<Positions, Failure> {
        let positions = aggregates::append(&self.pool, A::TYPE, batch).await?;
        if self.faults.take_lost_commit() {
            return Err(Failure::Database(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "fault injection: connection lost after the batch committed",
            ))));
        }
        metrics::counter!("ledger_events_appended_total", "aggregate_type" => A::TYPE)
            .increment(positions.len() as u64);
        Ok(positions)
    }
}

/// Whether a failed batch statement may nonetheless have committed: the connection failed
/// while it ran, so PostgreSQL's answer (which would say) was lost, or the server ended the
/// session (`08…`, `57P01`–`57P03`), which it may do just after a commit. Any other error
/// PostgreSQL sent means the statement's transaction was rolled back; a pool error means the
/// statement was never sent.
fn commit_unknown(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => session_ended(db.code().as_deref()),
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => false,
        _ => true,
    }
}

/// Whether an SQLSTATE says the server ended the session (connection exception, shutdown,
/// or the backend was terminated).
fn session_ended(code: Option<&str>) -> bool {
    code.is_some_and(|code| code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03"))
}

/// Faults injected by tests through hidden settings: each counter is how many more times
/// the fault happens. All zero in production.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Batch statements that commit and are then reported as a lost connection.
    lost_commits: AtomicU32,
    /// Checks of a lost commit that fail as if the store could not be read.
    failed_checks: AtomicU32,
}

impl Faults {
    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn take_lost_commit(&self) -> bool {
        Self::take(&self.lost_commits)
    }

    fn take_failed_check(&self) -> bool {
        Self::take(&self.failed_checks)
    }
}

fn answer<A: Decider>(jobs: Vec<Job<A>>, replies: Vec<Reply<A>>) {
    for (job, reply) in jobs.into_iter().zip(replies) {
        // The requester may have gone (timeout); the outcome stands either way.
        let _ = job.reply.send(reply);
    }
}

fn fail<A>(jobs: Vec<Job<A>>, failure: &Failure)
where
    A: Decider,
    A::Error: std::error::Error,
{
    for job in jobs {
        let _ = job.reply.send(Err(failure.answer()));
    }
}
