//! `--max-rate`: a cap on the bytes written to caches per second, shared by every
//! writer of a run (every NAR and narinfo, every cache).
//!
//! ```text
//! --max-rate 5M    5 MiB/s (K, M, G: powers of 1024; a plain number is bytes)
//! ```
//! A writer asks for its bytes before it sends them and is let go when a steady
//! stream at the rate would have sent them: nothing is saved up while idle, so the
//! rate holds over any stretch of time, give or take the one piece in flight.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bytes per second, as given to `--max-rate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a rate: give bytes per second, with K, M or G (powers of 1024) if you like, e.g. 5M")]
pub struct BadRate(String);

impl std::str::FromStr for Rate {
    type Err = BadRate;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadRate(s.to_string());
        let t = s.trim();
        let (number, unit) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
            _ => (t, 'B'),
        };
        let scale: u64 = match unit {
            'B' => 1,
            'K' => 1 << 10,
            'M' => 1 << 20,
            'G' => 1 << 30,
            _ => return Err(bad()),
        };
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(bad());
        }
        let value: f64 = number.parse().map_err(|_| bad())?;
        let bytes = (value * scale as f64).round();
        if !(1.0..=u64::MAX as f64).contains(&bytes) {
            return Err(bad());
        }
        Ok(Rate(bytes as u64))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s", crate::stats::human(self.0))
    }
}

/// The shared cap (a token bucket that holds no tokens: each request reserves the
/// next stretch of time its bytes take at the rate).
#[derive(Debug)]
pub struct RateLimit {
    rate: Rate,
    /// When the bytes reserved so far will have gone at the rate.
    free_at: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub fn new(rate: Rate) -> Self {
        RateLimit {
            rate,
            free_at: Mutex::new(None),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Waits until `bytes` more may be sent.
    pub async fn take(&self, bytes: usize) {
        let until = {
            let mut free_at = self.free_at.lock().unwrap();
            let now = Instant::now();
            let start = free_at.map_or(now, |t| t.max(now));
            let until = start + Duration::from_secs_f64(bytes as f64 / self.rate.0 as f64);
            *free_at = Some(until);
            until
        };
        tokio::time::sleep_until(until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_binary_suffixes() {
        for (text, bytes) in [
            ("5M", 5 << 20),
            ("5m", 5 << 20),
            ("500K", 500 << 10),
            ("1G", 1 << 30),
            ("1.5M", 3 << 19),
            ("1048576", 1 << 20),
            (" 64k ", 64 << 10),
        ] {
            assert_eq!(text.parse::<Rate>(), Ok(Rate(bytes)), "{text}");
        }
        for bad in ["", "M", "0", "0K", "-5M", "5X", "5MB", "fast", "1e3"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
        assert_eq!(Rate(5 << 20).to_string(), "5.0 MiB/s");
    }

    #[tokio::test]
    async fn writers_together_stay_under_the_rate() {
        // 4 writers × 4 pieces of 64 KiB at 1 MiB/s: 1 MiB, so at least a second.
        let limit = std::sync::Arc::new(RateLimit::new(Rate(1 << 20)));
        let start = std::time::Instant::now();
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let limit = limit.clone();
                tokio::spawn(async move {
                    for _ in 0..4 {
                        limit.take(64 << 10).await;
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(990), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
