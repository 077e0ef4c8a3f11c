//! Uploading one store path: stream its NAR, then build and sign its narinfo.
//!
//! ```text
//! filesystem ─ engine (plain threads: walk, NarHash, compress, FileHash) ─▶ NarWriter
//!                                             bounded channel            (async task)
//! ```
//! The NAR is never whole in memory. When the stream ends its hash and size are
//! compared with the store's database; a mismatch drops the writer, so nothing is
//! published. Only then is the NAR committed under `nar/<FileHash>.nar.<ext>`.

use std::path::PathBuf;

use crate::cache::{self, Cache};
use crate::compress::Compression;
use crate::engine::{self, Engine, Next};
use crate::hash::Sha256;
use crate::narinfo::NarInfo;
use crate::nix::PathInfo;
use crate::signing::SecretKey;
use crate::store_path::StoreDir;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Engine {
        path: String,
        #[source]
        source: engine::Error,
    },
    #[error("{path} does not match the store's database (NAR {got_hash}, {got_size} bytes; expected {want_hash}, {want_size} bytes): refusing to publish")]
    Mismatch {
        path: String,
        got_hash: Sha256,
        got_size: u64,
        want_hash: Sha256,
        want_size: u64,
    },
    #[error(transparent)]
    Cache(#[from] cache::Error),
}

/// Where a NAR went and what it looks like compressed.
#[derive(Debug, Clone)]
pub struct NarFile {
    pub url: String,
    pub compression: Compression,
    pub file_hash: Sha256,
    pub file_size: u64,
}

/// Streams the NAR of `info.path` into the cache and returns where it went.
pub async fn upload_nar(
    engine: &Engine,
    cache: &Cache,
    store_dir: &StoreDir,
    info: &PathInfo,
    compression: Compression,
    level: Option<i32>,
) -> Result<NarFile, Error> {
    let path_text = store_dir.display(&info.path);
    let failed = |source| Error::Engine {
        path: path_text.clone(),
        source,
    };
    let mut nar = engine
        .nar(PathBuf::from(&path_text), compression, level)
        .await
        .map_err(failed)?;
    let mut writer = cache.nar_writer();
    let digest = loop {
        match nar.next().await.map_err(failed)? {
            Next::Data(bytes) => writer.write(bytes).await?,
            Next::End(digest) => break digest,
        }
    };
    if digest.nar_hash != info.nar_hash || digest.nar_size != info.nar_size {
        return Err(Error::Mismatch {
            path: path_text,
            got_hash: digest.nar_hash,
            got_size: digest.nar_size,
            want_hash: info.nar_hash,
            want_size: info.nar_size,
        });
    }
    let url = format!(
        "nar/{}{}",
        digest.file_hash.to_nix32(),
        compression.nar_extension()
    );
    writer.commit(&url).await?;
    Ok(NarFile {
        url,
        compression,
        file_hash: digest.file_hash,
        file_size: digest.file_size,
    })
}

/// The narinfo for `info` whose NAR is `nar`, signed with `keys` (a store signature by
/// a key of the same name is replaced, others are kept).
pub fn narinfo(
    store_dir: &StoreDir,
    info: &PathInfo,
    nar: &NarFile,
    keys: &[SecretKey],
) -> NarInfo {
    let mut n = NarInfo {
        store_path: store_dir.display(&info.path),
        url: nar.url.clone(),
        compression: Some(nar.compression.to_string()),
        file_hash: Some(nar.file_hash),
        file_size: Some(nar.file_size),
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.iter().map(|r| r.to_string()).collect(),
        deriver: info.deriver.as_ref().map(|d| d.to_string()),
        system: None,
        sigs: info.sigs.clone(),
        ca: info.ca.clone(),
        extra: Vec::new(),
    };
    let fingerprint = n.fingerprint();
    for key in keys {
        let prefix = format!("{}:", key.name());
        n.sigs.retain(|s| !s.starts_with(&prefix));
        n.sigs.push(key.sign(&fingerprint));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar;
    use crate::store_path::StorePath;
    use sha2::Digest;
    use tokio::io::AsyncReadExt;

    fn info_for(store: &std::path::Path, name: &str) -> (StoreDir, PathInfo) {
        let sd = StoreDir::new(store.to_str().unwrap()).unwrap();
        let sp = StorePath::from_base_name(name).unwrap();
        let mut nar_bytes = Vec::new();
        nar::dump(&store.join(name), &mut nar_bytes).unwrap();
        let info = PathInfo {
            path: sp,
            nar_hash: Sha256(sha2::Sha256::digest(&nar_bytes).into()),
            nar_size: nar_bytes.len() as u64,
            references: vec![],
            deriver: None,
            sigs: vec!["other:keep".into(), "test1:replace".into()],
            ca: None,
        };
        (sd, info)
    }

    #[tokio::test]
    async fn uploads_verifies_and_names_by_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let name = "xav0pws0268idny9wi60ylqqiyryzfz6-data";
        std::fs::create_dir_all(store.join(name)).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 7) as u8).collect();
        std::fs::write(store.join(name).join("f"), &big).unwrap();
        let (sd, info) = info_for(&store, name);
        let cache = Cache::open(dir.path().join("cache").to_str().unwrap()).unwrap();

        let nar = upload_nar(
            &Engine::new(2).unwrap(),
            &cache,
            &sd,
            &info,
            Compression::Zstd,
            None,
        )
        .await
        .unwrap();
        assert!(nar.url.starts_with("nar/") && nar.url.ends_with(".nar.zst"));
        let stored = cache.get(&nar.url).await.unwrap().unwrap();
        assert_eq!(stored.len() as u64, nar.file_size);
        assert_eq!(Sha256(sha2::Sha256::digest(&stored).into()), nar.file_hash);
        let mut dec = async_compression::tokio::bufread::ZstdDecoder::new(&stored[..]);
        let mut back = Vec::new();
        dec.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len() as u64, info.nar_size);

        let key: SecretKey = "test1:r24vQqTnkATLONjgTaM8aV7fa8eXJyaoyvEZXPKB8pUeYGoppkkXqZu/Sa5bm0UGNTBDygnOi6lW5aKp+Z9JWQ==".parse().unwrap();
        let ni = narinfo(&sd, &info, &nar, &[key]);
        assert_eq!(ni.sigs.len(), 2);
        assert_eq!(ni.sigs[0], "other:keep");
        assert!(key_verifies(&ni));
    }

    fn key_verifies(ni: &NarInfo) -> bool {
        let pk: crate::signing::PublicKey = "test1:HmBqKaZJF6mbv0muW5tFBjUwQ8oJzoupVuWiqfmfSVk="
            .parse()
            .unwrap();
        ni.sigs.iter().any(|s| pk.verifies(&ni.fingerprint(), s))
    }

    #[tokio::test]
    async fn refuses_to_publish_when_the_nar_differs_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let name = "xav0pws0268idny9wi60ylqqiyryzfz6-data";
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join(name), b"original").unwrap();
        let (sd, info) = info_for(&store, name);
        std::fs::write(store.join(name), b"tampered").unwrap();
        let cache = Cache::open(dir.path().join("cache").to_str().unwrap()).unwrap();
        let err = upload_nar(
            &Engine::new(2).unwrap(),
            &cache,
            &sd,
            &info,
            Compression::None,
            None,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains(name));
        let nar_dir = dir.path().join("cache/nar");
        let left = std::fs::read_dir(&nar_dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0);
    }
}
