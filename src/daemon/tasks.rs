//! Path tasks: one task per path to upload, each with a status watch that referrers
//! and roots wait on. Every new path gets its watch before any task starts, so a task
//! can wait on any reference; at most [`MAX_TASKS`] run, the rest wait in an order
//! that starts references before referrers.
//!
//! ```text
//! planned ─▶ waiting (path info only) ─▶ running (path::task) ─▶ Done | Failed(reason)
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use std::sync::OnceLock;

use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::{path, Shared};
use crate::nix::PathInfo;
use crate::store_path::StorePath;

/// Path tasks under way before planning waits for some to finish. A running task
/// costs ~6 KB (its future and what it holds) against ~1 KB for a waiting path:
/// 4,096 keep 4 upload slots and 64 presence checks fed (8,192 did no better on the
/// 100,000-path wide closure, and peaked 30 MB higher).
pub(super) const MAX_TASKS: usize = 4096;

/// How a path task ended.
#[derive(Clone, Debug)]
pub(super) enum Status {
    Done,
    Failed(Arc<str>),
}

/// A path task's status, set once by the task and awaited by its referrers and roots.
/// A large closure holds one per planned path, so it is small: a tokio watch channel
/// (eight notifiers and a lock) took ~450 bytes a path.
#[derive(Clone)]
pub(super) struct Watch(Arc<Cell>);

struct Cell {
    status: OnceLock<Status>,
    notify: Notify,
}

impl Watch {
    fn new() -> Watch {
        Watch(Arc::new(Cell {
            status: OnceLock::new(),
            notify: Notify::new(),
        }))
    }

    /// Whether both watch the same task.
    pub(super) fn same(&self, other: &Watch) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The final status, once the task has one.
    pub(super) async fn settled(&self) -> Status {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a status set in between still wakes us.
            notified.as_mut().enable();
            if let Some(status) = self.0.status.get() {
                return status.clone();
            }
            notified.await;
        }
    }
}

/// The task's side of its [`Watch`]. Dropped without a status (the task was aborted or
/// panicked), the path counts as failed.
pub(super) struct Settle(Watch);

impl Settle {
    /// The watch this settles.
    pub(super) fn watch(&self) -> &Watch {
        &self.0
    }

    pub(super) fn set(&self, status: Status) {
        if self.0 .0.status.set(status).is_ok() {
            self.0 .0.notify.notify_waiters();
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        self.set(Status::Failed("abandoned".into()));
    }
}

/// A path a task must see in the cache before writing its narinfo.
pub(super) enum Dep {
    /// Being uploaded by a task of ours.
    Task(StorePath, Watch),
    /// Not known either way: checked in the cache before committing.
    Check(StorePath),
}

/// Path tasks: those running, and those planned that wait to start.
#[derive(Default)]
pub(super) struct Tasks {
    pub(super) running: JoinSet<()>,
    /// In start order: references before referrers, so a running task never waits
    /// for one that has not started, and tasks can be started a few at a time.
    pub(super) waiting: VecDeque<Waiting>,
}

/// A planned path whose task has not started.
pub(super) struct Waiting {
    info: PathInfo,
    deps: Vec<Dep>,
    settle: Settle,
}

impl Tasks {
    pub(super) fn len(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// Starts waiting tasks while fewer than [`MAX_TASKS`] run: a waiting path costs
    /// its path info, a running one its whole task.
    pub(super) fn top_up(&mut self, shared: &Arc<Shared>) {
        while self.running.try_join_next().is_some() {}
        while self.running.len() < MAX_TASKS {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.running
                .spawn(path::task(shared.clone(), w.info, w.deps, w.settle));
        }
    }
}

/// Plans a task for every path of the closure that is neither known present nor
/// under way; returns a status watch for each path under way. Every new path gets its
/// watch before any task starts, so a task can wait on any reference. NARs start
/// largest first, which keeps both cores busy to the end (the narinfos still commit in
/// dependency order, through those waits); when more than [`MAX_TASKS`] would run, the
/// rest wait and start references first (see [`start_order`]).
pub(super) fn spawn_closure(
    shared: &Arc<Shared>,
    infos: Vec<PathInfo>,
    tasks: &mut Tasks,
) -> HashMap<StorePath, Watch> {
    let mut state = shared.state.lock().unwrap();
    // One buffer from here to the waiting queue (the path infos' own is freed as this
    // loop ends): a root-only closure of 100,000 paths is planned at once, and a second
    // copy of it, ordered, was its largest cost.
    let mut new: Vec<Waiting> = Vec::with_capacity(infos.len());
    let mut watches = HashMap::new();
    for info in infos {
        if state.satisfied(&info.path) {
            continue;
        }
        if let Some(rx) = state.inflight.get(&info.path) {
            watches.insert(info.path.clone(), rx.clone());
            continue;
        }
        if let Some(share) = &shared.share {
            share.want(&info.path, shared.which);
        }
        let rx = Watch::new();
        let settle = Settle(rx.clone());
        state.inflight.insert(info.path.clone(), rx.clone());
        watches.insert(info.path.clone(), rx);
        new.push(Waiting {
            info,
            deps: Vec::new(),
            settle,
        });
    }
    // Now that every new path is in flight, what each one waits for.
    for w in &mut new {
        let info = &w.info;
        w.deps = info
            .references
            .iter()
            .filter(|r| **r != info.path && !state.satisfied(r))
            .map(|r| match state.inflight.get(r) {
                Some(rx) => Dep::Task(r.clone(), rx.clone()),
                None => Dep::Check(r.clone()),
            })
            .collect();
    }
    drop(state);
    if tasks.len() + new.len() <= MAX_TASKS {
        // All start now: any order is safe, and largest first keeps the cores busy.
        new.sort_by_key(|w| std::cmp::Reverse(w.info.nar_size));
    } else {
        let infos: Vec<&PathInfo> = new.iter().map(|w| &w.info).collect();
        let order = start_order(&infos);
        drop(infos);
        permute(&mut new, order);
    }
    shared.stats.planned.fetch_add(new.len() as u64, Relaxed);
    shared
        .stats
        .planned_bytes
        .fetch_add(new.iter().map(|w| w.info.nar_size).sum(), Relaxed);
    if tasks.waiting.is_empty() {
        // Sized for every path planned; most may have been in flight or present.
        if new.len() < new.capacity() / 2 {
            new.shrink_to_fit();
        }
        tasks.waiting = VecDeque::from(new);
    } else {
        tasks.waiting.extend(new);
    }
    tasks.top_up(shared);
    watches
}

/// Puts `v` in `order` (`v[k]` becomes the old `v[order[k]]`) in place, following each
/// cycle of the permutation.
fn permute<T>(v: &mut [T], mut order: Vec<usize>) {
    const DONE: usize = usize::MAX;
    for start in 0..v.len() {
        let mut k = start;
        while order[k] != DONE {
            let from = order[k];
            order[k] = DONE;
            if from == start {
                break;
            }
            v.swap(k, from);
            k = from;
        }
    }
}

/// Indices of `new` in start order: by level (a path's is above all of its references'
/// in the set), then largest NAR first.
fn start_order(new: &[&PathInfo]) -> Vec<usize> {
    let index: HashMap<&StorePath, usize> = new
        .iter()
        .enumerate()
        .map(|(i, info)| (&info.path, i))
        .collect();
    let mut referrers: Vec<Vec<usize>> = vec![Vec::new(); new.len()];
    let mut unplaced = vec![0usize; new.len()];
    for (i, info) in new.iter().enumerate() {
        for r in info.references.iter().filter(|r| **r != info.path) {
            if let Some(&j) = index.get(r) {
                referrers[j].push(i);
                unplaced[i] += 1;
            }
        }
    }
    let mut level = vec![0usize; new.len()];
    let mut ready: Vec<usize> = (0..new.len()).filter(|&i| unplaced[i] == 0).collect();
    while let Some(j) = ready.pop() {
        for &i in &referrers[j] {
            level[i] = level[i].max(level[j] + 1);
            unplaced[i] -= 1;
            if unplaced[i] == 0 {
                ready.push(i);
            }
        }
    }
    let mut order: Vec<usize> = (0..new.len()).collect();
    order.sort_by_key(|&i| (level[i], std::cmp::Reverse(new[i].nar_size)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Sha256;

    fn info(name: &str, size: u64, refs: &[&str]) -> (PathInfo, Settle) {
        let path = |n: &str| StorePath::from_base_name(&format!("{}-{n}", "a".repeat(32)));
        let info = PathInfo {
            path: path(name).unwrap(),
            nar_hash: Sha256([0; 32]),
            nar_size: size,
            // A path may refer to itself; that puts no constraint on the order.
            references: refs
                .iter()
                .chain([&name])
                .map(|r| path(r).unwrap())
                .collect(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        };
        (info, Settle(Watch::new()))
    }

    #[tokio::test]
    async fn a_watch_wakes_its_waiters_once_and_an_abandoned_task_counts_as_failed() {
        let watch = Watch::new();
        let settle = Settle(watch.clone());
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let w = watch.clone();
                tokio::spawn(async move { w.settled().await })
            })
            .collect();
        tokio::task::yield_now().await;
        settle.set(Status::Done);
        settle.set(Status::Failed("late".into())); // set once: ignored
        for w in waiters {
            assert!(matches!(w.await.unwrap(), Status::Done));
        }
        assert!(
            matches!(watch.settled().await, Status::Done),
            "after the fact too"
        );

        let watch = Watch::new();
        let waiter = {
            let w = watch.clone();
            tokio::spawn(async move { w.settled().await })
        };
        drop(Settle(watch.clone()));
        assert!(matches!(waiter.await.unwrap(), Status::Failed(r) if &*r == "abandoned"));
    }

    #[test]
    fn references_start_before_referrers_and_larger_first_within_a_level() {
        // app → lib → libc; big and small depend on nothing planned; lib also refers
        // to a path outside the set (already in the cache).
        let new = [
            info("app", 10, &["lib"]),
            info("lib", 5, &["libc", "elsewhere"]),
            info("libc", 1, &[]),
            info("big", 100, &[]),
            info("small", 2, &[]),
        ];
        let infos: Vec<&PathInfo> = new.iter().map(|(i, _)| i).collect();
        let order = start_order(&infos);
        let names: Vec<String> = order
            .iter()
            .map(|&i| new[i].0.path.name().to_string())
            .collect();
        assert_eq!(names, ["big", "small", "libc", "lib", "app"]);
        // The same order, applied in place.
        let mut moved: Vec<String> = new.iter().map(|(i, _)| i.path.name().to_string()).collect();
        permute(&mut moved, order);
        assert_eq!(moved, names);
    }

    #[test]
    fn permute_follows_every_cycle() {
        // Cycles (0 2 4), (1 3), 5 alone.
        let mut v = vec!['a', 'b', 'c', 'd', 'e', 'f'];
        permute(&mut v, vec![2, 3, 4, 1, 0, 5]);
        assert_eq!(v, ['c', 'd', 'e', 'b', 'a', 'f']);
        let mut empty: Vec<u8> = Vec::new();
        permute(&mut empty, Vec::new());
    }
}
