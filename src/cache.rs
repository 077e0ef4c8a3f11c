//! The binary cache as a set of objects, through `object_store`.
//!
//! Layout (relative to the cache root), as Nix expects it:
//! ```text
//! nix-cache-info
//! <hash>.narinfo
//! nar/<file hash>.nar.zst
//! ```
//! NARs are named by the hash of their compressed bytes, known only at the end of the
//! stream. A NAR that fits in [`SMALL_NAR`] is held and put under its final name in one
//! request; a larger one streams as a multipart upload to a temporary name and is
//! renamed once complete and verified. Puts are atomic on every backend, so no reader
//! ever sees a partial object; an abandoned multipart upload is aborted.

use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions,
    PutPayload, WriteMultipart,
};
use tokio_util::task::TaskTracker;

/// NARs whose compressed size fits here are uploaded with one put.
pub const SMALL_NAR: usize = 8 << 20;
/// Multipart part size (S3 wants ≥ 5 MiB) and parts in flight per upload.
const PART_SIZE: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cache URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cache {url}: {op} {key}: {source}")]
    Backend {
        url: String,
        op: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },
}

#[derive(Clone)]
pub struct Cache {
    store: Arc<dyn ObjectStore>,
    prefix: Option<Path>,
    url: String,
    /// Whether the backend keeps Content-Type (the local filesystem doesn't).
    attributes: bool,
    cleanups: TaskTracker,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache({})", self.url)
    }
}

impl Cache {
    /// Opens `file:///abs/dir` or a plain absolute path, creating the folder.
    pub fn open(url: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let dir = if let Some(rest) = url.strip_prefix("file://") {
            if rest.contains('?') {
                return Err(bad("file:// caches take no parameters"));
            }
            rest
        } else if url.starts_with('/') {
            url
        } else if let Some((scheme, _)) = url.split_once("://") {
            return Err(bad(&format!(
                "unsupported scheme {scheme}:// (this build supports file://)"
            )));
        } else {
            return Err(bad("want file:///absolute/dir or an absolute path"));
        };
        if !dir.starts_with('/') {
            return Err(bad("the folder must be an absolute path"));
        }
        std::fs::create_dir_all(dir).map_err(|e| bad(&format!("cannot create {dir}: {e}")))?;
        let store = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| bad(&e.to_string()))?
            .with_automatic_cleanup(false);
        Ok(Cache {
            store: Arc::new(store),
            prefix: None,
            url: format!("file://{dir}"),
            attributes: false,
            cleanups: TaskTracker::new(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Path {
        match &self.prefix {
            Some(p) => Path::from(format!("{p}/{rel}")),
            None => Path::from(rel),
        }
    }

    fn err(&self, op: &'static str, key: &str, source: object_store::Error) -> Error {
        Error::Backend {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            source: Box::new(source),
        }
    }

    fn put_opts(&self, content_type: &'static str, mode: PutMode) -> PutOptions {
        let mut attributes = Attributes::new();
        if self.attributes {
            attributes.insert(Attribute::ContentType, content_type.into());
        }
        PutOptions {
            mode,
            attributes,
            ..Default::default()
        }
    }

    pub async fn exists(&self, rel: &str) -> Result<bool, Error> {
        match self.store.head(&self.key(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("head", rel, e)),
        }
    }

    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, Error> {
        let res = match self.store.get(&self.key(rel)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("get", rel, e)),
        };
        res.bytes()
            .await
            .map(Some)
            .map_err(|e| self.err("get", rel, e))
    }

    pub async fn put(
        &self,
        rel: &str,
        data: Bytes,
        content_type: &'static str,
    ) -> Result<(), Error> {
        self.store
            .put_opts(
                &self.key(rel),
                PutPayload::from_bytes(data),
                self.put_opts(content_type, PutMode::Overwrite),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.err("put", rel, e))
    }

    /// Puts `data` unless `rel` exists; returns whether it was written.
    pub async fn create(
        &self,
        rel: &str,
        data: Bytes,
        content_type: &'static str,
    ) -> Result<bool, Error> {
        match self
            .store
            .put_opts(
                &self.key(rel),
                PutPayload::from_bytes(data),
                self.put_opts(content_type, PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err("create", rel, e)),
        }
    }

    /// A writer for one NAR file, committed under its final name later.
    pub fn nar_writer(&self) -> NarWriter {
        NarWriter {
            cache: self.clone(),
            buf: Vec::new(),
            multipart: None,
        }
    }

    /// Waits (bounded) for aborts of abandoned multipart uploads to reach the backend.
    pub async fn finish_cleanups(&self, limit: std::time::Duration) {
        self.cleanups.close();
        let _ = tokio::time::timeout(limit, self.cleanups.wait()).await;
    }
}

struct Multipart {
    tmp: String,
    upload: WriteMultipart,
}

/// Receives a compressed NAR in pieces. Dropping it without [`NarWriter::commit`]
/// leaves nothing behind: held bytes are freed, a multipart upload is aborted.
pub struct NarWriter {
    cache: Cache,
    buf: Vec<u8>,
    multipart: Option<Multipart>,
}

impl NarWriter {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        if let Some(mp) = &mut self.multipart {
            mp.upload
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| self.cache.err("upload part of", &mp.tmp, e))?;
            mp.upload.write(data);
            return Ok(());
        }
        if self.buf.len() + data.len() <= SMALL_NAR {
            self.buf.extend_from_slice(data);
            return Ok(());
        }
        let tmp = format!("nar/tmp-{}.part", uuid::Uuid::new_v4());
        let upload = self
            .cache
            .store
            .put_multipart_opts(
                &self.cache.key(&tmp),
                PutMultipartOptions {
                    attributes: self
                        .cache
                        .put_opts("application/x-nix-nar", PutMode::Overwrite)
                        .attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.cache.err("start multipart upload of", &tmp, e))?;
        let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        upload.write(&std::mem::take(&mut self.buf));
        upload.write(data);
        self.multipart = Some(Multipart { tmp, upload });
        Ok(())
    }

    /// Publishes the NAR at `rel` (its content-addressed final name).
    pub async fn commit(mut self, rel: &str) -> Result<(), Error> {
        let cache = self.cache.clone();
        match self.multipart.take() {
            None => {
                let data = Bytes::from(std::mem::take(&mut self.buf));
                cache.put(rel, data, "application/x-nix-nar").await
            }
            Some(Multipart { tmp, upload }) => {
                upload
                    .finish()
                    .await
                    .map_err(|e| cache.err("complete multipart upload of", &tmp, e))?;
                // Same name means same bytes, so overwriting a concurrent writer's copy is harmless.
                let res = cache
                    .store
                    .rename(&cache.key(&tmp), &cache.key(rel))
                    .await
                    .map_err(|e| cache.err("rename to", rel, e));
                if res.is_err() {
                    let _ = cache.store.delete(&cache.key(&tmp)).await;
                }
                res
            }
        }
    }
}

impl Drop for NarWriter {
    fn drop(&mut self) {
        if let Some(mp) = self.multipart.take() {
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                self.cache.cleanups.spawn_on(
                    async move {
                        let _ = mp.upload.abort().await;
                    },
                    &handle,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        let c = Cache::open(&format!("file://{}", d.display())).unwrap();
        assert_eq!(c.url(), format!("file://{}", d.display()));
        assert!(d.is_dir());
        assert!(Cache::open(d.to_str().unwrap()).is_ok());
        for bad in [
            "relative/dir",
            "file://relative",
            "ftp://x/y",
            "file:///tmp/x?compression=zstd",
        ] {
            let e = Cache::open(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[tokio::test]
    async fn small_and_large_nars_commit_atomically_and_drops_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_str().unwrap()).unwrap();
        let mut w = c.nar_writer();
        w.write(b"small").await.unwrap();
        w.commit("nar/a.nar").await.unwrap();
        assert_eq!(c.get("nar/a.nar").await.unwrap().unwrap(), &b"small"[..]);

        let piece = vec![7u8; 1 << 20];
        let mut w = c.nar_writer();
        for _ in 0..(SMALL_NAR / piece.len() + 3) {
            w.write(&piece).await.unwrap();
        }
        assert!(w.multipart.is_some());
        w.commit("nar/b.nar").await.unwrap();
        let got = c.get("nar/b.nar").await.unwrap().unwrap();
        assert_eq!(got.len(), SMALL_NAR + 3 * piece.len());

        let mut w = c.nar_writer();
        for _ in 0..(SMALL_NAR / piece.len() + 3) {
            w.write(&piece).await.unwrap();
        }
        drop(w);
        c.finish_cleanups(std::time::Duration::from_secs(5)).await;
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("nar"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.nar", "b.nar"]);
    }

    #[tokio::test]
    async fn create_does_not_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_str().unwrap()).unwrap();
        assert!(c
            .create("x", Bytes::from_static(b"1"), "text/plain")
            .await
            .unwrap());
        assert!(!c
            .create("x", Bytes::from_static(b"2"), "text/plain")
            .await
            .unwrap());
        assert_eq!(c.get("x").await.unwrap().unwrap(), &b"1"[..]);
        assert!(c.get("missing").await.unwrap().is_none());
        assert!(!c.exists("missing").await.unwrap());
    }
}
