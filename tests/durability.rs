//! Never lose a path: crashes, restarts, upload being away, persistent failures, and
//! garbage on the pipe.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::strace::{named_after_sync, traced_calls, Call};
use common::*;
use nix::sys::signal::Signal;

/// ~210 paths: 200 leaves of assorted sizes, 10 groups over them, one root.
fn crash_closure_expr(tag: &str) -> String {
    let word = unique(tag);
    blob_expr(&format!(
        r#"  leaves = builtins.genList (i: mk "{word}-leaf-${{toString i}}" (1000 + 791 * i * i / 100) []) 200;
  group = g: mk "{word}-group-${{toString g}}" 100 (builtins.genList (i: builtins.elemAt leaves (g * 20 + i)) 20);
in mk "{word}-root" 100 (builtins.genList group 10)
"#
    ))
}

/// The roots the state dir's queue still holds, read as `upload status` does (while
/// an upload may run).
fn queued(state: &Path) -> Vec<narpipe::queue::Entry> {
    narpipe::queue::entries(state).unwrap()
}

#[test]
fn kill_9_at_random_moments_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-crash");
    let root = build_expr(tmp.path(), "crash", &crash_closure_expr("crash"));
    let closure = closure_of(&root);
    assert!(closure.len() >= 200, "{}", closure.len());
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let state = tmp.path().join("state");
    let log = tmp.path().join("upload.log");
    // One slow NAR at a time, so that kills land mid-upload.
    let start = || {
        upload_daemon_with(
            &fifo,
            &cache,
            &keys.secret,
            &log,
            &[
                "--jobs",
                "1",
                "--compression",
                "xz",
                "--compression-level",
                "0",
            ],
        )
    };
    let mut daemon = start();
    assert!(send(&fifo, &[&root]).status.success());
    // Accepted means journaled: from here on a crash must not lose it.
    wait_until(Duration::from_secs(30), "the root to be journaled", || {
        queued(&state).iter().any(|e| e.path == root)
    });
    // Kill at random moments until ten kills have cut work short (at most 60 kills).
    let (mut kills, mut interrupted) = (0, 0);
    while interrupted < 10 && kills < 60 {
        std::thread::sleep(Duration::from_millis(fastrand::u64(20..300)));
        daemon.signal(Signal::SIGKILL);
        daemon.wait_exit(Duration::from_secs(10));
        kills += 1;
        // Pending in the journal and not all in the cache: this kill cut work short.
        let pending = queued(&state);
        if !pending.is_empty() && narinfo_count(&cache) < closure.len() {
            interrupted += 1;
        }
        daemon = start();
    }
    assert!(send(&fifo, &["--finish"]).status.success());
    let status = daemon.wait_exit(Duration::from_secs(300));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(
        interrupted >= 10,
        "only {interrupted} of {kills} kills landed mid-upload"
    );
    assert!(text.contains("resuming"), "{text}");
    assert_eq!(assert_closed(&cache), closure.len());
    assert_substitutes(&cache, &root, &keys.public, tmp.path());
    // Retired: the journal holds nothing pending.
    let pending = queued(&state);
    assert!(pending.is_empty(), "{pending:?}");
    eprintln!("{interrupted} of {kills} kills interrupted pending work");
}

/// Sets a file's modification time `ago` into the past.
fn age(file: &Path, ago: Duration) {
    let f = std::fs::File::options().write(true).open(file).unwrap();
    f.set_modified(std::time::SystemTime::now() - ago).unwrap();
}

#[test]
fn leftovers_of_a_kill_9_are_removed_at_start_once_stale_and_young_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-leftovers");
    let word = unique("leftover-big");
    let big = build_expr(
        tmp.path(),
        "leftover-big",
        &format!(
            r#"derivation {{ name = "{word}"; system = builtins.currentSystem; builder = "/bin/sh";
                PATH = "/usr/bin:/bin"; args = [ "-c" "head -c 24000000 /dev/urandom > $out" ]; }}"#
        ),
    );
    let cache = tmp.path().join("cache");
    let input = tmp.path().join("input");
    std::fs::write(&input, format!("{big}\n")).unwrap();
    let upload = || {
        let mut cmd = Command::new(UPLOAD);
        cmd.env("NIX_CONFIG", NIX_CONFIG)
            .args(["--compression", "xz", "--compression-level", "0"])
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg("--input")
            .arg(&input)
            .arg(&cache)
            .stdout(Stdio::null());
        cmd
    };
    // kill -9 while the NAR streams as a multipart upload: its staging file stays.
    let mut up = Proc::spawn(upload().stderr(Stdio::null()));
    let staged = |name: &str| name.starts_with("tmp-") && name.contains(".part#");
    let nar = cache.join("nar");
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(60),
        "a multipart upload to start",
        || names(&nar).iter().any(|n| staged(n)),
    );
    up.signal(Signal::SIGKILL);
    up.wait_exit(Duration::from_secs(10));
    let killed: Vec<String> = names(&nar).into_iter().filter(|n| staged(n)).collect();
    assert_eq!(killed.len(), 1, "{:?}", names(&nar));

    // What other interrupted writes leave (object_store stages every put as
    // <object>#<N>; a multipart NAR lives as tmp-<uuid>.part until renamed)…
    let narinfo_hash = &Path::new(&big).file_name().unwrap().to_str().unwrap()[..32];
    let stale: Vec<std::path::PathBuf> = [
        nar.join(&killed[0]),
        cache.join(format!("{narinfo_hash}.narinfo#1")),
        cache.join("nix-cache-info#2"),
        nar.join(format!("{}.nar.xz#1", "1".repeat(52))),
        nar.join("tmp-5f0c6a52-6f6e-4a43-9d3b-0b7c2f0d9a11.part"),
    ]
    .into();
    // …and what is not ours to remove, or may be another uploader's work right now.
    let young = nar.join("tmp-7d1e2f3a-1b2c-4d5e-8f90-a1b2c3d4e5f6.part#1");
    let foreign = [cache.join("notes#1"), cache.join("index.html")];
    for f in stale.iter().chain([&young]).chain(&foreign) {
        if !f.exists() {
            std::fs::write(f, b"partial").unwrap();
        }
    }
    for f in stale.iter().chain(&foreign) {
        age(f, Duration::from_secs(2 * 3600));
    }

    let out = upload().stderr(Stdio::piped()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for f in &stale {
        assert!(!f.exists(), "{} was left: {text}", f.display());
    }
    assert!(young.exists(), "a young staging file was removed");
    for f in &foreign {
        assert!(f.exists(), "{} is not ours: removed", f.display());
    }
    assert!(
        text.contains(&format!(
            "removed {} files left by interrupted uploads",
            stale.len()
        )),
        "{text}"
    );
    assert_substitutes(&cache, &big, &keys.public, tmp.path());
}

#[test]
fn send_while_upload_is_down_spools_and_upload_picks_it_up() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-spool");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let state = tmp.path().join("state");
    let spool = state.join("spool");
    let roots: Vec<String> = (0..3)
        .map(|i| build_closure(tmp.path(), &format!("spooled{i}"), 1, 500))
        .collect();
    for r in &roots {
        let out = Command::new(SEND)
            .arg("-o")
            .arg(&fifo)
            .arg("--timeout=0.5")
            .env("NARPIPE_SPOOL_DIR", &spool)
            .arg(r)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(narpipe::spool::list(&spool).unwrap().len(), 3);
    // A path spooled and then garbage-collected before upload runs.
    let doomed = build_closure(tmp.path(), "doomed", 0, 10);
    narpipe::spool::write(&spool, std::slice::from_ref(&doomed)).unwrap();
    run_ok(nix("nix-store").arg("--delete").arg(&doomed));

    let log = tmp.path().join("upload.log");
    let mut daemon = upload_daemon(&fifo, &cache, &keys.secret, &log);
    // The spool is emptied once its paths are recorded.
    wait_until(Duration::from_secs(30), "the spool to be picked up", || {
        narpipe::spool::list(&spool).unwrap().is_empty()
    });
    assert!(send(&fifo, &["--finish"]).status.success());
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the GC'd path counts as failed: {text}"
    );
    assert!(text.contains(&format!("failed {doomed}")), "{text}");
    for r in &roots {
        assert_substitutes(&cache, r, &keys.public, tmp.path());
    }
    let pending = queued(&state);
    assert!(pending.is_empty(), "GC'd path not retired: {pending:?}");
}

#[test]
fn a_path_that_keeps_failing_is_kept_with_its_reason_and_retried_next_start() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-persist");
    let cache = tmp.path().join("cache");
    let state = tmp.path().join("state");
    let good = build_closure(tmp.path(), "persist", 1, 100);
    std::fs::create_dir_all(&cache).unwrap();
    // Nothing can be written under nar/ while a file stands in its place.
    std::fs::write(cache.join("nar"), b"in the way").unwrap();
    let upload = |input: &str| {
        let mut child = Command::new(UPLOAD)
            .env("NIX_CONFIG", NIX_CONFIG)
            .args(["--max-attempts", "2", "--secret-key-file"])
            .arg(&keys.secret)
            .arg("--state-dir")
            .arg(&state)
            .arg(&cache)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = upload(&format!("{good}\n"));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("retrying"), "{text}");
    assert!(
        text.contains(&format!("failed {good} after 2 attempts")) && text.contains("next start"),
        "{text}"
    );
    let pending = queued(&state);
    assert_eq!(pending.len(), 1);
    assert!(pending[0].failed, "{pending:?}");
    assert_eq!(pending[0].attempts, 2, "{pending:?}");
    assert!(
        pending[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("nar"),
        "{pending:?}"
    );
    // `upload status` says the same.
    let out = Command::new(UPLOAD)
        .args(["status", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    let line = shown.lines().find(|l| l.contains(&good)).unwrap_or("");
    assert!(
        line.starts_with("failed")
            && line.contains("2 failed attempts")
            && line.contains("last error:"),
        "{shown}"
    );
    assert!(shown.contains("0 pending, 1 failed"), "{shown}");

    std::fs::remove_file(cache.join("nar")).unwrap();
    let out = upload("");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("retrying") || text.contains("failed before"),
        "{text}"
    );
    assert_substitutes(&cache, &good, &keys.public, tmp.path());
    let pending = queued(&state);
    assert!(pending.is_empty());
}

/// Rejected input lines a log shows, and those it only counts in summaries
/// ("… and N more rejected input lines in the last S s").
fn rejected_in_log(text: &str) -> (usize, usize) {
    let shown = text
        .lines()
        .filter(|l| l.starts_with("warning: rejected input"))
        .count();
    let summarised = text
        .lines()
        .filter_map(|l| l.strip_prefix("warning: … and "))
        .map(|rest| {
            let n = rest.split(' ').next().unwrap().replace(',', "");
            assert!(
                rest.contains(" more rejected input lines in the last "),
                "{rest}"
            );
            n.parse::<usize>().unwrap()
        })
        .sum();
    (shown, summarised)
}

#[test]
fn binary_garbage_makes_a_few_short_log_lines_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-flood");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let log = tmp.path().join("upload.log");
    let mut daemon = upload_daemon(&fifo, &cache, &keys.secret, &log);
    let valid = build_closure(tmp.path(), "after-flood", 0, 100);
    // 100 KB of random bytes: ~400 lines, some far longer than PIPE_BUF.
    let garbage: Vec<u8> = (0..100_000).map(|_| fastrand::u8(..)).collect();
    {
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(&garbage).unwrap();
        w.write_all(b"\n").unwrap();
    }
    // The lines held back are summarised when their window ends, not only at exit.
    wait_until(
        Duration::from_secs(30),
        "the summary of rejected lines",
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("more rejected input lines in the last 10 s")
        },
    );
    assert!(send(&fifo, &["--finish", &valid]).status.success());
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert_substitutes(&cache, &valid, &keys.public, tmp.path());
    let (shown, summarised) = rejected_in_log(&text);
    assert!(shown <= 20, "{shown} rejected lines shown: {text}");
    assert!(summarised > 0, "{text}");
    // Counts stay exact: the summary line counts every one.
    assert!(
        text.contains(&format!("{} rejected inputs", shown + summarised)),
        "{text}"
    );
    let longest = text.lines().map(str::len).max().unwrap();
    assert!(longest <= 1000, "a log line of {longest} bytes");
    assert!(text.len() < 30_000, "{} bytes of log", text.len());
}

#[test]
fn a_failing_reference_is_logged_when_it_finally_fails_not_at_every_attempt() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-failing-ref");
    let root = build_closure(tmp.path(), "failing-ref", 1, 100);
    let leaf = closure_of(&root)
        .into_iter()
        .find(|p| p.ends_with("-0"))
        .unwrap();
    // Uncompressed, the leaf's NAR is named by its NarHash: a directory in its place
    // makes every attempt to publish it fail, and everything above it with it.
    let nar_hash = run_ok(nix("nix-store").args(["-q", "--hash", &leaf]));
    let nix32 = nar_hash.trim().strip_prefix("sha256:").unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(cache.join(format!("nar/{nix32}.nar/in-the-way"))).unwrap();
    let out = feed(
        upload_cmd()
            .args(["--compression", "none", "--max-attempts", "3"])
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg(&cache),
        std::slice::from_ref(&root),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let about_leaf: Vec<&str> = text.lines().filter(|l| l.contains(&leaf)).collect();
    // Its first failure while the backoff runs, and its last, with the attempt count.
    assert_eq!(about_leaf.len(), 2, "{text}");
    assert!(
        about_leaf[0].starts_with(&format!("warning: retrying {root} in "))
            && about_leaf[0].contains("attempt 1 of 3 failed"),
        "{text}"
    );
    assert!(
        about_leaf[1].starts_with(&format!("error: failed {root} after 3 attempts: ")),
        "{text}"
    );
    assert!(text.contains("1 failed"), "{text}");
}

#[test]
fn a_thousand_bad_lines_do_not_stop_the_valid_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-garbage");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let log = tmp.path().join("upload.log");
    let mut daemon = upload_daemon(&fifo, &cache, &keys.secret, &log);
    let valid: Vec<String> = (0..5)
        .map(|i| build_closure(tmp.path(), &format!("amid-garbage{i}"), 0, 100))
        .collect();
    let outside = tmp.path().join("link-to-etc");
    std::os::unix::fs::symlink("/etc/passwd", &outside).unwrap();

    let mut bad: Vec<Vec<u8>> = Vec::new();
    let mut missing = Vec::new();
    for i in 0..1100 {
        let line: Vec<u8> = match i % 11 {
            0 => (0..fastrand::usize(1..200))
                .map(|_| fastrand::u8(..))
                .filter(|b| *b != b'\n')
                .chain(*b"x")
                .collect(),
            1 => format!("/nix/store/\0{i}\0").into_bytes(),
            2 => vec![b'/'; 5000 + i],
            3 => format!("relative/path-{i}").into_bytes(),
            4 => format!("/nix/store/../etc/passwd{i}").into_bytes(),
            5 => format!("/etc/outside-{i}").into_bytes(),
            6 => outside.to_str().unwrap().as_bytes().to_vec(),
            7 => format!("/nix/store/not-a-valid-name-{i}").into_bytes(),
            8 => format!("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-bad-hash-{i}").into_bytes(),
            9 => format!("!unknown-command-{i}").into_bytes(),
            _ => {
                let p = format!("/nix/store/{:0>32}-missing-{i}", i);
                missing.push(p.clone());
                p.into_bytes()
            }
        };
        bad.push(line);
    }
    {
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        for (i, line) in bad.iter().enumerate() {
            w.write_all(line).unwrap();
            w.write_all(b"\n").unwrap();
            if i % 220 == 0 {
                writeln!(w, "{}", valid[i / 220]).unwrap();
            }
        }
    }
    // Still up, and still serving.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "upload died on bad input"
    );
    let late = build_closure(tmp.path(), "after-garbage", 0, 100);
    assert!(send(&fifo, &["--finish", &late]).status.success());
    let status = daemon.wait_exit(Duration::from_secs(120));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1));
    for v in valid.iter().chain([&late]) {
        assert_substitutes(&cache, v, &keys.public, tmp.path());
    }
    // Every bad line accounted for, once: shown, or counted in a summary.
    let (shown, summarised) = rejected_in_log(&text);
    assert!(shown <= 20, "{text}");
    let rejected = shown + summarised;
    assert!(
        text.contains(&format!("{rejected} rejected inputs")),
        "{text}"
    );
    let failed_missing = missing
        .iter()
        .filter(|m| text.matches(&format!("failed {m}:")).count() == 1)
        .count();
    assert_eq!(failed_missing, missing.len(), "{text}");
    assert_eq!(rejected + failed_missing, bad.len(), "{text}");
    assert!(text.contains("rejected input \"/etc/outside-5\""), "{text}");
    assert!(text.contains("\\x00"), "NUL bytes are shown escaped");
}

#[test]
fn a_damaged_queue_is_reported_set_aside_and_the_upload_still_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-damaged");
    let cache = tmp.path().join("cache");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(state.join("queue.sqlite"), &garbage).unwrap();
    let good = build_closure(tmp.path(), "damaged", 1, 100);
    let out = feed(
        upload_cmd()
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg("--state-dir")
            .arg(&state)
            .arg(&cache),
        std::slice::from_ref(&good),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("was damaged") && text.contains("moved aside"),
        "{text}"
    );
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("queue.sqlite.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_substitutes(&cache, &good, &keys.public, tmp.path());
    assert!(queued(&state).is_empty());
}

/// What made `file` (under its final name): the rename or link to it (after the fsync
/// of its data, see [`named_after_sync`]) and the fsync of its directory after it.
/// Panics, naming the file, when one is missing.
fn made_durably<'a>(calls: &'a [Call], file: &str) -> (&'a Call, &'a Call) {
    let named = named_after_sync(calls, file);
    let dir = Path::new(file).parent().unwrap().to_str().unwrap();
    let dir_sync = calls
        .iter()
        .find(|c| {
            c.name == "fsync"
                && c.paths.first().map(String::as_str) == Some(dir)
                && c.start > named.end
        })
        .unwrap_or_else(|| panic!("{dir} was not fsync'd after {file} got its name"));
    (named, dir_sync)
}

#[test]
fn a_folder_cache_is_on_disk_before_a_narinfo_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-fsync");
    let word = unique("fsync");
    // Small NARs (one put) and one of 12 MiB of random bytes (a multipart upload,
    // then a rename), with references.
    let expr = blob_expr(&format!(
        r#"  a = mk "{word}-a" 100 [];
  big = mk "{word}-big" 12582912 [ a ];
in mk "{word}-root" 1000 [ a big ]
"#
    ));
    let root = build_expr(tmp.path(), "fsync", &expr);
    let cache = tmp.path().join("cache");
    let trace = tmp.path().join("trace");
    let mut cmd = Command::new("strace");
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .args([
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat",
            "-o",
        ])
        .arg(&trace)
        .arg(UPLOAD)
        .args(["--compression", "zstd", "--secret-key-file"])
        .arg(&keys.secret)
        .arg(format!("file://{}", cache.display()));
    let out = feed(&mut cmd, &closure_of(&root));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_substitutes(&cache, &root, &keys.public, tmp.path());
    let calls = traced_calls(&std::fs::read_to_string(&trace).unwrap());
    let cache = cache.canonicalize().unwrap();
    // The cache folder was made by upload: it is in its parent for good.
    let parent = cache.parent().unwrap().to_str().unwrap();
    assert!(
        calls
            .iter()
            .any(|c| c.name == "fsync" && c.paths.first().map(String::as_str) == Some(parent)),
        "{parent} was not fsync'd after the cache folder was made in it"
    );
    let mut checked = 0;
    for path in closure_of(&root) {
        let narinfo = narinfo_path(&cache, &path);
        let text = std::fs::read_to_string(&narinfo).unwrap();
        let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        let nar = cache.join(url);
        let (nar_named, nar_dir_synced) = made_durably(&calls, nar.to_str().unwrap());
        let (narinfo_named, _) = made_durably(&calls, narinfo.to_str().unwrap());
        assert!(
            nar_dir_synced.end < narinfo_named.start,
            "{}: the narinfo was written before its NAR was on disk ({nar_named:?}, {nar_dir_synced:?}, {narinfo_named:?})",
            narinfo.display()
        );
        // And after the narinfos of its references were on disk.
        let refs = text
            .lines()
            .find_map(|l| l.strip_prefix("References: "))
            .unwrap_or("");
        for r in refs.split_whitespace() {
            let theirs = narinfo_path(&cache, &format!("/nix/store/{r}"));
            if theirs == narinfo {
                continue;
            }
            let (_, synced) = made_durably(&calls, theirs.to_str().unwrap());
            assert!(
                synced.end < narinfo_named.start,
                "{} before {}",
                narinfo.display(),
                theirs.display()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 3);
    let multipart = calls
        .iter()
        .filter(|c| c.name.starts_with("rename") && c.paths[0].ends_with(".part"))
        .count();
    assert_eq!(
        multipart, 1,
        "the big NAR streams to a .part file and is renamed"
    );
}
