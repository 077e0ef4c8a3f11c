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
//! A file's modification time is the backend's Last-Modified; its change time, when it
//! was fetched. Names are the routes' (see [`super::route`]): nothing outside the
//! directory is ever written.

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

use super::bucket::Bucket;
use super::lru::Lru;
use super::route::Route;
use super::{range, Body, Counters, Error, Found, Part, Want};

/// 404s remembered at most.
const MISSING_MAX: usize = 100_000;
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
    counters: Arc<Counters>,
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
        if self.known_missing(&rel) {
            self.counters.hits.fetch_add(1, Relaxed);
            return Ok(None);
        }
        let reusable_for = match route {
            Route::Nar { .. } => None,
            _ => Some(self.cfg.ttl),
        };
        if let Some(found) = self.held(&rel, reusable_for, want).await? {
            self.counters.hits.fetch_add(1, Relaxed);
            return Ok(Some(found));
        }
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
            if let Some(t) = modified {
                std::fs::File::options()
                    .write(true)
                    .open(&tmp)?
                    .set_modified(t)?;
            }
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
}
