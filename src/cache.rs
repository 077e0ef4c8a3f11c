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
//! request; a larger one streams as a multipart upload (parts sized for its expected
//! size, see [`crate::parts`]) to a name of its own and is then moved to its final
//! name: renamed in a local folder or on a WebDAV server; copied server-side and
//! deleted on S3, GCS and Azure, where a NAR too big to copy (S3 copies at most 5 GiB,
//! [`COPY_LIMIT`]) keeps its own name `nar/<uuid>.nar.zst`, which the narinfo's URL
//! then names (Nix follows the URL; the FileHash is the same). Puts are atomic on every backend, so no reader ever sees a
//! partial object; an abandoned multipart upload is aborted.
//!
//! In a local folder every write is durable when it returns (object_store's fsync
//! option): a file's data is fsync'd before it is renamed or linked into its name, and
//! its directory after. Since a narinfo is written only once its NAR's commit and its
//! references' narinfos have returned, what a power cut leaves is a cache Nix accepts,
//! and the queue lets a path go only once it is on disk.
//!
//! A process killed mid-write leaves staging files in a local folder (object_store's
//! `<object>#<N>`, our `nar/tmp-<uuid>.part`): [`Cache::prepare`] removes the stale
//! ones (see [`LEFTOVER_AGE`]). On S3 and GCS it leaves an incomplete multipart upload,
//! which no reader sees and object_store cannot list: a bucket lifecycle rule expires it.
//! On Azure it leaves uncommitted blocks, which Azure discards after a week.
//! A WebDAV server has no multipart upload: there a large NAR is held in memory and put
//! in one request (see [`crate::webdav`]); a kill between that put and the rename leaves
//! a `nar/tmp-<uuid>.part` no narinfo names.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::{GcpCredential, GoogleCloudStorageBuilder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutPayloadMut,
    RetryConfig, StaticCredentialProvider,
};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::cache_info::CacheInfo;
use crate::cache_url::{self, CacheUrl};
use crate::http_auth::AuthFile;
use crate::parts::{self, PartSizes};
use crate::pushback::Pushback;
use crate::rate::RateLimit;
use crate::stats::Stats;
use crate::store_path::StorePath;
use crate::webdav::WebDav;

/// NARs whose compressed size fits here are uploaded with one put.
pub const SMALL_NAR: usize = 8 << 20;
/// Multipart parts in flight per upload.
const PARTS_IN_FLIGHT: usize = 2;
// A multipart upload starts only past SMALL_NAR, so it always has at least two parts:
// a NAR that would fit one part goes in one put.
const _: () = assert!(SMALL_NAR as u64 >= parts::MIN_PART);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    BadUrl(#[from] cache_url::Error),
    #[error("cache {url}: {reason}")]
    Setup { url: String, reason: String },
    /// A start-up check failed, with what that most likely means.
    #[error("{diagnosis}: {cause}")]
    Unusable {
        diagnosis: &'static str,
        cause: Box<Error>,
    },
    #[error("the cache's nix-cache-info says StoreDir {cache}, but this store is {ours}")]
    StoreDirMismatch { cache: String, ours: String },
    /// The object_store error is shown, not chained: its text already holds its causes.
    #[error("cache {url}: {op} {key}: {cause}")]
    Backend {
        url: String,
        op: &'static str,
        key: String,
        cause: Box<object_store::Error>,
    },
    /// A write that held up the other caches of the same NAR for this long.
    #[error("a write stalled for {}s while other caches waited", .0.as_secs())]
    Stalled(std::time::Duration),
}

impl Error {
    /// Whether the cache could not be reached at all (not: it answered no).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            Error::Unusable {
                diagnosis: UNREACHABLE,
                ..
            }
        )
    }

    /// What a failed request most likely means, for start-up messages.
    pub fn diagnosis(&self) -> Option<&'static str> {
        let Error::Backend { cause, .. } = self else {
            return None;
        };
        // The variant names (Debug) and the server's words (Display).
        let text = format!("{cause:?} {cause}");
        Some(match **cause {
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => "the credentials were rejected",
            _ if text.contains("NoSuchBucket") => "the bucket does not exist",
            _ if text.contains("ContainerNotFound") => "the container does not exist",
            // Azure without keys in the environment asks for a managed identity's token.
            _ if text.contains("Error performing token request") => {
                "no credentials in the environment, and no managed identity answered"
            }
            _ if text.contains("SignatureDoesNotMatch")
                || text.contains("InvalidAccessKeyId")
                || text.contains("AccessDenied") =>
            {
                "the credentials were rejected"
            }
            object_store::Error::NotFound { .. } => "the bucket does not exist",
            _ if text.contains("status code: 405") => {
                "the server refuses uploads there (WebDAV PUT and DELETE not enabled?)"
            }
            _ if text.contains("onnect") || text.contains("dns") || text.contains("imed out") => {
                UNREACHABLE
            }
            _ => return None,
        })
    }
}

const UNREACHABLE: &str = "the endpoint cannot be reached";

/// Written and deleted at start when nix-cache-info already exists, to check write
/// access.
pub const WRITE_CHECK: &str = ".narpipe-write-check";

/// How old (since last modified) a leftover of an interrupted upload in a local folder
/// must be before [`Cache::prepare`] removes it. Another uploader may be writing into
/// the same folder right now: its staging files grow as its NAR streams (a part every
/// 8 MiB) and are renamed the moment they are complete, so one untouched for an hour
/// belongs to a process that is gone (assuming the writers' clocks agree).
pub const LEFTOVER_AGE: Duration = Duration::from_secs(3600);

/// Where a large NAR streams before it is renamed to its final name.
const TMP_NAR_PREFIX: &str = "tmp-";
const TMP_NAR_SUFFIX: &str = ".part";

/// Where the credentials for HTTP caches are: a file, or its text in the environment
/// (see [`crate::http_auth`]).
pub const HTTP_AUTH_FILE_VAR: &str = "NARPIPE_HTTP_AUTH_FILE";
pub const HTTP_AUTH_VAR: &str = "NARPIPE_HTTP_AUTH";

/// The `Authorization` header for the HTTP cache at `url`, if the credentials name its
/// host.
fn http_authorization(url: &str) -> Result<Option<http::HeaderValue>, String> {
    let var = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let (source, text) = match (var(HTTP_AUTH_FILE_VAR), var(HTTP_AUTH_VAR)) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "set {HTTP_AUTH_FILE_VAR} or {HTTP_AUTH_VAR}, not both"
            ))
        }
        (Some(file), None) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("{HTTP_AUTH_FILE_VAR}: cannot read {file}: {e}"))?;
            (file, text)
        }
        (None, Some(text)) => (format!("${HTTP_AUTH_VAR}"), text),
        (None, None) => return Ok(None),
    };
    let auth = AuthFile::parse(&text).map_err(|e| format!("credentials in {source}: {e}"))?;
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let host = parsed.host_str().unwrap_or_default();
    let Some(credential) = auth.for_host(host, parsed.port_or_known_default()) else {
        return Ok(None);
    };
    let mut value = http::HeaderValue::from_str(&credential.header()).map_err(|_| {
        format!("credentials in {source} for {host}: characters an HTTP header cannot carry")
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The object name of a path's narinfo.
pub fn narinfo_key(p: &StorePath) -> String {
    format!("{}.narinfo", p.hash_part())
}

/// The object name of a path's NAR listing.
pub fn listing_key(p: &StorePath) -> String {
    format!("{}.ls", p.hash_part())
}

#[derive(Clone)]
pub struct Cache {
    /// Set at open, except for a local folder that does not exist yet: made once it
    /// does (see [`Cache::store`]), so that opening creates nothing.
    store: Arc<OnceLock<Arc<dyn ObjectStore>>>,
    prefix: Option<Path>,
    /// For logs: no credentials in it.
    url: String,
    /// As given, to open the same cache again with other settings.
    raw: String,
    /// Whether the backend keeps Content-Type (the local filesystem doesn't).
    attributes: bool,
    /// A local folder's directory: look-ups there are stats (see `exist_local`).
    local_dir: Option<std::path::PathBuf>,
    /// Where big NARs stream before they are published.
    staging: Staging,
    /// When the server says to slow down (see [`crate::pushback`]).
    pushback: Arc<Pushback>,
    /// The run's cap on bytes written, shared with its other caches.
    rate: Option<Arc<RateLimit>>,
    cleanups: TaskTracker,
    /// Set once [`Cache::prepare`] has succeeded.
    prepared: Arc<OnceLock<()>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cache({})", self.url)
    }
}

/// Transient failures (5xx, throttling, resets, timeouts) are retried with exponential
/// backoff and jitter by object_store itself; throttling also passes through
/// [`crate::pushback`], which waits out the server's Retry-After and sends fewer
/// requests at once.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: Duration::from_secs(180),
    }
}

/// For the start-up check: say quickly that the endpoint is unreachable.
fn probe_retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 1,
        retry_timeout: Duration::from_secs(10),
    }
}

fn client_options(connect: Duration) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(connect)
        .with_timeout(Duration::from_secs(300))
}

impl Cache {
    /// Opens a cache URL (see [`crate::cache_url`]). Contacts and creates nothing: a
    /// local folder that does not exist yet is created by [`Cache::prepare`], after
    /// everything else that can fail at start was checked.
    pub fn open(url: &str) -> Result<Self, Error> {
        Self::open_with(url, retry_config(), client_options(Duration::from_secs(10)))
    }

    /// The same cache with few retries and short timeouts, for start-up checks.
    pub fn probe(&self) -> Result<Self, Error> {
        Self::open_with(
            &self.raw,
            probe_retry_config(),
            client_options(Duration::from_secs(3)),
        )
    }

    fn open_with(url: &str, retry: RetryConfig, client: ClientOptions) -> Result<Self, Error> {
        let parsed: CacheUrl = url.parse()?;
        let shown = parsed.to_string();
        let pushback = Pushback::new(&shown);
        let setup = |reason: String| Error::Setup {
            url: shown.clone(),
            reason,
        };
        let (store, prefix, attributes): (OnceLock<Arc<dyn ObjectStore>>, Option<String>, bool) =
            match &parsed {
                CacheUrl::File { dir } => {
                    let store = OnceLock::new();
                    if std::path::Path::new(dir).exists() {
                        let _ = store.set(local_store(dir.as_ref()).map_err(setup)?);
                    }
                    (store, None, false)
                }
                CacheUrl::S3 {
                    bucket,
                    prefix,
                    region,
                    endpoint,
                    profile,
                } => {
                    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                    let creds = aws_profile::resolve(profile.as_deref()).map_err(setup)?;
                    if let Some(c) = &creds {
                        b = b
                            .with_access_key_id(&c.access_key_id)
                            .with_secret_access_key(&c.secret_access_key);
                        if let Some(t) = &c.session_token {
                            b = b.with_token(t);
                        }
                    }
                    let env_region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
                        .iter()
                        .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()));
                    let region = region
                        .clone()
                        .or(env_region)
                        .or_else(|| creds.as_ref().and_then(|c| c.region.clone()))
                        .unwrap_or_else(|| "us-east-1".to_string());
                    b = b.with_region(region);
                    let mut client = client;
                    if let Some(ep) = endpoint {
                        // MinIO, SeaweedFS, Ceph, R2…: path-style requests to the endpoint.
                        b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
                        client = client.with_allow_http(ep.starts_with("http://"));
                    }
                    let store = b
                        .with_retry(retry)
                        .with_client_options(client)
                        .with_http_connector(pushback.connector())
                        .build()
                        .map_err(|e| setup(e.to_string()))?;
                    (
                        OnceLock::from(Arc::new(store) as Arc<dyn ObjectStore>),
                        prefix.clone(),
                        true,
                    )
                }
                CacheUrl::Azure {
                    container,
                    prefix,
                    account,
                    endpoint,
                } => {
                    // Keys, SAS, client secrets, managed identity: AZURE_* as object_store
                    // reads them.
                    let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container);
                    if let Some(a) = account {
                        b = b.with_account(a);
                    }
                    let mut client = client;
                    if let Some(ep) = endpoint {
                        b = b.with_endpoint(ep.clone());
                        client = client.with_allow_http(ep.starts_with("http://"));
                    }
                    let store = b
                        .with_retry(retry)
                        .with_client_options(client)
                        .with_http_connector(pushback.connector())
                        .build()
                        .map_err(|e| setup(e.to_string()))?;
                    (
                        OnceLock::from(Arc::new(store) as Arc<dyn ObjectStore>),
                        prefix.clone(),
                        true,
                    )
                }
                CacheUrl::Http { url } => {
                    let mut client = client.with_allow_http(url.starts_with("http://"));
                    if let Some(value) = http_authorization(url).map_err(setup)? {
                        let mut headers = http::HeaderMap::new();
                        headers.insert(http::header::AUTHORIZATION, value);
                        client = client.with_default_headers(headers);
                    }
                    let store = WebDav::new(url, client, retry, pushback.connector())
                        .map_err(|e| setup(e.to_string()))?;
                    (
                        OnceLock::from(Arc::new(store) as Arc<dyn ObjectStore>),
                        None,
                        true,
                    )
                }
                CacheUrl::Gcs {
                    bucket,
                    prefix,
                    service_account,
                    endpoint,
                    anonymous,
                } => {
                    let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
                    if let Some(sa) = service_account {
                        b = b.with_service_account_path(sa);
                    }
                    if let Some(ep) = endpoint {
                        b = b.with_base_url(ep);
                    }
                    if *anonymous {
                        // No token at all: not even a metadata-server look-up.
                        b = b.with_credentials(Arc::new(StaticCredentialProvider::new(
                            GcpCredential {
                                bearer: String::new(),
                            },
                        )));
                    }
                    let client = match endpoint {
                        Some(ep) if ep.starts_with("http://") => client.with_allow_http(true),
                        _ => client,
                    };
                    let store = b
                        .with_retry(retry)
                        .with_client_options(client)
                        .with_http_connector(pushback.connector())
                        .build()
                        .map_err(|e| setup(e.to_string()))?;
                    (
                        OnceLock::from(Arc::new(store) as Arc<dyn ObjectStore>),
                        prefix.clone(),
                        true,
                    )
                }
            };
        Ok(Cache {
            store: Arc::new(store),
            prefix: prefix.map(Path::from),
            url: shown,
            raw: url.to_string(),
            attributes,
            local_dir: match &parsed {
                CacheUrl::File { dir } => Some(dir.into()),
                _ => None,
            },
            staging: match &parsed {
                // A WebDAV MOVE is a rename on the server, at any size.
                CacheUrl::File { .. } | CacheUrl::Http { .. } => Staging::Rename,
                _ => Staging::CopyUpTo(COPY_LIMIT),
            },
            pushback,
            rate: None,
            cleanups: TaskTracker::new(),
            prepared: Arc::default(),
        })
    }

    /// The same cache, writing under `rate`, a cap it shares with the run's other
    /// caches (see [`crate::rate`]).
    pub fn with_rate_limit(mut self, rate: Option<Arc<RateLimit>>) -> Self {
        self.rate = rate;
        self
    }

    /// Counts the requests this cache refuses (429, 503) into `stats`.
    pub fn count_into(&self, stats: &Arc<Stats>) {
        self.pushback.count_into(stats.clone());
    }

    /// Waits until `bytes` may be written (see [`Cache::with_rate_limit`]).
    async fn rate(&self, bytes: usize) {
        if let Some(rate) = &self.rate {
            rate.take(bytes).await;
        }
    }

    /// Checks the cache before any work is accepted: reachable, readable, writable, and
    /// made for `store_dir` (creates a missing local folder, writes nix-cache-info when
    /// missing, with `priority`), then removes the leftovers of interrupted uploads
    /// from a local folder once they are [`LEFTOVER_AGE`] old. Fails fast: few
    /// retries.
    pub async fn prepare(&self, store_dir: &str, priority: u32) -> Result<(), Error> {
        if let Some(dir) = &self.local_dir {
            let made = dir.clone();
            tokio::task::spawn_blocking(move || create_dir_durably(&made))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                .map_err(|e| Error::Setup {
                    url: self.url.clone(),
                    reason: format!("cannot create {}: {e}", dir.display()),
                })?;
        }
        let probe = self.probe()?;
        let explain = |e: Error| match e.diagnosis() {
            Some(diagnosis) => Error::Unusable {
                diagnosis,
                cause: Box::new(e),
            },
            None => e,
        };
        let ours = store_dir.to_string();
        match probe.get("nix-cache-info").await.map_err(explain)? {
            Some(text) => {
                let existing = CacheInfo::parse(&String::from_utf8_lossy(&text));
                if let Some(theirs) = existing.store_dir {
                    if theirs != ours {
                        return Err(Error::StoreDirMismatch {
                            cache: theirs,
                            ours,
                        });
                    }
                }
                // Prove we may write before accepting paths (a hidden, tiny object,
                // removed again: a cache is left as it was found).
                probe
                    .put(WRITE_CHECK, Bytes::from_static(b"narpipe\n"), "text/plain")
                    .await
                    .map_err(explain)?;
                match probe.store()?.delete(&probe.key(WRITE_CHECK)).await {
                    // Another uploader starting at the same moment removed it.
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => log::warn!("cannot remove {WRITE_CHECK} from {}: {e}", self.url),
                }
            }
            None => {
                let fresh = CacheInfo::new(&ours, priority).to_string();
                probe
                    .create(
                        "nix-cache-info",
                        Bytes::from(fresh),
                        "text/x-nix-cache-info",
                    )
                    .await
                    .map_err(explain)?;
            }
        }
        // In the background: listing a folder of 100,000 NARs takes a while, and only
        // files an hour old are touched, which no work of this run can be.
        if self.local_dir.is_some() {
            let this = self.clone();
            self.cleanups
                .spawn(async move { this.remove_leftovers(LEFTOVER_AGE, SystemTime::now()).await });
        }
        let _ = self.prepared.set(());
        Ok(())
    }

    /// Whether [`Cache::prepare`] has succeeded (in this run).
    pub fn is_prepared(&self) -> bool {
        self.prepared.get().is_some()
    }

    /// Removes from a local folder what uploads killed mid-write (kill -9, a second
    /// SIGTERM, power loss) left behind, when it is at least `min_age` old (by
    /// modification time) at `now`: object_store's staging files `<object>#<N>` of
    /// narinfos, nix-cache-info and NARs, and multipart NARs not renamed into place
    /// (`nar/tmp-<uuid>.part`). Anything younger may be another uploader's work in
    /// progress; anything else is not ours. Reports what it did; a failure to remove is
    /// a warning, never an error. Returns how many were removed. Remote caches: nothing
    /// to do here (see the module documentation).
    async fn remove_leftovers(&self, min_age: Duration, now: SystemTime) -> usize {
        let Some(dir) = self.local_dir.clone() else {
            return 0;
        };
        let swept = tokio::task::spawn_blocking(move || sweep(&dir, min_age, now)).await;
        let Ok(swept) = swept else {
            return 0;
        };
        if swept.removed > 0 {
            log::info!(
                "removed {} files left by interrupted uploads (untouched for {} min or more) from {}",
                swept.removed,
                min_age.as_secs() / 60,
                self.url
            );
        }
        if let Some(first) = &swept.first_failure {
            log::warn!(
                "cannot remove {} leftovers of interrupted uploads from {} ({first})",
                swept.failed,
                self.url
            );
        }
        swept.removed
    }

    /// The backend. A local folder's is made on first use, once the folder exists.
    fn store(&self) -> Result<&Arc<dyn ObjectStore>, Error> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        let dir = self
            .local_dir
            .as_ref()
            .expect("only a local folder's store is made after open");
        let made = local_store(dir).map_err(|reason| Error::Setup {
            url: self.url.clone(),
            reason,
        })?;
        Ok(self.store.get_or_init(|| made))
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A local folder's directory (None for other caches): `serve` reads its files
    /// directly, one blocking call for open, stat and read.
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        self.local_dir.as_deref()
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
            cause: Box::new(source),
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
        match self.store()?.head(&self.key(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("head", rel, e)),
        }
    }

    /// An object as a stream of chunks, None if it is missing.
    pub async fn get_stream(
        &self,
        rel: &str,
    ) -> Result<Option<futures::stream::BoxStream<'static, Result<Bytes, Error>>>, Error> {
        use futures::StreamExt;
        let res = match self.store()?.get(&self.key(rel)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("get", rel, e)),
        };
        let (url, key) = (self.url.clone(), rel.to_string());
        Ok(Some(
            res.into_stream()
                .map(move |r| {
                    r.map_err(|e| Error::Backend {
                        url: url.clone(),
                        op: "read",
                        key: key.clone(),
                        cause: Box::new(e),
                    })
                })
                .boxed(),
        ))
    }

    /// An object's metadata and, unless `head`, its bytes (those of `range` when one is
    /// given: the caller checks it against the size first), None if it is missing. One
    /// request; for `serve`.
    pub async fn read(
        &self,
        rel: &str,
        range: Option<std::ops::Range<u64>>,
        head: bool,
    ) -> Result<Option<Object>, Error> {
        use futures::StreamExt;
        let options = object_store::GetOptions {
            range: range.map(object_store::GetRange::Bounded),
            head,
            ..Default::default()
        };
        let res = match self.store()?.get_opts(&self.key(rel), options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(if head { "head" } else { "get" }, rel, e)),
        };
        let meta = Object {
            size: res.meta.size,
            last_modified: res.meta.last_modified.into(),
            e_tag: res.meta.e_tag.clone(),
            body: None,
        };
        if head {
            return Ok(Some(meta));
        }
        let (url, key) = (self.url.clone(), rel.to_string());
        let body = res
            .into_stream()
            .map(move |r| {
                r.map_err(|e| Error::Backend {
                    url: url.clone(),
                    op: "read",
                    key: key.clone(),
                    cause: Box::new(e),
                })
            })
            .boxed();
        Ok(Some(Object {
            body: Some(body),
            ..meta
        }))
    }

    /// The size of an object, None if it is missing.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>, Error> {
        match self.store()?.head(&self.key(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", rel, e)),
        }
    }

    /// Whether each of `rels` exists, for a local folder (None for other caches): one
    /// blocking call stats them all, where a look-up through object_store is a thread
    /// hand-off per object.
    pub async fn exist_local(&self, rels: Vec<String>) -> Option<Result<Vec<bool>, Error>> {
        let dir = self.local_dir.clone()?;
        let url = self.url.clone();
        let failed = move |reason: String| Error::Setup { url, reason };
        let stats = tokio::task::spawn_blocking(move || {
            rels.iter()
                .map(|rel| match std::fs::symlink_metadata(dir.join(rel)) {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(format!("cannot look up {rel}: {e}")),
                })
                .collect::<Result<Vec<bool>, String>>()
        })
        .await;
        Some(match stats {
            Ok(r) => r.map_err(failed),
            Err(e) => Err(failed(format!("look-ups stopped: {e}"))),
        })
    }

    /// The hash parts (decoded: 20 bytes each) of the narinfos in the cache, found by
    /// listing it (a request per 1,000 objects on S3 and GCS), or None when it holds
    /// more than `limit` objects: then asking path by path is cheaper.
    pub async fn narinfo_hashes(&self, limit: usize) -> Result<Option<HashSet<[u8; 20]>>, Error> {
        use futures::StreamExt;
        if let Some(dir) = self.local_dir.clone() {
            // A local folder: its top directory only, names only (object_store's listing
            // walks nar/ too and stats every file).
            let url = self.url.clone();
            return tokio::task::spawn_blocking(move || {
                let mut hashes = HashSet::new();
                let entries = std::fs::read_dir(&dir).map_err(|e| e.to_string())?;
                for (seen, entry) in entries.enumerate() {
                    if seen >= limit {
                        return Ok(None);
                    }
                    let name = entry.map_err(|e| e.to_string())?.file_name();
                    if let Some(hash) = name.to_str().and_then(narinfo_hash) {
                        hashes.insert(hash);
                    }
                }
                Ok(Some(hashes))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|reason| Error::Setup {
                url,
                reason: format!("cannot list it: {reason}"),
            });
        }
        let mut objects = self.store()?.list(self.prefix.as_ref());
        let root = self.prefix.as_ref().map_or(0, |p| p.parts().count());
        let mut hashes = HashSet::new();
        let mut seen = 0usize;
        while let Some(meta) = objects.next().await {
            let meta = meta.map_err(|e| self.err("list", "/", e))?;
            seen += 1;
            if seen > limit {
                return Ok(None);
            }
            if meta.location.parts().count() != root + 1 {
                continue; // below nar/, log/, …
            }
            if let Some(hash) = meta.location.filename().and_then(narinfo_hash) {
                hashes.insert(hash);
            }
        }
        Ok(Some(hashes))
    }

    /// Names of the objects at the cache root (not below `nar/`).
    pub async fn list_root(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .list_root_dated()
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Names of the objects at the cache root, with when each was last written.
    pub async fn list_root_dated(&self) -> Result<Vec<(String, SystemTime)>, Error> {
        let listing = self
            .store()?
            .list_with_delimiter(self.prefix.as_ref())
            .await
            .map_err(|e| self.err("list", "/", e))?;
        Ok(listing
            .objects
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                Some((name, m.last_modified.into()))
            })
            .collect())
    }

    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, Error> {
        let res = match self.store()?.get(&self.key(rel)).await {
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
        self.rate(data.len()).await;
        self.store()?
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
            .store()?
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

    /// A writer for one NAR file, committed under its final name later. `expected` is
    /// the most bytes the compressed NAR should have (its NarSize will do; 0: unknown):
    /// it sets the multipart part size (see [`crate::parts`]). `extension` (`.nar.zst`)
    /// ends the name a big NAR may be published under on a remote cache.
    pub fn nar_writer(&self, expected: u64, extension: &str) -> NarWriter {
        NarWriter {
            cache: self.clone(),
            sizes: PartSizes::for_expected(expected),
            extension: extension.to_string(),
            held: Vec::new(),
            held_len: 0,
            written: 0,
            multipart: None,
        }
    }

    /// Watches over a NAR [`NarWriter::commit`] put under a name of its own
    /// ([`Published::unique`]) until a narinfo is about to name it: dropped before
    /// [`Unclaimed::claim`] (a reference failed, the run stops…), it deletes it, as
    /// nothing else can refer to it. A content-addressed NAR is never deleted (another
    /// uploader's narinfo may point at it).
    pub fn unclaimed(&self, nar: &Published) -> Unclaimed {
        Unclaimed {
            cache: self.clone(),
            nar: nar.unique.then(|| nar.url.clone()),
        }
    }

    /// Waits (bounded) for aborts of abandoned multipart uploads to reach the backend.
    pub async fn finish_cleanups(&self, limit: std::time::Duration) {
        self.cleanups.close();
        let _ = tokio::time::timeout(limit, self.cleanups.wait()).await;
    }

    /// Aborts an unfinished multipart upload, on a task of its own (see
    /// [`Cache::finish_cleanups`]).
    fn abandon(&self, mp: Multipart) {
        let Multipart {
            mut upload,
            in_flight,
            ..
        } = mp;
        // Dropping the set stops the parts still being sent.
        drop(in_flight);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            self.cleanups.spawn_on(
                async move {
                    let _ = upload.abort().await;
                },
                &handle,
            );
        }
    }
}

/// What [`Cache::read`] found.
pub struct Object {
    /// Of the whole object.
    pub size: u64,
    pub last_modified: SystemTime,
    pub e_tag: Option<String>,
    /// The bytes asked for; None for a head.
    pub body: Option<futures::stream::BoxStream<'static, Result<Bytes, Error>>>,
}

/// Where a multipart NAR streams before it is published (its FileHash, hence its
/// content-addressed name, is known only at the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staging {
    /// A local folder or a WebDAV server: to `nar/tmp-<uuid>.part`, renamed into place
    /// (atomic, any size).
    Rename,
    /// S3, GCS, Azure: to `nar/<uuid>.nar.zst`, a name of its own that is as good a
    /// final name as any (Nix follows the narinfo's URL), then copied server-side to
    /// its content-addressed name when it is at most this big; else, or when the copy
    /// fails, it stays where it is.
    CopyUpTo(u64),
}

/// The largest object narpipe copies server-side: S3's CopyObject limit (and that of
/// S3-compatible stores such as OSS and OBS). It applies to every remote cache; a
/// smaller limit of another server shows as a failed copy, which publishes the NAR
/// under its own name all the same.
pub const COPY_LIMIT: u64 = 5 << 30;

/// Where [`NarWriter::commit`] put a NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The object name, relative to the cache: the narinfo's URL.
    pub url: String,
    /// Named for this upload alone (`nar/<uuid>.nar.zst`), not by its content: no
    /// other uploader writes or refers to it (see [`Cache::unclaimed`]).
    pub unique: bool,
}

/// See [`Cache::unclaimed`].
#[must_use]
#[derive(Debug)]
pub struct Unclaimed {
    cache: Cache,
    /// The NAR to delete on drop.
    nar: Option<String>,
}

impl Unclaimed {
    /// A narinfo is about to name the NAR: it stays. Called before the narinfo is
    /// written, since a write that fails may still have landed.
    pub fn claim(&mut self) {
        self.nar = None;
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        let Some(rel) = self.nar.take() else {
            return;
        };
        let (Ok(store), Ok(handle)) = (
            self.cache.store().cloned(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let (key, url) = (self.cache.key(&rel), self.cache.url.clone());
        self.cache.cleanups.spawn_on(
            async move {
                if let Err(e) = store.delete(&key).await {
                    log::warn!("cannot remove {rel}, which no narinfo names, from {url}: {e}");
                }
            },
            &handle,
        );
    }
}

/// A multipart upload under way: parts are cut as [`PartSizes`] says and sent,
/// [`PARTS_IN_FLIGHT`] at a time, each on a task of its own.
struct Multipart {
    /// Where the NAR streams (see [`Staging`]).
    name: String,
    upload: Box<dyn MultipartUpload>,
    sizes: PartSizes,
    /// Parts handed to the backend so far.
    sent: u64,
    /// The next part, as it fills.
    part: PutPayloadMut,
    in_flight: JoinSet<Result<(), object_store::Error>>,
}

impl Multipart {
    /// Adds `data`, sending each part once it is full; waits while the parts in
    /// flight are as many as allowed.
    async fn put(&mut self, mut data: Bytes) -> Result<(), object_store::Error> {
        while !data.is_empty() {
            let room = self.sizes.size(self.sent) as usize - self.part.content_length();
            if data.len() < room {
                self.part.push(data);
                return Ok(());
            }
            // Exactly the part size: R2 wants every part but the last of one size.
            self.part.push(data.split_to(room));
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<(), object_store::Error> {
        if self.sent >= parts::MAX_PARTS {
            return Err(object_store::Error::Generic {
                store: "narpipe",
                source: format!("the NAR needs more than {} parts", parts::MAX_PARTS).into(),
            });
        }
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.join_one().await?;
        }
        let part = std::mem::take(&mut self.part).freeze();
        self.in_flight.spawn(self.upload.put_part(part));
        self.sent += 1;
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), object_store::Error> {
        match self.in_flight.join_next().await {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(object_store::Error::Generic {
                store: "narpipe",
                source: Box::new(e),
            }),
        }
    }

    /// Sends the last part, waits for every part, and completes the upload.
    async fn finish(&mut self) -> Result<(), object_store::Error> {
        if !self.part.is_empty() {
            self.send().await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        self.upload.complete().await.map(|_| ())
    }
}

/// Receives a compressed NAR in pieces, kept as they come (never copied). Dropping it
/// without [`NarWriter::commit`] leaves nothing behind: held pieces are freed, a
/// multipart upload is aborted.
pub struct NarWriter {
    cache: Cache,
    sizes: PartSizes,
    extension: String,
    held: Vec<Bytes>,
    held_len: usize,
    /// Bytes received so far.
    written: u64,
    multipart: Option<Multipart>,
}

impl NarWriter {
    pub async fn write(&mut self, data: Bytes) -> Result<(), Error> {
        self.cache.rate(data.len()).await;
        self.written += data.len() as u64;
        if let Some(mp) = &mut self.multipart {
            return mp
                .put(data)
                .await
                .map_err(|e| self.cache.err("upload part of", &mp.name, e));
        }
        if self.held_len + data.len() <= SMALL_NAR {
            self.held_len += data.len();
            self.held.push(data);
            return Ok(());
        }
        let id = uuid::Uuid::new_v4();
        let name = match self.cache.staging {
            Staging::Rename => format!("nar/{TMP_NAR_PREFIX}{id}{TMP_NAR_SUFFIX}"),
            Staging::CopyUpTo(_) => format!("nar/{id}{}", self.extension),
        };
        // Started on its own task: if this writer is dropped while the upload is being
        // created, the task still sees it through and aborts it, leaving nothing behind.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let store = self.cache.store()?.clone();
        let key = self.cache.key(&name);
        let opts = PutMultipartOptions {
            attributes: self
                .cache
                .put_opts("application/x-nix-nar", PutMode::Overwrite)
                .attributes,
            ..Default::default()
        };
        self.cache.cleanups.spawn(async move {
            let created = store.put_multipart_opts(&key, opts).await;
            if let Err(Ok(mut orphan)) = tx.send(created) {
                let _ = orphan.abort().await;
            }
        });
        let upload = rx
            .await
            .map_err(|_| {
                self.cache.err(
                    "start multipart upload of",
                    &name,
                    object_store::Error::Generic {
                        store: "narpipe",
                        source: "the task starting the upload vanished".into(),
                    },
                )
            })?
            .map_err(|e| self.cache.err("start multipart upload of", &name, e))?;
        let mp = self.multipart.insert(Multipart {
            name,
            upload,
            sizes: self.sizes,
            sent: 0,
            part: PutPayloadMut::new(),
            in_flight: JoinSet::new(),
        });
        self.held_len = 0;
        for piece in self.held.drain(..).chain([data]) {
            mp.put(piece)
                .await
                .map_err(|e| self.cache.err("upload part of", &mp.name, e))?;
        }
        Ok(())
    }

    /// Publishes the NAR under `rel`, its content-addressed final name; or, on a
    /// remote cache, a NAR too big for a server-side copy (over [`COPY_LIMIT`]) or
    /// whose copy failed stays under the unique name it streamed to. Returns where it
    /// went.
    pub async fn commit(mut self, rel: &str) -> Result<Published, Error> {
        let cache = self.cache.clone();
        let content_named = Published {
            url: rel.to_string(),
            unique: false,
        };
        let Some(mut mp) = self.multipart.take() else {
            let payload = std::mem::take(&mut self.held).into_iter().collect();
            return cache
                .store()?
                .put_opts(
                    &cache.key(rel),
                    payload,
                    cache.put_opts("application/x-nix-nar", PutMode::Overwrite),
                )
                .await
                .map(|_| content_named)
                .map_err(|e| cache.err("put", rel, e));
        };
        if let Err(e) = mp.finish().await {
            let err = cache.err("complete multipart upload of", &mp.name, e);
            cache.abandon(mp);
            return Err(err);
        }
        let store = cache.store()?;
        let (from, to) = (cache.key(&mp.name), cache.key(rel));
        match cache.staging {
            Staging::Rename => {
                // Same name means same bytes, so overwriting a concurrent writer's copy is harmless.
                let res = store
                    .rename(&from, &to)
                    .await
                    .map(|()| content_named)
                    .map_err(|e| cache.err("rename to", rel, e));
                if res.is_err() {
                    let _ = store.delete(&from).await;
                }
                res
            }
            Staging::CopyUpTo(limit) if self.written > limit => Ok(Published {
                url: mp.name,
                unique: true,
            }),
            Staging::CopyUpTo(_) => match store.copy(&from, &to).await {
                Ok(()) => {
                    if let Err(e) = store.delete(&from).await {
                        log::warn!(
                            "cannot remove {} from {} after copying it to {rel}: {e}",
                            mp.name,
                            cache.url
                        );
                    }
                    Ok(content_named)
                }
                Err(e) => {
                    // It is complete where it is: publish it there rather than fail.
                    log::warn!(
                        "cache {}: cannot copy {} to {rel}, so it is published under its upload name: {e}",
                        cache.url,
                        mp.name
                    );
                    Ok(Published {
                        url: mp.name,
                        unique: true,
                    })
                }
            },
        }
    }
}

impl Drop for NarWriter {
    fn drop(&mut self) {
        if let Some(mp) = self.multipart.take() {
            self.cache.abandon(mp);
        }
    }
}

/// A local folder as an object store. The folder must exist.
fn local_store(dir: &std::path::Path) -> Result<Arc<dyn ObjectStore>, String> {
    // object_store only says "unable to canonicalize": say why.
    std::fs::canonicalize(dir).map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    let store = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| e.to_string())?
        .with_automatic_cleanup(false)
        .with_fsync(true);
    Ok(Arc::new(store))
}

/// Creates `dir` and the folders above it that are missing, each fsync'd into its
/// parent: a power cut must not lose the folder a cache's files are in.
fn create_dir_durably(dir: &std::path::Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.exists() {
        missing.push(at);
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    for made in missing {
        let parent = match made.parent() {
            Some(p) if p.as_os_str().is_empty() => std::path::Path::new("."),
            Some(p) => p,
            None => continue,
        };
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// What [`sweep`] did.
#[derive(Debug, Default, PartialEq)]
struct Swept {
    removed: usize,
    failed: usize,
    /// The first removal that failed, with its reason.
    first_failure: Option<String>,
}

/// Removes the leftovers (see [`is_leftover`]) in a local folder's top directory and
/// its `nar/`, `log/` and `realisations/` that were last modified at least `min_age`
/// before `now`.
fn sweep(dir: &std::path::Path, min_age: Duration, now: SystemTime) -> Swept {
    let mut swept = Swept::default();
    let subs = [
        (dir.to_path_buf(), false),
        (dir.join("nar"), true),
        (dir.join("log"), true),
        (dir.join("realisations"), true),
    ];
    for (sub, in_sub) in subs {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue; // not made yet; an unreadable folder failed the start-up check
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| is_leftover(in_sub, n)) {
                continue;
            }
            let path = entry.path();
            let stale = std::fs::symlink_metadata(&path)
                .and_then(|m| {
                    Ok(m.is_file()
                        && now
                            .duration_since(m.modified()?)
                            .is_ok_and(|age| age >= min_age))
                })
                .unwrap_or(false);
            if !stale {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => swept.removed += 1,
                // Another uploader starting now removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    swept.failed += 1;
                    swept
                        .first_failure
                        .get_or_insert_with(|| format!("{}: {e}", path.display()));
                }
            }
        }
    }
    swept
}

/// Whether a file named `name` in a local folder's top directory (`in_sub` false) or
/// in one of its folders that hold only what narpipe (or Nix) names, `nar/`, `log/`
/// and `realisations/` (`in_sub` true), is what a narpipe upload leaves when it is
/// killed mid-write: object_store's staging file `<object>#<N>` of a narinfo, `.ls`
/// listing, nix-cache-info or the write check (top) or of any object there
/// (object_store refuses such names for objects, so no cache holds one), or a multipart
/// NAR completed and not yet renamed, `nar/tmp-<uuid>.part`.
fn is_leftover(in_sub: bool, name: &str) -> bool {
    let staged = name
        .rsplit_once('#')
        .filter(|(base, n)| {
            !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
        .map(|(base, _)| base);
    if !in_sub {
        return staged.is_some_and(|base| {
            base.ends_with(".narinfo")
                || base.ends_with(".ls")
                || base == "nix-cache-info"
                || base == WRITE_CHECK
        });
    }
    staged.is_some()
        || name
            .strip_prefix(TMP_NAR_PREFIX)
            .and_then(|rest| rest.strip_suffix(TMP_NAR_SUFFIX))
            .is_some_and(|id| uuid::Uuid::try_parse(id).is_ok())
}

/// The decoded hash part of a narinfo's object name.
fn narinfo_hash(name: &str) -> Option<[u8; 20]> {
    crate::store_path::decode_hash_part(name.strip_suffix(".narinfo")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prepare_writes_cache_info_once_and_leaves_no_write_check() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_str().unwrap()).unwrap();
        c.prepare("/nix/store", 41).await.unwrap();
        let info = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
        assert!(info.contains("StoreDir: /nix/store") && info.contains("Priority: 41"));
        // Present now: checked for the store and for write access, left as it was.
        c.prepare("/nix/store", 10).await.unwrap();
        let again = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
        assert_eq!(info, again);
        assert!(!dir.path().join(WRITE_CHECK).exists());
        let err = c.prepare("/other/store", 41).await.unwrap_err();
        assert!(matches!(err, Error::StoreDirMismatch { .. }), "{err}");
        assert!(err.to_string().contains("/other/store"), "{err}");
    }

    #[tokio::test]
    async fn urls() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("c");
        let c = Cache::open(&format!("file://{}", d.display())).unwrap();
        assert_eq!(c.url(), format!("file://{}", d.display()));
        // Opening creates nothing; using a missing folder says so instead of making it.
        assert!(!d.exists());
        let err = c.get("nix-cache-info").await.unwrap_err().to_string();
        assert!(err.contains("No such file"), "{err}");
        assert!(!d.exists());
        // The start-up check makes it.
        c.prepare("/nix/store", 40).await.unwrap();
        assert!(d.is_dir());
        assert!(c.get("nix-cache-info").await.unwrap().is_some());
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
        let mut w = c.nar_writer(0, ".nar");
        w.write(Bytes::from_static(b"sm")).await.unwrap();
        w.write(Bytes::from_static(b"all")).await.unwrap();
        let published = w.commit("nar/a.nar").await.unwrap();
        assert_eq!(
            published,
            Published {
                url: "nar/a.nar".into(),
                unique: false
            }
        );
        assert_eq!(c.get("nar/a.nar").await.unwrap().unwrap(), &b"small"[..]);

        // Exactly SMALL_NAR is still one put.
        let piece = Bytes::from(vec![7u8; 1 << 20]);
        let mut w = c.nar_writer(0, ".nar");
        for _ in 0..SMALL_NAR / piece.len() {
            w.write(piece.clone()).await.unwrap();
        }
        assert!(w.multipart.is_none());
        w.commit("nar/one.nar").await.unwrap();

        let mut w = c.nar_writer(0, ".nar");
        for _ in 0..(SMALL_NAR / piece.len() + 3) {
            w.write(piece.clone()).await.unwrap();
        }
        assert!(w.multipart.is_some());
        w.commit("nar/b.nar").await.unwrap();
        let got = c.get("nar/b.nar").await.unwrap().unwrap();
        assert_eq!(got.len(), SMALL_NAR + 3 * piece.len());

        let mut w = c.nar_writer(0, ".nar");
        for _ in 0..(SMALL_NAR / piece.len() + 3) {
            w.write(piece.clone()).await.unwrap();
        }
        drop(w);
        c.finish_cleanups(std::time::Duration::from_secs(5)).await;
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("nar"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.nar", "b.nar", "one.nar"]);
    }

    /// A multipart upload that records the sizes of its parts.
    #[derive(Debug, Default)]
    struct Recorder {
        parts: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    #[async_trait::async_trait]
    impl MultipartUpload for Recorder {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            self.parts.lock().unwrap().push(data.content_length());
            Box::pin(async { Ok(()) })
        }

        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            Ok(object_store::PutResult {
                e_tag: None,
                version: None,
                extensions: Default::default(),
            })
        }

        async fn abort(&mut self) -> object_store::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn parts_have_the_size_planned_for_the_expected_size() {
        const MIB: usize = 1 << 20;
        let recorder = Recorder::default();
        let parts = recorder.parts.clone();
        let mut mp = Multipart {
            name: "nar/x".into(),
            upload: Box::new(recorder),
            // 200 GiB expected: 23 MiB parts (see crate::parts).
            sizes: PartSizes::for_expected(200 << 30),
            sent: 0,
            part: PutPayloadMut::new(),
            in_flight: JoinSet::new(),
        };
        // 50 MiB in pieces of 3 MiB and a bit, cut exactly at part boundaries.
        let all = Bytes::from(vec![1u8; 50 * MIB]);
        for piece in all.chunks(3 * MIB + 5) {
            mp.put(all.slice_ref(piece)).await.unwrap();
        }
        mp.finish().await.unwrap();
        assert_eq!(*parts.lock().unwrap(), [23 * MIB, 23 * MIB, 4 * MIB]);
        assert_eq!(mp.sent, 3);
    }

    #[tokio::test]
    async fn big_nars_on_remote_caches_keep_their_own_name_when_too_big_to_copy() {
        // A local folder run as a remote cache is: upload under a unique name, then
        // copy. The copy limit is lowered from 5 GiB to 10 MiB.
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path().to_str().unwrap()).unwrap();
        c.staging = Staging::CopyUpTo(10 << 20);
        let nar_files = || {
            let mut names: Vec<String> = std::fs::read_dir(dir.path().join("nar"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let piece = Bytes::from(vec![7u8; 1 << 20]);
        let write = |mib: usize| {
            let c = c.clone();
            let piece = piece.clone();
            async move {
                let mut w = c.nar_writer(mib as u64 * piece.len() as u64, ".nar.zst");
                for _ in 0..mib {
                    w.write(piece.clone()).await.unwrap();
                }
                w
            }
        };

        // 9 MiB: streamed under its own name, copied to its content name, removed.
        let published = write(9).await.commit("nar/nine.nar.zst").await.unwrap();
        assert_eq!(published.url, "nar/nine.nar.zst");
        assert!(!published.unique);
        assert_eq!(nar_files(), ["nine.nar.zst"]);

        // 11 MiB: over the copy limit, so it stays where it streamed.
        let published = write(11).await.commit("nar/eleven.nar.zst").await.unwrap();
        assert!(published.unique);
        let name = published.url.strip_prefix("nar/").unwrap().to_string();
        let id = name.strip_suffix(".nar.zst").unwrap();
        assert!(uuid::Uuid::try_parse(id).is_ok(), "{name}");
        assert_eq!(nar_files(), [name.as_str(), "nine.nar.zst"]);
        let stored = c.get(&published.url).await.unwrap().unwrap();
        assert_eq!(stored.len(), 11 << 20);

        // A failed copy (here: nar/blocked is a file, not a folder) publishes it under
        // its own name too, rather than failing the path.
        std::fs::write(dir.path().join("nar/blocked"), b"").unwrap();
        let other = write(9)
            .await
            .commit("nar/blocked/x.nar.zst")
            .await
            .unwrap();
        assert!(other.unique, "{other:?}");
        assert!(c.exists(&other.url).await.unwrap());

        // Unique names are removed when no narinfo is going to name them; claimed
        // ones and content names never are.
        drop(c.unclaimed(&published));
        c.unclaimed(&other).claim();
        drop(c.unclaimed(&Published {
            url: "nar/nine.nar.zst".into(),
            unique: false,
        }));
        c.finish_cleanups(std::time::Duration::from_secs(5)).await;
        let other_name = other.url.strip_prefix("nar/").unwrap();
        let mut left = vec!["blocked", "nine.nar.zst", other_name];
        left.sort();
        assert_eq!(nar_files(), left);
    }

    #[test]
    fn leftovers_are_staging_files_of_our_objects_and_unrenamed_nars() {
        let tmp = format!("{TMP_NAR_PREFIX}{}{TMP_NAR_SUFFIX}", uuid::Uuid::new_v4());
        let narinfo = format!("{}.narinfo", "0".repeat(32));
        for (in_sub, name) in [
            (false, format!("{narinfo}#1")),
            (false, "nix-cache-info#12".to_string()),
            (false, format!("{WRITE_CHECK}#3")),
            (false, format!("{}.ls#4", "0".repeat(32))),
            (true, format!("{}.nar.zst#1", "1".repeat(52))),
            (true, "abc-hello.drv#1".to_string()),
            (true, "anything.nar.bz2#0".to_string()),
            (true, tmp.clone()),
            (true, format!("{tmp}#2")),
        ] {
            assert!(
                is_leftover(in_sub, &name),
                "{name} (in a subfolder: {in_sub})"
            );
        }
        for (in_sub, name) in [
            (false, narinfo.clone()),
            (false, "nix-cache-info".to_string()),
            (false, "notes#1".to_string()),
            (false, format!("{narinfo}#")),
            (false, format!("{narinfo}#1a")),
            (false, tmp.clone()),
            (true, format!("{}.nar.zst", "1".repeat(52))),
            (true, "#1".to_string()),
            (true, "tmp-not-a-uuid.part".to_string()),
            (true, format!("{tmp}.nar")),
        ] {
            assert!(
                !is_leftover(in_sub, &name),
                "{name} (in a subfolder: {in_sub})"
            );
        }
    }

    #[test]
    fn sweep_removes_only_stale_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let nar = dir.path().join("nar");
        let log = dir.path().join("log");
        let realisations = dir.path().join("realisations");
        for d in [&nar, &log, &realisations] {
            std::fs::create_dir_all(d).unwrap();
        }
        let narinfo = format!("{}.narinfo", "0".repeat(32));
        let tmp = format!("{TMP_NAR_PREFIX}{}{TMP_NAR_SUFFIX}", uuid::Uuid::new_v4());
        let leftovers = [
            dir.path().join(format!("{narinfo}#1")),
            dir.path().join(format!("{}.ls#2", "0".repeat(32))),
            nar.join(format!("{tmp}#1")),
            nar.join(&tmp),
            log.join("abc-hello.drv#1"),
            realisations.join("sha256:ab!out.doi#3"),
        ];
        let kept = [
            dir.path().join(&narinfo),
            dir.path().join("notes#1"),
            nar.join("x.nar.zst"),
            log.join("abc-hello.drv"),
            realisations.join("sha256:ab!out.doi"),
        ];
        for f in leftovers.iter().chain(&kept) {
            std::fs::write(f, b"x").unwrap();
        }
        let written = SystemTime::now();
        // Young: another uploader may be writing them.
        let swept = sweep(dir.path(), LEFTOVER_AGE, written + LEFTOVER_AGE / 2);
        assert_eq!(swept, Swept::default());
        assert!(leftovers.iter().all(|f| f.exists()));
        let swept = sweep(dir.path(), LEFTOVER_AGE, written + LEFTOVER_AGE * 2);
        assert_eq!(swept.removed, leftovers.len(), "{swept:?}");
        assert!(leftovers.iter().all(|f| !f.exists()));
        assert!(kept.iter().all(|f| f.exists()));
        // A folder without nar/ is fine.
        let bare = tempfile::tempdir().unwrap();
        assert_eq!(sweep(bare.path(), LEFTOVER_AGE, written), Swept::default());
    }

    #[tokio::test]
    async fn narinfo_hashes_lists_the_root_only_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_str().unwrap()).unwrap();
        let (a, b) = ("0".repeat(32), "1".repeat(32));
        for name in [
            format!("{a}.narinfo"),
            format!("{b}.narinfo"),
            "nix-cache-info".to_string(),
            "not-a-hash.narinfo".to_string(),
            format!("nar/{a}.narinfo"),
        ] {
            c.put(&name, Bytes::from_static(b"x"), "text/plain")
                .await
                .unwrap();
        }
        let got = c.narinfo_hashes(100).await.unwrap().unwrap();
        let decode = |h: &str| crate::store_path::decode_hash_part(h).unwrap();
        assert_eq!(got, HashSet::from([decode(&a), decode(&b)]));
        // Objects at the top: 4 files and nar/.
        assert!(c.narinfo_hashes(4).await.unwrap().is_none());
        assert!(c.narinfo_hashes(5).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn local_look_ups_in_one_call() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path().to_str().unwrap()).unwrap();
        c.put("a.narinfo", Bytes::from_static(b"x"), "text/plain")
            .await
            .unwrap();
        let got = c
            .exist_local(vec!["a.narinfo".into(), "b.narinfo".into()])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, [true, false]);
        let s3 = Cache::open("s3://b/p?endpoint=http://127.0.0.1:1").unwrap();
        assert!(s3.exist_local(vec!["a.narinfo".into()]).await.is_none());
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

/// AWS shared config profiles (`profile=` or `AWS_PROFILE`), which object_store does
/// not read itself: keys from the credentials file, region from the config file.
mod aws_profile {
    use ini::Ini;

    #[derive(Debug, PartialEq, Eq)]
    pub struct Creds {
        pub access_key_id: String,
        pub secret_access_key: String,
        pub session_token: Option<String>,
        pub region: Option<String>,
    }

    fn home_file(env: &str, rel: &str) -> Option<std::path::PathBuf> {
        std::env::var_os(env)
            .map(Into::into)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(rel)))
    }

    /// Explicit `profile=` always wins; `AWS_PROFILE` only when no keys are in the
    /// environment (as the AWS CLI does).
    pub fn resolve(explicit: Option<&str>) -> Result<Option<Creds>, String> {
        let from_env = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
        let keys_in_env = std::env::var_os("AWS_ACCESS_KEY_ID").is_some();
        let name = match (explicit, from_env) {
            (Some(p), _) => p.to_string(),
            (None, Some(p)) if !keys_in_env => p,
            _ => return Ok(None),
        };
        let cred_file = home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")
            .ok_or("cannot locate the AWS credentials file (no HOME)")?;
        let config_file = home_file("AWS_CONFIG_FILE", ".aws/config");
        let creds = Ini::load_from_file(&cred_file).map_err(|e| {
            format!(
                "AWS profile {name:?}: cannot read {}: {e}",
                cred_file.display()
            )
        })?;
        let config = config_file.and_then(|f| Ini::load_from_file(f).ok());
        from_ini(&name, &creds, config.as_ref())
            .ok_or_else(|| {
                format!(
                    "AWS profile {name:?} has no keys in {}",
                    cred_file.display()
                )
            })
            .map(Some)
    }

    pub fn from_ini(name: &str, creds: &Ini, config: Option<&Ini>) -> Option<Creds> {
        let sec = creds.section(Some(name))?;
        let region = config.and_then(|c| {
            let sec = if name == "default" {
                c.section(Some("default"))
            } else {
                c.section(Some(format!("profile {name}")))
            };
            sec.and_then(|s| s.get("region")).map(str::to_string)
        });
        Some(Creds {
            access_key_id: sec.get("aws_access_key_id")?.to_string(),
            secret_access_key: sec.get("aws_secret_access_key")?.to_string(),
            session_token: sec.get("aws_session_token").map(str::to_string),
            region,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_keys_and_region_of_a_profile() {
            let creds = Ini::load_from_str(
                "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n[ci]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=T\n",
            )
            .unwrap();
            let config = Ini::load_from_str(
                "[default]\nregion = eu-west-1\n[profile ci]\nregion=us-west-2\n",
            )
            .unwrap();
            let ci = from_ini("ci", &creds, Some(&config)).unwrap();
            assert_eq!(ci.access_key_id, "C");
            assert_eq!(ci.session_token.as_deref(), Some("T"));
            assert_eq!(ci.region.as_deref(), Some("us-west-2"));
            assert_eq!(
                from_ini("default", &creds, Some(&config))
                    .unwrap()
                    .region
                    .as_deref(),
                Some("eu-west-1")
            );
            assert!(from_ini("missing", &creds, None).is_none());
        }
    }
}
