//! The one place that runs Nix's command-line tools.
//!
//! Every call is batched (a spawn costs 30–60 ms): validity of many paths, outputs of
//! many derivations, path info of many paths, each in one process. A failing call
//! becomes an error carrying its argv and stderr; a dropped call kills its child.
//!
//! `nix path-info --json` prints an array of objects with a `path` field up to Nix
//! 2.18 and an object keyed by path from 2.19 on; both are read:
//! ```text
//! [{"path":"/nix/store/…-b","narHash":"sha256-4JgD…","narSize":176,
//!   "references":["/nix/store/…-a"],"deriver":"/nix/store/…-b.drv","signatures":[…]}]
//! ```

use std::collections::{HashMap, HashSet};
use std::process::Stdio;

use serde::Deserialize;

use crate::hash::Sha256;
use crate::realisation::Realisation;
use crate::store_path::{StoreDir, StorePath};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {program}: {cause}")]
    Spawn {
        program: String,
        cause: std::io::Error,
    },
    #[error("`{argv}` failed ({status}): {stderr}")]
    Failed {
        argv: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot read the output of `{argv}`: {reason}")]
    Output { argv: String, reason: String },
}

/// What the store's database says about one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted; may include `path` itself.
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Nix {
    store_dir: StoreDir,
}

/// Paths per process: keeps argv well under ARG_MAX.
const ARGS_PER_CALL: usize = 2000;

impl Nix {
    pub fn new(store_dir: StoreDir) -> Self {
        Nix { store_dir }
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    async fn run(&self, program: &str, args: &[&str], paths: &[String]) -> Result<Vec<u8>, Error> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .args(paths)
            .env("NIX_STORE_DIR", self.store_dir.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = cmd.output().await.map_err(|cause| Error::Spawn {
            program: program.to_string(),
            cause,
        })?;
        if !out.status.success() {
            return Err(Error::Failed {
                argv: argv_text(program, args, paths),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    fn abs(&self, paths: &[StorePath]) -> Vec<String> {
        paths.iter().map(|p| self.store_dir.display(p)).collect()
    }

    /// The subset of `paths` that the store does not hold as valid paths.
    pub async fn invalid(&self, paths: &[StorePath]) -> Result<HashSet<StorePath>, Error> {
        let mut invalid = HashSet::new();
        for chunk in paths.chunks(ARGS_PER_CALL) {
            let out = self
                .run(
                    "nix-store",
                    &["--check-validity", "--print-invalid"],
                    &self.abs(chunk),
                )
                .await?;
            for line in String::from_utf8_lossy(&out).lines() {
                if let Ok(p) = self.store_dir.parse(line.trim()) {
                    invalid.insert(p);
                }
            }
        }
        Ok(invalid)
    }

    /// The outputs of each valid derivation (built or not), from one
    /// `nix show-derivation` call per chunk.
    pub async fn outputs(
        &self,
        drvs: &[StorePath],
    ) -> Result<HashMap<StorePath, DrvOutputs>, Error> {
        // A content-addressed derivation cannot even be shown without the feature.
        let args = [
            "--extra-experimental-features",
            "nix-command ca-derivations",
            "show-derivation",
        ];
        let mut all = HashMap::new();
        for chunk in drvs.chunks(ARGS_PER_CALL) {
            let paths = self.abs(chunk);
            let out = self.run("nix", &args, &paths).await?;
            let parsed = parse_derivation_outputs(&out, &self.store_dir).map_err(|reason| {
                Error::Output {
                    argv: argv_text("nix", &args, &paths),
                    reason,
                }
            })?;
            all.extend(parsed);
        }
        Ok(all)
    }

    /// The deriver of each path (None when Nix does not know it), in order.
    pub async fn derivers(&self, paths: &[StorePath]) -> Result<Vec<Option<StorePath>>, Error> {
        let mut out = Vec::new();
        for chunk in paths.chunks(ARGS_PER_CALL) {
            let text = self
                .run("nix-store", &["--query", "--deriver"], &self.abs(chunk))
                .await?;
            out.extend(
                String::from_utf8_lossy(&text)
                    .lines()
                    .map(|l| self.store_dir.parse(l.trim()).ok()),
            );
        }
        Ok(out)
    }

    /// The derivations in the build closures of valid derivations (`nix-store -qR`),
    /// themselves included.
    pub async fn derivation_closure(&self, drvs: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        let mut all = HashSet::new();
        for chunk in drvs.chunks(ARGS_PER_CALL) {
            let text = self
                .run("nix-store", &["--query", "--requisites"], &self.abs(chunk))
                .await?;
            all.extend(
                String::from_utf8_lossy(&text)
                    .lines()
                    .filter_map(|l| self.store_dir.parse(l.trim()).ok())
                    .filter(|p| p.is_derivation()),
            );
        }
        let mut all: Vec<StorePath> = all.into_iter().collect();
        all.sort();
        Ok(all)
    }

    /// The build closure of valid derivations with its outputs
    /// (`nix-store -qR --include-outputs`), derivations left out, built outputs only.
    pub async fn build_closure_outputs(&self, drvs: &[StorePath]) -> Result<Vec<StorePath>, Error> {
        let mut all = HashSet::new();
        for chunk in drvs.chunks(ARGS_PER_CALL) {
            let text = self
                .run(
                    "nix-store",
                    &["--query", "--requisites", "--include-outputs"],
                    &self.abs(chunk),
                )
                .await?;
            for line in String::from_utf8_lossy(&text).lines() {
                if let Ok(p) = self.store_dir.parse(line.trim()) {
                    if !p.is_derivation() {
                        all.insert(p);
                    }
                }
            }
        }
        let all: Vec<StorePath> = all.into_iter().collect();
        let invalid = self.invalid(&all).await?;
        Ok(all.into_iter().filter(|p| !invalid.contains(p)).collect())
    }

    /// Path info for exactly `paths` (valid, non-derivation: Nix would try to build or
    /// substitute anything else), not their closures.
    pub async fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, Error> {
        // No substituters: for a path that is not valid, Nix would otherwise ask them
        // what it could fetch (a network round trip per garbage-collected root).
        let args = [
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--option",
            "substitute",
            "false",
        ];
        let mut seen = HashSet::new();
        let mut infos = Vec::new();
        for chunk in paths.chunks(ARGS_PER_CALL) {
            let paths = self.abs(chunk);
            let out = self.run("nix", &args, &paths).await?;
            let parsed =
                parse_path_info(&out, &self.store_dir).map_err(|reason| Error::Output {
                    argv: argv_text("nix", &args, &paths),
                    reason,
                })?;
            for info in parsed {
                if seen.insert(info.path.clone()) {
                    infos.push(info);
                }
            }
        }
        Ok(infos)
    }

    /// Path info for the valid ones of `paths`, and which are not valid, in one call per
    /// chunk when all are valid: `path-info` leaves an invalid path out of its answer
    /// (`"valid": false`, or `null` in newer versions), and only the paths it leaves out
    /// are then checked with `--check-validity`: a path counts as invalid only when
    /// the store says so. Should a Nix version refuse the call instead, the chunk is
    /// checked for validity first and asked again without the invalid paths.
    pub async fn valid_path_infos(
        &self,
        paths: &[StorePath],
    ) -> Result<(Vec<PathInfo>, HashSet<StorePath>), Error> {
        let mut infos = Vec::new();
        let mut invalid = HashSet::new();
        for chunk in paths.chunks(ARGS_PER_CALL) {
            let found = match self.path_infos(chunk).await {
                Ok(found) => found,
                Err(Error::Failed { .. }) => {
                    let bad = self.invalid(chunk).await?;
                    let valid: Vec<StorePath> = chunk
                        .iter()
                        .filter(|p| !bad.contains(*p))
                        .cloned()
                        .collect();
                    self.path_infos(&valid).await?
                }
                Err(e) => return Err(e),
            };
            let described: HashSet<&StorePath> = found.iter().map(|i| &i.path).collect();
            let left_out: Vec<StorePath> = chunk
                .iter()
                .filter(|p| !described.contains(p))
                .cloned()
                .collect();
            if !left_out.is_empty() {
                let bad = self.invalid(&left_out).await?;
                if let Some(p) = left_out.iter().find(|p| !bad.contains(*p)) {
                    return Err(Error::Output {
                        argv: "nix path-info --json".into(),
                        reason: format!(
                            "{} is valid but was not described",
                            self.store_dir.display(p)
                        ),
                    });
                }
                invalid.extend(bad);
            }
            infos.extend(found);
        }
        Ok((infos, invalid))
    }
}

impl Nix {
    /// The realisations Nix recorded for the outputs of valid derivations, from one
    /// `nix realisation info --json` call per chunk (experimental feature
    /// ca-derivations). Outputs without one (input-addressed, built before the
    /// feature was on) are left out; a content-addressed output never built fails
    /// the call.
    pub async fn realisations(&self, drvs: &[StorePath]) -> Result<Vec<Realisation>, Error> {
        let args = [
            "--extra-experimental-features",
            "nix-command ca-derivations",
            "realisation",
            "info",
            "--json",
        ];
        let mut all = Vec::new();
        for chunk in drvs.chunks(ARGS_PER_CALL) {
            let paths = self.abs(chunk);
            let out = self.run("nix", &args, &paths).await?;
            all.extend(parse_realisations(&out).map_err(|reason| Error::Output {
                argv: argv_text("nix", &args, &paths),
                reason,
            })?);
        }
        Ok(all)
    }
}

/// `nix realisation info --json`: an array of realisations, and `{"opaquePath": …}`
/// for outputs that have none.
pub fn parse_realisations(json: &[u8]) -> Result<Vec<Realisation>, String> {
    let all: Vec<serde_json::Value> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    all.into_iter()
        .filter(|v| v.get("opaquePath").is_none())
        .map(|v| Realisation::from_json(v).map_err(|e| e.to_string()))
        .collect()
}

fn argv_text(program: &str, args: &[&str], paths: &[String]) -> String {
    let mut s = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    match paths {
        [] => {}
        [one] => s.push_str(&format!(" {one}")),
        [first, ..] => s.push_str(&format!(" {first} (+{} more)", paths.len() - 1)),
    }
    s
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawInfo {
    path: Option<String>,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
}

/// A derivation's outputs as the derivation says them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrvOutputs {
    /// The outputs whose path the derivation fixes (input-addressed, fixed-output),
    /// sorted.
    pub known: Vec<StorePath>,
    /// The names of the outputs whose path is known only once built (floating
    /// content-addressed: Nix records it as a realisation), sorted.
    pub floating: Vec<String>,
}

/// The outputs per derivation in `nix show-derivation` (or `nix derivation show`)
/// JSON: an object keyed by derivation path (full or base name, by Nix version), each
/// with `outputs: {name: {path}}` (no `path` for a floating content-addressed output).
pub fn parse_derivation_outputs(
    json: &[u8],
    store_dir: &StoreDir,
) -> Result<HashMap<StorePath, DrvOutputs>, String> {
    #[derive(Deserialize)]
    struct Drv {
        #[serde(default)]
        outputs: HashMap<String, Output>,
    }
    #[derive(Deserialize)]
    struct Output {
        path: Option<String>,
    }
    let any_path = |p: &str| {
        store_dir
            .parse(p)
            .or_else(|_| StorePath::from_base_name(p))
            .map_err(|e| e.to_string())
    };
    let drvs: HashMap<String, Drv> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    drvs.into_iter()
        .map(|(drv, d)| {
            let mut outs = DrvOutputs::default();
            for (name, o) in d.outputs {
                match o.path {
                    Some(p) => outs.known.push(any_path(&p)?),
                    None => outs.floating.push(name),
                }
            }
            outs.known.sort();
            outs.floating.sort();
            Ok((any_path(&drv)?, outs))
        })
        .collect()
}

/// Parses `nix path-info --json` output of any Nix version; invalid paths are skipped.
pub fn parse_path_info(json: &[u8], store_dir: &StoreDir) -> Result<Vec<PathInfo>, String> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let entries: Vec<(Option<String>, serde_json::Value)> = match value {
        serde_json::Value::Array(a) => a.into_iter().map(|v| (None, v)).collect(),
        serde_json::Value::Object(o) => o.into_iter().map(|(k, v)| (Some(k), v)).collect(),
        _ => return Err("neither a JSON array nor an object".into()),
    };
    let parse_path = |s: &str| {
        if s.starts_with('/') {
            store_dir.parse(s)
        } else {
            StorePath::from_base_name(s)
        }
        .map_err(|e| e.to_string())
    };
    let mut infos = Vec::new();
    for (key, v) in entries {
        if v.is_null() {
            continue;
        }
        let raw: RawInfo = serde_json::from_value(v).map_err(|e| e.to_string())?;
        let (Some(nar_hash), Some(nar_size)) = (raw.nar_hash, raw.nar_size) else {
            continue; // {"path": …, "valid": false}
        };
        let path = key.or(raw.path).ok_or("an entry without a path")?;
        let mut references = raw
            .references
            .iter()
            .map(|r| parse_path(r))
            .collect::<Result<Vec<_>, _>>()?;
        references.sort();
        infos.push(PathInfo {
            path: parse_path(&path)?,
            nar_hash: nar_hash
                .parse()
                .map_err(|e: crate::hash::Error| e.to_string())?,
            nar_size,
            references,
            deriver: raw.deriver.as_deref().map(parse_path).transpose()?,
            sigs: raw.signatures,
            ca: raw.ca,
        });
    }
    Ok(infos)
}

#[cfg(test)]
mod tests {

    #[test]
    fn derivation_outputs_of_old_and_new_nix() {
        let sd = StoreDir::new("/nix/store").unwrap();
        // Nix 2.8 `nix show-derivation`: full paths everywhere.
        let old = br#"{"/nix/store/v0jc4vw90838an28b7dfvivnq41d7n63-drvtest-b.drv":
            {"outputs":{"dev":{"path":"/nix/store/3x3mss5wl2d6wkdbima66xmrd924d4dh-drvtest-b-dev"},
                        "out":{"path":"/nix/store/328g2pz3i3c52zg56hkm5qi81jw29rdc-drvtest-b"}},
             "inputSrcs":[],"env":{}}}"#;
        let got = parse_derivation_outputs(old, &sd).unwrap();
        let drv =
            StorePath::from_base_name("v0jc4vw90838an28b7dfvivnq41d7n63-drvtest-b.drv").unwrap();
        let outs: Vec<String> = got[&drv].known.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            outs,
            [
                "328g2pz3i3c52zg56hkm5qi81jw29rdc-drvtest-b",
                "3x3mss5wl2d6wkdbima66xmrd924d4dh-drvtest-b-dev"
            ]
        );
        // Newer `nix derivation show`: base names; a floating CA output has no path.
        let new = br#"{"v0jc4vw90838an28b7dfvivnq41d7n63-drvtest-b.drv":
            {"outputs":{"out":{"path":"328g2pz3i3c52zg56hkm5qi81jw29rdc-drvtest-b"},
                        "doc":{"hashAlgo":"sha256","method":"nar"}}}}"#;
        let got = parse_derivation_outputs(new, &sd).unwrap();
        assert_eq!(got[&drv].known.len(), 1);
        assert_eq!(got[&drv].floating, ["doc"]);
        // Nix 2.8, a floating content-addressed derivation.
        let floating = br#"{"/nix/store/lpnswkkha06z6h7w8v1qwj65s65a5bwb-ca-b.drv":
            {"outputs":{"out":{"hashAlgo":"r:sha256"}},"inputSrcs":[],"env":{}}}"#;
        let got = parse_derivation_outputs(floating, &sd).unwrap();
        let drv = StorePath::from_base_name("lpnswkkha06z6h7w8v1qwj65s65a5bwb-ca-b.drv").unwrap();
        assert!(got[&drv].known.is_empty());
        assert_eq!(got[&drv].floating, ["out"]);
        assert!(parse_derivation_outputs(b"[]", &sd).is_err());
    }

    use super::*;

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn parses_nix_2_8_array_form() {
        // `nix path-info --json -r` (Nix 2.8), plus an invalid path.
        let json = br#"[{"path":"/nix/store/9ngqiqshf9l3pfc47n2pgw5z7w61rc18-probe-b","narHash":"sha256-4JgDGgE9EPFbkHdVI/m9Y4vSW6mhjWaVKjDybevmvMk=","narSize":176,"references":["/nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a"],"deriver":"/nix/store/7drwf6mw4n8jfpzysa0hvi5sm1gp8v3j-probe-b.drv","registrationTime":1795311174,"ultimate":true,"signatures":["k:abc"]},
            {"path":"/nix/store/00000000000000000000000000000000-x","valid":false}]"#;
        let infos = parse_path_info(json, &sd()).unwrap();
        assert_eq!(infos.len(), 1);
        let b = &infos[0];
        assert_eq!(b.path.name(), "probe-b");
        assert_eq!(b.nar_size, 176);
        assert_eq!(b.references.len(), 1);
        assert_eq!(b.deriver.as_ref().unwrap().name(), "probe-b.drv");
        assert_eq!(b.sigs, ["k:abc"]);
        assert_eq!(
            b.nar_hash.to_sri(),
            "sha256-4JgDGgE9EPFbkHdVI/m9Y4vSW6mhjWaVKjDybevmvMk="
        );
    }

    #[test]
    fn parses_object_form_of_newer_nix() {
        let json = br#"{"/nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a":{"narHash":"sha256:0bx1rx8nqlb5d43d5m8rq7m4qwa9ai2565br3igxhy8aiz0609ha","narSize":120,"references":[],"deriver":null,"ca":"fixed:r:sha256:0bx1rx8nqlb5d43d5m8rq7m4qwa9ai2565br3igxhy8aiz0609ha"},
            "/nix/store/00000000000000000000000000000000-x":null}"#;
        let infos = parse_path_info(json, &sd()).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].path.name(), "probe-a");
        assert!(infos[0].deriver.is_none());
        assert!(infos[0].ca.is_some());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_path_info(b"not json", &sd()).is_err());
        assert!(parse_path_info(br#"[{"path":"/etc/x","narHash":"sha256:0bx1rx8nqlb5d43d5m8rq7m4qwa9ai2565br3igxhy8aiz0609ha","narSize":1}]"#, &sd()).is_err());
    }

    #[test]
    fn realisations_as_nix_realisation_info_prints_them() {
        // `nix realisation info --json` (Nix 2.8.0) of a content-addressed and an
        // input-addressed derivation built without ca-derivations.
        let json = br#"[{"dependentRealisations":{},"id":"sha256:586efef6775a1cb8a65139778fd2f47771ad0f3c7481237615e8a4cf8018ad5c!out","outPath":"q3dxyba8mrvjs1x7zqdmd3c2fq8f4zf1-ca-b-1","signatures":[]},{"opaquePath":"/nix/store/i4f2p40hvqk913wm1a390hrbjrn72zdl-ia-r4test-3"}]"#;
        let r = parse_realisations(json).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            r[0].out_path.to_string(),
            "q3dxyba8mrvjs1x7zqdmd3c2fq8f4zf1-ca-b-1"
        );
        assert!(parse_realisations(b"{}").is_err());
    }
}
