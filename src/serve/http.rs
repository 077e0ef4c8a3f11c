//! The HTTP side of `serve`, on hyper: GET and HEAD of the layout's names (see
//! [`super::route`]), anything else 404 (405 for other methods).
//!
//! ```text
//! HTTP/1.1 206 Partial Content
//! Content-Type: application/x-nix-nar
//! Content-Length: 1024
//! Content-Range: bytes 0-1023/52104
//! Accept-Ranges: bytes
//! ETag: "1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1"
//! Last-Modified: Tue, 24 Nov 2026 10:00:00 GMT
//! ```
//! Conditional requests (`If-None-Match`, `If-Modified-Since`) get 304. Connections are
//! bounded ([`MAX_CONNECTIONS`]); on shutdown no new one is taken, idle ones close and
//! answers under way may finish for [`DRAIN`].

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::route::Route;
use super::{range, Counters, Found, Part, Source, Want};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long answers under way may go on after a shutdown is asked for.
pub const DRAIN: Duration = Duration::from_secs(10);
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may leave an answer unread before its connection is closed: a NAR
/// being made holds one of the NAR threads while it waits for the client.
const WRITE_STALL: Duration = Duration::from_secs(60);

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What answers requests.
pub struct Server {
    pub source: Source,
    pub counters: Arc<Counters>,
    /// Whether `/` and `/path/<hash>` show the explorer (see [`super::explorer`]).
    pub explorer: bool,
    pub catalogue: super::explorer::Catalogue,
}

/// Serves `listener` until `shutdown`, then drains (see [`DRAIN`]).
pub async fn run(listener: TcpListener, server: Arc<Server>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    log::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(&server, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(Unstalled::new(stream)), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        log::warn!(
            "{} connections still busy after {}s: closing them",
            tracker.len(),
            DRAIN.as_secs()
        );
    }
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// One request's answer.
pub async fn handle(server: &Server, req: Request<Incoming>) -> Response<Body> {
    server.counters.requests.fetch_add(1, Relaxed);
    let r = answer(server, req).await;
    match r.status() {
        StatusCode::NOT_FOUND => server.counters.not_found.fetch_add(1, Relaxed),
        StatusCode::BAD_GATEWAY => server.counters.errors.fetch_add(1, Relaxed),
        _ => 0,
    };
    r
}

async fn answer(server: &Server, req: Request<Incoming>) -> Response<Body> {
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET and HEAD\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    if server.explorer {
        let page = super::explorer::page(
            &server.source,
            &server.catalogue,
            req.uri().path(),
            req.uri().query(),
        )
        .await;
        match page {
            Some(Ok(html)) => {
                let mut r = Response::new(if head {
                    empty()
                } else {
                    Full::new(Bytes::from(html.clone()))
                        .map_err(|never| match never {})
                        .boxed_unsync()
                });
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(html.len()));
                return r;
            }
            Some(Err(e)) => {
                log::warn!("explorer {}: {e}", req.uri().path());
                return text(StatusCode::BAD_GATEWAY, "the cache could not be read\n");
            }
            None => {}
        }
    }
    let Some(route) = Route::parse(req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let headers = req.headers();
    let want = if head {
        Want::Head
    } else {
        // With If-Range the whole object is sent: always allowed, and simpler than
        // comparing validators before the object is read.
        match headers.get(header::RANGE) {
            Some(h) if route.ranges() && !headers.contains_key(header::IF_RANGE) => h
                .to_str()
                .ok()
                .and_then(range::parse)
                .map_or(Want::All, Want::Range),
            _ => Want::All,
        }
    };
    let found = match server.source.get(&route, want).await {
        Ok(Some(f)) => f,
        Ok(None) => return text(StatusCode::NOT_FOUND, "not found\n"),
        Err(e) => {
            log::warn!("{}: {e}", route.object());
            return text(StatusCode::BAD_GATEWAY, "the cache could not be read\n");
        }
    };
    respond(&route, found, headers, head, &server.counters)
}

fn respond(
    route: &Route,
    found: Found,
    req: &http::HeaderMap,
    head: bool,
    counters: &Arc<Counters>,
) -> Response<Body> {
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    if let Some(tag) = found
        .etag
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        h.insert(header::ETAG, tag);
    }
    if let Some(t) = found.last_modified {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(t)) {
            h.insert(header::LAST_MODIFIED, v);
        }
    }
    if not_modified(req, found.etag.as_deref(), found.last_modified) {
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        return r;
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(route.content_type()),
    );
    if route.ranges() {
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
    let (status, length, body) = match found.part {
        Part::Head => (StatusCode::OK, found.size, None),
        Part::All(b) => (StatusCode::OK, found.size, Some(b)),
        Part::Range(range, b) => {
            let v = format!("bytes {}-{}/{}", range.start, range.end - 1, found.size);
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(header::CONTENT_RANGE, v);
            }
            (
                StatusCode::PARTIAL_CONTENT,
                range.end - range.start,
                Some(b),
            )
        }
        Part::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", found.size)) {
                h.insert(header::CONTENT_RANGE, v);
            }
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            return r;
        }
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    *r.status_mut() = status;
    if let (Some(b), false) = (body, head) {
        let counters = counters.clone();
        let counted = b.inspect_ok(move |bytes| {
            counters.served_bytes.fetch_add(bytes.len() as u64, Relaxed);
        });
        *r.body_mut() = StreamBody::new(counted.map_ok(Frame::data)).boxed_unsync();
    }
    r
}

/// Whether the client's copy is current (RFC 9110 §13.1.2, §13.1.3): If-None-Match
/// wins over If-Modified-Since.
fn not_modified(req: &http::HeaderMap, etag: Option<&str>, modified: Option<SystemTime>) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = etag else {
            return false;
        };
        let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm.trim() == "*" || inm.split(',').any(|t| strip(t) == strip(etag));
    }
    match (
        req.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
        modified,
    ) {
        // HTTP dates have whole seconds.
        (Some(since), Some(m)) => httpdate::HttpDate::from(m) <= httpdate::HttpDate::from(since),
        _ => false,
    }
}

/// A connection whose writes may not stall for [`WRITE_STALL`]: a client that stops
/// reading fails the write, hyper drops the answer, and whatever fed it (a NAR walk on
/// a NAR thread) stops.
struct Unstalled {
    io: tokio::net::TcpStream,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Unstalled {
    fn new(io: tokio::net::TcpStream) -> Unstalled {
        Unstalled { io, stalled: None }
    }

    /// Turns a write that stays pending past [`WRITE_STALL`] into an error.
    fn limit<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        match polled {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl tokio::io::AsyncRead for Unstalled {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Unstalled {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.limit(cx, polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.limit(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.io).poll_flush(cx);
        self.limit(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_requests() {
        let mut req = http::HeaderMap::new();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(!not_modified(&req, Some("\"a\""), Some(t)));
        req.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"b\", \"a\""),
        );
        assert!(not_modified(&req, Some("\"a\""), None));
        assert!(!not_modified(&req, Some("\"c\""), Some(t)));
        assert!(!not_modified(&req, None, Some(t)));
        let mut req = http::HeaderMap::new();
        req.insert(
            header::IF_MODIFIED_SINCE,
            HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap(),
        );
        assert!(not_modified(&req, None, Some(t)));
        assert!(!not_modified(&req, None, Some(t + Duration::from_secs(1))));
        assert!(!not_modified(&req, None, None));
    }
}
