//! Whole zstd frames from one reusable compression context, with zstd's block
//! pre-splitter kept cheap at the fast levels.
//!
//! zstd 1.5.7 added a pre-splitter that looks for a better place to end each 128 KiB
//! block. Its settings 2 to 6 cost ever more CPU (1 is off, 0 lets zstd choose by
//! strategy); at level 3 (Nix's default, strategy `dfast`) zstd picks 3. On the
//! benchmark corpus (its 929 MB of NARs one after another, cut into 4 MiB frames) that
//! took about a fifth of the compression time for 0.5 % smaller output: 2.46 s against
//! 1.99 s, 595.4 MB against 597.5 MB with its cheapest setting (598.4 MB with none;
//! Nix's libzstd 1.5.4, which has no pre-splitter, wrote 598.7 MB). At levels up to 4 this module asks for
//! the cheapest setting, which is also what zstd picks at levels 1 and 2; from level 5
//! on, where the user asked for ratio over speed, zstd's own choice stands.
//!
//! The parameter (`ZSTD_c_blockSplitterLevel`) has no setter in `zstd-safe`, hence a
//! context of our own through `zstd-sys`: the only `unsafe` code in narpipe, a few
//! calls into libzstd. It is experimental, so its number may differ in other zstd
//! versions: it is set only on the 1.5 releases from 1.5.7 on (the bundled one is
//! 1.5.7; a system libzstd linked through pkg-config may be another), and elsewhere
//! zstd's own choice stands.
//!
//! ```
//! use narpipe::zstd_frame::FrameCompressor;
//!
//! let mut compressor = FrameCompressor::new(3)?;
//! let mut file = Vec::new();
//! for piece in vec![7u8; 300_000].chunks(100_000) {
//!     compressor.compress(piece, &mut file)?; // appends one frame
//! }
//! assert_eq!(zstd::stream::decode_all(&file[..])?, vec![7u8; 300_000]);
//! # Ok::<(), std::io::Error>(())
//! ```
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;

use zstd_sys::{ZSTD_CCtx, ZSTD_cParameter};

/// Levels up to this one get the cheapest pre-splitter.
const FAST_LEVELS: i32 = 4;
/// `ZSTD_c_blockSplitterLevel` (zstd.h: 1017 in 1.5.7), named as zstd-sys names it.
const BLOCK_SPLITTER_LEVEL: ZSTD_cParameter = ZSTD_cParameter::ZSTD_c_experimentalParam20;
/// Its cheapest setting that still splits (1 means never).
const CHEAPEST_SPLITTER: i32 = 2;
/// The zstd versions (`ZSTD_versionNumber`) where [`BLOCK_SPLITTER_LEVEL`] is that.
const SPLITTER_VERSIONS: std::ops::Range<u32> = 10507..10600;

/// Whether the linked libzstd has the pre-splitter under [`BLOCK_SPLITTER_LEVEL`].
fn has_splitter() -> bool {
    // SAFETY: no arguments.
    SPLITTER_VERSIONS.contains(&unsafe { zstd_sys::ZSTD_versionNumber() })
}

/// A zstd compression context, kept from frame to frame.
pub struct FrameCompressor {
    ctx: NonNull<ZSTD_CCtx>,
}

// SAFETY: a ZSTD_CCtx belongs to no thread; `&mut self` keeps it to one at a time.
unsafe impl Send for FrameCompressor {}

impl FrameCompressor {
    /// A context for `level` (zstd's levels: negative up to 22).
    pub fn new(level: i32) -> io::Result<FrameCompressor> {
        // SAFETY: no arguments; a null result (out of memory) is checked.
        let ctx = NonNull::new(unsafe { zstd_sys::ZSTD_createCCtx() })
            .ok_or_else(|| io::Error::other("zstd could not make a compression context"))?;
        let compressor = FrameCompressor { ctx };
        compressor.set(ZSTD_cParameter::ZSTD_c_compressionLevel, level)?;
        if level <= FAST_LEVELS && has_splitter() {
            compressor.set(BLOCK_SPLITTER_LEVEL, CHEAPEST_SPLITTER)?;
        }
        Ok(compressor)
    }

    fn set(&self, parameter: ZSTD_cParameter, value: i32) -> io::Result<()> {
        // SAFETY: `ctx` is a live context; zstd checks the parameter and its bounds.
        check(unsafe { zstd_sys::ZSTD_CCtx_setParameter(self.ctx.as_ptr(), parameter, value) })
            .map(drop)
    }

    /// Compresses `src` as one frame (with its size in the header), appended to `dst`.
    pub fn compress(&mut self, src: &[u8], dst: &mut Vec<u8>) -> io::Result<()> {
        // SAFETY: a pure function of its argument (an error code when `src` is too big).
        dst.reserve(check(unsafe { zstd_sys::ZSTD_compressBound(src.len()) })?);
        let room = dst.spare_capacity_mut();
        // SAFETY: `ctx` is live and ours alone (`&mut self`); zstd writes at most
        // `room.len()` bytes at `room` and reads `src.len()` bytes at `src`.
        let written = check(unsafe {
            zstd_sys::ZSTD_compress2(
                self.ctx.as_ptr(),
                room.as_mut_ptr().cast(),
                room.len(),
                src.as_ptr().cast(),
                src.len(),
            )
        })?;
        // SAFETY: zstd initialised the first `written` bytes of the spare capacity.
        unsafe { dst.set_len(dst.len() + written) };
        Ok(())
    }
}

impl Drop for FrameCompressor {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from ZSTD_createCCtx and is freed once, here.
        unsafe { zstd_sys::ZSTD_freeCCtx(self.ctx.as_ptr()) };
    }
}

/// zstd's result: a size, or an error code turned into its message.
fn check(code: usize) -> io::Result<usize> {
    // SAFETY: takes any value.
    if unsafe { zstd_sys::ZSTD_isError(code) } == 0 {
        return Ok(code);
    }
    // SAFETY: takes any value and returns a static, NUL-terminated C string.
    let name = unsafe { CStr::from_ptr(zstd_sys::ZSTD_getErrorName(code)) };
    Err(io::Error::other(format!(
        "zstd: {}",
        name.to_string_lossy()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible data that is not one byte repeated: words of a small vocabulary.
    fn text(len: usize) -> Vec<u8> {
        let words = [&b"store "[..], b"path ", b"narinfo ", b"zstd ", b"frame\n"];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(words[rng.usize(..words.len())]);
        }
        out.truncate(len);
        out
    }

    #[test]
    fn frames_decode_back_and_sizes_are_in_their_headers() {
        let data = text(3 << 20);
        let mut compressor = FrameCompressor::new(3).unwrap();
        let mut file = b"kept".to_vec();
        for piece in data.chunks(1 << 20) {
            compressor.compress(piece, &mut file).unwrap();
        }
        assert_eq!(&file[..4], b"kept");
        let frames = &file[4..];
        assert!(frames.len() < data.len() / 3);
        assert_eq!(zstd::stream::decode_all(frames).unwrap(), data);
        let first = zstd::zstd_safe::find_frame_compressed_size(frames).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frames[..first]).unwrap(),
            Some(1 << 20)
        );
    }

    #[test]
    fn every_level_and_an_empty_frame_decode_back() {
        let data = text(300_000);
        for level in [-5, 1, 3, 4, 5, 19] {
            let mut compressor = FrameCompressor::new(level).unwrap();
            let mut file = Vec::new();
            compressor.compress(&data, &mut file).unwrap();
            compressor.compress(&[], &mut file).unwrap();
            assert_eq!(
                zstd::stream::decode_all(&file[..]).unwrap(),
                data,
                "level {level}"
            );
        }
    }

    fn get(compressor: &FrameCompressor, parameter: ZSTD_cParameter) -> i32 {
        let mut value = 0;
        // SAFETY: a live context and a place for the value.
        check(unsafe {
            zstd_sys::ZSTD_CCtx_getParameter(compressor.ctx.as_ptr(), parameter, &mut value)
        })
        .unwrap();
        value
    }

    #[test]
    fn fast_levels_get_the_cheapest_splitter_and_the_others_zstds_choice() {
        // The bundled zstd, and the parameter's number in its zstd.h.
        // SAFETY: no arguments.
        assert_eq!(unsafe { zstd_sys::ZSTD_versionNumber() }, 10507);
        assert!(has_splitter());
        assert_eq!(BLOCK_SPLITTER_LEVEL as i32, 1017);
        let data = text(1 << 20);
        for (level, want) in [(-5, 2), (1, 2), (3, 2), (4, 2), (5, 0), (19, 0)] {
            let mut compressor = FrameCompressor::new(level).unwrap();
            for _ in 0..2 {
                assert_eq!(
                    get(&compressor, BLOCK_SPLITTER_LEVEL),
                    want,
                    "level {level}"
                );
                assert_eq!(
                    get(&compressor, ZSTD_cParameter::ZSTD_c_compressionLevel),
                    level
                );
                // Kept from frame to frame.
                compressor.compress(&data, &mut Vec::new()).unwrap();
            }
        }
    }

    #[test]
    fn incompressible_frames_fit_after_what_the_buffer_holds() {
        let mut rng = fastrand::Rng::with_seed(11);
        let data: Vec<u8> = std::iter::repeat_with(|| rng.u8(..))
            .take(4 << 20)
            .collect();
        let mut compressor = FrameCompressor::new(3).unwrap();
        let mut file = vec![1u8; 1000];
        file.shrink_to_fit();
        compressor.compress(&data, &mut file).unwrap();
        compressor.compress(&data[..5000], &mut file).unwrap();
        assert!(
            file.len() > 1000 + data.len() + 5000,
            "stored, not compressed"
        );
        assert_eq!(&file[..1000], &[1u8; 1000][..]);
        let mut both = data.clone();
        both.extend_from_slice(&data[..5000]);
        assert_eq!(zstd::stream::decode_all(&file[1000..]).unwrap(), both);
    }

    #[test]
    fn a_value_zstd_rejects_is_an_error_with_its_message() {
        let compressor = FrameCompressor::new(3).unwrap();
        let err = compressor.set(BLOCK_SPLITTER_LEVEL, 99).unwrap_err();
        assert!(err.to_string().starts_with("zstd: "), "{err}");
    }
}
