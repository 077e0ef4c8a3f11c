//! Realisations of content-addressed outputs, asked of Nix in batches: path tasks ask
//! for one output each, and the questions of a 50 ms window (at most [`MAX_BATCH`])
//! become one `nix realisation info` call.
//!
//! ```text
//! path task ─(drv, output)─▶ bounded queue ─▶ window ─▶ drop invalid .drvs ─▶ one Nix call
//!     ▲                                                  (nix-store --check-validity)  │
//!     └──────────────── realisations whose outPath is that output ◀────────────────────┘
//! ```
//! A call that fails (a content-addressed output Nix has no realisation for) is split
//! in halves until the derivation that fails it is alone; that one is reported and
//! answered with none. Answers are never errors: a path without its realisation is
//! still a good cache entry, it is only not found by derivation.
//!
//! A `.drv` root's realisations are asked for by planning, for the whole batch (see
//! [`lookup`]); those that depend on others (a derivation Nix resolved before building
//! it, `dependentRealisations` in the JSON) come with the realisations they depend on,
//! found among those of the derivations in its build closure ([`with_dependencies`]),
//! in the order `nix copy` writes them: each after those it depends on.
//!
//! ```text
//! b.drv ─▶ sha256:43a7…!out ─depends on─▶ sha256:7a7a…!out (of a.drv, an input of b.drv)
//! written: realisations/sha256:7a7a…!out.doi, then realisations/sha256:43a7…!out.doi
//! ```

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use log::warn;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use crate::cache;
use crate::nix::{DrvOutputs, Nix};
use crate::realisation::Realisation;
use crate::store_path::StorePath;

const WINDOW: Duration = Duration::from_millis(50);
const MAX_BATCH: usize = 500;
const QUEUED: usize = 1024;

struct Question {
    drv: StorePath,
    output: StorePath,
    reply: oneshot::Sender<Vec<Realisation>>,
}

/// The way to ask; the batching task ends when this is dropped.
pub(super) struct Realisations {
    tx: mpsc::Sender<Question>,
}

impl Realisations {
    pub(super) fn start(nix: Nix) -> Realisations {
        let (tx, rx) = mpsc::channel(QUEUED);
        tokio::spawn(serve(nix, rx));
        Realisations { tx }
    }

    /// The realisations Nix has whose out path is `output`, an output of `drv`.
    pub(super) async fn of(&self, drv: &StorePath, output: &StorePath) -> Vec<Realisation> {
        let (reply, answer) = oneshot::channel();
        let q = Question {
            drv: drv.clone(),
            output: output.clone(),
            reply,
        };
        if self.tx.send(q).await.is_err() {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

async fn serve(nix: Nix, mut rx: mpsc::Receiver<Question>) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + WINDOW;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(q)) => batch.push(q),
                Ok(None) | Err(_) => break,
            }
        }
        let mut drvs: Vec<StorePath> = batch.iter().map(|q| q.drv.clone()).collect();
        drvs.sort();
        drvs.dedup();
        let mut by_output: HashMap<StorePath, Vec<Realisation>> = HashMap::new();
        for r in lookup(&nix, drvs).await {
            by_output.entry(r.out_path.clone()).or_default().push(r);
        }
        for q in batch {
            let found = by_output.get(&q.output).cloned().unwrap_or_default();
            let _ = q.reply.send(found);
        }
    }
}

/// The realisations Nix has for the outputs of `drvs`, in as few calls as it answers.
/// Derivations no longer in the store (garbage-collected) are left out first.
pub(super) async fn lookup(nix: &Nix, drvs: Vec<StorePath>) -> Vec<Realisation> {
    let invalid = match nix.invalid(&drvs).await {
        Ok(i) => i,
        Err(e) => {
            warn!("cannot look up realisations: {e}");
            return Vec::new();
        }
    };
    let valid = drvs.into_iter().filter(|d| !invalid.contains(d)).collect();
    halves(nix, valid).await
}

fn halves(nix: &Nix, mut drvs: Vec<StorePath>) -> BoxFuture<'_, Vec<Realisation>> {
    Box::pin(async move {
        if drvs.is_empty() {
            return Vec::new();
        }
        match nix.realisations(&drvs).await {
            Ok(r) => r,
            Err(e) if drvs.len() == 1 => {
                let drv = nix.store_dir().display(&drvs[0]);
                warn!("no realisations of {drv}: {e}");
                Vec::new()
            }
            Err(_) => {
                let second = drvs.split_off(drvs.len() / 2);
                let mut found = halves(nix, drvs).await;
                found.extend(halves(nix, second).await);
                found
            }
        }
    })
}

/// Whether `r` realises an output of `drv`: one whose path the derivation fixes, or a
/// floating one, which Nix names after the derivation and the output (`NAME` for
/// `out`, `NAME-OUTPUT` otherwise). `nix realisation info` does not say which
/// derivation asked for which realisation, so two derivations of one name in a batch
/// (an unresolved derivation and its resolved twin) both claim theirs.
pub(super) fn belongs(drv: &StorePath, outputs: &DrvOutputs, r: &Realisation) -> bool {
    if outputs.known.contains(&r.out_path) {
        return true;
    }
    let base = drv.name().strip_suffix(".drv").unwrap_or(drv.name());
    outputs.floating.iter().any(|o| {
        o == r.output()
            && if o == "out" {
                r.out_path.name() == base
            } else {
                r.out_path
                    .name()
                    .strip_prefix(base)
                    .and_then(|rest| rest.strip_prefix('-'))
                    == Some(o.as_str())
            }
    })
}

/// Each derivation's realisations with, before each, those it depends on, as `nix copy`
/// writes them. The realisations depended on are looked up among those of the
/// derivations in the build closures of the derivations that need them (one
/// `nix-store -qR` and one lookup for the whole batch). A realisation whose
/// dependencies cannot all be found, or disagree with what it records, is reported
/// and left out (the outputs are uploaded all the same).
pub(super) async fn with_dependencies(
    nix: &Nix,
    wanted: Vec<(StorePath, Vec<Realisation>)>,
) -> Vec<(StorePath, Vec<Realisation>)> {
    let needing: Vec<StorePath> = wanted
        .iter()
        .filter(|(_, rs)| rs.iter().any(|r| !r.dependent.is_empty()))
        .map(|(d, _)| d.clone())
        .collect();
    if needing.is_empty() {
        return wanted;
    }
    let known: HashMap<String, Realisation> = match nix.derivation_closure(&needing).await {
        Ok(closure) => lookup(nix, closure)
            .await
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect(),
        Err(e) => {
            warn!("cannot look up the realisations that realisations depend on: {e}");
            HashMap::new()
        }
    };
    wanted
        .into_iter()
        .map(|(drv, rs)| {
            let mut ordered = Vec::new();
            let mut seen = HashSet::new();
            for r in rs {
                let mut these = Vec::new();
                match after_dependencies(&r, &known, &mut seen.clone(), &mut these) {
                    Ok(()) => {
                        seen.extend(these.iter().map(|r| r.id.clone()));
                        ordered.extend(these);
                    }
                    Err(why) => warn!(
                        "realisation {} of {} left out: {why}",
                        r.id,
                        nix.store_dir().display(&drv)
                    ),
                }
            }
            (drv, ordered)
        })
        .collect()
}

/// Appends to `out` what `r` depends on (not in `seen`), depth first, then `r`.
fn after_dependencies(
    r: &Realisation,
    known: &HashMap<String, Realisation>,
    seen: &mut HashSet<String>,
    out: &mut Vec<Realisation>,
) -> Result<(), String> {
    if !seen.insert(r.id.clone()) {
        return Ok(());
    }
    for (id, path) in &r.dependent {
        if *id == r.id {
            continue;
        }
        let Some(dep) = known.get(id) else {
            return Err(format!(
                "it depends on {id}, which Nix has no realisation of here"
            ));
        };
        if dep.out_path != *path {
            return Err(format!(
                "it depends on {id} as {path}, which Nix realised as {}",
                dep.out_path
            ));
        }
        after_dependencies(dep, known, seen, out)?;
    }
    out.push(r.clone());
    Ok(())
}

/// Signs and writes `realisations` in order.
pub(super) async fn write(
    shared: &Shared,
    realisations: &[Realisation],
) -> Result<(), cache::Error> {
    for r in realisations {
        let mut r = r.clone();
        r.sign(&shared.cfg.keys);
        shared
            .cache
            .put(
                &r.cache_key(),
                Bytes::from(r.to_string()),
                "application/json",
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realisation(id: &str, path: &str, deps: &[(&str, &str)]) -> Realisation {
        let p = |n: &str| StorePath::from_base_name(n).unwrap();
        Realisation {
            id: format!("sha256:{id}!out"),
            out_path: p(path),
            signatures: Vec::new(),
            dependent: deps
                .iter()
                .map(|(i, d)| (format!("sha256:{i}!out"), p(d)))
                .collect(),
        }
    }

    const A: &str = "4fxyfqnsqhbqijpsrf1sxjdypm9j64y5-ca-a";
    const B: &str = "q3dxyba8mrvjs1x7zqdmd3c2fq8f4zf1-ca-b";
    const C: &str = "0c9sx1sv6pwx1p0fkgzrakqzwjf6vm4p-ca-c";

    #[test]
    fn dependencies_come_first_once_and_broken_ones_are_left_out() {
        let a = realisation("aa", A, &[]);
        let b = realisation("bb", B, &[("aa", A)]);
        let c = realisation("cc", C, &[("bb", B), ("aa", A)]);
        let known: HashMap<String, Realisation> = [&a, &b, &c]
            .into_iter()
            .map(|r| (r.id.clone(), r.clone()))
            .collect();
        let mut out = Vec::new();
        after_dependencies(&c, &known, &mut HashSet::new(), &mut out).unwrap();
        let ids: Vec<&str> = out.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["sha256:aa!out", "sha256:bb!out", "sha256:cc!out"]);

        let missing = realisation("dd", C, &[("ee", A)]);
        let err = after_dependencies(&missing, &known, &mut HashSet::new(), &mut Vec::new());
        assert!(err.unwrap_err().contains("sha256:ee!out"));
        let disagrees = realisation("dd", C, &[("aa", B)]);
        let err = after_dependencies(&disagrees, &known, &mut HashSet::new(), &mut Vec::new());
        assert!(err.unwrap_err().contains("realised as"), "wrong path");
    }

    #[test]
    fn a_floating_output_belongs_to_the_derivation_it_is_named_after() {
        let drv = StorePath::from_base_name("lpnswkkha06z6h7w8v1qwj65s65a5bwb-ca-b.drv").unwrap();
        let floating = DrvOutputs {
            known: Vec::new(),
            floating: vec!["dev".into(), "out".into()],
        };
        assert!(belongs(&drv, &floating, &realisation("bb", B, &[])));
        let mut dev = realisation("bb", "q3dxyba8mrvjs1x7zqdmd3c2fq8f4zf1-ca-b-dev", &[]);
        dev.id = "sha256:bb!dev".into();
        assert!(belongs(&drv, &floating, &dev));
        assert!(!belongs(&drv, &floating, &realisation("aa", A, &[])));
        let known = DrvOutputs {
            known: vec![StorePath::from_base_name(A).unwrap()],
            floating: Vec::new(),
        };
        assert!(belongs(&drv, &known, &realisation("aa", A, &[])));
        assert!(!belongs(&drv, &known, &realisation("bb", B, &[])));
    }
}
