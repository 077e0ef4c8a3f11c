//! Plan: a batch of roots (see [`super::batch`]) becomes the paths the cache lacks,
//! level by level, and a task for each (see [`super::tasks`]). The cache is asked about
//! each path once (see [`super::presence`]) and Nix only about paths not known yet, so
//! planning costs work linear in the number of new paths.
//!
//! ```text
//! roots ─▶ in the cache? ─▶ valid? ─▶ .drv → outputs ─▶ closure (new paths only,
//!          (skip: closure   (gone)                       level by level) ─▶ filter ─▶ tasks
//!           is there too)
//! ```
//! A `.drv` root's outputs are those its derivation names and, for floating
//! content-addressed ones, those its realisations name (see [`super::outputs`]); with
//! `write_realisations` the root also carries its realisations (see
//! [`super::realise`]), written once its outputs are in the cache (see
//! [`super::retry`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use log::{debug, info, warn};

use super::outputs::{build_deps, drv_outputs, Built};
use super::presence::{presence, skip_upstream};
use super::retry::RootOutcome;
use super::tasks::{spawn_closure, Tasks};
use super::{Error, Shared};
use crate::nix::PathInfo;
use crate::realisation::Realisation;
use crate::store_path::StorePath;

/// Resolves a batch of roots to the paths the cache lacks, starts their tasks, and says
/// what each root now waits for.
pub(super) async fn batch(
    shared: &Arc<Shared>,
    roots: Vec<StorePath>,
    tasks: &mut Tasks,
) -> Vec<(StorePath, RootOutcome)> {
    if !shared.cache.is_prepared() {
        // It could not be reached at start (see super::prepare).
        let cfg = &shared.cfg;
        if let Err(e) = shared
            .cache
            .prepare(cfg.store_dir.as_str(), cfg.priority)
            .await
        {
            let reason = e.to_string();
            return roots
                .into_iter()
                .map(|p| (p, RootOutcome::Failed(reason.clone())))
                .collect();
        }
    }
    let mut outcomes = Vec::new();
    let (drvs, mut paths): (Vec<_>, Vec<_>) = roots.into_iter().partition(|p| p.is_derivation());
    if shared.cfg.include_build_deps {
        match build_deps(shared, &paths, &drvs).await {
            Ok(extra) => {
                let known: HashSet<StorePath> = paths.iter().cloned().collect();
                paths.extend(extra.into_iter().filter(|p| !known.contains(p)));
            }
            Err(e) => {
                let reason = format!("cannot list build-time dependencies: {e}");
                return drvs
                    .into_iter()
                    .chain(paths)
                    .map(|p| (p, RootOutcome::Failed(reason.clone())))
                    .collect();
            }
        }
    }

    // A root whose narinfo exists has its whole closure in the cache (the invariant
    // we keep, and that `nix copy` keeps): no need to ask Nix about it.
    let unknown = paths.iter().filter(|p| !shared.known_present(p)).count();
    shared.consider_listing(unknown).await;
    let mut missing = Vec::new();
    for (p, present) in presence(shared, paths).await {
        match present {
            Ok(true) => {
                if shared.state.lock().unwrap().upstream.contains(&p) {
                    info!("skipped {} (served upstream)", shared.show(&p));
                } else {
                    shared.stats.skipped.fetch_add(1, Relaxed);
                    // Counted in the summary: a re-run of a large closure would
                    // otherwise print a line per path.
                    debug!("skipped {} (already in the cache)", shared.show(&p));
                }
                outcomes.push((p, RootOutcome::Done));
            }
            Ok(false) => missing.push(p),
            Err(e) => outcomes.push((p, RootOutcome::Failed(e.to_string()))),
        }
    }
    // Path info for the roots comes with their validity: one Nix call in the usual case
    // where all are valid (see Nix::valid_path_infos). Roots under way need neither.
    let ask: Vec<StorePath> = missing
        .iter()
        .filter(|p| !shared.is_known(p))
        .cloned()
        .collect();
    let (root_infos, mut invalid) = match shared.nix.valid_path_infos(&ask).await {
        Ok(found) => found,
        Err(e) => {
            let reason = e.to_string();
            outcomes.extend(
                missing
                    .into_iter()
                    .chain(drvs)
                    .map(|p| (p, RootOutcome::Failed(reason.clone()))),
            );
            return outcomes;
        }
    };
    if !drvs.is_empty() {
        match shared.nix.invalid(&drvs).await {
            Ok(more) => invalid.extend(more),
            Err(e) => {
                let reason = e.to_string();
                outcomes.extend(
                    drvs.into_iter()
                        .map(|p| (p, RootOutcome::Failed(reason.clone()))),
                );
                return outcomes;
            }
        }
    }
    for p in invalid.iter() {
        outcomes.push((
            p.clone(),
            RootOutcome::Gone(
                "not a valid path in the store (not built, not registered, or garbage-collected)"
                    .into(),
            ),
        ));
    }
    missing.retain(|p| !invalid.contains(p));
    let valid_drvs: Vec<StorePath> = drvs.into_iter().filter(|p| !invalid.contains(p)).collect();
    // The path roots, each waiting for itself (also when it is a .drv root's output).
    let path_roots = missing.clone();
    // For each .drv root, the outputs it waits for and the realisations it writes then.
    let mut drv_targets: Vec<(StorePath, Vec<StorePath>, Vec<Realisation>)> = Vec::new();
    match drv_outputs(shared, &valid_drvs).await {
        Err(e) => {
            let reason = e.to_string();
            outcomes.extend(
                valid_drvs
                    .into_iter()
                    .map(|d| (d, RootOutcome::Failed(reason.clone()))),
            );
        }
        Ok(built) => {
            let all: Vec<StorePath> = built.iter().flat_map(|b| b.outputs.clone()).collect();
            let present: HashMap<StorePath, Result<bool, String>> = presence(shared, all)
                .await
                .into_iter()
                .map(|(p, r)| (p, r.map_err(|e| e.to_string())))
                .collect();
            for Built {
                drv,
                outputs,
                realisations,
            } in built
            {
                if outputs.is_empty() {
                    outcomes.push((
                        drv,
                        RootOutcome::Gone("none of its outputs is built".into()),
                    ));
                    continue;
                }
                let mut absent = Vec::new();
                let mut failure = None;
                for o in outputs {
                    match &present[&o] {
                        Ok(true) => {}
                        Ok(false) => absent.push(o),
                        Err(e) => failure = Some(e.clone()),
                    }
                }
                if let Some(reason) = failure {
                    outcomes.push((drv, RootOutcome::Failed(reason)));
                } else if absent.is_empty() {
                    if realisations.is_empty() {
                        shared.stats.skipped.fetch_add(1, Relaxed);
                        info!(
                            "skipped {} (its outputs are in the cache)",
                            shared.show(&drv)
                        );
                        outcomes.push((drv, RootOutcome::Done));
                    } else {
                        // Counted skipped once they are written (see retry).
                        outcomes.push((drv, RootOutcome::Wait(Vec::new(), realisations)));
                    }
                } else {
                    missing.extend(absent.iter().cloned());
                    drv_targets.push((drv, absent, realisations));
                }
            }
        }
    }
    if missing.is_empty() {
        return outcomes;
    }
    // Outputs of .drv roots still need their path info (the path roots have theirs).
    let asked: HashSet<&StorePath> = ask.iter().collect();
    let mut more: Vec<StorePath> = drv_targets
        .iter()
        .flat_map(|(_, outs, _)| outs.iter())
        .filter(|o| !asked.contains(o))
        .cloned()
        .collect();
    more.sort();
    more.dedup();
    let infos = match plan(shared, root_infos, more).await {
        Ok(i) => i,
        Err(e) => {
            let reason = e.to_string();
            outcomes.extend(
                path_roots
                    .iter()
                    .map(|p| (p.clone(), RootOutcome::Failed(reason.clone()))),
            );
            outcomes.extend(
                drv_targets
                    .iter()
                    .map(|(d, _, _)| (d.clone(), RootOutcome::Failed(reason.clone()))),
            );
            return outcomes;
        }
    };
    let blocked = shared
        .cfg
        .filter
        .blocked(infos.iter().map(|i| (&i.path, i.references.as_slice())));
    let mut blocked_shown: Vec<_> = blocked.iter().collect();
    blocked_shown.sort();
    for (p, why) in blocked_shown {
        shared.stats.excluded.fetch_add(1, Relaxed);
        warn!("excluded {}: {why}", shared.show(p));
    }
    let infos: Vec<PathInfo> = infos
        .into_iter()
        .filter(|i| !blocked.contains_key(&i.path))
        .collect();
    let watches = spawn_closure(shared, infos, tasks);
    // A target with no watch finished (or failed) already: its narinfo decides.
    let wait_for = |targets: &[StorePath]| {
        if targets.iter().all(|t| blocked.contains_key(t)) {
            return RootOutcome::Excluded;
        }
        let mut waits = Vec::new();
        for t in targets.iter().filter(|t| !blocked.contains_key(*t)) {
            // Planned now, or under way since an earlier batch.
            let watch = watches
                .get(t)
                .cloned()
                .or_else(|| shared.state.lock().unwrap().inflight.get(t).cloned());
            match watch {
                Some(rx) => waits.push((t.clone(), rx)),
                None if shared.known_present(t) => {}
                None => {
                    return RootOutcome::Failed(format!(
                        "{} did not reach the cache",
                        shared.show(t)
                    ))
                }
            }
        }
        if waits.is_empty() {
            RootOutcome::Done
        } else {
            RootOutcome::Wait(waits, Vec::new())
        }
    };
    for p in &path_roots {
        outcomes.push((p.clone(), wait_for(std::slice::from_ref(p))));
    }
    for (drv, outs, realisations) in drv_targets {
        // A realisation names a path that must be in the cache: none of an excluded one
        // (nor of its referrers, which stay out with it).
        let realisations: Vec<Realisation> = realisations
            .into_iter()
            .filter(|r| !blocked.contains_key(&r.out_path))
            .collect();
        let outcome = match wait_for(&outs) {
            RootOutcome::Done if !realisations.is_empty() => {
                RootOutcome::Wait(Vec::new(), realisations)
            }
            RootOutcome::Wait(waits, _) => RootOutcome::Wait(waits, realisations),
            other => other,
        };
        outcomes.push((drv, outcome));
    }
    outcomes
}

/// Path info for every path that `roots` (valid, not in the cache) need uploaded: the
/// roots and, level by level, the references that are neither known (under way, or
/// known present) nor in the cache. Nix is asked only about paths not known yet, each
/// once, so planning costs work linear in the number of new paths; a reference found
/// in the cache ends its branch (its closure is there too, by the invariant). The
/// roots' path info is given (`root_infos`) or asked for (`more_roots`).
async fn plan(
    shared: &Shared,
    root_infos: Vec<PathInfo>,
    more_roots: Vec<StorePath>,
) -> Result<Vec<PathInfo>, Error> {
    let mut seen: HashSet<StorePath> = HashSet::new();
    let mut given: Vec<PathInfo> = root_infos
        .into_iter()
        .filter(|i| !shared.is_known(&i.path) && seen.insert(i.path.clone()))
        .collect();
    let mut frontier: Vec<StorePath> = more_roots
        .into_iter()
        .filter(|p| !shared.is_known(p) && seen.insert(p.clone()))
        .collect();
    let mut infos = Vec::new();
    let mut roots_level = true;
    while !frontier.is_empty() || !given.is_empty() {
        if !roots_level {
            let mut absent = Vec::new();
            for (p, present) in presence(shared, frontier).await {
                if !present? {
                    absent.push(p);
                }
            }
            frontier = absent;
        }
        roots_level = false;
        let mut level = std::mem::take(&mut given);
        if !frontier.is_empty() {
            level.extend(shared.nix.path_infos(&frontier).await?);
        }
        // What upstream serves ends its branch, as what our cache has does.
        let mut level = skip_upstream(shared, level).await?;
        let mut next = Vec::new();
        // Each path is held once however many paths refer to it: references share the
        // allocation of the path they name (Nix's JSON spells every one out anew).
        let state = shared.state.lock().unwrap();
        for info in &mut level {
            if let Some(p) = seen.get(&info.path) {
                info.path = p.clone();
            }
            for r in &mut info.references {
                if let Some(p) = seen.get(r).or_else(|| state.known(r)) {
                    *r = p.clone();
                } else {
                    seen.insert(r.clone());
                    next.push(r.clone());
                }
            }
        }
        drop(state);
        infos.extend(level);
        frontier = next;
    }
    Ok(infos)
}
