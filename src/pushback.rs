//! What a cache does when it pushes back: HTTP 429 Too Many Requests and 503 (S3's
//! SlowDown, GCS's and Azure's "server busy") are counted, waited out as the server's
//! `Retry-After` asks, and make fewer requests go to that cache at once until it stops
//! (additive increase, multiplicative decrease, as TCP does).
//!
//! object_store retries such answers itself, with exponential backoff, but ignores
//! `Retry-After` and tells nobody. So every cache's HTTP client is wrapped, below
//! object_store's signing and retries:
//! ```text
//! object_store (sign, retry with backoff) ─▶ Service: wait for a slot ─▶ reqwest
//!                                               ◀─ 429, Retry-After: 2 ─┘
//!        count it; halve the slots (once per round); no request for 2 s
//! ```
//! The first time a cache pushes back its requests are limited to half of those then
//! in flight; each further refusal of a request started after the last cut halves the
//! limit again (at least 1). While the limit holds requests back, each limit's worth
//! of successes raises it by one; it is lifted once it is back at the most requests
//! there were in flight before, or when it has held nothing back for a limit's worth
//! of successes in a row. A `Retry-After`
//! (seconds or an HTTP date, at most [`MAX_RETRY_AFTER`]) holds every request to that
//! cache until it has passed; object_store's retry then goes out.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::stats::Stats;

/// The longest `Retry-After` honoured: a server asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The wait a `Retry-After` value asks for at `now`: delta-seconds (`120`) or an
/// HTTP date (`Wed, 21 Oct 2015 07:28:00 GMT`; a date past is no wait). None when it
/// is neither.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = UNIX_EPOCH + Duration::from_secs(http_date(value)?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Seconds since the epoch of an IMF-fixdate, the form HTTP dates are sent in
/// (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn http_date(s: &str) -> Option<u64> {
    let (_weekday, rest) = s.split_once(", ")?;
    let mut fields = rest.split(' ');
    let day: u64 = fields.next()?.parse().ok()?;
    let month = fields.next()?;
    let year: u64 = fields.next()?.parse().ok()?;
    let mut clock = fields.next()?.split(':').map(|f| f.parse::<u64>().ok());
    let (h, m, sec) = (clock.next()??, clock.next()??, clock.next()??);
    if fields.next()? != "GMT" || fields.next().is_some() || clock.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|&m| m == month)? as u64 + 1;
    if !(1..=31).contains(&day) || year < 1970 || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm, years from March).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// Whether an answer means the server pushes back.
fn pushes_back(status: u16) -> bool {
    status == 429 || status == 503
}

/// How many requests may be in flight to one cache: the AIMD state, without IO.
#[derive(Debug, Default)]
struct Window {
    /// None: no limit (the cache has not pushed back, or has stopped).
    limit: Option<usize>,
    in_flight: usize,
    /// The most requests in flight while there was no limit: once the limit grows
    /// back to this, it is lifted.
    peak: usize,
    /// Successes since the limit last changed while it held requests back.
    held: usize,
    /// Successes in a row while it held nothing back.
    idle: usize,
    /// Counts cuts: a refusal of a request that started before the last cut does
    /// not cut again (those requests were sent when more were allowed).
    round: u64,
    /// No request starts before this (the server's Retry-After).
    paused_until: Option<Instant>,
}

impl Window {
    /// Starts a request if the limit allows; returns its round.
    fn try_start(&mut self) -> Option<u64> {
        match self.limit {
            Some(l) if self.in_flight >= l => return None,
            Some(_) => {}
            None => self.peak = self.peak.max(self.in_flight + 1),
        }
        self.in_flight += 1;
        Some(self.round)
    }

    fn end(&mut self) {
        self.in_flight -= 1;
    }

    /// A request of `round`, still in flight, was refused: the new limit when this
    /// cuts it (to half of what was allowed, or of what was in flight).
    fn refused(&mut self, round: u64) -> Option<usize> {
        if round != self.round {
            return None;
        }
        self.round += 1;
        (self.held, self.idle) = (0, 0);
        let cut = (self.limit.unwrap_or(self.in_flight) / 2).max(1);
        self.limit = Some(cut);
        Some(cut)
    }

    /// A request, still in flight, succeeded. While the limit holds requests back
    /// (as many in flight as it allows) it grows by one per limit's worth of
    /// successes; it is lifted when it is back at the peak, or when a limit's worth
    /// of successes in a row came with fewer requests in flight (it holds nothing
    /// back). Returns whether it was lifted.
    fn succeeded(&mut self) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        let lift = if self.in_flight < limit {
            self.idle += 1;
            self.idle >= limit
        } else {
            self.idle = 0;
            self.held += 1;
            if self.held >= limit {
                self.held = 0;
                self.limit = Some(limit + 1);
            }
            limit + 1 >= self.peak
        };
        if lift {
            self.limit = None;
            self.peak = self.in_flight;
        }
        lift
    }
}

/// "1 request", "2 requests".
fn requests(n: usize) -> String {
    if n == 1 {
        "1 request".into()
    } else {
        format!("{n} requests")
    }
}

/// One cache's pushback state, shared by its HTTP client and the [`crate::cache::Cache`].
#[derive(Debug)]
pub struct Pushback {
    /// The cache, for logs.
    url: String,
    window: Mutex<Window>,
    wake: Notify,
    /// Where refusals are counted, once the run says (see [`Pushback::count_into`]).
    stats: OnceLock<Arc<Stats>>,
}

impl Pushback {
    pub fn new(url: &str) -> Arc<Self> {
        Arc::new(Pushback {
            url: url.to_string(),
            window: Mutex::new(Window::default()),
            wake: Notify::new(),
            stats: OnceLock::new(),
        })
    }

    /// Counts this cache's refusals into `stats` (the first call wins).
    pub fn count_into(&self, stats: Arc<Stats>) {
        let _ = self.stats.set(stats);
    }

    /// The HTTP connector for this cache's object_store builder.
    pub fn connector(self: &Arc<Self>) -> Connector {
        Connector(self.clone())
    }

    /// Waits for a slot (and for any Retry-After to pass).
    async fn start(self: &Arc<Self>) -> Slot {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let paused = {
                let mut w = self.window.lock().unwrap();
                match w.paused_until {
                    Some(t) if t > Instant::now() => Some(t),
                    _ => {
                        if let Some(round) = w.try_start() {
                            return Slot {
                                pushback: self.clone(),
                                round,
                            };
                        }
                        None
                    }
                }
            };
            match paused {
                Some(t) => tokio::time::sleep_until(t).await,
                None => woken.await,
            }
        }
    }

    /// The cache refused the request in `slot` with `status`, asking to wait `wait`.
    fn refused(&self, slot: &Slot, status: u16, wait: Option<Duration>) {
        if let Some(stats) = self.stats.get() {
            stats.throttled.fetch_add(1, Relaxed);
        }
        let mut w = self.window.lock().unwrap();
        if let Some(wait) = wait {
            let until = Instant::now() + wait.min(MAX_RETRY_AFTER);
            w.paused_until = Some(w.paused_until.map_or(until, |t| t.max(until)));
        }
        let first = w.limit.is_none();
        if let Some(limit) = w.refused(slot.round) {
            if first {
                log::warn!(
                    "cache {} pushes back (HTTP {status}): at most {} at once until it stops",
                    self.url,
                    requests(limit)
                );
            } else {
                log::debug!("cache {}: at most {} at once", self.url, requests(limit));
            }
        }
    }

    fn succeeded(&self) {
        let lifted = self.window.lock().unwrap().succeeded();
        if lifted {
            log::info!(
                "cache {} no longer pushes back: requests are not limited any more",
                self.url
            );
            self.wake.notify_waiters();
        } else {
            // The limit may have grown.
            self.wake.notify_one();
        }
    }

    /// One request through `inner`, as the module documentation says.
    async fn send(
        self: Arc<Self>,
        inner: HttpClient,
        req: HttpRequest,
    ) -> Result<HttpResponse, HttpError> {
        let slot = self.start().await;
        let res = inner.execute(req).await;
        if let Ok(r) = &res {
            let status = r.status().as_u16();
            if pushes_back(status) {
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after(v, SystemTime::now()));
                self.refused(&slot, status, wait);
            } else if status < 500 {
                self.succeeded();
            }
        }
        res
    }
}

/// A request in flight; its end frees the slot.
struct Slot {
    pushback: Arc<Pushback>,
    round: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pushback.window.lock().unwrap().end();
        self.pushback.wake.notify_one();
    }
}

/// Makes object_store's usual (reqwest) client and wraps it in pushback handling.
#[derive(Debug)]
pub struct Connector(Arc<Pushback>);

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Service {
            inner,
            pushback: self.0.clone(),
        }))
    }
}

#[derive(Debug)]
struct Service {
    inner: HttpClient,
    pushback: Arc<Pushback>,
}

#[async_trait]
impl HttpService for Service {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.pushback.clone().send(self.inner.clone(), req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::client::HttpResponseBody;
    use object_store::HeaderValue;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 2 ", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:40 GMT", now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in [
            "",
            "-1",
            "1.5",
            "soon",
            "Sun, 06 Nov 1994 08:49:40 CET",
            "06 Nov 1994",
        ] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
        // Dates across leap years and the turn of the century.
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
        assert_eq!(
            http_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1_445_412_480)
        );
    }

    #[test]
    fn the_limit_halves_once_per_round_grows_back_by_one_and_lifts() {
        let mut w = Window::default();
        let rounds: Vec<u64> = (0..8).map(|_| w.try_start().unwrap()).collect();
        assert_eq!((w.limit, w.peak), (None, 8));
        // Eight in flight, all refused: one cut to four, not eight cuts.
        assert_eq!(w.refused(rounds[0]), Some(4));
        for &r in &rounds[1..] {
            assert_eq!(w.refused(r), None);
        }
        for _ in 0..8 {
            w.end();
        }
        let next: Vec<u64> = (0..4).map(|_| w.try_start().unwrap()).collect();
        assert_eq!(w.try_start(), None, "the limit holds");
        // Refused again after the cut: two; then one, never zero.
        assert_eq!(w.refused(next[0]), Some(2));
        let r = w.round;
        assert_eq!(w.refused(r), Some(1));
        let r = w.round;
        assert_eq!(w.refused(r), Some(1));
        for _ in 0..4 {
            w.end();
        }
        // The server stops refusing. Requests keep the window full: the limit grows
        // by one per limit's worth of successes (1, 2, 3 …) until it is back at the
        // eight there were.
        let mut limits = vec![];
        loop {
            while w.try_start().is_some() {}
            let lifted = w.succeeded();
            w.end();
            if lifted {
                break;
            }
            limits.push(w.limit.unwrap());
        }
        limits.dedup();
        assert_eq!(limits, [2, 3, 4, 5, 6, 7]);
        assert_eq!(w.limit, None);
        assert!((0..20).all(|_| w.try_start().is_some()));
        // Fewer requests than the limit allows: it does not grow, and after a limit's
        // worth of such successes it is lifted.
        let mut w = Window {
            limit: Some(4),
            peak: 8,
            ..Window::default()
        };
        w.try_start();
        for _ in 0..3 {
            assert!(!w.succeeded());
            assert_eq!(w.limit, Some(4));
        }
        assert!(w.succeeded());
        assert_eq!(w.limit, None);
    }

    /// Answers 429 with `Retry-After: 1` to its first request, then 200.
    #[derive(Debug, Default)]
    struct Busy {
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl HttpService for Busy {
        async fn call(&self, _req: HttpRequest) -> Result<HttpResponse, HttpError> {
            let mut r = HttpResponse::new(HttpResponseBody::from(String::new()));
            if self.calls.fetch_add(1, Relaxed) == 0 {
                *r.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
            }
            Ok(r)
        }
    }

    #[tokio::test]
    async fn a_refusal_is_counted_and_its_retry_after_holds_every_request() {
        let pushback = Pushback::new("s3://test");
        let stats = Arc::new(Stats::default());
        pushback.count_into(stats.clone());
        let inner = HttpClient::new(Busy::default());
        let request = || HttpRequest::new(object_store::client::HttpRequestBody::empty());
        let start = std::time::Instant::now();
        let first = pushback
            .clone()
            .send(inner.clone(), request())
            .await
            .unwrap();
        assert_eq!(first.status().as_u16(), 429);
        assert_eq!(stats.throttled.load(Relaxed), 1);
        // The next request, whoever makes it, waits out the second.
        let second = pushback.clone().send(inner, request()).await.unwrap();
        assert_eq!(second.status().as_u16(), 200);
        assert!(
            start.elapsed() >= Duration::from_millis(950),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(stats.throttled.load(Relaxed), 1);
        // One in flight when refused: a limit of one, lifted by that success.
        assert_eq!(pushback.window.lock().unwrap().limit, None);
    }
}
