//! Commit and retry: the roots accepted and not yet settled. A root is retired (from
//! the queue) when its whole closure is in the cache, or when it can never be; a
//! failed attempt is tried again after an exponential backoff with jitter, and after
//! `max_attempts` it is reported and kept in the queue for the next start.
//!
//! ```text
//! attempt 1 fails ─▶ wait ~1 s ─▶ attempt 2 fails ─▶ wait ~2 s ─▶ … ─▶ failed (kept)
//!   warning                         debug                               error
//! ```
//! A root's first failure is a warning, so that something is said while the backoff
//! runs; the attempts after it are logged at debug level, until the last one fails:
//! one error line with the attempt count and the last reason.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, log, Level};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::realise;
use super::tasks::{Status, Watch};
use super::Shared;
use crate::realisation::Realisation;
use crate::store_path::StorePath;

/// What became of a root in one attempt.
pub(super) enum RootOutcome {
    /// Its closure is in the cache.
    Done,
    /// It can never be uploaded (not valid in the store, garbage-collected): retire it.
    Gone(String),
    /// This attempt failed; try again later.
    Failed(String),
    /// Kept out by --include/--exclude: retire it, not a failure.
    Excluded,
    /// Uploads are under way; these paths must all end Done. Then these realisations
    /// (of a `.drv` root's outputs, each after those it depends on) are written.
    Wait(Vec<(StorePath, Watch)>, Vec<Realisation>),
}

/// How a root's attempt ended, sent back by the task that waited for it.
pub(super) type Settled = (StorePath, Result<(), String>);

/// What to do after a failed attempt.
#[derive(Debug, PartialEq)]
enum Next {
    /// Try again after this long; the number is the attempt that failed.
    Retry(Duration, u32),
    GiveUp,
}

/// The roots accepted and not settled, with their failed attempts, and the retries
/// scheduled.
#[derive(Default)]
pub(super) struct Roots {
    attempts: HashMap<StorePath, u32>,
    retries: Vec<(Instant, StorePath)>,
}

impl Roots {
    pub(super) fn len(&self) -> usize {
        self.attempts.len()
    }

    pub(super) fn contains(&self, root: &StorePath) -> bool {
        self.attempts.contains_key(root)
    }

    /// Starts tracking `root`; false when it already was.
    pub(super) fn track(&mut self, root: &StorePath) -> bool {
        if self.attempts.contains_key(root) {
            return false;
        }
        self.attempts.insert(root.clone(), 0);
        true
    }

    /// When the next retry is due.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.iter().map(|(t, _)| *t).min()
    }

    /// Moves the roots whose retry is due into `batch`.
    pub(super) fn take_due(&mut self, now: Instant, batch: &mut Vec<StorePath>) {
        self.retries.retain(|(t, p)| {
            if *t <= now {
                batch.push(p.clone());
                false
            } else {
                true
            }
        });
    }

    /// Counts a failed attempt of `root` and says what comes next.
    fn failed(&mut self, root: &StorePath, max_attempts: u32) -> Next {
        let max = max_attempts.max(1);
        let attempts = self.attempts.entry(root.clone()).or_insert(0);
        *attempts += 1;
        if *attempts < max {
            Next::Retry(backoff(*attempts), *attempts)
        } else {
            self.attempts.remove(root);
            Next::GiveUp
        }
    }

    /// A root's attempt ended: retire it, or schedule another attempt, or give up for now.
    pub(super) async fn settle(
        &mut self,
        shared: &Shared,
        root: StorePath,
        result: Result<(), String>,
    ) {
        let shown = shared.show(&root);
        let reason = match result {
            Ok(()) => {
                self.attempts.remove(&root);
                shared.journal_retire(shown).await;
                return;
            }
            Err(reason) => reason,
        };
        let max = shared.cfg.max_attempts.max(1);
        match self.failed(&root, max) {
            Next::Retry(delay, attempt) => {
                log!(
                    retry_level(attempt),
                    "retrying {shown}{} in {:.1}s (attempt {attempt} of {max} failed: {reason})",
                    shared.to_cache(),
                    delay.as_secs_f64(),
                );
                self.retries.push((Instant::now() + delay, root));
                shared.journal_attempt(shown, reason).await;
            }
            Next::GiveUp => {
                shared.stats.failed.fetch_add(1, Relaxed);
                let kept = if shared.cfg.queue.is_some() {
                    "; kept in the state dir, retried on the next start"
                } else {
                    ""
                };
                error!(
                    "failed {shown}{} after {max} attempts: {reason}{kept}",
                    shared.to_cache()
                );
                shared.journal_fail(shown, reason).await;
            }
        }
    }

    /// Takes the outcomes of one planned batch. Roots not `asked` for are build-time
    /// dependencies (--include-build-deps) that planning added: they are recorded and
    /// tracked like accepted ones, unless already under way. A root whose uploads are
    /// under way is settled through `done` when they end and its realisations are
    /// written: it stays in the queue until they are.
    pub(super) async fn outcomes(
        &mut self,
        shared: &Arc<Shared>,
        asked: &HashSet<StorePath>,
        outcomes: Vec<(StorePath, RootOutcome)>,
        done: &mpsc::Sender<Settled>,
    ) {
        let mut extras = Vec::new();
        let mut kept = Vec::with_capacity(outcomes.len());
        for (root, outcome) in outcomes {
            if !asked.contains(&root) {
                if !self.track(&root) {
                    continue;
                }
                extras.push(root.clone());
            }
            kept.push((root, outcome));
        }
        if !extras.is_empty() {
            shared.journal_accept(&extras).await;
        }
        for (root, outcome) in kept {
            match outcome {
                RootOutcome::Done => self.settle(shared, root, Ok(())).await,
                RootOutcome::Failed(reason) => self.settle(shared, root, Err(reason)).await,
                RootOutcome::Excluded => {
                    self.attempts.remove(&root);
                    shared.journal_retire(shared.show(&root)).await;
                }
                RootOutcome::Gone(reason) => {
                    shared.stats.failed.fetch_add(1, Relaxed);
                    error!("failed {}: {reason}", shared.show(&root));
                    self.attempts.remove(&root);
                    shared.journal_retire(shared.show(&root)).await;
                }
                RootOutcome::Wait(targets, realisations) => {
                    let done = done.clone();
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let present = targets.is_empty();
                        let mut result = Ok(());
                        for (path, watch) in targets {
                            if let Status::Failed(reason) = watch.settled().await {
                                result = Err(format!("{path}: {reason}"));
                                break;
                            }
                        }
                        if result.is_ok() && !realisations.is_empty() {
                            result = realise::write(&shared, &realisations)
                                .await
                                .map_err(|e| format!("its realisations: {e}"));
                            if result.is_ok() && present {
                                shared.stats.skipped.fetch_add(1, Relaxed);
                                info!(
                                    "skipped {} (its outputs are in the cache), wrote its realisations",
                                    shared.show(&root)
                                );
                            }
                        }
                        let _ = done.send((root, result)).await;
                    });
                }
            }
        }
    }
}

/// How loudly failed attempt `n` (n ≥ 1, not the last) of a root is logged.
fn retry_level(n: u32) -> Level {
    if n == 1 {
        Level::Warn
    } else {
        Level::Debug
    }
}

/// Delay before attempt `n + 1` (n ≥ 1): exponential from 1 s, capped, ±25 % jitter.
fn backoff(n: u32) -> Duration {
    let base = 1000u64
        .saturating_mul(1 << n.saturating_sub(1).min(6))
        .min(60_000);
    let jitter = fastrand::u64(0..=base / 2);
    Duration::from_millis(base - base / 4 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_a_minute_with_a_quarter_of_jitter() {
        for _ in 0..200 {
            for (n, base) in [(1, 1000), (2, 2000), (3, 4000), (6, 32_000), (7, 60_000)] {
                let ms = backoff(n).as_millis() as u64;
                assert!(
                    ms >= base - base / 4 && ms <= base + base / 4,
                    "attempt {n}: {ms} ms"
                );
            }
            // Far past the cap it stays capped (no overflow).
            let ms = backoff(u32::MAX).as_millis() as u64;
            assert!((45_000..=75_000).contains(&ms), "{ms} ms");
        }
    }

    #[test]
    fn only_the_first_of_the_attempts_before_the_last_is_a_warning() {
        assert_eq!(retry_level(1), Level::Warn);
        for n in 2..10 {
            assert_eq!(retry_level(n), Level::Debug);
        }
    }

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", "a".repeat(32))).unwrap()
    }

    #[test]
    fn a_root_is_retried_until_its_last_attempt_then_given_up() {
        let mut roots = Roots::default();
        let p = path("p");
        assert!(roots.track(&p));
        assert!(!roots.track(&p), "tracked once");
        assert!(matches!(roots.failed(&p, 3), Next::Retry(_, 1)));
        assert!(matches!(roots.failed(&p, 3), Next::Retry(_, 2)));
        assert_eq!(roots.failed(&p, 3), Next::GiveUp);
        assert!(!roots.contains(&p), "given up: no longer outstanding");
        // max_attempts 0 means one attempt.
        roots.track(&p);
        assert_eq!(roots.failed(&p, 0), Next::GiveUp);
    }

    #[test]
    fn due_retries_move_to_the_batch_and_the_rest_wait() {
        let mut roots = Roots::default();
        let now = Instant::now();
        let (a, b) = (path("a"), path("b"));
        roots
            .retries
            .push((now + Duration::from_secs(5), a.clone()));
        roots.retries.push((now, b.clone()));
        assert_eq!(roots.next_retry(), Some(now));
        let mut batch = Vec::new();
        roots.take_due(now, &mut batch);
        assert_eq!(batch, vec![b]);
        assert_eq!(roots.next_retry(), Some(now + Duration::from_secs(5)));
    }
}
