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

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const COPY_BUF: usize = 256 * 1024;

/// Where [`dump_into`] puts a NAR.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Reads at most `max` (> 0) bytes of `file` into the sink with one read call and
    /// returns how many it read (0 at the end of the file).
    fn put_from(&mut self, file: &mut File, max: u64) -> io::Result<usize>;
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

    fn put_from(&mut self, file: &mut File, max: u64) -> io::Result<usize> {
        let want = self.buf.len().min(max as usize);
        let n = file.read(&mut self.buf[..want])?;
        self.out.write_all(&self.buf[..n])?;
        Ok(n)
    }
}

fn token<S: Sink>(out: &mut S, bytes: &[u8]) -> io::Result<()> {
    out.put(&(bytes.len() as u64).to_le_bytes())?;
    out.put(bytes)?;
    pad(out, bytes.len() as u64)
}

fn pad<S: Sink>(out: &mut S, len: u64) -> io::Result<()> {
    let rem = (len % 8) as usize;
    if rem != 0 {
        out.put(&[0u8; 8][..8 - rem])?;
    }
    Ok(())
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

/// Puts the NAR serialisation of `path` (not following a symlink at `path`) into `out`.
pub fn dump_into<S: Sink>(path: &Path, out: &mut S) -> io::Result<()> {
    token(out, b"nix-archive-1")?;
    node(path, out)
}

fn node<S: Sink>(path: &Path, out: &mut S) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    token(out, b"(")?;
    token(out, b"type")?;
    if ft.is_symlink() {
        token(out, b"symlink")?;
        token(out, b"target")?;
        token(out, fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        token(out, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            token(out, b"executable")?;
            token(out, b"")?;
        }
        token(out, b"contents")?;
        contents(path, meta.len(), out)?;
    } else if ft.is_dir() {
        token(out, b"directory")?;
        let mut names: Vec<_> = fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            token(out, b"entry")?;
            token(out, b"(")?;
            token(out, b"name")?;
            token(out, name.as_bytes())?;
            token(out, b"node")?;
            node(&path.join(&name), out)?;
            token(out, b")")?;
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
    token(out, b")")
}

fn contents<S: Sink>(path: &Path, len: u64, out: &mut S) -> io::Result<()> {
    let mut file = File::open(path)?;
    out.put(&len.to_le_bytes())?;
    let mut left = len;
    while left > 0 {
        let n = out.put_from(&mut file, left)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being archived", path.display()),
            ));
        }
        left -= n as u64;
    }
    if file.read(&mut [0u8; 1])? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} grew while being archived", path.display()),
        ));
    }
    pad(out, len)
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
        token(&mut sink, s).unwrap();
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
    fn a_fifo_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = dump(&p, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("fifo"));
    }
}
