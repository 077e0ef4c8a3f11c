//! One NAR on its way into the caches: made on the engine's threads, streamed to every
//! cache that wants it, checked against the store's database, and committed under its
//! FileHash (with its listing, if one is written). What comes before and after (the
//! build log, the references, the narinfo) is the path's own business (see
//! [`super::path`]).
//!
//! ```text
//! filesystem ─ engine (plain threads: walk, NarHash, compress, FileHash) ─▶ NarWriter ×N
//!                                             bounded channel            (one per cache)
//! NarHash, NarSize = the store's? ─▶ commit nar/<FileHash>.nar.zst ─▶ [<hash>.ls]
//! ```
//! Written to several caches, one that fails or stalls is left out (it makes its own
//! copy later); an error of the NAR itself fails all of them. The NAR is never whole in
//! memory.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use log::warn;
use tokio::sync::oneshot;

use super::path::Error;
use super::share::Copy;
use crate::cache::{self, Cache};
use crate::compress::Compression;
use crate::engine::{Engine, Next};
use crate::hash::Sha256;
use crate::nix::PathInfo;
use crate::store_path::StoreDir;

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
pub(super) async fn upload_nar(
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
        .nar(
            PathBuf::from(&path_text),
            compression,
            level,
            listing,
            Some(info.nar_size),
        )
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
        listing: listing.map(|l| (cache::listing_key(&info.path), Bytes::from(l))),
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::nar;
    use crate::store_path::StorePath;
    use sha2::Digest;
    use tokio::io::AsyncReadExt;

    /// A store under `store` holding `name` as it is, and its path info (with two
    /// signatures, one by test key `test1`).
    pub(in crate::daemon) fn info_for(store: &std::path::Path, name: &str) -> (StoreDir, PathInfo) {
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

    /// `upload_nar` of `info` on an engine of its own into a new folder cache,
    /// `dir/cache`, with no other cache.
    pub(in crate::daemon) async fn upload_to_folder(
        dir: &std::path::Path,
        sd: &StoreDir,
        info: &PathInfo,
        compression: Compression,
        listing: bool,
    ) -> (Cache, Result<NarFile, Error>) {
        let cache_dir = dir.join("cache");
        std::fs::create_dir_all(&cache_dir).unwrap();
        let cache = Cache::open(cache_dir.to_str().unwrap()).unwrap();
        let engine = Engine::new(2).unwrap();
        let nar = upload_nar(
            &engine,
            &cache,
            Vec::new(),
            sd,
            info,
            compression,
            None,
            listing,
        )
        .await;
        (cache, nar)
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
        let (cache, nar) = upload_to_folder(dir.path(), &sd, &info, Compression::Zstd, false).await;
        let nar = nar.unwrap();
        assert!(!dir
            .path()
            .join("cache")
            .join(cache::listing_key(&info.path))
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
        let (_, nar) = upload_to_folder(dir.path(), &sd, &info, Compression::None, true).await;
        let Err(err) = nar else {
            panic!("a tampered NAR was published")
        };
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains(name));
        let nar_dir = dir.path().join("cache/nar");
        let left = std::fs::read_dir(&nar_dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0);
        assert!(!dir
            .path()
            .join("cache")
            .join(cache::listing_key(&info.path))
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
        let (cache, nar) = upload_to_folder(dir.path(), &sd, &info, Compression::Xz, true).await;
        nar.unwrap();
        let ls = cache
            .get(&cache::listing_key(&info.path))
            .await
            .unwrap()
            .unwrap();
        let want = nar::dump_with_listing(&store.join(name), &mut std::io::sink()).unwrap();
        assert_eq!(ls, want);
        assert_eq!(
            cache::listing_key(&info.path),
            "xav0pws0268idny9wi60ylqqiyryzfz6.ls"
        );
    }
}
