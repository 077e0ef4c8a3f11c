//! The durable queue: which accepted root paths are not finished yet.
//!
//! An append-only file `journal` in the state directory, one record per line, each
//! ending in the CRC-32 of the rest:
//! ```text
//! A\t/nix/store/…-hello\t1c291ca3      accepted (fsync'd before it counts)
//! F\t/nix/store/…-hello\treason\t9a0e…  failed for now; retried on next start
//! D\t/nix/store/…-hello\t5f1d…          done: retired
//! ```
//! On open, records replay into the set of pending paths; a torn or corrupt line (a
//! crash mid-append) is skipped. The file is compacted on open and whenever it holds
//! far more records than pending paths: the live set is written to a temporary file,
//! synced, and renamed over the journal.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

const FILE: &str = "journal";
const COMPACT_MIN: usize = 4096;

/// The io error's text is part of the message (callers log `{e}`), not a `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state journal {path}: {cause}")]
    Io { path: String, cause: io::Error },
    #[error("state dir {} is in use by another upload{} (it holds {})", .dir.display(), .holder.map(|p| format!(", process {p}")).unwrap_or_default(), .lock.display())]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        /// The process that holds it, as it wrote in the lock file.
        holder: Option<u32>,
    },
}

/// A path still owed to the cache, with the reason of its last failure if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub path: String,
    pub failed: Option<String>,
}

pub struct Journal {
    dir: PathBuf,
    /// Held while open: one upload per state directory.
    _lock: nix::fcntl::Flock<File>,
    file: File,
    live: BTreeMap<String, Option<String>>,
    records: usize,
}

fn record(fields: &[&str]) -> String {
    let body = fields.join("\t");
    format!("{body}\t{:08x}\n", crc32fast::hash(body.as_bytes()))
}

/// Tabs and newlines cannot appear in a record's fields.
fn clean(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
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

impl Journal {
    /// Opens (creating) the journal in `dir` and returns what is still pending.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Pending>), Error> {
        let err = |cause| Error::Io {
            path: dir.join(FILE).display().to_string(),
            cause,
        };
        fs::create_dir_all(dir).map_err(err)?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(err)?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| Error::Locked {
                dir: dir.to_path_buf(),
                holder: fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
                lock: lock_path.clone(),
            })?;
        // Who holds it, for the message a second upload gets (best effort).
        lock.set_len(0)
            .and_then(|()| writeln!(&*lock, "{}", std::process::id()))
            .map_err(err)?;
        let mut live = BTreeMap::new();
        match File::open(dir.join(FILE)) {
            Ok(f) => {
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
                    let Some((op, path, reason)) = std::str::from_utf8(line).ok().and_then(parse)
                    else {
                        continue;
                    };
                    match op {
                        'D' => {
                            live.remove(&path);
                        }
                        _ => {
                            live.insert(path, reason);
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let file = Self::rewrite(dir, &live).map_err(err)?;
        let pending = live
            .iter()
            .map(|(path, failed)| Pending {
                path: path.clone(),
                failed: failed.clone(),
            })
            .collect();
        let records = live.len();
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                _lock: lock,
                file,
                live,
                records,
            },
            pending,
        ))
    }

    /// Writes the live set to a fresh file and renames it into place; returns it open
    /// for appending.
    fn rewrite(dir: &Path, live: &BTreeMap<String, Option<String>>) -> io::Result<File> {
        let tmp = dir.join(format!("{FILE}.tmp"));
        let mut f = File::create(&tmp)?;
        let mut text = String::new();
        for (path, failed) in live {
            match failed {
                None => text.push_str(&record(&["A", path])),
                Some(reason) => text.push_str(&record(&["F", path, reason])),
            }
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(FILE))?;
        File::open(dir)?.sync_all()?;
        OpenOptions::new().append(true).open(dir.join(FILE))
    }

    fn err(&self, cause: io::Error) -> Error {
        Error::Io {
            path: self.dir.join(FILE).display().to_string(),
            cause,
        }
    }

    /// Appends whole records. A write that fails half-way (a full disk) is cut off
    /// again, so that the next record does not land on a fragment and get lost.
    fn append(&mut self, text: &str, sync: bool) -> Result<(), Error> {
        let len = self.file.metadata().map_err(|e| self.err(e))?.len();
        let res = self.file.write_all(text.as_bytes()).and_then(|()| {
            if sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            let _ = self.file.set_len(len);
            return Err(self.err(e));
        }
        Ok(())
    }

    pub fn is_pending(&self, path: &str) -> bool {
        self.live.contains_key(path)
    }

    pub fn pending_count(&self) -> usize {
        self.live.len()
    }

    /// Records `paths` as accepted; durable when this returns.
    pub fn accept<S: AsRef<str>>(&mut self, paths: &[S]) -> Result<(), Error> {
        let mut text = String::new();
        let mut new = Vec::new();
        for p in paths {
            let p = clean(p.as_ref());
            if self.live.get(&p) == Some(&None) || new.contains(&p) {
                continue;
            }
            text.push_str(&record(&["A", &p]));
            new.push(p);
        }
        if text.is_empty() {
            return Ok(());
        }
        self.append(&text, true)?;
        self.records += new.len();
        for p in new {
            self.live.insert(p, None);
        }
        Ok(())
    }

    /// Retires `path` (its closure is in the cache, or it can never be uploaded).
    /// Not synced: if the record is lost, the path is looked at again and skipped.
    pub fn retire(&mut self, path: &str) -> Result<(), Error> {
        let path = clean(path);
        if self.live.remove(&path).is_none() {
            return Ok(());
        }
        self.records += 1;
        self.append(&record(&["D", &path]), false)?;
        self.maybe_compact()
    }

    /// Keeps `path` pending with the reason it failed, for the next start.
    pub fn fail(&mut self, path: &str, reason: &str) -> Result<(), Error> {
        let (path, reason) = (clean(path), clean(reason));
        self.append(&record(&["F", &path, &reason]), true)?;
        self.records += 1;
        self.live.insert(path, Some(reason));
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), Error> {
        if self.records > COMPACT_MIN && self.records > 4 * self.live.len() {
            self.file = Self::rewrite(&self.dir, &self.live).map_err(|e| self.err(e))?;
            self.records = self.live.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_paths(p: &[Pending]) -> Vec<&str> {
        p.iter().map(|p| p.path.as_str()).collect()
    }

    #[test]
    fn replays_what_is_not_retired() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, pending) = Journal::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        j.accept(&["/nix/store/a", "/nix/store/b", "/nix/store/c"])
            .unwrap();
        j.retire("/nix/store/b").unwrap();
        j.fail("/nix/store/c", "backend said\tno\n").unwrap();
        drop(j);
        let (j, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(pending_paths(&pending), ["/nix/store/a", "/nix/store/c"]);
        assert_eq!(pending[1].failed.as_deref(), Some("backend said no "));
        assert_eq!(j.pending_count(), 2);
    }

    #[test]
    fn survives_a_torn_last_write_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.accept(&["/nix/store/a", "/nix/store/b"]).unwrap();
        drop(j);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        // A corrupt record, zeros as after a crash, then a half-written one.
        f.write_all(b"A\t/nix/store/x\tdeadbeef\n\0\0\0\0\n")
            .unwrap();
        f.write_all(record(&["D", "/nix/store/a"]).trim_end().as_bytes())
            .unwrap();
        drop(f);
        let (_, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(pending_paths(&pending), ["/nix/store/a", "/nix/store/b"]);
        // Opening compacted the file: only the live records remain.
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn compacts_as_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.accept(&["/nix/store/keep"]).unwrap();
        for i in 0..5000 {
            let p = format!("/nix/store/p{i}");
            j.accept(&[&p]).unwrap_or_else(|e| panic!("{e}"));
            j.retire(&p).unwrap();
        }
        let lines = fs::read_to_string(dir.path().join(FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines < 2 * COMPACT_MIN, "{lines} lines");
        drop(j);
        let (_, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(pending_paths(&pending), ["/nix/store/keep"]);
    }

    #[test]
    fn one_upload_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Journal::open(dir.path()).unwrap();
        let err = Journal::open(dir.path())
            .err()
            .expect("second open refused");
        // Said once, naming the lock file and the process holding it.
        let text = format!("{:#}", anyhow::Error::from(err));
        let lock = dir.path().join("lock").display().to_string();
        assert_eq!(
            text.matches("in use by another upload").count(),
            1,
            "{text}"
        );
        assert!(text.contains(&lock), "{text}");
        assert!(
            text.contains(&format!("process {}", std::process::id())),
            "{text}"
        );
        drop(first);
        assert!(Journal::open(dir.path()).is_ok());
    }

    #[test]
    fn accepting_twice_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.accept(&["/nix/store/a"]).unwrap();
        j.accept(&["/nix/store/a"]).unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(j.is_pending("/nix/store/a"));
    }
}
