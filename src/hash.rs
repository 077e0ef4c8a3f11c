//! SHA-256 digests in the textual forms Nix uses.
//!
//! Narinfos use `sha256:<nix base-32>`; `nix path-info --json` prints SRI
//! (`sha256-<base64>`) from Nix 2.4 on and `sha256:<base-32>` before; hex appears in
//! `nix-store --dump-db`. [`Sha256`] parses all three and prints the narinfo form.

use std::fmt;
use std::str::FromStr;

use base64::Engine;

use crate::nixbase32;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid sha256 hash {0:?}")]
pub struct Error(String);

impl Sha256 {
    pub fn to_nix32(&self) -> String {
        nixbase32::encode(&self.0)
    }

    pub fn to_sri(&self) -> String {
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    fn from_digest(digest: &str) -> Option<[u8; 32]> {
        let bytes = match digest.len() {
            52 => nixbase32::decode(digest, 32).ok()?,
            64 => (0..64)
                .step_by(2)
                .map(|i| u8::from_str_radix(digest.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?,
            44 => base64::engine::general_purpose::STANDARD
                .decode(digest)
                .ok()?,
            _ => return None,
        };
        bytes.try_into().ok()
    }
}

impl FromStr for Sha256 {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let digest = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("sha256-"))
            .ok_or_else(|| Error(s.to_string()))?;
        Self::from_digest(digest)
            .map(Sha256)
            .ok_or_else(|| Error(s.to_string()))
    }
}

/// The narinfo form, `sha256:<nix base-32>`.
impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_alike() {
        // The same NarHash as `nix path-info --json` (SRI) and a nix copy narinfo (base-32) print it.
        let sri: Sha256 = "sha256-x6RJjavp3QTQj5KzwAGvTSQ3CIAsINaaSMWJvJsFvQY="
            .parse()
            .unwrap();
        let b32: Sha256 = "sha256:01mx0ndvr2f592ddc81ch043f92dmw0w1cwjiz809pg9mf6lk967"
            .parse()
            .unwrap();
        assert_eq!(sri, b32);
        let hex: Sha256 = format!(
            "sha256:{}",
            sri.0.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
        .parse()
        .unwrap();
        assert_eq!(hex, sri);
        assert_eq!(
            b32.to_string(),
            "sha256:01mx0ndvr2f592ddc81ch043f92dmw0w1cwjiz809pg9mf6lk967"
        );
        assert_eq!(
            b32.to_sri(),
            "sha256-x6RJjavp3QTQj5KzwAGvTSQ3CIAsINaaSMWJvJsFvQY="
        );
    }

    #[test]
    fn rejects_other_algorithms_and_lengths() {
        assert!("sha512:abc".parse::<Sha256>().is_err());
        assert!("sha256:0123".parse::<Sha256>().is_err());
        assert!("01mx0ndvr2f592ddc81ch043f92dmw0w1cwjiz809pg9mf6lk967"
            .parse::<Sha256>()
            .is_err());
    }
}
