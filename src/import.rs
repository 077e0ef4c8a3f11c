//! `upload import`: copy a whole binary cache into another one (file ↔ S3 ↔ GCS).
//!
//! Every narinfo of the source whose path the destination lacks is copied with its NAR:
//! the compressed bytes are streamed as they are (same `URL`, so the same name) while
//! their FileHash/FileSize are checked and, decompressed on the side, their NarHash and
//! NarSize; a mismatch publishes nothing. Narinfos keep their signatures and get ours.
//! Entries are committed level by level in dependency order (references first), so the
//! destination never holds a narinfo whose references are missing; an interrupted
//! import leaves only complete entries, and running it again finishes the job.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use log::{error, info, warn};
use sha2::Digest;
use tokio::io::AsyncReadExt;

use crate::cache::{self, Cache};
use crate::cache_info::CacheInfo;
use crate::compress;
use crate::hash::Sha256;
use crate::narinfo::NarInfo;
use crate::signing::SecretKey;
use crate::upstream::{Served, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cache(#[from] cache::Error),
    #[error("{0} has no nix-cache-info: is it a binary cache?")]
    NotACache(String),
}

/// Why one entry was not copied (it is reported; the import goes on).
#[derive(Debug, thiserror::Error)]
enum CopyError {
    #[error("its NAR {0} is missing from the source")]
    NarMissing(String),
    #[error("its NAR {url} has unknown compression {compression:?}")]
    UnknownCompression {
        url: String,
        compression: Option<String>,
    },
    /// The decoder's error is shown, not chained: it is the whole story.
    #[error("its NAR {url} does not decompress: {cause}")]
    Decompress { url: String, cause: std::io::Error },
    #[error("its NAR {url} holds {got_hash} ({got_size} bytes), the narinfo says {want_hash} ({want_size} bytes)")]
    NarMismatch {
        url: String,
        got_hash: Sha256,
        got_size: u64,
        want_hash: Sha256,
        want_size: u64,
    },
    #[error("its NAR {url} has FileHash {got}, the narinfo says {want}")]
    FileHash {
        url: String,
        got: Sha256,
        want: Sha256,
    },
    #[error("its NAR {url} has {got} bytes, FileSize says {want}")]
    FileSize { url: String, got: u64, want: u64 },
    #[error(transparent)]
    Cache(#[from] cache::Error),
    /// The join error's text is part of the message, not a `source`.
    #[error("the task checking its NAR failed: {0}")]
    Task(String),
}

/// Opens both caches for an import: the source must be a binary cache (it has a
/// nix-cache-info); the destination is prepared for the same store (see
/// [`Cache::prepare`]).
pub async fn open(source_url: &str, dest_url: &str) -> Result<(Cache, Cache), Error> {
    let source = Cache::open(source_url)?;
    let dest = Cache::open(dest_url)?;
    let info = source
        .probe()?
        .get("nix-cache-info")
        .await?
        .map(|t| CacheInfo::parse(&String::from_utf8_lossy(&t)))
        .ok_or_else(|| Error::NotACache(source.url().to_string()))?;
    let store_dir = info.store_dir.unwrap_or_else(|| "/nix/store".to_string());
    dest.prepare(&store_dir, info.priority.unwrap_or(40))
        .await?;
    Ok((source, dest))
}

#[derive(Debug, Default)]
pub struct Report {
    pub in_source: usize,
    pub already_there: usize,
    /// Not copied: upstream serves them (see [`crate::upstream`]).
    pub upstream: usize,
    pub imported: usize,
    pub failed: usize,
}

/// Copies what `dest` lacks from `source`, except what `upstream` serves.
pub async fn import(
    source: &Cache,
    dest: &Cache,
    keys: &[SecretKey],
    upstream: &Upstream,
    jobs: usize,
) -> Result<Report, cache::Error> {
    let names: Vec<String> = source
        .list_root()
        .await?
        .into_iter()
        .filter(|n| n.ends_with(".narinfo"))
        .collect();
    let have: HashSet<String> = dest
        .list_root()
        .await?
        .into_iter()
        .filter(|n| n.ends_with(".narinfo"))
        .collect();
    let mut report = Report {
        in_source: names.len(),
        ..Report::default()
    };
    let todo: Vec<&String> = names.iter().filter(|n| !have.contains(*n)).collect();
    report.already_there = names.len() - todo.len();
    // Read the narinfos to copy.
    let fetched = futures::stream::iter(todo.iter().map(|n| async move {
        let text = source.get(n).await?;
        Ok::<_, cache::Error>((n.to_string(), text))
    }))
    .buffer_unordered(jobs.max(1) * 4)
    .collect::<Vec<_>>()
    .await;
    let mut entries: HashMap<String, NarInfo> = HashMap::new();
    for f in fetched {
        let (name, text) = f?;
        match text.map(|t| String::from_utf8_lossy(&t).parse::<NarInfo>()) {
            Some(Ok(info)) if cache::narinfo_key(&info.path) != name => {
                error!(
                    "source {name} describes {}, a path with another hash; not imported",
                    info.store_path()
                );
                report.failed += 1;
            }
            Some(Ok(info)) => {
                entries.insert(info.path.hash_part().to_string(), info);
            }
            Some(Err(e)) => {
                error!("source {name}: {e}; not imported");
                report.failed += 1;
            }
            None => {
                error!("source {name} vanished; not imported");
                report.failed += 1;
            }
        }
    }
    let mut present: HashSet<String> = have
        .iter()
        .map(|n| n.trim_end_matches(".narinfo").to_string())
        .collect();
    // What upstream serves is left out, and satisfies references like what is present.
    for (hash, why) in served_upstream(&entries, upstream, jobs).await? {
        info!("skipped {} ({why})", entries[&hash].store_path());
        entries.remove(&hash);
        present.insert(hash);
        report.upstream += 1;
    }
    let levels = levels(&entries, &present, &mut report);
    // An entry whose reference failed to copy must not be published either.
    let mut failed: HashSet<String> = HashSet::new();
    for level in levels {
        let (ready, blocked): (Vec<String>, Vec<String>) = level.into_iter().partition(|h| {
            !entries[h]
                .references
                .iter()
                .any(|r| failed.contains(r.hash_part()))
        });
        for h in blocked {
            report.failed += 1;
            error!(
                "failed {}: a reference of it failed to copy",
                entries[&h].store_path()
            );
            failed.insert(h);
        }
        let results = futures::stream::iter(ready.into_iter().map(|hash| {
            let info = entries[&hash].clone();
            async move {
                let r = copy_one(source, dest, info.clone(), keys).await;
                (hash, info, r)
            }
        }))
        .buffer_unordered(jobs.max(1))
        .collect::<Vec<_>>()
        .await;
        for (hash, info, r) in results {
            match r {
                Ok(()) => {
                    report.imported += 1;
                    info!("imported {}", info.store_path());
                }
                Err(e) => {
                    report.failed += 1;
                    error!("failed {}: {e}", info.store_path());
                    failed.insert(hash);
                }
            }
        }
    }
    Ok(report)
}

/// The entries upstream serves: signed by an upstream key, or in an upstream cache.
async fn served_upstream(
    entries: &HashMap<String, NarInfo>,
    upstream: &Upstream,
    jobs: usize,
) -> Result<Vec<(String, Served)>, cache::Error> {
    let mut served = Vec::new();
    let mut ask = Vec::new();
    for (hash, info) in entries {
        match upstream.signed_by(&info.sigs) {
            Some(why) => served.push((hash.clone(), why)),
            None if !upstream.caches.is_empty() => ask.push((hash, info)),
            None => {}
        }
    }
    let found = futures::stream::iter(ask.into_iter().map(|(hash, info)| async move {
        upstream.has(&info.path).await.map(|s| (hash.clone(), s))
    }))
    .buffer_unordered(jobs.max(1) * 4)
    .collect::<Vec<_>>()
    .await;
    for f in found {
        if let (hash, Some(why)) = f? {
            served.push((hash, why));
        }
    }
    Ok(served)
}

/// Dependency levels: every entry comes after the entries it refers to. Entries whose
/// references are neither imported nor already present are reported and left out.
fn levels(
    entries: &HashMap<String, NarInfo>,
    present: &HashSet<String>,
    report: &mut Report,
) -> Vec<Vec<String>> {
    let refs = |info: &NarInfo| -> Vec<String> {
        info.references
            .iter()
            .filter(|r| **r != info.path)
            .map(|r| r.hash_part().to_string())
            .collect()
    };
    let mut level_of: HashMap<String, usize> = HashMap::new();
    let mut broken: HashSet<String> = HashSet::new();
    let mut remaining: Vec<&String> = entries.keys().collect();
    remaining.sort();
    let mut depth = 0;
    while !remaining.is_empty() {
        let mut next = Vec::new();
        let mut progressed = false;
        for h in remaining {
            let rs = refs(&entries[h]);
            if let Some(missing) = rs
                .iter()
                .find(|r| !present.contains(*r) && !entries.contains_key(*r) || broken.contains(*r))
            {
                warn!(
                    "not importing {}: its reference {missing} is not in either cache",
                    entries[h].store_path()
                );
                broken.insert(h.clone());
                report.failed += 1;
                progressed = true;
                continue;
            }
            if rs
                .iter()
                .all(|r| present.contains(r) || level_of.get(r).is_some_and(|l| *l < depth))
            {
                level_of.insert(h.clone(), depth);
                progressed = true;
            } else {
                next.push(h);
            }
        }
        if !progressed {
            for h in &next {
                warn!(
                    "not importing {}: reference cycle",
                    entries[*h].store_path()
                );
                report.failed += 1;
            }
            break;
        }
        remaining = next;
        depth += 1;
    }
    let mut levels = vec![Vec::new(); depth];
    for (h, l) in level_of {
        levels[l].push(h);
    }
    levels
}

async fn copy_one(
    source: &Cache,
    dest: &Cache,
    mut info: NarInfo,
    keys: &[SecretKey],
) -> Result<(), CopyError> {
    let url = info.url.clone();
    let mut stream = source
        .get_stream(&url)
        .await?
        .ok_or_else(|| CopyError::NarMissing(url.clone()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let reader = tokio_util::io::StreamReader::new(Box::pin(futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
    )));
    let mut decoder = compress::decoder(info.compression.as_deref(), reader).ok_or_else(|| {
        CopyError::UnknownCompression {
            url: url.clone(),
            compression: info.compression.clone(),
        }
    })?;
    // Decompress beside the copy to check the NarHash.
    let checker = tokio::spawn(async move {
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = decoder.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok::<_, std::io::Error>((Sha256(hasher.finalize().into()), size))
    });
    // The source's name (nar/<FileHash>.nar.xz, or anything) and its extension.
    let extension = url
        .rsplit('/')
        .next()
        .and_then(|name| name.find('.').map(|dot| &name[dot..]))
        .unwrap_or("");
    let expected = info.file_size.unwrap_or(info.nar_size);
    let mut writer = dest.nar_writer(expected, extension);
    let mut file_hasher = sha2::Sha256::new();
    let mut file_size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        file_hasher.update(&chunk);
        file_size += chunk.len() as u64;
        writer.write(chunk.clone()).await?;
        if tx.send(chunk).await.is_err() {
            break; // the decoder stopped: its error is reported below
        }
    }
    drop(tx);
    let (nar_hash, nar_size) = checker
        .await
        .map_err(|e| CopyError::Task(e.to_string()))?
        .map_err(|cause| CopyError::Decompress {
            url: url.clone(),
            cause,
        })?;
    let file_hash = Sha256(file_hasher.finalize().into());
    if nar_hash != info.nar_hash || nar_size != info.nar_size {
        return Err(CopyError::NarMismatch {
            url,
            got_hash: nar_hash,
            got_size: nar_size,
            want_hash: info.nar_hash,
            want_size: info.nar_size,
        });
    }
    if let Some(want) = info.file_hash.filter(|w| *w != file_hash) {
        return Err(CopyError::FileHash {
            url,
            got: file_hash,
            want,
        });
    }
    if let Some(want) = info.file_size.filter(|w| *w != file_size) {
        return Err(CopyError::FileSize {
            url,
            got: file_size,
            want,
        });
    }
    // Under the source's name, or one of its own (see NarWriter::commit).
    info.url = writer.commit(&url).await?.url;
    info.file_hash = Some(file_hash);
    info.file_size = Some(file_size);
    info.sign(keys);
    dest.put(
        &cache::narinfo_key(&info.path),
        bytes::Bytes::from(info.to_string()),
        "text/x-nix-narinfo",
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A narinfo for `<c×32>-<name>` referring to the paths named by `refs`.
    fn entry(c: char, refs: &[char]) -> (String, NarInfo) {
        let base = |c: char| format!("{}-{c}", c.to_string().repeat(32));
        let refs: Vec<String> = refs.iter().map(|r| base(*r)).collect();
        let text = format!(
            "StorePath: /nix/store/{}\nURL: nar/x.nar\nNarHash: sha256:{}\nNarSize: 1\nReferences: {}\n",
            base(c),
            "0".repeat(52),
            refs.join(" ")
        );
        (c.to_string().repeat(32), text.parse().unwrap())
    }

    #[test]
    fn levels_put_references_first_and_leave_out_broken_chains_and_cycles() {
        let entries: HashMap<String, NarInfo> = [
            entry('a', &['a']), // refers to itself only
            entry('b', &['a']),
            entry('c', &['b', 'a']),
            entry('h', &['x']), // x is in the destination already
            entry('d', &['z']), // z is in neither cache
            entry('f', &['d']), // refers to a broken entry
            entry('g', &['i']), // g and i refer to each other
            entry('i', &['g']),
        ]
        .into_iter()
        .collect();
        let present: HashSet<String> = ["x".repeat(32)].into();
        let mut report = Report::default();
        let mut levels = levels(&entries, &present, &mut report);
        for l in &mut levels {
            l.sort();
        }
        let names: Vec<Vec<char>> = levels
            .iter()
            .map(|l| l.iter().map(|h| h.chars().next().unwrap()).collect())
            .collect();
        assert_eq!(names, vec![vec!['a', 'h'], vec!['b'], vec!['c']]);
        assert_eq!(report.failed, 4, "d, f (broken), g, i (cycle)");
    }
}
