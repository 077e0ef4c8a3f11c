//! `serve`: a binary cache over HTTP, read from a cache (folder, S3, GCS, Azure, HTTP)
//! or made on the fly from this machine's Nix store.
//!
//! ```text
//! GET /nix-cache-info            ──▶ route (pure: only the layout's names) ──▶ source
//! GET /<hash>.narinfo                                                        ├ bucket: the object, one request
//! GET /nar/<name>.nar.zst  Range                                             └ local: Nix's path info, signed;
//!                                                                              NARs made on the engine's threads
//! ```
//! One module per concern: [`route`] (which names are served), [`range`] (Range
//! headers), [`bucket`] (a cache through [`crate::cache::Cache`]), [`proxy`] (a
//! bucket's answers kept on local disk, [`lru`] deciding what goes), [`local`] (the
//! local store), [`http`] (hyper: methods, headers, conditional and range requests,
//! shutdown), [`explorer`] (HTML pages at `/`). Read-only: nothing is ever written to the source. [`Counters`] are
//! what `--metrics-listen` shows.

pub mod bucket;
pub mod explorer;
pub mod http;
pub mod local;
pub mod lru;
pub mod proxy;
pub mod range;
pub mod route;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::SystemTime;

use bytes::Bytes;
use futures::stream::BoxStream;

use route::Route;

/// The bytes of an answer, as they come.
pub type Body = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// What a request asks of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Its metadata only (HEAD).
    Head,
    All,
    Range(range::Spec),
}

/// An object the source has.
pub struct Found {
    /// Of the whole object.
    pub size: u64,
    /// Quoted, as sent in the header.
    pub etag: Option<String>,
    pub last_modified: Option<SystemTime>,
    pub part: Part,
}

/// What of the object is sent.
pub enum Part {
    Head,
    All(Body),
    Range(Range<u64>, Body),
    Unsatisfiable,
}

impl Found {
    /// An answer held in memory.
    pub fn bytes(data: Bytes, etag: Option<String>, want: Want) -> Found {
        let size = data.len() as u64;
        let once = |b: Bytes| -> Body { Box::pin(futures::stream::once(async move { Ok(b) })) };
        let part = match want {
            Want::Head => Part::Head,
            Want::All => Part::All(once(data)),
            Want::Range(spec) => match range::resolve(spec, size) {
                Ok(r) => Part::Range(
                    r.clone(),
                    once(data.slice(r.start as usize..r.end as usize)),
                ),
                Err(_) => Part::Unsatisfiable,
            },
        };
        Found {
            size,
            etag,
            last_modified: None,
            part,
        }
    }
}

/// A strong ETag from some bytes that identify the content.
pub fn etag_of(data: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data);
    format!("\"{}\"", crate::nixbase32::encode(&digest[..16]))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
    #[error("asking Nix about {path}: {cause}")]
    Nix {
        path: String,
        cause: std::sync::Arc<crate::nix::Error>,
    },
    #[error("Nix's database {db}: {reason}")]
    Database { db: String, reason: String },
    #[error("NAR of {path}: {cause}")]
    Engine {
        path: String,
        cause: crate::engine::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// Where objects come from.
pub enum Source {
    Bucket(bucket::Bucket),
    /// A bucket behind the on-disk cache.
    Cached(proxy::Proxy),
    Local(local::LocalStore),
}

impl Source {
    pub async fn get(&self, route: &Route, want: Want) -> Result<Option<Found>, Error> {
        match self {
            Source::Bucket(b) => b.get(route, want).await,
            Source::Cached(p) => p.get(route, want).await,
            Source::Local(l) => l.get(route, want).await,
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Source::Bucket(b) => b.url().to_string(),
            Source::Cached(p) => format!("{} (kept on disk)", p.url()),
            Source::Local(l) => format!("the Nix store {}", l.store_dir().as_str()),
        }
    }
}

/// What `serve` counts, shown by `--metrics-listen`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub not_found: AtomicU64,
    pub errors: AtomicU64,
    /// Answers given from the on-disk cache (404s remembered included).
    pub hits: AtomicU64,
    /// Answers the on-disk cache asked the backend for.
    pub misses: AtomicU64,
    /// Bytes read from the backend through the on-disk cache.
    pub backend_bytes: AtomicU64,
    /// Body bytes sent to clients.
    pub served_bytes: AtomicU64,
    /// Bytes held in the on-disk cache.
    pub cache_bytes: AtomicU64,
}

impl Counters {
    /// Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: &AtomicU64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                value.load(Relaxed)
            ));
        };
        metric(
            "narpipe_serve_requests_total",
            "counter",
            "Requests answered.",
            &self.requests,
        );
        metric(
            "narpipe_serve_not_found_total",
            "counter",
            "Requests answered 404.",
            &self.not_found,
        );
        metric(
            "narpipe_serve_errors_total",
            "counter",
            "Requests the source failed to answer (502).",
            &self.errors,
        );
        metric(
            "narpipe_serve_cache_hits_total",
            "counter",
            "Answers from the on-disk cache, remembered 404s included.",
            &self.hits,
        );
        metric(
            "narpipe_serve_cache_misses_total",
            "counter",
            "Answers the on-disk cache had to ask the backend for.",
            &self.misses,
        );
        metric(
            "narpipe_serve_backend_bytes_total",
            "counter",
            "Bytes read from the backend through the on-disk cache.",
            &self.backend_bytes,
        );
        metric(
            "narpipe_serve_served_bytes_total",
            "counter",
            "Body bytes sent to clients.",
            &self.served_bytes,
        );
        metric(
            "narpipe_serve_cache_bytes",
            "gauge",
            "Bytes held in the on-disk cache.",
            &self.cache_bytes,
        );
        out
    }
}
