//! `upload verify`: walk a cache and report every narinfo Nix would trip over.
//!
//! For each `<hash>.narinfo` at the cache root: it parses and names a store path with
//! that hash; its NAR exists with the size it claims (`FileSize`); every reference has
//! a narinfo; and, when trusted keys are given, one of its signatures verifies with one
//! of them. Broken entries are listed, one line each. NAR contents are not downloaded.
//!
//! A reference without a narinfo here may live upstream (narpipe does not push what
//! upstream serves): with upstream caches given, it is looked up there and broken only
//! if they lack it too; without, it is counted apart as "missing (upstream?)".

use std::collections::HashSet;

use futures::StreamExt;

use crate::cache::{self, Cache};
use crate::narinfo::NarInfo;
use crate::signing::PublicKey;
use crate::store_path::StorePath;
use crate::upstream::Upstream;

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
    /// References with no narinfo here, not looked up upstream (none given).
    pub maybe_upstream: Vec<Problem>,
    /// References found in an upstream cache.
    pub upstream: usize,
}

impl Report {
    /// A line per problem, `BROKEN` ones then `MISSING (upstream?)` ones: what
    /// `upload verify` prints.
    pub fn lines(&self) -> String {
        self.problems
            .iter()
            .map(|p| format!("BROKEN {p}\n"))
            .chain(
                self.maybe_upstream
                    .iter()
                    .map(|p| format!("MISSING (upstream?) {p}\n")),
            )
            .collect()
    }

    /// The closing line about `url`: how many narinfos are broken, how many references
    /// upstream serves (with `upstream_given`) or may serve (without), and whether
    /// signatures went unchecked (without `keys_given`).
    pub fn summary(&self, url: &str, upstream_given: bool, keys_given: bool) -> String {
        let broken: HashSet<&str> = self.problems.iter().map(|p| p.narinfo.as_str()).collect();
        let elsewhere = if upstream_given {
            format!(", {} references served upstream", self.upstream)
        } else if !self.maybe_upstream.is_empty() {
            format!(
                ", {} references missing (upstream? give --upstream to check)",
                self.maybe_upstream.len()
            )
        } else {
            String::new()
        };
        format!(
            "checked {} narinfos in {url}: {} broken, {} problems{elsewhere}{}",
            self.checked,
            broken.len(),
            self.problems.len(),
            if keys_given {
                ""
            } else {
                " (signatures not checked: no --trusted-public-key)"
            }
        )
    }
}

pub async fn verify(
    cache: &Cache,
    trusted: &[PublicKey],
    upstream: &Upstream,
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
        ..Report::default()
    };
    let mut absent: Vec<(String, StorePath)> = Vec::new();
    for c in checks {
        let (problems, missing) = c?;
        report.problems.extend(problems);
        absent.extend(missing);
    }
    // References absent here: upstream's, or broken.
    if upstream.caches.is_empty() {
        report.maybe_upstream = absent
            .into_iter()
            .map(|(narinfo, r)| Problem {
                narinfo,
                what: format!("reference {r} has no narinfo (upstream?)"),
            })
            .collect();
    } else {
        let mut unique: Vec<&StorePath> = absent.iter().map(|(_, r)| r).collect();
        unique.sort();
        unique.dedup();
        let found = futures::stream::iter(
            unique
                .into_iter()
                .map(|r| async move { upstream.has(r).await.map(|s| (r.clone(), s.is_some())) }),
        )
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
        let mut there = HashSet::new();
        for f in found {
            let (r, yes) = f?;
            if yes {
                there.insert(r);
            }
        }
        report.upstream = there.len();
        for (narinfo, r) in absent {
            if !there.contains(&r) {
                report.problems.push(Problem {
                    narinfo,
                    what: format!("reference {r} has no narinfo here or upstream"),
                });
            }
        }
    }
    report
        .problems
        .sort_by(|a, b| (&a.narinfo, &a.what).cmp(&(&b.narinfo, &b.what)));
    Ok(report)
}

/// The problems of one narinfo, and its references that have no narinfo here.
async fn check(
    cache: &Cache,
    name: &str,
    present: &HashSet<String>,
    trusted: &[PublicKey],
) -> Result<(Vec<Problem>, Vec<(String, StorePath)>), cache::Error> {
    let mut problems = Vec::new();
    let mut say = |what: String| {
        problems.push(Problem {
            narinfo: name.to_string(),
            what,
        })
    };
    let Some(text) = cache.get(name).await? else {
        say("vanished while being checked".into());
        return Ok((problems, Vec::new()));
    };
    let info: NarInfo = match String::from_utf8_lossy(&text).parse() {
        Ok(i) => i,
        Err(e) => {
            say(format!("does not parse: {e}"));
            return Ok((problems, Vec::new()));
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
    let absent: Vec<(String, StorePath)> = info
        .references
        .iter()
        .filter(|r| !present.contains(r.hash_part()))
        .map(|r| (name.to_string(), r.clone()))
        .collect();
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
    Ok((problems, absent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(narinfo: &str, what: &str) -> Problem {
        Problem {
            narinfo: narinfo.into(),
            what: what.into(),
        }
    }

    #[test]
    fn the_report_lists_problems_and_counts_broken_narinfos_once() {
        let report = Report {
            checked: 10,
            problems: vec![
                problem("a.narinfo", "NAR nar/x.nar.zst is missing"),
                problem("a.narinfo", "no signature verifies"),
            ],
            maybe_upstream: vec![problem("b.narinfo", "reference c has no narinfo")],
            upstream: 0,
        };
        assert_eq!(
            report.lines(),
            "BROKEN a.narinfo: NAR nar/x.nar.zst is missing\n\
             BROKEN a.narinfo: no signature verifies\n\
             MISSING (upstream?) b.narinfo: reference c has no narinfo\n"
        );
        assert_eq!(
            report.summary("file:///c", false, true),
            "checked 10 narinfos in file:///c: 1 broken, 2 problems, 1 references missing \
             (upstream? give --upstream to check)"
        );
        assert_eq!(
            report.summary("file:///c", true, false),
            "checked 10 narinfos in file:///c: 1 broken, 2 problems, 0 references served \
             upstream (signatures not checked: no --trusted-public-key)"
        );
    }
}
