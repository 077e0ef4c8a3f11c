//! The durable queue: which accepted root paths are not finished yet, on SQLite.
//!
//! `STATE_DIR/queue.sqlite`, in WAL mode (readers such as `upload status` never wait
//! for the uploader):
//! ```text
//! paths(path TEXT PRIMARY KEY, accepted_at INTEGER, attempts INTEGER,
//!       last_error TEXT, failed INTEGER)     one row per root still owed to the cache
//! ```
//! A root counts as accepted once the transaction inserting it commits with
//! `synchronous=FULL` (the WAL is fsync'd); a whole read of the pipe is one
//! transaction. Retiring deletes the row (not synced: a retirement lost to a power cut
//! only makes the next start look at the path again and skip it).
//!
//! One writer per state dir: an exclusive lock on `STATE_DIR/lock` (flock, released by
//! the kernel when the process ends, however it ends) is taken before the database is
//! touched, and holds the owner's PID for the message a second upload gets; earlier
//! versions lock the same file. At open, SQLite's integrity check runs; a database it
//! finds damaged, or a file that is not a database, is moved aside as
//! `queue.sqlite.corrupt-<time>` and replaced by one rebuilt from every row that can
//! still be read. Any other failure to open is an error: a healthy queue is never
//! set aside because it was busy or unreadable for another reason. The journal file of
//! earlier versions is imported once, then renamed. [`Status`] is what `upload status`
//! prints.

mod legacy;
mod status;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use std::fs::{File, OpenOptions};
use std::io::Write;

pub use status::Status;

const FILE: &str = "queue.sqlite";
/// The format of the tables, in `PRAGMA user_version`.
const SCHEMA: i64 = 2;

/// Errors name the database or directory; the cause's text is part of the message
/// (callers log `{e}`), not a `source`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state dir {} is not a directory", .0.display())]
    NotADir(PathBuf),
    #[error("state dir {}: {cause}", .dir.display())]
    Dir { dir: PathBuf, cause: io::Error },
    #[error("state queue {}: {cause}", .db.display())]
    Db { db: PathBuf, cause: rusqlite::Error },
    #[error("state dir {} is in use by another upload{} (it holds {})", .dir.display(), .holder.map(|p| format!(", process {p}")).unwrap_or_default(), .lock.display())]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        /// The process that holds it, as it wrote in the lock file.
        holder: Option<u32>,
    },
    #[error("state queue {} was made by a newer narpipe (format {found}; this one knows {SCHEMA})", .db.display())]
    Newer { db: PathBuf, found: i64 },
    #[error(transparent)]
    Legacy(#[from] legacy::Error),
    #[error("cannot move the damaged state queue {} aside: {cause}", .db.display())]
    MoveAside { db: PathBuf, cause: io::Error },
}

/// A root still owed to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub path: String,
    /// Given up on (reported failed) with this reason; retried at the next start.
    pub failed: Option<String>,
    /// The caches it is already in (see [`Queue::retire_in`]).
    pub done: Vec<String>,
}

/// One row, for `upload status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// Unix seconds.
    pub accepted_at: i64,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub failed: bool,
}

pub struct Queue {
    conn: Connection,
    db: PathBuf,
    /// Held while open: one upload per state dir.
    _lock: nix::fcntl::Flock<File>,
}

/// Why a database cannot be used as it is.
enum Unusable {
    /// SQLite says it is damaged, or not a database: rebuild it.
    Damaged(String),
    /// Anything else (busy, permissions, IO, a newer format): report it.
    Failed(Error),
}

/// Whether an SQLite error means the file itself is damaged.
fn damaged(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// What opening found, besides the pending roots: things the user should hear about
/// (a damaged database rebuilt, an old journal imported).
#[derive(Debug, Default)]
pub struct Opened {
    pub pending: Vec<Pending>,
    pub notes: Vec<String>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Takes the state dir's lock for this process, writing its PID in the file.
fn lock(dir: &Path) -> Result<nix::fcntl::Flock<File>, Error> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|cause| Error::Dir {
            dir: dir.to_path_buf(),
            cause,
        })?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |_| Error::Locked {
            dir: dir.to_path_buf(),
            holder: std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            lock: path.clone(),
        },
    )?;
    lock.set_len(0)
        .and_then(|()| writeln!(&*lock, "{}", std::process::id()))
        .map_err(|cause| Error::Dir {
            dir: dir.to_path_buf(),
            cause,
        })?;
    Ok(lock)
}

impl Queue {
    /// Opens (creating) the queue in `dir`, locks it for this process, and returns
    /// what is still pending.
    pub fn open(dir: &Path) -> Result<(Queue, Opened), Error> {
        match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(Error::NotADir(dir.to_path_buf())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|cause| Error::Dir {
                    dir: dir.to_path_buf(),
                    cause,
                })?
            }
            Err(cause) => {
                return Err(Error::Dir {
                    dir: dir.to_path_buf(),
                    cause,
                })
            }
        }
        let lock = lock(dir)?;
        let db = dir.join(FILE);
        let mut opened = Opened::default();
        let conn = match Self::connect(&db) {
            Ok(conn) => conn,
            Err(Unusable::Damaged(problem)) => {
                let (conn, note) = Self::rebuild(&db, &problem)?;
                opened.notes.push(note);
                conn
            }
            Err(Unusable::Failed(e)) => return Err(e),
        };
        let mut queue = Queue {
            conn,
            db,
            _lock: lock,
        };
        if let Some(note) = queue.import_journal(dir)? {
            opened.notes.push(note);
        }
        opened.pending = queue.pending()?;
        Ok((queue, opened))
    }

    fn err(&self, cause: rusqlite::Error) -> Error {
        Error::Db {
            db: self.db.clone(),
            cause,
        }
    }

    /// Opens the database, checks it and sets it up.
    fn connect(db: &Path) -> Result<Connection, Unusable> {
        let fail = |cause: rusqlite::Error| {
            if damaged(&cause) {
                Unusable::Damaged(cause.to_string())
            } else {
                Unusable::Failed(Error::Db {
                    db: db.to_path_buf(),
                    cause,
                })
            }
        };
        let conn = Connection::open(db).map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(fail)?;
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(fail)?;
        if check != "ok" {
            return Err(Unusable::Damaged(format!("integrity check: {check}")));
        }
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(fail)?;
        if version > SCHEMA {
            return Err(Unusable::Failed(Error::Newer {
                db: db.to_path_buf(),
                found: version,
            }));
        }
        Self::set_up(&conn).map_err(fail)?;
        Ok(conn)
    }

    fn set_up(conn: &Connection) -> rusqlite::Result<()> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < SCHEMA {
            // Format 2 adds `done`: the caches a root is already in, when it goes to
            // several (it is retired once it is in all of them).
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS paths (
                     path TEXT PRIMARY KEY NOT NULL,
                     accepted_at INTEGER NOT NULL,
                     attempts INTEGER NOT NULL DEFAULT 0,
                     last_error TEXT,
                     failed INTEGER NOT NULL DEFAULT 0
                 );
                 CREATE TABLE IF NOT EXISTS done (
                     path TEXT NOT NULL,
                     cache TEXT NOT NULL,
                     PRIMARY KEY (path, cache)
                 );
                 PRAGMA user_version = 2;
                 COMMIT;",
            )?;
        }
        Ok(())
    }

    /// Replaces a damaged database by one built from what can still be read: the new
    /// one is made complete beside it first, then the damaged one (with its WAL) is
    /// moved aside under a name of its own, then the new one is renamed into place. A
    /// crash at any step leaves either the damaged queue or the rebuilt one in place.
    fn rebuild(db: &Path, problem: &str) -> Result<(Connection, String), Error> {
        let rows = salvage(db);
        let fresh = db.with_file_name(format!("{FILE}.new"));
        let db_err = |cause| Error::Db {
            db: db.to_path_buf(),
            cause,
        };
        let io_err = |cause| Error::MoveAside {
            db: db.to_path_buf(),
            cause,
        };
        for stale in [
            String::new(),
            "-wal".into(),
            "-shm".into(),
            "-journal".into(),
        ] {
            let _ = std::fs::remove_file(format!("{}{stale}", fresh.display()));
        }
        {
            let mut conn = Connection::open(&fresh).map_err(db_err)?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(db_err)?;
            Self::set_up(&conn).map_err(db_err)?;
            let tx = conn.transaction().map_err(db_err)?;
            {
                let mut insert = tx
                    .prepare(
                        "INSERT OR IGNORE INTO paths (path, accepted_at, attempts, last_error, failed)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(db_err)?;
                for e in &rows {
                    insert
                        .execute(params![
                            e.path,
                            e.accepted_at,
                            e.attempts,
                            e.last_error,
                            e.failed
                        ])
                        .map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)?;
            // Fold the WAL into the file, so that the file alone is the queue.
            conn.pragma_update(None, "journal_mode", "DELETE")
                .map_err(db_err)?;
        }
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let aside = db.with_file_name(format!("{FILE}.corrupt-{stamp}-{}", std::process::id()));
        for ext in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{ext}", db.display()));
            if side.exists() {
                std::fs::rename(&side, format!("{}{ext}", aside.display())).map_err(io_err)?;
            }
        }
        std::fs::rename(db, &aside).map_err(io_err)?;
        std::fs::rename(&fresh, db).map_err(io_err)?;
        if let Some(dir) = db.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        let conn = match Self::connect(db) {
            Ok(conn) => conn,
            Err(Unusable::Damaged(why)) => {
                return Err(db_err(rusqlite::Error::InvalidParameterName(format!(
                    "the rebuilt queue is damaged too: {why}"
                ))))
            }
            Err(Unusable::Failed(e)) => return Err(e),
        };
        Ok((
            conn,
            format!(
                "state queue {} was damaged ({problem}): moved aside as {}; rebuilt with the {} \
                 paths that could still be read, any others are lost",
                db.display(),
                aside.display(),
                rows.len()
            ),
        ))
    }

    /// Imports the journal file an earlier version left, once.
    fn import_journal(&mut self, dir: &Path) -> Result<Option<String>, Error> {
        let Some(old) = legacy::take(dir)? else {
            return Ok(None);
        };
        let tx = self.conn.transaction().map_err(|e| Error::Db {
            db: self.db.clone(),
            cause: e,
        })?;
        let at = now();
        for (path, failed) in &old.pending {
            tx.execute(
                "INSERT OR IGNORE INTO paths (path, accepted_at, last_error, failed)
                 VALUES (?1, ?2, ?3, ?4)",
                params![path, at, failed, failed.is_some()],
            )
            .map_err(|e| Error::Db {
                db: self.db.clone(),
                cause: e,
            })?;
        }
        tx.commit().map_err(|e| Error::Db {
            db: self.db.clone(),
            cause: e,
        })?;
        let renamed = old.finish()?;
        Ok(Some(format!(
            "imported {} pending paths from the journal of an earlier version (now {})",
            old.pending.len(),
            renamed.display()
        )))
    }

    fn pending(&self) -> Result<Vec<Pending>, Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT path, failed, last_error FROM paths ORDER BY accepted_at, path")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt
            .query_map([], |r| {
                let failed: bool = r.get(1)?;
                let reason: Option<String> = r.get(2)?;
                Ok(Pending {
                    path: r.get(0)?,
                    failed: if failed {
                        reason.or(Some(String::new()))
                    } else {
                        None
                    },
                    done: Vec::new(),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?;
        let mut done: HashMap<String, Vec<String>> = HashMap::new();
        self.conn
            .prepare("SELECT path, cache FROM done ORDER BY cache")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?
                    .try_for_each(|row| {
                        let (path, cache) = row?;
                        done.entry(path).or_default().push(cache);
                        Ok(())
                    })
            })
            .map_err(|e| self.err(e))?;
        for p in &mut rows {
            p.done = done.remove(&p.path).unwrap_or_default();
        }
        Ok(rows)
    }

    pub fn is_pending(&self, path: &str) -> bool {
        self.conn
            .query_row("SELECT 1 FROM paths WHERE path = ?1", [path], |_| Ok(()))
            .optional()
            .is_ok_and(|r| r.is_some())
    }

    pub fn pending_count(&self) -> usize {
        self.conn
            .query_row("SELECT count(*) FROM paths", [], |r| r.get::<_, i64>(0))
            .map_or(0, |n| n as usize)
    }

    /// Runs `f` in one transaction, fsync'd on commit when `durable`.
    fn write(
        &mut self,
        durable: bool,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<()>,
    ) -> Result<(), Error> {
        let sync = if durable { "FULL" } else { "NORMAL" };
        let res = self
            .conn
            .pragma_update(None, "synchronous", sync)
            .and_then(|()| self.conn.transaction())
            .and_then(|tx| f(&tx).and_then(|()| tx.commit()));
        res.map_err(|e| self.err(e))
    }

    /// Records `paths` as accepted (again pending, if they had failed); durable when
    /// this returns.
    pub fn accept<S: AsRef<str>>(&mut self, paths: &[S]) -> Result<(), Error> {
        let at = now();
        self.write(true, |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO paths (path, accepted_at) VALUES (?1, ?2)
                 ON CONFLICT (path) DO UPDATE SET failed = 0",
            )?;
            for p in paths {
                insert.execute(params![p.as_ref(), at])?;
            }
            Ok(())
        })
    }

    /// Retires `path`: its closure is in the cache, or it can never be uploaded.
    pub fn retire(&mut self, path: &str) -> Result<(), Error> {
        self.write(false, |tx| {
            tx.execute("DELETE FROM paths WHERE path = ?1", [path])?;
            tx.execute("DELETE FROM done WHERE path = ?1", [path])
                .map(drop)
        })
    }

    /// Records that `path` is done for `cache`, one of the run's `caches`, and retires
    /// it once it is done for all of them. With one cache this is [`Queue::retire`].
    pub fn retire_in<S: AsRef<str>>(
        &mut self,
        path: &str,
        cache: &str,
        caches: &[S],
    ) -> Result<(), Error> {
        if caches.len() <= 1 {
            return self.retire(path);
        }
        self.write(false, |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO done (path, cache) VALUES (?1, ?2)",
                params![path, cache],
            )?;
            let mut is_done =
                tx.prepare_cached("SELECT 1 FROM done WHERE path = ?1 AND cache = ?2")?;
            for c in caches {
                if !is_done.exists(params![path, c.as_ref()])? {
                    return Ok(());
                }
            }
            tx.execute("DELETE FROM paths WHERE path = ?1", [path])?;
            tx.execute("DELETE FROM done WHERE path = ?1", [path])
                .map(drop)
        })
    }

    /// Counts a failed attempt at `path` (it stays pending and is retried).
    pub fn attempt_failed(&mut self, path: &str, reason: &str) -> Result<(), Error> {
        self.write(false, |tx| {
            tx.execute(
                "UPDATE paths SET attempts = attempts + 1, last_error = ?2 WHERE path = ?1",
                params![path, reason],
            )
            .map(drop)
        })
    }

    /// Gives up on `path` for this run: kept with the reason, retried at the next start.
    pub fn fail(&mut self, path: &str, reason: &str) -> Result<(), Error> {
        self.write(true, |tx| {
            tx.execute(
                "UPDATE paths SET attempts = attempts + 1, last_error = ?2, failed = 1
                 WHERE path = ?1",
                params![path, reason],
            )
            .map(drop)
        })
    }
}

/// Every row of the queue in `dir`, oldest first, read without claiming it (an
/// upload may be running). An empty list when there is no queue.
pub fn entries(dir: &Path) -> Result<Vec<Entry>, Error> {
    let db = dir.join(FILE);
    if !db.exists() {
        return Ok(Vec::new());
    }
    let err = |cause| Error::Db {
        db: db.clone(),
        cause,
    };
    let conn = Connection::open(&db).map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    // An upload that has just created the file may not have made its tables yet.
    let made: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'paths'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    if !made {
        return Ok(Vec::new());
    }
    read_entries(&conn).map_err(err)
}

fn read_entries(conn: &Connection) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare(
        "SELECT path, accepted_at, attempts, last_error, failed FROM paths
         ORDER BY accepted_at, path",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Entry {
            path: r.get(0)?,
            accepted_at: r.get(1)?,
            attempts: r.get(2)?,
            last_error: r.get(3)?,
            failed: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// The rows of a damaged database that can still be read. Rows are read in rowid
/// order; where a damaged page stops the scan, it starts again past the last rowid
/// read, one rowid further each time, so rows after a bad page are still found.
fn salvage(db: &Path) -> Vec<Entry> {
    let Ok(conn) = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    // How far to look: the largest rowid, if that can be read, else a generous bound.
    let last: i64 = conn
        .query_row("SELECT max(rowid) FROM paths", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .ok()
        .flatten()
        .unwrap_or(10_000_000);
    let mut found = Vec::new();
    let mut after = 0i64;
    let mut restarts = 0;
    while after < last && restarts < 100_000 {
        let Ok(mut stmt) = conn.prepare(
            "SELECT rowid, path, accepted_at, attempts, last_error, failed FROM paths
             WHERE rowid > ?1 ORDER BY rowid",
        ) else {
            return found;
        };
        let Ok(mut rows) = stmt.query([after]) else {
            after += 1;
            restarts += 1;
            continue;
        };
        loop {
            match rows.next() {
                Ok(Some(r)) => {
                    if let Ok(rowid) = r.get::<_, i64>(0) {
                        after = rowid;
                    }
                    if let Ok(path) = r.get::<_, String>(1) {
                        found.push(Entry {
                            path,
                            accepted_at: r.get(2).unwrap_or_else(|_| now()),
                            attempts: r.get(3).unwrap_or(0),
                            last_error: r.get(4).unwrap_or(None),
                            failed: r.get(5).unwrap_or(false),
                        });
                    }
                }
                Ok(None) => return found,
                Err(_) => {
                    after += 1;
                    restarts += 1;
                    break;
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &[Pending]) -> Vec<&str> {
        p.iter().map(|p| p.path.as_str()).collect()
    }

    #[test]
    fn keeps_what_is_not_retired_with_attempts_and_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, opened) = Queue::open(dir.path()).unwrap();
        assert!(opened.pending.is_empty() && opened.notes.is_empty());
        q.accept(&["/nix/store/a", "/nix/store/b", "/nix/store/c"])
            .unwrap();
        q.retire("/nix/store/b").unwrap();
        q.attempt_failed("/nix/store/c", "busy").unwrap();
        q.fail("/nix/store/c", "backend said\tno\n").unwrap();
        assert_eq!(q.pending_count(), 2);
        drop(q);
        let (q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(paths(&opened.pending), ["/nix/store/a", "/nix/store/c"]);
        assert_eq!(
            opened.pending[1].failed.as_deref(),
            Some("backend said\tno\n")
        );
        let c = &entries(dir.path()).unwrap()[1];
        assert_eq!((c.attempts, c.failed), (2, true));
        // Accepted again: pending again, attempts kept.
        let mut q = q;
        q.accept(&["/nix/store/c"]).unwrap();
        assert!(q.is_pending("/nix/store/c"));
        let c = &entries(dir.path()).unwrap()[1];
        assert_eq!((c.attempts, c.failed), (2, false));
    }

    #[test]
    fn a_root_for_several_caches_is_retired_once_it_is_in_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let caches = ["file:///a", "s3://b"];
        let (mut q, _) = Queue::open(dir.path()).unwrap();
        q.accept(&["/nix/store/x", "/nix/store/y"]).unwrap();
        q.retire_in("/nix/store/x", "s3://b", &caches).unwrap();
        q.retire_in("/nix/store/y", "s3://b", &caches).unwrap();
        q.retire_in("/nix/store/y", "file:///a", &caches).unwrap();
        drop(q);
        // Across a restart: x is still owed to file:///a only.
        let (mut q, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(paths(&opened.pending), ["/nix/store/x"]);
        assert_eq!(opened.pending[0].done, ["s3://b"]);
        // A cache added since is owed it too; one cache alone retires at once.
        q.retire_in(
            "/nix/store/x",
            "file:///a",
            &["file:///a", "s3://b", "gs://c"],
        )
        .unwrap();
        assert!(q.is_pending("/nix/store/x"));
        q.retire_in("/nix/store/x", "gs://c", &["gs://c"]).unwrap();
        assert!(!q.is_pending("/nix/store/x"));
        drop(q);
        let (_, opened) = Queue::open(dir.path()).unwrap();
        assert!(opened.pending.is_empty());
    }

    #[test]
    fn one_upload_per_state_dir_named_with_its_lock_and_process() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Queue::open(dir.path()).unwrap();
        // A second open (flock is per open file, so this process counts as another).
        let err = Queue::open(dir.path()).err().expect("refused");
        let text = format!("{:#}", anyhow::Error::from(err));
        let lock = dir.path().join("lock").display().to_string();
        assert!(text.contains(&lock), "{text}");
        assert!(
            text.contains(&format!("process {}", std::process::id())),
            "{text}"
        );
        assert_eq!(
            text.matches("in use by another upload").count(),
            1,
            "{text}"
        );
        // Released with the queue (and by the kernel when a process dies).
        drop(first);
        assert!(Queue::open(dir.path()).is_ok());
    }

    #[test]
    fn a_busy_or_unreadable_queue_is_an_error_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = Queue::open(dir.path()).unwrap();
        q.accept(&["/nix/store/a"]).unwrap();
        drop(q);
        // A newer format: refused, and left alone.
        let conn = Connection::open(dir.path().join(FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Queue::open(dir.path()).err().expect("refused");
        assert!(matches!(err, Error::Newer { found: 99, .. }), "{err}");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(!names.iter().any(|n| n.contains("corrupt")), "{names:?}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside_and_the_queue_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(dir.path().join(FILE), &garbage).unwrap();
        let (mut q, opened) = Queue::open(dir.path()).unwrap();
        assert!(opened.pending.is_empty());
        assert_eq!(opened.notes.len(), 1);
        assert!(opened.notes[0].contains("damaged"), "{:?}", opened.notes);
        assert!(opened.notes[0].contains("0 paths"), "{:?}", opened.notes);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("queue.sqlite.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(dir.path().join(&aside[0])).unwrap(), garbage);
        q.accept(&["/nix/store/a"]).unwrap();
    }

    #[test]
    fn a_damaged_database_is_rebuilt_from_the_rows_that_can_be_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut q, _) = Queue::open(dir.path()).unwrap();
        let many: Vec<String> = (0..3000).map(|i| format!("/nix/store/p{i:05}")).collect();
        q.accept(&many).unwrap();
        q.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        drop(q);
        // Random bytes over the middle of the file.
        let db = dir.path().join(FILE);
        let mut bytes = std::fs::read(&db).unwrap();
        let mid = bytes.len() / 2;
        for (i, b) in bytes[mid..mid + 8192].iter_mut().enumerate() {
            *b = (i * 31 % 256) as u8;
        }
        std::fs::write(&db, &bytes).unwrap();
        let (_, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(opened.notes.len(), 1, "{:?}", opened.notes);
        assert!(opened.notes[0].contains("damaged"), "{:?}", opened.notes);
        let kept = opened.pending.len();
        // 8 KiB of damage costs the rows of two or three pages, not the rest of the
        // table after them.
        assert!((2500..3000).contains(&kept), "{kept} of 3000 kept");
        assert!(
            opened.notes[0].contains(&format!("{kept} paths")),
            "{:?}",
            opened.notes
        );
    }

    #[test]
    fn a_journal_of_an_earlier_version_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        legacy::write_for_test(
            dir.path(),
            &[("/nix/store/a", None), ("/nix/store/b", Some("no"))],
        );
        let (_, opened) = Queue::open(dir.path()).unwrap();
        assert_eq!(paths(&opened.pending), ["/nix/store/a", "/nix/store/b"]);
        assert_eq!(opened.pending[1].failed.as_deref(), Some("no"));
        assert!(
            opened.notes[0].contains("imported 2 pending paths"),
            "{:?}",
            opened.notes
        );
        assert!(!dir.path().join("journal").exists());
        let (_, opened) = Queue::open(dir.path()).unwrap();
        assert!(opened.notes.is_empty(), "once: {:?}", opened.notes);
        assert_eq!(opened.pending.len(), 2);
    }

    #[test]
    fn entries_of_a_queue_not_set_up_yet_are_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(entries(dir.path()).unwrap().is_empty(), "no file");
        std::fs::write(dir.path().join(FILE), b"").unwrap();
        assert!(entries(dir.path()).unwrap().is_empty(), "an empty file");
    }

    #[test]
    fn a_regular_file_as_state_dir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = Queue::open(&file).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!("state dir {} is not a directory", file.display())
        );
    }
}
