//! Helpers for integration tests: real Nix, real binaries, temp dirs, processes killed on drop.
#![allow(dead_code)]

pub mod servers;
pub mod strace;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const UPLOAD: &str = env!("CARGO_BIN_EXE_upload");
pub const SEND: &str = env!("CARGO_BIN_EXE_send");

/// Nix without substituters (no waiting on DNS) and with the new CLI.
pub const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command";

pub fn nix(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// Runs `cmd` and returns its stdout; panics with its stderr if it fails.
///
/// Nix 2.8 without a daemon sometimes fails at once with "SQLite database
/// '/nix/var/nix/db/db.sqlite' is busy" when other Nix processes open the store at the
/// same moment (seen in `nix-store --generate-binary-cache-key`, which opens the store
/// it does not use): it failed before doing anything, so it is run again, a few times.
pub fn run_ok(cmd: &mut Command) -> String {
    let mut attempt = 1;
    let out = loop {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let busy = String::from_utf8_lossy(&out.stderr).contains("' is busy");
        if out.status.success() || !busy || attempt == 5 {
            break out;
        }
        eprintln!("{cmd:?}: the Nix database was busy; running it again");
        std::thread::sleep(Duration::from_millis(200 * attempt));
        attempt += 1;
    };
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A word no earlier run used, so built paths are new to every cache.
pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{}-{nanos}", std::process::id())
}

/// Writes a Nix expression for a small closure: `n` paths in a chain plus a diamond,
/// each with `bytes` of content, and builds it. Returns the root store path.
pub fn build_closure(dir: &Path, tag: &str, n: usize, bytes: usize) -> String {
    build_expr(dir, tag, &closure_expr(tag, n, bytes))
}

/// Builds a Nix expression file and returns the output path.
pub fn build_expr(dir: &Path, tag: &str, expr: &str) -> String {
    let file = dir.join(format!("{tag}.nix"));
    std::fs::write(&file, expr).unwrap();
    run_ok(
        nix("nix-build")
            .arg(&file)
            .arg("--no-out-link")
            .arg("--quiet"),
    )
    .trim()
    .to_string()
}

pub fn closure_expr(tag: &str, n: usize, bytes: usize) -> String {
    let word = unique(tag);
    format!(
        r#"let
  mk = name: deps: derivation {{
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out/bin $out/share/empty
      echo ${{name}} > $out/name
      head -c {bytes} /dev/urandom > $out/share/blob
      printf '#!/bin/sh\necho hi\n' > $out/bin/hi; chmod +x $out/bin/hi
      ln -s ../name $out/bin/link
      for d in $deps; do echo $d >> $out/deps; done
    '' ];
  }};
  chain = builtins.foldl' (acc: i: [ (mk "{word}-${{toString i}}" acc) ] ++ acc) [] (builtins.genList (i: i) {n});
  left = mk "{word}-left" chain;
  right = mk "{word}-right" chain;
in mk "{word}-root" [ left right ]
"#
    )
}

/// A Nix expression: `mk name size deps` (a path of `size` random bytes that refers to
/// `deps`) and `body`, which uses it (`x = mk …; in mk …`).
pub fn blob_expr(body: &str) -> String {
    format!(
        r#"let
  mk = name: size: deps: derivation {{
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out; head -c ${{toString size}} /dev/urandom > $out/blob
      for d in $deps; do echo $d >> $out/deps; done
    '' ];
  }};
{body}
"#
    )
}

pub fn closure_of(path: &str) -> Vec<String> {
    run_ok(nix("nix-store").args(["-qR", path]))
        .lines()
        .map(str::to_string)
        .collect()
}

pub struct Keys {
    pub secret: PathBuf,
    pub public: String,
}

/// A fresh key pair named `name`; files are unique per call.
pub fn keygen(dir: &Path, name: &str) -> Keys {
    let stem = unique(name);
    let secret = dir.join(format!("{stem}.sk"));
    let public = dir.join(format!("{stem}.pk"));
    run_ok(
        nix("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&secret)
            .arg(&public),
    );
    Keys {
        secret,
        public: std::fs::read_to_string(public).unwrap().trim().to_string(),
    }
}

/// `nix copy --from file://CACHE --to FRESH PATH` with only `public_key` trusted.
pub fn nix_copy_from(cache: &Path, path: &str, fresh: &Path, public_key: &str) -> Output {
    nix_copy_from_url(
        &format!("file://{}", cache.display()),
        path,
        fresh,
        public_key,
    )
}

/// `nix copy --from URL --to FRESH PATH` with only `public_key` trusted.
pub fn nix_copy_from_url(url: &str, path: &str, fresh: &Path, public_key: &str) -> Output {
    nix("nix")
        .arg("copy")
        .arg("--from")
        .arg(url)
        .arg("--to")
        .arg(fresh)
        .arg(path)
        .arg("--option")
        .arg("trusted-public-keys")
        .arg(public_key)
        .output()
        .unwrap()
}

/// Asserts real Nix substitutes every path of `root`'s closure from `cache`.
pub fn assert_substitutes(cache: &Path, root: &str, public_key: &str, scratch: &Path) {
    assert_substitutes_from(
        &format!("file://{}", cache.display()),
        root,
        public_key,
        scratch,
    );
}

/// Asserts real Nix substitutes every path of `root`'s closure from the cache at `url`.
pub fn assert_substitutes_from(url: &str, root: &str, public_key: &str, scratch: &Path) {
    let fresh = scratch.join(unique("fresh"));
    let out = nix_copy_from_url(url, root, &fresh, public_key);
    assert!(
        out.status.success(),
        "nix copy from {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in closure_of(root) {
        let rel = p.trim_start_matches('/');
        assert!(fresh.join(rel).exists(), "{p} missing from the fresh store");
    }
}

pub fn narinfo_count(cache: &Path) -> usize {
    std::fs::read_dir(cache)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .map(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
                    .unwrap_or(false)
            })
            .count()
        })
        .unwrap_or(0)
}

pub fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A stdout or stderr for a child: a pipe whose reader is gone, as `| head` after head
/// has exited. Writing to it fails with EPIPE (SIGPIPE is ignored in Rust programs).
pub fn closed_pipe() -> Stdio {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}")),
        )
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig).unwrap();
    }

    /// Waits up to `limit` for exit; panics if it does not come.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "process did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// upload reading `fifo`, writing to `cache`, signing with `key`; stderr to `log`;
/// its state directory is `state` beside the log.
pub fn upload_daemon(fifo: &Path, cache: &Path, key: &Path, log: &Path) -> Proc {
    upload_daemon_with(fifo, cache, key, log, &[])
}

pub fn upload_daemon_with(
    fifo: &Path,
    cache: &Path,
    key: &Path,
    log: &Path,
    extra: &[&str],
) -> Proc {
    Proc::spawn(
        Command::new(UPLOAD)
            .env("NIX_CONFIG", NIX_CONFIG)
            .args(extra)
            .arg("--state-dir")
            .arg(log.parent().unwrap().join("state"))
            .arg("--input")
            .arg(fifo)
            .arg("--secret-key-file")
            .arg(key)
            .arg(format!("file://{}", cache.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            ),
    )
}

pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs `cmd` with `paths` on its stdin, one per line; stdout and stderr captured.
pub fn feed(cmd: &mut Command, paths: &[String]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    {
        let mut stdin = child.stdin.take().unwrap();
        for p in paths {
            writeln!(stdin, "{p}").unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

/// `upload` with Nix configured for tests.
pub fn upload_cmd() -> Command {
    let mut c = Command::new(UPLOAD);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// Where `cache` (a folder) keeps the narinfo of the store path `path`.
pub fn narinfo_path(cache: &Path, path: &str) -> PathBuf {
    let base = Path::new(path).file_name().unwrap().to_str().unwrap();
    cache.join(format!("{}.narinfo", &base[..32]))
}

pub fn send(fifo: &Path, args: &[&str]) -> Output {
    Command::new(SEND)
        .arg("-o")
        .arg(fifo)
        .args(args)
        .output()
        .unwrap()
}

/// Every narinfo in the folder has its NAR (of the size it claims) and its
/// references' narinfos; returns how many narinfos there are.
pub fn assert_closed(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            let info: narpipe::narinfo::NarInfo =
                std::fs::read_to_string(&p).unwrap().parse().unwrap();
            let nar = dir.join(&info.url);
            assert!(nar.exists(), "{} lacks its NAR {}", p.display(), info.url);
            if let Some(size) = info.file_size {
                assert_eq!(
                    std::fs::metadata(&nar).unwrap().len(),
                    size,
                    "{}",
                    nar.display()
                );
            }
            for r in &info.references {
                assert!(
                    dir.join(format!("{}.narinfo", r.hash_part())).exists(),
                    "{} lacks reference {r}",
                    p.display()
                );
            }
            n += 1;
        }
    }
    n
}

/// Registers a wide closure of `n` tiny paths with bench/make-wide.py (no builds);
/// returns its root.
pub fn wide_closure(dir: &Path, n: usize) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/make-wide.py");
    let out = run_ok(
        nix("python3")
            .arg(script)
            .args(["--n", &n.to_string(), "--tag", &unique("wide")])
            .arg("--gcroot")
            .arg(dir.join("wide.root")),
    );
    out.trim().lines().last().unwrap().to_string()
}
