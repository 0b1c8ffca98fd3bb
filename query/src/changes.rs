//! Change notifications from the projector (`LISTEN ledger_read_models`, payload: account
//! id, or [`ALL`] when a rebuild swapped a model in): they invalidate cached summaries and
//! wake reads waiting for a position.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ledger_readmodels::summaries::AccountSummary;
use ledger_readmodels::CHANGES_CHANNEL;
use moka::future::Cache;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{broadcast, RwLock};

/// The payload that means "every row may have changed" (a rebuild swapped a model in): the
/// whole cache is dropped and every waiting read re-checks.
pub const ALL: &str = "*";

/// The cache of account summaries and the stream of changed account ids.
#[derive(Clone)]
pub struct Changes {
    /// Account summaries by id.
    pub cache: Cache<String, Arc<AccountSummary>>,
    sender: broadcast::Sender<Arc<str>>,
    /// Bumped on every notification (and on reconnects): a fetch that started before a bump
    /// does not fill the cache, so an invalidation can never be undone by a slow reader.
    generation: Arc<AtomicU64>,
    /// Makes a fill's check of the generation and its insert one step with respect to
    /// invalidations: fills share it, an invalidation takes it alone (bump, then drop), so
    /// an invalidation never falls between a fill's check and its insert.
    gate: Arc<RwLock<()>>,
    /// Cache hits and misses, for the metrics to come.
    pub hits: Arc<AtomicU64>,
    pub misses: Arc<AtomicU64>,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes").finish_non_exhaustive()
    }
}

impl Changes {
    /// A cache of at most `max_entries`, each kept at most `ttl`.
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let (sender, _) = broadcast::channel(4096);
        Self {
            cache: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
            sender,
            generation: Arc::new(AtomicU64::new(0)),
            gate: Arc::new(RwLock::new(())),
            hits: Arc::new(AtomicU64::new(0)),
            misses: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The current generation (read before fetching from the database).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Caches `summary` unless a change arrived since `generation` was read.
    pub async fn fill(&self, generation: u64, summary: Arc<AccountSummary>) {
        let _fill = self.gate.read().await;
        if self.generation() == generation {
            self.cache.insert(summary.account_id.clone(), summary).await;
        }
    }

    /// Receives the ids of changed accounts from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.sender.subscribe()
    }

    /// A notification: `account_id` changed, or with [`ALL`] every row may have.
    pub async fn changed(&self, account_id: &str) {
        if account_id == ALL {
            self.reset().await;
        } else {
            let _invalidation = self.gate.write().await;
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.cache.invalidate(account_id).await;
        }
        let _ = self.sender.send(Arc::from(account_id));
    }

    async fn reset(&self) {
        let _invalidation = self.gate.write().await;
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    /// Listens until the process ends. Whenever the listener (re)connects, the whole cache
    /// is dropped: notifications sent while it was away are lost.
    pub async fn listen(self, pool: PgPool) {
        loop {
            match PgListener::connect_with(&pool).await {
                Ok(mut listener) => match listener.listen(CHANGES_CHANNEL).await {
                    Ok(()) => {
                        self.reset().await;
                        loop {
                            match listener.try_recv().await {
                                Ok(Some(notification)) => {
                                    self.changed(notification.payload()).await
                                }
                                Ok(None) => {
                                    tracing::warn!("change listener reconnected; cache dropped");
                                    self.reset().await;
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "change listener failed");
                                    break;
                                }
                            }
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "cannot LISTEN for changes"),
                },
                Err(err) => tracing::warn!(error = %err, "cannot connect the change listener"),
            }
            self.reset().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(account_id: &str) -> Arc<AccountSummary> {
        Arc::new(AccountSummary {
            account_id: account_id.to_owned(),
            owner: "o".into(),
            currency: "EUR".into(),
            balance: 1,
            status: "open".into(),
            version: 1,
            last_position: 1,
            updated_at: chrono::Utc::now(),
        })
    }

    /// A fill whose fetch began before a change must never leave its row in the cache, however
    /// the fill and the invalidation interleave (the check and the insert used to be two
    /// steps, with room for the invalidation in between).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_invalidation_racing_a_fill_is_never_undone() {
        let changes = Changes::new(10_000, Duration::from_secs(3600));
        for round in 0..20_000 {
            let id = format!("account-{round}");
            let generation = changes.generation();
            let filler = tokio::spawn({
                let changes = changes.clone();
                let row = summary(&id);
                async move { changes.fill(generation, row).await }
            });
            let invalidator = tokio::spawn({
                let changes = changes.clone();
                let id = id.clone();
                async move { changes.changed(&id).await }
            });
            filler.await.unwrap();
            invalidator.await.unwrap();
            assert!(
                changes.cache.get(&id).await.is_none(),
                "round {round}: a row fetched before its change stayed cached"
            );
        }
    }

    #[tokio::test]
    async fn a_rebuild_notification_drops_every_cached_row() {
        let changes = Changes::new(100, Duration::from_secs(3600));
        for id in ["a", "b"] {
            changes.fill(changes.generation(), summary(id)).await;
            assert!(changes.cache.get(id).await.is_some());
        }
        let mut woken = changes.subscribe();
        changes.changed(ALL).await;
        for id in ["a", "b"] {
            assert!(changes.cache.get(id).await.is_none(), "{id} still cached");
        }
        assert_eq!(&*woken.recv().await.unwrap(), ALL);
    }
}
