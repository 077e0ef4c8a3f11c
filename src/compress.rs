//! Compression algorithms and their names in narinfos and NAR file names.
//!
//! | `--compression` | narinfo `Compression:` | NAR file      |
//! |-----------------|------------------------|---------------|
//! | zstd            | zstd                   | `*.nar.zst`   |
//! | xz              | xz                     | `*.nar.xz`    |
//! | none            | none                   | `*.nar`       |

use std::fmt;
use std::str::FromStr;

use async_compression::Level;
use tokio::io::{AsyncBufRead, AsyncRead};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Xz,
    None,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?} (want zstd, xz or none)")]
pub struct UnknownCompression(String);

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "xz" => Ok(Compression::Xz),
            "none" => Ok(Compression::None),
            _ => Err(UnknownCompression(s.to_string())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        })
    }
}

impl Compression {
    /// The NAR file name suffix, `.nar` included.
    pub fn nar_extension(&self) -> &'static str {
        match self {
            Compression::Zstd => ".nar.zst",
            Compression::Xz => ".nar.xz",
            Compression::None => ".nar",
        }
    }

    /// Wraps `input` so that reading yields the compressed stream. `level` None means
    /// the algorithm's default (zstd 3, xz 6).
    pub fn encoder<R>(&self, input: R, level: Option<i32>) -> Box<dyn AsyncRead + Send + Unpin>
    where
        R: AsyncBufRead + Send + Unpin + 'static,
    {
        use async_compression::tokio::bufread::{XzEncoder, ZstdEncoder};
        let level = level.map(Level::Precise).unwrap_or(Level::Default);
        match self {
            Compression::Zstd => Box::new(ZstdEncoder::with_quality(input, level)),
            Compression::Xz => Box::new(XzEncoder::with_quality(input, level)),
            Compression::None => Box::new(input),
        }
    }
}

/// The reader of a NAR stored with the narinfo `Compression:` `name` (Nix's default,
/// when absent, is bzip2); None for algorithms this build cannot read.
pub fn decoder<R>(name: Option<&str>, input: R) -> Option<Box<dyn AsyncRead + Send + Unpin>>
where
    R: AsyncBufRead + Send + Unpin + 'static,
{
    use async_compression::tokio::bufread::{BzDecoder, XzDecoder, ZstdDecoder};
    Some(match name.unwrap_or("bzip2") {
        // Concatenated streams are valid files for these formats: read them all.
        "zstd" => {
            let mut d = ZstdDecoder::new(input);
            d.multiple_members(true);
            Box::new(d)
        }
        "xz" => {
            let mut d = XzDecoder::new(input);
            d.multiple_members(true);
            Box::new(d)
        }
        "bzip2" => {
            let mut d = BzDecoder::new(input);
            d.multiple_members(true);
            Box::new(d)
        }
        "none" | "" => Box::new(input),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn names_round_trip() {
        for c in [Compression::Zstd, Compression::Xz, Compression::None] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        assert!("bzip2".parse::<Compression>().is_err());
    }

    #[tokio::test]
    async fn zstd_output_decodes_back() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut enc = Compression::Zstd.encoder(std::io::Cursor::new(data.clone()), Some(3));
        let mut out = Vec::new();
        enc.read_to_end(&mut out).await.unwrap();
        assert!(out.len() < data.len() / 4);
        let mut dec = async_compression::tokio::bufread::ZstdDecoder::new(out.as_slice());
        let mut back = Vec::new();
        dec.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    }
}
