//! S3 (SeaweedFS), GCS (fake-gcs-server), Azure (Azurite) and HTTP (nginx WebDAV) backends on real
//! servers on 127.0.0.1, judged by real Nix substituting from a mirror of the bucket, or
//! over HTTP from the server itself.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::servers::{mirror, runtime, Azurite, FakeGcs, Nginx, S3Proxy, Seaweed};
use common::*;
use object_store::ObjectStoreExt;

fn run_upload(mut cmd: Command, key: &Path, url: &str, paths: &[String]) -> Output {
    feed(cmd.arg("--secret-key-file").arg(key).arg(url), paths)
}

fn big_path(dir: &Path, tag: &str, bytes: usize) -> String {
    let word = unique(tag);
    build_expr(
        dir,
        tag,
        &format!(
            r#"derivation {{ name = "{word}"; system = builtins.currentSystem; builder = "/bin/sh";
                PATH = "/usr/bin:/bin"; args = [ "-c" "mkdir $out; head -c {bytes} /dev/urandom > $out/blob" ]; }}"#
        ),
    )
}

/// Every object of a mirrored cache has the Content-Type Nix's own writers give it,
/// and is a narinfo, a NAR (a staging `nar/tmp-*` one too when `staging_ok`) or
/// nix-cache-info.
fn assert_content_types(objects: &[(String, Option<String>)], staging_ok: bool) {
    for (name, ct) in objects {
        let want = if name.ends_with(".narinfo") {
            "text/x-nix-narinfo"
        } else if name.starts_with("nar/") && (staging_ok || !name.contains("tmp-")) {
            "application/x-nix-nar"
        } else if name == "nix-cache-info" {
            "text/x-nix-cache-info"
        } else {
            panic!("unexpected object {name}")
        };
        assert_eq!(ct.as_deref(), Some(want), "{name}");
    }
}

#[test]
fn s3_closure_with_a_multipart_nar_is_substitutable() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-s3");
    let s3 = Seaweed::start();
    let root = build_closure(tmp.path(), "s3", 3, 2000);
    let big = big_path(tmp.path(), "s3-big", 12 << 20);
    let mut paths = closure_of(&root);
    paths.push(big.clone());
    let url = s3.url("nixcache", "some/prefix");

    let out = run_upload(s3.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("uploaded /nix/store/").count(),
        paths.len(),
        "{log}"
    );

    let dest = tmp.path().join("mirror");
    let objects = mirror(&*s3.store("nixcache"), "some/prefix", &dest);
    assert_content_types(&objects, true);
    assert_eq!(assert_closed(&dest), paths.len());
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
    assert_substitutes(&dest, &big, &keys.public, tmp.path());

    let again = run_upload(s3.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("0 uploaded"), "{log}");
}

#[test]
fn s3_start_up_errors_say_which_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let s3 = Seaweed::start();
    let url = s3.url("nixcache", "errs");

    let mut wrong = s3.upload_cmd();
    wrong.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let out = wrong.arg(&url).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the credentials were rejected"), "{err}");

    let closed = format!(
        "s3://nixcache?endpoint=http://127.0.0.1:{}",
        common::servers::free_port()
    );
    let out = s3
        .upload_cmd()
        .arg(&closed)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the endpoint cannot be reached"), "{err}");

    let out = s3
        .upload_cmd()
        .arg(format!(
            "s3://nixcache?endpoint={}&s3ForcePathStyle=true",
            s3.endpoint
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown parameter \"s3ForcePathStyle\""),
        "{err}"
    );

    // A profile from the AWS shared files.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/credentials"),
        format!(
            "[ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            common::servers::S3_KEY,
            common::servers::S3_SECRET
        ),
    )
    .unwrap();
    let keys = keygen(tmp.path(), "narpipe-s3-profile");
    let root = build_closure(tmp.path(), "s3-profile", 0, 10);
    let mut cmd = Command::new(UPLOAD);
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", &home);
    let out = run_upload(cmd, &keys.secret, &format!("{url}&profile=ci"), &[root]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn gcs_closure_with_a_multipart_nar_is_substitutable() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-gcs");
    let gcs = FakeGcs::start("gcache");
    let root = build_closure(tmp.path(), "gcs", 2, 2000);
    let big = big_path(tmp.path(), "gcs-big", 10 << 20);
    let mut paths = closure_of(&root);
    paths.push(big.clone());
    let mut cmd = Command::new(UPLOAD);
    cmd.env("NIX_CONFIG", NIX_CONFIG);
    let out = run_upload(cmd, &keys.secret, &gcs.url("gcache", "pre"), &paths);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");

    let dest = tmp.path().join("mirror");
    let objects = mirror(&*gcs.store("gcache"), "pre", &dest);
    assert!(objects
        .iter()
        .any(|(n, ct)| n.ends_with(".narinfo") && ct.as_deref() == Some("text/x-nix-narinfo")));
    assert!(
        !objects.iter().any(|(n, _)| n.contains("tmp-")),
        "{objects:?}"
    );
    assert_eq!(assert_closed(&dest), paths.len());
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
    assert_substitutes(&dest, &big, &keys.public, tmp.path());
}

#[test]
fn three_uploaders_on_one_bucket_keep_it_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-three");
    let s3 = Seaweed::start();
    let url = s3.url("shared", "c");
    // Three roots over one shared base closure, plus a shared big path.
    let base = build_closure(tmp.path(), "three-base", 6, 50_000);
    let big = big_path(tmp.path(), "three-big", 9 << 20);
    let roots: Vec<String> = (0..3)
        .map(|i| {
            let word = unique(&format!("three-{i}"));
            build_expr(
                tmp.path(),
                &format!("three{i}"),
                &format!(
                    r#"derivation {{ name = "{word}"; system = builtins.currentSystem; builder = "/bin/sh";
                        PATH = "/usr/bin:/bin"; args = [ "-c" "echo {base} {big} > $out" ]; }}"#
                ),
            )
        })
        .collect();
    let children: Vec<_> = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            // Each gets its own root and the whole shared closure, in a different order.
            let mut paths = closure_of(root);
            let n = paths.len();
            paths.rotate_left(i * 3 % n);
            let mut cmd = s3.upload_cmd();
            cmd.args(["--jobs", "3", "--secret-key-file"])
                .arg(&keys.secret)
                .arg(&url)
                .stdin(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            for p in &paths {
                writeln!(stdin, "{p}").unwrap();
            }
            drop(stdin);
            child
        })
        .collect();
    let mut uploaded = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        uploaded += log.matches("uploaded /nix/store/").count();
    }
    let all: HashSet<String> = roots.iter().flat_map(|r| closure_of(r)).collect();
    assert!(
        uploaded >= all.len(),
        "only {uploaded} uploads for {} paths",
        all.len()
    );

    let dest = tmp.path().join("mirror");
    mirror(&*s3.store("shared"), "c", &dest);
    assert_eq!(assert_closed(&dest), all.len());
    for root in &roots {
        assert_substitutes(&dest, root, &keys.public, tmp.path());
    }
}

#[test]
fn s3_outage_mid_upload_loses_nothing_and_publishes_nothing_broken() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-outage");
    let mut s3 = Seaweed::start();
    let url = s3.url("outage", "c");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let root = build_closure(tmp.path(), "outage", 8, 400_000);
    let big = big_path(tmp.path(), "outage-big", 30 << 20);
    let log = tmp.path().join("upload.log");
    let mut cmd = s3.upload_cmd();
    cmd.args([
        "--jobs",
        "1",
        "--compression",
        "xz",
        "--compression-level",
        "0",
    ])
    .arg("--state-dir")
    .arg(tmp.path().join("state"))
    .arg("--input")
    .arg(&fifo)
    .arg("--secret-key-file")
    .arg(&keys.secret)
    .arg(&url)
    .stdin(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap());
    let mut daemon = Proc::spawn(&mut cmd);
    assert!(send(&fifo, &[&big, &root]).status.success());
    // Let some of it land, then take the server away in the middle of the rest.
    let store = s3.store("outage");
    wait_until(
        std::time::Duration::from_secs(60),
        "a first narinfo",
        || {
            let rt = common::servers::runtime();
            rt.block_on(async {
                use futures::TryStreamExt;
                let list: Vec<_> = store
                    .list(Some(&"c".into()))
                    .try_collect()
                    .await
                    .unwrap_or_default();
                list.iter()
                    .any(|m| m.location.as_ref().ends_with(".narinfo"))
            })
        },
    );
    s3.stop();
    std::thread::sleep(std::time::Duration::from_secs(3));
    s3.resume();
    assert!(send(&fifo, &["--finish"]).status.success());
    let status = daemon.wait_exit(std::time::Duration::from_secs(300));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");

    let dest = tmp.path().join("mirror");
    mirror(&*s3.store("outage"), "c", &dest);
    let all = closure_of(&root).len() + 1;
    assert_eq!(assert_closed(&dest), all, "{text}");
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
    assert_substitutes(&dest, &big, &keys.public, tmp.path());
}

#[test]
fn import_a_nix_copy_cache_into_s3_even_when_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let theirs = keygen(tmp.path(), "narpipe-import-src");
    let ours = keygen(tmp.path(), "narpipe-import-dst");
    let s3 = Seaweed::start();
    let root = build_closure(tmp.path(), "import", 6, 300_000);
    let big = big_path(tmp.path(), "import-big", 6 << 20);
    // A cache written by Nix itself (xz, Nix's default), signed with Nix's tooling.
    let src = tmp.path().join("src");
    for p in [&root, &big] {
        run_ok(
            nix("nix")
                .arg("copy")
                .arg("--to")
                .arg(format!(
                    "file://{}?secret-key={}",
                    src.display(),
                    theirs.secret.display()
                ))
                .arg(p),
        );
    }
    let url = s3.url("imported", "c");
    let import = || {
        let mut c = s3.upload_cmd();
        c.arg("import")
            .arg(format!("file://{}", src.display()))
            .arg(&url)
            .arg("--secret-key-file")
            .arg(&ours.secret)
            .args(["--jobs", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    // Interrupt the first run as soon as something has landed.
    let mut first = Proc::spawn(&mut import());
    let store = s3.store("imported");
    let landed = || {
        let rt = common::servers::runtime();
        rt.block_on(async {
            use futures::TryStreamExt;
            let l: Vec<_> = store
                .list(Some(&"c".into()))
                .try_collect()
                .await
                .unwrap_or_default();
            l.iter()
                .filter(|m| m.location.as_ref().ends_with(".narinfo"))
                .count()
        })
    };
    wait_until(
        std::time::Duration::from_secs(60),
        "a first imported narinfo",
        || landed() > 0,
    );
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(std::time::Duration::from_secs(10));
    let all = closure_of(&root).len() + 1;
    let partial = landed();
    assert!(
        partial < all,
        "the import finished before it could be interrupted"
    );

    let out = import().output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("{partial} already in")), "{log}");

    let dest = tmp.path().join("mirror");
    mirror(&*s3.store("imported"), "c", &dest);
    assert_eq!(assert_closed(&dest), all);
    // Their signatures kept, ours added: either key alone is enough for Nix.
    for key in [&theirs.public, &ours.public] {
        assert_substitutes(&dest, &root, key, tmp.path());
        assert_substitutes(&dest, &big, key, tmp.path());
    }
}

#[test]
fn a_large_rerun_on_s3_lists_the_bucket_instead_of_asking_for_each_path() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-listing");
    let s3 = Seaweed::start();
    let root = wide_closure(tmp.path(), 1500);
    let closure = closure_of(&root);
    assert_eq!(closure.len(), 1500);
    let url = s3.url("listing", "deep/prefix");
    let out = run_upload(s3.upload_cmd(), &keys.secret, &url, &closure);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The narinfo of path 0 (it has no references) gone: the listing shows it missing.
    let zero = closure
        .iter()
        .find(|p| p.ends_with("-0"))
        .expect("path 0 of the wide closure");
    let name = format!("deep/prefix/{}.narinfo", &zero["/nix/store/".len()..][..32]);
    let store = s3.store("listing");
    runtime()
        .block_on(store.delete(&name.as_str().into()))
        .unwrap();
    let out = run_upload(s3.upload_cmd(), &keys.secret, &url, &closure);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("listed the cache: 1499 narinfos"), "{log}");
    assert!(log.contains("1 uploaded"), "{log}");
    assert!(log.contains(&format!("uploaded {zero}")), "{log}");

    let dest = tmp.path().join("mirror");
    mirror(&*store, "deep/prefix", &dest);
    assert_eq!(assert_closed(&dest), 1500);
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
}

/// upload with no HTTP credentials but those given here.
fn http_upload() -> Command {
    let mut c = upload_cmd();
    c.env_remove("NARPIPE_HTTP_AUTH")
        .env_remove("NARPIPE_HTTP_AUTH_FILE");
    c
}

fn basic(login: &str, password: &str) -> String {
    use base64::Engine;
    let pair = format!("{login}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// Every file below `dir`, relative, sorted.
fn files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn http_closure_with_a_big_nar_is_substitutable_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-http");
    // Anyone may read; only "ci" may write, as a netrc file says (Nix's own format).
    let web = Nginx::start(&[basic("ci", "s3cret")]);
    let netrc = tmp.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login ci password s3cret\n").unwrap();
    let root = build_closure(tmp.path(), "http", 3, 2000);
    // Past SMALL_NAR even compressed: held in memory, put once, then moved into place.
    let big = big_path(tmp.path(), "http-big", 20 << 20);
    let mut paths = closure_of(&root);
    paths.push(big.clone());
    // A prefix no earlier run used: Nix remembers narinfos per cache URL.
    let prefix = format!("nix/{}", unique("cache"));
    let url = web.url(&prefix);
    let mut cmd = http_upload();
    cmd.env("NARPIPE_HTTP_AUTH_FILE", &netrc);
    let out = run_upload(cmd, &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("uploaded /nix/store/").count(),
        paths.len(),
        "{log}"
    );

    let dir = web.root().join(&prefix);
    for name in files_below(&dir) {
        assert!(
            name == "nix-cache-info"
                || name.ends_with(".narinfo") && !name.contains('/')
                || name.starts_with("nar/") && name.ends_with(".nar.zst"),
            "unexpected file {name}"
        );
    }
    assert_eq!(assert_closed(&dir), paths.len());
    assert_substitutes_from(&url, &root, &keys.public, tmp.path());
    assert_substitutes_from(&url, &big, &keys.public, tmp.path());
    let other = keygen(tmp.path(), "narpipe-http-other");
    let refused = nix_copy_from_url(&url, &root, &tmp.path().join("refused"), &other.public);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("signature"), "{err}");

    // A re-run: everything is there (looked up path by path), the write check is gone.
    let mut cmd = http_upload();
    cmd.env("NARPIPE_HTTP_AUTH_FILE", &netrc);
    let again = run_upload(cmd, &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("0 uploaded"), "{log}");
    assert!(!dir.join(".narpipe-write-check").exists());
}

#[test]
fn http_credentials_come_from_a_file_or_the_environment_and_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-http-auth");
    let web = Nginx::start(&["Bearer tok-123".to_string()]);
    let prefix = unique("c");
    let url = web.url(&prefix);
    let start = |env: &[(&str, &str)], url: &str| {
        let mut cmd = http_upload();
        cmd.envs(env.iter().copied());
        let out = cmd.arg(url).stdin(Stdio::null()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let port = web.port;
    let for_here = format!("machine 127.0.0.1:{port} token tok-123");
    for (env, want) in [
        (vec![], "the credentials were rejected"),
        (
            vec![("NARPIPE_HTTP_AUTH", "machine 127.0.0.1 token wrong")],
            "the credentials were rejected",
        ),
        // Credentials are only sent to the host they are written for.
        (
            vec![("NARPIPE_HTTP_AUTH", "machine 127.0.0.2 token tok-123")],
            "the credentials were rejected",
        ),
        (
            vec![
                ("NARPIPE_HTTP_AUTH", for_here.as_str()),
                ("NARPIPE_HTTP_AUTH_FILE", "/nonexistent"),
            ],
            "not both",
        ),
        (
            vec![("NARPIPE_HTTP_AUTH", "machine 127.0.0.1 login ci")],
            "has a login but no password",
        ),
    ] {
        let (code, err) = start(&env, &url);
        assert_eq!(code, Some(2), "{env:?}: {err}");
        assert!(err.contains(want), "{env:?}: {err}");
    }
    // Never in the URL, and never echoed.
    let (code, err) = start(&[], &url.replace("127.0.0.1", "ci:hunter2@127.0.0.1"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NARPIPE_HTTP_AUTH_FILE"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let (code, err) = start(&[("NARPIPE_HTTP_AUTH", &for_here)], &web.url("static/c"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the server refuses uploads there"), "{err}");
    let closed = format!("http://127.0.0.1:{}/c", common::servers::free_port());
    let (code, err) = start(&[], &closed);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the endpoint cannot be reached"), "{err}");

    // The right token, from the environment.
    let root = build_closure(tmp.path(), "http-auth", 1, 10);
    let mut cmd = http_upload();
    cmd.env("NARPIPE_HTTP_AUTH", &for_here);
    let out = run_upload(cmd, &keys.secret, &url, &closure_of(&root));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_substitutes_from(&url, &root, &keys.public, tmp.path());
}

#[test]
fn a_large_rerun_on_a_server_that_cannot_list_asks_path_by_path() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-http-listing");
    let web = Nginx::start(&[]);
    let root = wide_closure(tmp.path(), 1200);
    let closure = closure_of(&root);
    let url = web.url("wide");
    let out = run_upload(http_upload(), &keys.secret, &url, &closure);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let zero = closure
        .iter()
        .find(|p| p.ends_with("-0"))
        .expect("path 0 of the wide closure");
    let dir = web.root().join("wide");
    std::fs::remove_file(narinfo_path(&dir, zero)).unwrap();
    let out = run_upload(http_upload(), &keys.secret, &url, &closure);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("asking path by path"), "{log}");
    assert!(log.contains("PROPFIND"), "{log}");
    assert!(log.contains("1 uploaded"), "{log}");
    assert!(log.contains(&format!("uploaded {zero}")), "{log}");
    assert_eq!(assert_closed(&dir), 1200);
    assert_substitutes(&dir, &root, &keys.public, tmp.path());
}

#[test]
fn azure_closure_with_a_multipart_nar_is_substitutable() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-azure");
    let az = Azurite::start("nixcache");
    let root = build_closure(tmp.path(), "azure", 3, 2000);
    let big = big_path(tmp.path(), "azure-big", 12 << 20);
    let mut paths = closure_of(&root);
    paths.push(big.clone());
    let url = az.url("nixcache", "some/prefix");

    let out = run_upload(az.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("uploaded /nix/store/").count(),
        paths.len(),
        "{log}"
    );

    let dest = tmp.path().join("mirror");
    let objects = mirror(&*az.store("nixcache"), "some/prefix", &dest);
    assert_content_types(&objects, false);
    assert_eq!(assert_closed(&dest), paths.len());
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
    assert_substitutes(&dest, &big, &keys.public, tmp.path());

    let again = run_upload(az.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("0 uploaded"), "{log}");
}

#[test]
fn azure_start_up_errors_say_which_and_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let az = Azurite::start("nixcache");
    let url = az.url("nixcache", "errs");
    let start = |mut cmd: Command, url: &str| {
        let out = cmd.arg(url).stdin(Stdio::null()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A well-formed key that is not the account's.
    let mut wrong = az.upload_cmd();
    wrong.env(
        "AZURE_STORAGE_ACCOUNT_KEY",
        "bm90LXRoZS1rZXktbm90LXRoZS1rZXktbm90LXRoZS1rZXk=",
    );
    let (code, err) = start(wrong, &url);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the credentials were rejected"), "{err}");

    let (code, err) = start(az.upload_cmd(), &az.url("missing", "c"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the container does not exist"), "{err}");

    let (code, err) = start(az.upload_cmd(), &format!("{url}&access_key=x"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown parameter \"access_key\""), "{err}");

    let closed = format!(
        "azure://nixcache?account=devstoreaccount1&endpoint=http://127.0.0.1:{}/devstoreaccount1",
        common::servers::free_port()
    );
    let (code, err) = start(az.upload_cmd(), &closed);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the endpoint cannot be reached"), "{err}");

    // The account from the environment, as object_store reads it.
    let keys = keygen(tmp.path(), "narpipe-azure-env");
    let root = build_closure(tmp.path(), "azure-env", 0, 10);
    let mut cmd = az.upload_cmd();
    cmd.env(
        "AZURE_STORAGE_ACCOUNT_NAME",
        common::servers::AZURITE_ACCOUNT,
    );
    let env_url = format!("azure://nixcache/env?endpoint={}", az.endpoint);
    let out = run_upload(cmd, &keys.secret, &env_url, &[root]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The narinfo of `path` in the folder `dir`.
fn narinfo_in(dir: &Path, path: &str) -> narpipe::narinfo::NarInfo {
    std::fs::read_to_string(narinfo_path(dir, path))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn s3_nar_too_big_to_copy_is_published_under_its_own_name() {
    // S3 refuses to copy an object of more than 5 GiB (CopyObject); the proxy refuses
    // the same way from 10 MiB on, so that the case needs no 5 GiB of disk.
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-copy-limit");
    let s3 = Seaweed::start();
    let proxy = S3Proxy::start(&s3, &["--copy-limit", &(10 << 20).to_string()]);
    // Random bytes: compressed they stay 9 and 12 MiB, both multipart uploads.
    let copied = big_path(tmp.path(), "copied", 9 << 20);
    let kept = big_path(tmp.path(), "kept", 12 << 20);
    let paths = vec![copied.clone(), kept.clone()];
    let url = proxy.url("copylimit", "c");
    let out = run_upload(s3.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("2 uploaded"), "{log}");

    // Both streamed under a name of their own; the 9 MiB one was copied to its content
    // name, the 12 MiB one's copy was refused and it stayed.
    let requests = proxy.requests();
    let copies: Vec<_> = requests
        .iter()
        .filter(|r| r.copy_source.is_some())
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert_eq!(copies.iter().filter(|r| r.status == 200).count(), 1);
    assert_eq!(copies.iter().filter(|r| r.status == 400).count(), 1);

    let dest = tmp.path().join("mirror");
    let objects = mirror(&*s3.store("copylimit"), "c", &dest);
    let copied_info = narinfo_in(&dest, &copied);
    let kept_info = narinfo_in(&dest, &kept);
    let file_hash = |rel: &str| {
        use sha2::Digest;
        narpipe::hash::Sha256(sha2::Sha256::digest(std::fs::read(dest.join(rel)).unwrap()).into())
    };
    assert_eq!(
        copied_info.url,
        format!("nar/{}.nar.zst", copied_info.file_hash.unwrap().to_nix32())
    );
    let own = kept_info
        .url
        .strip_prefix("nar/")
        .and_then(|n| n.strip_suffix(".nar.zst"))
        .unwrap();
    assert!(uuid::Uuid::try_parse(own).is_ok(), "{}", kept_info.url);
    // The FileHash is that of the bytes, whatever the name.
    for info in [&copied_info, &kept_info] {
        assert_eq!(info.file_hash, Some(file_hash(&info.url)), "{}", info.url);
    }
    // Nothing else was left: every NAR in the bucket is one a narinfo names.
    let nars: HashSet<&str> = objects
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("nar/"))
        .collect();
    assert_eq!(
        nars,
        HashSet::from([copied_info.url.as_str(), kept_info.url.as_str()])
    );
    assert_eq!(assert_closed(&dest), 2);
    assert_substitutes(&dest, &copied, &keys.public, tmp.path());
    assert_substitutes(&dest, &kept, &keys.public, tmp.path());

    let again = run_upload(s3.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{log}");
    assert!(log.contains("0 uploaded"), "{log}");
}

#[test]
fn s3_throttling_is_waited_out_counted_and_eased_off() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-throttle");
    let s3 = Seaweed::start();
    // From the first NAR write on, every request is refused for 3 s: 429 with
    // Retry-After: 1.
    let proxy = S3Proxy::start(&s3, &["--throttle", "3", "--retry-after", "1"]);
    let root = build_closure(tmp.path(), "throttle", 40, 20_000);
    let big = big_path(tmp.path(), "throttle-big", 10 << 20);
    let mut paths = closure_of(&root);
    paths.push(big.clone());
    let url = proxy.url("throttled", "c");
    let out = run_upload(s3.upload_cmd(), &keys.secret, &url, &paths);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("uploaded /nix/store/").count(),
        paths.len(),
        "{log}"
    );

    let requests = proxy.requests();
    let refused: Vec<_> = requests.iter().filter(|r| r.status == 429).collect();
    assert!(!refused.is_empty(), "nothing was throttled");
    // Each refusal was counted (and retried: everything is in the cache).
    assert!(
        log.contains(&format!(", {} requests throttled", refused.len())),
        "{} refused; {log}",
        refused.len()
    );
    // Retry-After was honoured: a refused request came again a second later at the
    // earliest (object_store alone retries after 0.2 s).
    for r in &refused {
        let again = requests
            .iter()
            .find(|q| {
                q.start > r.end && q.method == r.method && q.path == r.path && q.query == r.query
            })
            .unwrap_or_else(|| panic!("{r:?} was not retried"));
        assert!(
            again.start - r.end >= 0.9,
            "retried {:.3}s after a 429 with Retry-After: 1: {r:?}",
            again.start - r.end
        );
    }
    // Fewer requests at once while refused (as few as the warning says, or fewer:
    // the limit may have been halved again), more again once it stopped, then no
    // limit at all.
    let limit: usize = log
        .split("pushes back (HTTP 429): at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pushback warning: {log}"));
    let last_refusal = refused.iter().map(|r| r.end).fold(0.0, f64::max);
    let after: Vec<_> = requests.iter().filter(|r| r.start > last_refusal).collect();
    let at_once = |r: &common::servers::Logged| {
        after
            .iter()
            .filter(|q| q.start < r.end && q.end > r.start)
            .count()
    };
    assert!(
        at_once(after[0]) <= limit,
        "{} at once, limit {limit}",
        at_once(after[0])
    );
    assert!(after.iter().any(|r| at_once(r) > limit.max(2)));
    assert!(log.contains("no longer pushes back"), "{log}");

    let dest = tmp.path().join("mirror");
    mirror(&*s3.store("throttled"), "c", &dest);
    assert_eq!(assert_closed(&dest), paths.len());
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
    assert_substitutes(&dest, &big, &keys.public, tmp.path());
}

#[test]
fn max_rate_caps_the_bytes_written() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-rate");
    let s3 = Seaweed::start();
    let proxy = S3Proxy::start(&s3, &[]);
    let big = big_path(tmp.path(), "rate", 20 << 20);
    let url = proxy.url("rated", "c");
    let began = std::time::SystemTime::now();
    let mut cmd = s3.upload_cmd();
    cmd.args(["--max-rate", "5M"]);
    let out = run_upload(cmd, &keys.secret, &url, std::slice::from_ref(&big));
    let took = began.elapsed().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // 20 MiB at 5 MiB/s takes 4 s; without the cap well under one here.
    assert!(took.as_secs_f64() >= 3.0, "took {took:?}");

    // As the server saw it: from the start of the run to the last NAR byte, no faster
    // than the cap.
    let nar_writes: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| (r.method == "PUT" || r.method == "POST") && r.path.contains("/nar/"))
        .collect();
    let written: u64 = nar_writes.iter().map(|r| r.bytes).sum();
    assert!(written >= 20 << 20, "{written} bytes");
    let started = began
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = nar_writes.iter().map(|r| r.end).fold(0.0, f64::max);
    let rate = written as f64 / (last - started);
    assert!(
        rate <= 5.0 * (1 << 20) as f64 * 1.05,
        "{:.2} MiB/s",
        rate / (1 << 20) as f64
    );
}

/// Narinfos in a folder cache (0 while it does not exist).
fn narinfos_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "narinfo"))
        })
        .count()
    })
}

#[test]
fn several_caches_one_down_holds_up_none_and_catches_up_when_back() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-several");
    let mut s3 = Seaweed::start();
    let web = Nginx::start(&[]);
    let folder = tmp.path().join("folder");
    let s3_url = s3.url("several", "c");
    let prefix = format!("nix/{}", unique("several"));
    let http_url = web.url(&prefix);
    let http_dir = web.root().join(&prefix);
    let root = build_closure(tmp.path(), "several", 5, 300_000);
    let big = big_path(tmp.path(), "several-big", 12 << 20);
    let all = closure_of(&root).len() + 1;
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let state = tmp.path().join("state");
    let start = |s3: &Seaweed, log: &Path| {
        let mut cmd = s3.upload_cmd();
        cmd.env_remove("NARPIPE_HTTP_AUTH")
            .env_remove("NARPIPE_HTTP_AUTH_FILE")
            .args(["--jobs", "2", "--max-attempts", "20"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--input")
            .arg(&fifo)
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg(&folder)
            .arg(&s3_url)
            .arg(&http_url)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        Proc::spawn(&mut cmd)
    };
    let log1 = tmp.path().join("upload-1.log");
    let mut daemon = start(&s3, &log1);
    // Up at start (each cache is checked in turn, the HTTP one last), then S3 goes away.
    wait_until(
        std::time::Duration::from_secs(60),
        "start-up checks",
        || {
            if let Some(st) = daemon.0.try_wait().unwrap() {
                let text = std::fs::read_to_string(&log1).unwrap();
                panic!("upload exited at start ({st}): {text}");
            }
            http_dir.join("nix-cache-info").exists()
        },
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    s3.stop();
    assert!(send(&fifo, &[&big, &root]).status.success());
    // The folder and the HTTP server get everything while S3 is down.
    wait_until(
        std::time::Duration::from_secs(120),
        "the folder and HTTP caches",
        || narinfos_in(&folder) == all && narinfos_in(&http_dir) == all,
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_exit(std::time::Duration::from_secs(30));
    let text = std::fs::read_to_string(&log1).unwrap();
    assert_eq!(assert_closed(&folder), all, "{text}");
    assert_eq!(assert_closed(&http_dir), all, "{text}");

    // Started again while S3 is still down: the others are not held up, and the
    // queue remembers that only S3 still needs the first closure.
    let log2 = tmp.path().join("upload-2.log");
    let mut daemon = start(&s3, &log2);
    let root2 = build_closure(tmp.path(), "several-2", 3, 1000);
    let all2 = closure_of(&root2).len();
    assert!(send(&fifo, &[&root2]).status.success());
    wait_until(
        std::time::Duration::from_secs(120),
        "the second closure in the folder and HTTP caches",
        || narinfos_in(&folder) == all + all2 && narinfos_in(&http_dir) == all + all2,
    );
    // S3 comes back during the run: it catches up with both closures.
    s3.resume();
    assert!(send(&fifo, &["--finish"]).status.success());
    let status = daemon.wait_exit(std::time::Duration::from_secs(300));
    let text = std::fs::read_to_string(&log2).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("cannot be reached"), "{text}");
    let uploaded_to = |cache: &str| {
        text.lines()
            .filter(|l| l.starts_with("uploaded ") && l.contains(&format!(" to {cache} ")))
            .count()
    };
    assert_eq!(uploaded_to("s3://several/c"), all + all2, "{text}");
    assert_eq!(
        uploaded_to(&format!("file://{}", folder.display())),
        all2,
        "{text}"
    );
    assert_eq!(uploaded_to(&http_url), all2, "{text}");
    let dest = tmp.path().join("mirror");
    mirror(&*s3.store("several"), "c", &dest);
    assert_eq!(assert_closed(&dest), all + all2, "{text}");
    let status = upload_cmd()
        .arg("status")
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&status.stdout);
    assert!(!listed.contains("/nix/store/"), "still owed: {listed}");

    // Nix substitutes the closure from each of the three.
    assert_substitutes(&folder, &root, &keys.public, tmp.path());
    assert_substitutes(&dest, &big, &keys.public, tmp.path());
    assert_substitutes(&dest, &root, &keys.public, tmp.path());
    assert_substitutes_from(&http_url, &root, &keys.public, tmp.path());
    assert_substitutes_from(&http_url, &big, &keys.public, tmp.path());
    assert_substitutes(&dest, &root2, &keys.public, tmp.path());
}
