//! Several caches, one NAR: when the pipelines of several caches need the same path,
//! the first of them to start on it makes the NAR once and writes it to every cache
//! that wanted it by then; the others take their copy from it instead of making their
//! own.
//!
//! ```text
//! plan (each pipeline) ─ want(P, cache) ─▶ Wanted{a, b}
//! task of cache a ─ claim ─▶ Make(for b) ─ one engine run ─▶ NAR in a and in b ─▶ b's copy sent
//! task of cache b ─ claim ─▶ Wait ───────────────────────────────────────────────▶ its copy
//! ```
//! A cache whose copy could not be written (down, or stalling the others) gets
//! nothing and makes the NAR alone, on its own pipeline's retry schedule; so does one
//! that wanted the path after its NAR was started. Nothing here decides whether a
//! path is uploaded: each pipeline still commits its own narinfo.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use crate::store_path::StorePath;

/// A NAR written for another pipeline's cache, or None when that failed.
pub(super) type Copy = Option<super::stream::NarFile>;

pub(super) struct NarShare {
    slots: Mutex<HashMap<StorePath, Slot>>,
    /// Which pipelines are planning a batch (and may be about to want a path).
    planning: Vec<AtomicBool>,
    planned: Notify,
}

/// How long a task waits for the other pipelines to finish planning before it makes
/// a NAR nobody else wants (yet): they were fed the same roots at the same moment,
/// but one whose cache answers slowly must not hold up the rest.
const PLANNING_GRACE: Duration = Duration::from_secs(2);

/// Marks a pipeline as planning while it lives.
pub(super) struct Planning<'a>(&'a NarShare, usize);

impl Drop for Planning<'_> {
    fn drop(&mut self) {
        self.0.planning[self.1].store(false, SeqCst);
        self.0.planned.notify_waiters();
    }
}

enum Slot {
    /// Planned by these pipelines; nobody has started on it.
    Wanted(Vec<usize>),
    /// Being made; each pipeline listed takes its copy from here.
    Making(HashMap<usize, oneshot::Receiver<Copy>>),
}

/// What a pipeline's task does about a path's NAR.
pub(super) enum Claim {
    /// Make it, for this pipeline and for these others too.
    Make(Vec<(usize, oneshot::Sender<Copy>)>),
    /// Another pipeline makes it: wait for this pipeline's copy.
    Wait(oneshot::Receiver<Copy>),
    /// Make it for this pipeline only.
    Alone,
}

impl NarShare {
    pub(super) fn new(pipelines: usize) -> NarShare {
        NarShare {
            slots: Mutex::default(),
            planning: (0..pipelines).map(|_| AtomicBool::new(false)).collect(),
            planned: Notify::new(),
        }
    }

    /// Pipeline `who` plans a batch until the guard is dropped.
    pub(super) fn planning(&self, who: usize) -> Planning<'_> {
        self.planning[who].store(true, SeqCst);
        Planning(self, who)
    }

    /// Like [`NarShare::claim_now`], but a path that only `who` wants so far waits
    /// (up to [`PLANNING_GRACE`]) for the other pipelines to finish planning: they
    /// may want it too, and one of their tasks may start making it first.
    pub(super) async fn claim(&self, path: &StorePath, who: usize) -> Claim {
        let alone = |s: &Self| match s.slots.lock().unwrap().get(path) {
            Some(Slot::Wanted(w)) => w.iter().all(|&w| w == who),
            Some(Slot::Making(_)) => false,
            None => true,
        };
        if alone(self) {
            let others_planning = || {
                self.planning
                    .iter()
                    .enumerate()
                    .any(|(i, p)| i != who && p.load(SeqCst))
            };
            let _ = tokio::time::timeout(PLANNING_GRACE, async {
                loop {
                    let planned = self.planned.notified();
                    tokio::pin!(planned);
                    planned.as_mut().enable();
                    if !others_planning() || !alone(self) {
                        break;
                    }
                    planned.await;
                }
            })
            .await;
        }
        self.claim_now(path, who)
    }

    /// Pipeline `who` plans to upload `path`.
    pub(super) fn want(&self, path: &StorePath, who: usize) {
        let mut slots = self.slots.lock().unwrap();
        match slots.get_mut(path) {
            Some(Slot::Wanted(w)) => {
                if !w.contains(&who) {
                    w.push(who);
                }
            }
            // Too late to share: it will make its own.
            Some(Slot::Making(_)) => {}
            None => {
                slots.insert(path.clone(), Slot::Wanted(vec![who]));
            }
        }
    }

    /// Pipeline `who`'s task is ready to make the NAR of `path`.
    fn claim_now(&self, path: &StorePath, who: usize) -> Claim {
        let mut slots = self.slots.lock().unwrap();
        match slots.remove(path) {
            Some(Slot::Wanted(wanted)) => {
                let mut makers = Vec::new();
                let mut waiting = HashMap::new();
                for other in wanted.into_iter().filter(|&w| w != who) {
                    let (tx, rx) = oneshot::channel();
                    makers.push((other, tx));
                    waiting.insert(other, rx);
                }
                if waiting.is_empty() {
                    return Claim::Alone;
                }
                slots.insert(path.clone(), Slot::Making(waiting));
                // Those waiting for planning to end may wait for this instead.
                self.planned.notify_waiters();
                Claim::Make(makers)
            }
            Some(Slot::Making(mut waiting)) => {
                let mine = waiting.remove(&who);
                if !waiting.is_empty() {
                    slots.insert(path.clone(), Slot::Making(waiting));
                }
                mine.map_or(Claim::Alone, Claim::Wait)
            }
            None => Claim::Alone,
        }
    }

    /// Paths some pipeline planned and has not claimed yet (for tests and memory
    /// accounting).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", "a".repeat(32))).unwrap()
    }

    #[test]
    fn the_first_claim_makes_it_for_every_cache_that_wanted_it() {
        let share = NarShare::new(3);
        let p = path("p");
        share.want(&p, 0);
        share.want(&p, 2);
        share.want(&p, 1);
        share.want(&p, 2);
        let Claim::Make(for_others) = share.claim_now(&p, 2) else {
            panic!("the first claim makes it")
        };
        let others: Vec<usize> = for_others.iter().map(|(w, _)| *w).collect();
        assert_eq!(others, [0, 1]);
        assert!(matches!(share.claim_now(&p, 0), Claim::Wait(_)));
        // Claimed twice (a retry): nothing left to wait for, it makes its own.
        assert!(matches!(share.claim_now(&p, 0), Claim::Alone));
        assert!(matches!(share.claim_now(&p, 1), Claim::Wait(_)));
        assert_eq!(share.len(), 0, "every copy taken: nothing is kept");
    }

    #[test]
    fn alone_when_no_other_cache_wants_it_or_it_was_wanted_too_late() {
        let share = NarShare::new(3);
        let (p, q) = (path("p"), path("q"));
        share.want(&p, 0);
        assert!(matches!(share.claim_now(&p, 0), Claim::Alone));
        assert!(matches!(share.claim_now(&q, 1), Claim::Alone));
        share.want(&q, 0);
        share.want(&q, 1);
        let Claim::Make(_) = share.claim_now(&q, 0) else {
            panic!()
        };
        share.want(&q, 2);
        assert!(matches!(share.claim_now(&q, 2), Claim::Alone));
        assert!(matches!(share.claim_now(&q, 1), Claim::Wait(_)));
        assert_eq!(share.len(), 0);
    }
}
