//! One path's life: its NAR is made on the engine's threads and streamed to the cache,
//! checked against the store's database, and committed under its FileHash (see
//! [`super::stream`]); then the task waits until every reference's narinfo is in the
//! cache, signs, and writes its own narinfo — the commit point. Whether the path is
//! needed at all was settled when it was planned (see [`super::plan`]), in one batch
//! with its closure.
//!
//! ```text
//! NAR made, checked, committed (stream) ─▶ [build log] ─▶ references' narinfos present?
//!   ─▶ sign ─▶ <hash>.narinfo ─▶ [realisations]
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

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use log::{debug, info, warn};

use super::realise;
use super::share::Claim;
use super::stream::{upload_nar, NarFile};
use super::tasks::{Dep, Settle, Status, Watch};
use super::Shared;
use crate::build_log;
use crate::cache;
use crate::compress::Compression;
use crate::engine;
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
    use crate::signing::PublicKey;

    #[tokio::test]
    async fn the_narinfo_names_the_nar_and_replaces_only_its_own_signature() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let name = "xav0pws0268idny9wi60ylqqiyryzfz6-data";
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join(name), b"data").unwrap();
        let (sd, info) = super::super::stream::tests::info_for(&store, name);
        let (_, nar) = super::super::stream::tests::upload_to_folder(
            dir.path(),
            &sd,
            &info,
            Compression::Zstd,
            false,
        )
        .await;
        let nar = nar.unwrap();

        let key: SecretKey = "test1:r24vQqTnkATLONjgTaM8aV7fa8eXJyaoyvEZXPKB8pUeYGoppkkXqZu/Sa5bm0UGNTBDygnOi6lW5aKp+Z9JWQ==".parse().unwrap();
        let ni = narinfo(&sd, &info, &nar, &[key]);
        assert_eq!(ni.url, nar.published.url);
        assert_eq!(ni.file_hash, Some(nar.file_hash));
        assert_eq!(ni.sigs.len(), 2);
        assert_eq!(ni.sigs[0], "other:keep");
        let pk: PublicKey = "test1:HmBqKaZJF6mbv0muW5tFBjUwQ8oJzoupVuWiqfmfSVk="
            .parse()
            .unwrap();
        assert!(ni.sigs.iter().any(|s| pk.verifies(&ni.fingerprint(), s)));
    }
}
