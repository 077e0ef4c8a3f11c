//! The explorer: plain HTML pages about what the cache holds, usable without JavaScript.
//!
//! ```text
//! /                    store paths, newest first, 50 a page
//! /?q=hello&page=2     those whose name contains "hello", second page
//! /path/<hash>         one path: its narinfo's fields, references and referrers as
//!                      links, signatures, sizes, and its files when a .ls listing exists
//! ```
//! A bucket's paths come from listing its narinfos and reading each once (kept in
//! memory, the listing redone when [`REFRESH`] old); the local store's from Nix's
//! database. Rendering is pure (the `render_*` functions); every text that came from
//! the cache is escaped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::Mutex;

use super::local::Entry;
use super::route::Route;
use super::{Error, Part, Source, Want};
use crate::cache::Cache;
use crate::narinfo::NarInfo;
use crate::store_path::StorePath;

/// Paths a page lists.
pub const PAGE: usize = 50;
/// How old a bucket's listing may be before it is made again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// Narinfos read at once while indexing a bucket.
const READS: usize = 16;

/// What the explorer knows of a bucket: each narinfo, read once.
#[derive(Default)]
pub struct Catalogue {
    state: Mutex<CatalogueState>,
}

#[derive(Default)]
struct CatalogueState {
    /// By hash part.
    infos: HashMap<String, (SystemTime, Arc<NarInfo>)>,
    listed: Option<Instant>,
}

impl Catalogue {
    /// The narinfos, refreshed from the cache's listing when stale.
    async fn infos(&self, cache: &Cache) -> Result<Vec<(SystemTime, Arc<NarInfo>)>, Error> {
        let mut state = self.state.lock().await;
        if state.listed.is_none_or(|t| t.elapsed() >= REFRESH) {
            let listed = cache.list_root_dated().await?;
            let mut fresh = HashMap::new();
            let mut wanted = Vec::new();
            for (name, when) in listed {
                let Some(hash) = name.strip_suffix(".narinfo") else {
                    continue;
                };
                if Route::parse(&format!("/{name}")).is_none() {
                    continue;
                }
                match state.infos.remove(hash) {
                    Some((seen, info)) if seen == when => {
                        fresh.insert(hash.to_string(), (when, info));
                    }
                    _ => wanted.push((hash.to_string(), name, when)),
                }
            }
            let read: Vec<Option<(String, SystemTime, NarInfo)>> =
                futures::stream::iter(wanted.into_iter().map(|(hash, name, when)| async move {
                    let text = cache.get(&name).await?;
                    Ok::<_, Error>(text.and_then(|t| {
                        String::from_utf8_lossy(&t)
                            .parse::<NarInfo>()
                            .ok()
                            .map(|info| (hash, when, info))
                    }))
                }))
                .buffer_unordered(READS)
                .try_collect()
                .await?;
            for (hash, when, info) in read.into_iter().flatten() {
                fresh.insert(hash, (when, Arc::new(info)));
            }
            state.infos = fresh;
            state.listed = Some(Instant::now());
        }
        Ok(state.infos.values().cloned().collect())
    }

    async fn list(
        &self,
        cache: &Cache,
        q: &str,
        offset: usize,
    ) -> Result<(Vec<Entry>, usize), Error> {
        let mut all: Vec<_> = self
            .infos(cache)
            .await?
            .into_iter()
            .filter(|(_, i)| i.path.name().contains(q))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.path.cmp(&b.1.path)));
        let total = all.len();
        let page = all
            .into_iter()
            .skip(offset)
            .take(PAGE)
            .map(|(when, i)| Entry {
                path: i.path.clone(),
                when: Some(when),
                nar_size: Some(i.nar_size),
            })
            .collect();
        Ok((page, total))
    }

    async fn referrers(&self, cache: &Cache, path: &StorePath) -> Result<Vec<StorePath>, Error> {
        let mut out: Vec<StorePath> = self
            .infos(cache)
            .await?
            .into_iter()
            .filter(|(_, i)| i.path != *path && i.references.contains(path))
            .map(|(_, i)| i.path.clone())
            .collect();
        out.sort();
        Ok(out)
    }
}

/// A page of the explorer, or None when the path is none of its pages.
pub async fn page(
    source: &Source,
    catalogue: &Catalogue,
    path: &str,
    query: Option<&str>,
) -> Option<Result<String, Error>> {
    if path == "/" {
        let (mut q, mut page) = (String::new(), 1usize);
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "q" => q = v.trim().to_string(),
                "page" => page = v.parse().unwrap_or(1).max(1),
                _ => {}
            }
        }
        return Some(index(source, catalogue, &q, page).await);
    }
    let hash = path.strip_prefix("/path/")?;
    let Some(Route::NarInfo(hash)) = Route::parse(&format!("/{hash}.narinfo")) else {
        return None;
    };
    path_page(source, catalogue, &hash).await.transpose()
}

async fn index(
    source: &Source,
    catalogue: &Catalogue,
    q: &str,
    page: usize,
) -> Result<String, Error> {
    let offset = page.saturating_sub(1).saturating_mul(PAGE);
    let (entries, total) = match source {
        Source::Local(l) => l.list(q, offset, PAGE).await?,
        Source::Bucket(b) => catalogue.list(b.cache(), q, offset).await?,
        Source::Cached(p) => catalogue.list(p.bucket().cache(), q, offset).await?,
    };
    Ok(render_index(&source.describe(), q, page, &entries, total))
}

async fn read_all(source: &Source, route: &Route) -> Result<Option<Vec<u8>>, Error> {
    let Some(found) = source.get(route, Want::All).await? else {
        return Ok(None);
    };
    let Part::All(body) = found.part else {
        return Ok(None);
    };
    let chunks: Vec<bytes::Bytes> = body
        .try_collect()
        .await
        .map_err(|e| Error::Other(format!("reading {}: {e}", route.object())))?;
    Ok(Some(chunks.concat()))
}

async fn path_page(
    source: &Source,
    catalogue: &Catalogue,
    hash: &str,
) -> Result<Option<String>, Error> {
    let Some(text) = read_all(source, &Route::NarInfo(hash.to_string())).await? else {
        return Ok(None);
    };
    let Ok(info) = String::from_utf8_lossy(&text).parse::<NarInfo>() else {
        return Ok(None);
    };
    let referrers = match source {
        Source::Local(l) => l.referrers(&info.path).await?,
        Source::Bucket(b) => catalogue.referrers(b.cache(), &info.path).await?,
        Source::Cached(p) => catalogue.referrers(p.bucket().cache(), &info.path).await?,
    };
    let listing = read_all(source, &Route::Listing(hash.to_string()))
        .await?
        .and_then(|l| serde_json::from_slice::<serde_json::Value>(&l).ok());
    Ok(Some(render_path(
        &source.describe(),
        &info,
        &referrers,
        listing.as_ref(),
    )))
}

/// `<`, `>`, `&`, `"` and `'` as entities.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human(bytes: u64) -> String {
    crate::stats::human(bytes)
}

fn date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

const STYLE: &str = "body{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.2em .5em;\
border-bottom:1px solid #ddd}code,.mono{font-family:monospace}dt{font-weight:bold;\
margin-top:.5em}ul.tree{list-style:none;padding-left:1.2em}";

fn head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(title)
    )
}

fn link_to(path: &StorePath) -> String {
    format!(
        "<a class=\"mono\" href=\"/path/{}\">{}</a>",
        path.hash_part(),
        esc(&path.to_string())
    )
}

/// The list of paths, with a search form and links to the pages around.
pub fn render_index(source: &str, q: &str, page: usize, entries: &[Entry], total: usize) -> String {
    let mut h = head(&format!("narpipe serve: {source}"));
    let _ = write!(
        h,
        "<h1><a href=\"/\">Binary cache</a></h1><p>{}</p>\n\
         <form method=\"get\" action=\"/\" role=\"search\"><input type=\"search\" name=\"q\" \
         value=\"{}\" placeholder=\"name contains…\" aria-label=\"search by name\"> \
         <button type=\"submit\">Search</button></form>\n",
        esc(source),
        esc(q)
    );
    let pages = total.div_ceil(PAGE).max(1);
    let _ = writeln!(
        h,
        "<p id=\"count\">{total} store path{}{}, newest first; page {page} of {pages}.</p>",
        if total == 1 { "" } else { "s" },
        if q.is_empty() {
            String::new()
        } else {
            format!(" whose name contains “{}”", esc(q))
        }
    );
    h.push_str("<table><thead><tr><th>store path</th><th>NAR size</th><th>added</th></tr></thead><tbody>\n");
    for e in entries {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            link_to(&e.path),
            e.nar_size.map(human).unwrap_or_default(),
            e.when.map(date).unwrap_or_default()
        );
    }
    h.push_str("</tbody></table>\n<nav>");
    let qs = |p: usize| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        if !q.is_empty() {
            s.append_pair("q", q);
        }
        s.append_pair("page", &p.to_string());
        s.finish()
    };
    if page > 1 {
        let _ = write!(
            h,
            "<a rel=\"prev\" href=\"/?{}\">← newer</a> ",
            esc(&qs(page - 1))
        );
    }
    if page < pages {
        let _ = write!(
            h,
            "<a rel=\"next\" href=\"/?{}\">older →</a>",
            esc(&qs(page + 1))
        );
    }
    h.push_str("</nav></body></html>\n");
    h
}

/// One path's page.
pub fn render_path(
    source: &str,
    info: &NarInfo,
    referrers: &[StorePath],
    listing: Option<&serde_json::Value>,
) -> String {
    let mut h = head(&info.path.to_string());
    let _ = write!(
        h,
        "<p><a href=\"/\">← {}</a></p><h1 class=\"mono\">{}</h1>\n<dl>",
        esc(source),
        esc(info.path.name())
    );
    let mut field = |name: &str, value: String| {
        let _ = write!(h, "<dt>{name}</dt><dd>{value}</dd>");
    };
    field(
        "StorePath",
        format!("<code>{}</code>", esc(&info.store_path())),
    );
    // A link only to a name of the layout (a URL such as `/host/x` would leave the site).
    let url = if Route::parse(&format!("/{}", info.url)).is_some() {
        format!("<a class=\"mono\" href=\"/{0}\">{0}</a>", esc(&info.url))
    } else {
        format!("<code>{}</code>", esc(&info.url))
    };
    field("URL", url);
    field(
        "Compression",
        esc(info.compression.as_deref().unwrap_or("bzip2")),
    );
    if let Some(h) = &info.file_hash {
        field("FileHash", format!("<code>{}</code>", esc(&h.to_string())));
    }
    if let Some(s) = info.file_size {
        field("FileSize", format!("{} ({s} bytes)", human(s)));
    }
    field(
        "NarHash",
        format!("<code>{}</code>", esc(&info.nar_hash.to_string())),
    );
    field(
        "NarSize",
        format!("{} ({} bytes)", human(info.nar_size), info.nar_size),
    );
    if let Some(d) = &info.deriver {
        field(
            "Deriver",
            format!(
                "<code>{}</code> (<a href=\"/log/{}\">build log</a>)",
                esc(&d.to_string()),
                esc(&d.to_string())
            ),
        );
    }
    if let Some(s) = &info.system {
        field("System", esc(s));
    }
    if let Some(ca) = &info.ca {
        field("CA", format!("<code>{}</code>", esc(ca)));
    }
    h.push_str("</dl>\n");
    let list = |h: &mut String, id: &str, title: &str, paths: &[&StorePath]| {
        let _ = write!(h, "<h2 id=\"{id}\">{title} ({})</h2><ul>", paths.len());
        for p in paths {
            let _ = write!(h, "<li>{}</li>", link_to(p));
        }
        h.push_str("</ul>\n");
    };
    let refs: Vec<&StorePath> = info
        .references
        .iter()
        .filter(|r| **r != info.path)
        .collect();
    list(&mut h, "references", "References", &refs);
    list(
        &mut h,
        "referrers",
        "Referrers",
        &referrers.iter().collect::<Vec<_>>(),
    );
    let _ = write!(
        h,
        "<h2 id=\"signatures\">Signatures ({})</h2><ul>",
        info.sigs.len()
    );
    for s in &info.sigs {
        let _ = write!(h, "<li><code>{}</code></li>", esc(s));
    }
    h.push_str("</ul>\n");
    if let Some(root) = listing.and_then(|l| l.get("root")) {
        h.push_str("<h2 id=\"files\">Files</h2><ul class=\"tree\">");
        tree(&mut h, &info.path.to_string(), root, 0);
        h.push_str("</ul>\n");
    }
    h.push_str("</body></html>\n");
    h
}

/// One entry of a `.ls` listing and, for a directory, what it holds.
fn tree(h: &mut String, name: &str, node: &serde_json::Value, depth: usize) {
    let kind = node.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let _ = write!(h, "<li><span class=\"mono\">{}</span>", esc(name));
    match kind {
        "directory" if depth < 64 => {
            h.push_str("/<ul class=\"tree\">");
            if let Some(entries) = node.get("entries").and_then(|e| e.as_object()) {
                for (child, n) in entries {
                    tree(h, child, n, depth + 1);
                }
            }
            h.push_str("</ul>");
        }
        "regular" => {
            let size = node.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
            let exec = node
                .get("executable")
                .and_then(|e| e.as_bool())
                .unwrap_or(false);
            let _ = write!(
                h,
                " — {}{}",
                human(size),
                if exec { ", executable" } else { "" }
            );
        }
        "symlink" => {
            let target = node.get("target").and_then(|t| t.as_str()).unwrap_or("");
            let _ = write!(h, " → <span class=\"mono\">{}</span>", esc(target));
        }
        _ => {}
    }
    h.push_str("</li>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(text: &str) -> NarInfo {
        text.parse().unwrap()
    }

    const NARINFO: &str = "StorePath: /nix/store/9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-<b>\n\
        URL: nar/1slry13bk9a0m7q2b10v8y8a61xd5gnlf5wwpsyljb9l4hh0phr1.nar.zst\n\
        Compression: zstd\nNarHash: sha256:0bx1rx8nqlb5d43d5m8rq7m4qwa9ai2565br3igxhy8aiz0609ha\n\
        NarSize: 120\nReferences: 9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a\nSig: k:<script>\n";

    #[test]
    fn everything_from_the_cache_is_escaped() {
        // A store path name cannot hold '<', but a signature or a listing can.
        let i = info(&NARINFO.replace("probe-<b>", "probe-b"));
        let listing = serde_json::json!({"version":1,"root":{"type":"directory","entries":{
            "<img src=x>":{"type":"regular","size":3,"executable":true},
            "l":{"type":"symlink","target":"\"><script>"}}}});
        let page = render_path("file:///c", &i, &[], Some(&listing));
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("k:&lt;script&gt;"));
        assert!(page.contains("&lt;img src=x&gt;"));
        let index = render_index("<x>", "\"><script>", 1, &[], 0);
        assert!(
            !index.contains("<script>") && !index.contains("<x>"),
            "{index}"
        );
    }

    #[test]
    fn pages_link_to_their_neighbours() {
        let p = StorePath::from_base_name("9pc5sns34dywilnljxzmgx3hf9w9p0cf-probe-a").unwrap();
        let entries: Vec<Entry> = (0..PAGE)
            .map(|_| Entry {
                path: p.clone(),
                when: None,
                nar_size: Some(1),
            })
            .collect();
        let first = render_index("c", "pro be", 1, &entries, 2 * PAGE + 1);
        assert!(first.contains("href=\"/?q=pro+be&amp;page=2\""), "{first}");
        assert!(!first.contains("rel=\"prev\""));
        assert!(first.contains("page 1 of 3"));
        let last = render_index("c", "", 3, &entries[..1], 2 * PAGE + 1);
        assert!(last.contains("href=\"/?page=2\""));
        assert!(!last.contains("rel=\"next\""));
        assert!(first.contains("href=\"/path/9pc5sns34dywilnljxzmgx3hf9w9p0cf\""));
    }
}
