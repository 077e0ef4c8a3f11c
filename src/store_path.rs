//! Store paths: `/nix/store/<32 base-32 chars>-<name>`.
//!
//! Validation follows Nix: the hash part uses the nix base-32 alphabet, the name is
//! 1–211 characters of `A-Za-z0-9+-._?=` and does not start with a dot. A path inside a
//! store path (`/nix/store/xxx-foo/bin/foo`) reduces to the store path. Pure: no IO.

use std::fmt;

use crate::nixbase32;

pub const HASH_LEN: usize = 32;
const MAX_NAME_LEN: usize = 211;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("{path:?} is not inside the store {store_dir}")]
    NotInStore { path: String, store_dir: String },
    #[error("{0:?} contains a \".\" or \"..\" component")]
    DotComponent(String),
    #[error("{0:?} is not a valid store path name (want <32 base-32 chars>-<name>)")]
    BadName(String),
}

impl Error {
    /// The path the error is about.
    pub fn path(&self) -> &str {
        match self {
            Error::NotAbsolute(p)
            | Error::NotInStore { path: p, .. }
            | Error::DotComponent(p)
            | Error::BadName(p) => p,
        }
    }

    /// What is wrong with [`Error::path`], without it: the message is the path, then this.
    pub fn problem(&self) -> String {
        match self {
            Error::NotAbsolute(_) => "is not an absolute path".into(),
            Error::NotInStore { store_dir, .. } => format!("is not inside the store {store_dir}"),
            Error::DotComponent(_) => "contains a \".\" or \"..\" component".into(),
            Error::BadName(_) => {
                "is not a valid store path name (want <32 base-32 chars>-<name>)".into()
            }
        }
    }
}

/// A store directory such as `/nix/store`, without trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDir(String);

impl StoreDir {
    pub fn new(dir: &str) -> Result<Self, Error> {
        let trimmed = dir.trim_end_matches('/');
        if !trimmed.starts_with('/') {
            return Err(Error::NotAbsolute(dir.to_string()));
        }
        if trimmed.split('/').any(|c| c == "." || c == "..") {
            return Err(Error::DotComponent(dir.to_string()));
        }
        Ok(StoreDir(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The store path that `path` is or lies inside. `path` must be absolute and
    /// free of `.`/`..` components (resolve symlinks before calling).
    pub fn reduce(&self, path: &str) -> Result<StorePath, Error> {
        if !path.starts_with('/') {
            return Err(Error::NotAbsolute(path.to_string()));
        }
        if path.split('/').any(|c| c == "." || c == "..") {
            return Err(Error::DotComponent(path.to_string()));
        }
        let rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| Error::NotInStore {
                path: path.to_string(),
                store_dir: self.0.clone(),
            })?;
        let base = rest.split('/').next().unwrap_or("");
        StorePath::from_base_name(base).map_err(|_| Error::BadName(path.to_string()))
    }

    pub fn parse(&self, path: &str) -> Result<StorePath, Error> {
        let sp = self.reduce(path)?;
        if self.display(&sp) != path.trim_end_matches('/') {
            return Err(Error::BadName(path.to_string()));
        }
        Ok(sp)
    }

    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }
}

/// A store path's hash part (32 nix-base32 characters, as in a narinfo's name) decoded.
pub fn decode_hash_part(hash: &str) -> Option<[u8; 20]> {
    nixbase32::decode(hash, 20).ok()?.try_into().ok()
}

/// The base name of a store path: hash part and name. Print it with
/// [`StoreDir::display`] to get the absolute path. Shared, not copied, when cloned: a
/// planned path is held in several maps and in each of its referrers' waits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StorePath(std::sync::Arc<str>);

/// Hashes only the first 8 characters of the hash part (40 random bits): paths are
/// looked up in maps millions of times in a large closure, and the whole name cost
/// SipHash 5 times as much. Equal paths still hash equally.
impl std::hash::Hash for StorePath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let head: [u8; 8] = self.0.as_bytes()[..8]
            .try_into()
            .expect("a hash part is 32 long");
        state.write_u64(u64::from_le_bytes(head));
    }
}

/// The bytes a store path's name may hold: letters, digits and `+-._?=`.
const NAME_CHARS: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=');
        c += 1;
    }
    t
};

impl StorePath {
    pub fn from_base_name(base: &str) -> Result<Self, Error> {
        let bad = || Error::BadName(base.to_string());
        let (hash, name) = (
            base.get(..HASH_LEN).ok_or_else(bad)?,
            base.get(HASH_LEN..).ok_or_else(bad)?,
        );
        let name = name.strip_prefix('-').ok_or_else(bad)?;
        if !hash.bytes().all(nixbase32::is_valid_char) {
            return Err(bad());
        }
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name.starts_with('.')
            || !name.bytes().all(|c| NAME_CHARS[c as usize])
        {
            return Err(bad());
        }
        Ok(StorePath(base.into()))
    }

    pub fn hash_part(&self) -> &str {
        &self.0[..HASH_LEN]
    }

    /// The hash part decoded: 20 bytes.
    pub fn hash_bytes(&self) -> Option<[u8; 20]> {
        decode_hash_part(self.hash_part())
    }

    pub fn name(&self) -> &str {
        &self.0[HASH_LEN + 1..]
    }

    pub fn base_name(&self) -> &str {
        &self.0
    }

    pub fn is_derivation(&self) -> bool {
        self.0.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    const P: &str = "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-probe-c";

    #[test]
    fn parses_and_prints() {
        let sp = store().parse(P).unwrap();
        assert_eq!(sp.hash_part(), "xav0pws0268idny9wi60ylqqiyryzfz6");
        assert_eq!(sp.name(), "probe-c");
        assert_eq!(store().display(&sp), P);
        assert!(!sp.is_derivation());
        assert!(store()
            .parse("/nix/store/0vx0w3yni5b94y2jbjkz2ja6zz70c5fq-probe-c.drv")
            .unwrap()
            .is_derivation());
    }

    #[test]
    fn reduces_paths_inside_a_store_path() {
        let sp = store().reduce(&format!("{P}/bin/tool")).unwrap();
        assert_eq!(store().display(&sp), P);
        assert!(store().parse(&format!("{P}/bin/tool")).is_err());
    }

    #[test]
    fn rejects_what_nix_rejects() {
        let s = store();
        assert!(matches!(
            s.reduce("nix/store/x"),
            Err(Error::NotAbsolute(_))
        ));
        assert!(matches!(
            s.reduce("/nix/store/../etc/passwd"),
            Err(Error::DotComponent(_))
        ));
        assert!(matches!(
            s.reduce("/etc/passwd"),
            Err(Error::NotInStore { .. })
        ));
        assert!(matches!(
            s.reduce("/nix/storex/xav0pws0268idny9wi60ylqqiyryzfz6-a"),
            Err(Error::NotInStore { .. })
        ));
        for bad in [
            "/nix/store/",
            "/nix/store/short-name",
            "/nix/store/eav0pws0268idny9wi60ylqqiyryzfz6-e-is-not-base32",
            "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-",
            "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-.hidden",
            "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-sp ace",
            "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6_x",
        ] {
            assert!(matches!(s.reduce(bad), Err(Error::BadName(_))), "{bad}");
        }
        let long = format!(
            "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-{}",
            "a".repeat(212)
        );
        assert!(s.reduce(&long).is_err());
        let ok = format!(
            "/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-{}",
            "a".repeat(211)
        );
        assert!(s.reduce(&ok).is_ok());
    }

    #[test]
    fn an_error_is_its_path_then_its_problem() {
        let s = store();
        for bad in [
            "nix/store/x",
            "/nix/store/../etc",
            "/etc/passwd",
            "/nix/store/short",
        ] {
            let e = s.reduce(bad).unwrap_err();
            assert_eq!(e.path(), bad);
            assert_eq!(e.to_string(), format!("{bad:?} {}", e.problem()));
        }
    }

    #[test]
    fn store_dir_is_normalised() {
        assert_eq!(StoreDir::new("/nix/store/").unwrap().as_str(), "/nix/store");
        assert!(StoreDir::new("relative").is_err());
    }
}
