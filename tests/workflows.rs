//! The workflows Cachix users know: push exactly what a command builds.

mod common;

use std::process::Command;

use common::*;

#[test]
fn exec_pushes_what_the_command_builds_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-exec");
    let word = unique("exec");
    let expr = tmp.path().join("two.nix");
    std::fs::write(
        &expr,
        format!(
            r#"let mk = name: deps: derivation {{ inherit name deps; system = builtins.currentSystem;
                 builder = "/bin/sh"; PATH = "/usr/bin:/bin";
                 args = [ "-c" "echo ${{name}} > $out; for d in $deps; do echo $d >> $out; done" ]; }};
                 dep = mk "{word}-dep" [];
            in {{ old = mk "{word}-old" []; new = mk "{word}-new" [ dep ]; }}"#
        ),
    )
    .unwrap();
    // Built before: valid already, so the command below does not build it.
    let old = run_ok(
        nix("nix-build")
            .arg(&expr)
            .args(["-A", "old", "--no-out-link", "--quiet"]),
    )
    .trim()
    .to_string();
    let cache = tmp.path().join("cache");
    let out = Command::new(UPLOAD)
        .env("NIX_CONFIG", NIX_CONFIG)
        .arg("exec")
        .arg("--secret-key-file")
        .arg(&keys.secret)
        .arg(format!("file://{}", cache.display()))
        .arg("--")
        .arg("nix-build")
        .arg(&expr)
        .args(["--no-out-link", "--quiet"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let built: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let new = built
        .iter()
        .find(|p| p.ends_with("-new"))
        .expect("nix-build printed new");
    assert_substitutes(&cache, new, &keys.public, tmp.path());
    let narinfo = |p: &str| cache.join(format!("{}.narinfo", &p["/nix/store/".len()..][..32]));
    assert!(narinfo(new).exists());
    assert!(
        !narinfo(&old).exists(),
        "a path valid before the command was pushed: {log}"
    );

    // The command's exit status is upload exec's.
    let out = Command::new(UPLOAD)
        .env("NIX_CONFIG", NIX_CONFIG)
        .arg("exec")
        .arg(&cache)
        .args(["--", "sh", "-c", "exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}
