//! Counters of a running upload and the summary printed at its end. Read by the
//! progress display, the periodic summaries and the metrics endpoint while the daemon
//! writes them. No IO.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Counters of a running upload, read by progress displays and metrics.
#[derive(Debug)]
pub struct Stats {
    pub uploaded: AtomicU64,
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
    pub excluded: AtomicU64,
    /// Paths not pushed because upstream serves them.
    pub upstream: AtomicU64,
    /// Requests asking an upstream cache for a narinfo.
    pub upstream_checks: AtomicU64,
    /// Failed attempts at single paths (each retried).
    pub errors: AtomicU64,
    /// Requests a cache refused with 429 or 503 (each retried after a wait).
    pub throttled: AtomicU64,
    pub nar_bytes: AtomicU64,
    pub file_bytes: AtomicU64,
    /// Time spent uploading paths, summed over paths, in microseconds.
    pub upload_micros: AtomicU64,
    /// Roots accepted and not finished (gauge).
    pub queue: AtomicU64,
    /// Paths whose upload was started, and their NAR bytes.
    pub planned: AtomicU64,
    pub planned_bytes: AtomicU64,
    /// Of those, the ones finished (any outcome), and their NAR bytes.
    pub finished: AtomicU64,
    pub finished_bytes: AtomicU64,
    pub started: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Stats {
            uploaded: z(),
            skipped: z(),
            failed: z(),
            rejected: z(),
            excluded: z(),
            upstream: z(),
            upstream_checks: z(),
            errors: z(),
            throttled: z(),
            nar_bytes: z(),
            file_bytes: z(),
            upload_micros: z(),
            queue: z(),
            planned: z(),
            planned_bytes: z(),
            finished: z(),
            finished_bytes: z(),
            started: Instant::now(),
        }
    }
}

impl Stats {
    /// The counters of several caches added up, as of now.
    pub fn sum(all: &[std::sync::Arc<Stats>]) -> Stats {
        let total = Stats {
            started: all.first().map_or_else(Instant::now, |s| s.started),
            ..Stats::default()
        };
        for s in all {
            for (t, v) in total.counters().into_iter().zip(s.counters()) {
                t.fetch_add(v.load(Relaxed), Relaxed);
            }
        }
        total
    }

    fn counters(&self) -> [&AtomicU64; 17] {
        [
            &self.uploaded,
            &self.skipped,
            &self.failed,
            &self.rejected,
            &self.excluded,
            &self.upstream,
            &self.upstream_checks,
            &self.errors,
            &self.throttled,
            &self.nar_bytes,
            &self.file_bytes,
            &self.upload_micros,
            &self.queue,
            &self.planned,
            &self.planned_bytes,
            &self.finished,
            &self.finished_bytes,
        ]
    }

    pub fn summary(&self, unfinished: u64) -> Summary {
        Summary {
            uploaded: self.uploaded.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            failed: self.failed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            excluded: self.excluded.load(Relaxed),
            upstream: self.upstream.load(Relaxed),
            errors: self.errors.load(Relaxed),
            throttled: self.throttled.load(Relaxed),
            nar_bytes: self.nar_bytes.load(Relaxed),
            file_bytes: self.file_bytes.load(Relaxed),
            unfinished,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub uploaded: u64,
    pub skipped: u64,
    /// Roots given up on (after every attempt) or that can never be uploaded.
    pub failed: u64,
    /// Input lines that were not store paths.
    pub rejected: u64,
    /// Paths kept out by --include/--exclude.
    pub excluded: u64,
    /// Paths upstream serves, not pushed.
    pub upstream: u64,
    /// Failed attempts at single paths (each retried).
    pub errors: u64,
    /// Requests a cache refused with 429 or 503 (each retried after a wait).
    pub throttled: u64,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    /// Paths abandoned by a stop.
    pub unfinished: u64,
    pub seconds: f64,
}

impl Summary {
    /// Adds another cache's counts to these (the run took as long as the longest).
    pub fn add(&mut self, o: &Summary) {
        self.uploaded += o.uploaded;
        self.skipped += o.skipped;
        self.failed += o.failed;
        self.rejected += o.rejected;
        self.excluded += o.excluded;
        self.upstream += o.upstream;
        self.errors += o.errors;
        self.throttled += o.throttled;
        self.nar_bytes += o.nar_bytes;
        self.file_bytes += o.file_bytes;
        self.unfinished += o.unfinished;
        self.seconds = self.seconds.max(o.seconds);
    }

    pub fn all_ok(&self) -> bool {
        self.failed == 0 && self.rejected == 0 && self.unfinished == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} uploaded ({} NAR, {} compressed), {} already in the cache, {} failed, {} rejected inputs",
            self.uploaded,
            human(self.nar_bytes),
            human(self.file_bytes),
            self.skipped,
            self.failed,
            self.rejected,
        )?;
        if self.upstream > 0 {
            write!(f, ", {} served upstream", self.upstream)?;
        }
        if self.excluded > 0 {
            write!(f, ", {} excluded", self.excluded)?;
        }
        if self.errors > 0 {
            write!(f, ", {} errors retried", self.errors)?;
        }
        if self.throttled > 0 {
            write!(f, ", {} requests throttled", self.throttled)?;
        }
        if self.unfinished > 0 {
            write!(f, ", {} unfinished", self.unfinished)?;
        }
        write!(f, " in {:.2}s", self.seconds)
    }
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}
