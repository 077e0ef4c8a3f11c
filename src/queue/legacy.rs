//! The journal file of earlier versions, read once to import it into the queue
//! (see [`crate::queue`]).
//!
//! An append-only file `journal` in the state directory, one record per line, each
//! ending in the CRC-32 of the rest:
//! ```text
//! A\t/nix/store/…-hello\t1c291ca3      accepted
//! F\t/nix/store/…-hello\treason\t9a0e…  failed for now; retried on next start
//! D\t/nix/store/…-hello\t5f1d…          done: retired
//! ```
//! Records replay into the set of pending paths; a torn or corrupt line is skipped.
//! The older upload held `lock` (flock) while it ran; the queue takes the same lock
//! before reading this, so an older upload still running keeps it out.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

pub(super) const FILE: &str = "journal";

/// The io error's text is part of the message (callers log `{e}`), not a `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("old state journal {}: {cause}", .path.display())]
    Io { path: PathBuf, cause: io::Error },
}

/// An old journal read, to be imported and then put away with [`Legacy::finish`].
pub struct Legacy {
    dir: PathBuf,
    /// Paths still pending, with the reason when they had failed.
    pub pending: Vec<(String, Option<String>)>,
}

#[cfg(test)]
fn record(fields: &[&str]) -> String {
    let body = fields.join("\t");
    format!("{body}\t{:08x}\n", crc32fast::hash(body.as_bytes()))
}

fn parse(line: &str) -> Option<(char, String, Option<String>)> {
    let (body, crc) = line.rsplit_once('\t')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    let mut fields = body.split('\t');
    let op = fields.next()?;
    let path = fields.next()?.to_string();
    match (op, fields.next(), fields.next()) {
        ("A", None, _) => Some(('A', path, None)),
        ("D", None, _) => Some(('D', path, None)),
        ("F", Some(reason), None) => Some(('F', path, Some(reason.to_string()))),
        _ => None,
    }
}

/// Reads the journal an earlier version left in `dir`, if any (the caller holds the
/// state dir's lock).
pub fn take(dir: &Path) -> Result<Option<Legacy>, Error> {
    let path = dir.join(FILE);
    let err = |cause| Error::Io {
        path: path.clone(),
        cause,
    };
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut live = BTreeMap::new();
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(err)? == 0 {
            break;
        }
        // A last line without newline is a torn append: ignore it.
        let Some(line) = buf.strip_suffix(b"\n") else {
            break;
        };
        let Some((op, path, reason)) = std::str::from_utf8(line).ok().and_then(parse) else {
            continue;
        };
        if op == 'D' {
            live.remove(&path);
        } else {
            live.insert(path, reason);
        }
    }
    Ok(Some(Legacy {
        dir: dir.to_path_buf(),
        pending: live.into_iter().collect(),
    }))
}

impl Legacy {
    /// Renames the journal (imported now) and removes what else the old version kept.
    pub fn finish(&self) -> Result<PathBuf, Error> {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let from = self.dir.join(FILE);
        let to = self.dir.join(format!("{FILE}.imported-{at}"));
        fs::rename(&from, &to).map_err(|cause| Error::Io { path: from, cause })?;
        let _ = fs::remove_file(self.dir.join(format!("{FILE}.tmp")));
        Ok(to)
    }
}

/// Writes a journal as an earlier version would have, for tests.
#[cfg(test)]
pub fn write_for_test(dir: &Path, pending: &[(&str, Option<&str>)]) {
    let mut text = String::new();
    for (path, failed) in pending {
        text.push_str(&record(&["A", path]));
        if let Some(reason) = failed {
            text.push_str(&record(&["F", path, reason]));
        }
    }
    text.push_str(&record(&["A", "/nix/store/retired"]));
    text.push_str(&record(&["D", "/nix/store/retired"]));
    text.push_str("A\t/nix/store/corrupt\tdeadbeef\n\0\0\0\n");
    fs::write(dir.join(FILE), text).unwrap();
}
