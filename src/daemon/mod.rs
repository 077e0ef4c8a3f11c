//! The uploader: read store paths, resolve closures, upload what the cache lacks.
//!
//! ```text
//! input ──▶ accept ──(bounded)──▶ batch ─▶ plan ─────────▶ tasks ─▶ path ──▶ retry
//! FIFO,     queue     50 ms window         presence,       one per   NAR, refs,  retire,
//! stdin,    (durable)  or 2,000 roots      validity, .drv  missing   sign,       back off,
//! spool                                    outputs, new    path      narinfo     give up
//!                                          paths by level
//! ```
//! One module per stage: `input` reads lines (what they mean is `lines`' business) into
//! store paths, `accept` records them in the durable [`Queue`] before anything else
//! happens to them, `batch` gathers them into batches, `plan` (with `presence`, and
//! `outputs` for `.drv` roots) turns a batch into the paths the cache lacks, `tasks`
//! starts one task per path in a safe order, `path` is one path's whole life (its NAR
//! made and written by `stream`), and `retry` settles each root: retired when its
//! closure is in the cache or can never be, retried with backoff, or reported and kept
//! for the next start. This module wires the stages together, one pipeline per cache.
//! At no moment does the cache hold a narinfo whose NAR or references are missing; one
//! path's failure fails only the paths that depend on it.
//!
//! [`Shutdown`] is how the caller stops it: `drain` stops reading (after what is already
//! in a pipe) and lets queued work finish; `stop` abandons work promptly.

mod accept;
mod batch;
mod input;
mod lines;
mod outputs;
mod path;
mod plan;
mod presence;
mod realise;
mod retry;
mod share;
mod stream;
mod tasks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cache::{self, Cache};
use crate::compress::Compression;
use crate::engine::Engine;
use crate::filter::Filter;
use crate::nix::{self, Nix};
use crate::queue::{self, Pending, Queue};
use crate::signing::SecretKey;
use crate::stats::Stats;
use crate::store_path::{StoreDir, StorePath};
use crate::upstream::Upstream;

pub use crate::stats::Summary;
pub use accept::open_queue;
pub use input::Input;
use presence::{BoundedSet, Listing, CHECKS_IN_FLIGHT};
use tasks::Watch;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error(transparent)]
    Nix(#[from] nix::Error),
    #[error(transparent)]
    Queue(#[from] queue::Error),
    #[error("a start-up task failed: {0}")]
    Task(String),
    #[error("cannot open input {path}: {cause}")]
    Input { path: String, cause: std::io::Error },
}

pub struct Config {
    /// Where paths go: each NAR is made once and written to every cache that lacks
    /// it; each cache has its own presence, retries and counts.
    pub caches: Vec<Cache>,
    pub store_dir: StoreDir,
    pub keys: Vec<SecretKey>,
    pub compression: Compression,
    pub level: Option<i32>,
    pub jobs: usize,
    pub priority: u32,
    /// The durable record of accepted roots; None: nothing survives a crash.
    pub queue: Option<Arc<Mutex<Queue>>>,
    /// Roots the queue held at open, replayed first.
    pub pending: Vec<Pending>,
    /// Where `send` leaves paths when upload is away; polled while running.
    pub spool_dir: Option<PathBuf>,
    /// Attempts per root before it is reported failed (and kept for the next start).
    pub max_attempts: u32,
    /// Which paths may be pushed.
    pub filter: Filter,
    /// What upstream serves is not pushed.
    pub upstream: Upstream,
    /// Also push the built outputs of each root's whole build closure.
    pub include_build_deps: bool,
    /// Write `<hash>.ls`, the NAR's listing, beside each narinfo (Nix's
    /// `write-nar-listing`).
    pub write_nar_listing: bool,
    /// Nix's log directory, to upload each pushed path's build log from; None: no logs.
    pub upload_logs: Option<PathBuf>,
    /// Write the realisations of content-addressed outputs after their narinfos.
    pub write_realisations: bool,
    /// Counters, one per cache (in the order of `caches`), shared with whoever
    /// displays them. Input lines rejected are counted in the first.
    pub stats: Vec<Arc<Stats>>,
}

#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub stop: CancellationToken,
}

/// Checks the cache before any work is accepted (see [`Cache::prepare`]), and that the
/// upstream caches answer.
///
/// With several caches, one that cannot be reached now is not fatal (the others are
/// not held up): it is reported, and prepared again before its pipeline plans paths
/// for it; they wait, recorded, until it answers.
pub async fn prepare(cfg: &Config) -> Result<(), Error> {
    for cache in &cfg.caches {
        match cache.prepare(cfg.store_dir.as_str(), cfg.priority).await {
            Ok(()) => {}
            Err(e) if cfg.caches.len() > 1 && e.unreachable() => log::warn!(
                "{e}: uploads to {} wait until it answers; the other caches go on",
                cache.url()
            ),
            Err(e) => return Err(e.into()),
        }
    }
    for url in cfg.upstream.check().await? {
        log::warn!("upstream {url} has no nix-cache-info: is it a binary cache?");
    }
    Ok(())
}

struct State {
    /// Known to be in our cache.
    present: BoundedSet,
    /// Known to be served upstream (see [`Upstream`]): not pushed, like present ones.
    upstream: BoundedSet,
    inflight: HashMap<StorePath, Watch>,
}

impl State {
    /// The path as held here when it is known present, served upstream, or under way.
    fn known(&self, p: &StorePath) -> Option<&StorePath> {
        self.present
            .get(p)
            .or_else(|| self.upstream.get(p))
            .or_else(|| self.inflight.get_key_value(p).map(|(k, _)| k))
    }

    /// In our cache or upstream: nothing to do for it, and referrers may rely on it.
    fn satisfied(&self, p: &StorePath) -> bool {
        self.present.contains(p) || self.upstream.contains(p)
    }
}

/// One cache's pipeline (see [`run`]); what is not about its cache is shared with the
/// others.
struct Shared {
    cfg: Arc<Config>,
    /// This pipeline's cache, `cfg.caches[which]`.
    cache: Cache,
    which: usize,
    /// NARs made once for several caches; None with one cache.
    share: Option<Arc<share::NarShare>>,
    /// A recent listing of the cache, if one was made (see [`Shared::consider_listing`]).
    listing: Mutex<Option<Listing>>,
    /// When a listing was last tried, made or not.
    listing_tried: Mutex<Option<Instant>>,
    nix: Nix,
    engine: Arc<Engine>,
    jobs: Arc<Semaphore>,
    checks: Semaphore,
    state: Mutex<State>,
    /// Derivations whose build log was uploaded (their other outputs need not again).
    logs_sent: Mutex<BoundedSet>,
    /// Where realisations are asked for, if they are written.
    realisations: Option<Arc<realise::Realisations>>,
    /// Derivations whose realisations a path task could not write: roots to plan.
    owed: mpsc::Sender<StorePath>,
    stats: Arc<Stats>,
    /// Which rejected input lines are shown (see [`lines::RejectLog`]); the first
    /// pipeline reads the input.
    rejects: Mutex<lines::RejectLog>,
    stop: CancellationToken,
}

impl Shared {
    fn show(&self, p: &StorePath) -> String {
        self.cfg.store_dir.display(p)
    }

    /// " to URL" with several caches, for messages about a path; nothing with one.
    fn to_cache(&self) -> String {
        if self.cfg.caches.len() > 1 {
            format!(" to {}", self.cache.url())
        } else {
            String::new()
        }
    }

    /// How the durable queue names this pipeline's cache.
    fn cache_key(&self) -> &str {
        self.cache.url()
    }

    /// Makes `drv` a root, recorded like an accepted one: planned, its outputs are
    /// found in the cache and its realisations written, and it is retried until they
    /// are (kept in the queue, also across restarts, until then or until reported).
    async fn owe_realisations(&self, drv: &StorePath) {
        self.journal_accept(std::slice::from_ref(drv)).await;
        let _ = self.owed.send(drv.clone()).await;
    }
}

/// Runs until the input ends (or `send --finish`, or `shutdown.drain`) and every
/// accepted path is in every cache or given up; `shutdown.stop` abandons work (it
/// stays in the queue). Returns the run's summary, all caches together (with several,
/// each cache's own is logged).
///
/// Each cache has a pipeline of its own (batching, planning, tasks, retries), fed the
/// same roots: a cache that is down only holds up its own pipeline. They share the
/// NAR threads, the upload slots and Nix, and a NAR that several pipelines need at
/// once is made once and written to each (see [`share`]).
pub async fn run(mut cfg: Config, input: Input, shutdown: Shutdown) -> Summary {
    let pending = std::mem::take(&mut cfg.pending);
    let spool_dir = cfg.spool_dir.clone();
    let cfg = Arc::new(cfg);
    // Without threads nothing can be uploaded; failing to start them is out of resources.
    let engine = Arc::new(Engine::new(cfg.jobs).expect("cannot start the NAR threads"));
    let jobs = Arc::new(Semaphore::new(2 * cfg.jobs.max(1)));
    let realisations = cfg.write_realisations.then(|| {
        Arc::new(realise::Realisations::start(Nix::new(
            cfg.store_dir.clone(),
        )))
    });
    let share = (cfg.caches.len() > 1).then(|| Arc::new(share::NarShare::new(cfg.caches.len())));
    let mut owed_rxs = Vec::new();
    let pipelines: Vec<Arc<Shared>> = cfg
        .caches
        .iter()
        .enumerate()
        .map(|(which, cache)| {
            let (owed, owed_rx) = mpsc::channel::<StorePath>(1024);
            owed_rxs.push(owed_rx);
            Arc::new(Shared {
                cfg: cfg.clone(),
                cache: cache.clone(),
                which,
                share: share.clone(),
                nix: Nix::new(cfg.store_dir.clone()),
                engine: engine.clone(),
                listing: Mutex::new(None),
                listing_tried: Mutex::new(None),
                jobs: jobs.clone(),
                checks: Semaphore::new(CHECKS_IN_FLIGHT),
                state: Mutex::new(State {
                    present: BoundedSet::default(),
                    upstream: BoundedSet::default(),
                    inflight: HashMap::new(),
                }),
                logs_sent: Mutex::new(BoundedSet::default()),
                realisations: realisations.clone(),
                owed,
                stats: cfg.stats[which].clone(),
                rejects: Mutex::new(lines::RejectLog::default()),
                stop: shutdown.stop.clone(),
            })
        })
        .collect();
    let first = pipelines[0].clone();
    let (tx, mut rx) = mpsc::channel::<Vec<StorePath>>(1024);
    let input_done = CancellationToken::new();
    let reader = tokio::spawn(input::read(
        input,
        first.clone(),
        tx.clone(),
        shutdown.drain.clone(),
        input_done.clone(),
    ));
    let spooler = spool_dir.map(|dir| {
        tokio::spawn(input::watch_spool(
            dir,
            first.clone(),
            tx.clone(),
            input_done.clone(),
        ))
    });
    drop(tx);
    // Every pipeline gets every root that was accepted.
    let (feeds, outlets): (Vec<_>, Vec<_>) = pipelines
        .iter()
        .map(|_| mpsc::channel::<Vec<StorePath>>(1024))
        .unzip();
    let fan_out = tokio::spawn(async move {
        while let Some(roots) = rx.recv().await {
            for feed in &feeds {
                let _ = feed.send(roots.clone()).await;
            }
        }
    });
    let runs = pipelines
        .iter()
        .zip(outlets)
        .zip(owed_rxs)
        .map(|((shared, rx), owed_rx)| {
            let mine: Vec<Pending> = pending
                .iter()
                .filter(|p| !p.done.iter().any(|c| c == shared.cache_key()))
                .cloned()
                .collect();
            batch::pipeline(shared.clone(), rx, owed_rx, mine, shutdown.stop.clone())
        });
    let summaries = futures::future::join_all(runs).await;
    reader.abort();
    fan_out.abort();
    if let Some(s) = spooler {
        s.abort();
    }
    first.summarise_rejects(true);
    let mut total: Option<Summary> = None;
    for (shared, unfinished) in pipelines.iter().zip(summaries) {
        let summary = shared.stats.summary(unfinished);
        if pipelines.len() > 1 {
            log::info!("summary for {}: {summary}", shared.cache.url());
        }
        match &mut total {
            None => total = Some(summary),
            Some(t) => t.add(&summary),
        }
    }
    total.expect("at least one cache")
}
