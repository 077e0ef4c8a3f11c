//! The formats checked against what real Nix produces on this machine.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use common::*;
use narpipe::narinfo::NarInfo;
use narpipe::signing::{PublicKey, SecretKey};

fn nix_dump(path: &Path) -> Vec<u8> {
    let out = nix("nix-store").arg("--dump").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn our_dump(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    narpipe::nar::dump(path, &mut v).unwrap();
    v
}

#[test]
fn nar_writer_equals_nix_store_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    let mut deep = root.clone();
    for i in 0..40 {
        deep = deep.join(format!("d{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf"), b"deep").unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("exec"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("exec"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("group-exec-only"), b"x").unwrap();
    std::fs::set_permissions(
        root.join("group-exec-only"),
        std::fs::Permissions::from_mode(0o654),
    )
    .unwrap();
    // Sizes around the 8-byte padding and the writer's internal buffer.
    for n in [
        1usize,
        7,
        8,
        9,
        255,
        256 * 1024 - 1,
        256 * 1024 + 1,
        1 << 20,
    ] {
        let data: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(root.join(format!("size-{n}")), data).unwrap();
    }
    symlink("exec", root.join("link")).unwrap();
    symlink("/does/not/exist", root.join("dangling")).unwrap();
    symlink("empty-dir", root.join("dir-link")).unwrap();
    // Byte order and locale order differ for these.
    for name in [
        "B", "a", "_x", "Ä", "z", "ä", "10", "9", ".hidden", "a b", "ñ",
    ] {
        std::fs::write(root.join(name), name).unwrap();
    }
    assert_eq!(our_dump(&root), nix_dump(&root));
    // A single file and a symlink as the root, too.
    assert_eq!(our_dump(&root.join("exec")), nix_dump(&root.join("exec")));
    assert_eq!(
        our_dump(&root.join("dangling")),
        nix_dump(&root.join("dangling"))
    );
}

#[test]
fn nar_writer_equals_nix_store_dump_on_store_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let root = build_closure(tmp.path(), "nardump", 1, 5000);
    for p in closure_of(&root) {
        assert_eq!(our_dump(Path::new(&p)), nix_dump(Path::new(&p)), "{p}");
    }
}

#[test]
fn keys_made_by_nix_store_parse_sign_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "cache.example.org-1");
    let sk: SecretKey = std::fs::read_to_string(&keys.secret)
        .unwrap()
        .parse()
        .unwrap();
    let pk: PublicKey = keys.public.parse().unwrap();
    assert_eq!(sk.name(), "cache.example.org-1");
    assert_eq!(sk.public_key().to_string(), keys.public);
    let sig = sk.sign("1;/nix/store/x;sha256:y;1;");
    assert!(pk.verifies("1;/nix/store/x;sha256:y;1;", &sig));
}

#[test]
fn narinfo_written_by_nix_copy_round_trips_and_our_signature_matches_nix_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-format-test");
    let root = build_closure(tmp.path(), "roundtrip", 1, 100);
    let cache = tmp.path().join("ref");
    run_ok(
        nix("nix")
            .arg("copy")
            .arg("--to")
            .arg(format!("file://{}?compression=zstd", cache.display()))
            .arg(&root),
    );
    let sk: SecretKey = std::fs::read_to_string(&keys.secret)
        .unwrap()
        .parse()
        .unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            let text = std::fs::read_to_string(&p).unwrap();
            let info: NarInfo = text.parse().unwrap();
            assert_eq!(info.to_string(), text);
            n += 1;
            // Our signature equals the one `nix store sign` adds to the same path.
            run_ok(
                nix("nix")
                    .args(["store", "sign", "--key-file"])
                    .arg(&keys.secret)
                    .arg(info.store_path()),
            );
            let json = run_ok(
                nix("nix")
                    .args(["path-info", "--json"])
                    .arg(info.store_path()),
            );
            assert!(json.contains(&sk.sign(&info.fingerprint())), "{json}");
        }
    }
    assert_eq!(n, closure_of(&root).len());
}
