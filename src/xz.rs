//! One .xz stream made of blocks that were compressed independently, so that the
//! pieces of a large NAR can be compressed on several threads and then joined, in
//! order, into a single ordinary .xz file (the layout `xz -T2` writes).
//!
//! This module writes the container of the .xz file format (version 1.2.1,
//! <https://tukaani.org/xz/xz-file-format.txt>) itself; liblzma's raw encoder only
//! produces the LZMA2 data inside each block. Every block records both of its sizes in
//! its header and ends with the CRC32 of its uncompressed bytes:
//!
//! ```text
//! stream header  FD 37 7A 58 5A 00 | 00 01 (CRC32) | CRC32 of the flags     12 bytes
//! block          header: size/4-1, C0, compressed, uncompressed, 21 01 dict, 0-pad, CRC32
//!                LZMA2 data | 0-3 zero bytes to a multiple of 4 | CRC32 of the input
//! ...            (one block per piece, in input order)
//! index          00 | count | (unpadded size, uncompressed size)... | 0-pad | CRC32
//! stream footer  CRC32 | backward size (index size/4 - 1) | 00 01 | 59 5A     12 bytes
//! ```
//! Sizes in the headers and the index are the format's multi-byte integers (7 bits a
//! byte, least significant first, high bit set on all bytes but the last).
//!
//! ```
//! use narpipe::xz;
//!
//! let nar = vec![7u8; 100_000];
//! let mut out = xz::stream_header().to_vec();
//! let mut records = Vec::new();
//! // One compressor per worker thread; here a single one for every piece.
//! let mut compressor = xz::BlockCompressor::new(6);
//! for piece in nar.chunks(xz::block_size(6)) {
//!     records.push(compressor.compress(piece, &mut out, &|| false)?);
//! }
//! out.extend(xz::stream_end(&records));
//! assert_eq!(&out[..6], b"\xFD7zXZ\0");
//! # Ok::<(), std::io::Error>(())
//! ```
//! An empty input gives no block at all, which is also valid (it is what `xz` writes
//! for an empty file); compressing an empty piece gives a valid empty block.

use std::io;

use liblzma::stream::{Action, Filters, LzmaOptions, Status, Stream};

/// Stream header magic bytes.
const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];
/// Stream footer magic bytes.
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Stream flags: no reserved bits, check type 0x01 (CRC32).
const STREAM_FLAGS: [u8; 2] = [0x00, 0x01];
/// Size of the CRC32 check that ends each block.
const CHECK_SIZE: u64 = 4;
/// Block flags: one filter (bits 0-1 = 0), compressed (0x40) and uncompressed (0x80)
/// sizes present. The sizes let a decoder check each block and split work by block.
const BLOCK_FLAGS: u8 = 0xC0;
/// Filter ID of LZMA2.
const FILTER_LZMA2: u64 = 0x21;
/// Input fed to the encoder between two looks at `cancelled`: about a tenth of a
/// second of work at the slowest presets.
const PIECE: usize = 1 << 20;
/// The smallest dictionary LZMA2 accepts.
const MIN_DICT: u32 = 4096;
/// Levels above this are treated as this.
const MAX_LEVEL: u32 = 9;

/// Dictionary size of xz preset `level` (liblzma's `lzma_lzma_preset` table).
fn preset_dict_size(level: u32) -> u32 {
    const DICT_POW2: [u8; 10] = [18, 20, 21, 22, 22, 23, 23, 24, 25, 26];
    1 << DICT_POW2[level.min(MAX_LEVEL) as usize]
}

/// Uncompressed bytes per block for `level` (0–9): big enough that ratio barely
/// suffers, `max(8 MiB, 2 × the preset's dictionary size)`.
///
/// Each block starts with an empty dictionary, so it loses some ratio for its first
/// dictionary-size of input; at twice the dictionary at least half of every block is
/// compressed with a full window. That gives 8 MiB for levels 0–4, 16 MiB for 5–6
/// (the default 6 has an 8 MiB dictionary), 32 MiB for 7, 64 MiB for 8 and 128 MiB
/// for 9. `xz -T` uses three times the dictionary; two keeps a NAR of a few tens of
/// MiB spread over more threads, and memory (one block of input and of output per
/// worker) lower. Measured at level 6 on a 261 MB NAR of binaries: one block 63.55 MB,
/// 24 MiB blocks 64.39 MB, 16 MiB 64.54 MB, 8 MiB 66.65 MB.
pub fn block_size(level: u32) -> usize {
    (8 << 20).max(2 * preset_dict_size(level) as usize)
}

/// The 12-byte stream header (CRC32 check type).
pub fn stream_header() -> [u8; 12] {
    let mut header = [0; 12];
    header[..6].copy_from_slice(&HEADER_MAGIC);
    header[6..8].copy_from_slice(&STREAM_FLAGS);
    header[8..].copy_from_slice(&crc32fast::hash(&STREAM_FLAGS).to_le_bytes());
    header
}

/// What the index needs to know of one finished block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecord {
    /// Block header + compressed data + check, without the block padding.
    pub unpadded_size: u64,
    /// Bytes of input the block holds.
    pub uncompressed_size: u64,
}

/// Compresses blocks; one per worker thread, reused from block to block (keeps its
/// scratch buffer).
#[derive(Debug)]
pub struct BlockCompressor {
    level: u32,
    /// The LZMA2 data of the block being compressed: the block header in front of it
    /// holds the data's size, known only at the end.
    scratch: Vec<u8>,
}

impl BlockCompressor {
    /// A compressor for xz preset `level` (0–9; above 9 is treated as 9).
    pub fn new(level: u32) -> Self {
        BlockCompressor {
            level: level.min(MAX_LEVEL),
            scratch: Vec::new(),
        }
    }

    /// Appends one whole block (header, LZMA2 data, padding, CRC32 of `input`) to `out`.
    ///
    /// Feeds the encoder at most 1 MiB at a time and calls `cancelled()` before each
    /// piece; when it returns true, gives up with an io::Error of kind Interrupted (out
    /// may then hold a partial block: callers discard it).
    pub fn compress(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        cancelled: &dyn Fn() -> bool,
    ) -> io::Result<BlockRecord> {
        // A dictionary larger than the input only costs time: liblzma zeroes hash
        // tables sized by it for every new encoder. Shrink it as `xz` does for small
        // files, to a size the header's property byte can say exactly.
        let wanted = preset_dict_size(self.level).min(clamp_u32(input.len()));
        let (dict_prop, dict_size) = lzma2_dict(wanted);
        let mut options = LzmaOptions::new_preset(self.level)?;
        options.dict_size(dict_size);
        let mut filters = Filters::new();
        filters.lzma2(&options);
        let mut encoder = Stream::new_raw_encoder(&filters)?;

        self.scratch.clear();
        self.scratch.reserve(lzma2_bound(input.len()));
        let mut crc = crc32fast::Hasher::new();
        for piece in input.chunks(PIECE) {
            if cancelled() {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "xz block compression cancelled",
                ));
            }
            crc.update(piece);
            encode(&mut encoder, piece, &mut self.scratch, Action::Run)?;
        }
        encode(&mut encoder, &[], &mut self.scratch, Action::Finish)?;

        let compressed = self.scratch.len() as u64;
        let uncompressed = input.len() as u64;
        // Header (28 bytes at most), data, padding (3), check (4).
        out.reserve(35 + self.scratch.len());
        let header_size = write_block_header(out, dict_prop, compressed, uncompressed);
        out.extend_from_slice(&self.scratch);
        out.resize(out.len() + padding(compressed), 0);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        Ok(BlockRecord {
            unpadded_size: header_size + compressed + CHECK_SIZE,
            uncompressed_size: uncompressed,
        })
    }
}

/// The index of `records` and the stream footer: what ends the stream.
pub fn stream_end(records: &[BlockRecord]) -> Vec<u8> {
    let mut out = vec![0x00]; // index indicator
    put_varint(&mut out, records.len() as u64);
    for record in records {
        put_varint(&mut out, record.unpadded_size);
        put_varint(&mut out, record.uncompressed_size);
    }
    out.resize(out.len() + padding(out.len() as u64), 0);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());

    let backward_size = u32::try_from(out.len() / 4 - 1).expect("xz index over 16 GiB");
    let mut tail = [0; 6];
    tail[..4].copy_from_slice(&backward_size.to_le_bytes());
    tail[4..].copy_from_slice(&STREAM_FLAGS);
    out.extend_from_slice(&crc32fast::hash(&tail).to_le_bytes());
    out.extend_from_slice(&tail);
    out.extend_from_slice(&FOOTER_MAGIC);
    out
}

/// Runs `encoder` over all of `input` (Run) or until the end of the LZMA2 data (Finish),
/// appending what it writes to `out`.
fn encode(
    encoder: &mut Stream,
    mut input: &[u8],
    out: &mut Vec<u8>,
    action: Action,
) -> io::Result<()> {
    loop {
        // Rarely taken: `compress` reserves the worst case up front.
        if out.capacity() - out.len() < 64 << 10 {
            out.reserve(256 << 10);
        }
        let before = encoder.total_in();
        let status = encoder.process_vec(input, out, action)?;
        input = &input[(encoder.total_in() - before) as usize..];
        let done = match action {
            Action::Finish => status == Status::StreamEnd,
            _ => input.is_empty(),
        };
        if done {
            return Ok(());
        }
    }
}

/// An upper bound of LZMA2's output for `len` bytes of input: incompressible data is
/// stored in chunks of at most 64 KiB with a 3-byte header, plus the end marker.
fn lzma2_bound(len: usize) -> usize {
    len + (len / (64 << 10) + 1) * 3 + 1
}

/// The LZMA2 dictionary-size property byte for the smallest dictionary of at least
/// `wanted` bytes it can express (2^n or 3 × 2^(n-1), 4 KiB at least), and that size.
fn lzma2_dict(wanted: u32) -> (u8, u32) {
    let wanted = wanted.max(MIN_DICT);
    for prop in 0..40u8 {
        let size = (2 | u32::from(prop & 1)) << (prop / 2 + 11);
        if size >= wanted {
            return (prop, size);
        }
    }
    (40, u32::MAX)
}

fn clamp_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Zero bytes that bring `len` to a multiple of four.
fn padding(len: u64) -> usize {
    ((4 - len % 4) % 4) as usize
}

/// Appends a block header with both sizes and one LZMA2 filter; returns its size.
fn write_block_header(out: &mut Vec<u8>, dict_prop: u8, compressed: u64, uncompressed: u64) -> u64 {
    let start = out.len();
    out.push(0); // header size, known below
    out.push(BLOCK_FLAGS);
    put_varint(out, compressed);
    put_varint(out, uncompressed);
    put_varint(out, FILTER_LZMA2);
    put_varint(out, 1); // size of the filter properties
    out.push(dict_prop);
    // At most 2 + 9 + 9 + 3 bytes so far: the size byte cannot overflow.
    out.resize(out.len() + padding((out.len() - start) as u64), 0);
    let size = out.len() - start + 4;
    out[start] = (size / 4 - 1) as u8;
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    size as u64
}

/// Appends `n` as a multi-byte integer.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::process::Command;

    /// Text-like data that compresses about 3:1, different for each seed.
    fn sample(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "nix",
            "store",
            "derivation",
            "/nix/store/",
            "lib",
            "bin",
            "\n",
            "glibc-2.40",
            "{",
            "}",
            "=",
            "  ",
        ];
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            if rng.u8(..) < 40 {
                out.push(rng.u8(..));
            } else {
                out.extend_from_slice(WORDS[rng.usize(..WORDS.len())].as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    /// A whole stream of `pieces`, one block each, from one reused compressor.
    fn stream_of(pieces: &[&[u8]], level: u32) -> (Vec<u8>, Vec<BlockRecord>) {
        let mut compressor = BlockCompressor::new(level);
        let mut out = stream_header().to_vec();
        let mut records = Vec::new();
        for piece in pieces {
            records.push(compressor.compress(piece, &mut out, &|| false).unwrap());
        }
        out.extend(stream_end(&records));
        (out, records)
    }

    /// Decodes with liblzma's single-stream decoder: anything after the first stream's
    /// footer is left unread, so `total_in` shows the footer is where it should be.
    fn decode(xz: &[u8]) -> Vec<u8> {
        let mut decoder = Stream::new_stream_decoder(u64::MAX, 0).unwrap();
        let mut out = Vec::with_capacity(1 << 20);
        loop {
            if out.capacity() - out.len() < 64 << 10 {
                out.reserve(1 << 20);
            }
            let consumed = decoder.total_in() as usize;
            let status = decoder
                .process_vec(&xz[consumed..], &mut out, Action::Finish)
                .unwrap();
            if status == Status::StreamEnd {
                break;
            }
        }
        assert_eq!(decoder.total_in(), xz.len() as u64, "stream ends early");
        out
    }

    #[test]
    fn empty_block_round_trips() {
        let (xz, records) = stream_of(&[b""], 6);
        assert_eq!(
            records,
            [BlockRecord {
                unpadded_size: 12 + 1 + 4, // header, the LZMA2 end marker, CRC32
                uncompressed_size: 0
            }]
        );
        assert_eq!(xz.len() % 4, 0);
        assert!(decode(&xz).is_empty());
    }

    #[test]
    fn stream_without_blocks_round_trips() {
        let mut xz = stream_header().to_vec();
        xz.extend(stream_end(&[]));
        assert_eq!(xz.len(), 32); // what `xz` writes for an empty file
        assert!(decode(&xz).is_empty());
    }

    #[test]
    fn small_block_round_trips_with_small_dictionary() {
        let input = sample(10_000, 1);
        let (xz, records) = stream_of(&[&input], 6);
        assert_eq!(records[0].uncompressed_size, 10_000);
        assert!(xz.len() < input.len());
        assert_eq!(decode(&xz), input);
        // Block header: size, flags, 2 + 2 bytes of sizes, filter 21, props size 1, dict.
        let header = &xz[12..];
        assert_eq!(&header[1..2], [BLOCK_FLAGS]);
        assert_eq!(&header[6..8], [0x21, 0x01]);
        assert_eq!(header[8], 3, "12 KiB dictionary for 10 kB of input");
    }

    #[test]
    fn three_blocks_round_trip() {
        let input = sample(700_003, 2);
        // Boundaries chosen so that compressed sizes vary, and with them padding.
        let pieces = [
            &input[..300_001],
            &input[300_001..550_000],
            &input[550_000..],
        ];
        let (xz, records) = stream_of(&pieces, 6);
        assert_eq!(records.len(), 3);
        for (record, piece) in records.iter().zip(pieces) {
            assert_eq!(record.uncompressed_size, piece.len() as u64);
        }
        assert_eq!(decode(&xz), input);
        // Each block's dictionary is its input rounded up to what LZMA2 can express.
        check_with_xz_cli(&xz, &pieces, &records, &["384KiB", "256KiB", "192KiB"]);
    }

    #[test]
    fn multi_piece_block_round_trips() {
        // More than one 1 MiB piece per block, at the fastest preset.
        let input = sample(2_500_000, 3);
        let (xz, _) = stream_of(&[&input[..2_400_000], &input[2_400_000..]], 0);
        assert_eq!(decode(&xz), input);
    }

    /// `xz -t`, `xz --robot -vv --list` and `xz -dc` on a stream of `pieces`, if the
    /// tool is installed: one stream, and blocks as `records` and `dicts` say.
    fn check_with_xz_cli(xz: &[u8], pieces: &[&[u8]], records: &[BlockRecord], dicts: &[&str]) {
        if Command::new("xz").arg("--version").output().is_err() {
            eprintln!("note: xz not installed, skipping the xz CLI check");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("blocks.xz");
        std::fs::write(&file, xz).unwrap();

        let test = Command::new("xz").arg("-t").arg(&file).output().unwrap();
        assert!(
            test.status.success(),
            "xz -t: {}",
            String::from_utf8_lossy(&test.stderr)
        );

        let list = Command::new("xz")
            .args(["--robot", "-vv", "--list"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            list.status.success(),
            "xz --list: {}",
            String::from_utf8_lossy(&list.stderr)
        );
        let list = String::from_utf8(list.stdout).unwrap();
        let fields = |kind: &str| -> Vec<Vec<&str>> {
            list.lines()
                .filter(|line| line.split('\t').next() == Some(kind))
                .map(|line| line.split('\t').collect())
                .collect()
        };
        let input_len: usize = pieces.iter().map(|piece| piece.len()).sum();
        // totals, streams, blocks, compressed, uncompressed, ratio, check, padding, ...
        let totals = &fields("totals")[0];
        assert_eq!(totals[1], "1", "{list}");
        assert_eq!(totals[2], pieces.len().to_string(), "{list}");
        assert_eq!(totals[3], xz.len().to_string(), "{list}");
        assert_eq!(totals[4], input_len.to_string(), "{list}");
        assert_eq!(totals[6], "CRC32", "{list}");
        // block, stream, block in stream, block in file, compressed offset, uncompressed
        // offset, total size, uncompressed size, ratio, check, check value, header size,
        // sizes present, compressed data size, memory, filter chain
        let blocks = fields("block");
        assert_eq!(blocks.len(), pieces.len(), "{list}");
        for (((block, piece), record), dict) in blocks.iter().zip(pieces).zip(records).zip(dicts) {
            let header_size: u64 = block[11].parse().unwrap();
            let data_size: u64 = block[13].parse().unwrap();
            let crc = format!("{:08x}", crc32fast::hash(piece));
            assert_eq!(block[7], piece.len().to_string(), "{list}");
            assert_eq!(block[10], crc, "{list}");
            assert_eq!(block[12], "cu", "{list}");
            assert_eq!(header_size + data_size + CHECK_SIZE, record.unpadded_size);
            assert_eq!(block[15], format!("--lzma2=dict={dict}"), "{list}");
        }

        let decoded = Command::new("xz").arg("-dc").arg(&file).output().unwrap();
        assert!(decoded.status.success());
        assert!(
            decoded.stdout == pieces.concat(),
            "xz -dc gives other bytes"
        );
    }

    #[test]
    fn cancelled_compression_is_interrupted() {
        let input = sample(100_000, 4);
        let mut out = Vec::new();
        let err = BlockCompressor::new(6)
            .compress(&input, &mut out, &|| true)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn cancellation_is_checked_between_pieces() {
        let input = sample(3 * PIECE + 1, 5);
        let calls = Cell::new(0);
        let cancel_after_two = || {
            calls.set(calls.get() + 1);
            calls.get() > 2
        };
        let err = BlockCompressor::new(0)
            .compress(&input, &mut Vec::new(), &cancel_after_two)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted);
        assert_eq!(calls.get(), 3);

        // Nothing is left over: the same compressor then makes a good block.
        let mut compressor = BlockCompressor::new(0);
        let _ = compressor.compress(&input, &mut Vec::new(), &|| true);
        let mut xz = stream_header().to_vec();
        let record = compressor.compress(&input, &mut xz, &|| false).unwrap();
        xz.extend(stream_end(&[record]));
        assert_eq!(decode(&xz), input);
    }

    #[test]
    fn dict_size_property_byte() {
        assert_eq!(lzma2_dict(0), (0, 4096));
        assert_eq!(lzma2_dict(4096), (0, 4096));
        assert_eq!(lzma2_dict(4097), (1, 6144));
        assert_eq!(lzma2_dict(5000), (1, 6144));
        assert_eq!(lzma2_dict(3 << 20), (19, 3 << 20));
        assert_eq!(lzma2_dict((3 << 20) + 1), (20, 4 << 20));
        assert_eq!(lzma2_dict(8 << 20), (22, 8 << 20));
        assert_eq!(lzma2_dict(64 << 20), (28, 64 << 20));
        assert_eq!(lzma2_dict(u32::MAX), (40, u32::MAX));
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(0), 8 << 20);
        assert_eq!(block_size(6), 16 << 20);
        assert_eq!(block_size(9), 128 << 20);
        assert_eq!(block_size(42), 128 << 20);
    }

    #[test]
    fn multi_byte_integers() {
        let encode = |n| {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            out
        };
        assert_eq!(encode(0), [0x00]);
        assert_eq!(encode(0x7F), [0x7F]);
        assert_eq!(encode(0x80), [0x80, 0x01]);
        assert_eq!(encode(300), [0xAC, 0x02]);
        assert_eq!(encode(u64::MAX >> 1).len(), 9);
    }

    #[test]
    fn header_and_footer_bytes() {
        // As `xz --check=crc32` writes them.
        assert_eq!(
            stream_header(),
            [0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00, 0x00, 0x01, 0x69, 0x22, 0xDE, 0x36]
        );
        // Index: indicator, no records, padding, CRC32; footer: CRC32, backward size 1
        // (an 8-byte index), flags, magic.
        assert_eq!(
            stream_end(&[]),
            [
                0x00, 0x00, 0x00, 0x00, 0x1C, 0xDF, 0x44, 0x21, 0x90, 0x42, 0x99, 0x0D, 0x01, 0x00,
                0x00, 0x00, 0x00, 0x01, b'Y', b'Z'
            ]
        );
    }
}
