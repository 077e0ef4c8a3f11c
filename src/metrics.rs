//! `--metrics-listen`: the counters in Prometheus' text format over plain HTTP.
//!
//! ```text
//! # TYPE narpipe_paths_uploaded_total counter
//! narpipe_paths_uploaded_total 42
//! ```
//! A deliberately small server: `GET /metrics` (or `/`) answers the text, anything else
//! 404; one request per connection, bounded in size and time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::stats::Stats;

/// The counters of each cache (by URL) as Prometheus text: every series has a
/// `cache` label, but input lines rejected, which belong to no cache.
pub fn render(caches: &[(String, Arc<Stats>)]) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Stats) -> String| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (url, s) in caches {
            out.push_str(&format!(
                "{name}{{cache=\"{}\"}} {}\n",
                label(url),
                value(s)
            ));
        }
    };
    fn c(a: &std::sync::atomic::AtomicU64) -> String {
        a.load(Relaxed).to_string()
    }
    metric(
        "narpipe_paths_uploaded_total",
        "counter",
        "Store paths uploaded.",
        &|s| c(&s.uploaded),
    );
    metric(
        "narpipe_paths_skipped_total",
        "counter",
        "Store paths already in the cache.",
        &|s| c(&s.skipped),
    );
    metric(
        "narpipe_paths_failed_total",
        "counter",
        "Paths given up on after every attempt, or not valid in the store.",
        &|s| c(&s.failed),
    );
    metric(
        "narpipe_paths_excluded_total",
        "counter",
        "Paths kept out by --include/--exclude.",
        &|s| c(&s.excluded),
    );
    metric(
        "narpipe_paths_upstream_total",
        "counter",
        "Paths not pushed because upstream serves them.",
        &|s| c(&s.upstream),
    );
    metric(
        "narpipe_upstream_checks_total",
        "counter",
        "Requests asking an upstream cache whether it has a path.",
        &|s| c(&s.upstream_checks),
    );
    metric(
        "narpipe_retries_total",
        "counter",
        "Failed attempts at single paths, each retried.",
        &|s| c(&s.errors),
    );
    metric(
        "narpipe_throttled_requests_total",
        "counter",
        "Requests a cache refused with HTTP 429 or 503 (slow down), each retried after a wait.",
        &|s| c(&s.throttled),
    );
    metric(
        "narpipe_nar_bytes_total",
        "counter",
        "NAR bytes uploaded (uncompressed).",
        &|s| c(&s.nar_bytes),
    );
    metric(
        "narpipe_compressed_bytes_total",
        "counter",
        "Bytes written to the cache for NARs.",
        &|s| c(&s.file_bytes),
    );
    metric(
        "narpipe_queue_depth",
        "gauge",
        "Accepted root paths not finished yet.",
        &|s| c(&s.queue),
    );
    metric(
        "narpipe_upload_seconds_total",
        "counter",
        "Time spent uploading paths, summed over paths.",
        &|s| format!("{:.6}", s.upload_micros.load(Relaxed) as f64 / 1e6),
    );
    let rejected: u64 = caches.iter().map(|(_, s)| s.rejected.load(Relaxed)).sum();
    out.push_str(&format!(
        "# HELP narpipe_inputs_rejected_total Input lines that were not store paths.\n\
         # TYPE narpipe_inputs_rejected_total counter\n\
         narpipe_inputs_rejected_total {rejected}\n"
    ));
    out
}

/// A label value as the text format wants it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, stats: Vec<(String, Arc<Stats>)>) {
    serve_text(listener, Arc::new(move || render(&stats))).await
}

/// Serves what `render` gives at each scrape (`serve`'s counters use it too), until the
/// task is dropped.
pub async fn serve_text(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = async {
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let line = req.split(|&b| b == b'\r').next().unwrap_or(&[]);
            let mut parts = line.split(|&b| b == b' ');
            let (method, path) = (parts.next(), parts.next());
            let (status, body) = match (method, path) {
                (Some(b"GET"), Some(b"/metrics" | b"/")) => ("200 OK", render()),
                _ => ("404 Not Found", "not found: try /metrics\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scrapes_show_the_counters() {
        let stats = Arc::new(Stats::default());
        stats.uploaded.fetch_add(3, Relaxed);
        stats.throttled.fetch_add(2, Relaxed);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let other = Arc::new(Stats::default());
        other.uploaded.fetch_add(5, Relaxed);
        other.rejected.fetch_add(1, Relaxed);
        let server = tokio::spawn(serve(
            listener,
            vec![
                ("file:///a".into(), stats.clone()),
                ("s3://b?x=\"y\"".into(), other),
            ],
        ));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        let page = get("/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains("\nnarpipe_paths_uploaded_total{cache=\"file:///a\"} 3\n"),
            "{page}"
        );
        assert!(
            page.contains("\nnarpipe_throttled_requests_total{cache=\"file:///a\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("\nnarpipe_paths_uploaded_total{cache=\"s3://b?x=\\\"y\\\"\"} 5\n"),
            "{page}"
        );
        assert!(
            page.contains("\nnarpipe_inputs_rejected_total 1\n"),
            "{page}"
        );
        stats.uploaded.fetch_add(1, Relaxed);
        assert!(get("/metrics")
            .await
            .contains("\nnarpipe_paths_uploaded_total{cache=\"file:///a\"} 4\n"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
