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
use crate::compress;
use crate::hash::Sha256;
use crate::narinfo::NarInfo;
use crate::signing::SecretKey;

#[derive(Debug, Default)]
pub struct Report {
    pub in_source: usize,
    pub already_there: usize,
    pub imported: usize,
    pub failed: usize,
}

/// Copies what `dest` lacks from `source`.
pub async fn import(
    source: &Cache,
    dest: &Cache,
    keys: &[SecretKey],
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
        let hash = name.trim_end_matches(".narinfo").to_string();
        match text.map(|t| String::from_utf8_lossy(&t).parse::<NarInfo>()) {
            Some(Ok(info)) => {
                entries.insert(hash, info);
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
    let present: HashSet<String> = have
        .iter()
        .map(|n| n.trim_end_matches(".narinfo").to_string())
        .collect();
    let levels = levels(&entries, &present, &mut report);
    // An entry whose reference failed to copy must not be published either.
    let mut failed: HashSet<String> = HashSet::new();
    for level in levels {
        let (ready, blocked): (Vec<String>, Vec<String>) = level.into_iter().partition(|h| {
            !entries[h]
                .references
                .iter()
                .any(|r| failed.contains(r.get(..32).unwrap_or(r)))
        });
        for h in blocked {
            report.failed += 1;
            error!(
                "failed {}: a reference of it failed to copy",
                entries[&h].store_path
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
                    info!("imported {}", info.store_path);
                }
                Err(e) => {
                    report.failed += 1;
                    error!("failed {}: {e:#}", info.store_path);
                    failed.insert(hash);
                }
            }
        }
    }
    Ok(report)
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
            .map(|r| r.get(..32).unwrap_or(r).to_string())
            .filter(|r| !info.store_path.contains(&format!("/{r}-")))
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
                    entries[h].store_path
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
                warn!("not importing {}: reference cycle", entries[*h].store_path);
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
) -> anyhow::Result<()> {
    let mut stream = source
        .get_stream(&info.url)
        .await?
        .ok_or_else(|| anyhow::anyhow!("its NAR {} is missing from the source", info.url))?;
    let compression = info.compression.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let reader = tokio_util::io::StreamReader::new(Box::pin(futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx)) },
    )));
    let mut decoder = compress::decoder(compression.as_deref(), reader)
        .ok_or_else(|| anyhow::anyhow!("unknown compression {compression:?}"))?;
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
    let mut writer = dest.nar_writer();
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
        .await?
        .map_err(|e| anyhow::anyhow!("its NAR {} does not decompress: {e}", info.url))?;
    let file_hash = Sha256(file_hasher.finalize().into());
    anyhow::ensure!(
        nar_hash == info.nar_hash && nar_size == info.nar_size,
        "its NAR {} holds {nar_hash} ({nar_size} bytes), the narinfo says {} ({} bytes)",
        info.url,
        info.nar_hash,
        info.nar_size
    );
    if let Some(want) = info.file_hash {
        anyhow::ensure!(
            want == file_hash,
            "its NAR {} has FileHash {file_hash}, the narinfo says {want}",
            info.url
        );
    }
    if let Some(want) = info.file_size {
        anyhow::ensure!(
            want == file_size,
            "its NAR {} has {file_size} bytes, FileSize says {want}",
            info.url
        );
    }
    writer.commit(&info.url).await?;
    info.file_hash = Some(file_hash);
    info.file_size = Some(file_size);
    let fp = info.fingerprint();
    for key in keys {
        let prefix = format!("{}:", key.name());
        info.sigs.retain(|s| !s.starts_with(&prefix));
        info.sigs.push(key.sign(&fp));
    }
    let hash = info
        .store_path
        .rsplit('/')
        .next()
        .and_then(|b| b.get(..32))
        .ok_or_else(|| anyhow::anyhow!("bad StorePath {}", info.store_path))?
        .to_string();
    dest.put(
        &format!("{hash}.narinfo"),
        bytes::Bytes::from(info.to_string()),
        "text/x-nix-narinfo",
    )
    .await?;
    Ok(())
}
