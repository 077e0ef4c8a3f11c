//! Reading secret key files (`nix-store --generate-binary-cache-key`), shared by the
//! binaries: a key file others may read is used, with a warning naming it and its mode.

use std::path::{Path, PathBuf};

use crate::signing::SecretKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read secret key file {}: {cause}", file.display())]
    Read {
        file: PathBuf,
        cause: std::io::Error,
    },
    #[error("secret key file {}: {cause}", file.display())]
    Parse {
        file: PathBuf,
        cause: crate::signing::Error,
    },
}

/// The keys in `files`, in order.
pub fn read(files: &[PathBuf]) -> Result<Vec<SecretKey>, Error> {
    files.iter().map(|f| read_one(f)).collect()
}

fn read_one(file: &Path) -> Result<SecretKey, Error> {
    let text = std::fs::read_to_string(file).map_err(|cause| Error::Read {
        file: file.to_path_buf(),
        cause,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).map_or(0, |m| m.permissions().mode());
    if let Some(exposed) = crate::signing::key_file_exposure(mode) {
        log::warn!(
            "secret key file {} is not private: {exposed}; whoever can read it can \
             sign as this cache (chmod 600 it)",
            file.display()
        );
    }
    text.parse().map_err(|cause| Error::Parse {
        file: file.to_path_buf(),
        cause,
    })
}
