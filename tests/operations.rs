//! What operators use: metrics, filters, --check, verify, progress, JSON logs, the
//! contrib files.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

fn upload_with(args: &[&str], cache: &Path, paths: &[String]) -> Output {
    feed(upload_cmd().args(args).arg(cache), paths)
}

fn scrape(port: u16) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// A metric's value, added up over its series (one per cache).
fn metric(page: &str, name: &str) -> u64 {
    let values: Vec<f64> = page
        .lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .collect();
    assert!(!values.is_empty(), "{name} not in {page}");
    values.iter().sum::<f64>() as u64
}

#[test]
fn metrics_counters_move_as_paths_are_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-metrics");
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let port = common::servers::free_port();
    let log = tmp.path().join("upload.log");
    let listen = format!("127.0.0.1:{port}");
    let mut daemon = upload_daemon_with(
        &fifo,
        &cache,
        &keys.secret,
        &log,
        &["--metrics-listen", &listen],
    );
    wait_until(Duration::from_secs(30), "the metrics endpoint", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let before = scrape(port);
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert_eq!(metric(&before, "narpipe_paths_uploaded_total"), 0);
    let root = build_closure(tmp.path(), "metrics", 2, 5000);
    let n = closure_of(&root).len() as u64;
    let out = send(&fifo, &[&root]);
    assert!(out.status.success());
    let narinfo = narinfo_path(&cache, &root);
    wait_until(Duration::from_secs(60), "the root's narinfo", || {
        narinfo.exists()
    });
    let after = scrape(port);
    assert_eq!(metric(&after, "narpipe_paths_uploaded_total"), n, "{after}");
    assert!(metric(&after, "narpipe_nar_bytes_total") > 5000 * n);
    assert!(metric(&after, "narpipe_compressed_bytes_total") > 0);
    assert_eq!(metric(&after, "narpipe_paths_failed_total"), 0);
    // Garbage moves the rejected counter; the queue drains to zero.
    send(&fifo, &["relative/junk"]);
    {
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"junk\n").unwrap();
    }
    wait_until(Duration::from_secs(30), "the rejected counter", || {
        metric(&scrape(port), "narpipe_inputs_rejected_total") == 1
    });
    assert_eq!(metric(&scrape(port), "narpipe_queue_depth"), 0);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_exit(Duration::from_secs(60));
}

#[test]
fn excluded_paths_and_their_referrers_are_never_pushed() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-filter");
    let word = unique("filter");
    let root = build_expr(
        tmp.path(),
        "filtered",
        &format!(
            r#"let mk = name: deps: derivation {{ inherit name deps; system = builtins.currentSystem;
                 builder = "/bin/sh"; PATH = "/usr/bin:/bin";
                 args = [ "-c" "echo ${{name}} > $out; for d in $deps; do echo $d >> $out; done" ]; }};
               lib = mk "{word}-lib" [];
               secret = mk "{word}-secret-config" [ lib ];
               app = mk "{word}-app" [ secret lib ];
               tool = mk "{word}-tool" [ lib ];
            in mk "{word}-bundle" [ app tool ]"#
        ),
    );
    let closure = closure_of(&root);
    let find = |part: &str| closure.iter().find(|p| p.ends_with(part)).unwrap().clone();
    let cache = tmp.path().join("cache");
    let key = keys.secret.to_str().unwrap();
    let out = upload_with(
        &["--exclude", "secret", "--secret-key-file", key],
        &cache,
        &closure,
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "excluding is not failing: {log}");
    assert!(
        log.contains(&format!(
            "excluded {}: matches --exclude 'secret'",
            find("-secret-config")
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("excluded {}: refers to excluded", find("-app"))),
        "{log}"
    );
    let has = |p: &str| narinfo_path(&cache, p).exists();
    assert!(!has(&find("-secret-config")) && !has(&find("-app")) && !has(&root));
    assert!(has(&find("-lib")) && has(&find("-tool")));
    assert_substitutes(&cache, &find("-tool"), &keys.public, tmp.path());

    // --include: only what matches (and is closed under references) goes.
    let cache2 = tmp.path().join("cache2");
    let out = upload_with(
        &["--include", "-(lib|tool)$", "--secret-key-file", key],
        &cache2,
        &closure,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        narinfo_count(&cache2),
        2,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_validates_and_exits_without_reading_input() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-check");
    let cache = tmp.path().join("cache");
    let mut child = Command::new(UPLOAD)
        .arg("--check")
        .arg("--secret-key-file")
        .arg(&keys.secret)
        .arg(&cache)
        .stdin(Stdio::piped()) // never closed: --check must not wait for it
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc_ = Proc(child);
    let status = proc_.wait_exit(Duration::from_secs(30));
    child = std::mem::replace(&mut proc_.0, Command::new("true").spawn().unwrap());
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("configuration ok") && err.contains("narpipe-check"),
        "{err}"
    );
    assert_eq!(narinfo_count(&cache), 0);

    let bad = tmp.path().join("bad.sk");
    std::fs::write(&bad, "narpipe-check:AAAA").unwrap();
    let out = Command::new(UPLOAD)
        .arg("--check")
        .arg("--secret-key-file")
        .arg(&bad)
        .arg(&cache)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.sk"));
}

#[test]
fn a_secret_key_file_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-exposed");
    let key = keys.secret.to_str().unwrap();
    let cache = tmp.path().join("cache");
    let chmod = |mode| {
        std::fs::set_permissions(&keys.secret, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    // A normal run (nothing to upload) and --check, each with a key the world can read.
    let runs = || {
        [
            upload_with(&["--secret-key-file", key], &cache, &[]),
            upload_with(&["--check", "--secret-key-file", key], &cache, &[]),
        ]
    };
    chmod(0o644);
    for out in runs() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let warning: Vec<&str> = err.lines().filter(|l| l.contains("not private")).collect();
        assert_eq!(warning.len(), 1, "one line: {err}");
        assert!(
            warning[0].contains(key) && warning[0].contains("mode 0644"),
            "{err}"
        );
    }
    chmod(0o600);
    for out in runs() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            !err.contains("not private") && !err.contains("0600"),
            "{err}"
        );
    }
}

#[test]
fn verify_reports_each_kind_of_broken_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-verify");
    let other = keygen(tmp.path(), "narpipe-other");
    let root = build_closure(tmp.path(), "verify", 3, 1000);
    let closure = closure_of(&root);
    let cache = tmp.path().join("cache");
    let out = upload_with(
        &["--secret-key-file", keys.secret.to_str().unwrap()],
        &cache,
        &closure,
    );
    assert!(out.status.success());
    let verify = |keys: &[&str]| {
        let mut c = Command::new(UPLOAD);
        c.arg("verify").arg(&cache);
        for k in keys {
            c.arg("--trusted-public-key").arg(k);
        }
        c.output().unwrap()
    };
    let ok = verify(&[&keys.public]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stderr)
        .contains(&format!("checked {} narinfos", closure.len())));
    // Signed by a key we don't trust: every entry is reported.
    let untrusted = verify(&[&other.public]);
    assert_eq!(untrusted.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&untrusted.stdout)
            .matches("no signature verifies")
            .count(),
        closure.len()
    );

    let read = |p: &str| std::fs::read_to_string(narinfo_path(&cache, p)).unwrap();
    let leaf = closure.iter().find(|p| p.ends_with("-0")).unwrap().clone();
    let one = closure.iter().find(|p| p.ends_with("-1")).unwrap().clone();
    let left = closure
        .iter()
        .find(|p| p.ends_with("-left"))
        .unwrap()
        .clone();
    // 1. A NAR deleted.
    let url = read(&left)
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    std::fs::remove_file(cache.join(&url)).unwrap();
    // 2. A reference dropped: the leaf's narinfo is gone, so its referrers break.
    std::fs::remove_file(narinfo_path(&cache, &leaf)).unwrap();
    // 3. A signature corrupted.
    let text = read(&one);
    let sig_line = text.lines().find(|l| l.starts_with("Sig: ")).unwrap();
    let (name, sig) = sig_line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split_once(':')
        .unwrap();
    let mut chars: Vec<char> = sig.chars().collect();
    chars[5] = if chars[5] == 'A' { 'B' } else { 'A' };
    let bad = format!("Sig: {name}:{}", chars.into_iter().collect::<String>());
    std::fs::write(narinfo_path(&cache, &one), text.replace(sig_line, &bad)).unwrap();

    let out = verify(&[&keys.public]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains(&format!("its NAR {url} is missing")),
        "{report}"
    );
    // A reference with no narinfo may be served upstream: listed apart, not broken…
    let leaf_base = Path::new(&leaf).file_name().unwrap().to_str().unwrap();
    assert!(
        report.lines().any(|l| l.starts_with("MISSING (upstream?) ")
            && l.contains(&format!("reference {leaf_base} has no narinfo (upstream?)"))),
        "{report}"
    );
    assert!(
        report.contains("no signature verifies with a trusted key"),
        "{report}"
    );
    assert!(
        report
            .lines()
            .all(|l| l.starts_with("BROKEN ") || l.starts_with("MISSING (upstream?) ")),
        "{report}"
    );
    // …and broken when the upstream given lacks it too.
    let upstream = tmp.path().join("upstream");
    std::fs::create_dir_all(&upstream).unwrap();
    std::fs::write(upstream.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let out = Command::new(UPLOAD)
        .arg("verify")
        .arg(&cache)
        .args(["--trusted-public-key", &keys.public, "--upstream"])
        .arg(&upstream)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.lines().any(|l| l.starts_with("BROKEN ")
            && l.contains(&format!(
                "reference {leaf_base} has no narinfo here or upstream"
            ))),
        "{report}"
    );
    assert!(!report.contains("MISSING"), "{report}");
    // Into a pipe nobody reads any more (`| head -1`): the same verdict, no panic.
    let out = Command::new(UPLOAD)
        .arg("verify")
        .arg(&cache)
        .args(["--trusted-public-key", &keys.public])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked") && err.contains("broken"), "{err}");
}

#[test]
fn output_into_a_pipe_nobody_reads_ends_quietly() {
    // `upload completions bash | head -c1` and the like: no panic, no message, exit 0.
    let commands: [(&str, &[&str]); 7] = [
        (UPLOAD, &["completions", "bash"]),
        (UPLOAD, &["man"]),
        (UPLOAD, &["--help"]),
        (UPLOAD, &["--version"]),
        (UPLOAD, &["verify", "--help"]),
        (SEND, &["--help"]),
        (SEND, &["--version"]),
    ];
    for (program, args) in commands {
        let out = Command::new(program)
            .args(args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{program} {args:?}: {err}");
        assert!(err.is_empty(), "{program} {args:?}: {err}");
    }
    // send's warnings go to stderr, the build log: one that is gone must not fail the
    // build either.
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let out = Command::new(SEND)
        .arg("-o")
        .arg(tmp.path().join("no-pipe"))
        .arg("--spool-dir")
        .arg(&spool)
        .arg("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-gone")
        .stderr(closed_pipe())
        .status()
        .unwrap();
    assert!(out.success(), "{out}");
    assert_eq!(narpipe::spool::list(&spool).unwrap().len(), 1);
    // upload's log into a pipe nobody reads (`upload … 2>&1 | head -1` after head
    // exits): the work is done, nothing panics.
    let cache = tmp.path().join("cache");
    std::fs::write(tmp.path().join("empty"), "").unwrap();
    let out = Command::new(UPLOAD)
        .arg("--input")
        .arg(tmp.path().join("empty"))
        .arg(&cache)
        .stderr(closed_pipe())
        .status()
        .unwrap();
    assert!(out.success(), "{out}");
    assert!(cache.join("nix-cache-info").exists());
}

#[test]
fn a_terminal_shows_a_progress_bar_that_advances() {
    let tmp = tempfile::tempdir().unwrap();
    let root = build_closure(tmp.path(), "progress", 6, 600_000);
    let list = tmp.path().join("paths");
    std::fs::write(&list, closure_of(&root).join("\n") + "\n").unwrap();
    let cache = tmp.path().join("cache");
    // `script` runs upload on a pseudo-terminal and records what it drew.
    let cmd = format!(
        "{UPLOAD} --jobs 1 --compression xz --compression-level 0 --input {} {}",
        list.display(),
        cache.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs upload on a pty");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    let re = regex::Regex::new(r"(\d+)/(\d+) paths").unwrap();
    let positions: std::collections::BTreeSet<u64> = re
        .captures_iter(&screen)
        .map(|c| c[1].parse().unwrap())
        .collect();
    assert!(
        positions.len() >= 3,
        "the bar did not advance: {positions:?}\n{screen}"
    );
    assert!(screen.contains("ETA"), "{screen}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = build_closure(tmp.path(), "json", 0, 10);
    let out = upload_with(
        &["--log-format", "json"],
        &tmp.path().join("cache"),
        &[root.clone(), "junk".into()],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    let mut levels = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        levels.push(v["level"].as_str().unwrap().to_string());
        assert!(v["msg"].is_string() && v["ts"].is_number());
    }
    assert!(
        levels.contains(&"warn".to_string()) && levels.contains(&"info".to_string()),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "no colour off a terminal");
}

#[test]
fn contrib_files_are_valid() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR"));
    run_ok(
        nix("nix-instantiate")
            .arg("--parse")
            .arg(top.join("contrib/nixos/module.nix")),
    );
    let hook = top.join("contrib/post-build-hook");
    run_ok(Command::new("sh").arg("-n").arg(&hook));
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        // Verify copies whose ExecStart points at binaries that exist here.
        let tmp = tempfile::tempdir().unwrap();
        for unit in ["narpipe.socket", "narpipe-upload.service"] {
            let text = std::fs::read_to_string(top.join("contrib/systemd").join(unit)).unwrap();
            std::fs::write(
                tmp.path().join(unit),
                text.replace("/usr/local/bin/upload", UPLOAD),
            )
            .unwrap();
        }
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(tmp.path().join("narpipe.socket"))
            .arg(tmp.path().join("narpipe-upload.service"))
            .env("SYSTEMD_LOG_LEVEL", "warning")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let real: Vec<&str> = err.lines().filter(|l| l.contains("narpipe")).collect();
        assert!(out.status.success() && real.is_empty(), "{err}");
    }
    // Completions and the man page come from the same definitions as --help.
    let comp = Command::new(UPLOAD)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(
        comp.status.success()
            && String::from_utf8_lossy(&comp.stdout).contains("--secret-key-file")
    );
    let man = Command::new(UPLOAD).arg("man").output().unwrap();
    assert!(man.status.success() && String::from_utf8_lossy(&man.stdout).contains(".TH upload"));
}

#[test]
fn socket_activation_and_readiness_as_systemd_does_it() {
    use std::os::unix::net::UnixDatagram;
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-systemd");
    let fifo = tmp.path().join("narpipe.fifo");
    mkfifo(&fifo);
    let cache = tmp.path().join("cache");
    let notify_path = tmp.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // What systemd does for ListenFIFO=: the FIFO open as fd 3, LISTEN_PID/LISTEN_FDS set
    // for the service's own pid (sh's `exec` keeps $$).
    let mut daemon = Proc::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3<>"$0"; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@""#)
            .arg(&fifo)
            .arg(UPLOAD)
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .arg(&cache)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("log")).unwrap()),
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from upload");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    let root = build_closure(tmp.path(), "activated", 1, 100);
    let out = send(&fifo, &[&root]);
    assert!(out.status.success());
    let narinfo = narinfo_path(&cache, &root);
    wait_until(
        Duration::from_secs(60),
        "the activated daemon to upload",
        || narinfo.exists(),
    );
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let n = notify.recv(&mut buf).expect("STOPPING=1 from upload");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
    assert_substitutes(&cache, &root, &keys.public, tmp.path());
}
