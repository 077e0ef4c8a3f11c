//! What a `.drv` root stands for: the outputs of its derivation that are built (fixed
//! ones from the derivation, floating content-addressed ones from the realisations Nix
//! recorded) and, with `write_realisations`, the realisations to write once they are in
//! the cache; with `include_build_deps`, also the built outputs of every derivation in
//! the roots' build closures. Planning (see [`super::plan`]) asks here, a few Nix calls
//! per batch.
//!
//! ```text
//! /nix/store/…-hello.drv ─▶ out = /nix/store/…-hello (built: a root's target)
//!                           doc = /nix/store/…-hello-doc (not built: warned, left out)
//! ```

use log::warn;

use super::realise;
use super::{Error, Shared};
use crate::realisation::Realisation;
use crate::store_path::StorePath;

/// The built outputs of the build closures of `drvs` and of the derivers of `paths`.
/// They are uploaded as roots of their own.
pub(super) async fn build_deps(
    shared: &Shared,
    paths: &[StorePath],
    drvs: &[StorePath],
) -> Result<Vec<StorePath>, Error> {
    let mut all_drvs: Vec<StorePath> = drvs.to_vec();
    if !paths.is_empty() {
        // Roots not valid in the store are reported later; ask only about valid ones.
        let invalid = shared.nix.invalid(paths).await?;
        let valid: Vec<StorePath> = paths
            .iter()
            .filter(|p| !invalid.contains(*p))
            .cloned()
            .collect();
        all_drvs.extend(shared.nix.derivers(&valid).await?.into_iter().flatten());
    }
    all_drvs.sort();
    all_drvs.dedup();
    let invalid = shared.nix.invalid(&all_drvs).await?;
    let known: Vec<StorePath> = all_drvs
        .into_iter()
        .filter(|d| !invalid.contains(d))
        .collect();
    if known.is_empty() {
        return Ok(Vec::new());
    }
    Ok(shared.nix.build_closure_outputs(&known).await?)
}

/// A valid `.drv` root: its built outputs, and (with `write_realisations`) the
/// realisations to write once they are in the cache.
pub(super) struct Built {
    pub drv: StorePath,
    pub outputs: Vec<StorePath>,
    pub realisations: Vec<Realisation>,
}

/// The built outputs of each valid derivation; unbuilt ones are reported. The outputs
/// a derivation fixes come from `nix show-derivation`; floating content-addressed ones
/// from the realisations Nix recorded when it built them, which are also what is
/// written with `write_realisations` (with those they depend on). A few Nix calls for
/// the whole batch.
pub(super) async fn drv_outputs(shared: &Shared, drvs: &[StorePath]) -> Result<Vec<Built>, Error> {
    if drvs.is_empty() {
        return Ok(Vec::new());
    }
    let write = shared.cfg.write_realisations;
    let mut outputs = shared.nix.outputs(drvs).await?;
    let known: Vec<StorePath> = outputs.values().flat_map(|o| o.known.clone()).collect();
    let mut unbuilt = shared.nix.invalid(&known).await?;
    // Nix refuses to look up realisations of a derivation with an output not built.
    let ask: Vec<StorePath> = drvs
        .iter()
        .filter(|d| {
            outputs.get(*d).is_some_and(|o| {
                !o.floating.is_empty() || (write && o.known.iter().all(|p| !unbuilt.contains(p)))
            })
        })
        .cloned()
        .collect();
    let found = if ask.is_empty() {
        Vec::new()
    } else {
        realise::lookup(&shared.nix, ask).await
    };
    let mut realised = Vec::new();
    let mut built: Vec<Built> = drvs
        .iter()
        .map(|drv| {
            let outs = outputs.remove(drv).unwrap_or_default();
            let realisations: Vec<Realisation> = found
                .iter()
                .filter(|r| realise::belongs(drv, &outs, r))
                .cloned()
                .collect();
            let mut paths = outs.known;
            for r in &realisations {
                if outs.floating.iter().any(|o| o == r.output()) {
                    paths.push(r.out_path.clone());
                    realised.push(r.out_path.clone());
                }
            }
            paths.sort();
            paths.dedup();
            Built {
                drv: drv.clone(),
                outputs: paths,
                realisations,
            }
        })
        .collect();
    // A realised output may have been collected since it was built.
    if !realised.is_empty() {
        unbuilt.extend(shared.nix.invalid(&realised).await?);
    }
    for b in &mut built {
        for o in b.outputs.iter().filter(|o| unbuilt.contains(*o)) {
            warn!(
                "output {} of {} is not built; not uploading it",
                shared.show(o),
                shared.show(&b.drv)
            );
        }
        b.outputs.retain(|o| !unbuilt.contains(o));
        if write {
            b.realisations.retain(|r| !unbuilt.contains(&r.out_path));
        } else {
            b.realisations.clear();
        }
    }
    if write {
        let wanted = built
            .iter_mut()
            .map(|b| (b.drv.clone(), std::mem::take(&mut b.realisations)))
            .collect();
        let with_deps = realise::with_dependencies(&shared.nix, wanted).await;
        for (b, (_, rs)) in built.iter_mut().zip(with_deps) {
            b.realisations = rs;
        }
    }
    Ok(built)
}
