//! The caching proxy: a remote cache's answers kept on local disk (`--cache-dir`,
//! bounded by `--cache-size`, least recently used out first), so that a second client
//! fetching the same closure sends no request to the bucket.
//!
//! ```text
//! CACHE_DIR/nar/<file hash>.nar.zst     kept until evicted (its name is its content)
//! CACHE_DIR/<hash>.narinfo              reused for --cache-ttl, then asked again
//! CACHE_DIR/nix-cache-info, *.ls, log/…, realisations/…   as narinfos
//! CACHE_DIR/tmp/<uuid>                  an object being fetched, renamed when complete
//! ```
//! A 404 is remembered in memory for `--negative-ttl` (a path uploaded meanwhile shows
//! up after that). An object is written to disk as it streams to the first client and
//! kept only once it arrived whole; HEADs and ranges of objects not held pass through.
//! Requests for a whole object that another request is fetching wait for that fetch
//! (at most [`FLIGHT_WAIT`]) and are then answered from disk, so that a fleet asking
//! for the same closure at once costs the bucket one request per object: what nginx's
//! `proxy_cache_lock` does. When that fetch ends without the object on disk (the
//! client left, the backend or the disk failed; a 404 is remembered), one of them
//! fetches it in its turn. HEADs and ranges never wait.
//! A file's modification time is the backend's Last-Modified; its change time, when it
//! was fetched. Names are the routes' (see [`super::route`]): nothing outside the
//! directory is ever written. An object is fsync'd before it is renamed into place, so
//! that what a power cut leaves there (and the next start takes over) is whole.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::bucket::Bucket;
use super::lru::Lru;
use super::route::Route;
use super::{range, Body, Counters, Error, Found, Part, Want};

/// 404s remembered at most.
const MISSING_MAX: usize = 100_000;
/// How long a request waits for another one's fetch of the same object before it asks
/// the bucket itself (nginx's `proxy_cache_lock_timeout` is 5 s too).
pub const FLIGHT_WAIT: Duration = Duration::from_secs(5);
const TMP: &str = ".narpipe-tmp";
/// Made in a cache dir that serve took over: only a dir holding it has anything of
/// serve's removed from it.
const MARKER: &str = ".narpipe-serve-cache";

pub struct Config {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// How long a narinfo (and every object but NARs) is reused.
    pub ttl: Duration,
    /// How long a 404 is.
    pub negative_ttl: Duration,
}

pub struct Proxy {
    bucket: Bucket,
    cfg: Config,
    lru: Arc<Mutex<Lru>>,
    missing: Mutex<HashMap<String, Instant>>,
    flights: Arc<Flights>,
    counters: Arc<Counters>,
}

/// The objects being fetched whole, each with what its waiters watch (see [`Flight`]).
type Flights = Mutex<HashMap<String, watch::Receiver<()>>>;

/// A fetch of a whole object under way: while it lives, other requests for the object
/// wait (see [`Proxy::get`]). Dropped once the object is on disk, or when the fetch
/// ends without it, it lets them go.
struct Flight {
    rel: String,
    flights: Arc<Flights>,
    /// Dropped with the flight: its receivers see that as a change.
    _done: watch::Sender<()>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Only the flight that put it there removes an entry.
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.rel);
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Other(format!("cache dir: {what} {}: {e}", path.display()))
}

impl Proxy {
    /// Takes over `cfg.dir` (created if missing): what an earlier run left is kept,
    /// oldest fetched out first when over the budget; unfinished fetches are removed.
    pub fn open(bucket: Bucket, cfg: Config, counters: Arc<Counters>) -> Result<Proxy, Error> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| io_err("cannot create", &cfg.dir, e))?;
        let marker = cfg.dir.join(MARKER);
        if !marker.exists() {
            let empty = std::fs::read_dir(&cfg.dir)
                .map_err(|e| io_err("cannot read", &cfg.dir, e))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::Other(format!(
                    "cache dir {} is not empty and was not made by serve: name an empty or new directory",
                    cfg.dir.display()
                )));
            }
            std::fs::write(
                &marker,
                b"narpipe serve's cache: its files may be removed\n",
            )
            .map_err(|e| io_err("cannot create", &marker, e))?;
        }
        let tmp = cfg.dir.join(TMP);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io_err("cannot clear", &tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io_err("cannot create", &tmp, e))?;
        let mut held = Vec::new();
        for sub in ["", "nar", "log", "realisations"] {
            let dir = cfg.dir.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let rel = if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                };
                if meta.is_file() && Route::parse(&format!("/{rel}")).is_some() {
                    held.push((meta.ctime(), meta.ctime_nsec(), rel, meta.len()));
                }
            }
        }
        held.sort();
        let mut lru = Lru::new(cfg.max_bytes);
        let mut gone = Vec::new();
        for (_, _, rel, size) in held {
            gone.extend(lru.insert(&rel, size));
        }
        for rel in gone {
            let _ = std::fs::remove_file(cfg.dir.join(rel));
        }
        counters.cache_bytes.store(lru.total(), Relaxed);
        Ok(Proxy {
            bucket,
            cfg,
            lru: Arc::new(Mutex::new(lru)),
            missing: Mutex::new(HashMap::new()),
            flights: Arc::default(),
            counters,
        })
    }

    pub fn url(&self) -> &str {
        self.bucket.url()
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub async fn get(&self, route: &Route, want: Want) -> Result<Option<Found>, Error> {
        let rel = route.object();
        let reusable_for = match route {
            Route::Nar { .. } => None,
            _ => Some(self.cfg.ttl),
        };
        // Whole objects that will be kept take a flight, or wait for the one under way
        // (nothing to wait for if a narinfo is never reused).
        let flies = want == Want::All && reusable_for != Some(Duration::ZERO);
        let mut deadline = None;
        let flight = loop {
            if self.known_missing(&rel) {
                self.counters.hits.fetch_add(1, Relaxed);
                return Ok(None);
            }
            if let Some(found) = self.held(&rel, reusable_for, want).await? {
                self.counters.hits.fetch_add(1, Relaxed);
                return Ok(Some(found));
            }
            if !flies {
                break None;
            }
            match self.take_off(&rel) {
                Ok(flight) => break Some(flight),
                Err(mut landing) => {
                    // Another request is fetching it: wait for that, then look again
                    // (and, if it ended without the object, one waiter takes off).
                    let until =
                        *deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLIGHT_WAIT);
                    if tokio::time::timeout_at(until, landing.changed())
                        .await
                        .is_err()
                    {
                        break None; // waited long enough: fetch it alongside
                    }
                }
            }
        };
        self.counters.misses.fetch_add(1, Relaxed);
        let Some(found) = self.bucket.get(route, want).await? else {
            self.remember_missing(rel);
            return Ok(None);
        };
        let counters = self.counters.clone();
        let counted = |b: Body| -> Body {
            b.inspect(move |r| {
                if let Ok(bytes) = r {
                    counters
                        .backend_bytes
                        .fetch_add(bytes.len() as u64, Relaxed);
                }
            })
            .boxed()
        };
        Ok(Some(match found.part {
            Part::All(body) if found.size <= self.cfg.max_bytes => {
                let fill = Fill {
                    tmp: self
                        .cfg
                        .dir
                        .join(TMP)
                        .join(uuid::Uuid::new_v4().to_string()),
                    dest: self.cfg.dir.join(&rel),
                    rel,
                    size: found.size,
                    last_modified: found.last_modified,
                    lru: self.lru.clone(),
                    dir: self.cfg.dir.clone(),
                    counters: self.counters.clone(),
                    file: None,
                    written: 0,
                    failed: false,
                    flight,
                };
                Found {
                    part: Part::All(fill.tee(counted(body))),
                    ..found
                }
            }
            Part::All(body) => Found {
                part: Part::All(counted(body)),
                ..found
            },
            Part::Range(r, body) => Found {
                part: Part::Range(r, counted(body)),
                ..found
            },
            part => Found { part, ..found },
        }))
    }

    /// A [`Flight`] for a whole object no other request is fetching, or what to watch
    /// for the fetch under way.
    fn take_off(&self, rel: &str) -> Result<Flight, watch::Receiver<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(landing) = flights.get(rel) {
            return Err(landing.clone());
        }
        let (done, landing) = watch::channel(());
        flights.insert(rel.to_string(), landing);
        Ok(Flight {
            rel: rel.to_string(),
            flights: self.flights.clone(),
            _done: done,
        })
    }

    fn known_missing(&self, rel: &str) -> bool {
        let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        match missing.get(rel) {
            Some(at) if at.elapsed() < self.cfg.negative_ttl => true,
            Some(_) => {
                missing.remove(rel);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, rel: String) {
        if self.cfg.negative_ttl.is_zero() {
            return;
        }
        let mut missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        if missing.len() >= MISSING_MAX {
            let ttl = self.cfg.negative_ttl;
            missing.retain(|_, at| at.elapsed() < ttl);
            if missing.len() >= MISSING_MAX {
                missing.clear();
            }
        }
        missing.insert(rel, Instant::now());
    }

    /// The object from disk, if it is held (and, when `reusable_for`, fetched that
    /// recently).
    async fn held(
        &self,
        rel: &str,
        reusable_for: Option<Duration>,
        want: Want,
    ) -> Result<Option<Found>, Error> {
        if !self
            .lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .touch(rel)
        {
            return Ok(None);
        }
        let path = self.cfg.dir.join(rel);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(_) => {
                self.forget(rel);
                return Ok(None);
            }
        };
        let meta = file
            .metadata()
            .await
            .map_err(|e| io_err("cannot read", &path, e))?;
        if let Some(ttl) = reusable_for {
            let fetched = SystemTime::UNIX_EPOCH
                + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec() as u32);
            if fetched.elapsed().unwrap_or_default() >= ttl {
                return Ok(None);
            }
        }
        let size = meta.len();
        let modified = meta.modified().ok();
        let nanos = modified
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let found = |part| Found {
            size,
            etag: Some(format!("\"{nanos:x}-{size:x}\"")),
            last_modified: modified,
            part,
        };
        let (start, len) = match want {
            Want::Head => return Ok(Some(found(Part::Head))),
            Want::All => (0, size),
            Want::Range(spec) => match range::resolve(spec, size) {
                Ok(r) => (r.start, r.end - r.start),
                Err(_) => return Ok(Some(found(Part::Unsatisfiable))),
            },
        };
        if start > 0 {
            file.seek(SeekFrom::Start(start))
                .await
                .map_err(|e| io_err("cannot read", &path, e))?;
        }
        let body: Body =
            tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10).boxed();
        Ok(Some(found(match want {
            Want::Range(_) => Part::Range(start..start + len, body),
            _ => Part::All(body),
        })))
    }

    fn forget(&self, rel: &str) {
        self.lru
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(rel);
        self.counters.cache_bytes.store(
            self.lru.lock().unwrap_or_else(|e| e.into_inner()).total(),
            Relaxed,
        );
    }
}

/// An object on its way from the backend to a client and to disk.
struct Fill {
    tmp: PathBuf,
    dest: PathBuf,
    rel: String,
    size: u64,
    last_modified: Option<SystemTime>,
    lru: Arc<Mutex<Lru>>,
    dir: PathBuf,
    counters: Arc<Counters>,
    file: Option<tokio::fs::File>,
    written: u64,
    /// Writing failed: the object still goes to the client, not to disk.
    failed: bool,
    /// Held until the object is on disk (or this fill ends without it).
    flight: Option<Flight>,
}

impl Fill {
    fn tee(self, body: Body) -> Body {
        Box::pin(futures::stream::unfold(
            (self, body, false),
            |(mut fill, mut body, done)| async move {
                if done {
                    return None;
                }
                match body.next().await {
                    Some(Ok(bytes)) => {
                        fill.write(&bytes).await;
                        // hyper stops polling once Content-Length bytes went out: the
                        // end of the stream may never be seen.
                        if fill.written == fill.size {
                            fill.commit().await;
                        }
                        Some((Ok(bytes), (fill, body, false)))
                    }
                    Some(Err(e)) => {
                        fill.failed = true;
                        Some((Err(e), (fill, body, true)))
                    }
                    None => {
                        fill.commit().await;
                        None
                    }
                }
            },
        ))
    }

    async fn write(&mut self, bytes: &Bytes) {
        if self.failed {
            return;
        }
        if self.file.is_none() {
            match tokio::fs::File::create(&self.tmp).await {
                Ok(f) => self.file = Some(f),
                Err(e) => return self.fail(e),
            }
        }
        let file = self.file.as_mut().expect("just made");
        match file.write_all(bytes).await {
            Ok(()) => self.written += bytes.len() as u64,
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        log::warn!(
            "cannot keep {} in the cache dir ({}): {e}",
            self.rel,
            self.tmp.display()
        );
        self.failed = true;
        // Not to be kept: whoever waits for it fetches it.
        self.flight = None;
    }

    /// Puts the complete object in place and makes room for it.
    async fn commit(&mut self) {
        if self.failed || self.written != self.size {
            return;
        }
        let Some(mut file) = self.file.take() else {
            return; // empty: nothing worth keeping
        };
        if let Err(e) = file.flush().await {
            return self.fail(e);
        }
        drop(file);
        let (tmp, dest, modified) = (self.tmp.clone(), self.dest.clone(), self.last_modified);
        let placed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let file = std::fs::File::options().write(true).open(&tmp)?;
            if let Some(t) = modified {
                file.set_modified(t)?;
            }
            // Whole on disk before it has its name: after a power cut the directory,
            // which is taken over as it is at start, holds no short object.
            file.sync_all()?;
            drop(file);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, &dest)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = placed {
            return self.fail(e);
        }
        let (evicted, total) = {
            let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
            let evicted = lru.insert(&self.rel, self.size);
            (evicted, lru.total())
        };
        // Held now: whoever waited for it reads it from disk.
        self.flight = None;
        self.counters.cache_bytes.store(total, Relaxed);
        if !evicted.is_empty() {
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || {
                for rel in evicted {
                    let _ = std::fs::remove_file(dir.join(rel));
                }
            });
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        // Cut short (the client left, the backend failed): the partial file goes.
        if self.file.is_some() || self.failed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_serve_did_not_make_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/keep"), b"mine").unwrap();
        let bucket = || {
            Bucket::new(crate::cache::Cache::open("s3://b?endpoint=http://127.0.0.1:1").unwrap())
        };
        let cfg = |d: &Path| Config {
            dir: d.to_path_buf(),
            max_bytes: 1,
            ttl: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(1),
        };
        let err = Proxy::open(bucket(), cfg(dir.path()), Arc::default())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("not made by serve"), "{err}");
        assert!(dir.path().join("tmp/keep").exists());
        // A new directory is taken over, and again after a restart.
        let fresh = dir.path().join("fresh");
        assert!(Proxy::open(bucket(), cfg(&fresh), Arc::default()).is_ok());
        assert!(Proxy::open(bucket(), cfg(&fresh), Arc::default()).is_ok());
    }

    fn in_flight(proxy: &Proxy) -> usize {
        proxy.flights.lock().unwrap().len()
    }

    /// A proxy over a folder holding one 2 MB narinfo (`name`), and its counters.
    fn proxied(tmp: &Path, ttl: Duration) -> (Arc<Proxy>, Arc<Counters>, String) {
        let source = tmp.join("source");
        std::fs::create_dir(&source).unwrap();
        let name = format!("{}.narinfo", "1".repeat(32));
        std::fs::write(source.join(&name), vec![b'x'; 2_000_000]).unwrap();
        let bucket = Bucket::new(crate::cache::Cache::open(source.to_str().unwrap()).unwrap());
        let cfg = Config {
            dir: tmp.join("cache-dir"),
            max_bytes: 4 << 20,
            ttl,
            negative_ttl: Duration::from_secs(60),
        };
        let counters = Arc::new(Counters::default());
        let proxy = Proxy::open(bucket, cfg, counters.clone()).unwrap();
        (Arc::new(proxy), counters, name)
    }

    fn body(found: Option<Found>) -> Body {
        match found.expect("found").part {
            Part::All(body) => body,
            _ => panic!("not the whole object"),
        }
    }

    async fn read_all(body: Body) -> usize {
        body.map(|b| b.unwrap().len())
            .collect::<Vec<_>>()
            .await
            .iter()
            .sum()
    }

    /// Lets spawned requests run until they wait (the clock is paused: it moves only
    /// when every task waits, and not while a file is read or written).
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    /// Three requests for the whole object, on tasks of their own: each gives its size.
    fn spawn_waiters(proxy: &Arc<Proxy>, route: &Route) -> Vec<tokio::task::JoinHandle<usize>> {
        (0..3)
            .map(|_| {
                let (proxy, route) = (proxy.clone(), route.clone());
                tokio::spawn(async move {
                    read_all(body(proxy.get(&route, Want::All).await.unwrap())).await
                })
            })
            .collect()
    }

    async fn all_whole_before_the_timeout(
        waiters: Vec<tokio::task::JoinHandle<usize>>,
        t0: tokio::time::Instant,
    ) {
        for w in waiters {
            assert_eq!(w.await.unwrap(), 2_000_000);
        }
        assert!(
            t0.elapsed() < FLIGHT_WAIT,
            "the waiters were let go only by the timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_answered_from_disk_as_soon_as_the_fetch_lands() {
        let tmp = tempfile::tempdir().unwrap();
        let (proxy, counters, name) = proxied(tmp.path(), Duration::from_secs(60));
        let route = Route::parse(&format!("/{name}")).unwrap();
        let t0 = tokio::time::Instant::now();
        let first = body(proxy.get(&route, Want::All).await.unwrap());
        assert_eq!(in_flight(&proxy), 1);
        let waiters = spawn_waiters(&proxy, &route);
        // A HEAD does not wait: it asks the bucket.
        let head = proxy.get(&route, Want::Head).await.unwrap().unwrap();
        assert!(matches!(head.part, Part::Head));
        settle().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        // Every byte read, and the stream kept (hyper stops polling at Content-Length):
        // the flight lands with the object on disk, not when the stream goes.
        let mut first = first;
        let mut got = 0;
        while got < 2_000_000 {
            got += first.next().await.unwrap().unwrap().len();
        }
        all_whole_before_the_timeout(waiters, t0).await;
        assert_eq!(
            counters.misses.load(Relaxed),
            2,
            "the first GET and the HEAD"
        );
        assert_eq!(counters.hits.load(Relaxed), 3);
        assert_eq!(in_flight(&proxy), 0);
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_cut_short_hands_the_flight_to_one_waiter() {
        let tmp = tempfile::tempdir().unwrap();
        let (proxy, counters, name) = proxied(tmp.path(), Duration::from_secs(60));
        let route = Route::parse(&format!("/{name}")).unwrap();
        let t0 = tokio::time::Instant::now();
        let mut cut = body(proxy.get(&route, Want::All).await.unwrap());
        cut.next().await.unwrap().unwrap();
        let waiters = spawn_waiters(&proxy, &route);
        settle().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        drop(cut);
        all_whole_before_the_timeout(waiters, t0).await;
        assert_eq!(
            counters.misses.load(Relaxed),
            2,
            "the cut fetch and one waiter's"
        );
        assert_eq!(counters.hits.load(Relaxed), 2);
        assert_eq!(in_flight(&proxy), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_fetches_alongside_after_the_wait_and_404s_and_ttl_0_do_not_fly() {
        let tmp = tempfile::tempdir().unwrap();
        let (proxy, counters, name) = proxied(tmp.path(), Duration::from_secs(60));
        let route = Route::parse(&format!("/{name}")).unwrap();
        // A first client that reads nothing: the waiter gives up on it after FLIGHT_WAIT.
        let _stalled = body(proxy.get(&route, Want::All).await.unwrap());
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            read_all(body(proxy.get(&route, Want::All).await.unwrap())).await,
            2_000_000
        );
        assert!(t0.elapsed() >= FLIGHT_WAIT);
        assert_eq!(counters.misses.load(Relaxed), 2);
        // A 404 lands its flight at once, remembered.
        let missing = Route::parse(&format!("/{}.narinfo", "2".repeat(32))).unwrap();
        assert!(proxy.get(&missing, Want::All).await.unwrap().is_none());
        assert_eq!(in_flight(&proxy), 1, "only the stalled one");
        drop(_stalled);
        assert_eq!(in_flight(&proxy), 0);
        // Nothing reused, nothing to wait for.
        let tmp = tempfile::tempdir().unwrap();
        let (proxy, _, name) = proxied(tmp.path(), Duration::ZERO);
        let route = Route::parse(&format!("/{name}")).unwrap();
        let _held = body(proxy.get(&route, Want::All).await.unwrap());
        assert_eq!(in_flight(&proxy), 0);
    }
}
