//! `upload verify`: walk a cache and report every narinfo Nix would trip over.
//!
//! For each `<hash>.narinfo` at the cache root: it parses and names a store path with
//! that hash; its NAR exists with the size it claims (`FileSize`); every reference has
//! a narinfo; and, when trusted keys are given, one of its signatures verifies with one
//! of them. Broken entries are listed, one line each. NAR contents are not downloaded.

use std::collections::HashSet;

use futures::StreamExt;

use crate::cache::{self, Cache};
use crate::narinfo::NarInfo;
use crate::signing::PublicKey;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub narinfo: String,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.narinfo, self.what)
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub checked: usize,
    pub problems: Vec<Problem>,
}

pub async fn verify(
    cache: &Cache,
    trusted: &[PublicKey],
    concurrency: usize,
) -> Result<Report, cache::Error> {
    let names = cache.list_root().await?;
    let narinfos: Vec<String> = names
        .into_iter()
        .filter(|n| n.ends_with(".narinfo"))
        .collect();
    let present: HashSet<String> = narinfos
        .iter()
        .map(|n| n.trim_end_matches(".narinfo").to_string())
        .collect();
    let checks = futures::stream::iter(
        narinfos
            .iter()
            .map(|name| check(cache, name, &present, trusted)),
    )
    .buffer_unordered(concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    let mut report = Report {
        checked: narinfos.len(),
        problems: Vec::new(),
    };
    for c in checks {
        report.problems.extend(c?);
    }
    report
        .problems
        .sort_by(|a, b| (&a.narinfo, &a.what).cmp(&(&b.narinfo, &b.what)));
    Ok(report)
}

async fn check(
    cache: &Cache,
    name: &str,
    present: &HashSet<String>,
    trusted: &[PublicKey],
) -> Result<Vec<Problem>, cache::Error> {
    let mut problems = Vec::new();
    let mut say = |what: String| {
        problems.push(Problem {
            narinfo: name.to_string(),
            what,
        })
    };
    let Some(text) = cache.get(name).await? else {
        say("vanished while being checked".into());
        return Ok(problems);
    };
    let info: NarInfo = match String::from_utf8_lossy(&text).parse() {
        Ok(i) => i,
        Err(e) => {
            say(format!("does not parse: {e}"));
            return Ok(problems);
        }
    };
    let hash = name.trim_end_matches(".narinfo");
    if info.path.hash_part() != hash {
        say(format!(
            "describes {}, not a path with hash {hash}",
            info.store_path()
        ));
    }
    match cache.size(&info.url).await? {
        None => say(format!("its NAR {} is missing", info.url)),
        Some(size) => {
            if let Some(want) = info.file_size {
                if size != want {
                    say(format!(
                        "its NAR {} has {size} bytes, FileSize says {want}",
                        info.url
                    ));
                }
            }
        }
    }
    for r in &info.references {
        if !present.contains(r.hash_part()) {
            say(format!("reference {r} has no narinfo"));
        }
    }
    if !trusted.is_empty() {
        let fp = info.fingerprint();
        if !info
            .sigs
            .iter()
            .any(|sig| trusted.iter().any(|k| k.verifies(&fp, sig)))
        {
            say(format!(
                "no signature verifies with a trusted key ({} signatures: {})",
                info.sigs.len(),
                info.sigs
                    .iter()
                    .map(|s| s.split(':').next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(problems)
}
