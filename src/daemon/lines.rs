//! What input lines mean: a store path (or a path into one, or a symlink to one), a
//! command, or a rejection that names the line; and how rejections are logged without
//! flooding the log. No IO but resolving `./result`-style symlinks, and the logging
//! (see [`accept_frames`]).
//!
//! ```text
//! /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a      a store path (or a path into one)
//! ./result                                                  resolved through its symlink
//! !finish                                                   (FIFO only) drain and exit
//! ```
//! A rejected line is logged with at most its first 200 bytes, and a flood of them is
//! summarised (see [`RejectLog`]):
//! ```text
//! warning: rejected input "relative/x": is not an absolute path
//! warning: rejected input "\xe3\x01…" (5,002 bytes, first 200 shown): is longer than 4096 bytes
//! warning: … and 388 more rejected input lines in the last 10 s
//! ```

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use log::warn;

use super::Shared;
use crate::pipe::{self, Frame};
use crate::resolve;
use crate::store_path::{StoreDir, StorePath};

/// What one read of input holds.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    roots: Vec<StorePath>,
    /// Why each rejected line was rejected, naming it (see [`rejection`]).
    rejected: Vec<String>,
    /// `!finish` was seen (and commands are allowed): stop reading.
    finish: bool,
}

/// Store paths from frames, and what was wrong with the rest. Commands (`!finish`)
/// count only when `commands` is set (not in spool files).
fn parse_frames(
    store_dir: &StoreDir,
    frames: impl Iterator<Item = Frame>,
    commands: bool,
) -> Parsed {
    let mut parsed = Parsed::default();
    for frame in frames {
        let line = match frame {
            Frame::Line(l) => l,
            Frame::TooLong { prefix, len } => {
                let why = format!("is longer than {} bytes", pipe::PIPE_BUF);
                parsed.rejected.push(rejection(&prefix, len, &why));
                continue;
            }
        };
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if line == pipe::FINISH && commands {
            parsed.finish = true;
            break;
        }
        if line.starts_with(b"!") {
            let why = "is an unknown command";
            parsed.rejected.push(rejection(line, line.len(), why));
            continue;
        }
        match resolve::resolve(line, store_dir) {
            Ok(p) => parsed.roots.push(p),
            Err(e) => parsed
                .rejected
                .push(rejection(line, line.len(), &e.reason())),
        }
    }
    parsed
}

/// The log line for a rejected input line of `len` bytes that starts with `start`: at
/// most its first [`pipe::PREFIX_LEN`] bytes, escaped, and its length when that is not
/// all of it; then `why`.
fn rejection(start: &[u8], len: usize, why: &str) -> String {
    let shown = &start[..start.len().min(pipe::PREFIX_LEN).min(len)];
    if len > shown.len() {
        format!(
            "rejected input \"{}\" ({} bytes, first {} shown): {why}",
            pipe::escape(shown),
            thousands(len as u64),
            shown.len()
        )
    } else {
        format!("rejected input \"{}\": {why}", pipe::escape(shown))
    }
}

/// 5002 → "5,002".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// Rejected lines shown per window; the rest of the window is only counted.
const REJECTS_SHOWN: u32 = 20;
/// A window opens with the first rejected line after the last one closed.
const REJECT_WINDOW: Duration = Duration::from_secs(10);

/// Keeps garbage on the pipe from flooding the log: of the lines rejected in a window
/// of [`REJECT_WINDOW`], the first [`REJECTS_SHOWN`] are shown and the rest counted, and
/// summarised in one line once the window ends. Counts stay exact: every rejected line
/// is either shown or in a summary (and always in `stats.rejected`). Pure: the caller
/// says what time it is.
#[derive(Debug, Default)]
pub(super) struct RejectLog {
    /// When the open window began.
    opened: Option<Instant>,
    shown: u32,
    held: u64,
}

impl RejectLog {
    /// A line was rejected at `now`: whether to show it. A window that ended before
    /// `now` is closed first; its summary, if due, comes back too (log it first).
    pub(super) fn admit(&mut self, now: Instant) -> (Option<String>, bool) {
        let summary = self.tick(now);
        self.opened.get_or_insert(now);
        if self.shown < REJECTS_SHOWN {
            self.shown += 1;
            (summary, true)
        } else {
            self.held += 1;
            (summary, false)
        }
    }

    /// When a summary falls due: the end of an open window that held lines back.
    pub(super) fn due(&self) -> Option<Instant> {
        self.opened
            .filter(|_| self.held > 0)
            .map(|t| t + REJECT_WINDOW)
    }

    /// Closes the window if it has ended by `now`; its summary, if it held lines back.
    pub(super) fn tick(&mut self, now: Instant) -> Option<String> {
        let opened = self.opened?;
        if now.duration_since(opened) < REJECT_WINDOW {
            return None;
        }
        self.close(REJECT_WINDOW)
    }

    /// At the end: the open window's summary, however short it was.
    pub(super) fn finish(&mut self, now: Instant) -> Option<String> {
        let opened = self.opened?;
        let span = now.duration_since(opened).min(REJECT_WINDOW);
        self.close(span)
    }

    fn close(&mut self, span: Duration) -> Option<String> {
        let held = std::mem::take(&mut self.held);
        self.opened = None;
        self.shown = 0;
        (held > 0).then(|| {
            format!(
                "… and {} more rejected input lines in the last {} s",
                thousands(held),
                span.as_secs_f64().ceil().max(1.0)
            )
        })
    }
}

/// Parses frames, reporting and counting what is rejected.
pub(super) fn accept_frames(
    shared: &Shared,
    frames: impl Iterator<Item = Frame>,
    commands: bool,
) -> (Vec<StorePath>, bool) {
    let parsed = parse_frames(&shared.cfg.store_dir, frames, commands);
    shared
        .stats
        .rejected
        .fetch_add(parsed.rejected.len() as u64, Relaxed);
    if !parsed.rejected.is_empty() {
        let now = Instant::now();
        let mut lines = Vec::new();
        {
            let mut log = shared.rejects.lock().unwrap();
            for why in parsed.rejected {
                let (summary, show) = log.admit(now);
                lines.extend(summary);
                if show {
                    lines.push(why);
                }
            }
        }
        for line in lines {
            warn!("{line}");
        }
    }
    (parsed.roots, parsed.finish)
}

impl Shared {
    /// When the summary of rejected lines held back falls due.
    pub(super) fn rejects_due(&self) -> Option<Instant> {
        self.rejects.lock().unwrap().due()
    }

    /// Logs the summary of rejected lines held back once their window has ended, or
    /// (`end`) at once.
    pub(super) fn summarise_rejects(&self, end: bool) {
        let now = Instant::now();
        let line = {
            let mut log = self.rejects.lock().unwrap();
            if end {
                log.finish(now)
            } else {
                log.tick(now)
            }
        };
        if let Some(line) = line {
            warn!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipe::LineSplitter;

    fn frames(text: &[u8]) -> Vec<Frame> {
        let mut splitter = LineSplitter::new(pipe::PIPE_BUF);
        let mut frames = Vec::new();
        splitter.push(text, &mut frames);
        frames.extend(splitter.finish());
        frames
    }

    const A: &str = "/nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a";
    const B: &str = "/nix/store/n7wsi22m77azhfv9fnlp9vgc2js3xsfz-probe-b";

    #[test]
    fn store_paths_pass_and_bad_lines_are_named() {
        let store = StoreDir::new("/nix/store").unwrap();
        let long = "x".repeat(pipe::PIPE_BUF + 10);
        let input = format!("{A}\n\n  {B}  \n!bogus\n/tmp/not-in-store\n{long}\n");
        let parsed = parse_frames(&store, frames(input.as_bytes()).into_iter(), true);
        let shown: Vec<String> = parsed.roots.iter().map(|p| store.display(p)).collect();
        assert_eq!(shown, vec![A, B]);
        assert!(!parsed.finish);
        assert_eq!(parsed.rejected.len(), 3, "{:?}", parsed.rejected);
        assert!(
            parsed.rejected[0].contains("!bogus") && parsed.rejected[0].contains("unknown command")
        );
        assert!(parsed.rejected[1].contains("/tmp/not-in-store"));
        assert!(parsed.rejected[2].contains("4,106 bytes, first 200 shown"));
    }

    #[test]
    fn a_rejected_line_shows_at_most_its_first_200_bytes_and_its_length() {
        let store = StoreDir::new("/nix/store").unwrap();
        let garbage: Vec<u8> = (0..5002u32).map(|i| (i % 251) as u8 | 0x80).collect();
        let overlong = vec![b'\xe3'; 9000];
        let command = format!("!{}", "x".repeat(300));
        let mut input = Vec::new();
        for line in [&garbage[..], &overlong, command.as_bytes(), b"relative/x"] {
            input.extend_from_slice(line);
            input.push(b'\n');
        }
        // Lines over PIPE_BUF arrive as their first bytes and their length.
        let parsed = parse_frames(&store, frames(&input).into_iter(), true);
        assert_eq!(parsed.rejected.len(), 4, "{:?}", parsed.rejected);
        // 200 bytes, each escaped as at most 4 characters, and some words.
        let shown_200 = |l: &str| l.len() <= 200 * 4 + 100;
        assert!(
            parsed.rejected[0].contains("(5,002 bytes, first 200 shown): is longer than 4096"),
            "{}",
            parsed.rejected[0]
        );
        assert!(shown_200(&parsed.rejected[0]));
        assert!(parsed.rejected[1].contains("(9,000 bytes, first 200 shown)"));
        assert!(shown_200(&parsed.rejected[1]));
        assert!(parsed.rejected[2].contains("(301 bytes, first 200 shown): is an unknown command"));
        assert_eq!(
            parsed.rejected[3],
            "rejected input \"relative/x\": is not an absolute path"
        );
        // A line that fits the pipe but not the log, rejected by the resolver.
        let bad = format!("/nix/store/{}", "\u{1}".repeat(1000));
        let parsed = parse_frames(
            &store,
            frames(format!("{bad}\n").as_bytes()).into_iter(),
            true,
        );
        assert_eq!(
            parsed.rejected,
            [format!(
                "rejected input \"/nix/store/{}\" (1,011 bytes, first 200 shown): contains control characters",
                "\\x01".repeat(189)
            )]
        );
    }

    #[test]
    fn numbers_have_thousands_separators() {
        for (n, s) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (5002, "5,002"),
            (1234567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), s);
        }
    }

    #[test]
    fn a_flood_of_rejections_is_summarised_once_its_window_ends() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut log = RejectLog::default();
        // 408 lines in 100 ms: 20 shown, 388 held.
        let mut shown = 0;
        for i in 0..408 {
            let (summary, show) = log.admit(at(i / 4));
            assert_eq!(summary, None);
            shown += show as u32;
        }
        assert_eq!(shown, REJECTS_SHOWN);
        assert_eq!(log.due(), Some(t0 + REJECT_WINDOW));
        assert_eq!(log.tick(at(9_999)), None, "the window is still open");
        assert_eq!(
            log.tick(at(10_000)).as_deref(),
            Some("… and 388 more rejected input lines in the last 10 s")
        );
        assert_eq!(log.due(), None);
        assert_eq!(log.tick(at(20_000)), None, "said once");

        // A quiet trickle is shown whole and never summarised.
        for i in 0..REJECTS_SHOWN as u64 {
            assert_eq!(log.admit(at(30_000 + i * 400)), (None, true));
        }
        assert_eq!(log.due(), None);
        assert_eq!(log.tick(at(60_000)), None);

        // A window that ended unnoticed is summarised before the next line is shown.
        for _ in 0..25 {
            log.admit(at(70_000));
        }
        let (summary, show) = log.admit(at(85_000));
        assert_eq!(
            summary.as_deref(),
            Some("… and 5 more rejected input lines in the last 10 s")
        );
        assert!(show, "a new window shows its first lines");

        // At the end, what is held is said at once, over the time it covers.
        for _ in 0..30 {
            log.admit(at(85_500));
        }
        assert_eq!(
            log.finish(at(87_200)).as_deref(),
            Some("… and 11 more rejected input lines in the last 3 s")
        );
        assert_eq!(log.finish(at(90_000)), None);
    }

    #[test]
    fn finish_stops_reading_only_where_commands_are_allowed() {
        let store = StoreDir::new("/nix/store").unwrap();
        let input = format!("{A}\n!finish\n{B}\n");
        let parsed = parse_frames(&store, frames(input.as_bytes()).into_iter(), true);
        assert!(parsed.finish);
        assert_eq!(parsed.roots.len(), 1, "nothing after !finish");
        // A spool file holds paths only: a command there is rejected, not obeyed.
        let parsed = parse_frames(&store, frames(input.as_bytes()).into_iter(), false);
        assert!(!parsed.finish);
        assert_eq!(parsed.roots.len(), 2);
        assert_eq!(parsed.rejected.len(), 1);
    }
}
