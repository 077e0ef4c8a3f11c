//! `upload status`: what a state dir still owes the cache, as the text it prints. Safe
//! while an upload runs (see [`super::entries`]).
//!
//! ```text
//! pending  /nix/store/…-hello  accepted 3m ago, 0 failed attempts
//! failed   /nix/store/…-big  accepted 2d ago, 5 failed attempts, last error: reference … failed: …
//! 1 pending, 1 failed in /var/lib/narpipe
//! ```

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{entries, legacy, Entry, Error};

/// The roots a state dir holds, and whether an earlier version's journal waits there.
pub struct Status {
    dir: PathBuf,
    entries: Vec<Entry>,
    /// The journal of an earlier version, not imported yet.
    journal: Option<PathBuf>,
}

impl Status {
    pub fn read(dir: &Path) -> Result<Status, Error> {
        let entries = entries(dir)?;
        let journal = dir.join(legacy::FILE);
        Ok(Status {
            dir: dir.to_path_buf(),
            entries,
            journal: journal.exists().then_some(journal),
        })
    }

    /// The report, ages counted up to `now`: a line per root, then the totals.
    pub fn render(&self, now: SystemTime) -> String {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut text = String::new();
        for e in &self.entries {
            let state = if e.failed { "failed " } else { "pending" };
            let age = (now - e.accepted_at).max(0);
            text.push_str(&format!(
                "{state}  {}  accepted {} ago, {} failed attempts{}\n",
                e.path,
                age_text(age),
                e.attempts,
                e.last_error
                    .as_deref()
                    .map(|r| format!(", last error: {}", r.replace('\n', " ")))
                    .unwrap_or_default()
            ));
        }
        if let Some(journal) = &self.journal {
            text.push_str(&format!(
                "note: {} from an earlier version is not imported yet; the next upload on this \
                 state dir imports its paths\n",
                journal.display()
            ));
        }
        let failed = self.entries.iter().filter(|e| e.failed).count();
        text.push_str(&format!(
            "{} pending, {failed} failed in {}\n",
            self.entries.len() - failed,
            self.dir.display()
        ));
        text
    }
}

/// 119s, 2m, 47h, 2d: an age in the largest unit that counts at least two of it.
fn age_text(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ages_are_shown_in_a_unit_that_fits() {
        for (secs, text) in [
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (7199, "119m"),
            (7200, "2h"),
            (172_799, "47h"),
            (172_800, "2d"),
        ] {
            assert_eq!(age_text(secs), text);
        }
    }

    #[test]
    fn a_line_per_root_then_the_totals() {
        let status = Status {
            dir: PathBuf::from("/var/lib/narpipe"),
            entries: vec![
                Entry {
                    path: "/nix/store/a".into(),
                    accepted_at: 1000,
                    attempts: 0,
                    last_error: None,
                    failed: false,
                },
                Entry {
                    path: "/nix/store/b".into(),
                    accepted_at: 1000 - 3 * 86_400,
                    attempts: 5,
                    last_error: Some("cannot\nreach it".into()),
                    failed: true,
                },
            ],
            journal: Some(PathBuf::from("/var/lib/narpipe/journal")),
        };
        let now = UNIX_EPOCH + Duration::from_secs(1000 + 180);
        assert_eq!(
            status.render(now),
            "pending  /nix/store/a  accepted 3m ago, 0 failed attempts\n\
             failed   /nix/store/b  accepted 3d ago, 5 failed attempts, last error: cannot reach it\n\
             note: /var/lib/narpipe/journal from an earlier version is not imported yet; the next \
             upload on this state dir imports its paths\n\
             1 pending, 1 failed in /var/lib/narpipe\n"
        );
    }

    #[test]
    fn no_queue_is_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let text = Status::read(dir.path()).unwrap().render(SystemTime::now());
        assert_eq!(
            text,
            format!("0 pending, 0 failed in {}\n", dir.path().display())
        );
    }
}
