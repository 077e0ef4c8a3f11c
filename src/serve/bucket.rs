//! Objects of a binary cache (folder, S3, GCS, Azure, HTTP), served as they are stored:
//! one backend request per answer (a range: a head for the size, then the bytes).
//!
//! A folder's narinfos and nix-cache-info are kept in memory for [`HOT_TTL`] after
//! they are read ([`Hot`]): a Nix client asks for the same narinfos over and over, and
//! a read costs a hand-off to the blocking pool and five syscalls.
//!
//! ```text
//! GET /<hash>.narinfo  ──▶ held, read under HOT_TTL ago? ──yes──▶ the bytes held
//!                                        │ no
//!                                        ▼
//!                          open, stat, read (blocking pool) ──▶ held, answered
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;

use super::{range, Body, Error, Found, Part, Want};
use crate::cache::{self, Cache};
use crate::serve::route::Route;

pub struct Bucket {
    cache: Cache,
    hot: Hot,
}

impl Bucket {
    pub fn new(cache: Cache) -> Bucket {
        Bucket {
            cache,
            hot: Hot::new(HOT_TTL),
        }
    }

    pub fn url(&self) -> &str {
        self.cache.url()
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub async fn get(&self, route: &Route, want: Want) -> Result<Option<Found>, Error> {
        let rel = route.object();
        if let Some(dir) = self.cache.local_dir() {
            if matches!(route, Route::NarInfo(_) | Route::CacheInfo) {
                if let Some(file) = self.hot.get(&rel) {
                    return Ok(Some(file.found(want)));
                }
                // Held from before the read: never longer than HOT_TTL after it.
                let asked = Instant::now();
                match read_small(dir.to_path_buf(), dir.join(&rel)).await? {
                    Small::Missing => return Ok(None),
                    Small::Read(file) => {
                        let found = file.found(want);
                        self.hot.put(rel, file, asked);
                        return Ok(Some(found));
                    }
                    Small::Big => {}
                }
            }
            return local_file(dir.to_path_buf(), dir.join(&rel), want).await;
        }
        let (range, head) = match want {
            Want::Head => (None, true),
            Want::All => (None, false),
            Want::Range(spec) => {
                let Some(meta) = self.cache.read(&rel, None, true).await? else {
                    return Ok(None);
                };
                match range::resolve(spec, meta.size) {
                    Ok(r) => (Some(r), false),
                    Err(_) => {
                        return Ok(Some(Found {
                            part: Part::Unsatisfiable,
                            ..found(meta, None)
                        }))
                    }
                }
            }
        };
        let Some(mut object) = self.cache.read(&rel, range.clone(), head).await? else {
            return Ok(None);
        };
        let body = object
            .body
            .take()
            .map(|b| b.map(|r| r.map_err(std::io::Error::other)).boxed());
        Ok(Some(found(object, body.map(|b| (range, b)))))
    }
}

/// Files up to this size are read whole in the one blocking call.
const SMALL_FILE: u64 = 256 << 10;

/// How long a folder's narinfo is answered from memory after it was read: a narinfo
/// written, replaced or deleted meanwhile is seen at most this late (as the proxy's
/// `--cache-ttl`, but short); a 404 is never held, so a path just pushed is served at
/// once.
const HOT_TTL: Duration = Duration::from_secs(1);
/// Bytes of files held in memory at most.
const HOT_BYTES: usize = 16 << 20;
/// Larger files are never held (a narinfo is a few hundred bytes to a few KiB).
const HOT_FILE: u64 = 64 << 10;

/// A small file of the folder, read whole.
#[derive(Clone)]
struct HotFile {
    data: Bytes,
    etag: String,
    modified: Option<SystemTime>,
}

impl HotFile {
    fn found(&self, want: Want) -> Found {
        Found {
            last_modified: self.modified,
            ..Found::bytes(self.data.clone(), Some(self.etag.clone()), want)
        }
    }
}

/// Small files read within `ttl` ([`HOT_TTL`]), at most [`HOT_BYTES`] of them.
struct Hot {
    ttl: Duration,
    held: Mutex<HotMap>,
}

#[derive(Default)]
struct HotMap {
    files: HashMap<String, (Instant, HotFile)>,
    bytes: usize,
}

impl Hot {
    fn new(ttl: Duration) -> Hot {
        Hot {
            ttl,
            held: Mutex::default(),
        }
    }

    fn get(&self, name: &str) -> Option<HotFile> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        match held.files.get(name) {
            Some((at, file)) if at.elapsed() < self.ttl => Some(file.clone()),
            _ => None,
        }
    }

    /// `file` as read after `at`.
    fn put(&self, name: String, file: HotFile, at: Instant) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let held = &mut *held;
        if held.bytes + file.data.len() > HOT_BYTES {
            // Full: what is out of date goes, and if more than half would be left,
            // everything (it is all read again within a second anyway): each sweep
            // frees at least half the budget, so sweeps stay rare however busy the
            // last second was.
            held.files.retain(|_, (at, _)| at.elapsed() < self.ttl);
            held.bytes = held.bytes_of();
            if held.bytes + file.data.len() > HOT_BYTES / 2 {
                held.files.clear();
                held.bytes = 0;
            }
        }
        held.bytes += file.data.len();
        if let Some((_, old)) = held.files.insert(name, (at, file)) {
            held.bytes -= old.data.len();
        }
    }
}

impl HotMap {
    fn bytes_of(&self) -> usize {
        self.files.values().map(|(_, f)| f.data.len()).sum()
    }
}

enum Small {
    Missing,
    Read(HotFile),
    /// Over [`HOT_FILE`]: served as any other file.
    Big,
}

/// A file of a local folder cache read whole, in one blocking call, if it is small.
async fn read_small(root: std::path::PathBuf, path: std::path::PathBuf) -> Result<Small, Error> {
    use std::io::Read;
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || -> std::io::Result<Small> {
        let Some((mut file, meta)) = open_in_folder(&root, &path)? else {
            return Ok(Small::Missing);
        };
        if meta.len() > HOT_FILE {
            return Ok(Small::Big);
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        (&mut file).take(meta.len()).read_to_end(&mut buf)?;
        Ok(Small::Read(HotFile {
            data: Bytes::from(buf),
            etag: file_etag(&meta),
            modified: meta.modified().ok(),
        }))
    })
    .await
    .map_err(|e| Error::Other(format!("reading {shown} stopped: {e}")))?
    .map_err(|e| Error::Other(format!("cannot read {shown}: {e}")))
}

/// Opens a regular file of a folder cache (`root`), with its metadata; None when there
/// is none. A symbolic link in its place is followed only when it leads to a file
/// inside the folder (a cache deduplicated with links); one that leads out of it is
/// served as missing, as it may point anywhere on the machine. A FIFO or device is
/// missing too, and does not block the open.
fn open_in_folder(
    root: &std::path::Path,
    path: &std::path::Path,
) -> std::io::Result<Option<(std::fs::File, std::fs::Metadata)>> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |p: &std::path::Path| match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(p)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    let file = match open(path) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            let (Ok(target), Ok(root)) = (path.canonicalize(), root.canonicalize()) else {
                return Ok(None);
            };
            if !target.starts_with(&root) {
                return Ok(None);
            }
            match open(&target) {
                Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => return Ok(None),
                other => other?,
            }
        }
        other => other?,
    };
    let Some(file) = file else {
        return Ok(None);
    };
    let meta = file.metadata()?;
    Ok(meta.is_file().then_some((file, meta)))
}

/// A folder file's ETag: changes when the file is replaced (inode), written (mtime)
/// or resized.
fn file_etag(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let nanos = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{:x}-{nanos:x}-{:x}\"", meta.ino(), meta.len())
}

/// A file of a local folder cache: open, stat and (when small) read in one blocking
/// call, where object_store's local store takes one hand-off to the blocking pool per
/// step (narinfo latency under load is mostly those hand-offs).
async fn local_file(
    root: std::path::PathBuf,
    path: std::path::PathBuf,
    want: Want,
) -> Result<Option<Found>, Error> {
    use std::io::{Read, Seek};
    let shown = path.display().to_string();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<Option<_>> {
        let Some((mut file, meta)) = open_in_folder(&root, &path)? else {
            return Ok(None);
        };
        let size = meta.len();
        let range = match want {
            Want::Head => None,
            Want::All => Some(0..size),
            Want::Range(spec) => range::resolve(spec, size).ok(),
        };
        let mut data = None;
        if let Some(r) = &range {
            // A new file is at its start: no seek for a whole file.
            if r.start > 0 {
                file.seek(std::io::SeekFrom::Start(r.start))?;
            }
            if r.end - r.start <= SMALL_FILE {
                let mut buf = Vec::with_capacity((r.end - r.start) as usize);
                (&mut file).take(r.end - r.start).read_to_end(&mut buf)?;
                data = Some(Bytes::from(buf));
            }
        }
        Ok(Some((file, meta, range, data)))
    })
    .await
    .map_err(|e| Error::Other(format!("reading {shown} stopped: {e}")))?
    .map_err(|e| Error::Other(format!("cannot read {shown}: {e}")))?;
    let Some((file, meta, range, data)) = opened else {
        return Ok(None);
    };
    let found = |part| Found {
        size: meta.len(),
        etag: Some(file_etag(&meta)),
        last_modified: meta.modified().ok(),
        part,
    };
    let body = |r: &std::ops::Range<u64>| -> Body {
        match &data {
            Some(d) => {
                let d = d.clone();
                Box::pin(futures::stream::once(async move { Ok(d) }))
            }
            None => {
                use tokio::io::AsyncReadExt;
                let file = tokio::fs::File::from_std(file).take(r.end - r.start);
                tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).boxed()
            }
        }
    };
    Ok(Some(match (want, range) {
        (Want::Head, _) => found(Part::Head),
        (Want::All, Some(r)) => found(Part::All(body(&r))),
        (Want::Range(_), Some(r)) => {
            let b = body(&r);
            found(Part::Range(r, b))
        }
        _ => found(Part::Unsatisfiable),
    }))
}

fn found(object: cache::Object, body: Option<(Option<std::ops::Range<u64>>, Body)>) -> Found {
    Found {
        size: object.size,
        etag: object.e_tag.as_deref().map(quoted),
        last_modified: Some(object.last_modified),
        part: match body {
            None => Part::Head,
            Some((None, b)) => Part::All(b),
            Some((Some(r), b)) => Part::Range(r, b),
        },
    }
}

/// S3 sends ETags quoted, a local folder's are bare: quoted, as the header wants.
fn quoted(tag: &str) -> String {
    if tag.starts_with('"') || tag.starts_with("W/") {
        tag.to_string()
    } else {
        format!("\"{tag}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: usize) -> HotFile {
        HotFile {
            data: Bytes::from(vec![b'x'; len]),
            etag: "\"e\"".into(),
            modified: None,
        }
    }

    #[test]
    fn hot_files_are_held_for_their_time_within_the_budget() {
        let hot = Hot::new(Duration::from_millis(200));
        assert!(hot.get("a.narinfo").is_none());
        hot.put("a.narinfo".into(), file(100), Instant::now());
        let got = hot.get("a.narinfo").unwrap();
        assert_eq!(got.data.len(), 100);
        let found = got.found(Want::Head);
        assert_eq!(found.size, 100);
        assert_eq!(found.etag.as_deref(), Some("\"e\""));
        // Replaced: counted once.
        hot.put("a.narinfo".into(), file(50), Instant::now());
        assert_eq!(hot.held.lock().unwrap().bytes, 50);
        std::thread::sleep(Duration::from_millis(250));
        assert!(hot.get("a.narinfo").is_none(), "out of date");

        // Never over the budget.
        let hot = Hot::new(Duration::from_secs(60));
        for i in 0..(HOT_BYTES / (60 << 10)) + 10 {
            hot.put(format!("{i}.narinfo"), file(60 << 10), Instant::now());
            let held = hot.held.lock().unwrap();
            assert!(held.bytes <= HOT_BYTES);
            assert_eq!(held.bytes, held.bytes_of());
        }
        assert!(hot
            .get(&format!("{}.narinfo", HOT_BYTES / (60 << 10) + 9))
            .is_some());
    }
}
