//! The whole path of a store path through narpipe, judged by real Nix.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn upload_oneshot(cache: &Path, key: &Path, paths: &[String]) -> std::process::Output {
    feed(
        upload_cmd()
            .arg("--secret-key-file")
            .arg(key)
            .arg(format!("file://{}", cache.display())),
        paths,
    )
}

#[test]
fn oneshot_closure_is_substitutable_signed_and_not_uploaded_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-1");
    let other = keygen(tmp.path(), "narpipe-test-1"); // same name, other key
    let root = build_closure(tmp.path(), "oneshot", 4, 3000);
    let closure = closure_of(&root);
    assert_eq!(closure.len(), 7);
    let cache = tmp.path().join("cache");

    let out = upload_oneshot(&cache, &keys.secret, &closure);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "upload failed: {log}");
    assert_eq!(log.matches("uploaded /nix/store/").count(), 7, "{log}");
    assert_eq!(narinfo_count(&cache), 7);
    let info = std::fs::read_to_string(cache.join("nix-cache-info")).unwrap();
    assert!(
        info.contains("StoreDir: /nix/store") && info.contains("Priority: 40"),
        "{info}"
    );

    assert_substitutes(&cache, &root, &keys.public, tmp.path());
    let fresh = tmp.path().join("fresh-other-key");
    let wrong = nix_copy_from(&cache, &root, &fresh, &other.public);
    assert!(
        !wrong.status.success(),
        "nix copy succeeded with the wrong key"
    );
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("lacks a valid signature"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    // Second run: nothing uploaded, nothing rewritten.
    // Narinfos and NARs untouched (start-up writes its write-check object and removes
    // it again: nothing of it is left).
    let stamps = |dir: &Path| -> Vec<_> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name(), e.metadata().unwrap().modified().unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = (stamps(&cache), stamps(&cache.join("nar")));
    let out = upload_oneshot(&cache, &keys.secret, &closure);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(log.matches("uploaded /nix/store/").count(), 0, "{log}");
    assert!(log.contains("0 uploaded"), "{log}");
    assert_eq!(before, (stamps(&cache), stamps(&cache.join("nar"))));
}

#[test]
fn only_the_root_is_enough_and_every_compression_works() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-2");
    let root = build_closure(tmp.path(), "compressions", 2, 20000);
    for comp in ["zstd", "xz", "none"] {
        let cache = tmp.path().join(format!("cache-{comp}"));
        let out = Command::new(UPLOAD)
            .env("NIX_CONFIG", NIX_CONFIG)
            .args(["--compression", comp, "--secret-key-file"])
            .arg(&keys.secret)
            .arg(&cache)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                // A ./result-style symlink to the root, outside the store.
                let link = tmp.path().join(format!("result-{comp}"));
                std::os::unix::fs::symlink(&root, &link).unwrap();
                writeln!(c.stdin.take().unwrap(), "{}", link.display()).unwrap();
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ext = match comp {
            "zstd" => ".nar.zst",
            "xz" => ".nar.xz",
            _ => ".nar",
        };
        let nars: Vec<String> = std::fs::read_dir(cache.join("nar"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(nars.len(), closure_of(&root).len());
        assert!(
            nars.iter()
                .all(|n| n.ends_with(ext) && !n.ends_with(&format!("{ext}.zst"))),
            "{nars:?}"
        );
        assert_substitutes(&cache, &root, &keys.public, tmp.path());
    }
}

#[test]
fn daemon_serves_several_sends_then_drains_on_sighup() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-3");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let log = tmp.path().join("upload.log");
    let mut daemon = upload_daemon(&fifo, &cache, &keys.secret, &log);
    let roots: Vec<String> = (0..3)
        .map(|i| build_closure(tmp.path(), &format!("daemon{i}"), 2, 1000))
        .collect();
    for (i, root) in roots.iter().enumerate() {
        let out = send(&fifo, &[root]);
        assert!(
            out.status.success(),
            "send {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Between sends, the daemon is still up (a closed writer is no EOF for it).
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "upload exited after send {i}"
        );
    }
    // Garbage between valid paths is reported and the daemon goes on.
    let out = send(&fifo, &["/etc/passwd"]);
    assert!(
        !out.status.success(),
        "send accepted a path outside the store"
    );
    std::fs::write(tmp.path().join("garbage"), b"").unwrap();
    {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"not a path\n/nix/store/../etc/passwd\n")
            .unwrap();
    }
    let late = build_closure(tmp.path(), "daemon-late", 1, 100);
    assert!(send(&fifo, &[&late]).status.success());
    daemon.signal(Signal::SIGHUP);
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    // Rejected input makes the exit code 1, but everything valid was uploaded.
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("rejected input \"not a path\""), "{text}");
    assert!(text.contains("/nix/store/../etc/passwd"), "{text}");
    for root in roots.iter().chain([&late]) {
        assert_substitutes(&cache, root, &keys.public, tmp.path());
    }
}

#[test]
fn send_finish_drains_after_the_paths_sent_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-4");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let log = tmp.path().join("upload.log");
    let mut daemon = upload_daemon(&fifo, &cache, &keys.secret, &log);
    let root = build_closure(tmp.path(), "finish", 3, 50_000);
    let out = send(&fifo, &["--finish", &root]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert_substitutes(&cache, &root, &keys.public, tmp.path());
}

#[test]
fn post_build_hook_pushes_what_nix_build_builds() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-5");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let log = tmp.path().join("upload.log");
    let mut daemon = upload_daemon(&fifo, &cache, &keys.secret, &log);
    let hook = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/post-build-hook");
    let expr = tmp.path().join("hooked.nix");
    std::fs::write(&expr, closure_expr("hooked", 2, 500)).unwrap();
    let out = run_ok(
        nix("nix-build")
            .arg(&expr)
            .arg("--no-out-link")
            .arg("--option")
            .arg("post-build-hook")
            .arg(&hook)
            .env("NARPIPE_PIPE", &fifo)
            .env("NARPIPE_SEND", SEND),
    );
    let root = out.trim().to_string();
    // Each built derivation was queued by the hook; finish and check.
    assert!(send(&fifo, &["--finish"]).status.success());
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert_substitutes(&cache, &root, &keys.public, tmp.path());
}

#[test]
fn send_never_hangs_without_a_reader_spools_and_refuses_regular_files() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let spool = tmp.path().join("spool");
    let spool_arg = format!("--spool-dir={}", spool.display());
    let root = build_closure(tmp.path(), "noreader", 0, 10);
    let start = Instant::now();
    let out = send(&fifo, &["--timeout", "1", &spool_arg, &root]);
    let waited = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    // The build must go on: exit 0, with a warning, and the path kept in the spool.
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("no upload is reading") && err.contains("spooled"),
        "{err}"
    );
    assert!(waited < Duration::from_secs(5), "send waited {waited:?}");
    let spooled = narpipe::spool::list(&spool).unwrap();
    assert_eq!(spooled.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&spooled[0]).unwrap(),
        format!("{root}\n")
    );

    let file = tmp.path().join("regular");
    std::fs::write(&file, b"").unwrap();
    // A wrong -o is a configuration error, yet no reason to fail the build: the path
    // is spooled like any other that the pipe cannot take, with a warning, and exit 0.
    let out = send(&file, &[&spool_arg, &root]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("not a named pipe") && err.contains("spooled"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"");

    let missing = tmp.path().join("missing");
    let out = send(&missing, &[&spool_arg, &root]);
    assert!(out.status.success());
    assert!(!missing.exists(), "send created a file in the pipe's place");
    assert_eq!(narpipe::spool::list(&spool).unwrap().len(), 3);
}

/// Lexically valid store paths: send checks names, not validity, so nothing is built.
fn fake_store_path(name: &str) -> String {
    format!("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-{name}")
}

#[test]
fn send_exits_0_whatever_becomes_of_the_paths_and_2_only_for_a_bad_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let (a, b) = (fake_store_path("a"), fake_store_path("b"));
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(SEND)
            .arg("-o")
            .arg(&fifo)
            .args(args)
            .env("NARPIPE_SEND_TIMEOUT", "0.2")
            .env_remove("OUT_PATHS")
            .env_remove("DRV_PATH")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };

    // Neither the pipe nor the spool can take the paths (its parent is a file): the
    // warning says they were not queued and names them; the build still goes on.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let unusable = format!("--spool-dir={}", file.join("spool").display());
    let (code, err) = run(&[&unusable, &a, &b], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.lines().count(), 1, "one warning: {err}");
    assert!(
        err.contains("no upload is reading") && err.contains("NOT queued"),
        "{err}"
    );
    assert!(err.contains(&a) && err.contains(&b), "{err}");
    let (code, err) = run(&[&unusable, "--finish"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("not asked to finish"), "{err}");

    // A bad entry in Nix's $OUT_PATHS is skipped by name; the rest is spooled; exit 0.
    let spool = tmp.path().join("spool");
    let spool_arg = format!("--spool-dir={}", spool.display());
    let (code, err) = run(&[&spool_arg], &[("OUT_PATHS", &format!("/etc/passwd {a}"))]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("\"/etc/passwd\"") && err.contains("spooled"),
        "{err}"
    );
    let spooled = narpipe::spool::list(&spool).unwrap();
    assert_eq!(spooled.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&spooled[0]).unwrap(),
        format!("{a}\n")
    );

    // The same as an argument is the caller's mistake: exit 2 as for a usage error,
    // after the other paths were sent (here: spooled).
    let (code, err) = run(&[&spool_arg, "/etc/passwd", &b], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("\"/etc/passwd\"") && err.contains("spooled"),
        "{err}"
    );
    assert_eq!(narpipe::spool::list(&spool).unwrap().len(), 2);

    // No timeout makes a panic (exit 101): an endless one is a usage error, a huge one
    // is capped.
    let (code, err) = run(&[&spool_arg, "--timeout=inf", &a], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--timeout"), "{err}");
    let missing = tmp.path().join("missing");
    let out = send(&missing, &[&spool_arg, "--timeout=1e300", &a]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("spooled"), "{err}");
}

#[test]
fn configuration_errors_exit_2_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let state_file = tmp.path().join("state-file");
    std::fs::write(&state_file, b"not a directory").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["ftp://example/cache".into()], "ftp://example/cache"),
        (vec!["relative/cache".into()], "relative/cache"),
        (
            vec![
                "--secret-key-file".into(),
                tmp.path().join("nope.sk").display().to_string(),
                tmp.path().join("c").display().to_string(),
            ],
            "nope.sk",
        ),
        (
            vec![
                "--compression".into(),
                "bzip2".into(),
                tmp.path().join("c").display().to_string(),
            ],
            "bzip2",
        ),
        (
            vec![
                "--state-dir".into(),
                state_file.display().to_string(),
                tmp.path().join("c").display().to_string(),
            ],
            "is not a directory",
        ),
        (
            vec![
                "--state-dir".into(),
                state_file.join("sub").display().to_string(),
                tmp.path().join("c").display().to_string(),
            ],
            "is not a directory",
        ),
        (
            vec![
                "exec".into(),
                "--state-dir".into(),
                state_file.display().to_string(),
                tmp.path().join("c").display().to_string(),
                "--".into(),
                "true".into(),
            ],
            "is not a directory",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(UPLOAD)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        if needle == "is not a directory" {
            // Said in words, not as the journal's "File exists (os error 17)".
            assert!(!err.contains("os error"), "{args:?}: {err}");
        }
    }
    // Everything that can fail is checked before anything is created.
    assert!(
        !tmp.path().join("c").exists(),
        "a failed start created the cache folder"
    );
    // A cache made for another store directory is refused.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("nix-cache-info"), "StoreDir: /gnu/store\n").unwrap();
    let out = Command::new(UPLOAD)
        .arg(&other)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/gnu/store"));
}

#[test]
fn invalid_and_unbuilt_paths_fail_with_their_name_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-6");
    let cache = tmp.path().join("cache");
    let good = build_closure(tmp.path(), "mixed", 0, 10);
    let ghost = "/nix/store/00000000000000000000000000000000-never-built".to_string();
    let out = upload_oneshot(&cache, &keys.secret, &[ghost.clone(), good.clone()]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("failed {ghost}")), "{log}");
    assert_substitutes(&cache, &good, &keys.public, tmp.path());
}

/// Starts a one-shot upload of `path` into `dir`/cache, logging to `dir`/upload.log.
fn upload_in_background(
    dir: &Path,
    key: &Path,
    args: &[&str],
    path: &str,
) -> (Proc, std::path::PathBuf, std::path::PathBuf) {
    let cache = dir.join("cache");
    let log = dir.join("upload.log");
    let input = dir.join("input");
    std::fs::write(&input, format!("{path}\n")).unwrap();
    let up = Proc::spawn(
        Command::new(UPLOAD)
            .env("NIX_CONFIG", NIX_CONFIG)
            .args(args)
            .arg("--secret-key-file")
            .arg(key)
            .arg("--input")
            .arg(&input)
            .arg(&cache)
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    (up, cache, log)
}

#[test]
fn sigterm_stops_promptly_and_leaves_no_partial_object() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-7");
    let word = unique("big");
    let big = build_expr(
        tmp.path(),
        "big",
        &format!(
            r#"derivation {{ name = "{word}"; system = builtins.currentSystem; builder = "/bin/sh";
                PATH = "/usr/bin:/bin"; args = [ "-c" "head -c 24000000 /dev/urandom > $out" ]; }}"#
        ),
    );
    let (mut up, cache, log) = upload_in_background(
        tmp.path(),
        &keys.secret,
        &["--compression", "xz", "--compression-level", "0"],
        &big,
    );
    // Wait until the multipart upload of the NAR is under way.
    wait_until(
        Duration::from_secs(60),
        "a multipart upload to start",
        || {
            std::fs::read_dir(cache.join("nar"))
                .map(|d| d.count() > 0)
                .unwrap_or(false)
        },
    );
    up.signal(Signal::SIGTERM);
    let status = up.wait_exit(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("1 unfinished"), "{text}");
    assert_eq!(narinfo_count(&cache), 0);
    let left: Vec<_> = std::fs::read_dir(cache.join("nar"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn a_drv_and_its_own_output_in_one_batch_both_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-8");
    let root = build_closure(tmp.path(), "drv-and-out", 1, 100);
    let drv = run_ok(nix("nix-store").args(["--query", "--deriver", &root]))
        .trim()
        .to_string();
    let cache = tmp.path().join("cache");
    let input = tmp.path().join("input");
    std::fs::write(&input, format!("{drv}\n{root}\n")).unwrap();
    let mut up = Proc::spawn(
        upload_cmd()
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg("--input")
            .arg(&input)
            .arg(&cache)
            .stderr(Stdio::null()),
    );
    assert!(up.wait_exit(Duration::from_secs(60)).success());
    assert_substitutes(&cache, &root, &keys.public, tmp.path());
}

/// A path of `mb` MiB: a third random, the rest compressible text.
fn build_big(dir: &Path, tag: &str, mb: usize) -> String {
    let word = unique(tag);
    let random = mb / 3;
    build_expr(
        dir,
        tag,
        &format!(
            r#"derivation {{ name = "{word}"; system = builtins.currentSystem; builder = "/bin/sh";
                PATH = "/usr/bin:/bin"; args = [ "-c" "mkdir $out; head -c {random}M /dev/urandom > $out/random; seq 1 100000000 | head -c {rest}M > $out/text" ]; }}"#,
            rest = mb - random,
        ),
    )
}

fn only_nar(cache: &Path) -> Vec<u8> {
    let nars: Vec<_> = std::fs::read_dir(cache.join("nar"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(nars.len(), 1, "{nars:?}");
    std::fs::read(&nars[0]).unwrap()
}

#[test]
fn big_nars_as_zstd_frames_and_xz_blocks_are_substituted_by_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-frames");
    let big = build_big(tmp.path(), "frames", 21);
    for (comp, level) in [("zstd", "3"), ("xz", "0")] {
        let cache = tmp.path().join(format!("cache-{comp}"));
        let out = feed(
            upload_cmd()
                .args(["--compression", comp, "--compression-level", level])
                .arg("--secret-key-file")
                .arg(&keys.secret)
                .arg(&cache),
            std::slice::from_ref(&big),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = only_nar(&cache);
        // Several independent pieces in one ordinary file.
        let pieces = match comp {
            "zstd" => {
                let (mut rest, mut frames) = (&file[..], 0);
                while !rest.is_empty() {
                    rest = &rest[zstd::zstd_safe::find_frame_compressed_size(rest).unwrap()..];
                    frames += 1;
                }
                frames
            }
            _ => {
                // The index's record count, found through the footer's backward size.
                let n = file.len();
                let backward = u32::from_le_bytes(file[n - 8..n - 4].try_into().unwrap());
                file[n - 12 - (backward as usize + 1) * 4 + 1] as usize
            }
        };
        assert!(pieces >= 2, "{comp}: {pieces} pieces");
        assert_substitutes(&cache, &big, &keys.public, tmp.path());
    }
}

#[test]
fn sigterm_mid_xz_of_a_big_path_exits_quickly_leaving_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-test-xz-term");
    let big = build_big(tmp.path(), "xzterm", 96);
    let (mut up, cache, log) =
        upload_in_background(tmp.path(), &keys.secret, &["--compression", "xz"], &big);
    // xz -6 of 96 MiB takes tens of seconds here: 3 s in, it is compressing.
    std::thread::sleep(Duration::from_secs(3));
    let asked = Instant::now();
    up.signal(Signal::SIGTERM);
    let status = up.wait_exit(Duration::from_secs(30));
    let took = asked.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} to exit: {text}"
    );
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("1 unfinished"), "{text}");
    assert_eq!(narinfo_count(&cache), 0);
    let left: Vec<_> = std::fs::read_dir(cache.join("nar"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}
