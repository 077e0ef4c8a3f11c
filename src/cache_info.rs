//! `nix-cache-info`, the file at a binary cache's root.
//!
//! ```text
//! StoreDir: /nix/store
//! WantMassQuery: 1
//! Priority: 40
//! ```

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: Option<String>,
    pub want_mass_query: bool,
    pub priority: Option<u32>,
}

impl CacheInfo {
    pub fn new(store_dir: &str, priority: u32) -> Self {
        CacheInfo {
            store_dir: Some(store_dir.to_string()),
            want_mass_query: true,
            priority: Some(priority),
        }
    }

    /// Lenient, like Nix: unknown lines are ignored.
    pub fn parse(text: &str) -> Self {
        let mut info = CacheInfo {
            store_dir: None,
            want_mass_query: false,
            priority: None,
        };
        for line in text.lines() {
            if let Some((k, v)) = line.split_once(':') {
                let v = v.trim();
                match k.trim() {
                    "StoreDir" => info.store_dir = Some(v.to_string()),
                    "WantMassQuery" => info.want_mass_query = v == "1",
                    "Priority" => info.priority = v.parse().ok(),
                    _ => {}
                }
            }
        }
        info
    }
}

impl std::fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(d) = &self.store_dir {
            writeln!(f, "StoreDir: {d}")?;
        }
        writeln!(f, "WantMassQuery: {}", u8::from(self.want_mass_query))?;
        if let Some(p) = self.priority {
            writeln!(f, "Priority: {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        let info = CacheInfo::parse(text);
        assert_eq!(info, CacheInfo::new("/nix/store", 40));
        assert_eq!(info.to_string(), text);
        // What `nix copy --to file://` writes.
        let nix = CacheInfo::parse("StoreDir: /nix/store\n");
        assert_eq!(nix.store_dir.as_deref(), Some("/nix/store"));
        assert_eq!(nix.priority, None);
    }
}
