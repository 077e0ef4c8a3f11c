//! The uploader: read store paths, resolve closures, upload what the cache lacks.
//!
//! ```text
//! input ─▶ reader ─(bounded)─▶ batcher ─▶ plan (batched) ─▶ one task per missing path
//!  FIFO/stdin/file  lines→paths   50 ms window   presence, validity,  (≤ MAX_TASKS run,
//!                                                .drv outputs, new    the rest wait)
//!                                                paths level by level
//! ```
//! Planning asks the cache about each path once (a HEAD or a stat, or one listing for
//! a large batch) and Nix only about paths not known yet, so its work is
//! linear in the number of new paths. A path task uploads its NAR under the `--jobs`
//! limit, then waits until every reference's narinfo is in the cache, then writes its
//! own narinfo: at no moment does the cache hold a narinfo whose NAR or references are
//! missing. NARs start largest first. One path's failure is logged and fails only the
//! paths that depend on it.
//!
//! Accepted roots are recorded in the [`Journal`] (when there is a state directory)
//! before anything else happens to them, and retired only when their whole closure is in
//! the cache, or when they can never be (not valid in the store). A root whose attempt
//! fails is tried again with exponential backoff and jitter; after `max_attempts` it is
//! reported and kept in the journal for the next start, without holding up the rest.
//! Paths that `send` spooled while upload was away are picked up the same way.
//!
//! [`Shutdown`] is how the caller stops it: `drain` stops reading (after what is already
//! in a pipe) and lets queued work finish; `stop` abandons work promptly.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{error, info, warn};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cache::{self, Cache};
use crate::cache_info::CacheInfo;
use crate::compress::Compression;
use crate::engine::Engine;
use crate::filter::Filter;
use crate::journal::{self, Journal, Pending};
use crate::nix::{self, Nix, PathInfo};
use crate::pipe::{self, Frame, LineSplitter};
use crate::resolve;
use crate::signing::SecretKey;
use crate::spool;
use crate::stats::{human, Stats};
use crate::store_path::{StoreDir, StorePath};

pub use crate::stats::Summary;
use crate::upload;

/// How long arriving paths are gathered before their closures are resolved together.
const WINDOW: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 2000;
/// Concurrent existence checks against the cache.
const CHECKS_IN_FLIGHT: usize = 64;
/// Paths remembered as present in the cache.
const KNOWN_PRESENT: usize = 200_000;
/// Path tasks under way before planning waits for some to finish.
const MAX_TASKS: usize = 8192;
/// A batch with this many paths to look for lists the cache instead of asking for
/// each (S3 and GCS list 1,000 objects a request)…
const LIST_FROM: usize = 1000;
/// …unless it holds more objects than this many per path, or than LIST_MAX.
const LIST_PER_PATH: usize = 500;
const LIST_MAX: usize = 1_000_000;
/// How long a listing answers for the cache (other writers may add to it).
const LISTING_FRESH: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error(transparent)]
    Nix(#[from] nix::Error),
    #[error(transparent)]
    Upload(#[from] upload::Error),
    #[error(transparent)]
    Journal(#[from] journal::Error),
    #[error("{diagnosis}: {cause}")]
    Startup {
        diagnosis: &'static str,
        cause: cache::Error,
    },
    #[error("the cache's nix-cache-info says StoreDir {cache}, but this store is {ours}")]
    StoreDirMismatch { cache: String, ours: String },
    #[error("cannot open input {path}: {source}")]
    Input {
        path: String,
        source: std::io::Error,
    },
    #[error("reference {reference} failed: {reason}")]
    ReferenceFailed { reference: String, reason: String },
    #[error("reference {0} is not in the cache")]
    ReferenceMissing(String),
    #[error("interrupted")]
    Interrupted,
}

pub struct Config {
    pub cache: Cache,
    pub store_dir: StoreDir,
    pub keys: Vec<SecretKey>,
    pub compression: Compression,
    pub level: Option<i32>,
    pub jobs: usize,
    pub priority: u32,
    /// The durable record of accepted roots; None: nothing survives a crash.
    pub journal: Option<Arc<Mutex<Journal>>>,
    /// Roots the journal held at open, replayed first.
    pub pending: Vec<Pending>,
    /// Where `send` leaves paths when upload is away; polled while running.
    pub spool_dir: Option<PathBuf>,
    /// Attempts per root before it is reported failed (and kept for the next start).
    pub max_attempts: u32,
    /// Which paths may be pushed.
    pub filter: Filter,
    /// Also push the built outputs of each root's whole build closure.
    pub include_build_deps: bool,
    /// Counters, shared with whoever displays them.
    pub stats: Arc<Stats>,
}

/// Opens the journal in `state_dir`, returning it with what it still holds.
pub fn open_journal(
    state_dir: &std::path::Path,
) -> Result<(Arc<Mutex<Journal>>, Vec<Pending>), Error> {
    let (j, pending) = Journal::open(state_dir)?;
    Ok((Arc::new(Mutex::new(j)), pending))
}

/// Where paths come from.
pub enum Input {
    Stdin,
    File(tokio::fs::File),
    /// Opened read-write so that senders coming and going never cause EOF.
    Fifo(tokio::net::unix::pipe::Receiver),
}

impl Input {
    /// `-` is stdin; a FIFO is kept open; anything else is read to EOF.
    pub async fn open(path: &str) -> Result<Input, Error> {
        if path == "-" {
            return Ok(Input::Stdin);
        }
        let err = |source| Error::Input {
            path: path.to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_fifo() {
            let rx = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(path)
                .map_err(err)?;
            Ok(Input::Fifo(rx))
        } else {
            Ok(Input::File(tokio::fs::File::open(path).await.map_err(err)?))
        }
    }
}

#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub stop: CancellationToken,
}

/// Checks the cache before any work is accepted: reachable, readable, writable, and
/// made for this store (creates nix-cache-info when missing). Fails fast: few retries.
pub async fn prepare(cfg: &Config) -> Result<(), Error> {
    prepare_cache(&cfg.cache, cfg.store_dir.as_str(), cfg.priority).await
}

/// [`prepare`] for any cache: reachable, readable, writable, for `store_dir`.
pub async fn prepare_cache(cache: &Cache, store_dir: &str, priority: u32) -> Result<(), Error> {
    let probe = cache.probe()?;
    let explain = |e: cache::Error| match e.diagnosis() {
        Some(d) => Error::Startup {
            diagnosis: d,
            cause: e,
        },
        None => Error::Cache(e),
    };
    let ours = store_dir.to_string();
    match probe.get("nix-cache-info").await.map_err(explain)? {
        Some(text) => {
            let existing = CacheInfo::parse(&String::from_utf8_lossy(&text));
            if let Some(theirs) = existing.store_dir {
                if theirs != ours {
                    return Err(Error::StoreDirMismatch {
                        cache: theirs,
                        ours,
                    });
                }
            }
            // Prove we may write before accepting paths (a hidden, tiny object).
            probe
                .put(WRITE_CHECK, Bytes::from_static(b"narpipe\n"), "text/plain")
                .await
                .map_err(explain)?;
        }
        None => {
            let fresh = CacheInfo::new(&ours, priority).to_string();
            probe
                .create(
                    "nix-cache-info",
                    Bytes::from(fresh),
                    "text/x-nix-cache-info",
                )
                .await
                .map_err(explain)?;
        }
    }
    Ok(())
}

/// Written at start when nix-cache-info already exists, to check write access.
pub const WRITE_CHECK: &str = ".narpipe-write-check";

#[derive(Clone, Debug)]
enum Status {
    Pending,
    Done,
    Failed(Arc<str>),
}

/// The final status behind a watch (a task that vanished counts as failed).
async fn settled(rx: &mut watch::Receiver<Status>) -> Status {
    rx.wait_for(|s| !matches!(s, Status::Pending))
        .await
        .map(|s| s.clone())
        .unwrap_or(Status::Failed("abandoned".into()))
}

/// A path a task must see in the cache before writing its narinfo.
enum Dep {
    /// Being uploaded by a task of ours.
    Task(StorePath, watch::Receiver<Status>),
    /// Not known either way: checked in the cache before committing.
    Check(StorePath),
}

struct BoundedSet {
    set: HashSet<StorePath>,
    order: VecDeque<StorePath>,
}

impl BoundedSet {
    fn insert(&mut self, p: StorePath) {
        if self.set.insert(p.clone()) {
            self.order.push_back(p);
            if self.order.len() > KNOWN_PRESENT {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

struct State {
    present: BoundedSet,
    inflight: HashMap<StorePath, watch::Receiver<Status>>,
}

/// The cache's narinfos as listed at a moment.
struct Listing {
    hashes: HashSet<[u8; 20]>,
    at: Instant,
}

struct Shared {
    cfg: Config,
    /// A recent listing of the cache, if one was made (see [`Shared::consider_listing`]).
    listing: Mutex<Option<Listing>>,
    /// When a listing was last tried, made or not.
    listing_tried: Mutex<Option<Instant>>,
    nix: Nix,
    engine: Engine,
    jobs: Semaphore,
    checks: Semaphore,
    state: Mutex<State>,
    stats: Arc<Stats>,
    stop: CancellationToken,
}

impl Shared {
    fn show(&self, p: &StorePath) -> String {
        self.cfg.store_dir.display(p)
    }

    fn narinfo_key(p: &StorePath) -> String {
        format!("{}.narinfo", p.hash_part())
    }

    fn known_present(&self, p: &StorePath) -> bool {
        self.state.lock().unwrap().present.set.contains(p)
    }

    /// Known present in the cache, or under way.
    fn is_known(&self, p: &StorePath) -> bool {
        let state = self.state.lock().unwrap();
        state.present.set.contains(p) || state.inflight.contains_key(p)
    }

    /// Whether the cache has `p`'s narinfo (remembered once seen).
    async fn in_cache(&self, p: &StorePath) -> Result<bool, Error> {
        if let Some(found) = self.known_presence(p) {
            return Ok(found);
        }
        let _permit = self.checks.acquire().await.expect("never closed");
        let found = self.cfg.cache.exists(&Self::narinfo_key(p)).await?;
        if found {
            self.state.lock().unwrap().present.insert(p.clone());
        }
        Ok(found)
    }

    /// Whether `p` is in the cache, when that is known without asking: remembered as
    /// present, or answered by a fresh listing.
    fn known_presence(&self, p: &StorePath) -> Option<bool> {
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
    async fn consider_listing(&self, to_check: usize) {
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
        match self.cfg.cache.narinfo_hashes(limit).await {
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

    fn progress(&self, nar_size: u64) {
        self.stats.finished.fetch_add(1, Relaxed);
        self.stats.finished_bytes.fetch_add(nar_size, Relaxed);
    }

    /// Runs a journal operation off the async threads (it may fsync).
    async fn journal_op(
        &self,
        op: impl FnOnce(&mut Journal) -> Result<(), journal::Error> + Send + 'static,
    ) -> bool {
        let Some(j) = self.cfg.journal.clone() else {
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
                error!("state journal: {e}");
                false
            }
        }
    }

    /// Records roots as accepted (durably, when there is a journal).
    async fn journal_accept(&self, roots: &[StorePath]) -> bool {
        let paths: Vec<String> = roots.iter().map(|p| self.show(p)).collect();
        self.journal_op(move |j| j.accept(&paths)).await
    }

    async fn journal_retire(&self, path: String) {
        self.journal_op(move |j| j.retire(&path)).await;
    }

    async fn journal_fail(&self, path: String, reason: String) {
        self.journal_op(move |j| j.fail(&path, &reason)).await;
    }
}

/// What became of a root in one attempt.
enum RootOutcome {
    /// Its closure is in the cache.
    Done,
    /// It can never be uploaded (not valid in the store, garbage-collected): retire it.
    Gone(String),
    /// This attempt failed; try again later.
    Failed(String),
    /// Kept out by --include/--exclude: retire it, not a failure.
    Excluded,
    /// Uploads are under way; these paths must all end Done.
    Wait(Vec<(StorePath, watch::Receiver<Status>)>),
}

struct Outstanding {
    attempts: u32,
}

/// Delay before attempt `n + 1` (n ≥ 1): exponential from 1 s, capped, ±25 % jitter.
fn backoff(n: u32) -> Duration {
    let base = 1000u64
        .saturating_mul(1 << n.saturating_sub(1).min(6))
        .min(60_000);
    let jitter = fastrand::u64(0..=base / 2);
    Duration::from_millis(base - base / 4 + jitter)
}

/// Runs until the input ends (or `send --finish`, or `shutdown.drain`) and every
/// accepted path is in the cache or given up; `shutdown.stop` abandons work (it stays
/// in the journal).
pub async fn run(mut cfg: Config, input: Input, shutdown: Shutdown) -> Summary {
    let journal = std::mem::take(&mut cfg.pending);
    let spool_dir = cfg.spool_dir.clone();
    // Without threads nothing can be uploaded; failing to start them is out of resources.
    let engine = Engine::new(cfg.jobs).expect("cannot start the NAR threads");
    let shared = Arc::new(Shared {
        nix: Nix::new(cfg.store_dir.clone()),
        engine,
        listing: Mutex::new(None),
        listing_tried: Mutex::new(None),
        jobs: Semaphore::new(2 * cfg.jobs.max(1)),
        checks: Semaphore::new(CHECKS_IN_FLIGHT),
        state: Mutex::new(State {
            present: BoundedSet {
                set: HashSet::new(),
                order: VecDeque::new(),
            },
            inflight: HashMap::new(),
        }),
        stats: cfg.stats.clone(),
        stop: shutdown.stop.clone(),
        cfg,
    });
    let (tx, mut rx) = mpsc::channel::<Vec<StorePath>>(1024);
    let input_done = CancellationToken::new();
    let reader = tokio::spawn(read_input(
        input,
        shared.clone(),
        tx.clone(),
        shutdown.drain.clone(),
        input_done.clone(),
    ));
    let spooler = spool_dir.map(|dir| {
        tokio::spawn(watch_spool(
            dir,
            shared.clone(),
            tx.clone(),
            input_done.clone(),
        ))
    });
    drop(tx);

    let (done_tx, mut done_rx) = mpsc::channel::<(StorePath, Result<(), String>)>(1024);
    let mut outstanding: HashMap<StorePath, Outstanding> = HashMap::new();
    let mut retries: Vec<(tokio::time::Instant, StorePath)> = Vec::new();
    let mut batch: Vec<StorePath> = Vec::new();
    // The same paths as `batch`, to find one without a scan.
    let mut in_batch: HashSet<StorePath> = HashSet::new();
    let mut batch_deadline: Option<tokio::time::Instant> = None;
    let mut input_open = true;
    let stop = shutdown.stop.clone();

    // What an earlier run accepted and did not finish comes first.
    for p in journal {
        match shared.cfg.store_dir.parse(&p.path) {
            Ok(sp) => {
                if let Some(reason) = &p.failed {
                    info!("retrying {} (failed before: {reason})", p.path);
                } else {
                    info!("resuming {}", p.path);
                }
                batch.push(sp);
            }
            Err(e) => {
                warn!("dropping unreadable journal entry {:?}: {e}", p.path);
                shared.journal_retire(p.path.clone()).await;
            }
        }
    }
    if !batch.is_empty() {
        batch_deadline = Some(tokio::time::Instant::now());
    }

    let mut tasks = Tasks::default();
    loop {
        tasks.top_up(&shared);
        let queued = outstanding.len()
            + batch
                .iter()
                .filter(|p| !outstanding.contains_key(*p))
                .count();
        shared.stats.queue.store(queued as u64, Relaxed);
        if !input_open && outstanding.is_empty() && batch.is_empty() {
            break;
        }
        let next_retry = retries.iter().map(|(t, _)| *t).min();
        let mut flush = false;
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some((root, result)) = done_rx.recv() => {
                settle(&shared, &mut outstanding, &mut retries, root, result).await;
            }
            got = rx.recv(), if input_open => match got {
                Some(roots) => {
                    for r in roots {
                        if !outstanding.contains_key(&r) && in_batch.insert(r.clone()) {
                            batch.push(r);
                        }
                    }
                    if !batch.is_empty() {
                        batch_deadline.get_or_insert_with(|| tokio::time::Instant::now() + WINDOW);
                    }
                }
                None => input_open = false,
            },
            _ = tokio::time::sleep_until(next_retry.unwrap_or_else(tokio::time::Instant::now)), if next_retry.is_some() => {
                let now = tokio::time::Instant::now();
                retries.retain(|(t, p)| {
                    if *t <= now {
                        batch.push(p.clone());
                        false
                    } else {
                        true
                    }
                });
                flush = true;
            }
            _ = tokio::time::sleep_until(batch_deadline.unwrap_or_else(tokio::time::Instant::now)), if batch_deadline.is_some() => flush = true,
            // A task ended while others wait to start: start them.
            Some(_) = tasks.running.join_next(), if !tasks.waiting.is_empty() => {}
        }
        if batch.is_empty() {
            batch_deadline = None;
            continue;
        }
        if !(flush || batch.len() >= MAX_BATCH || !input_open) {
            continue;
        }
        batch_deadline = None;
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
        let roots = std::mem::take(&mut batch);
        in_batch.clear();
        for r in &roots {
            outstanding
                .entry(r.clone())
                .or_insert(Outstanding { attempts: 0 });
        }
        let asked: HashSet<StorePath> = roots.iter().cloned().collect();
        let outcomes = tokio::select! {
            o = process_batch(&shared, roots, &mut tasks) => o,
            _ = stop.cancelled() => break,
        };
        // Build-time dependencies (--include-build-deps) come back as roots of their
        // own: recorded and tracked like accepted ones, unless already under way.
        let mut extras = Vec::new();
        let mut outcomes_kept = Vec::with_capacity(outcomes.len());
        for (root, outcome) in outcomes {
            if !asked.contains(&root) {
                if outstanding.contains_key(&root) {
                    continue;
                }
                outstanding.insert(root.clone(), Outstanding { attempts: 0 });
                extras.push(root.clone());
            }
            outcomes_kept.push((root, outcome));
        }
        if !extras.is_empty() {
            shared.journal_accept(&extras).await;
        }
        for (root, outcome) in outcomes_kept {
            match outcome {
                RootOutcome::Done => {
                    settle(&shared, &mut outstanding, &mut retries, root, Ok(())).await
                }
                RootOutcome::Failed(reason) => {
                    settle(&shared, &mut outstanding, &mut retries, root, Err(reason)).await
                }
                RootOutcome::Excluded => {
                    outstanding.remove(&root);
                    shared.journal_retire(shared.show(&root)).await;
                }
                RootOutcome::Gone(reason) => {
                    shared.stats.failed.fetch_add(1, Relaxed);
                    error!("failed {}: {reason}", shared.show(&root));
                    outstanding.remove(&root);
                    shared.journal_retire(shared.show(&root)).await;
                }
                RootOutcome::Wait(targets) => {
                    let done_tx = done_tx.clone();
                    tokio::spawn(async move {
                        let mut result = Ok(());
                        for (path, mut rx) in targets {
                            if let Status::Failed(reason) = settled(&mut rx).await {
                                result = Err(format!("{path}: {reason}"));
                                break;
                            }
                        }
                        let _ = done_tx.send((root, result)).await;
                    });
                }
            }
        }
        while tasks.running.try_join_next().is_some() {}
    }
    reader.abort();
    if let Some(s) = spooler {
        s.abort();
    }
    let unfinished = outstanding.len() as u64;
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
    shared
        .cfg
        .cache
        .finish_cleanups(Duration::from_secs(5))
        .await;
    shared.stats.summary(unfinished)
}

/// A root's attempt ended: retire it, or schedule another attempt, or give up for now.
async fn settle(
    shared: &Shared,
    outstanding: &mut HashMap<StorePath, Outstanding>,
    retries: &mut Vec<(tokio::time::Instant, StorePath)>,
    root: StorePath,
    result: Result<(), String>,
) {
    let shown = shared.show(&root);
    match result {
        Ok(()) => {
            outstanding.remove(&root);
            shared.journal_retire(shown).await;
        }
        Err(reason) => {
            let max = shared.cfg.max_attempts.max(1);
            let entry = outstanding
                .entry(root.clone())
                .or_insert(Outstanding { attempts: 0 });
            entry.attempts += 1;
            if entry.attempts < max {
                let delay = backoff(entry.attempts);
                warn!(
                    "retrying {shown} in {:.1}s (attempt {} of {max} failed: {reason})",
                    delay.as_secs_f64(),
                    entry.attempts
                );
                retries.push((tokio::time::Instant::now() + delay, root));
            } else {
                outstanding.remove(&root);
                shared.stats.failed.fetch_add(1, Relaxed);
                let kept = if shared.cfg.journal.is_some() {
                    "; kept in the state dir, retried on the next start"
                } else {
                    ""
                };
                error!("failed {shown} after {max} attempts: {reason}{kept}");
                shared.journal_fail(shown, reason).await;
            }
        }
    }
}

async fn read_input(
    input: Input,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<StorePath>>,
    drain: CancellationToken,
    input_done: CancellationToken,
) {
    let _done = input_done.drop_guard();
    let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    match input {
        Input::Fifo(rx) => loop {
            tokio::select! {
                r = rx.readable() => if let Err(e) = r {
                    error!("reading the input pipe: {e}");
                    break;
                },
                _ = drain.cancelled() => {
                    // Take what senders already wrote, then stop.
                    while let Ok(n) = rx.try_read(&mut buf) {
                        if n == 0 { break; }
                        splitter.push(&buf[..n], &mut frames);
                    }
                    frames.extend(splitter.finish());
                    deliver(&shared, &mut frames, &tx).await;
                    return;
                }
            }
            match rx.try_read(&mut buf) {
                Ok(n) => splitter.push(&buf[..n], &mut frames),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    error!("reading the input pipe: {e}");
                    break;
                }
            }
            if !deliver(&shared, &mut frames, &tx).await {
                return;
            }
        },
        Input::Stdin => read_stream(tokio::io::stdin(), &shared, &tx, &drain, splitter, buf).await,
        Input::File(f) => read_stream(f, &shared, &tx, &drain, splitter, buf).await,
    }
}

async fn read_stream<R: AsyncRead + Unpin>(
    mut r: R,
    shared: &Shared,
    tx: &mpsc::Sender<Vec<StorePath>>,
    drain: &CancellationToken,
    mut splitter: LineSplitter,
    mut buf: Vec<u8>,
) {
    let mut frames = Vec::new();
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n,
            _ = drain.cancelled() => return,
        };
        match n {
            Ok(0) => break,
            Ok(n) => splitter.push(&buf[..n], &mut frames),
            Err(e) => {
                error!("reading input: {e}");
                break;
            }
        }
        if !deliver(shared, &mut frames, tx).await {
            return;
        }
    }
    frames.extend(splitter.finish());
    deliver(shared, &mut frames, tx).await;
}

/// Parses frames into store paths, records them as accepted, and passes them on.
/// Returns false once `!finish` was seen (stop reading) or the daemon stopped.
async fn deliver(
    shared: &Shared,
    frames: &mut Vec<Frame>,
    tx: &mpsc::Sender<Vec<StorePath>>,
) -> bool {
    let (roots, finish) = parse_frames(shared, frames.drain(..), true);
    if !roots.is_empty() {
        shared.journal_accept(&roots).await;
        if tx.send(roots).await.is_err() {
            return false;
        }
    }
    !finish
}

/// Store paths from frames; bad input is reported and counted. The flag says whether
/// `!finish` was among them (and commands are allowed at all).
fn parse_frames(
    shared: &Shared,
    frames: impl Iterator<Item = Frame>,
    commands: bool,
) -> (Vec<StorePath>, bool) {
    let mut roots = Vec::new();
    for frame in frames {
        let line = match frame {
            Frame::Line(l) => l,
            Frame::TooLong { prefix, len } => {
                shared.stats.rejected.fetch_add(1, Relaxed);
                warn!(
                    "rejected input line of {len} bytes starting \"{}\": longer than {} bytes",
                    pipe::escape(&prefix),
                    pipe::PIPE_BUF
                );
                continue;
            }
        };
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if line == pipe::FINISH && commands {
            return (roots, true);
        }
        if line.starts_with(b"!") {
            shared.stats.rejected.fetch_add(1, Relaxed);
            warn!("rejected input \"{}\": unknown command", pipe::escape(line));
            continue;
        }
        match resolve::resolve(line, &shared.cfg.store_dir) {
            Ok(p) => roots.push(p),
            Err(e) => {
                shared.stats.rejected.fetch_add(1, Relaxed);
                warn!("rejected {e}");
            }
        }
    }
    (roots, false)
}

const SPOOL_POLL: Duration = Duration::from_secs(1);

/// Picks up what `send` spooled while upload was away: at start, every second, and
/// once more when the input ends. A file is deleted only after its paths are recorded.
async fn watch_spool(
    dir: PathBuf,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<StorePath>>,
    input_done: CancellationToken,
) {
    loop {
        let files = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || spool::list(&dir))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        match files {
            Ok(files) => {
                for f in files {
                    let data = match tokio::fs::read(&f).await {
                        Ok(d) => d,
                        Err(e) => {
                            warn!("cannot read spool file {}: {e}", f.display());
                            continue;
                        }
                    };
                    let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
                    let mut frames = Vec::new();
                    splitter.push(&data, &mut frames);
                    frames.extend(splitter.finish());
                    let (roots, _) = parse_frames(&shared, frames.into_iter(), false);
                    info!("picked up {} paths spooled in {}", roots.len(), f.display());
                    if !roots.is_empty() {
                        if !shared.journal_accept(&roots).await {
                            continue; // keep the file: not recorded
                        }
                        if tx.send(roots).await.is_err() {
                            return;
                        }
                    }
                    if let Err(e) = tokio::fs::remove_file(&f).await {
                        warn!("cannot remove spool file {}: {e}", f.display());
                    }
                }
            }
            Err(e) => warn!("cannot list the spool {}: {e}", dir.display()),
        }
        if input_done.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(SPOOL_POLL) => {}
            _ = input_done.cancelled() => {}
        }
    }
}

/// Resolves a batch of roots to the paths the cache lacks, starts their tasks, and says
/// what each root now waits for.
async fn process_batch(
    shared: &Arc<Shared>,
    roots: Vec<StorePath>,
    tasks: &mut Tasks,
) -> Vec<(StorePath, RootOutcome)> {
    let mut outcomes = Vec::new();
    let (drvs, mut paths): (Vec<_>, Vec<_>) = roots.into_iter().partition(|p| p.is_derivation());
    if shared.cfg.include_build_deps {
        match build_deps(shared, &paths, &drvs).await {
            Ok(extra) => {
                let known: HashSet<StorePath> = paths.iter().cloned().collect();
                paths.extend(extra.into_iter().filter(|p| !known.contains(p)));
            }
            Err(e) => {
                let reason = format!("cannot list build-time dependencies: {e}");
                return drvs
                    .into_iter()
                    .chain(paths)
                    .map(|p| (p, RootOutcome::Failed(reason.clone())))
                    .collect();
            }
        }
    }

    // A root whose narinfo exists has its whole closure in the cache (the invariant
    // we keep, and that `nix copy` keeps): no need to ask Nix about it.
    let unknown = paths.iter().filter(|p| !shared.known_present(p)).count();
    shared.consider_listing(unknown).await;
    let mut missing = Vec::new();
    for (p, present) in presence(shared, paths).await {
        match present {
            Ok(true) => {
                shared.stats.skipped.fetch_add(1, Relaxed);
                info!("skipped {} (already in the cache)", shared.show(&p));
                outcomes.push((p, RootOutcome::Done));
            }
            Ok(false) => missing.push(p),
            Err(e) => outcomes.push((p, RootOutcome::Failed(e.to_string()))),
        }
    }
    let mut ask: Vec<StorePath> = missing.clone();
    ask.extend(drvs.iter().cloned());
    let mut valid_drvs = Vec::new();
    if !ask.is_empty() {
        match shared.nix.invalid(&ask).await {
            Ok(invalid) => {
                for p in invalid.iter() {
                    outcomes.push((
                        p.clone(),
                        RootOutcome::Gone(
                            "not a valid path in the store (not built, not registered, or garbage-collected)"
                                .into(),
                        ),
                    ));
                }
                missing.retain(|p| !invalid.contains(p));
                valid_drvs = drvs.into_iter().filter(|p| !invalid.contains(p)).collect();
            }
            Err(e) => {
                let reason = e.to_string();
                outcomes.extend(
                    ask.into_iter()
                        .map(|p| (p, RootOutcome::Failed(reason.clone()))),
                );
                return outcomes;
            }
        }
    }
    // The path roots, each waiting for itself (also when it is a .drv root's output).
    let path_roots = missing.clone();
    // For each .drv root, the outputs it waits for.
    let mut drv_targets: Vec<(StorePath, Vec<StorePath>)> = Vec::new();
    match drv_outputs(shared, &valid_drvs).await {
        Err(e) => {
            let reason = e.to_string();
            outcomes.extend(
                valid_drvs
                    .into_iter()
                    .map(|d| (d, RootOutcome::Failed(reason.clone()))),
            );
        }
        Ok(built) => {
            let all: Vec<StorePath> = built.iter().flat_map(|(_, o)| o.clone()).collect();
            let present: HashMap<StorePath, Result<bool, String>> = presence(shared, all)
                .await
                .into_iter()
                .map(|(p, r)| (p, r.map_err(|e| e.to_string())))
                .collect();
            for (drv, outs) in built {
                if outs.is_empty() {
                    outcomes.push((
                        drv,
                        RootOutcome::Gone("none of its outputs is built".into()),
                    ));
                    continue;
                }
                let mut absent = Vec::new();
                let mut failure = None;
                for o in outs {
                    match &present[&o] {
                        Ok(true) => {}
                        Ok(false) => absent.push(o),
                        Err(e) => failure = Some(e.clone()),
                    }
                }
                if let Some(reason) = failure {
                    outcomes.push((drv, RootOutcome::Failed(reason)));
                } else if absent.is_empty() {
                    shared.stats.skipped.fetch_add(1, Relaxed);
                    info!(
                        "skipped {} (its outputs are in the cache)",
                        shared.show(&drv)
                    );
                    outcomes.push((drv, RootOutcome::Done));
                } else {
                    missing.extend(absent.iter().cloned());
                    drv_targets.push((drv, absent));
                }
            }
        }
    }
    if missing.is_empty() {
        return outcomes;
    }
    missing.sort();
    missing.dedup();
    let infos = match plan(shared, missing).await {
        Ok(i) => i,
        Err(e) => {
            let reason = e.to_string();
            outcomes.extend(
                path_roots
                    .iter()
                    .map(|p| (p.clone(), RootOutcome::Failed(reason.clone()))),
            );
            outcomes.extend(
                drv_targets
                    .iter()
                    .map(|(d, _)| (d.clone(), RootOutcome::Failed(reason.clone()))),
            );
            return outcomes;
        }
    };
    let blocked = shared
        .cfg
        .filter
        .blocked(infos.iter().map(|i| (&i.path, i.references.as_slice())));
    let mut blocked_shown: Vec<_> = blocked.iter().collect();
    blocked_shown.sort();
    for (p, why) in blocked_shown {
        shared.stats.excluded.fetch_add(1, Relaxed);
        warn!("excluded {}: {why}", shared.show(p));
    }
    let infos: Vec<PathInfo> = infos
        .into_iter()
        .filter(|i| !blocked.contains_key(&i.path))
        .collect();
    let watches = spawn_closure(shared, infos, tasks);
    // A target with no watch finished (or failed) already: its narinfo decides.
    let wait_for = |targets: &[StorePath]| {
        if targets.iter().all(|t| blocked.contains_key(t)) {
            return RootOutcome::Excluded;
        }
        let mut waits = Vec::new();
        for t in targets.iter().filter(|t| !blocked.contains_key(*t)) {
            // Planned now, or under way since an earlier batch.
            let watch = watches
                .get(t)
                .cloned()
                .or_else(|| shared.state.lock().unwrap().inflight.get(t).cloned());
            match watch {
                Some(rx) => waits.push((t.clone(), rx)),
                None if shared.known_present(t) => {}
                None => {
                    return RootOutcome::Failed(format!(
                        "{} did not reach the cache",
                        shared.show(t)
                    ))
                }
            }
        }
        if waits.is_empty() {
            RootOutcome::Done
        } else {
            RootOutcome::Wait(waits)
        }
    };
    for p in &path_roots {
        outcomes.push((p.clone(), wait_for(std::slice::from_ref(p))));
    }
    for (drv, outs) in &drv_targets {
        outcomes.push((drv.clone(), wait_for(outs)));
    }
    outcomes
}

/// The built outputs of the build closures of `drvs` and of the derivers of `paths`.
/// They are uploaded as roots of their own.
async fn build_deps(
    shared: &Shared,
    paths: &[StorePath],
    drvs: &[StorePath],
) -> Result<Vec<StorePath>, Error> {
    let mut all_drvs: Vec<StorePath> = drvs.to_vec();
    if !paths.is_empty() {
        // Roots not valid in the store are reported later; ask only about valid ones.
        let invalid = shared.nix.invalid(paths).await?;
        let valid: Vec<StorePath> = paths
            .iter()
            .filter(|p| !invalid.contains(*p))
            .cloned()
            .collect();
        all_drvs.extend(shared.nix.derivers(&valid).await?.into_iter().flatten());
    }
    all_drvs.sort();
    all_drvs.dedup();
    let invalid = shared.nix.invalid(&all_drvs).await?;
    let known: Vec<StorePath> = all_drvs
        .into_iter()
        .filter(|d| !invalid.contains(d))
        .collect();
    if known.is_empty() {
        return Ok(Vec::new());
    }
    Ok(shared.nix.build_closure_outputs(&known).await?)
}

/// The built outputs of each valid derivation (two Nix calls for all of them);
/// unbuilt ones are reported.
async fn drv_outputs(
    shared: &Shared,
    drvs: &[StorePath],
) -> Result<Vec<(StorePath, Vec<StorePath>)>, Error> {
    if drvs.is_empty() {
        return Ok(Vec::new());
    }
    let mut outputs = shared.nix.outputs(drvs).await?;
    let all: Vec<StorePath> = outputs.values().flatten().cloned().collect();
    let invalid = shared.nix.invalid(&all).await?;
    Ok(drvs
        .iter()
        .map(|drv| {
            let outs = outputs.remove(drv).unwrap_or_default();
            let (unbuilt, built): (Vec<_>, Vec<_>) =
                outs.into_iter().partition(|o| invalid.contains(o));
            for o in unbuilt {
                warn!(
                    "output {} of {} is not built; not uploading it",
                    shared.show(&o),
                    shared.show(drv)
                );
            }
            (drv.clone(), built)
        })
        .collect())
}

/// Path info for every path that `roots` (valid, not in the cache) need uploaded: the
/// roots and, level by level, the references that are neither known (under way, or
/// known present) nor in the cache. Nix is asked only about paths not known yet, each
/// once, so planning costs work linear in the number of new paths; a reference found
/// in the cache ends its branch (its closure is there too, by the invariant).
async fn plan(shared: &Shared, roots: Vec<StorePath>) -> Result<Vec<PathInfo>, Error> {
    let mut seen: HashSet<StorePath> = HashSet::new();
    let mut frontier: Vec<StorePath> = roots
        .into_iter()
        .filter(|p| !shared.is_known(p) && seen.insert(p.clone()))
        .collect();
    let mut infos = Vec::new();
    let mut roots_level = true;
    while !frontier.is_empty() {
        if !roots_level {
            let mut absent = Vec::new();
            for (p, present) in presence(shared, frontier).await {
                if !present? {
                    absent.push(p);
                }
            }
            frontier = absent;
        }
        roots_level = false;
        let level = shared.nix.path_infos(&frontier).await?;
        let mut next = Vec::new();
        for info in &level {
            for r in &info.references {
                if *r != info.path && !shared.is_known(r) && seen.insert(r.clone()) {
                    next.push(r.clone());
                }
            }
        }
        infos.extend(level);
        frontier = next;
    }
    Ok(infos)
}

/// Whether each path's narinfo is in the cache, checked concurrently.
async fn presence(shared: &Shared, paths: Vec<StorePath>) -> Vec<(StorePath, Result<bool, Error>)> {
    let known: Vec<Option<bool>> = paths.iter().map(|p| shared.known_presence(p)).collect();
    // A local folder: the rest in one blocking call (a failure falls back to one by one).
    let ask: Vec<String> = paths
        .iter()
        .zip(&known)
        .filter(|(_, k)| k.is_none())
        .map(|(p, _)| Shared::narinfo_key(p))
        .collect();
    if let Some(Ok(found)) = shared.cfg.cache.exist_local(ask).await {
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

/// Path tasks: those running, and those planned that wait to start.
#[derive(Default)]
struct Tasks {
    running: JoinSet<()>,
    /// In start order: references before referrers, so a running task never waits
    /// for one that has not started, and tasks can be started a few at a time.
    waiting: VecDeque<Waiting>,
}

/// A planned path whose task has not started.
struct Waiting {
    info: PathInfo,
    deps: Vec<Dep>,
    tx: watch::Sender<Status>,
}

impl Tasks {
    fn len(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// Starts waiting tasks while fewer than [`MAX_TASKS`] run: a waiting path costs
    /// its path info, a running one its whole task.
    fn top_up(&mut self, shared: &Arc<Shared>) {
        while self.running.try_join_next().is_some() {}
        while self.running.len() < MAX_TASKS {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.running
                .spawn(path_task(shared.clone(), w.info, w.deps, w.tx));
        }
    }
}

/// Plans a task for every path of the closure that is neither known present nor
/// under way; returns a status watch for each path under way. Every new path gets its
/// watch before any task starts, so a task can wait on any reference. NARs start
/// largest first, which keeps both cores busy to the end (the narinfos still commit in
/// dependency order, through those waits); when more than [`MAX_TASKS`] would run, the
/// rest wait and start references first (see [`start_order`]).
fn spawn_closure(
    shared: &Arc<Shared>,
    infos: Vec<PathInfo>,
    tasks: &mut Tasks,
) -> HashMap<StorePath, watch::Receiver<Status>> {
    let mut state = shared.state.lock().unwrap();
    let mut new: Vec<(PathInfo, watch::Sender<Status>)> = Vec::new();
    let mut watches = HashMap::new();
    for info in infos {
        if state.present.set.contains(&info.path) {
            continue;
        }
        if let Some(rx) = state.inflight.get(&info.path) {
            watches.insert(info.path.clone(), rx.clone());
            continue;
        }
        let (tx, rx) = watch::channel(Status::Pending);
        state.inflight.insert(info.path.clone(), rx.clone());
        watches.insert(info.path.clone(), rx);
        new.push((info, tx));
    }
    let order = if tasks.len() + new.len() <= MAX_TASKS {
        // All start now: any order is safe, and largest first keeps the cores busy.
        let mut order: Vec<usize> = (0..new.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(new[i].0.nar_size));
        order
    } else {
        start_order(&new)
    };
    shared.stats.planned.fetch_add(new.len() as u64, Relaxed);
    shared
        .stats
        .planned_bytes
        .fetch_add(new.iter().map(|(i, _)| i.nar_size).sum(), Relaxed);
    let mut new: Vec<Option<(PathInfo, watch::Sender<Status>)>> =
        new.into_iter().map(Some).collect();
    for i in order {
        let (info, tx) = new[i].take().expect("each index once");
        let deps = info
            .references
            .iter()
            .filter(|r| **r != info.path && !state.present.set.contains(r))
            .map(|r| match state.inflight.get(r) {
                Some(rx) => Dep::Task(r.clone(), rx.clone()),
                None => Dep::Check(r.clone()),
            })
            .collect();
        tasks.waiting.push_back(Waiting { info, deps, tx });
    }
    drop(state);
    tasks.top_up(shared);
    watches
}

/// Indices of `new` in start order: by level (a path's is above all of its references'
/// in the set), then largest NAR first.
fn start_order(new: &[(PathInfo, watch::Sender<Status>)]) -> Vec<usize> {
    let index: HashMap<&StorePath, usize> = new
        .iter()
        .enumerate()
        .map(|(i, (info, _))| (&info.path, i))
        .collect();
    let mut referrers: Vec<Vec<usize>> = vec![Vec::new(); new.len()];
    let mut unplaced = vec![0usize; new.len()];
    for (i, (info, _)) in new.iter().enumerate() {
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
    order.sort_by_key(|&i| (level[i], std::cmp::Reverse(new[i].0.nar_size)));
    order
}

enum Outcome {
    Uploaded {
        nar: u64,
        file: u64,
        compression: Compression,
    },
}

async fn path_task(shared: Arc<Shared>, info: PathInfo, deps: Vec<Dep>, tx: watch::Sender<Status>) {
    let start = Instant::now();
    let shown = shared.show(&info.path);
    let result = tokio::select! {
        r = upload_one(&shared, &info, deps) => r,
        _ = shared.stop.cancelled() => Err(Error::Interrupted),
    };
    shared
        .stats
        .upload_micros
        .fetch_add(start.elapsed().as_micros() as u64, Relaxed);
    // Progress counts a path when its NAR is done (or found present): see upload_one.
    // A failure before that still completes its share of the progress.
    if let Err(e) = &result {
        if !matches!(
            e,
            Error::Interrupted | Error::ReferenceFailed { .. } | Error::ReferenceMissing(_)
        ) {
            shared.progress(info.nar_size);
        }
    }
    let status = match &result {
        Ok(Outcome::Uploaded {
            nar,
            file,
            compression,
        }) => {
            shared.stats.uploaded.fetch_add(1, Relaxed);
            shared.stats.nar_bytes.fetch_add(*nar, Relaxed);
            shared.stats.file_bytes.fetch_add(*file, Relaxed);
            info!(
                "uploaded {shown} ({} NAR, {} {compression}, {:.2}s)",
                human(*nar),
                human(*file),
                start.elapsed().as_secs_f64()
            );
            Status::Done
        }
        Err(Error::Interrupted) => Status::Failed("interrupted".into()),
        Err(e) => {
            shared.stats.errors.fetch_add(1, Relaxed);
            error!("failed {shown}: {e}");
            Status::Failed(e.to_string().into())
        }
    };
    {
        let mut state = shared.state.lock().unwrap();
        state.inflight.remove(&info.path);
        if matches!(status, Status::Done) {
            state.present.insert(info.path.clone());
        }
    }
    let _ = tx.send(status);
}

/// Uploads a path that planning found missing from the cache (not asked again: a
/// concurrent writer's copy would be the same bytes).
async fn upload_one(shared: &Shared, info: &PathInfo, deps: Vec<Dep>) -> Result<Outcome, Error> {
    let cfg = &shared.cfg;
    let nar = {
        let _permit = shared.jobs.acquire().await.expect("never closed");
        // Boxed: its state is allocated only once the upload starts, so the many
        // tasks still waiting for a permit stay small.
        Box::pin(upload::upload_nar(
            &shared.engine,
            &cfg.cache,
            &cfg.store_dir,
            info,
            cfg.compression,
            cfg.level,
        ))
        .await?
    };
    // Progress follows the NARs; the narinfo may still wait for its references.
    shared.progress(info.nar_size);
    for dep in deps {
        match dep {
            Dep::Task(r, mut rx) => {
                if let Status::Failed(reason) = settled(&mut rx).await {
                    return Err(Error::ReferenceFailed {
                        reference: shared.show(&r),
                        reason: reason.to_string(),
                    });
                }
            }
            Dep::Check(r) => {
                if !shared.in_cache(&r).await? {
                    return Err(Error::ReferenceMissing(shared.show(&r)));
                }
            }
        }
    }
    let narinfo = upload::narinfo(&cfg.store_dir, info, &nar, &cfg.keys);
    cfg.cache
        .put(
            &Shared::narinfo_key(&info.path),
            Bytes::from(narinfo.to_string()),
            "text/x-nix-narinfo",
        )
        .await?;
    Ok(Outcome::Uploaded {
        nar: info.nar_size,
        file: nar.file_size,
        compression: nar.compression,
    })
}
