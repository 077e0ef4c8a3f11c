//! The NAR (Nix ARchive) writer: a filesystem tree serialised exactly as
//! `nix-store --dump` does.
//!
//! Every token is a string: a little-endian u64 length, the bytes, zero padding to a
//! multiple of 8. A tree is
//! ```text
//! "nix-archive-1" "(" "type" "regular" ["executable" ""] "contents" <bytes> ")"
//!                 "(" "type" "symlink" "target" <target> ")"
//!                 "(" "type" "directory" ("entry" "(" "name" <n> "node" <node> ")")* ")"
//! ```
//! with directory entries in byte order of their names. Files are streamed, never held
//! whole in memory. Sync on purpose: callers run it on a plain thread. A [`Sink`] that
//! holds a buffer takes file contents straight into it, in large contiguous reads.
//! Below the top, a node's type comes from its directory entry, so that a file costs
//! an open, a stat of the open file and (most often) one read, and a directory or a
//! symlink no stat at all.
//! [`dump_listed`] also writes the tree's [`NarListing`] on the same walk.

use std::ffi::OsString;
use std::fs::{self, File, FileType, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::nar_listing::NarListing;

const COPY_BUF: usize = 256 * 1024;

/// What a read of a file's last bytes showed of what follows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Nothing known: the read asked for no more than what was left.
    Unknown,
    /// The read asked for a byte more than was left and got none: the file ends there.
    End,
    /// It got one: the file is longer than it was.
    More,
}

/// Where [`dump_into`] puts a NAR.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Takes at most `max` (> 0) bytes of `file` into the sink with one read call and
    /// returns how many it took (0 at the end of the file). With room for it, the read
    /// asks for one byte more, which tells whether the file ends there (see [`Tail`];
    /// that byte is not taken): the walk then needs no read of its own to check.
    fn put_from(&mut self, file: &mut File, max: u64) -> io::Result<(usize, Tail)>;
}

/// Reads at most `max` bytes of `file` into `buf` with one read call, asking for one
/// more when `buf` has room (see [`Sink::put_from`]).
pub fn read_some(file: &mut File, buf: &mut [u8], max: u64) -> io::Result<(usize, Tail)> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let want = buf.len().min(max.saturating_add(1));
    let n = file.read(&mut buf[..want])?;
    Ok(match n {
        _ if want <= max => (n, Tail::Unknown),
        _ if n > max => (max, Tail::More),
        _ if n == max => (n, Tail::End),
        _ => (n, Tail::Unknown),
    })
}

/// Any writer, through a copy buffer.
struct WriteSink<'a, W> {
    out: &'a mut W,
    buf: Vec<u8>,
}

impl<W: Write> Sink for WriteSink<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)
    }

    fn put_from(&mut self, file: &mut File, max: u64) -> io::Result<(usize, Tail)> {
        let (n, tail) = read_some(file, &mut self.buf, max)?;
        self.out.write_all(&self.buf[..n])?;
        Ok((n, tail))
    }
}

/// Writes `path`'s NAR into a sink, counting bytes so that a listing can be told where
/// each file's contents start.
struct Walk<'a, S> {
    out: &'a mut S,
    pos: u64,
    listing: Option<&'a mut NarListing>,
}

impl<S: Sink> Walk<'_, S> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.put(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn token(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(&(bytes.len() as u64).to_le_bytes())?;
        self.put(bytes)?;
        self.pad(bytes.len() as u64)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % 8) as usize;
        if rem != 0 {
            self.put(&[0u8; 8][..8 - rem])?;
        }
        Ok(())
    }

    fn node(&mut self, path: &Path) -> io::Result<()> {
        let meta = fs::symlink_metadata(path)?;
        self.typed_node(path, meta.file_type())
    }

    /// A node whose type is known already (from its directory's entry).
    fn typed_node(&mut self, path: &Path, ft: FileType) -> io::Result<()> {
        self.token(b"(")?;
        self.token(b"type")?;
        if ft.is_symlink() {
            self.token(b"symlink")?;
            self.token(b"target")?;
            let target = fs::read_link(path)?;
            self.token(target.as_os_str().as_bytes())?;
            if let Some(l) = self.listing.as_deref_mut() {
                l.symlink(target.as_os_str().as_bytes());
            }
        } else if ft.is_file() {
            // Not through a symlink, nor blocking on a FIFO, should the entry have
            // been replaced since its directory was read.
            let mut file = OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} changed while being archived", path.display()),
                ));
            }
            self.token(b"regular")?;
            let executable = meta.permissions().mode() & 0o100 != 0;
            if executable {
                self.token(b"executable")?;
                self.token(b"")?;
            }
            self.token(b"contents")?;
            self.contents(path, &mut file, meta.len(), executable)?;
        } else if ft.is_dir() {
            self.token(b"directory")?;
            if let Some(l) = self.listing.as_deref_mut() {
                l.directory();
            }
            let mut entries: Vec<(OsString, FileType)> = fs::read_dir(path)?
                .map(|e| e.and_then(|e| Ok((e.file_name(), e.file_type()?))))
                .collect::<io::Result<_>>()?;
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            for (name, ft) in entries {
                self.token(b"entry")?;
                self.token(b"(")?;
                self.token(b"name")?;
                self.token(name.as_bytes())?;
                self.token(b"node")?;
                if let Some(l) = self.listing.as_deref_mut() {
                    l.entry(name.as_bytes());
                }
                self.typed_node(&path.join(&name), ft)?;
                self.token(b")")?;
            }
            if let Some(l) = self.listing.as_deref_mut() {
                l.end_directory();
            }
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a regular file, directory or symlink",
                    path.display()
                ),
            ));
        }
        self.token(b")")
    }

    fn contents(
        &mut self,
        path: &Path,
        file: &mut File,
        len: u64,
        executable: bool,
    ) -> io::Result<()> {
        self.put(&len.to_le_bytes())?;
        if let Some(l) = self.listing.as_deref_mut() {
            l.regular(len, executable, self.pos);
        }
        let mut left = len;
        let mut tail = Tail::Unknown;
        while left > 0 {
            let (n, t) = self.out.put_from(file, left)?;
            tail = t;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while being archived", path.display()),
                ));
            }
            self.pos += n as u64;
            left -= n as u64;
        }
        let grew = match tail {
            Tail::End => false,
            Tail::More => true,
            Tail::Unknown => file.read(&mut [0u8; 1])? != 0,
        };
        if grew {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} grew while being archived", path.display()),
            ));
        }
        self.pad(len)
    }
}

/// Writes the NAR serialisation of `path` (not following a symlink at `path`) to `out`.
pub fn dump<W: Write>(path: &Path, out: &mut W) -> io::Result<()> {
    dump_into(
        path,
        &mut WriteSink {
            out,
            buf: vec![0u8; COPY_BUF],
        },
    )
}

/// [`dump`], and returns the tree's listing (see [`crate::nar_listing`]).
pub fn dump_with_listing<W: Write>(path: &Path, out: &mut W) -> io::Result<Vec<u8>> {
    let mut listing = NarListing::new();
    let mut sink = WriteSink {
        out,
        buf: vec![0u8; COPY_BUF],
    };
    walk(path, &mut sink, Some(&mut listing))?;
    Ok(listing.finish())
}

/// Puts the NAR serialisation of `path` (not following a symlink at `path`) into `out`.
pub fn dump_into<S: Sink>(path: &Path, out: &mut S) -> io::Result<()> {
    walk(path, out, None)
}

/// [`dump_into`], and describes the tree in `listing` on the way (see
/// [`crate::nar_listing`]).
pub fn dump_listed<S: Sink>(path: &Path, out: &mut S, listing: &mut NarListing) -> io::Result<()> {
    walk(path, out, Some(listing))
}

fn walk<S: Sink>(path: &Path, out: &mut S, listing: Option<&mut NarListing>) -> io::Result<()> {
    let mut w = Walk {
        out,
        pos: 0,
        listing,
    };
    w.token(b"nix-archive-1")?;
    w.node(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tok(s: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let mut sink = WriteSink {
            out: &mut v,
            buf: Vec::new(),
        };
        let mut w = Walk {
            out: &mut sink,
            pos: 0,
            listing: None,
        };
        w.token(s).unwrap();
        v
    }

    fn nar(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        dump(path, &mut v).unwrap();
        v
    }

    #[test]
    fn tokens_are_padded_to_eight() {
        assert_eq!(tok(b""), [0u8; 8]);
        assert_eq!(
            tok(b"("),
            [1, 0, 0, 0, 0, 0, 0, 0, b'(', 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(tok(b"12345678").len(), 16);
    }

    #[test]
    fn golden_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"hello\n").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o444)).unwrap();
        let mut want = Vec::new();
        for t in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello\n",
            b")",
        ] {
            want.extend(tok(t));
        }
        assert_eq!(nar(&f), want);
        // Matches `printf 'hello\n' > f; nix-store --dump f | sha256sum`.
        use sha2::Digest;
        assert_eq!(
            crate::nixbase32::encode(&sha2::Sha256::digest(&want)),
            "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
        );
    }

    #[test]
    fn golden_tree_with_every_kind_of_node() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("x"), b"").unwrap();
        fs::set_permissions(root.join("x"), fs::Permissions::from_mode(0o555)).unwrap();
        symlink("nowhere", root.join("link")).unwrap();
        let mut want = tok(b"nix-archive-1");
        let open_entry = |want: &mut Vec<u8>, name: &[u8]| {
            for t in [&b"entry"[..], b"(", b"name", name, b"node"] {
                want.extend(tok(t));
            }
        };
        for t in [&b"("[..], b"type", b"directory"] {
            want.extend(tok(t));
        }
        open_entry(&mut want, b"empty");
        for t in [&b"("[..], b"type", b"directory", b")", b")"] {
            want.extend(tok(t));
        }
        open_entry(&mut want, b"link");
        for t in [
            &b"("[..],
            b"type",
            b"symlink",
            b"target",
            b"nowhere",
            b")",
            b")",
        ] {
            want.extend(tok(t));
        }
        open_entry(&mut want, b"x");
        for t in [
            &b"("[..],
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"",
            b")",
            b")",
        ] {
            want.extend(tok(t));
        }
        want.extend(tok(b")"));
        assert_eq!(nar(&root), want);
    }

    #[test]
    fn entries_sort_by_bytes_not_locale() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b", "B", "a", "_", "Z", "ä"] {
            fs::write(dir.path().join(n), n).unwrap();
        }
        let out = nar(dir.path());
        let pos = |n: &str| {
            let t = tok(n.as_bytes());
            out.windows(t.len())
                .position(|w| w == t.as_slice())
                .unwrap()
        };
        let order = ["B", "Z", "_", "a", "b", "ä"];
        for w in order.windows(2) {
            assert!(pos(w[0]) < pos(w[1]), "{} before {}", w[0], w[1]);
        }
    }

    #[test]
    fn a_read_of_the_last_bytes_tells_whether_the_file_ends_there() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"0123456789").unwrap();
        let read = |buf: usize, skip: u64, max: u64| {
            let mut file = File::open(&f).unwrap();
            io::copy(&mut (&mut file).take(skip), &mut io::sink()).unwrap();
            let mut b = vec![0u8; buf];
            let (n, tail) = read_some(&mut file, &mut b, max).unwrap();
            (b[..n].to_vec(), tail)
        };
        // Room for a byte more: the file ends, or goes on, where it was expected to.
        assert_eq!(read(16, 0, 10), (b"0123456789".to_vec(), Tail::End));
        assert_eq!(read(16, 0, 9), (b"012345678".to_vec(), Tail::More));
        assert_eq!(read(16, 4, 6), (b"456789".to_vec(), Tail::End));
        // No room for it, or asked for less than what is left: nothing known.
        assert_eq!(read(10, 0, 10), (b"0123456789".to_vec(), Tail::Unknown));
        assert_eq!(read(4, 0, 10), (b"0123".to_vec(), Tail::Unknown));
        // Fewer bytes than expected (the file shrank): the walk reads again and sees 0.
        assert_eq!(read(16, 8, 5), (b"89".to_vec(), Tail::Unknown));
    }

    #[test]
    fn a_fifo_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = dump(&p, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("fifo"));
    }
    #[test]
    fn listing_equals_what_nix_copy_wrote_for_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        symlink("sub/file", root.join("link")).unwrap();
        fs::write(root.join("run"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("run"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::write(root.join("sub/deeper/one"), b"x").unwrap();
        fs::write(root.join("sub/file"), b"hi\n").unwrap();
        fs::write(root.join("we\"ird\\name\\ttab"), b"q").unwrap();
        fs::write(root.join("zero"), b"").unwrap();
        fs::write(root.join("ünï"), b"u").unwrap();
        let mut nar = Vec::new();
        let listing = dump_with_listing(&root, &mut nar).unwrap();
        // `nix copy --to 'file://…?write-nar-listing=true'` (Nix 2.8.0) of a store
        // path holding this tree wrote exactly this `.ls`.
        let want = r#"{"version":1,"root":{"type":"directory","entries":{"empty":{"type":"directory","entries":{}},"link":{"type":"symlink","target":"sub/file"},"run":{"type":"regular","size":10,"executable":true,"narOffset":624},"sub":{"type":"directory","entries":{"deeper":{"type":"directory","entries":{"one":{"type":"regular","size":1,"narOffset":1096}}},"file":{"type":"regular","size":3,"narOffset":1320}}},"we\"ird\\name\\ttab":{"type":"regular","size":1,"narOffset":1552},"zero":{"type":"regular","size":0,"narOffset":1744},"ünï":{"type":"regular","size":1,"narOffset":1928}}}}"#;
        assert_eq!(String::from_utf8(listing).unwrap(), want);
        assert_eq!(&nar[1320..1323], b"hi\n");
        assert_eq!(nar, {
            let mut v = Vec::new();
            dump(&root, &mut v).unwrap();
            v
        });
    }
}
