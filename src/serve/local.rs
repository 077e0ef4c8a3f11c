//! The local Nix store as a binary cache, made on the fly (as harmonia and nix-serve do).
//!
//! ```text
//! /<hash>.narinfo   hash ──▶ store path   Nix's database, read-only (one indexed look-up,
//!                                         as Nix's own queryPathFromHashPart)
//!                   path ──▶ path info    `nix path-info --json`, one call for every
//!                                         request waiting (batched), remembered a minute
//!                   narinfo, signed with --secret-key-file
//!   StorePath: /nix/store/<hash>-<name>
//!   URL: nar/<hash>-<NarHash in nix-base32>.nar
//!   Compression: none
//! /nar/<hash>-<narhash>.nar   the NAR, walked by the project's NAR writer on a thread
//!                             of the engine's pool, uncompressed, streamed as it is
//!                             made (no hashing: Nix checks NarHash itself); 404 once
//!                             the path changed
//! /<hash>.ls        its listing, made on the same walk
//! /log/<drv>        the build log Nix kept (NIX_LOG_DIR)
//! ```
//! A directory listing of the store would cost 0.6 s per look-up on a machine with
//! 360,000 store entries; the database answers in microseconds. Only valid paths are
//! served, derivations (`.drv`) are not.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{etag_of, range, Body, Error, Found, Part, Want};
use crate::cache_info::CacheInfo;
use crate::compress::Compression;
use crate::engine::{Engine, Next};
use crate::narinfo::NarInfo;
use crate::nix::{Nix, PathInfo};
use crate::serve::route::Route;
use crate::signing::SecretKey;
use crate::store_path::{StoreDir, StorePath};

/// How long a path's info is trusted: a path may be garbage-collected, or signed.
const INFO_TTL: Duration = Duration::from_secs(60);
/// Path infos remembered.
const INFO_CACHE: usize = 100_000;
/// Requests waiting for path info.
const ASKS_QUEUED: usize = 4096;
/// Paths per `nix path-info` call.
const BATCH: usize = 2000;

pub struct Config {
    pub store_dir: StoreDir,
    /// Nix's state directory (`NIX_STATE_DIR`), where `db/db.sqlite` is.
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub keys: Vec<SecretKey>,
    pub priority: u32,
    /// Threads making NARs.
    pub jobs: usize,
}

pub struct LocalStore {
    store_dir: StoreDir,
    log_dir: PathBuf,
    keys: Vec<SecretKey>,
    priority: u32,
    engine: Arc<Engine>,
    db: Arc<Mutex<Db>>,
    infos: Mutex<InfoCache>,
    asks: mpsc::Sender<Ask>,
}

type Answer = Result<Option<Arc<PathInfo>>, Arc<crate::nix::Error>>;
type Ask = (StorePath, oneshot::Sender<Answer>);

impl LocalStore {
    /// Opens Nix's database (read-only) and starts the NAR threads and the batcher;
    /// must run inside a tokio runtime.
    pub fn open(cfg: Config) -> Result<LocalStore, Error> {
        let db = Db::open(&cfg.state_dir.join("db/db.sqlite"), &cfg.store_dir)?;
        let engine = Engine::new(cfg.jobs)
            .map_err(|e| Error::Other(format!("cannot start the NAR threads: {e}")))?;
        let (tx, rx) = mpsc::channel(ASKS_QUEUED);
        tokio::spawn(batcher(Nix::new(cfg.store_dir.clone()), rx));
        Ok(LocalStore {
            store_dir: cfg.store_dir,
            log_dir: cfg.log_dir,
            keys: cfg.keys,
            priority: cfg.priority,
            engine: Arc::new(engine),
            db: Arc::new(Mutex::new(db)),
            infos: Mutex::new(InfoCache::default()),
            asks: tx,
        })
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// For the explorer: valid paths whose name contains `q`, newest first, and how
    /// many in all.
    pub async fn list(
        &self,
        q: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<Entry>, usize), Error> {
        let (db, q) = (self.db.clone(), q.to_string());
        tokio::task::spawn_blocking(move || {
            db.lock()
                .unwrap_or_else(|e| e.into_inner())
                .list(&q, offset, limit)
        })
        .await
        .map_err(|e| Error::Other(format!("database look-up stopped: {e}")))?
    }

    /// For the explorer: the valid paths referring to `path`.
    pub async fn referrers(&self, path: &StorePath) -> Result<Vec<StorePath>, Error> {
        let (db, path) = (self.db.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            db.lock()
                .unwrap_or_else(|e| e.into_inner())
                .referrers(&path)
        })
        .await
        .map_err(|e| Error::Other(format!("database look-up stopped: {e}")))?
    }

    pub async fn get(&self, route: &Route, want: Want) -> Result<Option<Found>, Error> {
        match route {
            Route::CacheInfo => {
                let text = CacheInfo::new(self.store_dir.as_str(), self.priority).to_string();
                let etag = etag_of(text.as_bytes());
                Ok(Some(Found::bytes(Bytes::from(text), Some(etag), want)))
            }
            Route::NarInfo(hash) => {
                let Some((info, when)) = self.info_of_hash(hash).await? else {
                    return Ok(None);
                };
                let text = self.narinfo(&info).to_string();
                let etag = etag_of(text.as_bytes());
                Ok(Some(Found {
                    last_modified: Some(when),
                    ..Found::bytes(Bytes::from(text), Some(etag), want)
                }))
            }
            Route::Nar { name, ext } => {
                let Some((hash, nar_hash)) = name.split_once('-') else {
                    return Ok(None);
                };
                if *ext != ".nar" {
                    return Ok(None);
                }
                let Some((info, when)) = self.info_of_hash(hash).await? else {
                    return Ok(None);
                };
                if info.nar_hash.to_nix32() != nar_hash {
                    return Ok(None); // an older narinfo's NAR: the path changed
                }
                Ok(self.nar(info, want).await?.map(|f| Found {
                    last_modified: Some(when),
                    ..f
                }))
            }
            Route::Listing(hash) => {
                let Some((info, _)) = self.info_of_hash(hash).await? else {
                    return Ok(None);
                };
                let listing = self.listing(&info).await?;
                let etag = etag_of(&listing);
                Ok(Some(Found::bytes(Bytes::from(listing), Some(etag), want)))
            }
            Route::Log(drv) => {
                let (dir, drv) = (self.log_dir.clone(), drv.clone());
                let shown = self.store_dir.display(&drv);
                let read = self
                    .engine
                    .run(move || crate::build_log::read(&dir, &drv))
                    .await
                    .map_err(|cause| Error::Engine {
                        path: shown.clone(),
                        cause,
                    })?;
                match read {
                    Ok(Some(text)) => {
                        let etag = etag_of(&text);
                        Ok(Some(Found::bytes(Bytes::from(text), Some(etag), want)))
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(Error::Other(e.to_string())),
                }
            }
            Route::Realisation(_) => Ok(None),
        }
    }

    /// The narinfo of a valid path, with our signatures.
    fn narinfo(&self, info: &PathInfo) -> NarInfo {
        let mut n = NarInfo {
            store_dir: self.store_dir.clone(),
            path: info.path.clone(),
            url: nar_url(info),
            compression: Some(Compression::None.to_string()),
            file_hash: Some(info.nar_hash),
            file_size: Some(info.nar_size),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
            extra: Vec::new(),
        };
        n.sign(&self.keys);
        n
    }

    /// The valid, non-derivation store path with this hash part: its info, and when it
    /// was registered.
    async fn info_of_hash(&self, hash: &str) -> Result<Option<(Arc<PathInfo>, SystemTime)>, Error> {
        let db = self.db.clone();
        let hash = hash.to_string();
        let path = tokio::task::spawn_blocking(move || {
            db.lock().unwrap_or_else(|e| e.into_inner()).path_of(&hash)
        })
        .await
        .map_err(|e| Error::Other(format!("database look-up stopped: {e}")))??;
        match path {
            Some((p, when)) if !p.is_derivation() => {
                Ok(self.info(p).await?.map(|info| (info, when)))
            }
            _ => Ok(None),
        }
    }

    async fn info(&self, path: StorePath) -> Result<Option<Arc<PathInfo>>, Error> {
        if let Some(info) = self
            .infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&path)
        {
            return Ok(Some(info));
        }
        let (tx, rx) = oneshot::channel();
        let shown = self.store_dir.display(&path);
        let stopped = || Error::Other("the path-info batcher has stopped".into());
        self.asks
            .send((path.clone(), tx))
            .await
            .map_err(|_| stopped())?;
        let answer = rx.await.map_err(|_| stopped())?;
        let info = answer.map_err(|cause| Error::Nix { path: shown, cause })?;
        if let Some(info) = &info {
            self.infos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .put(path, info.clone());
        }
        Ok(info)
    }

    fn path_buf(&self, info: &PathInfo) -> PathBuf {
        PathBuf::from(self.store_dir.display(&info.path))
    }

    /// The NAR (or the part of it asked for), streamed as the NAR writer walks the
    /// path (see [`nar_body`] for what is checked).
    async fn nar(&self, info: Arc<PathInfo>, want: Want) -> Result<Option<Found>, Error> {
        let etag = Some(format!("\"{}\"", info.nar_hash.to_nix32()));
        let size = info.nar_size;
        let found = |part| Found {
            size,
            etag: etag.clone(),
            last_modified: None,
            part,
        };
        let range = match want {
            Want::Head => return Ok(Some(found(Part::Head))),
            Want::All => 0..size,
            Want::Range(spec) => match range::resolve(spec, size) {
                Ok(r) => r,
                Err(_) => return Ok(Some(found(Part::Unsatisfiable))),
            },
        };
        let shown = self.store_dir.display(&info.path);
        // A path collected since its info was read: not found, rather than a broken answer.
        if tokio::fs::symlink_metadata(&shown).await.is_err() {
            return Ok(None);
        }
        let pieces = self.walk(self.path_buf(&info));
        let body = nar_body(pieces, range.clone(), size, shown);
        Ok(Some(found(if matches!(want, Want::All) {
            Part::All(body)
        } else {
            Part::Range(range, body)
        })))
    }

    /// The NAR of `path` in pieces, as the project's NAR writer walks it on a pool
    /// thread of the engine (the walk waits while the pieces in flight are unsent; a
    /// dropped receiver stops it).
    fn walk(&self, path: PathBuf) -> mpsc::Receiver<std::io::Result<Bytes>> {
        let (tx, rx) = mpsc::channel(PIECES_IN_FLIGHT);
        let engine = self.engine.clone();
        tokio::spawn(async move {
            let failed = tx.clone();
            let run = engine
                .run(move || {
                    let mut sink = PieceSink {
                        tx,
                        buf: vec![0u8; PIECE],
                        len: 0,
                        spare: Arc::default(),
                    };
                    let walked = crate::nar::dump_into(&path, &mut sink).and_then(|()| sink.send());
                    if let Err(e) = walked {
                        let _ = sink.tx.blocking_send(Err(e));
                    }
                })
                .await;
            if let Err(e) = run {
                let _ = failed.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        });
        rx
    }

    async fn listing(&self, info: &PathInfo) -> Result<Vec<u8>, Error> {
        let shown = self.store_dir.display(&info.path);
        let engine_err = |cause| Error::Engine {
            path: shown.clone(),
            cause,
        };
        let mut stream = self
            .engine
            .nar(self.path_buf(info), Compression::None, None, true, None)
            .await
            .map_err(engine_err)?;
        loop {
            match stream.next().await.map_err(engine_err)? {
                Next::Data(_) => {}
                Next::End(_, listing) => {
                    return listing.ok_or_else(|| Error::Other(format!("no listing of {shown}")));
                }
            }
        }
    }
}

/// The narinfo URL of a path's NAR: its hash part (to find it) and NarHash (so that a
/// path rebuilt differently never gets an old narinfo's NAR).
pub fn nar_url(info: &PathInfo) -> String {
    format!(
        "nar/{}-{}.nar",
        info.path.hash_part(),
        info.nar_hash.to_nix32()
    )
}

/// Bytes of NAR per piece sent to the client.
const PIECE: usize = 1 << 20;
/// Pieces between the walk and the client.
const PIECES_IN_FLIGHT: usize = 4;

/// Where the NAR writer puts a NAR for [`LocalStore::walk`]: file contents are read
/// straight into the piece being filled, and full pieces go out whole (no copy). A
/// piece's buffer comes back to `spare` once the client's socket has taken it, so
/// buffers are not made (and zeroed) anew for every MiB.
struct PieceSink {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
    len: usize,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// A piece's buffer, given back to its walk's spares when the piece is dropped.
struct Piece {
    buf: Vec<u8>,
    len: usize,
    spare: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() <= PIECES_IN_FLIGHT {
            spare.push(std::mem::take(&mut self.buf));
        }
    }
}

impl PieceSink {
    fn send(&mut self) -> std::io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let next = self
            .spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| vec![0u8; PIECE]);
        let piece = Piece {
            buf: std::mem::replace(&mut self.buf, next),
            len: std::mem::take(&mut self.len),
            spare: self.spare.clone(),
        };
        self.tx
            .blocking_send(Ok(Bytes::from_owner(piece)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

impl crate::nar::Sink for PieceSink {
    fn put(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = (PIECE - self.len).min(bytes.len());
            self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.len == PIECE {
                self.send()?;
            }
        }
        Ok(())
    }

    fn put_from(
        &mut self,
        file: &mut std::fs::File,
        max: u64,
    ) -> std::io::Result<(usize, crate::nar::Tail)> {
        if self.len == PIECE {
            self.send()?;
        }
        let (n, tail) = crate::nar::read_some(file, &mut self.buf[self.len..], max)?;
        self.len += n;
        Ok((n, tail))
    }
}

/// The part of the NAR in `range`, from the walk's pieces. NarHash is not computed
/// here: Nix checks every NAR it substitutes against the narinfo's; the size is
/// checked, and a NAR that is not the store's NarSize cuts the answer short.
fn nar_body(
    pieces: mpsc::Receiver<std::io::Result<Bytes>>,
    range: std::ops::Range<u64>,
    size: u64,
    path: String,
) -> Body {
    let fail = move |problem: String| {
        let e = format!("NAR of {path}: {problem}");
        log::error!("{e}");
        std::io::Error::other(e)
    };
    Box::pin(futures::stream::unfold(
        (pieces, 0u64, false),
        move |(mut pieces, mut at, done)| {
            let (range, fail) = (range.clone(), fail.clone());
            async move {
                if done || at >= range.end {
                    // The range is sent; dropping the receiver stops the walk.
                    return None;
                }
                loop {
                    match pieces.recv().await {
                        Some(Ok(mut b)) => {
                            let start = at;
                            at += b.len() as u64;
                            if at > size {
                                return Some((
                                    Err(fail(
                                        "longer than the store's NarSize (changed on disk?)".into(),
                                    )),
                                    (pieces, at, true),
                                ));
                            }
                            // Keep only what lies in the range.
                            let from = range.start.saturating_sub(start).min(b.len() as u64);
                            let to = range.end.saturating_sub(start).min(b.len() as u64);
                            if from >= to {
                                continue;
                            }
                            b = b.slice(from as usize..to as usize);
                            return Some((Ok(b), (pieces, at, false)));
                        }
                        Some(Err(e)) => {
                            return Some((Err(fail(e.to_string())), (pieces, at, true)))
                        }
                        None => {
                            return Some((
                                Err(fail(format!("ended at byte {at} of {size}"))),
                                (pieces, at, true),
                            ))
                        }
                    }
                }
            }
        },
    ))
}

/// Answers every request waiting with one `nix path-info` call (per [`BATCH`]):
/// while one call runs, the next requests gather.
async fn batcher(nix: Nix, mut asks: mpsc::Receiver<Ask>) {
    while let Some(first) = asks.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match asks.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let mut paths: Vec<StorePath> = batch.iter().map(|(p, _)| p.clone()).collect();
        paths.sort();
        paths.dedup();
        match nix.valid_path_infos(&paths).await {
            Ok((infos, _invalid)) => {
                let mut by_path: HashMap<StorePath, Arc<PathInfo>> = infos
                    .into_iter()
                    .map(|i| (i.path.clone(), Arc::new(i)))
                    .collect();
                for (p, reply) in batch {
                    let info = by_path.get(&p).cloned();
                    let _ = reply.send(Ok(info));
                }
                by_path.clear();
            }
            Err(e) => {
                let e = Arc::new(e);
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Path infos, each for [`INFO_TTL`], at most [`INFO_CACHE`] (oldest out first).
#[derive(Default)]
struct InfoCache {
    map: HashMap<StorePath, (Instant, Arc<PathInfo>)>,
    order: VecDeque<(Instant, StorePath)>,
}

impl InfoCache {
    fn get(&mut self, p: &StorePath) -> Option<Arc<PathInfo>> {
        let (at, info) = self.map.get(p)?;
        if at.elapsed() < INFO_TTL {
            return Some(info.clone());
        }
        self.map.remove(p);
        None
    }

    fn put(&mut self, p: StorePath, info: Arc<PathInfo>) {
        let now = Instant::now();
        while self.order.len() >= INFO_CACHE {
            if let Some((at, old)) = self.order.pop_front() {
                if self.map.get(&old).is_some_and(|(t, _)| *t == at) {
                    self.map.remove(&old);
                }
            }
        }
        self.order.push_back((now, p.clone()));
        self.map.insert(p, (now, info));
    }
}

/// Nix's database, opened read-only, for one question: which valid path has this hash.
struct Db {
    conn: rusqlite::Connection,
    file: String,
    store_dir: StoreDir,
}

/// One store path as the explorer lists it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: StorePath,
    pub when: Option<std::time::SystemTime>,
    pub nar_size: Option<u64>,
}

impl Db {
    fn err(&self, e: rusqlite::Error) -> Error {
        Error::Database {
            db: self.file.clone(),
            reason: e.to_string(),
        }
    }

    /// Valid paths whose name contains `q`, newest first (by registration), derivations
    /// left out; and how many there are in all.
    fn list(&self, q: &str, offset: usize, limit: usize) -> Result<(Vec<Entry>, usize), Error> {
        let escaped: String = q
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let pattern = format!("{}/%{escaped}%", self.store_dir.as_str());
        let filter = "path LIKE ?1 ESCAPE '\\' AND path NOT LIKE '%.drv'";
        let total: i64 = self
            .conn
            .prepare_cached(&format!("SELECT count(*) FROM ValidPaths WHERE {filter}"))
            .and_then(|mut st| st.query_row([&pattern], |r| r.get(0)))
            .map_err(|e| self.err(e))?;
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT path, registrationTime, narSize FROM ValidPaths WHERE {filter} \
                 ORDER BY id DESC LIMIT ?2 OFFSET ?3"
            ))
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(
                rusqlite::params![pattern, limit as i64, offset as i64],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (path, when, size) = row.map_err(|e| self.err(e))?;
            if let Ok(path) = self.store_dir.parse(&path) {
                out.push(Entry {
                    path,
                    when: Some(std::time::UNIX_EPOCH + Duration::from_secs(when.max(0) as u64)),
                    nar_size: size.map(|s| s.max(0) as u64),
                });
            }
        }
        Ok((out, total.max(0) as usize))
    }

    /// The valid paths that refer to `path` (itself left out).
    fn referrers(&self, path: &StorePath) -> Result<Vec<StorePath>, Error> {
        let full = self.store_dir.display(path);
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.referrer \
                 WHERE r.reference = (SELECT id FROM ValidPaths WHERE path = ?1) \
                 AND v.path != ?1 ORDER BY v.path",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([&full], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(p) = self.store_dir.parse(&row.map_err(|e| self.err(e))?) {
                out.push(p);
            }
        }
        Ok(out)
    }

    fn open(file: &std::path::Path, store_dir: &StoreDir) -> Result<Db, Error> {
        let shown = file.display().to_string();
        let err = |reason: String| Error::Database {
            db: shown.clone(),
            reason,
        };
        let conn = rusqlite::Connection::open_with_flags(
            file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| err(e.to_string()))?;
        // Nix writes while we read: wait for its locks rather than fail.
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| err(e.to_string()))?;
        let db = Db {
            conn,
            file: shown.clone(),
            store_dir: store_dir.clone(),
        };
        // Fails now, not at the first request, if this is no Nix database.
        db.path_of("00000000000000000000000000000000")?;
        Ok(db)
    }

    /// The valid path whose hash part is `hash` (as Nix's queryPathFromHashPart: the
    /// first path not sorting before `<store>/<hash>`).
    /// Also when it was registered.
    fn path_of(&self, hash: &str) -> Result<Option<(StorePath, SystemTime)>, Error> {
        let prefix = format!("{}/{hash}", self.store_dir.as_str());
        let found: Option<(String, i64)> = self
            .conn
            .prepare_cached(
                "SELECT path, registrationTime FROM ValidPaths WHERE path >= ?1 \
                 ORDER BY path LIMIT 1",
            )
            .and_then(|mut q| {
                let mut rows = q.query([&prefix])?;
                rows.next()?.map(|r| Ok((r.get(0)?, r.get(1)?))).transpose()
            })
            .map_err(|e| Error::Database {
                db: self.file.clone(),
                reason: e.to_string(),
            })?;
        Ok(found
            .filter(|(p, _)| {
                p.starts_with(&prefix) && p.as_bytes().get(prefix.len()) == Some(&b'-')
            })
            .and_then(|(p, t)| {
                let when = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
                Some((self.store_dir.parse(&p).ok()?, when))
            }))
    }
}
