//! What the cache holds: whether a path's narinfo is there, asked once per path and
//! remembered (a bounded set of paths known present), or answered by one listing of
//! the cache when many paths are to be looked for and listing is cheaper.
//!
//! ```text
//! known present? ─yes─▶ present          (no request)
//!      │no
//! fresh listing? ─────▶ its answer       (≈ 1 request per 1,000 narinfos, once)
//!      │none
//! local folder   ─────▶ stat each        (one blocking call for the lot)
//! remote         ─────▶ HEAD each        (≤ CHECKS_IN_FLIGHT at once)
//! ```

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::Shared;
use crate::cache;
use crate::nix::PathInfo;
use crate::store_path::StorePath;
use crate::upstream::Served;

/// Concurrent existence checks against the cache.
pub(super) const CHECKS_IN_FLIGHT: usize = 64;
/// Paths remembered as present in the cache.
const KNOWN_PRESENT: usize = 200_000;
/// A batch with this many paths to look for lists the cache instead of asking for
/// each (S3 and GCS list 1,000 objects a request)…
const LIST_FROM: usize = 1000;
/// …unless it holds more objects than this many per path, or than LIST_MAX.
const LIST_PER_PATH: usize = 500;
const LIST_MAX: usize = 1_000_000;
/// How long a listing answers for the cache (other writers may add to it).
const LISTING_FRESH: Duration = Duration::from_secs(600);

/// Paths known present in the cache: the most recent `cap` of them (a daemon that
/// runs for months sees far more paths than it can remember).
pub(super) struct BoundedSet {
    cap: usize,
    set: HashSet<StorePath>,
    order: VecDeque<StorePath>,
}

impl Default for BoundedSet {
    fn default() -> BoundedSet {
        BoundedSet::new(KNOWN_PRESENT)
    }
}

impl BoundedSet {
    fn new(cap: usize) -> BoundedSet {
        BoundedSet {
            cap,
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    pub(super) fn contains(&self, p: &StorePath) -> bool {
        self.set.contains(p)
    }

    pub(super) fn get(&self, p: &StorePath) -> Option<&StorePath> {
        self.set.get(p)
    }

    /// Remembers `p`, forgetting the oldest path when full; false if it was known.
    pub(super) fn insert(&mut self, p: StorePath) -> bool {
        if !self.set.insert(p.clone()) {
            return false;
        }
        self.order.push_back(p);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The cache's narinfos as listed at a moment.
pub(super) struct Listing {
    hashes: HashSet<[u8; 20]>,
    at: Instant,
}

impl Shared {
    /// Known to be in the cache, or served upstream (which counts the same).
    pub(super) fn known_present(&self, p: &StorePath) -> bool {
        self.state.lock().unwrap().satisfied(p)
    }

    /// Known present in the cache, or under way.
    pub(super) fn is_known(&self, p: &StorePath) -> bool {
        self.state.lock().unwrap().known(p).is_some()
    }

    /// Whether the cache has `p`'s narinfo (remembered once seen).
    pub(super) async fn in_cache(&self, p: &StorePath) -> Result<bool, cache::Error> {
        if let Some(found) = self.known_presence(p) {
            return Ok(found);
        }
        let _permit = self.checks.acquire().await.expect("never closed");
        let found = self.cache.exists(&cache::narinfo_key(p)).await?;
        if found {
            self.state.lock().unwrap().present.insert(p.clone());
        }
        Ok(found)
    }

    /// Whether `p` is in the cache, when that is known without asking: remembered as
    /// present, or answered by a fresh listing.
    pub(super) fn known_presence(&self, p: &StorePath) -> Option<bool> {
        if self.known_present(p) {
            return Some(true);
        }
        let listing = self.listing.lock().unwrap();
        let l = listing
            .as_ref()
            .filter(|l| l.at.elapsed() < LISTING_FRESH)?;
        let found = p.hash_bytes().is_some_and(|h| l.hashes.contains(&h));
        if found {
            self.state.lock().unwrap().present.insert(p.clone());
        }
        Some(found)
    }

    /// Lists the cache when `to_check` paths are to be looked for and that is cheaper
    /// than asking for each: a re-run of a 100,000-path closure then costs ~200 list
    /// requests instead of 100,000 HEADs. Tried at most once per [`LISTING_FRESH`].
    pub(super) async fn consider_listing(&self, to_check: usize) {
        if to_check < LIST_FROM {
            return;
        }
        {
            let mut tried = self.listing_tried.lock().unwrap();
            if tried.is_some_and(|t| t.elapsed() < LISTING_FRESH) {
                return;
            }
            *tried = Some(Instant::now());
        }
        let limit = (to_check * LIST_PER_PATH).min(LIST_MAX);
        let at = Instant::now();
        match self.cache.narinfo_hashes(limit).await {
            Ok(Some(hashes)) => {
                info!(
                    "listed the cache: {} narinfos in {:.2}s",
                    hashes.len(),
                    at.elapsed().as_secs_f64()
                );
                *self.listing.lock().unwrap() = Some(Listing { hashes, at });
            }
            Ok(None) => info!("the cache holds over {limit} objects: asking path by path"),
            Err(e) => warn!("cannot list the cache, asking path by path: {e}"),
        }
    }
}

/// Whether each path's narinfo is in the cache, checked concurrently.
pub(super) async fn presence(
    shared: &Shared,
    paths: Vec<StorePath>,
) -> Vec<(StorePath, Result<bool, cache::Error>)> {
    let known: Vec<Option<bool>> = paths.iter().map(|p| shared.known_presence(p)).collect();
    // A local folder: the rest in one blocking call (a failure falls back to one by one).
    let ask: Vec<String> = paths
        .iter()
        .zip(&known)
        .filter(|(_, k)| k.is_none())
        .map(|(p, _)| cache::narinfo_key(p))
        .collect();
    if let Some(Ok(found)) = shared.cache.exist_local(ask).await {
        let mut found = found.into_iter();
        let mut state = shared.state.lock().unwrap();
        return paths
            .into_iter()
            .zip(known)
            .map(|(p, k)| {
                let present = k.unwrap_or_else(|| found.next().expect("one answer each"));
                if present {
                    state.present.insert(p.clone());
                }
                (p, Ok(present))
            })
            .collect();
    }
    let checks = paths.into_iter().map(|p| async move {
        let r = shared.in_cache(&p).await;
        (p, r)
    });
    futures::future::join_all(checks).await
}

/// `level` without the paths upstream serves (see [`crate::upstream`]), which are
/// remembered, logged once and counted: signatures first (free), then the upstream
/// caches, asked concurrently.
pub(super) async fn skip_upstream(
    shared: &Shared,
    level: Vec<PathInfo>,
) -> Result<Vec<PathInfo>, cache::Error> {
    let up = &shared.cfg.upstream;
    if up.is_off() {
        return Ok(level);
    }
    let mut keep = Vec::with_capacity(level.len());
    let mut ask = Vec::new();
    for info in level {
        match up.signed_by(&info.sigs) {
            Some(why) => shared.served_upstream(&info.path, why),
            None if up.caches.is_empty() => keep.push(info),
            None => ask.push(info),
        }
    }
    let checks = ask.into_iter().map(|info| async move {
        let _permit = shared.checks.acquire().await.expect("never closed");
        let mut requests = 0;
        let found = up.has_counting(&info.path, &mut requests).await;
        shared.stats.upstream_checks.fetch_add(requests, Relaxed);
        (info, found)
    });
    // An upstream that cannot answer never holds paths back: they are pushed (always
    // safe for the cache), and the trouble is said once per batch.
    let mut unanswered = 0;
    let mut first_error = None;
    for (info, found) in futures::future::join_all(checks).await {
        match found {
            Ok(Some(why)) => shared.served_upstream(&info.path, why),
            Ok(None) => keep.push(info),
            Err(e) => {
                unanswered += 1;
                first_error.get_or_insert(e);
                keep.push(info);
            }
        }
    }
    if let Some(e) = first_error {
        warn!("upstream did not answer for {unanswered} paths, pushing them: {e}");
    }
    Ok(keep)
}

impl Shared {
    fn served_upstream(&self, p: &StorePath, why: Served) {
        let new = self.state.lock().unwrap().upstream.insert(p.clone());
        if new {
            self.stats.upstream.fetch_add(1, Relaxed);
            info!("skipped {} ({why})", self.show(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounded_set_forgets_the_oldest_path_past_its_cap() {
        let p = |i: usize| StorePath::from_base_name(&format!("{}{i}-p", "a".repeat(31))).unwrap();
        let mut set = BoundedSet::new(3);
        for i in 0..3 {
            set.insert(p(i));
        }
        set.insert(p(0)); // already there: not a new entry, nothing forgotten
        assert!((0..3).all(|i| set.contains(&p(i))));
        set.insert(p(3));
        assert!(!set.contains(&p(0)), "the oldest went");
        assert!((1..4).all(|i| set.contains(&p(i))));
        assert_eq!((set.set.len(), set.order.len()), (3, 3));
    }
}
