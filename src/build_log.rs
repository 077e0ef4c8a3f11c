//! Build logs: where Nix keeps a derivation's log on this machine, and where a binary
//! cache keeps it.
//!
//! Nix (2.8, `LocalFSStore::getBuildLog`) looks in its log directory (`NIX_LOG_DIR`,
//! default `/nix/var/log/nix`) for, in order,
//! ```text
//! drvs/<first 2 characters of the .drv's name>/<the rest>       plain text
//! drvs/<first 2 characters of the .drv's name>/<the rest>.bz2   (compress-build-log, the default)
//! drvs/<the .drv's name>[.bz2]                                   (older Nix)
//! ```
//! A binary cache keeps the text, uncompressed, as `log/<the .drv's name>`
//! (`BinaryCacheStore::addBuildLog`, what `nix store copy-log` writes); `nix log`
//! finds it there through the narinfo's `Deriver`.
//!
//! Sync: the caller runs [`read`] on a plain thread (bzip2 is CPU work).

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::store_path::StorePath;

/// The object name of `drv`'s build log in a binary cache.
pub fn cache_key(drv: &StorePath) -> String {
    format!("log/{drv}")
}

/// The files Nix may have kept `drv`'s log in, in the order Nix looks.
fn candidates(log_dir: &Path, drv: &StorePath) -> [(PathBuf, bool); 4] {
    let name = drv.to_string();
    let drvs = log_dir.join("drvs");
    let split = drvs.join(&name[..2]).join(&name[2..]);
    let flat = drvs.join(&name);
    [
        (split.clone(), false),
        (with_bz2(split), true),
        (flat.clone(), false),
        (with_bz2(flat), true),
    ]
}

fn with_bz2(p: PathBuf) -> PathBuf {
    let mut s = p.into_os_string();
    s.push(".bz2");
    s.into()
}

/// The io error's text is part of the message (callers log `{e}`), not a `source`.
#[derive(Debug, thiserror::Error)]
#[error("build log {path}: {cause}")]
pub struct Error {
    path: String,
    cause: io::Error,
}

/// The text of `drv`'s build log, or None if Nix kept none here.
pub fn read(log_dir: &Path, drv: &StorePath) -> Result<Option<Vec<u8>>, Error> {
    for (path, bz2) in candidates(log_dir, drv) {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(cause) => return Err(error(&path, cause)),
        };
        let mut text = Vec::new();
        let done = if bz2 {
            // Several streams one after another are one file to bzip2 and to Nix.
            bzip2::read::MultiBzDecoder::new(io::BufReader::new(file)).read_to_end(&mut text)
        } else {
            io::BufReader::new(file).read_to_end(&mut text)
        };
        done.map_err(|cause| error(&path, cause))?;
        return Ok(Some(text));
    }
    Ok(None)
}

fn error(path: &Path, cause: io::Error) -> Error {
    Error {
        path: path.display().to_string(),
        cause,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn drv() -> StorePath {
        StorePath::from_base_name("cz673mgbpm2a25hih5hh4n8ind1liljg-lstest-1.drv").unwrap()
    }

    fn bz2(text: &[u8]) -> Vec<u8> {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn finds_the_log_where_nix_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), &drv()).unwrap(), None);
        let sub = dir.path().join("drvs/cz");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            dir.path()
                .join("drvs/cz673mgbpm2a25hih5hh4n8ind1liljg-lstest-1.drv"),
            b"older layout\n",
        )
        .unwrap();
        assert_eq!(
            read(dir.path(), &drv()).unwrap().unwrap(),
            b"older layout\n"
        );
        std::fs::write(
            sub.join("673mgbpm2a25hih5hh4n8ind1liljg-lstest-1.drv.bz2"),
            bz2(b"compressed\n"),
        )
        .unwrap();
        assert_eq!(read(dir.path(), &drv()).unwrap().unwrap(), b"compressed\n");
        std::fs::write(
            sub.join("673mgbpm2a25hih5hh4n8ind1liljg-lstest-1.drv"),
            b"plain\n",
        )
        .unwrap();
        assert_eq!(read(dir.path(), &drv()).unwrap().unwrap(), b"plain\n");
        assert_eq!(
            cache_key(&drv()),
            "log/cz673mgbpm2a25hih5hh4n8ind1liljg-lstest-1.drv"
        );
    }

    #[test]
    fn a_damaged_log_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("drvs/cz");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join("673mgbpm2a25hih5hh4n8ind1liljg-lstest-1.drv.bz2"),
            b"not bzip2",
        )
        .unwrap();
        let err = read(dir.path(), &drv()).unwrap_err();
        assert!(err.to_string().contains("lstest-1.drv.bz2"), "{err}");
    }
}
