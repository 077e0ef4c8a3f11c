//! One path's life: its NAR is made on the engine's threads and streamed to the cache,
//! checked against the store's database, and committed under its FileHash; then the
//! task waits until every reference's narinfo is in the cache, signs, and writes its own
//! narinfo — the commit point. Whether the path is needed at all was settled when it
//! was planned (see [`super::plan`]), in one batch with its closure.
//!
//! ```text
//! filesystem ─ engine (plain threads: walk, NarHash, compress, FileHash) ─▶ NarWriter
//!                                             bounded channel            (async task)
//! NAR committed ─▶ [<hash>.ls] ─▶ references' narinfos present? ─▶ sign ─▶ <hash>.narinfo
//! ```
//! With `write_nar_listing`, the listing made on the same walk as the NAR is written
//! as `<hash>.ls` before the narinfo (as Nix does; it is no commit point: a retry
//! writes it again). With `upload_logs`, so is the deriver's build log, if Nix kept
//! one on this machine (see [`crate::build_log`]); one that cannot be read is reported
//! and left out, the path is uploaded all the same. With `write_realisations`, the
//! realisations of a content-addressed output (see [`crate::realisation`]) follow its
//! narinfo, as they do in `nix copy`: a realisation points at a path that must be
//! there. Those it cannot write become its deriver's job, as a `.drv` root.
//! The NAR is never whole in memory. A NAR whose hash or size differs from the store's
//! database is dropped: nothing is published.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{debug, info, warn};
use tokio::sync::oneshot;

use super::realise;
use super::share::{Claim, Copy};
use super::tasks::{Dep, Settle, Status, Watch};
use super::Shared;
use crate::build_log;
use crate::cache::{self, Cache};
use crate::compress::Compression;
use crate::engine::{self, Engine, Next};
use crate::hash::Sha256;
use crate::narinfo::NarInfo;
use crate::nix::PathInfo;
use crate::signing::SecretKey;
use crate::stats::human;
use crate::store_path::{StoreDir, StorePath};

enum Outcome {
    Uploaded {
        nar: u64,
        file: u64,
        compression: Compression,
    },
}

/// Takes a path out of the in-flight map however its task ends (a panic included), so
/// that a later batch plans it again instead of waiting on a task that is gone.
/// Only this task's own entry is removed: a later batch may have planned the path again.
struct InFlight<'a> {
    shared: &'a Shared,
    path: &'a StorePath,
    watch: Watch,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            if state
                .inflight
                .get(self.path)
                .is_some_and(|w| w.same(&self.watch))
            {
                state.inflight.remove(self.path);
            }
        }
    }
}

pub(super) async fn task(shared: Arc<Shared>, info: PathInfo, deps: Vec<Dep>, settle: Settle) {
    let _inflight = InFlight {
        shared: &shared,
        path: &info.path,
        watch: settle.watch().clone(),
    };
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
                "uploaded {shown}{} ({} NAR, {} {compression}, {:.2}s)",
                shared.to_cache(),
                human(*nar),
                human(*file),
                start.elapsed().as_secs_f64()
            );
            Status::Done
        }
        Err(Error::Interrupted) => Status::Failed("interrupted".into()),
        Err(e) => {
            shared.stats.errors.fetch_add(1, Relaxed);
            // Said by each root that needs this path (see super::retry): once when its
            // first attempt fails, once when its last one does.
            debug!("failed {shown}: {e}");
            Status::Failed(e.to_string().into())
        }
    };
    {
        let mut state = shared.state.lock().unwrap();
        if state
            .inflight
            .get(&info.path)
            .is_some_and(|w| w.same(settle.watch()))
        {
            state.inflight.remove(&info.path);
        }
        if matches!(status, Status::Done) {
            state.present.insert(info.path.clone());
        }
    }
    settle.set(status);
}

/// Uploads a path that planning found missing from the cache (not asked again: a
/// concurrent writer's copy would be the same bytes).
async fn upload_one(shared: &Shared, info: &PathInfo, deps: Vec<Dep>) -> Result<Outcome, Error> {
    let cfg = &shared.cfg;
    // Boxed: its state is allocated only once the upload starts, so the many tasks
    // still waiting for a permit stay small.
    let mut nar = Box::pin(make_nar(shared, info)).await?;
    if let (Some(log_dir), Some(drv)) = (&cfg.upload_logs, &info.deriver) {
        // A log is read whole: as many at once as NARs are.
        let _permit = shared.jobs.acquire().await.expect("never closed");
        Box::pin(upload_log(shared, log_dir, drv)).await?;
    }
    // Progress follows the NARs; the narinfo may still wait for its references.
    shared.progress(info.nar_size);
    for dep in deps {
        match dep {
            Dep::Task(r, watch) => {
                if let Status::Failed(reason) = watch.settled().await {
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
    // From here on a narinfo may name the NAR (even if its put seems to fail).
    nar.unclaimed.claim();
    let narinfo = narinfo(&cfg.store_dir, info, &nar, &cfg.keys);
    shared
        .cache
        .put(
            &cache::narinfo_key(&info.path),
            Bytes::from(narinfo.to_string()),
            "text/x-nix-narinfo",
        )
        .await?;
    if let (Some(lookups), Some(_), Some(drv)) = (&shared.realisations, &info.ca, &info.deriver) {
        write_realisations(shared, lookups, drv, info).await;
    }
    Ok(Outcome::Uploaded {
        nar: info.nar_size,
        file: nar.file_size,
        compression: nar.compression,
    })
}

/// This pipeline's NAR of `info`: made here (for the other caches that want it too,
/// see [`super::share`]), or taken from the pipeline that made it.
async fn make_nar(shared: &Shared, info: &PathInfo) -> Result<NarFile, Error> {
    let claim = match &shared.share {
        Some(share) => share.claim(&info.path, shared.which).await,
        None => Claim::Alone,
    };
    let for_others = match claim {
        Claim::Wait(copy) => match copy.await {
            Ok(Some(nar)) => return Ok(nar),
            // Not written here: make it alone.
            _ => Vec::new(),
        },
        Claim::Make(others) => others,
        Claim::Alone => Vec::new(),
    };
    let cfg = &shared.cfg;
    let _permit = shared.jobs.acquire().await.expect("never closed");
    let others = for_others
        .into_iter()
        .map(|(w, tx)| (cfg.caches[w].clone(), tx))
        .collect();
    upload_nar(
        &shared.engine,
        &shared.cache,
        others,
        &cfg.store_dir,
        info,
        cfg.compression,
        cfg.level,
        cfg.write_nar_listing,
    )
    .await
}

impl Shared {
    fn progress(&self, nar_size: u64) {
        self.stats.finished.fetch_add(1, Relaxed);
        self.stats.finished_bytes.fetch_add(nar_size, Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {cause}")]
    Engine { path: String, cause: engine::Error },
    #[error("{path} does not match the store's database (NAR {got_hash}, {got_size} bytes; expected {want_hash}, {want_size} bytes): refusing to publish")]
    Mismatch {
        path: String,
        got_hash: Sha256,
        got_size: u64,
        want_hash: Sha256,
        want_size: u64,
    },
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error("reference {reference} failed: {reason}")]
    ReferenceFailed { reference: String, reason: String },
    #[error("reference {0} is not in the cache")]
    ReferenceMissing(String),
    #[error("interrupted")]
    Interrupted,
}

/// Where a NAR went and what it looks like compressed.
#[derive(Debug)]
pub(super) struct NarFile {
    pub published: cache::Published,
    /// Deletes a NAR under a name of its own if no narinfo is going to name it.
    pub unclaimed: cache::Unclaimed,
    pub compression: Compression,
    pub file_hash: Sha256,
    pub file_size: u64,
}

/// Uploads `drv`'s build log if Nix kept one in `log_dir` and it was not uploaded
/// already (another output of the same derivation).
async fn upload_log(shared: &Shared, log_dir: &Path, drv: &StorePath) -> Result<(), Error> {
    if shared.logs_sent.lock().unwrap().contains(drv) {
        return Ok(());
    }
    let (dir, d) = (log_dir.to_path_buf(), drv.clone());
    let found = shared
        .engine
        .run(move || build_log::read(&dir, &d))
        .await
        .map_err(|cause| Error::Engine {
            path: shared.show(drv),
            cause,
        })?;
    match found {
        Ok(Some(text)) => {
            shared
                .cache
                .put(
                    &build_log::cache_key(drv),
                    Bytes::from(text),
                    "text/plain; charset=utf-8",
                )
                .await?;
            shared.logs_sent.lock().unwrap().insert(drv.clone());
        }
        Ok(None) => {}
        Err(e) => warn!("{e} (the log is left out; its outputs are uploaded)"),
    }
    Ok(())
}

/// Writes the realisations Nix has for `info.path`, an output of `drv`, signed. The
/// narinfo is committed by now, so a retry of this path would find it present and never
/// come back to them: realisations that cannot be written, or that depend on others
/// (which must be written first, found through the derivation's inputs), are left to
/// `drv` as a root of its own (see [`Shared::owe_realisations`]). The path is done
/// either way: it is a good cache entry without them.
async fn write_realisations(
    shared: &Shared,
    lookups: &realise::Realisations,
    drv: &StorePath,
    info: &PathInfo,
) {
    let found = lookups.of(drv, &info.path).await;
    if found.iter().any(|r| !r.dependent.is_empty()) {
        debug!(
            "realisations of {} depend on others: left to {}",
            shared.show(&info.path),
            shared.show(drv)
        );
        shared.owe_realisations(drv).await;
    } else if let Err(e) = realise::write(shared, &found).await {
        warn!(
            "cannot write the realisations of {} ({e}): {} is queued to write them",
            shared.show(&info.path),
            shared.show(drv)
        );
        shared.owe_realisations(drv).await;
    }
}

/// The object name of a path's NAR listing.
fn listing_key(p: &StorePath) -> String {
    format!("{}.ls", p.hash_part())
}

/// How long one cache may hold up a NAR that is written to several (one write, or its
/// commit): past it, that cache is left out and makes the NAR again on its own.
const STALL: Duration = Duration::from_secs(30);

/// Streams the NAR of `info.path` into `own` (and, if `listing`, then its listing)
/// and returns where it went; with `others`, into their caches too, each getting its
/// copy through its sender as soon as its own commit is done (None: its write failed).
/// Written to several caches, the writes of each piece run side by side and a cache
/// that fails or stalls for [`STALL`] is left out, so that it does not hold up the
/// rest. An error of the NAR itself (it cannot be read, or differs from the store's
/// database) fails all of them.
#[allow(clippy::too_many_arguments)]
async fn upload_nar(
    engine: &Engine,
    own: &Cache,
    others: Vec<(Cache, oneshot::Sender<Copy>)>,
    store_dir: &StoreDir,
    info: &PathInfo,
    compression: Compression,
    level: Option<i32>,
    listing: bool,
) -> Result<NarFile, Error> {
    let path_text = store_dir.display(&info.path);
    let failed = |cause| Error::Engine {
        path: path_text.clone(),
        cause,
    };
    let mut nar = engine
        .nar(PathBuf::from(&path_text), compression, level, listing)
        .await
        .map_err(failed)?;
    let shared = !others.is_empty();
    let caches: Vec<&Cache> = std::iter::once(own)
        .chain(others.iter().map(|(c, _)| c))
        .collect();
    let mut writers: Vec<Result<cache::NarWriter, Error>> = caches
        .iter()
        .map(|c| Ok(c.nar_writer(info.nar_size, compression.nar_extension())))
        .collect();
    let (digest, listing) = loop {
        match nar.next().await.map_err(failed)? {
            Next::Data(bytes) => {
                let writes = writers.iter_mut().map(|w| {
                    let bytes = bytes.clone();
                    async move {
                        let Ok(writer) = w else { return };
                        let wrote = if shared {
                            within_stall(writer.write(bytes)).await
                        } else {
                            writer.write(bytes).await
                        };
                        if let Err(e) = wrote {
                            *w = Err(e.into());
                        }
                    }
                });
                futures::future::join_all(writes).await;
                if writers.iter().all(|w| w.is_err()) {
                    let first = writers.into_iter().find_map(|w| w.err());
                    return Err(first.expect("all failed"));
                }
            }
            Next::End(digest, listing) => break (digest, listing),
        }
    };
    if digest.nar_hash != info.nar_hash || digest.nar_size != info.nar_size {
        return Err(Error::Mismatch {
            path: path_text,
            got_hash: digest.nar_hash,
            got_size: digest.nar_size,
            want_hash: info.nar_hash,
            want_size: info.nar_size,
        });
    }
    let done = Done {
        url: format!(
            "nar/{}{}",
            digest.file_hash.to_nix32(),
            compression.nar_extension()
        ),
        listing: listing.map(|l| (listing_key(&info.path), Bytes::from(l))),
        compression,
        file_hash: digest.file_hash,
        file_size: digest.file_size,
        stall: shared,
    };
    let mut writers = writers.into_iter();
    let own_writer = writers.next().expect("own cache first");
    for (writer, (cache, copy)) in writers.zip(others) {
        let (done, shown) = (done.clone(), path_text.clone());
        tokio::spawn(async move {
            let nar = match writer {
                Ok(w) => done.commit(w, &cache).await,
                Err(e) => Err(e),
            };
            if let Err(e) = &nar {
                warn!(
                    "{shown} left out of {} for now (it makes its own copy): {e}",
                    cache.url()
                );
            }
            let _ = copy.send(nar.ok());
        });
    }
    done.commit(own_writer?, own).await
}

/// A write to one of several caches, given up after [`STALL`].
async fn within_stall<T>(
    op: impl std::future::Future<Output = Result<T, cache::Error>>,
) -> Result<T, cache::Error> {
    tokio::time::timeout(STALL, op)
        .await
        .unwrap_or(Err(cache::Error::Stalled(STALL)))
}

/// What every cache's copy of a finished NAR is committed with.
#[derive(Clone)]
struct Done {
    url: String,
    /// The listing's key and text, if one is written.
    listing: Option<(String, Bytes)>,
    compression: Compression,
    file_hash: Sha256,
    file_size: u64,
    /// Whether other caches wait on this commit (see [`STALL`]).
    stall: bool,
}

impl Done {
    async fn commit(&self, writer: cache::NarWriter, cache: &Cache) -> Result<NarFile, Error> {
        let published = if self.stall {
            within_stall(writer.commit(&self.url)).await?
        } else {
            writer.commit(&self.url).await?
        };
        let unclaimed = cache.unclaimed(&published);
        if let Some((key, text)) = &self.listing {
            cache.put(key, text.clone(), "application/json").await?;
        }
        Ok(NarFile {
            published,
            unclaimed,
            compression: self.compression,
            file_hash: self.file_hash,
            file_size: self.file_size,
        })
    }
}

/// The narinfo for `info` whose NAR is `nar`, signed with `keys` (a store signature by
/// a key of the same name is replaced, others are kept).
fn narinfo(store_dir: &StoreDir, info: &PathInfo, nar: &NarFile, keys: &[SecretKey]) -> NarInfo {
    let mut n = NarInfo {
        store_dir: store_dir.clone(),
        path: info.path.clone(),
        url: nar.published.url.clone(),
        compression: Some(nar.compression.to_string()),
        file_hash: Some(nar.file_hash),
        file_size: Some(nar.file_size),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        system: None,
        sigs: info.sigs.clone(),
        ca: info.ca.clone(),
        extra: Vec::new(),
    };
    n.sign(keys);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar;
    use sha2::Digest;
    use tokio::io::AsyncReadExt;

    fn info_for(store: &std::path::Path, name: &str) -> (StoreDir, PathInfo) {
        let sd = StoreDir::new(store.to_str().unwrap()).unwrap();
        let sp = StorePath::from_base_name(name).unwrap();
        let mut nar_bytes = Vec::new();
        nar::dump(&store.join(name), &mut nar_bytes).unwrap();
        let info = PathInfo {
            path: sp,
            nar_hash: Sha256(sha2::Sha256::digest(&nar_bytes).into()),
            nar_size: nar_bytes.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec!["other:keep".into(), "test1:replace".into()],
            ca: None,
        };
        (sd, info)
    }

    #[tokio::test]
    async fn uploads_verifies_and_names_by_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let name = "xav0pws0268idny9wi60ylqqiyryzfz6-data";
        std::fs::create_dir_all(store.join(name)).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 7) as u8).collect();
        std::fs::write(store.join(name).join("f"), &big).unwrap();
        let (sd, info) = info_for(&store, name);
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        let cache = Cache::open(cache_dir.to_str().unwrap()).unwrap();

        let nar = upload_nar(
            &Engine::new(2).unwrap(),
            &cache,
            Vec::new(),
            &sd,
            &info,
            Compression::Zstd,
            None,
            false,
        )
        .await
        .unwrap();
        assert!(!dir
            .path()
            .join("cache")
            .join(listing_key(&info.path))
            .exists());
        let url = &nar.published.url;
        assert!(url.starts_with("nar/") && url.ends_with(".nar.zst"));
        assert!(!nar.published.unique);
        let stored = cache.get(url).await.unwrap().unwrap();
        assert_eq!(stored.len() as u64, nar.file_size);
        assert_eq!(Sha256(sha2::Sha256::digest(&stored).into()), nar.file_hash);
        let mut dec = async_compression::tokio::bufread::ZstdDecoder::new(&stored[..]);
        let mut back = Vec::new();
        dec.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len() as u64, info.nar_size);

        let key: SecretKey = "test1:r24vQqTnkATLONjgTaM8aV7fa8eXJyaoyvEZXPKB8pUeYGoppkkXqZu/Sa5bm0UGNTBDygnOi6lW5aKp+Z9JWQ==".parse().unwrap();
        let ni = narinfo(&sd, &info, &nar, &[key]);
        assert_eq!(ni.sigs.len(), 2);
        assert_eq!(ni.sigs[0], "other:keep");
        assert!(key_verifies(&ni));
    }

    fn key_verifies(ni: &NarInfo) -> bool {
        let pk: crate::signing::PublicKey = "test1:HmBqKaZJF6mbv0muW5tFBjUwQ8oJzoupVuWiqfmfSVk="
            .parse()
            .unwrap();
        ni.sigs.iter().any(|s| pk.verifies(&ni.fingerprint(), s))
    }

    #[tokio::test]
    async fn refuses_to_publish_when_the_nar_differs_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let name = "xav0pws0268idny9wi60ylqqiyryzfz6-data";
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join(name), b"original").unwrap();
        let (sd, info) = info_for(&store, name);
        std::fs::write(store.join(name), b"tampered").unwrap();
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        let cache = Cache::open(cache_dir.to_str().unwrap()).unwrap();
        let err = upload_nar(
            &Engine::new(2).unwrap(),
            &cache,
            Vec::new(),
            &sd,
            &info,
            Compression::None,
            None,
            true,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains(name));
        let nar_dir = dir.path().join("cache/nar");
        let left = std::fs::read_dir(&nar_dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0);
        assert!(!dir
            .path()
            .join("cache")
            .join(listing_key(&info.path))
            .exists());
    }

    #[tokio::test]
    async fn writes_the_listing_beside_the_nar_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let name = "xav0pws0268idny9wi60ylqqiyryzfz6-data";
        std::fs::create_dir_all(store.join(name).join("bin")).unwrap();
        std::fs::write(store.join(name).join("bin/hi"), b"hello").unwrap();
        let (sd, info) = info_for(&store, name);
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        let cache = Cache::open(dir.path().join("cache").to_str().unwrap()).unwrap();
        upload_nar(
            &Engine::new(1).unwrap(),
            &cache,
            Vec::new(),
            &sd,
            &info,
            Compression::Xz,
            None,
            true,
        )
        .await
        .unwrap();
        let ls = cache.get(&listing_key(&info.path)).await.unwrap().unwrap();
        let want = nar::dump_with_listing(&store.join(name), &mut std::io::sink()).unwrap();
        assert_eq!(ls, want);
        assert_eq!(
            listing_key(&info.path),
            "xav0pws0268idny9wi60ylqqiyryzfz6.ls"
        );
    }
}
