//! Realisations: which store path an output of a content-addressed derivation was
//! built into, so that another machine can substitute it without building. A binary
//! cache keeps one per output as `realisations/<id>.doi`, one line of JSON:
//! ```text
//! {"dependentRealisations":{},"id":"sha256:586e…5c!out","outPath":"q3dx…-ca-b-1","signatures":["cache-1:…"]}
//! ```
//! The id is the derivation's hash modulo (SHA-256, hex, `sha256:` prefix) and the
//! output name. As Nix 2.8 writes it (`Realisation::toJSON` in
//! src/libstore/realisation.cc, `BinaryCacheStore::registerDrvOutput`): nlohmann's
//! compact dump, keys in byte order, `outPath` without the store directory,
//! signatures a sorted set. A signature is over the same JSON without `signatures`
//! (`Realisation::fingerprint`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::signing::SecretKey;
use crate::store_path::StorePath;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realisation {
    /// `<hash>!<output name>`.
    pub id: String,
    pub out_path: StorePath,
    /// Sorted, without duplicates.
    pub signatures: Vec<String>,
    /// Realisations of the inputs this one was built from, by id.
    pub dependent: BTreeMap<String, StorePath>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("realisation is not valid JSON of its kind: {0}")]
    Json(String),
    #[error("realisation id {0:?} is not <hash>!<output>")]
    BadId(String),
    #[error("realisation out path {0:?}: {1}")]
    BadPath(String, String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    id: String,
    out_path: String,
    #[serde(default)]
    signatures: Vec<String>,
    #[serde(default)]
    dependent_realisations: BTreeMap<String, String>,
}

/// `<algorithm>:<hash>!<output>`, nothing that could leave the realisations/ folder.
fn check_id(id: &str) -> Result<(), Error> {
    let ok = id.split_once('!').is_some_and(|(hash, output)| {
        hash.split_once(':').is_some_and(|(algo, digest)| {
            !algo.is_empty()
                && !digest.is_empty()
                && (algo.bytes().chain(digest.bytes())).all(|b| b.is_ascii_alphanumeric())
        }) && !output.is_empty()
            && output
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
            && !output.starts_with('.')
    });
    if ok {
        Ok(())
    } else {
        Err(Error::BadId(id.to_string()))
    }
}

fn path(p: &str) -> Result<StorePath, Error> {
    StorePath::from_base_name(p).map_err(|e| Error::BadPath(p.to_string(), e.to_string()))
}

impl Realisation {
    /// From one object of `nix realisation info --json` or a `.doi` file.
    pub fn from_json(v: serde_json::Value) -> Result<Realisation, Error> {
        let raw: Raw = serde_json::from_value(v).map_err(|e| Error::Json(e.to_string()))?;
        check_id(&raw.id)?;
        let mut dependent = BTreeMap::new();
        for (id, p) in raw.dependent_realisations {
            check_id(&id)?;
            dependent.insert(id, path(&p)?);
        }
        let mut signatures = raw.signatures;
        signatures.sort();
        signatures.dedup();
        Ok(Realisation {
            id: raw.id,
            out_path: path(&raw.out_path)?,
            signatures,
            dependent,
        })
    }

    /// The output's name (`out`, `dev`…), the part of the id after `!`.
    pub fn output(&self) -> &str {
        self.id.rsplit_once('!').map_or("", |(_, o)| o)
    }

    /// The object name in a binary cache.
    pub fn cache_key(&self) -> String {
        format!("realisations/{}.doi", self.id)
    }

    fn json(&self, with_signatures: bool) -> serde_json::Value {
        // serde_json's maps are ordered by key, as nlohmann's are.
        let mut v = serde_json::json!({
            "dependentRealisations": self
                .dependent
                .iter()
                .map(|(id, p)| (id.clone(), serde_json::Value::from(p.to_string())))
                .collect::<serde_json::Map<_, _>>(),
            "id": self.id,
            "outPath": self.out_path.to_string(),
        });
        if with_signatures {
            v["signatures"] = serde_json::json!(self.signatures);
        }
        v
    }

    /// What a signature signs.
    pub fn fingerprint(&self) -> String {
        self.json(false).to_string()
    }

    /// Adds a signature by each key (replacing one by a key of the same name).
    pub fn sign(&mut self, keys: &[SecretKey]) {
        let fingerprint = self.fingerprint();
        for key in keys {
            let prefix = format!("{}:", key.name());
            self.signatures.retain(|s| !s.starts_with(&prefix));
            self.signatures.push(key.sign(&fingerprint));
        }
        self.signatures.sort();
        self.signatures.dedup();
    }
}

impl fmt::Display for Realisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.json(true))
    }
}

impl FromStr for Realisation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Realisation::from_json(serde_json::from_str(s).map_err(|e| Error::Json(e.to_string()))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `nix copy --to file://… --file ca.nix` (Nix 2.8.0, ca-derivations).
    const WITH_DEPENDENT: &str = r#"{"dependentRealisations":{"sha256:7a7aec33ea551ced8fd7732995fcd65d206df02a1f9682f13e49c49768af4c34!out":"4fxyfqnsqhbqijpsrf1sxjdypm9j64y5-ca-a-1"},"id":"sha256:43a7655a4f244318c8c5dfc3c92dc2173fcd09db83f6604b4e2a9b5eea30dc26!out","outPath":"q3dxyba8mrvjs1x7zqdmd3c2fq8f4zf1-ca-b-1","signatures":[]}"#;
    const LEAF: &str = r#"{"dependentRealisations":{},"id":"sha256:7a7aec33ea551ced8fd7732995fcd65d206df02a1f9682f13e49c49768af4c34!out","outPath":"4fxyfqnsqhbqijpsrf1sxjdypm9j64y5-ca-a-1","signatures":[]}"#;

    #[test]
    fn round_trips_what_nix_wrote() {
        for text in [WITH_DEPENDENT, LEAF] {
            let r: Realisation = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
        }
        let r: Realisation = LEAF.parse().unwrap();
        assert_eq!(r.output(), "out");
        assert_eq!(
            r.cache_key(),
            "realisations/sha256:7a7aec33ea551ced8fd7732995fcd65d206df02a1f9682f13e49c49768af4c34!out.doi"
        );
    }

    #[test]
    fn signs_the_json_without_signatures() {
        let key: SecretKey = "test1:r24vQqTnkATLONjgTaM8aV7fa8eXJyaoyvEZXPKB8pUeYGoppkkXqZu/Sa5bm0UGNTBDygnOi6lW5aKp+Z9JWQ==".parse().unwrap();
        let mut r: Realisation = LEAF.parse().unwrap();
        r.signatures = vec!["test1:stale".into(), "other:keep".into()];
        r.sign(std::slice::from_ref(&key));
        assert_eq!(r.signatures.len(), 2);
        assert_eq!(r.signatures[0], "other:keep");
        let fingerprint = r#"{"dependentRealisations":{},"id":"sha256:7a7aec33ea551ced8fd7732995fcd65d206df02a1f9682f13e49c49768af4c34!out","outPath":"4fxyfqnsqhbqijpsrf1sxjdypm9j64y5-ca-a-1"}"#;
        assert_eq!(r.fingerprint(), fingerprint);
        assert!(key.public_key().verifies(fingerprint, &r.signatures[1]));
    }

    #[test]
    fn ids_that_could_leave_the_folder_are_refused() {
        for id in [
            "../x!out",
            "sha256:ab!../out",
            "sha256:ab",
            "sha256:a/b!out",
            "!out",
        ] {
            let text = LEAF.replace(
                "sha256:7a7aec33ea551ced8fd7732995fcd65d206df02a1f9682f13e49c49768af4c34!out",
                id,
            );
            assert!(text.parse::<Realisation>().is_err(), "{id}");
        }
    }
}
