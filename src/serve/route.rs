//! Which request paths `serve` answers: only the names of a binary cache's layout.
//!
//! ```text
//! /nix-cache-info
//! /<hash>.narinfo                       hash: 32 nix-base32 characters
//! /<hash>.ls                            the NAR's file listing
//! /nar/<name>.nar[.xz|.zst|.bz2|…]      name: 1–128 of [0-9a-z-]
//! /log/<hash>-<name>.drv                a build log
//! /realisations/sha256:<hex>!<out>.doi  a realisation
//! ```
//! Anything else (`..`, another folder, another character) is no route: the server
//! answers 404 and never looks further, so no name can reach outside the cache. The
//! path is percent-decoded first (Nix sends `!` as it is; a browser may send `%21`).
//! Pure: no IO.

use crate::nixbase32;
use crate::store_path::{StorePath, HASH_LEN};

/// A request for one object of the cache layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    CacheInfo,
    NarInfo(String),
    Listing(String),
    /// `nar/<name><ext>`: `name` without the extension, `ext` with it (`.nar.zst`).
    Nar {
        name: String,
        ext: &'static str,
    },
    Log(StorePath),
    Realisation(String),
}

/// NAR file suffixes, as Nix names them by compression.
pub const NAR_EXTENSIONS: &[&str] = &[
    ".nar",
    ".nar.xz",
    ".nar.zst",
    ".nar.bz2",
    ".nar.br",
    ".nar.lz4",
    ".nar.lzip",
    ".nar.gz",
];

const MAX_NAR_NAME: usize = 128;

impl Route {
    /// The route of a request path (`/` and all), None if it names nothing served.
    pub fn parse(path: &str) -> Option<Route> {
        let decoded = percent_decode(path)?;
        let rel = decoded.strip_prefix('/')?;
        if rel == "nix-cache-info" {
            return Some(Route::CacheInfo);
        }
        if let Some(hash) = rel.strip_suffix(".narinfo") {
            return is_hash(hash).then(|| Route::NarInfo(hash.to_string()));
        }
        if let Some(hash) = rel.strip_suffix(".ls") {
            return is_hash(hash).then(|| Route::Listing(hash.to_string()));
        }
        if let Some(file) = rel.strip_prefix("nar/") {
            // The longest extension that fits: `.nar.zst` before `.nar`.
            let (name, ext) = NAR_EXTENSIONS
                .iter()
                .rev()
                .filter_map(|ext| file.strip_suffix(ext).map(|name| (name, *ext)))
                .next()?;
            let ok = !name.is_empty()
                && name.len() <= MAX_NAR_NAME
                && name
                    .bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == b'-');
            return ok.then(|| Route::Nar {
                name: name.to_string(),
                ext,
            });
        }
        if let Some(base) = rel.strip_prefix("log/") {
            return StorePath::from_base_name(base).ok().map(Route::Log);
        }
        if let Some(id) = rel
            .strip_prefix("realisations/")
            .and_then(|f| f.strip_suffix(".doi"))
        {
            return is_realisation_id(id).then(|| Route::Realisation(id.to_string()));
        }
        None
    }

    /// The object's name, relative to the cache root.
    pub fn object(&self) -> String {
        match self {
            Route::CacheInfo => "nix-cache-info".into(),
            Route::NarInfo(h) => format!("{h}.narinfo"),
            Route::Listing(h) => format!("{h}.ls"),
            Route::Nar { name, ext } => format!("nar/{name}{ext}"),
            Route::Log(drv) => crate::build_log::cache_key(drv),
            Route::Realisation(id) => format!("realisations/{id}.doi"),
        }
    }

    /// The Content-Type Nix's own writers give the object.
    pub fn content_type(&self) -> &'static str {
        match self {
            Route::CacheInfo => "text/x-nix-cache-info",
            Route::NarInfo(_) => "text/x-nix-narinfo",
            Route::Listing(_) | Route::Realisation(_) => "application/json",
            Route::Nar { .. } => "application/x-nix-nar",
            Route::Log(_) => "text/plain; charset=utf-8",
        }
    }

    /// Whether byte ranges of it are served (NARs: resumed or sampled downloads).
    pub fn ranges(&self) -> bool {
        matches!(self, Route::Nar { .. })
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == HASH_LEN && s.bytes().all(nixbase32::is_valid_char)
}

/// `sha256:<64 hex>!<output name>`, the output name as a store path name's characters.
fn is_realisation_id(id: &str) -> bool {
    let Some((hash, output)) = id.split_once('!') else {
        return false;
    };
    let Some(hex) = hash.strip_prefix("sha256:") else {
        return false;
    };
    hex.len() == 64
        && hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        && !output.is_empty()
        && output.len() <= 211
        && !output.starts_with('.')
        && output
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

/// `%XX` decoded; None for a bad escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9pc5sns34dywilnljxzmgx3hf9w9p0cf";

    #[test]
    fn the_layout_shapes_are_routes() {
        assert_eq!(Route::parse("/nix-cache-info"), Some(Route::CacheInfo));
        assert_eq!(
            Route::parse(&format!("/{H}.narinfo")),
            Some(Route::NarInfo(H.into()))
        );
        assert_eq!(
            Route::parse(&format!("/{H}.ls")),
            Some(Route::Listing(H.into()))
        );
        let file_hash = "1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1";
        assert_eq!(
            Route::parse(&format!("/nar/{file_hash}.nar.zst")),
            Some(Route::Nar {
                name: file_hash.into(),
                ext: ".nar.zst"
            })
        );
        for ext in NAR_EXTENSIONS {
            let r = Route::parse(&format!("/nar/{file_hash}{ext}")).unwrap();
            assert_eq!(r.object(), format!("nar/{file_hash}{ext}"));
        }
        // A big NAR under its own name, and the local store's names.
        let uuid = "0b6e5f1e-4f5e-4a4e-9d0c-3c8f7d1a2b3c";
        assert!(Route::parse(&format!("/nar/{uuid}.nar.zst")).is_some());
        assert!(Route::parse(&format!("/nar/{H}-{file_hash}.nar")).is_some());
        let drv = format!("{H}-hello-2.12.drv");
        assert_eq!(
            Route::parse(&format!("/log/{drv}")),
            Some(Route::Log(StorePath::from_base_name(&drv).unwrap()))
        );
        let id = format!("sha256:{}!out", "ab".repeat(32));
        assert_eq!(
            Route::parse(&format!("/realisations/{id}.doi")),
            Some(Route::Realisation(id.clone()))
        );
        // Percent-encoded, as a browser may send it.
        assert_eq!(
            Route::parse(&format!(
                "/realisations/sha256%3A{}%21out.doi",
                "ab".repeat(32)
            )),
            Some(Route::Realisation(id))
        );
    }

    #[test]
    fn nothing_outside_the_layout_is_a_route() {
        let long = "a".repeat(MAX_NAR_NAME + 1);
        for path in [
            "",
            "/",
            "nix-cache-info",
            "/nix-cache-info/",
            "//nix-cache-info",
            "/../nix-cache-info",
            "/etc/passwd",
            "/nar/../../etc/passwd",
            "/nar/..%2F..%2Fetc%2Fpasswd.nar",
            "/nar/%2e%2e.nar",
            "/nar/.nar",
            "/nar/x/y.nar",
            "/nar/ABC.nar",
            "/nar/abc.nar.exe",
            "/nar/abc.tar",
            "/nar/abc.nar/",
            &format!("/nar/{long}.nar"),
            "/nar/a b.nar",
            "/nar/a%00.nar",
            "/nar/%zz.nar",
            "/nar/%",
            &format!("/{H}x.narinfo"),
            &format!("/{}.narinfo", &H[1..]),
            "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo", // e is not nix-base32
            &format!("/sub/{H}.narinfo"),
            &format!("/{H}.narinfo.bak"),
            &format!("/{H}.NARINFO"),
            "/log/../../etc/passwd",
            "/log/",
            &format!("/log/{H}-x/../y"),
            "/realisations/x.doi",
            &format!("/realisations/sha256:{}!out.doi", "AB".repeat(32)),
            &format!("/realisations/sha256:{}!.out.doi", "ab".repeat(32)),
            &format!("/realisations/sha256:{}!o/../x.doi", "ab".repeat(32)),
            "/nix-cache-info%00",
        ] {
            assert_eq!(Route::parse(path), None, "{path:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%21b%2f").as_deref(), Some("a!b/"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%g0"), None);
        assert_eq!(percent_decode("%ff"), None); // not UTF-8
    }
}
