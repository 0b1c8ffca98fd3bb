//! Change notifications from the projector (`LISTEN ledger_read_models`, payload: account
//! id, or [`ALL`] when a rebuild swapped a model in): they invalidate cached summaries and
//! wake reads waiting for a position.
//!
//! A waiting read registers for its own id ([`Changes::watch`]) and is woken only by a
//! change of that id or by [`ALL`]: with hundreds of reads waiting at 1,000 changes a
//! second, waking every waiter on every change (a broadcast) cost the query API a third of a
//! core in wake-ups that found nothing to do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ledger_readmodels::summaries::AccountSummary;
use ledger_readmodels::CHANGES_CHANNEL;
use moka::future::Cache;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{Notify, RwLock};

/// The payload that means "every row may have changed" (a rebuild swapped a model in): the
/// whole cache is dropped and every waiting read re-checks.
pub const ALL: &str = "*";

/// Reads waiting for a change, by id: the id's notifier and how many reads watch it.
type Waiting = Mutex<HashMap<Arc<str>, (Arc<Notify>, usize)>>;

/// The cache of account summaries and the stream of changed account ids.
#[derive(Clone)]
pub struct Changes {
    /// Account summaries by id.
    pub cache: Cache<String, Arc<AccountSummary>>,
    /// Reads waiting for a change, by id: the id's notifier and how many watch it.
    waiting: Arc<Waiting>,
    /// Wakes every waiting read ([`ALL`], or the listener reconnected).
    everything: Arc<Notify>,
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
        Self {
            cache: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
            waiting: Arc::new(Mutex::new(HashMap::new())),
            everything: Arc::new(Notify::new()),
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

    /// Registers a read waiting for changes of `id` (an account or a transfer), until the
    /// returned [`Watch`] is dropped.
    pub fn watch(&self, id: &str) -> Watch {
        let id: Arc<str> = Arc::from(id);
        let notify = {
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            let (notify, watchers) = waiting
                .entry(id.clone())
                .or_insert_with(|| (Arc::new(Notify::new()), 0));
            *watchers += 1;
            notify.clone()
        };
        Watch {
            id,
            notify,
            everything: self.everything.clone(),
            waiting: self.waiting.clone(),
        }
    }

    /// Wakes the reads watching `id`.
    fn wake(&self, id: &str) {
        let notify = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(|(notify, _)| notify.clone());
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// A notification: `account_id` changed, or with [`ALL`] every row may have.
    pub async fn changed(&self, account_id: &str) {
        if account_id == ALL {
            self.reset().await;
        } else {
            let _invalidation = self.gate.write().await;
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.cache.invalidate(account_id).await;
            self.wake(account_id);
        }
    }

    async fn reset(&self) {
        {
            let _invalidation = self.gate.write().await;
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.cache.invalidate_all();
        }
        self.everything.notify_waiters();
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

/// A read's registration for the changes of one id (see [`Changes::watch`]).
pub struct Watch {
    id: Arc<str>,
    notify: Arc<Notify>,
    everything: Arc<Notify>,
    waiting: Arc<Waiting>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("id", &self.id).finish()
    }
}

impl Watch {
    /// Completes at the first change of this id (or of everything) after this call, even if
    /// it comes before the future is first polled: call it before checking the model, then
    /// await it, and no change in between is missed.
    pub fn next_change(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        let this = self.notify.notified();
        let all = self.everything.notified();
        async move {
            tokio::select! {
                () = this => {}
                () = all => {}
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, watchers)) = waiting.get_mut(&self.id) {
            *watchers -= 1;
            if *watchers == 0 {
                waiting.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn summary(account_id: &str) -> Arc<AccountSummary> {
        Arc::new(AccountSummary {
            account_id: account_id.to_owned(),
            subject_id: uuid::Uuid::nil(),
            owner: Some("o".into()),
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
        let watch = changes.watch("a");
        let woken = watch.next_change();
        changes.changed(ALL).await;
        for id in ["a", "b"] {
            assert!(changes.cache.get(id).await.is_none(), "{id} still cached");
        }
        tokio::time::timeout(Duration::from_secs(5), woken)
            .await
            .expect("a rebuild wakes every waiting read");
    }

    /// A waiting read is woken by a change of its own id, even one that came between its
    /// registration and its first poll, and not by changes of other ids; its registration
    /// goes when the last read watching the id does.
    #[tokio::test]
    async fn a_change_wakes_the_reads_waiting_for_its_id_only() {
        let changes = Changes::new(100, Duration::from_secs(3600));
        let (a, a_again, b) = (changes.watch("a"), changes.watch("a"), changes.watch("b"));
        let (a_woken, a_again_woken) = (a.next_change(), a_again.next_change());
        let b_woken = b.next_change();
        // Before anything is polled.
        changes.changed("a").await;
        changes.changed("c").await;
        assert!(
            a_woken.now_or_never().is_some(),
            "the read of `a` not woken"
        );
        assert!(
            a_again_woken.now_or_never().is_some(),
            "the other read of `a` not woken"
        );
        assert!(
            b_woken.now_or_never().is_none(),
            "a change of `a` or `c` woke the read of `b`"
        );
        drop((a, a_again));
        let waiting = changes.waiting.lock().unwrap();
        assert!(!waiting.contains_key("a") && waiting.contains_key("b"));
    }
}
