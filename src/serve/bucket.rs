//! Objects of a binary cache (folder, S3, GCS, Azure, HTTP), served as they are stored:
//! one backend request per answer (a range: a head for the size, then the bytes).

use futures::StreamExt;

use super::{range, Body, Error, Found, Part, Want};
use crate::cache::{self, Cache};
use crate::serve::route::Route;

pub struct Bucket {
    cache: Cache,
}

impl Bucket {
    pub fn new(cache: Cache) -> Bucket {
        Bucket { cache }
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
            return local_file(dir.join(&rel), want).await;
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

/// A file of a local folder cache: open, stat and (when small) read in one blocking
/// call, where object_store's local store takes one hand-off to the blocking pool per
/// step (narinfo latency under load is mostly those hand-offs).
async fn local_file(path: std::path::PathBuf, want: Want) -> Result<Option<Found>, Error> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::MetadataExt;
    let shown = path.display().to_string();
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<Option<_>> {
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        let size = meta.len();
        let range = match want {
            Want::Head => None,
            Want::All => Some(0..size),
            Want::Range(spec) => range::resolve(spec, size).ok(),
        };
        let mut data = None;
        if let Some(r) = &range {
            if r.end - r.start <= SMALL_FILE {
                file.seek(std::io::SeekFrom::Start(r.start))?;
                let mut buf = Vec::with_capacity((r.end - r.start) as usize);
                (&mut file).take(r.end - r.start).read_to_end(&mut buf)?;
                data = Some(bytes::Bytes::from(buf));
            } else {
                file.seek(std::io::SeekFrom::Start(r.start))?;
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
    let modified = meta.modified().ok();
    let nanos = modified
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let found = |part| Found {
        size: meta.len(),
        etag: Some(format!("\"{:x}-{nanos:x}-{:x}\"", meta.ino(), meta.len())),
        last_modified: modified,
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
