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
    /// Absolute store path.
    pub store_path: String,
    /// NAR file location, relative to the cache root.
    pub url: String,
    pub compression: Option<String>,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Base names (`<hash>-<name>`) of the references, sorted.
    pub references: Vec<String>,
    /// Base name of the deriver.
    pub deriver: Option<String>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// Fields this parser does not know, kept to print back.
    pub extra: Vec<(String, String)>,
}

impl NarInfo {
    /// The string Nix signs: `1;<path>;<narhash>;<narsize>;<comma-separated ref paths>`.
    pub fn fingerprint(&self) -> String {
        let store_dir = self
            .store_path
            .rsplit_once('/')
            .map(|(dir, _)| dir)
            .unwrap_or("");
        fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }
}

pub fn fingerprint(
    store_dir: &str,
    store_path: &str,
    nar_hash: &Sha256,
    nar_size: u64,
    reference_base_names: &[String],
) -> String {
    let refs: Vec<String> = reference_base_names
        .iter()
        .map(|r| format!("{store_dir}/{r}"))
        .collect();
    format!("1;{store_path};{nar_hash};{nar_size};{}", refs.join(","))
}

fn parse_u64(field: &'static str, v: &str) -> Result<u64, Error> {
    v.parse().map_err(|_| Error::BadValue {
        field,
        value: v.to_string(),
    })
}

fn parse_hash(field: &'static str, v: &str) -> Result<Sha256, Error> {
    v.parse().map_err(|_| Error::BadValue {
        field,
        value: v.to_string(),
    })
}

impl FromStr for NarInfo {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let mut store_path = None;
        let mut url = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut info = NarInfo {
            store_path: String::new(),
            url: String::new(),
            compression: None,
            file_hash: None,
            file_size: None,
            nar_hash: Sha256([0; 32]),
            nar_size: 0,
            references: Vec::new(),
            deriver: None,
            system: None,
            sigs: Vec::new(),
            ca: None,
            extra: Vec::new(),
        };
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
                "StorePath" => store_path = Some(value.to_string()),
                "URL" => url = Some(value.to_string()),
                "Compression" => info.compression = Some(value.to_string()),
                "FileHash" => info.file_hash = Some(parse_hash("FileHash", value)?),
                "FileSize" => info.file_size = Some(parse_u64("FileSize", value)?),
                "NarHash" => nar_hash = Some(parse_hash("NarHash", value)?),
                "NarSize" => nar_size = Some(parse_u64("NarSize", value)?),
                "References" => {
                    info.references = value.split_whitespace().map(str::to_string).collect()
                }
                "Deriver" if value != "unknown-deriver" => info.deriver = Some(value.to_string()),
                "Deriver" => {}
                "System" => info.system = Some(value.to_string()),
                "Sig" => info.sigs.push(value.to_string()),
                "CA" => info.ca = Some(value.to_string()),
                _ => info.extra.push((key.to_string(), value.to_string())),
            }
        }
        info.store_path = store_path.ok_or(Error::Missing("StorePath"))?;
        info.url = url.ok_or(Error::Missing("URL"))?;
        info.nar_hash = nar_hash.ok_or(Error::Missing("NarHash"))?;
        info.nar_size = nar_size.ok_or(Error::Missing("NarSize"))?;
        Ok(info)
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
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
        writeln!(f, "References: {}", self.references.join(" "))?;
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
            info.deriver.as_deref(),
            Some("0vx0w3yni5b94y2jbjkz2ja6zz70c5fq-probe-c.drv")
        );
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
    }
}
