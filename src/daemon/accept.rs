//! Accept and journal: a root counts as accepted once the durable [`Queue`] holds it
//! (when there is a state directory), before anything else happens to it; each failed
//! attempt is counted there with its error; it is retired when its closure is in the
//! cache or can never be, and marked failed (kept for the next start) when its
//! attempts run out. Queue writes may fsync, so they run off the async threads.

use std::sync::{Arc, Mutex};

use log::{error, info, warn};

use super::{Error, Shared};
use crate::queue::{self, Opened, Pending, Queue};
use crate::store_path::StorePath;

/// Opens the queue in `state_dir` (off the async threads: it checks and may rebuild
/// the database), returning it with what it still holds; what opening found worth
/// saying (a damaged database rebuilt, an old journal imported) is logged.
pub async fn open_queue(
    state_dir: &std::path::Path,
) -> Result<(Arc<Mutex<Queue>>, Vec<Pending>), Error> {
    let dir = state_dir.to_path_buf();
    let (q, Opened { pending, notes }) = tokio::task::spawn_blocking(move || Queue::open(&dir))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    for note in notes {
        warn!("{note}");
    }
    Ok((Arc::new(Mutex::new(q)), pending))
}

impl Shared {
    /// What an earlier run accepted and did not finish, to be planned first; entries
    /// that are not store paths (of this store) are reported and retired.
    pub(super) async fn replay(&self, pending: Vec<Pending>) -> Vec<StorePath> {
        let mut roots = Vec::with_capacity(pending.len());
        for p in pending {
            match self.cfg.store_dir.parse(&p.path) {
                Ok(sp) => {
                    if let Some(reason) = &p.failed {
                        info!("retrying {} (failed before: {reason})", p.path);
                    } else {
                        info!("resuming {}", p.path);
                    }
                    roots.push(sp);
                }
                Err(e) => {
                    warn!("dropping unreadable journal entry {:?}: {e}", p.path);
                    self.journal_retire(p.path).await;
                }
            }
        }
        roots
    }

    /// Runs a journal operation off the async threads (it may fsync).
    async fn journal_op(
        &self,
        op: impl FnOnce(&mut Queue) -> Result<(), queue::Error> + Send + 'static,
    ) -> bool {
        let Some(j) = self.cfg.queue.clone() else {
            return true;
        };
        let res = tokio::task::spawn_blocking(move || op(&mut j.lock().unwrap())).await;
        match res {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                error!("{e}");
                false
            }
            Err(e) => {
                error!("state queue: {e}");
                false
            }
        }
    }

    /// Records roots as accepted (durably, when there is a journal).
    pub(super) async fn journal_accept(&self, roots: &[StorePath]) -> bool {
        let paths: Vec<String> = roots.iter().map(|p| self.show(p)).collect();
        self.journal_op(move |j| j.accept(&paths)).await
    }

    /// Retires the root for this pipeline's cache: out of the queue once every cache
    /// has it.
    pub(super) async fn journal_retire(&self, path: String) {
        let cache = self.cache_key().to_string();
        let caches: Vec<String> = self
            .cfg
            .caches
            .iter()
            .map(|c| c.url().to_string())
            .collect();
        self.journal_op(move |j| j.retire_in(&path, &cache, &caches))
            .await;
    }

    /// Counts a failed attempt (the root stays pending and is tried again).
    pub(super) async fn journal_attempt(&self, path: String, reason: String) {
        let reason = self.for_cache(reason);
        self.journal_op(move |j| j.attempt_failed(&path, &reason))
            .await;
    }

    pub(super) async fn journal_fail(&self, path: String, reason: String) {
        let reason = self.for_cache(reason);
        self.journal_op(move |j| j.fail(&path, &reason)).await;
    }

    /// A reason as the queue keeps it: with several caches, naming the cache.
    fn for_cache(&self, reason: String) -> String {
        if self.cfg.caches.len() > 1 {
            format!("{}: {reason}", self.cache.url())
        } else {
            reason
        }
    }
}
