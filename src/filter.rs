//! `--include` / `--exclude`: which store paths may be pushed, by name.
//!
//! A path is excluded when its name (the part after `<hash>-`) matches an `--exclude`
//! regex, or when `--include` regexes are given and none matches. A path that refers
//! (directly or not) to an excluded path cannot be pushed either: a cache must never
//! hold a narinfo whose references are missing. Pure: no IO.

use std::collections::HashMap;

use regex::Regex;

use crate::store_path::StorePath;

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub include: Vec<Regex>,
    pub exclude: Vec<Regex>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Why `path` itself may not be pushed, if it may not.
    pub fn reason(&self, path: &StorePath) -> Option<String> {
        let name = path.name();
        if let Some(r) = self.exclude.iter().find(|r| r.is_match(name)) {
            return Some(format!("matches --exclude '{r}'"));
        }
        if !self.include.is_empty() && !self.include.iter().any(|r| r.is_match(name)) {
            return Some("matches no --include".to_string());
        }
        None
    }

    /// The paths of a closure that may not be pushed, with the reason for each.
    /// `refs` gives each path's references.
    pub fn blocked<'a>(
        &self,
        refs: impl Iterator<Item = (&'a StorePath, &'a [StorePath])> + Clone,
    ) -> HashMap<StorePath, String> {
        let mut blocked: HashMap<StorePath, String> = HashMap::new();
        if self.is_empty() {
            return blocked;
        }
        for (p, _) in refs.clone() {
            if let Some(r) = self.reason(p) {
                blocked.insert(p.clone(), r);
            }
        }
        // Referrers of blocked paths are blocked too, until nothing changes.
        loop {
            let mut more = Vec::new();
            for (p, rs) in refs.clone() {
                if blocked.contains_key(p) {
                    continue;
                }
                if let Some(r) = rs.iter().find(|r| *r != p && blocked.contains_key(*r)) {
                    more.push((p.clone(), format!("refers to excluded {r}")));
                }
            }
            if more.is_empty() {
                return blocked;
            }
            blocked.extend(more);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("xav0pws0268idny9wi60ylqqiyryzfz6-{name}")).unwrap()
    }

    #[test]
    fn exclusion_spreads_to_referrers_only() {
        let f = Filter {
            include: vec![],
            exclude: vec![Regex::new("secret").unwrap()],
        };
        let (lib, secret, app, tool) = (sp("lib"), sp("my-secret"), sp("app"), sp("tool"));
        let graph: Vec<(StorePath, Vec<StorePath>)> = vec![
            (lib.clone(), vec![]),
            (secret.clone(), vec![lib.clone()]),
            (app.clone(), vec![secret.clone(), lib.clone()]),
            (tool.clone(), vec![lib.clone(), tool.clone()]),
        ];
        let blocked = f.blocked(graph.iter().map(|(p, r)| (p, r.as_slice())));
        assert_eq!(blocked.len(), 2);
        assert!(blocked[&secret].contains("--exclude 'secret'"));
        assert!(blocked[&app].contains("refers to excluded"));
        assert!(!blocked.contains_key(&lib) && !blocked.contains_key(&tool));
    }

    #[test]
    fn include_lists_what_may_go() {
        let f = Filter {
            include: vec![Regex::new("^app").unwrap()],
            exclude: vec![],
        };
        assert!(f.reason(&sp("app-1.0")).is_none());
        assert!(f.reason(&sp("lib")).unwrap().contains("--include"));
        assert!(Filter::default().reason(&sp("anything")).is_none());
    }
}
