//! Ed25519 keys in Nix's format and narinfo signatures.
//!
//! `nix-store --generate-binary-cache-key NAME sk pk` writes `NAME:base64(64 bytes)`
//! (seed then public key) and `NAME:base64(32 bytes)`. A signature is
//! `NAME:base64(64 bytes)` over a narinfo's fingerprint (see [`crate::narinfo`]).
//! [`key_file_exposure`] judges a secret key file's mode bits (0644 exposes the key).

use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("key has no \"name:\" prefix")]
    NoName,
    #[error("key {0:?} is not valid base64")]
    Base64(String),
    #[error("key {name:?} has {got} bytes, want {want}")]
    Length {
        name: String,
        got: usize,
        want: usize,
    },
    #[error("secret key {0:?} does not match its embedded public key")]
    Mismatch(String),
}

fn split(s: &str) -> Result<(&str, Vec<u8>), Error> {
    let (name, data) = s.trim().split_once(':').ok_or(Error::NoName)?;
    if name.is_empty() {
        return Err(Error::NoName);
    }
    let bytes = B64
        .decode(data)
        .map_err(|_| Error::Base64(name.to_string()))?;
    Ok((name, bytes))
}

pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.name)
    }
}

impl FromStr for SecretKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let (name, bytes) = split(s)?;
        let arr: [u8; 64] = bytes.as_slice().try_into().map_err(|_| Error::Length {
            name: name.to_string(),
            got: bytes.len(),
            want: 64,
        })?;
        let key =
            SigningKey::from_keypair_bytes(&arr).map_err(|_| Error::Mismatch(name.to_string()))?;
        Ok(SecretKey {
            name: name.to_string(),
            key,
        })
    }
}

impl SecretKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `NAME:base64(signature)` over `fingerprint`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let sig = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, B64.encode(sig.to_bytes()))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl FromStr for PublicKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let (name, bytes) = split(s)?;
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| Error::Length {
            name: name.to_string(),
            got: bytes.len(),
            want: 32,
        })?;
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| Error::Base64(name.to_string()))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (`NAME:base64`) is this key's valid signature of `fingerprint`.
    pub fn verifies(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, data)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = B64.decode(data) else {
            return false;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
            return false;
        };
        self.key.verify(fingerprint.as_bytes(), &sig).is_ok()
    }
}

/// What is wrong with a secret key file's permission bits: users other than its owner
/// may read it (and sign as the cache) or write it (and swap the key). Shown as
/// `readable by group and others (mode 0644)`; `chmod 600` cures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExposedKeyFile {
    mode: u32,
}

/// Checks a secret key file's mode (`st_mode`, or its permission bits alone): `None`
/// when only its owner may read or write it. Execute bits expose nothing.
pub fn key_file_exposure(mode: u32) -> Option<ExposedKeyFile> {
    (mode & 0o066 != 0).then_some(ExposedKeyFile {
        mode: mode & 0o7777,
    })
}

impl std::fmt::Display for ExposedKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = |group: u32, others: u32| match (self.mode & group != 0, self.mode & others != 0)
        {
            (true, true) => Some("group and others"),
            (true, false) => Some("group"),
            (false, true) => Some("others"),
            (false, false) => None,
        };
        let access: Vec<String> = [
            ("readable", who(0o040, 0o004)),
            ("writable", who(0o020, 0o002)),
        ]
        .into_iter()
        .filter_map(|(what, who)| who.map(|who| format!("{what} by {who}")))
        .collect();
        write!(f, "{} (mode {:04o})", access.join(", "), self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix-store --generate-binary-cache-key test1 sk pk` (Nix 2.8).
    const SK: &str = "test1:r24vQqTnkATLONjgTaM8aV7fa8eXJyaoyvEZXPKB8pUeYGoppkkXqZu/Sa5bm0UGNTBDygnOi6lW5aKp+Z9JWQ==";
    const PK: &str = "test1:HmBqKaZJF6mbv0muW5tFBjUwQ8oJzoupVuWiqfmfSVk=";
    // `nix store sign --key-file sk` on that path, read back with `nix path-info --json`.
    const FP: &str = "1;/nix/store/xav0pws0268idny9wi60ylqqiyryzfz6-probe-c;\
        sha256:01mx0ndvr2f592ddc81ch043f92dmw0w1cwjiz809pg9mf6lk967;224;\
        /nix/store/9ngqiqshf9l3pfc47n2pgw5z7w61rc18-probe-b,\
        /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a";
    const NIX_SIG: &str = "test1:1dgAqbjIsF+DqYFaEx1C9OQLpGN97e3abPX4wNFSXF4b+FDnWH92GcsaxM/T5dA/99sevtdkXfwuWRMbUdK3Aw==";

    #[test]
    fn parses_nix_keys_and_signs_like_nix() {
        let sk: SecretKey = SK.parse().unwrap();
        assert_eq!(sk.name(), "test1");
        assert_eq!(sk.public_key().to_string(), PK);
        // Ed25519 is deterministic: same key, same message, same signature as Nix's.
        assert_eq!(sk.sign(FP), NIX_SIG);
        let pk: PublicKey = PK.parse().unwrap();
        assert!(pk.verifies(FP, NIX_SIG));
        assert!(!pk.verifies(&FP.replace("224", "225"), NIX_SIG));
        assert!(!pk.verifies(FP, &NIX_SIG.replace("test1:", "other:")));
    }

    #[test]
    fn key_files_open_to_group_or_others_are_exposed() {
        let shown = |mode| key_file_exposure(mode).map(|e| e.to_string());
        for private in [0o600, 0o400, 0o700, 0o611, 0o100600, 0o000] {
            assert_eq!(shown(private), None, "{private:o}");
        }
        // A key copied into place under the usual umask 022; st_mode includes the file
        // type, which is not shown.
        assert_eq!(
            shown(0o100644).as_deref(),
            Some("readable by group and others (mode 0644)")
        );
        assert_eq!(
            shown(0o640).as_deref(),
            Some("readable by group (mode 0640)")
        );
        assert_eq!(
            shown(0o604).as_deref(),
            Some("readable by others (mode 0604)")
        );
        assert_eq!(
            shown(0o620).as_deref(),
            Some("writable by group (mode 0620)")
        );
        assert_eq!(
            shown(0o2666).as_deref(),
            Some("readable by group and others, writable by group and others (mode 2666)")
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!("nocolon".parse::<SecretKey>().unwrap_err(), Error::NoName);
        assert!(matches!(
            PK.parse::<SecretKey>().unwrap_err(),
            Error::Length {
                want: 64,
                got: 32,
                ..
            }
        ));
        assert!(matches!(
            "k:!!!".parse::<SecretKey>().unwrap_err(),
            Error::Base64(_)
        ));
        // A secret key whose public half was altered.
        let mut bytes = B64.decode(SK.split_once(':').unwrap().1).unwrap();
        bytes[40] ^= 1;
        let tampered = format!("test1:{}", B64.encode(&bytes));
        assert!(matches!(
            tampered.parse::<SecretKey>().unwrap_err(),
            Error::Mismatch(_)
        ));
    }
}
