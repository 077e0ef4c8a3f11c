//! What Nix writes besides narinfos and NARs, written by upload and judged by real Nix:
//! NAR listings (`<hash>.ls`), build logs (`log/<name>.drv`), realisations of
//! content-addressed derivations (`realisations/<id>.doi`).

mod common;

use std::path::Path;
use std::time::Duration;

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

/// A derivation that says `marker` on stdout and stderr while it builds.
fn loud_expr(word: &str, marker: &str) -> String {
    format!(
        r#"derivation {{
  name = "{word}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo {marker} on stdout; echo {marker} on stderr >&2; echo built > $out" ];
}}"#
    )
}

fn upload_ok(cache: &Path, flags: &[&str], path: &str) -> String {
    let out = feed(
        upload_cmd()
            .args(flags)
            .arg(format!("file://{}", cache.display())),
        &[path.to_string()],
    );
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    log
}

#[test]
fn nix_log_reads_the_build_log_we_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let word = unique("logged");
    let marker = unique("MARKER");
    let path = build_expr(tmp.path(), &word, &loud_expr(&word, &marker));
    let drv = run_ok(nix("nix-store").args(["--query", "--deriver", &path]));
    let drv_name = Path::new(drv.trim())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    let cache = tmp.path().join("cache");
    upload_ok(&cache, &["--upload-logs"], &path);
    let store = format!("file://{}", cache.display());
    let log = run_ok(nix("nix").args(["log", "--store", &store, &path]));
    assert!(log.contains(&format!("{marker} on stdout")), "{log}");
    assert!(log.contains(&format!("{marker} on stderr")), "{log}");
    // Stored as `nix store copy-log` stores it: the text, uncompressed.
    let stored = std::fs::read(cache.join("log").join(&drv_name)).unwrap();
    let theirs = tmp.path().join("copy-log");
    run_ok(
        nix("nix")
            .args(["store", "copy-log", "--to"])
            .arg(format!("file://{}", theirs.display()))
            .arg(&path),
    );
    assert!(stored == std::fs::read(theirs.join("log").join(&drv_name)).unwrap());

    // Not without the option.
    let plain = tmp.path().join("plain");
    upload_ok(&plain, &[], &path);
    assert!(!plain.join("log").join(&drv_name).exists());
}

#[test]
fn a_missing_or_damaged_log_leaves_the_path_uploaded_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let word = unique("unlogged");
    let path = build_expr(tmp.path(), &word, &loud_expr(&word, "quiet"));
    let drv = run_ok(nix("nix-store").args(["--query", "--deriver", &path]));
    let drv_name = Path::new(drv.trim())
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    // No log where we look.
    let empty = tmp.path().join("no-logs");
    std::fs::create_dir_all(&empty).unwrap();
    let cache = tmp.path().join("cache");
    let dir_flag = format!("--nix-log-dir={}", empty.display());
    upload_ok(&cache, &["--upload-logs", &dir_flag], &path);
    assert!(narinfo_path(&cache, &path).exists());
    assert!(!cache.join("log").join(&drv_name).exists());

    // A log that is not bzip2: reported, left out; the path is uploaded.
    let damaged = tmp.path().join("damaged");
    let sub = damaged.join("drvs").join(&drv_name[..2]);
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join(format!("{}.bz2", &drv_name[2..])), b"garbage").unwrap();
    let cache = tmp.path().join("cache2");
    let dir_flag = format!("--nix-log-dir={}", damaged.display());
    let log = upload_ok(&cache, &["--upload-logs", &dir_flag], &path);
    assert!(narinfo_path(&cache, &path).exists());
    assert!(!cache.join("log").join(&drv_name).exists());
    assert!(
        log.contains("warning:") && log.contains(&drv_name[2..]),
        "{log}"
    );
}

/// Nix with content-addressed derivations (experimental in 2.8).
const CA_CONFIG: &str = "substituters =\nexperimental-features = nix-command ca-derivations";

fn nix_ca(program: &str) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.env("NIX_CONFIG", CA_CONFIG);
    c
}

/// Two floating content-addressed derivations, b referring to a (so that Nix resolves b
/// against a's output before building it), built in the store.
struct CaPair {
    expr: std::path::PathBuf,
    /// Each build adds a line: a build where a substitution was expected shows.
    builds: std::path::PathBuf,
    a_drv: String,
    b_drv: String,
    b: String,
}

/// Builds a [`CaPair`] in `dir`; with `signing_key`, Nix signs the realisations it
/// records (its `secret-key-files`).
fn build_ca_pair(dir: &Path, tag: &str, signing_key: Option<&Path>) -> CaPair {
    let word = unique(tag);
    // Builders run as nixbld users: they need a way to the log of builds.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = dir.join(format!("{tag}-shared"));
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let builds = shared.join("builds");
    // Each derivation may be built by another nixbld user: all of them append.
    std::fs::write(&builds, "").unwrap();
    std::fs::set_permissions(&builds, std::fs::Permissions::from_mode(0o666)).unwrap();
    let expr = dir.join(format!("{tag}.nix"));
    std::fs::write(
        &expr,
        format!(
            r#"let mk = name: deps: derivation {{
  inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  args = [ "-c" "echo ${{name}} >> {builds} || exit 1; echo ${{name}} > $out; for d in $deps; do echo $d >> $out; done" ];
}}; a = mk "{word}-a" []; in {{ inherit a; b = mk "{word}-b" [ a ]; }}"#,
            builds = builds.display()
        ),
    )
    .unwrap();
    let config = match signing_key {
        Some(k) => format!("{CA_CONFIG}\nsecret-key-files = {}", k.display()),
        None => CA_CONFIG.to_string(),
    };
    let instantiate = |attr: &str| {
        run_ok(
            std::process::Command::new("nix-instantiate")
                .env("NIX_CONFIG", &config)
                .arg(&expr)
                .args(["-A", attr]),
        )
        .trim()
        .to_string()
    };
    let (a_drv, b_drv) = (instantiate("a"), instantiate("b"));
    let b = run_ok(
        std::process::Command::new("nix-build")
            .env("NIX_CONFIG", &config)
            .arg(&expr)
            .args(["-A", "b", "--no-out-link", "--quiet"]),
    )
    .trim()
    .to_string();
    assert_eq!(std::fs::read_to_string(&builds).unwrap().lines().count(), 2);
    CaPair {
        expr,
        builds,
        a_drv,
        b_drv,
        b,
    }
}

/// The `.doi` files of a folder cache, parsed, by file name.
fn realisation_docs(cache: &Path) -> std::collections::BTreeMap<String, serde_json::Value> {
    std::fs::read_dir(cache.join("realisations"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect()
}

/// Builds `attr` of `expr` in a fresh store substituting only from `cache`; fails the
/// test if anything is built instead.
fn substitute_fresh(pair: &CaPair, cache: &Path, public_key: &str, fresh: &Path) {
    let _ = std::fs::remove_file(&pair.builds);
    run_ok(
        nix_ca("nix")
            .arg("build")
            .arg("--store")
            .arg(fresh)
            .arg("--no-link")
            .arg("--file")
            .arg(&pair.expr)
            .arg("b")
            .arg("--option")
            .arg("substituters")
            .arg(format!("file://{}", cache.display()))
            .arg("--option")
            .arg("trusted-public-keys")
            .arg(public_key),
    );
    assert!(
        !pair.builds.exists(),
        "something was built instead of substituted"
    );
    assert!(fresh.join(pair.b.trim_start_matches('/')).exists());
}

#[test]
fn realisations_let_nix_substitute_content_addressed_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = build_ca_pair(tmp.path(), "ca", None);
    let b = &pair.b;
    let keys = keygen(tmp.path(), "narpipe-realisations");
    let cache = tmp.path().join("cache");
    let out = feed(
        upload_cmd()
            .arg("--write-realisations")
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg(format!("file://{}", cache.display())),
        std::slice::from_ref(b),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One per output: the realisation of the derivation Nix records as its deriver.
    let docs: Vec<_> = std::fs::read_dir(cache.join("realisations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(docs.len(), 2, "{docs:?}");
    let pk: narpipe::signing::PublicKey = keys.public.parse().unwrap();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sigs = v.as_object_mut().unwrap().remove("signatures").unwrap();
        // Signed over the JSON without signatures, as Realisation::fingerprint does.
        let sig = sigs[0].as_str().unwrap();
        assert!(pk.verifies(&v.to_string(), sig), "{text}");
        let out_path = v["outPath"].as_str().unwrap();
        assert!(narinfo_path(&cache, &format!("/nix/store/{out_path}")).exists());
    }

    // The same bytes as nix copy writes, but for our signature.
    let theirs = tmp.path().join("theirs");
    run_ok(
        nix_ca("nix")
            .arg("copy")
            .arg("--to")
            .arg(format!("file://{}", theirs.display()))
            .arg("--file")
            .arg(&pair.expr)
            .arg("b"),
    );
    let a_id = std::fs::read_dir(theirs.join("realisations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .contains(r#""dependentRealisations":{}"#)
        })
        .expect("nix copy wrote a's realisation");
    let name = a_id.file_name().unwrap();
    let ours = std::fs::read_to_string(cache.join("realisations").join(name)).unwrap();
    let unsigned = without_signatures(&ours);
    assert_eq!(unsigned, std::fs::read_to_string(&a_id).unwrap());

    // A fresh store builds the expression from the cache without building anything
    // (Nix resolves b against a, then finds the resolved derivation's realisation).
    substitute_fresh(&pair, &cache, &keys.public, &tmp.path().join("fresh"));
}

#[test]
fn a_derivation_root_gets_the_realisations_nix_copy_writes_with_those_they_depend_on() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-drv-realisations");
    // Nix signs its realisations with our key, so that nix copy's carry the signature
    // upload makes: the two caches can be compared whole.
    let pair = build_ca_pair(tmp.path(), "cadrv", Some(&keys.secret));
    let upload = |cache: &Path, extra: &[&str], drv: &str| {
        let out = feed(
            upload_cmd()
                .args(extra)
                .arg("--secret-key-file")
                .arg(&keys.secret)
                .arg(format!("file://{}", cache.display())),
            &[drv.to_string()],
        );
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{text}");
        text
    };

    // a.drv, as the post-build hook of Nix 2.8 sends it: its output has no path in
    // the derivation, only in the realisation Nix recorded.
    let only_a = tmp.path().join("only-a");
    upload(&only_a, &[], &pair.a_drv);
    assert_eq!(assert_closed(&only_a), 1);
    assert!(!only_a.join("realisations").exists());

    let cache = tmp.path().join("cache");
    upload(&cache, &["--write-realisations"], &pair.b_drv);
    assert_eq!(assert_closed(&cache), 2);
    let theirs = tmp.path().join("theirs");
    run_ok(
        nix_ca("nix")
            .arg("copy")
            .arg("--to")
            .arg(format!("file://{}", theirs.display()))
            .arg(&pair.b_drv),
    );
    let ours = realisation_docs(&cache);
    let theirs = realisation_docs(&theirs);
    // b's (which depends on a's) and a's.
    assert_eq!(theirs.len(), 2, "{theirs:#?}");
    assert!(
        theirs
            .values()
            .any(|v| v["dependentRealisations"].as_object().unwrap().len() == 1),
        "{theirs:#?}"
    );
    for (name, v) in &theirs {
        assert_eq!(ours.get(name), Some(v), "{name}");
    }
    // And one more: the realisation of the resolved derivation, b's output's deriver.
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert_eq!(extra.len(), 1, "{ours:#?}");
    let resolved = &ours[extra[0]];
    assert_eq!(resolved["dependentRealisations"], serde_json::json!({}));
    assert_eq!(
        format!("/nix/store/{}", resolved["outPath"].as_str().unwrap()),
        pair.b
    );

    // What nix copy writes is enough: without the resolved derivation's realisation
    // a fresh store substitutes b through b's own, and a's it depends on.
    std::fs::remove_file(cache.join("realisations").join(extra[0])).unwrap();
    substitute_fresh(&pair, &cache, &keys.public, &tmp.path().join("fresh"));
}

#[test]
fn a_realisation_that_cannot_be_written_is_retried_until_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = build_ca_pair(tmp.path(), "caretry", None);
    let keys = keygen(tmp.path(), "narpipe-realisation-retry");
    // A file where the folder of realisations goes: every realisation write fails
    // (root as we are, a read-only folder would not stop us), narinfos do not.
    let broken_cache = |name: &str| {
        let cache = tmp.path().join(name);
        std::fs::create_dir(&cache).unwrap();
        std::fs::write(cache.join("realisations"), "in the way").unwrap();
        cache
    };
    let upload = |cache: &Path, state: Option<&Path>, attempts: &str| {
        let mut c = upload_cmd();
        c.args(["--write-realisations", "--max-attempts", attempts])
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg(format!("file://{}", cache.display()));
        if let Some(s) = state {
            c.arg("--state-dir").arg(s);
        }
        c
    };

    // Given up after its attempts: reported, kept in the queue.
    let cache = broken_cache("cache");
    let state = tmp.path().join("state");
    let out = feed(
        &mut upload(&cache, Some(&state), "2"),
        std::slice::from_ref(&pair.b),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("is queued to write them"), "{text}");
    assert!(text.contains("after 2 attempts"), "{text}");
    // The outputs are in the cache all the same.
    assert_eq!(assert_closed(&cache), 2);
    let pending = narpipe::queue::entries(&state).unwrap();
    // The derivations that built a and b, each failed with its reason.
    assert_eq!(pending.len(), 2, "{pending:?}");
    for p in &pending {
        assert!(p.path.ends_with(".drv") && p.failed, "{pending:?}");
        assert!(
            p.last_error
                .as_deref()
                .unwrap_or("")
                .contains("realisations"),
            "{pending:?}"
        );
    }

    // The next start, once the cache is fixed, writes them and retires the roots.
    std::fs::remove_file(cache.join("realisations")).unwrap();
    let out = feed(&mut upload(&cache, Some(&state), "2"), &[]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(realisation_docs(&cache).len(), 2, "{text}");
    assert!(narpipe::queue::entries(&state).unwrap().is_empty());

    // Within one run: retried with backoff until the cache takes them.
    let cache = broken_cache("cache2");
    let log = tmp.path().join("upload2.log");
    let list = tmp.path().join("paths");
    std::fs::write(&list, format!("{}\n", pair.b)).unwrap();
    let mut daemon = Proc::spawn(
        upload(&cache, None, "20")
            .stdin(std::fs::File::open(&list).unwrap())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    wait_until(Duration::from_secs(60), "a failed attempt", || {
        std::fs::read_to_string(&log).unwrap().contains("retrying")
    });
    assert!(cache.join("realisations").is_file(), "still in the way");
    std::fs::remove_file(cache.join("realisations")).unwrap();
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert_eq!(realisation_docs(&cache).len(), 2, "{text}");
    assert_eq!(assert_closed(&cache), 2);
}

/// A `.doi` with its signatures emptied.
fn without_signatures(doi: &str) -> String {
    let i = doi.find(r#","signatures":["#).unwrap();
    format!("{}{}", &doi[..i], r#","signatures":[]}"#)
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
