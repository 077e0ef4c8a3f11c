//! Turning what a user or a build hook hands us into a store path.
//!
//! Accepted: `/nix/store/<hash>-<name>`, a path inside one (`…/bin/foo` → the store
//! path), a `.drv` (its built outputs are meant), and a symlink into the store such
//! as `/home/me/proj/result`. Rejected, with the input named: non-UTF-8 or control
//! bytes, relative paths, `.`/`..` components, paths outside the store, symlinks leading
//! outside it, and names that are not valid store path names.
//! Touches the filesystem only to follow symlinks outside the store.

use std::path::Path;

use crate::pipe::{escape, PREFIX_LEN};
use crate::store_path::{self, StoreDir, StorePath};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("input \"{0}\" is not valid UTF-8 text")]
    NotUtf8(String),
    #[error("input \"{0}\" contains control characters")]
    Control(String),
    #[error("input \"{input}\": {cause}")]
    Path {
        input: String,
        cause: store_path::Error,
    },
    #[error("input \"{input}\" cannot be resolved: {cause}")]
    Io {
        input: String,
        cause: std::io::Error,
    },
    #[error("input \"{input}\" leads to {target}, outside the store {store_dir}")]
    OutsideStore {
        input: String,
        target: String,
        store_dir: String,
    },
}

impl Error {
    /// What is wrong with the input, without the input itself (which may be 4 KiB of
    /// garbage): for a log line that shows the input its own, capped way. Paths it
    /// led to are shown capped as well.
    pub fn reason(&self) -> String {
        match self {
            Error::NotUtf8(_) => "is not valid UTF-8 text".into(),
            Error::Control(_) => "contains control characters".into(),
            // The cause names the input again, or the store path a symlink led to.
            Error::Path { input, cause } if escape(cause.path().as_bytes()) == *input => {
                cause.problem()
            }
            Error::Path { cause, .. } => format!(
                "leads to {}, which {}",
                capped(cause.path()),
                cause.problem()
            ),
            Error::Io { cause, .. } => format!("cannot be resolved: {cause}"),
            Error::OutsideStore {
                target, store_dir, ..
            } => format!("leads to {}, outside the store {store_dir}", capped(target)),
        }
    }
}

/// A path for a log line: escaped, its first [`PREFIX_LEN`] bytes only.
fn capped(path: &str) -> String {
    let bytes = path.as_bytes();
    let shown = escape(&bytes[..bytes.len().min(PREFIX_LEN)]);
    if bytes.len() > PREFIX_LEN {
        format!("{shown}…")
    } else {
        shown
    }
}

/// Resolves one input line (raw bytes, newline already removed).
pub fn resolve(raw: &[u8], store_dir: &StoreDir) -> Result<StorePath, Error> {
    let text = std::str::from_utf8(raw).map_err(|_| Error::NotUtf8(escape(raw)))?;
    if text.chars().any(char::is_control) {
        return Err(Error::Control(escape(raw)));
    }
    resolve_str(text, store_dir)
}

fn resolve_str(text: &str, store_dir: &StoreDir) -> Result<StorePath, Error> {
    let path_err = |cause| Error::Path {
        input: escape(text.as_bytes()),
        cause,
    };
    match store_dir.reduce(text) {
        Ok(sp) => Ok(sp),
        // Outside the store lexically: it may be a symlink (./result) into the store.
        Err(store_path::Error::NotInStore { .. }) => {
            let target = std::fs::canonicalize(Path::new(text)).map_err(|cause| Error::Io {
                input: escape(text.as_bytes()),
                cause,
            })?;
            let target = target.to_string_lossy().into_owned();
            store_dir.reduce(&target).map_err(|e| match e {
                store_path::Error::NotInStore { .. } => Error::OutsideStore {
                    input: escape(text.as_bytes()),
                    target,
                    store_dir: store_dir.as_str().to_string(),
                },
                other => path_err(other),
            })
        }
        Err(e) => Err(path_err(e)),
    }
}

/// For `send`: like [`resolve`], but a relative path is taken relative to the
/// current directory first (the hook's or the user's `./result`).
pub fn resolve_arg(arg: &str, store_dir: &StoreDir) -> Result<StorePath, Error> {
    if arg.starts_with('/') {
        return resolve(arg.as_bytes(), store_dir);
    }
    let abs = std::env::current_dir()
        .map_err(|cause| Error::Io {
            input: escape(arg.as_bytes()),
            cause,
        })?
        .join(arg);
    let target = std::fs::canonicalize(&abs).map_err(|cause| Error::Io {
        input: escape(arg.as_bytes()),
        cause,
    })?;
    resolve(target.as_os_str().as_encoded_bytes(), store_dir).map_err(|e| match e {
        Error::Path { cause, .. } => Error::Path {
            input: escape(arg.as_bytes()),
            cause,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const H: &str = "xav0pws0268idny9wi60ylqqiyryzfz6";

    #[test]
    fn accepts_store_paths_and_paths_inside() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let p = format!("/nix/store/{H}-c/bin/x");
        assert_eq!(resolve(p.as_bytes(), &sd).unwrap().name(), "c");
    }

    #[test]
    fn follows_symlinks_into_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir_all(store.join(format!("{H}-out"))).unwrap();
        let sd = StoreDir::new(store.to_str().unwrap()).unwrap();
        let link = dir.path().join("result");
        symlink(store.join(format!("{H}-out")), &link).unwrap();
        assert_eq!(
            resolve(link.to_str().unwrap().as_bytes(), &sd)
                .unwrap()
                .name(),
            "out"
        );
        let outside = dir.path().join("elsewhere");
        symlink("/etc", &outside).unwrap();
        let err = resolve(outside.to_str().unwrap().as_bytes(), &sd).unwrap_err();
        assert!(matches!(err, Error::OutsideStore { .. }), "{err}");
        assert!(err.to_string().contains("elsewhere"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_errors_name_the_input(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let sd = StoreDir::new("/nix/store").unwrap();
            if let Err(e) = resolve(&raw, &sd) {
                let shown = escape(&raw);
                let head: String = shown.chars().take(20).collect();
                proptest::prop_assert!(e.to_string().contains(&head), "{} lacks {}", e, head);
            }
        }
    }

    #[test]
    fn a_reason_leaves_the_input_out() {
        let sd = StoreDir::new("/nix/store").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("elsewhere");
        symlink("/etc", &outside).unwrap();
        let long_outside = format!("/etc/{}", "x".repeat(5000));
        for (raw, want) in [
            (
                &b"/nix/store/\xff"[..],
                "is not valid UTF-8 text".to_string(),
            ),
            (b"/nix/store/a\0b", "contains control characters".into()),
            (b"relative/path", "is not an absolute path".into()),
            (
                b"/etc/hosts",
                "leads to /etc/hosts, outside the store /nix/store".into(),
            ),
            (
                outside.to_str().unwrap().as_bytes(),
                "leads to /etc, outside the store /nix/store".into(),
            ),
            (
                long_outside.as_bytes(),
                "cannot be resolved: File name too long (os error 36)".into(),
            ),
        ] {
            let e = resolve(raw, &sd).unwrap_err();
            assert_eq!(e.reason(), want, "{e}");
        }
    }

    #[test]
    fn rejects_bad_input_naming_it() {
        let sd = StoreDir::new("/nix/store").unwrap();
        for (raw, needle) in [
            (&b"/nix/store/\xff\xfe"[..], "\\xff"),
            (b"/nix/store/a\0b", "\\x00"),
            (b"relative/path", "relative/path"),
            (b"/nix/store/../etc/passwd", "../etc/passwd"),
            (b"/nix/store/not-a-store-path", "not-a-store-path"),
            (b"/definitely/not/there", "/definitely/not/there"),
        ] {
            let err = resolve(raw, &sd).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        }
    }
}
