//! What upstream already serves, so that it is not pushed again.
//!
//! Two ways to know, cheapest first:
//! ```text
//! Sig: cache.nixos.org-1:…     the store holds an upstream signature for the path
//!                              (Nix keeps the signatures of what it substituted): free
//! HEAD <upstream>/<hash>.narinfo   an --upstream cache has it: one request, remembered
//! ```
//! A path upstream serves ends its branch of the closure like a path already in our
//! cache: upstream keeps its own closure complete, so its references are there too.
//! Such a path is neither uploaded nor a failure; our cache then holds narinfos whose
//! references live upstream, which Nix accepts when both caches are substituters.

use crate::cache::{self, Cache};
use crate::store_path::StorePath;

/// The key a path is signed with when it came from cache.nixos.org.
pub const DEFAULT_KEY: &str = "cache.nixos.org-1";

/// Where upstream paths are recognised. `Upstream::default()` recognises none.
#[derive(Debug, Default, Clone)]
pub struct Upstream {
    /// Names of upstream signing keys (the part before `:` in `Sig:`).
    pub keys: Vec<String>,
    /// Caches asked for a path's narinfo.
    pub caches: Vec<Cache>,
}

/// Why a path counts as served upstream, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The store holds a signature by this upstream key.
    SignedBy(String),
    /// This upstream cache has its narinfo.
    In(String),
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Served::SignedBy(key) => write!(f, "signed by upstream key {key}"),
            Served::In(url) => write!(f, "{url} has it"),
        }
    }
}

impl Upstream {
    pub fn is_off(&self) -> bool {
        self.keys.is_empty() && self.caches.is_empty()
    }

    /// The upstream key among `sigs` (`NAME:base64` each), if any.
    pub fn signed_by(&self, sigs: &[String]) -> Option<Served> {
        sigs.iter().find_map(|sig| {
            let name = sig.split_once(':')?.0;
            self.keys
                .iter()
                .any(|k| k == name)
                .then(|| Served::SignedBy(name.to_string()))
        })
    }

    /// Checks at start that every upstream cache answers (few retries): one that does not
    /// would make every path wait. One without nix-cache-info is named in the result.
    pub async fn check(&self) -> Result<Vec<String>, cache::Error> {
        let mut odd = Vec::new();
        for c in &self.caches {
            if c.probe()?.get("nix-cache-info").await?.is_none() {
                odd.push(c.url().to_string());
            }
        }
        Ok(odd)
    }

    /// The first upstream cache that has `p`'s narinfo, asked in order.
    pub async fn has(&self, p: &StorePath) -> Result<Option<Served>, cache::Error> {
        self.has_counting(p, &mut 0).await
    }

    /// [`Upstream::has`], adding the requests it made to `requests`.
    pub async fn has_counting(
        &self,
        p: &StorePath,
        requests: &mut u64,
    ) -> Result<Option<Served>, cache::Error> {
        for c in &self.caches {
            *requests += 1;
            if c.exists(&cache::narinfo_key(p)).await? {
                return Ok(Some(Served::In(c.url().to_string())));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_by_an_upstream_key_name_counts_others_do_not() {
        let up = Upstream {
            keys: vec![DEFAULT_KEY.into(), "mirror-1".into()],
            caches: Vec::new(),
        };
        let sigs = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            up.signed_by(&sigs(&["ours:abc", "cache.nixos.org-1:xyz"])),
            Some(Served::SignedBy(DEFAULT_KEY.into()))
        );
        assert_eq!(up.signed_by(&sigs(&["ours:abc"])), None);
        // The name must match whole: a prefix is another key.
        assert_eq!(
            up.signed_by(&sigs(&["cache.nixos.org-10:xyz", "mirror:q"])),
            None
        );
        assert_eq!(up.signed_by(&sigs(&["garbage"])), None);
        assert!(Upstream::default()
            .signed_by(&sigs(&["cache.nixos.org-1:x"]))
            .is_none());
        assert!(Upstream::default().is_off() && !up.is_off());
    }
}
