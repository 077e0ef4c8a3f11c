//! Framing of the send → upload pipe: newline-terminated lines.
//!
//! ```text
//! /nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-probe-c\n
//! /nix/store/0vx0w3yni5b94y2jbjkz2ja6zz70c5fq-probe-c.drv\n
//! !finish\n
//! ```
//! A line is a path, or a command starting with `!` (`!finish`: upload drains and exits
//! once everything before it is done). Writers pack lines into chunks of at most
//! [`PIPE_BUF`] bytes and write each chunk with one `write()`, which POSIX makes atomic
//! on a pipe: concurrent senders never interleave within a line. Pure: no IO.

/// POSIX guarantees atomic pipe writes up to this size (Linux: 4096).
pub const PIPE_BUF: usize = 4096;

/// The in-band command that asks upload to drain and exit.
pub const FINISH: &[u8] = b"!finish";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line of {0} bytes does not fit in one atomic pipe write ({PIPE_BUF} bytes)")]
pub struct TooLong(pub usize);

/// Packs `lines` (without newlines) into chunks of at most [`PIPE_BUF`] bytes, each a
/// whole number of newline-terminated lines.
pub fn pack<L: AsRef<[u8]>>(lines: &[L]) -> Result<Vec<Vec<u8>>, TooLong> {
    let mut chunks = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for line in lines {
        let line = line.as_ref();
        if line.len() + 1 > PIPE_BUF {
            return Err(TooLong(line.len()));
        }
        if cur.len() + line.len() + 1 > PIPE_BUF {
            chunks.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(line);
        cur.push(b'\n');
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    Ok(chunks)
}

/// One unit read off the pipe.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Line(Vec<u8>),
    /// A line longer than the limit; its first bytes, for the error message.
    TooLong {
        prefix: Vec<u8>,
        len: usize,
    },
}

/// Splits a byte stream into lines of at most `max` bytes. An overlong line is
/// reported once and skipped up to its newline, so the lines after it still count.
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// Bytes of an overlong line seen so far, while skipping to its end.
    skipping: Option<(Vec<u8>, usize)>,
}

/// How much of a line a log line about it shows (an overlong line keeps this much).
pub const PREFIX_LEN: usize = 200;

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter {
            buf: Vec::new(),
            max,
            skipping: None,
        }
    }

    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Frame>) {
        while !data.is_empty() {
            let nl = data.iter().position(|&b| b == b'\n');
            let (part, rest, ended) = match nl {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            data = rest;
            if let Some((prefix, len)) = &mut self.skipping {
                let room = PREFIX_LEN.saturating_sub(prefix.len());
                prefix.extend_from_slice(&part[..part.len().min(room)]);
                *len += part.len();
                if ended {
                    let (prefix, len) = self.skipping.take().unwrap();
                    out.push(Frame::TooLong { prefix, len });
                }
                continue;
            }
            if self.buf.len() + part.len() > self.max {
                let mut prefix = std::mem::take(&mut self.buf);
                let len = prefix.len() + part.len();
                prefix.extend_from_slice(&part[..part.len().min(PREFIX_LEN)]);
                prefix.truncate(PREFIX_LEN);
                if ended {
                    out.push(Frame::TooLong { prefix, len });
                } else {
                    self.skipping = Some((prefix, len));
                }
                continue;
            }
            self.buf.extend_from_slice(part);
            if ended {
                out.push(Frame::Line(std::mem::take(&mut self.buf)));
            }
        }
    }

    /// At end of input: a last line without newline still counts.
    pub fn finish(&mut self) -> Option<Frame> {
        if let Some((prefix, len)) = self.skipping.take() {
            return Some(Frame::TooLong { prefix, len });
        }
        if self.buf.is_empty() {
            None
        } else {
            Some(Frame::Line(std::mem::take(&mut self.buf)))
        }
    }
}

/// The input escaped for a log line: printable ASCII kept, the rest as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]], max: usize) -> Vec<Frame> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn pack_respects_pipe_buf_and_keeps_lines_whole() {
        let lines: Vec<String> = (0..300).map(|i| format!("/nix/store/{i:032}-x")).collect();
        let chunks = pack(&lines).unwrap();
        assert!(chunks.len() > 1);
        let mut joined = Vec::new();
        for c in &chunks {
            assert!(c.len() <= PIPE_BUF);
            assert_eq!(c.last(), Some(&b'\n'));
            joined.extend_from_slice(c);
        }
        let want: String = lines.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(joined, want.as_bytes());
        assert_eq!(pack(&[vec![b'a'; PIPE_BUF]]), Err(TooLong(PIPE_BUF)));
        assert!(pack(&[vec![b'a'; PIPE_BUF - 1]]).is_ok());
    }

    #[test]
    fn splits_across_chunk_boundaries() {
        let got = split_all(&[b"ab", b"c\nde", b"f\n\ng"], 100);
        assert_eq!(
            got,
            vec![
                Frame::Line(b"abc".to_vec()),
                Frame::Line(b"def".to_vec()),
                Frame::Line(b"".to_vec()),
                Frame::Line(b"g".to_vec()),
            ]
        );
    }

    #[test]
    fn overlong_lines_are_reported_once_and_skipped() {
        let long = vec![b'x'; 50];
        let mut input = b"ok1\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nok2\n");
        // Feed byte by byte to cross every boundary.
        let pieces: Vec<&[u8]> = input.chunks(1).collect();
        let got = split_all(&pieces, 10);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Frame::Line(b"ok1".to_vec()));
        assert!(
            matches!(&got[1], Frame::TooLong { len: 50, prefix } if prefix.len() <= PREFIX_LEN)
        );
        assert_eq!(got[2], Frame::Line(b"ok2".to_vec()));
    }

    /// The line parser's fuzz target: any bytes, cut anywhere, give the frames a plain
    /// split on newlines would, overlong lines reported with their length and start.
    mod fuzz {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn reference(data: &[u8], max: usize) -> Vec<Frame> {
            let mut out = Vec::new();
            let mut parts: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
            let last = parts.pop().unwrap();
            for p in parts.into_iter().chain((!last.is_empty()).then_some(last)) {
                if p.len() > max {
                    out.push(Frame::TooLong {
                        prefix: p[..p.len().min(PREFIX_LEN)].to_vec(),
                        len: p.len(),
                    });
                } else {
                    out.push(Frame::Line(p.to_vec()));
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn any_bytes_any_cuts(
                data in vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..2000),
                mut cuts in vec(0usize..2000, 0..16),
                max in 1usize..300,
            ) {
                cuts.push(data.len());
                cuts.sort();
                let mut s = LineSplitter::new(max);
                let mut out = Vec::new();
                let mut at = 0;
                for c in cuts {
                    let c = c.min(data.len());
                    s.push(&data[at..c], &mut out);
                    at = c;
                }
                out.extend(s.finish());
                prop_assert_eq!(out, reference(&data, max));
            }
        }
    }

    #[test]
    fn escape_shows_garbage_readably() {
        assert_eq!(escape(b"a\0b\xff\n"), "a\\x00b\\xff\\n");
    }
}
