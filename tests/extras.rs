//! What Nix writes besides narinfos and NARs, written by upload and judged by real Nix:
//! NAR listings (`<hash>.ls`).

mod common;

use std::path::Path;

use common::*;

/// A store path with every kind of node, names Nix's JSON writer must escape, and a
/// file that spans several of the engine's frames.
fn tree_expr(word: &str) -> String {
    format!(
        r#"derivation {{
  name = "{word}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    mkdir -p $out/empty $out/sub/deeper
    printf '#!/bin/sh\n' > $out/run; chmod +x $out/run
    printf x > $out/sub/deeper/one; echo hi > $out/sub/file; : > $out/zero
    printf 123456789 > $out/nine
    head -c 9000000 /dev/urandom > $out/sub/big
    ln -s sub/file $out/link
    printf q > "$out/we\"ird\\name"
    printf t > "$out/$(printf 'tab\there')"
    printf u > $out/ünï
  '' ];
}}"#
    )
}

fn hash_part(path: &str) -> &str {
    &Path::new(path).file_name().unwrap().to_str().unwrap()[..32]
}

#[test]
fn nar_listing_is_what_nix_writes_and_nix_reads_its_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let word = unique("listing");
    let path = build_expr(tmp.path(), &word, &tree_expr(&word));
    let hash = hash_part(&path);

    let ours = tmp.path().join("ours");
    let out = feed(
        upload_cmd()
            .args(["--write-nar-listing", "--compression", "zstd"])
            .arg(format!("file://{}", ours.display())),
        std::slice::from_ref(&path),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = std::fs::read(ours.join(format!("{hash}.ls"))).expect("a listing");

    // What Nix itself writes for the same path.
    let theirs = tmp.path().join("theirs");
    run_ok(
        nix("nix")
            .arg("copy")
            .arg("--to")
            .arg(format!(
                "file://{}?write-nar-listing=true&compression=none",
                theirs.display()
            ))
            .arg(&path),
    );
    let nix_listing = std::fs::read(theirs.join(format!("{hash}.ls"))).unwrap();
    let value = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(value(&listing), value(&nix_listing));
    assert!(
        listing == nix_listing,
        "same JSON, other bytes:\n{}\n{}",
        String::from_utf8_lossy(&listing),
        String::from_utf8_lossy(&nix_listing)
    );

    // Nix 2.8 reads a listing only from a binary cache's local-nar-cache folder (the
    // root object beside the uncompressed NAR), never from the cache itself. Put ours
    // there and take the cache's NAR away: Nix lists the tree from our listing alone,
    // and reads files at our narOffsets.
    let lnc = tmp.path().join("lnc");
    std::fs::create_dir_all(&lnc).unwrap();
    let prefix = br#"{"version":1,"root":"#;
    assert!(listing.starts_with(prefix) && listing.ends_with(b"}"));
    std::fs::write(
        lnc.join(format!("{hash}.ls")),
        &listing[prefix.len()..listing.len() - 1],
    )
    .unwrap();
    let nar = run_ok_bytes(nix("nix-store").arg("--dump").arg(&path));
    std::fs::write(lnc.join(format!("{hash}.nar")), &nar).unwrap();
    for e in std::fs::read_dir(ours.join("nar")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let store = format!(
        "file://{}?local-nar-cache={}",
        ours.display(),
        lnc.display()
    );
    let listed = run_ok(nix("nix").args(["store", "ls", "-lR", "--store", &store, &path]));
    let local = run_ok(nix("nix").args(["store", "ls", "-lR", &path]));
    assert_eq!(listed, local);
    for file in ["sub/file", "sub/big", "nine", "run", "ünï"] {
        let got = run_ok_bytes(
            nix("nix")
                .args(["store", "cat", "--store", &store])
                .arg(format!("{path}/{file}")),
        );
        assert!(
            got == std::fs::read(Path::new(&path).join(file)).unwrap(),
            "{file} read at its narOffset differs"
        );
    }
}

/// Without the option, no listing (Nix's default too).
#[test]
fn no_listing_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let path = build_closure(tmp.path(), "nolisting", 1, 10);
    let cache = tmp.path().join("cache");
    let out = feed(
        upload_cmd().arg(format!("file://{}", cache.display())),
        std::slice::from_ref(&path),
    );
    assert!(out.status.success());
    assert!(narinfo_path(&cache, &path).exists());
    let ls: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "ls")
        })
        .collect();
    assert!(ls.is_empty());
}

fn run_ok_bytes(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
