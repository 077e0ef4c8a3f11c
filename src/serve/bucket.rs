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
