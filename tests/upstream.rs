//! What upstream serves is not pushed: by the store's upstream signatures, or by asking
//! an upstream cache; and real Nix still substitutes the whole closure from both.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// An "upstream" cache written by `nix copy` with a base closure whose store paths
/// carry upstream's signature (as substituted paths do), and an app built on top.
struct World {
    tmp: tempfile::TempDir,
    base: String,
    app: String,
    upstream: PathBuf,
    up_keys: Keys,
    our_keys: Keys,
}

const UP_KEY: &str = "upstream-test-1";

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let up_keys = keygen(tmp.path(), UP_KEY);
    let our_keys = keygen(tmp.path(), "narpipe-ours-1");
    let base = build_closure(tmp.path(), "base", 3, 100);
    let app = build_expr(
        tmp.path(),
        "app",
        &format!(
            r#"let base = import ./base.nix; in derivation {{
  name = "{}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir -p $out && echo ${{base}} > $out/ref" ];
}}"#,
            unique("app")
        ),
    );
    run_ok(
        nix("nix")
            .args(["store", "sign", "--key-file"])
            .arg(&up_keys.secret)
            .arg("-r")
            .arg(&base),
    );
    let upstream = tmp.path().join("upstream");
    run_ok(
        nix("nix")
            .arg("copy")
            .arg("--to")
            .arg(format!("file://{}?compression=zstd", upstream.display()))
            .arg(&base),
    );
    World {
        tmp,
        base,
        app,
        upstream,
        up_keys,
        our_keys,
    }
}

impl World {
    fn push(&self, cache: &Path, args: &[&str]) -> (std::process::Output, String) {
        let out = feed(
            upload_cmd()
                .args(args)
                .arg("--secret-key-file")
                .arg(&self.our_keys.secret)
                .arg(cache),
            &closure_of(&self.app),
        );
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{log}");
        (out, log)
    }

    /// Real Nix substitutes the whole closure from `cache` and the upstream together.
    fn assert_substitutes_with_upstream(&self, cache: &Path) {
        let both = self.substitute(
            &[cache, &self.upstream],
            &[&self.our_keys.public, &self.up_keys.public],
        );
        assert!(
            both.status.success(),
            "{}",
            String::from_utf8_lossy(&both.stderr)
        );
    }

    /// Real Nix substitutes the app's whole closure into a fresh store from `caches`.
    fn substitute(&self, caches: &[&Path], keys: &[&str]) -> std::process::Output {
        let fresh = self.tmp.path().join(unique("fresh"));
        let out = nix("nix")
            .arg("build")
            .arg("--store")
            .arg(&fresh)
            .arg("--substituters")
            .arg(
                caches
                    .iter()
                    .map(|c| format!("file://{}", c.display()))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .arg("--trusted-public-keys")
            .arg(keys.join(" "))
            .arg(&self.app)
            .arg("--no-link")
            .output()
            .unwrap();
        if out.status.success() {
            for p in closure_of(&self.app) {
                assert!(
                    fresh.join(p.trim_start_matches('/')).exists(),
                    "{p} missing from the fresh store"
                );
            }
        }
        out
    }
}

#[test]
fn paths_signed_by_an_upstream_key_are_not_pushed_and_nix_substitutes_from_both() {
    let w = world();
    let cache = w.tmp.path().join("ours");
    let (_, log) = w.push(&cache, &["--upstream-key", UP_KEY]);
    let base_closure = closure_of(&w.base);
    assert_eq!(narinfo_count(&cache), 1, "only the app: {log}");
    assert!(narinfo_path(&cache, &w.app).exists());
    assert!(
        log.contains(&format!("signed by upstream key {UP_KEY}")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{} served upstream", base_closure.len())),
        "{log}"
    );
    // As Nix sees it: both caches together serve the closure; ours alone cannot.
    w.assert_substitutes_with_upstream(&cache);
    let alone = w.substitute(&[&cache], &[&w.our_keys.public]);
    assert!(!alone.status.success());

    // verify: the missing references are upstream's, not breakage…
    let out = Command::new(UPLOAD)
        .args(["verify", "--trusted-public-key", &w.our_keys.public])
        .arg(&cache)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("MISSING (upstream?)"), "{report}");
    assert!(!report.contains("BROKEN"), "{report}");
    // …and with the upstream given, found there.
    let out = Command::new(UPLOAD)
        .args([
            "verify",
            "--trusted-public-key",
            &w.our_keys.public,
            "--upstream",
        ])
        .arg(&w.upstream)
        .arg(&cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("references served upstream"), "{err}");
}

#[test]
fn paths_an_upstream_cache_has_are_not_pushed_over_file_and_http() {
    let w = world();
    // By asking the cache (the key name given matches nothing in the store).
    let cache = w.tmp.path().join("ours-file");
    let upstream_url = format!("file://{}", w.upstream.display());
    let (_, log) = w.push(
        &cache,
        &[
            "--upstream-key",
            "no-such-key-1",
            "--upstream",
            &upstream_url,
        ],
    );
    assert_eq!(narinfo_count(&cache), 1, "{log}");
    assert!(log.contains(&format!("{upstream_url} has it")), "{log}");

    // The same upstream over HTTP (a plain static file server).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Proc::spawn(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .arg("--directory")
            .arg(&w.upstream)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_until(Duration::from_secs(20), "the HTTP server", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let cache = w.tmp.path().join("ours-http");
    let http = format!("http://127.0.0.1:{port}");
    let (_, log) = w.push(
        &cache,
        &["--upstream-key", "no-such-key-1", "--upstream", &http],
    );
    assert_eq!(narinfo_count(&cache), 1, "{log}");
    assert!(log.contains(&format!("{http} has it")), "{log}");
    w.assert_substitutes_with_upstream(&cache);
    // An upstream that cannot be reached stops the start (before any work).
    let out = feed(
        upload_cmd()
            .args(["--upstream", "http://127.0.0.1:9"])
            .arg(w.tmp.path().join("ours-unreachable")),
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_upstream_pushes_everything_and_import_honours_the_filter() {
    let w = world();
    let full = w.tmp.path().join("full");
    w.push(&full, &["--upstream-key", UP_KEY, "--no-upstream"]);
    let closure = closure_of(&w.app);
    assert_eq!(narinfo_count(&full), closure.len());
    assert_eq!(assert_closed(&full), closure.len());
    // Importing it elsewhere leaves out what upstream signed (its narinfos carry the
    // store's upstream signatures).
    let dest = w.tmp.path().join("imported");
    let out = Command::new(UPLOAD)
        .args(["import", "--upstream-key", UP_KEY])
        .arg(&full)
        .arg(&dest)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(narinfo_count(&dest), 1, "{log}");
    assert!(narinfo_path(&dest, &w.app).exists(), "{log}");
    assert!(
        log.contains(&format!("{} served upstream", closure_of(&w.base).len())),
        "{log}"
    );
}
