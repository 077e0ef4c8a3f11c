//! The `.narinfo` format: one `Key: value` line per field, as Nix writes it.
//!
//! ```text
//! StorePath: /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a
//! URL: nar/1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1.nar.zst
//! Compression: zstd
//! FileHash: sha256:1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1
//! FileSize: 91
//! NarHash: sha256:0bx1rx8nqlb5d43d5m8rq7m4qwa9ai2565br3igxhy8aiz0609ha
//! NarSize: 120
//! References:
//! Deriver: n7wsi22m77azhfv9fnlp9vgc2js3xsfz-probe-a.drv
//! Sig: cache.example.org-1:…
//! ```
//! Printing follows Nix's field order, so a narinfo Nix wrote prints back byte for byte.
//! Also the signing fingerprint (`1;<path>;<narhash>;<narsize>;<refs>`) is defined here.

use std::fmt;
use std::str::FromStr;

use crate::hash::Sha256;
use crate::signing::SecretKey;
use crate::store_path::{StoreDir, StorePath};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("narinfo line {0:?} has no \": \"")]
    BadLine(String),
    #[error("narinfo field {field} has a bad value {value:?}")]
    BadValue { field: &'static str, value: String },
    #[error("narinfo lacks the {0} field")]
    Missing(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store the path belongs to (the directory part of `StorePath`).
    pub store_dir: StoreDir,
    pub path: StorePath,
    /// NAR file location, relative to the cache root.
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted, as Nix writes them; may include `path` itself.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// Fields this parser does not know, kept to print back.
    pub extra: Vec<(String, String)>,
}

impl NarInfo {
    /// The absolute store path.
    pub fn store_path(&self) -> String {
        self.store_dir.display(&self.path)
    }

    /// The string Nix signs: `1;<path>;<narhash>;<narsize>;<comma-separated ref paths>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .references
            .iter()
            .map(|r| self.store_dir.display(r))
            .collect();
        format!(
            "1;{};{};{};{}",
            self.store_path(),
            self.nar_hash,
            self.nar_size,
            refs.join(",")
        )
    }

    /// Signs with each of `keys`; a signature by a key of the same name is replaced,
    /// others are kept.
    pub fn sign(&mut self, keys: &[SecretKey]) {
        let fingerprint = self.fingerprint();
        for key in keys {
            let prefix = format!("{}:", key.name());
            self.sigs.retain(|s| !s.starts_with(&prefix));
            self.sigs.push(key.sign(&fingerprint));
        }
    }
}

fn bad(field: &'static str, value: &str) -> Error {
    Error::BadValue {
        field,
        value: value.to_string(),
    }
}

fn parse_u64(field: &'static str, v: &str) -> Result<u64, Error> {
    v.parse().map_err(|_| bad(field, v))
}

fn parse_hash(field: &'static str, v: &str) -> Result<Sha256, Error> {
    v.parse().map_err(|_| bad(field, v))
}

fn parse_base_name(field: &'static str, v: &str) -> Result<StorePath, Error> {
    StorePath::from_base_name(v).map_err(|_| bad(field, v))
}

/// `StorePath: /nix/store/<hash>-<name>` split into its store and its path.
fn parse_store_path(v: &str) -> Result<(StoreDir, StorePath), Error> {
    let (dir, base) = v.rsplit_once('/').ok_or_else(|| bad("StorePath", v))?;
    let dir =
        StoreDir::new(if dir.is_empty() { "/" } else { dir }).map_err(|_| bad("StorePath", v))?;
    Ok((dir, parse_base_name("StorePath", base)?))
}

impl FromStr for NarInfo {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let mut store_path = None;
        let mut url = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut references = Vec::new();
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut extra = Vec::new();
        for line in s.lines() {
            if line.is_empty() {
                continue;
            }
            // "References: " with no references has nothing after the space; some
            // writers drop the trailing space.
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or_else(|| Error::BadLine(line.to_string()))?;
            match key {
                "StorePath" => store_path = Some(parse_store_path(value)?),
                "URL" => url = Some(value.to_string()),
                "Compression" => compression = Some(value.to_string()),
                "FileHash" => file_hash = Some(parse_hash("FileHash", value)?),
                "FileSize" => file_size = Some(parse_u64("FileSize", value)?),
                "NarHash" => nar_hash = Some(parse_hash("NarHash", value)?),
                "NarSize" => nar_size = Some(parse_u64("NarSize", value)?),
                "References" => {
                    references = value
                        .split_whitespace()
                        .map(|r| parse_base_name("References", r))
                        .collect::<Result<_, _>>()?
                }
                // As Nix does: an unknown deriver is no deriver.
                "Deriver" if value == "unknown-deriver" => {}
                "Deriver" => deriver = Some(parse_base_name("Deriver", value)?),
                "System" => system = Some(value.to_string()),
                "Sig" => sigs.push(value.to_string()),
                "CA" => ca = Some(value.to_string()),
                _ => extra.push((key.to_string(), value.to_string())),
            }
        }
        let (store_dir, path) = store_path.ok_or(Error::Missing("StorePath"))?;
        Ok(NarInfo {
            store_dir,
            path,
            url: url.ok_or(Error::Missing("URL"))?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(Error::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(Error::Missing("NarSize"))?,
            references,
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path())?;
        writeln!(f, "URL: {}", self.url)?;
        if let Some(c) = &self.compression {
            writeln!(f, "Compression: {c}")?;
        }
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        write!(f, "References:")?;
        if self.references.is_empty() {
            // Nix writes the space even when the list is empty.
            write!(f, " ")?;
        }
        for r in &self.references {
            write!(f, " {r}")?;
        }
        writeln!(f)?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for sig in &self.sigs {
            writeln!(f, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        for (k, v) in &self.extra {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix copy --to file://…?compression=zstd` (Nix 2.8) for a test closure.
    const FROM_NIX_COPY: &str = "\
StorePath: /nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-probe-c
URL: nar/0zxx9y0hifisgijlzgx53bvi00xw93bvxnkw74vfmn25np1hbasi.nar.zst
Compression: zstd
FileHash: sha256:0zxx9y0hifisgijlzgx53bvi00xw93bvxnkw74vfmn25np1hbasi
FileSize: 163
NarHash: sha256:01mx0ndvr2f592ddc81ch043f92dmw0w1cwjiz809pg9mf6lk967
NarSize: 224
References: 9ngqiqshf9l3pfc47n2pgw5z7w61rc18-probe-b 9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a
Deriver: 0vx0w3yni5b94y2jbjkz2ja6zz70c5fq-probe-c.drv
";

    const NO_REFS: &str = "\
StorePath: /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a
URL: nar/1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1.nar.zst
Compression: zstd
FileHash: sha256:1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1
FileSize: 91
NarHash: sha256:0bx1rx8nqlb5d43d5m8rq7m4qwa9ai2565br3igxhy8aiz0609ha
NarSize: 120
References: 
Deriver: n7wsi22m77azhfv9fnlp9vgc2js3xsfz-probe-a.drv
";

    #[test]
    fn round_trips_what_nix_copy_wrote() {
        for text in [FROM_NIX_COPY, NO_REFS] {
            let info: NarInfo = text.parse().unwrap();
            assert_eq!(info.to_string(), text);
        }
        let info: NarInfo = FROM_NIX_COPY.parse().unwrap();
        assert_eq!(info.nar_size, 224);
        assert_eq!(info.references.len(), 2);
        assert_eq!(
            info.deriver.as_ref().map(|d| d.base_name()),
            Some("0vx0w3yni5b94y2jbjkz2ja6zz70c5fq-probe-c.drv")
        );
        assert_eq!(info.path.hash_part(), "xav0pws0268idny9wi60ylqqiyryzfz6");
        assert_eq!(info.store_dir.as_str(), "/nix/store");
        assert_eq!(info.references[0].name(), "probe-b");
    }

    #[test]
    fn keeps_sigs_ca_and_unknown_fields() {
        let text = format!("{NO_REFS}Sig: k:abc\nSig: j:def\nCA: fixed:r:sha256:xyz\nFuture: 1\n");
        let info: NarInfo = text.parse().unwrap();
        assert_eq!(info.sigs, ["k:abc", "j:def"]);
        assert_eq!(info.ca.as_deref(), Some("fixed:r:sha256:xyz"));
        assert_eq!(info.to_string(), text);
    }

    #[test]
    fn an_unknown_deriver_is_no_deriver() {
        let text = NO_REFS.replace(
            "n7wsi22m77azhfv9fnlp9vgc2js3xsfz-probe-a.drv",
            "unknown-deriver",
        );
        assert_eq!(text.parse::<NarInfo>().unwrap().deriver, None);
    }

    #[test]
    fn signing_replaces_a_signature_by_the_same_key_and_keeps_others() {
        let key: SecretKey = "test1:r24vQqTnkATLONjgTaM8aV7fa8eXJyaoyvEZXPKB8pUeYGoppkkXqZu/Sa5bm0UGNTBDygnOi6lW5aKp+Z9JWQ==".parse().unwrap();
        let mut info: NarInfo = format!("{NO_REFS}Sig: other:keep\nSig: test1:stale\n")
            .parse()
            .unwrap();
        info.sign(std::slice::from_ref(&key));
        assert_eq!(info.sigs.len(), 2);
        assert_eq!(info.sigs[0], "other:keep");
        assert!(key
            .public_key()
            .verifies(&info.fingerprint(), &info.sigs[1]));
    }

    #[test]
    fn fingerprint_matches_nix() {
        let info: NarInfo = FROM_NIX_COPY.parse().unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-probe-c;\
             sha256:01mx0ndvr2f592ddc81ch043f92dmw0w1cwjiz809pg9mf6lk967;224;\
             /nix/store/9ngqiqshf9l3pfc47n2pgw5z7w61rc18-probe-b,\
             /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let no_size = FROM_NIX_COPY.replace("NarSize: 224\n", "");
        assert_eq!(no_size.parse::<NarInfo>(), Err(Error::Missing("NarSize")));
        let bad = FROM_NIX_COPY.replace("NarSize: 224", "NarSize: lots");
        assert!(bad
            .parse::<NarInfo>()
            .unwrap_err()
            .to_string()
            .contains("NarSize"));
        assert!(matches!(
            "garbage".parse::<NarInfo>(),
            Err(Error::BadLine(_))
        ));
        // Store paths are checked, not sliced: a bad reference or path is named.
        let bad_ref = FROM_NIX_COPY.replace("9ngqiqshf9l3pfc47n2pgw5z7w61rc18-probe-b", "short-b");
        assert_eq!(
            bad_ref.parse::<NarInfo>(),
            Err(Error::BadValue {
                field: "References",
                value: "short-b".into()
            })
        );
        let bad_path = FROM_NIX_COPY.replace("StorePath: /nix/store/", "StorePath: nix/store/");
        assert!(matches!(
            bad_path.parse::<NarInfo>(),
            Err(Error::BadValue {
                field: "StorePath",
                ..
            })
        ));
    }
}
