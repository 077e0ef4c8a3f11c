//! Batch: one cache's pipeline. Roots arrive from the input (and, first, those an
//! earlier run left in the queue); they are gathered and planned together, so that Nix
//! and the cache are asked about a whole batch at once.
//!
//! ```text
//! accepted roots ─┐
//! owed .drv roots ─┼─▶ gathered until 50 ms pass, 2,000 are in, ─▶ plan ─▶ tasks
//! retries due ────┘    a retry falls due, or the input ends          │
//!                                                  retry ◀─ settled ◀─┘
//! ```
//! Planning waits while many paths are under way (see [`MAX_TASKS`]), so that what is
//! planned, held in memory, stays bounded.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::retry::{self, Roots};
use super::tasks::{Tasks, MAX_TASKS};
use super::{plan, Shared};
use crate::queue::Pending;
use crate::store_path::StorePath;

/// How long arriving paths are gathered before their closures are resolved together.
const WINDOW: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 2000;

/// One cache's pipeline: batches the roots from `rx` (and the `pending` ones of an
/// earlier run first), plans them, and settles them. Returns how many roots it left
/// unfinished.
pub(super) async fn pipeline(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Vec<StorePath>>,
    mut owed_rx: mpsc::Receiver<StorePath>,
    pending: Vec<Pending>,
    stop: CancellationToken,
) -> u64 {
    let (done_tx, mut done_rx) = mpsc::channel::<retry::Settled>(1024);
    let mut roots = Roots::default();
    let mut batch = Batch::default();
    let mut input_open = true;

    // What an earlier run accepted and did not finish comes first.
    batch.add(shared.replay(pending).await, &roots);
    if !batch.is_empty() {
        batch.deadline = Some(tokio::time::Instant::now());
    }

    let mut tasks = Tasks::default();
    loop {
        tasks.top_up(&shared);
        let queued = roots.len() + batch.paths.iter().filter(|p| !roots.contains(p)).count();
        shared.stats.queue.store(queued as u64, Relaxed);
        if !input_open && roots.len() == 0 && batch.is_empty() {
            break;
        }
        let next_retry = roots.next_retry();
        let mut flush = false;
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            // Before the roots that waited on the task that sent it settle: a one-shot
            // run must not end first.
            Some(drv) = owed_rx.recv() => batch.add(vec![drv], &roots),
            Some((root, result)) = done_rx.recv() => roots.settle(&shared, root, result).await,
            got = rx.recv(), if input_open => match got {
                Some(new) => batch.add(new, &roots),
                None => input_open = false,
            },
            _ = tokio::time::sleep_until(next_retry.unwrap_or_else(tokio::time::Instant::now)), if next_retry.is_some() => {
                roots.take_due(tokio::time::Instant::now(), &mut batch.paths);
                flush = true;
            }
            _ = tokio::time::sleep_until(batch.deadline.unwrap_or_else(tokio::time::Instant::now)), if batch.deadline.is_some() => flush = true,
            // A task ended while others wait to start: start them.
            Some(_) = tasks.running.join_next(), if !tasks.waiting.is_empty() => {}
        }
        if batch.is_empty() {
            batch.deadline = None;
            continue;
        }
        if !(flush || batch.paths.len() >= MAX_BATCH || !input_open) {
            continue;
        }
        // Planning waits while many paths are under way: what is planned is held in
        // memory (and, in a one-shot run, the input is read far ahead of the uploads).
        while tasks.len() >= MAX_TASKS && !stop.is_cancelled() {
            tokio::select! {
                _ = tasks.running.join_next() => tasks.top_up(&shared),
                _ = stop.cancelled() => {}
            }
        }
        if stop.is_cancelled() {
            break;
        }
        let planned = batch.take();
        for r in &planned {
            roots.track(r);
        }
        let asked: HashSet<StorePath> = planned.iter().cloned().collect();
        let planning = shared.share.as_ref().map(|s| s.planning(shared.which));
        let outcomes = tokio::select! {
            o = plan::batch(&shared, planned, &mut tasks) => o,
            _ = stop.cancelled() => break,
        };
        drop(planning);
        roots.outcomes(&shared, &asked, outcomes, &done_tx).await;
        while tasks.running.try_join_next().is_some() {}
    }
    // Realisations owed from now on are not planned in this run (the queue has them):
    // a task must not wait on a channel nobody reads.
    drop(owed_rx);
    let unfinished = roots.len() as u64;
    if stop.is_cancelled() {
        tasks.running.shutdown().await;
    } else {
        loop {
            tasks.top_up(&shared);
            if tasks.running.join_next().await.is_none() {
                break;
            }
        }
    }
    shared.cache.finish_cleanups(Duration::from_secs(5)).await;
    unfinished
}

/// Roots gathered for the next plan: planned together when the window closes, when
/// there are MAX_BATCH of them, or when a retry falls due.
#[derive(Default)]
struct Batch {
    paths: Vec<StorePath>,
    /// The same paths, to find one without a scan.
    set: HashSet<StorePath>,
    deadline: Option<tokio::time::Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Adds the roots not already gathered or outstanding, and opens the window.
    fn add(&mut self, new: Vec<StorePath>, roots: &Roots) {
        for r in new {
            if !roots.contains(&r) && self.set.insert(r.clone()) {
                self.paths.push(r);
            }
        }
        if !self.paths.is_empty() {
            self.deadline
                .get_or_insert_with(|| tokio::time::Instant::now() + WINDOW);
        }
    }

    fn take(&mut self) -> Vec<StorePath> {
        self.set.clear();
        self.deadline = None;
        std::mem::take(&mut self.paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(name).unwrap()
    }

    #[test]
    fn a_batch_holds_each_root_once_and_opens_its_window_with_the_first() {
        let a = path("9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a");
        let b = path("n7wsi22m77azhfv9fnlp9vgc2js3xsfz-probe-b");
        let mut roots = Roots::default();
        let mut batch = Batch::default();
        batch.add(Vec::new(), &roots);
        assert!(batch.is_empty() && batch.deadline.is_none());
        batch.add(vec![a.clone(), a.clone()], &roots);
        let deadline = batch.deadline.expect("the window is open");
        batch.add(vec![b.clone(), a.clone()], &roots);
        assert_eq!(batch.paths, [a.clone(), b.clone()]);
        assert_eq!(batch.deadline, Some(deadline), "opened once");
        assert_eq!(batch.take(), [a.clone(), b.clone()]);
        assert!(batch.is_empty() && batch.deadline.is_none());
        // A root still outstanding is not gathered again.
        roots.track(&a);
        batch.add(vec![a, b.clone()], &roots);
        assert_eq!(batch.paths, [b]);
    }
}
