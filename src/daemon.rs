//! The uploader: read store paths, resolve closures, upload what the cache lacks.
//!
//! ```text
//! input ─▶ reader ─(bounded)─▶ batcher ─▶ nix (batched) ─▶ one task per missing path
//!  FIFO/stdin/file  lines→paths   50 ms window   validity, .drv outputs, closure
//! ```
//! A path task uploads its NAR under the `--jobs` limit, then waits until every
//! reference's narinfo is in the cache, then writes its own narinfo: at no moment does
//! the cache hold a narinfo whose NAR or references are missing. Tasks are started in
//! dependency order. One path's failure is logged and counted and fails only the paths
//! that depend on it.
//!
//! [`Shutdown`] is how the caller stops it: `drain` stops reading (after what is already
//! in a pipe) and lets queued work finish; `stop` abandons work promptly.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
use crate::nix::{self, Nix, PathInfo};
use crate::pipe::{self, Frame, LineSplitter};
use crate::resolve;
use crate::signing::SecretKey;
use crate::store_path::{StoreDir, StorePath};
use crate::upload;

/// How long arriving paths are gathered before their closures are resolved together.
const WINDOW: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 2000;
/// Concurrent existence checks against the cache.
const CHECKS_IN_FLIGHT: usize = 64;
/// Paths remembered as present in the cache.
const KNOWN_PRESENT: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error(transparent)]
    Nix(#[from] nix::Error),
    #[error(transparent)]
    Upload(#[from] upload::Error),
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

#[derive(Default)]
struct Stats {
    uploaded: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    nar_bytes: AtomicU64,
    file_bytes: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub uploaded: u64,
    pub skipped: u64,
    pub failed: u64,
    /// Input lines that were not store paths.
    pub rejected: u64,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    /// Paths abandoned by a stop.
    pub unfinished: u64,
    pub seconds: f64,
}

impl Summary {
    pub fn all_ok(&self) -> bool {
        self.failed == 0 && self.rejected == 0 && self.unfinished == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} uploaded ({} NAR, {} compressed), {} already in the cache, {} failed, {} rejected inputs",
            self.uploaded,
            human(self.nar_bytes),
            human(self.file_bytes),
            self.skipped,
            self.failed,
            self.rejected,
        )?;
        if self.unfinished > 0 {
            write!(f, ", {} unfinished", self.unfinished)?;
        }
        write!(f, " in {:.2}s", self.seconds)
    }
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Checks the cache before any work is accepted: reachable, readable, writable, and
/// made for this store (creates nix-cache-info when missing). Fails fast: few retries.
pub async fn prepare(cfg: &Config) -> Result<(), Error> {
    let probe = cfg.cache.probe()?;
    let explain = |e: cache::Error| match e.diagnosis() {
        Some(d) => Error::Startup {
            diagnosis: d,
            cause: e,
        },
        None => Error::Cache(e),
    };
    let ours = cfg.store_dir.as_str().to_string();
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
            let fresh = CacheInfo::new(&ours, cfg.priority).to_string();
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

enum Item {
    Root(StorePath),
    Finish,
}

#[derive(Clone, Debug)]
enum Status {
    Pending,
    Done,
    Failed(Arc<str>),
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

struct Shared {
    cfg: Config,
    nix: Nix,
    jobs: Semaphore,
    checks: Semaphore,
    state: Mutex<State>,
    stats: Stats,
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

    /// Whether the cache has `p`'s narinfo (remembered once seen).
    async fn in_cache(&self, p: &StorePath) -> Result<bool, Error> {
        if self.known_present(p) {
            return Ok(true);
        }
        let _permit = self.checks.acquire().await.expect("never closed");
        let found = self.cfg.cache.exists(&Self::narinfo_key(p)).await?;
        if found {
            self.state.lock().unwrap().present.insert(p.clone());
        }
        Ok(found)
    }

    fn fail_root(&self, p: &StorePath, reason: &str) {
        self.stats.failed.fetch_add(1, Relaxed);
        error!("failed {}: {reason}", self.show(p));
    }
}

/// Runs until the input ends, `!finish` arrives, or `shutdown` says so.
pub async fn run(cfg: Config, input: Input, shutdown: Shutdown) -> Summary {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        nix: Nix::new(cfg.store_dir.clone()),
        jobs: Semaphore::new(cfg.jobs.max(1)),
        checks: Semaphore::new(CHECKS_IN_FLIGHT),
        state: Mutex::new(State {
            present: BoundedSet {
                set: HashSet::new(),
                order: VecDeque::new(),
            },
            inflight: HashMap::new(),
        }),
        stats: Stats::default(),
        stop: shutdown.stop.clone(),
        cfg,
    });
    let (tx, mut rx) = mpsc::channel::<Item>(4096);
    let reader = tokio::spawn(read_input(
        input,
        shared.clone(),
        tx,
        shutdown.drain.clone(),
    ));

    let mut tasks = JoinSet::new();
    let stop = shutdown.stop.clone();
    let mut reading = true;
    while reading {
        let first = tokio::select! {
            it = rx.recv() => it,
            _ = stop.cancelled() => break,
        };
        let mut batch = Vec::new();
        match first {
            Some(Item::Root(p)) => batch.push(p),
            Some(Item::Finish) | None => reading = false,
        }
        let deadline = tokio::time::Instant::now() + WINDOW;
        while reading && batch.len() < MAX_BATCH {
            tokio::select! {
                it = rx.recv() => match it {
                    Some(Item::Root(p)) => batch.push(p),
                    Some(Item::Finish) | None => reading = false,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        tokio::select! {
            _ = process_batch(&shared, batch, &mut tasks) => {}
            _ = stop.cancelled() => break,
        }
        while tasks.try_join_next().is_some() {}
    }
    reader.abort();

    let mut unfinished = 0;
    loop {
        tokio::select! {
            r = tasks.join_next() => if r.is_none() { break },
            _ = stop.cancelled() => {
                unfinished = tasks.len() as u64;
                tasks.shutdown().await;
                break;
            }
        }
    }
    shared
        .cfg
        .cache
        .finish_cleanups(Duration::from_secs(5))
        .await;
    let s = &shared.stats;
    Summary {
        uploaded: s.uploaded.load(Relaxed),
        skipped: s.skipped.load(Relaxed),
        failed: s.failed.load(Relaxed),
        rejected: s.rejected.load(Relaxed),
        nar_bytes: s.nar_bytes.load(Relaxed),
        file_bytes: s.file_bytes.load(Relaxed),
        unfinished,
        seconds: start.elapsed().as_secs_f64(),
    }
}

async fn read_input(
    input: Input,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Item>,
    drain: CancellationToken,
) {
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
    tx: &mpsc::Sender<Item>,
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

/// Turns frames into items; false once `!finish` was seen (stop reading).
async fn deliver(shared: &Shared, frames: &mut Vec<Frame>, tx: &mpsc::Sender<Item>) -> bool {
    for frame in frames.drain(..) {
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
        if line == pipe::FINISH {
            let _ = tx.send(Item::Finish).await;
            return false;
        }
        if line.starts_with(b"!") {
            shared.stats.rejected.fetch_add(1, Relaxed);
            warn!("rejected input \"{}\": unknown command", pipe::escape(line));
            continue;
        }
        match resolve::resolve(line, &shared.cfg.store_dir) {
            Ok(p) => {
                if tx.send(Item::Root(p)).await.is_err() {
                    return false;
                }
            }
            Err(e) => {
                shared.stats.rejected.fetch_add(1, Relaxed);
                warn!("rejected {e}");
            }
        }
    }
    true
}

/// Resolves a batch of roots to the paths the cache lacks and starts their tasks.
async fn process_batch(shared: &Arc<Shared>, roots: Vec<StorePath>, tasks: &mut JoinSet<()>) {
    let mut seen = HashSet::new();
    let roots: Vec<StorePath> = roots
        .into_iter()
        .filter(|p| seen.insert(p.clone()))
        .collect();
    let (drvs, paths): (Vec<_>, Vec<_>) = roots.into_iter().partition(|p| p.is_derivation());

    // A root whose narinfo exists has its whole closure in the cache (the invariant
    // we keep, and that `nix copy` keeps): no need to ask Nix about it.
    let mut missing = absent_roots(shared, paths).await;
    let mut valid_drvs = Vec::new();
    if !missing.is_empty() || !drvs.is_empty() {
        let mut ask: Vec<StorePath> = missing.clone();
        ask.extend(drvs.iter().cloned());
        match shared.nix.invalid(&ask).await {
            Ok(invalid) => {
                for p in &invalid {
                    shared.fail_root(
                        p,
                        "not a valid path in the store (not built, not registered, or garbage-collected)",
                    );
                }
                missing.retain(|p| !invalid.contains(p));
                valid_drvs = drvs.into_iter().filter(|p| !invalid.contains(p)).collect();
            }
            Err(e) => {
                for p in ask {
                    shared.fail_root(&p, &e.to_string());
                }
                return;
            }
        }
    }
    if !valid_drvs.is_empty() {
        match drv_outputs(shared, &valid_drvs).await {
            Ok(outs) => missing.extend(absent_roots(shared, outs).await),
            Err(e) => {
                for d in &valid_drvs {
                    shared.fail_root(d, &e.to_string());
                }
            }
        }
    }
    if missing.is_empty() {
        return;
    }
    let infos = match shared.nix.closure(&missing).await {
        Ok(i) => i,
        Err(e) => {
            for p in &missing {
                shared.fail_root(p, &e.to_string());
            }
            return;
        }
    };
    spawn_in_dependency_order(shared, infos, tasks);
}

/// The built outputs of valid derivations; unbuilt ones are reported.
async fn drv_outputs(shared: &Shared, drvs: &[StorePath]) -> Result<Vec<StorePath>, Error> {
    let outs = shared.nix.outputs(drvs).await?;
    let invalid = shared.nix.invalid(&outs).await?;
    for o in &invalid {
        shared.fail_root(o, "output of a submitted .drv is not built");
    }
    Ok(outs.into_iter().filter(|o| !invalid.contains(o)).collect())
}

async fn absent_roots(shared: &Shared, roots: Vec<StorePath>) -> Vec<StorePath> {
    let checks = roots.into_iter().map(|p| async move {
        match shared.in_cache(&p).await {
            Ok(true) => {
                shared.stats.skipped.fetch_add(1, Relaxed);
                info!("skipped {} (already in the cache)", shared.show(&p));
                None
            }
            Ok(false) => Some(p),
            Err(e) => {
                shared.fail_root(&p, &e.to_string());
                None
            }
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn spawn_in_dependency_order(shared: &Arc<Shared>, infos: Vec<PathInfo>, tasks: &mut JoinSet<()>) {
    let by_path: HashMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let mut order = Vec::with_capacity(by_path.len());
    let mut visited = HashSet::new();
    let mut keys: Vec<&StorePath> = by_path.keys().collect();
    keys.sort();
    for root in keys {
        // Iterative post-order DFS: references before referrers.
        let mut stack = vec![(root, false)];
        while let Some((p, expanded)) = stack.pop() {
            if expanded {
                order.push(p.clone());
                continue;
            }
            if !visited.insert(p) {
                continue;
            }
            stack.push((p, true));
            for r in &by_path[p].references {
                if r != p && by_path.contains_key(r) && !visited.contains(r) {
                    stack.push((r, false));
                }
            }
        }
    }
    let mut state = shared.state.lock().unwrap();
    for p in order {
        if state.present.set.contains(&p) || state.inflight.contains_key(&p) {
            continue;
        }
        let info = by_path[&p].clone();
        let deps = info
            .references
            .iter()
            .filter(|r| **r != p && !state.present.set.contains(r))
            .map(|r| match state.inflight.get(r) {
                Some(rx) => Dep::Task(r.clone(), rx.clone()),
                None => Dep::Check(r.clone()),
            })
            .collect();
        let (tx, rx) = watch::channel(Status::Pending);
        state.inflight.insert(p, rx);
        tasks.spawn(path_task(shared.clone(), info, deps, tx));
    }
}

enum Outcome {
    Skipped,
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
    let status = match &result {
        Ok(Outcome::Skipped) => {
            shared.stats.skipped.fetch_add(1, Relaxed);
            info!("skipped {shown} (already in the cache)");
            Status::Done
        }
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
            shared.stats.failed.fetch_add(1, Relaxed);
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

async fn upload_one(shared: &Shared, info: &PathInfo, deps: Vec<Dep>) -> Result<Outcome, Error> {
    if shared.in_cache(&info.path).await? {
        return Ok(Outcome::Skipped);
    }
    let cfg = &shared.cfg;
    let nar = {
        let _permit = shared.jobs.acquire().await.expect("never closed");
        upload::upload_nar(&cfg.cache, &cfg.store_dir, info, cfg.compression, cfg.level).await?
    };
    for dep in deps {
        match dep {
            Dep::Task(r, mut rx) => {
                let status = rx
                    .wait_for(|s| !matches!(s, Status::Pending))
                    .await
                    .map(|s| s.clone())
                    .unwrap_or(Status::Failed("abandoned".into()));
                if let Status::Failed(reason) = status {
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
