//! A WebDAV server as a cache: object_store's HTTP store plus what narpipe needs from a
//! destination that the HTTP store lacks or does in a way readers could see.
//!
//! ```text
//! narpipe needs         object_store's HttpStore      here
//! put, atomic           PUT                           PUT (servers write a temporary file
//!                                                     and rename it into place)
//! get, head, delete     GET, HEAD, DELETE             the same
//! create if absent      refuses PutMode::Create       HEAD, then PUT (nginx ignores
//!                                                     If-None-Match on PUT)
//! big NARs (multipart)  not implemented               parts held in memory, one PUT
//! rename tmp → final    COPY, then DELETE (a reader   MOVE (a rename on the server); COPY
//!                       may see a half-copied file)   and DELETE where MOVE is refused
//! listing               PROPFIND                      the same; refused (nginx without
//!                                                     dav-ext) → Error::NotSupported
//! ```
//! Credentials travel as a default `Authorization` header set in the client options
//! (see [`crate::http_auth`]), so every request, MOVE included, carries them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody};
use object_store::http::{HttpBuilder, HttpStore};
use object_store::path::Path;
use object_store::{
    Attributes, ClientOptions, CopyMode, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, RenameTargetMode, Result, RetryConfig,
    UploadPart,
};
use url::Url;

const STORE: &str = "WebDAV";
/// MOVE attempts on a dropped connection or a 5xx answer.
const MOVE_ATTEMPTS: u32 = 4;

#[derive(Debug)]
pub struct WebDav {
    inner: Arc<HttpStore>,
    client: HttpClient,
    base: Url,
}

impl std::fmt::Display for WebDav {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebDAV at {}", self.base)
    }
}

impl WebDav {
    /// The server at `url` (no credentials in it: they go in `options`' default headers),
    /// its requests made by `connector`'s clients.
    pub fn new(
        url: &str,
        options: ClientOptions,
        retry: RetryConfig,
        connector: impl HttpConnector,
    ) -> Result<WebDav> {
        let base = Url::parse(url).map_err(|e| generic(format!("URL {url:?}: {e}")))?;
        let client = connector.connect(&options)?;
        let inner = HttpBuilder::new()
            .with_url(url)
            .with_retry(retry)
            .with_client_options(options)
            .with_http_connector(connector)
            .build()?;
        Ok(WebDav {
            inner: Arc::new(inner),
            client,
            base,
        })
    }

    /// As object_store's HTTP store names objects.
    fn url_of(&self, location: &Path) -> String {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has a path")
            .extend(location.parts());
        url.to_string()
    }

    /// WebDAV MOVE: an atomic rename on the server. `Ok(false)` when the server does not
    /// support it.
    async fn move_object(&self, from: &Path, to: &Path, overwrite: bool) -> Result<bool> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = http::Request::builder()
                .method(http::Method::from_bytes(b"MOVE").expect("a valid method"))
                .uri(self.url_of(from))
                .header("Destination", self.url_of(to))
                .header("Overwrite", if overwrite { "T" } else { "F" })
                .body(HttpRequestBody::empty())
                .map_err(|e| generic(format!("MOVE {from}: {e}")))?;
            let again = attempt < MOVE_ATTEMPTS;
            let status = match self.client.execute(request).await {
                Ok(response) => response.status(),
                Err(_) if again => {
                    backoff(attempt).await;
                    continue;
                }
                Err(e) => return Err(generic(format!("MOVE {from} to {to}: {e}"))),
            };
            let failed = |why: &str| format!("MOVE {from} to {to}: {status} {why}");
            match status.as_u16() {
                200..=299 => return Ok(true),
                405 | 501 => return Ok(false),
                // An earlier attempt may have moved it before its answer was lost.
                404 if attempt > 1 && self.inner.head(to).await.is_ok() => return Ok(true),
                404 => {
                    return Err(object_store::Error::NotFound {
                        path: from.to_string(),
                        source: failed("").into(),
                    })
                }
                412 if !overwrite => {
                    return Err(object_store::Error::AlreadyExists {
                        path: to.to_string(),
                        source: failed("").into(),
                    })
                }
                401 => {
                    return Err(object_store::Error::Unauthenticated {
                        path: from.to_string(),
                        source: failed("").into(),
                    })
                }
                403 => {
                    return Err(object_store::Error::PermissionDenied {
                        path: from.to_string(),
                        source: failed("").into(),
                    })
                }
                500..=599 if again => backoff(attempt).await,
                _ => return Err(generic(failed(""))),
            }
        }
    }
}

async fn backoff(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(250) * 2u32.pow(attempt - 1)).await;
}

fn generic(text: String) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: text.into(),
    }
}

/// A refused PROPFIND said as such (object_store reports it as a generic failure).
fn listing_error(e: object_store::Error) -> object_store::Error {
    let text = e.to_string();
    for status in ["405 Method Not Allowed", "501 Not Implemented"] {
        if text.contains(&format!("status code: {status}")) {
            return object_store::Error::NotSupported {
                source: format!(
                    "the server does not list its files (WebDAV PROPFIND answered {status})"
                )
                .into(),
            };
        }
    }
    e
}

#[async_trait]
impl ObjectStore for WebDav {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        if opts.mode != PutMode::Create {
            return self.inner.put_opts(location, payload, opts).await;
        }
        // Not atomic: two writers creating at the same moment both write. narpipe
        // creates only nix-cache-info, which they would write alike.
        match self.inner.head(location).await {
            Ok(_) => Err(object_store::Error::AlreadyExists {
                path: location.to_string(),
                source: "it exists".into(),
            }),
            Err(object_store::Error::NotFound { .. }) => {
                let opts = PutOptions {
                    mode: PutMode::Overwrite,
                    ..opts
                };
                self.inner.put_opts(location, payload, opts).await
            }
            Err(e) => Err(e),
        }
    }

    /// WebDAV has no multipart upload: the parts are held, then put in one request.
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(HeldUpload {
            store: self.inner.clone(),
            location: location.clone(),
            attributes: opts.attributes,
            parts: Vec::new(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .list(prefix)
            .map(|r| r.map_err(listing_error))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner
            .list_with_delimiter(prefix)
            .await
            .map_err(listing_error)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        let overwrite = options.target_mode == RenameTargetMode::Overwrite;
        if self.move_object(from, to, overwrite).await? {
            return Ok(());
        }
        let mode = if overwrite {
            CopyMode::Overwrite
        } else {
            CopyMode::Create
        };
        let copy = CopyOptions {
            mode,
            extensions: options.extensions,
        };
        self.inner.copy_opts(from, to, copy).await?;
        self.inner.delete(from).await
    }
}

/// A "multipart" upload to a WebDAV server: the whole object in memory until
/// [`MultipartUpload::complete`] puts it.
#[derive(Debug)]
struct HeldUpload {
    store: Arc<HttpStore>,
    location: Path,
    attributes: Attributes,
    parts: Vec<PutPayload>,
}

#[async_trait]
impl MultipartUpload for HeldUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.parts.push(data);
        Box::pin(futures::future::ready(Ok(())))
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let payload: PutPayload = self.parts.drain(..).flatten().collect();
        let opts = PutOptions {
            attributes: std::mem::take(&mut self.attributes),
            ..Default::default()
        };
        self.store.put_opts(&self.location, payload, opts).await
    }

    async fn abort(&mut self) -> Result<()> {
        self.parts.clear();
        Ok(())
    }
}
