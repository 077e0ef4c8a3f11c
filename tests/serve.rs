//! `serve` judged by real Nix: `nix copy --from http://127.0.0.1:PORT` and `nix-build`
//! with the server as the only substituter, for a folder, S3 (SeaweedFS), GCS
//! (fake-gcs-server) and the local store; plus the HTTP details (HEAD, Range, ETag,
//! 404 for anything outside the layout) over a plain socket.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::servers::{FakeGcs, S3Proxy, Seaweed, S3_KEY, S3_SECRET};
use common::strace::{named_after_sync, traced_calls};
use common::*;

const SERVE: &str = env!("CARGO_BIN_EXE_serve");

/// A `serve` process on a port of its choosing, killed on drop.
struct Served {
    _proc: Proc,
    port: u16,
    log: PathBuf,
}

impl Served {
    fn start(dir: &Path, cmd: &mut Command) -> Served {
        let log = dir.join(format!("{}.log", unique("serve")));
        let proc = Proc::spawn(
            cmd.arg("--listen")
                .arg("127.0.0.1:0")
                .env("NIX_CONFIG", NIX_CONFIG)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        let mut port = 0;
        wait_until(Duration::from_secs(30), "serve to listen", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(at) = text.find(" on http://127.0.0.1:") {
                let rest = &text[at + " on http://127.0.0.1:".len()..];
                port = rest
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                return true;
            }
            assert!(!text.contains("error:"), "serve failed to start: {text}");
            false
        });
        Served {
            _proc: proc,
            port,
            log,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn get(&self, path: &str) -> Reply {
        request(self.port, "GET", path, &[])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of a metric at `--metrics-listen`, which the log names.
    fn metric(&self, name: &str) -> u64 {
        let log = self.log();
        let at = log
            .find("metrics at http://127.0.0.1:")
            .expect("a metrics address");
        let rest = &log[at + "metrics at http://127.0.0.1:".len()..];
        let port: u16 = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let page = String::from_utf8(request(port, "GET", "/metrics", &[]).body).unwrap();
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {page}"))
            .parse()
            .unwrap()
    }
}

fn serve_cmd(source: &str) -> Command {
    let mut c = Command::new(SERVE);
    c.arg(source);
    c
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection, the answer read to its end.
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

/// `nix copy` from the server with another key trusted fails for want of a signature.
fn assert_rejected_without_key(url: &str, root: &str, scratch: &Path) {
    let other = keygen(scratch, "someone-else");
    let out = nix_copy_from_url(url, root, &scratch.join(unique("fresh")), &other.public);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nix copy without the key succeeded");
    assert!(err.contains("lacks a valid signature"), "{err}");
}

fn upload_to(cmd: &mut Command, key: &Path, url: &str, paths: &[String]) {
    let out = feed(cmd.arg("--secret-key-file").arg(key).arg(url), paths);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hash_of(path: &str) -> &str {
    &Path::new(path).file_name().unwrap().to_str().unwrap()[..32]
}

#[test]
fn a_folder_cache_is_served_to_nix_and_only_its_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-folder");
    let root = build_closure(tmp.path(), "serve-folder", 2, 400_000);
    let cache = tmp.path().join("cache");
    upload_to(
        &mut upload_cmd(),
        &keys.secret,
        cache.to_str().unwrap(),
        &closure_of(&root),
    );
    // Things in the folder that are no part of the layout.
    std::fs::write(cache.join("secret.txt"), "no").unwrap();
    std::fs::write(tmp.path().join("outside"), "no").unwrap();
    // Names of the layout that are links out of the folder, or a FIFO: never followed
    // nor waited on.
    let linked = "11111111111111111111111111111111";
    let outside = tmp.path().join("outside");
    std::os::unix::fs::symlink(&outside, cache.join(format!("{linked}.narinfo"))).unwrap();
    std::os::unix::fs::symlink(&outside, cache.join(format!("{linked}.ls"))).unwrap();
    let nar_link = format!("nar/{}.nar.zst", "1".repeat(52));
    std::os::unix::fs::symlink(&outside, cache.join(&nar_link)).unwrap();
    // A link that stays in the folder (a cache deduplicated with links) is served.
    let inside = "33333333333333333333333333333333";
    let root_narinfo = narinfo_path_of(&cache, &root);
    std::os::unix::fs::symlink(&root_narinfo, cache.join(format!("{inside}.narinfo"))).unwrap();
    let fifo = "22222222222222222222222222222222";
    nix::unistd::mkfifo(
        &cache.join(format!("{fifo}.narinfo")),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let s = Served::start(tmp.path(), &mut serve_cmd(cache.to_str().unwrap()));

    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    assert_rejected_without_key(&s.url(), &root, tmp.path());

    let info = s.get("/nix-cache-info");
    assert_eq!(info.status, 200);
    assert_eq!(info.header("content-type"), Some("text/x-nix-cache-info"));
    assert!(String::from_utf8_lossy(&info.body).contains("StoreDir: /nix/store"));

    let narinfo_path = format!("/{}.narinfo", hash_of(&root));
    let on_disk = std::fs::read(narinfo_path_of(&cache, &root)).unwrap();
    let got = s.get(&narinfo_path);
    assert_eq!(got.status, 200);
    assert_eq!(got.body, on_disk);
    assert_eq!(got.header("content-type"), Some("text/x-nix-narinfo"));
    assert_eq!(
        got.header("content-length"),
        Some(on_disk.len().to_string().as_str())
    );
    assert!(got.header("last-modified").is_some());
    let etag = got.header("etag").expect("an ETag").to_string();
    let head = request(s.port, "HEAD", &narinfo_path, &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), got.header("content-length"));
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    let again = request(s.port, "GET", &narinfo_path, &[("If-None-Match", &etag)]);
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());

    // Byte ranges of a NAR.
    let parsed: narpipe::narinfo::NarInfo = String::from_utf8(on_disk).unwrap().parse().unwrap();
    let nar = std::fs::read(cache.join(&parsed.url)).unwrap();
    let nar_path = format!("/{}", parsed.url);
    let whole = s.get(&nar_path);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, nar);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(whole.header("content-type"), Some("application/x-nix-nar"));
    // Over 256 KiB: streamed from the file, not read whole.
    assert!(nar.len() > 256 << 10, "{}", nar.len());
    let first = request(s.port, "GET", &nar_path, &[("Range", "bytes=0-9")]);
    assert_eq!(first.status, 206);
    assert_eq!(first.body, nar[..10]);
    assert_eq!(
        first.header("content-range"),
        Some(format!("bytes 0-9/{}", nar.len()).as_str())
    );
    let last = request(s.port, "GET", &nar_path, &[("Range", "bytes=-7")]);
    assert_eq!(last.status, 206);
    assert_eq!(last.body, nar[nar.len() - 7..]);
    let big = request(s.port, "GET", &nar_path, &[("Range", "bytes=5-300000")]);
    assert_eq!(big.status, 206);
    assert!(big.body == nar[5..300_001]);
    let past = format!("bytes={}-", nar.len());
    let none = request(s.port, "GET", &nar_path, &[("Range", &past)]);
    assert_eq!(none.status, 416);
    assert_eq!(
        none.header("content-range"),
        Some(format!("bytes */{}", nar.len()).as_str())
    );

    // Nothing but the layout, nothing outside the folder, nothing written.
    for path in [
        "/path/../../outside",
        "/path/00000000000000000000000000000000",
        "/secret.txt",
        "/../outside",
        "/nar/../../outside",
        "/nar/..%2F..%2Foutside",
        "/%2e%2e/outside",
        "/nar/00000000000000000000000000000000000000000000000000000.nar.zst",
        "/00000000000000000000000000000000.narinfo",
        "/.narpipe-write-check",
        &format!("/{linked}.narinfo"),
        &format!("/{linked}.ls"),
        &format!("/{nar_link}"),
        &format!("/{fifo}.narinfo"),
    ] {
        assert_eq!(s.get(path).status, 404, "{path}");
    }
    for method in ["PUT", "DELETE", "POST", "MOVE"] {
        let r = request(s.port, method, &narinfo_path, &[]);
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
    assert_eq!(s.get(&narinfo_path).body, got.body);
    assert_eq!(s.get(&format!("/{inside}.narinfo")).body, got.body);

    // Narinfos are held in memory for a second at most: one taken out of the folder is
    // 404 soon after, and one put (back) after a 404 is served at once.
    let file = narinfo_path_of(&cache, &root);
    let aside = tmp.path().join("aside.narinfo");
    std::fs::rename(&file, &aside).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(s.get(&narinfo_path).status, 404);
    std::fs::rename(&aside, &file).unwrap();
    assert_eq!(s.get(&narinfo_path).body, got.body);
}

fn narinfo_path_of(cache: &Path, path: &str) -> PathBuf {
    narinfo_path(cache, path)
}

#[test]
fn an_s3_bucket_is_served_to_nix_with_the_servers_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-s3");
    let s3 = Seaweed::start();
    let root = build_closure(tmp.path(), "serve-s3", 2, 3000);
    let url = s3.url("servecache", "pre");
    upload_to(&mut s3.upload_cmd(), &keys.secret, &url, &closure_of(&root));
    let s = Served::start(
        tmp.path(),
        serve_cmd(&url)
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env_remove("AWS_PROFILE"),
    );
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    assert_rejected_without_key(&s.url(), &root, tmp.path());
    assert_eq!(s.get("/nix-cache-info").status, 200);
    let narinfo = s.get(&format!("/{}.narinfo", hash_of(&root)));
    assert!(narinfo.header("etag").is_some());
    assert_eq!(s.get("/secret.txt").status, 404);

    // Wrong credentials: said at start, exit 2, nothing served.
    let out = serve_cmd(&url)
        .args(["--listen", "127.0.0.1:0"])
        .env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("credentials were rejected"), "{err}");
}

#[test]
fn a_gcs_bucket_is_served_to_nix() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-gcs");
    let gcs = FakeGcs::start("servecache");
    let root = build_closure(tmp.path(), "serve-gcs", 2, 3000);
    let url = gcs.url("servecache", "pre");
    upload_to(&mut upload_cmd(), &keys.secret, &url, &closure_of(&root));
    let s = Served::start(tmp.path(), &mut serve_cmd(&url));
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    assert_rejected_without_key(&s.url(), &root, tmp.path());
}

#[test]
fn the_local_store_is_served_signed_with_nars_made_on_the_fly() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-local");
    let root = build_closure(tmp.path(), "serve-local", 2, 70_000);
    let s = Served::start(
        tmp.path(),
        serve_cmd("local")
            .arg("--secret-key-file")
            .arg(&keys.secret),
    );
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    assert_rejected_without_key(&s.url(), &root, tmp.path());

    let info = s.get(&format!("/{}.narinfo", hash_of(&root)));
    assert_eq!(info.status, 200, "{}", s.log());
    let parsed: narpipe::narinfo::NarInfo = String::from_utf8(info.body.clone())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(parsed.store_path(), root);
    assert_eq!(parsed.compression.as_deref(), Some("none"));
    assert!(info.header("etag").is_some());
    assert!(
        info.header("last-modified").is_some(),
        "the registration time"
    );
    // The NAR is byte for byte what Nix dumps; ranges of it too.
    let dump = Command::new("nix-store")
        .args(["--dump", &root])
        .output()
        .unwrap()
        .stdout;
    let nar_path = format!("/{}", parsed.url);
    let nar = s.get(&nar_path);
    assert_eq!(nar.status, 200);
    assert_eq!(
        nar.header("content-length"),
        Some(dump.len().to_string().as_str())
    );
    assert!(nar.body == dump, "the NAR differs from nix-store --dump");
    let mid = request(s.port, "GET", &nar_path, &[("Range", "bytes=1000-66999")]);
    assert_eq!(mid.status, 206);
    assert!(mid.body == dump[1000..67000]);
    let head = request(s.port, "HEAD", &nar_path, &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), nar.header("content-length"));
    // A NAR name whose NarHash is not the path's (an old narinfo's): not found.
    let stale = format!("/nar/{}-{}.nar", hash_of(&root), "0".repeat(52));
    assert_eq!(s.get(&stale).status, 404);

    // Its listing, made on the same kind of walk.
    let ls = s.get(&format!("/{}.ls", hash_of(&root)));
    assert_eq!(ls.status, 200);
    let listing: serde_json::Value = serde_json::from_slice(&ls.body).unwrap();
    assert_eq!(listing["root"]["type"], "directory");
    assert_eq!(
        listing["root"]["entries"]["bin"]["entries"]["hi"]["executable"],
        true
    );

    // Not in the store, a derivation, no path at all: 404.
    let drv = run_ok(nix("nix-store").args(["--query", "--deriver", &root]));
    for path in [
        "/00000000000000000000000000000000.narinfo".to_string(),
        format!("/{}.narinfo", hash_of(drv.trim())),
        "/nix/store".to_string(),
        "/etc/passwd".to_string(),
    ] {
        assert_eq!(s.get(&path).status, 404, "{path}");
    }
    let ci = String::from_utf8(s.get("/nix-cache-info").body).unwrap();
    assert!(ci.contains("StoreDir: /nix/store\n"), "{ci}");
}

#[test]
fn nix_build_substitutes_from_the_local_store_instead_of_building() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-build");
    let expr = closure_expr("serve-build", 2, 100);
    let file = tmp.path().join("build.nix");
    std::fs::write(&file, &expr).unwrap();
    let root = run_ok(
        nix("nix-build")
            .arg(&file)
            .args(["--no-out-link", "--quiet"]),
    );
    let root = root.trim();
    let s = Served::start(
        tmp.path(),
        serve_cmd("local")
            .arg("--secret-key-file")
            .arg(&keys.secret),
    );
    // A fresh store that may not build anything (--max-jobs 0): only substitution
    // gives it the outputs.
    let build = |trusted: &str, store: &Path| {
        nix("nix-build")
            .arg(&file)
            .arg("--no-out-link")
            .arg("--store")
            .arg(store)
            .args(["--max-jobs", "0"])
            .args(["--option", "substituters", &s.url()])
            .args(["--option", "trusted-public-keys", trusted])
            .output()
            .unwrap()
    };
    let fresh = tmp.path().join("fresh");
    let out = build(&keys.public, &fresh);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), root);
    assert!(
        err.contains(&format!("copying path '{root}' from '{}'", s.url())),
        "{err}"
    );
    for p in closure_of(root) {
        assert!(fresh.join(p.trim_start_matches('/')).exists(), "{p}");
    }
    // Without the key, Nix would have to build, which --max-jobs 0 forbids.
    let other = keygen(tmp.path(), "someone-else");
    let out = build(&other.public, &tmp.path().join("fresh2"));
    assert!(!out.status.success());
}

#[test]
fn bad_configurations_stop_serve_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-bad");
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(SERVE)
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let secret = keys.secret.to_str().unwrap();
    let missing = tmp.path().join("missing");
    let cache_dir = cache.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        // A folder is read directly: a cache dir (that could be the folder itself,
        // whose files it would trim) is refused.
        (
            &[cache_dir, "--cache-dir", cache_dir],
            "--cache-dir is for remote caches",
        ),
        (
            &[cache.to_str().unwrap(), "--secret-key-file", secret],
            "local store",
        ),
        (&["/nix/store"], "serve local"),
        (&[missing.to_str().unwrap()], "does not exist"),
        (&["ftp://x"], "unsupported scheme"),
        (
            &["local", "--secret-key-file", "/nonexistent/key"],
            "/nonexistent/key",
        ),
    ];
    for (args, want) in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn the_serve_unit_is_valid() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR"));
    run_ok(
        nix("nix-instantiate")
            .arg("--parse")
            .arg(top.join("contrib/nixos/module.nix")),
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return; // no systemd here; the module parsed
    }
    let tmp = tempfile::tempdir().unwrap();
    let unit = "narpipe-serve.service";
    let text = std::fs::read_to_string(top.join("contrib/systemd").join(unit)).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/serve\n"));
    std::fs::write(
        tmp.path().join(unit),
        text.replace("/usr/local/bin/serve", SERVE),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(tmp.path().join(unit))
        .env("SYSTEMD_LOG_LEVEL", "warning")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let real: Vec<&str> = err.lines().filter(|l| l.contains("narpipe")).collect();
    assert!(out.status.success() && real.is_empty(), "{err}");
}

#[test]
fn a_second_client_is_served_from_the_cache_dir_without_asking_the_bucket() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-proxy");
    let s3 = Seaweed::start();
    let counting = S3Proxy::start(&s3, &[]);
    let root = build_closure(tmp.path(), "serve-proxy", 2, 300_000);
    upload_to(
        &mut s3.upload_cmd(),
        &keys.secret,
        &s3.url("proxied", "pre"),
        &closure_of(&root),
    );
    let url = counting.url("proxied", "pre");
    let cache_dir = tmp.path().join("cache-dir");
    let start = || {
        Served::start(
            tmp.path(),
            serve_cmd(&url)
                .arg("--cache-dir")
                .arg(&cache_dir)
                .args(["--metrics-listen", "127.0.0.1:0"])
                .env("AWS_ACCESS_KEY_ID", S3_KEY)
                .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
                .env_remove("AWS_PROFILE"),
        )
    };
    let s = start();
    // What clients asked the bucket for (serve's own start-up check aside).
    let asked = || {
        counting
            .requests()
            .into_iter()
            .filter(|r| !r.path.ends_with("/nix-cache-info"))
            .count()
    };
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    let first = asked();
    let nars = counting
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/nar/"))
        .count();
    assert_eq!(nars, closure_of(&root).len(), "{:?}", counting.requests());
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    assert_eq!(
        asked(),
        first,
        "the second client's requests reached the bucket"
    );

    // A 404 is remembered too.
    let missing = "/00000000000000000000000000000000.narinfo";
    assert_eq!(s.get(missing).status, 404);
    assert_eq!(s.get(missing).status, 404);
    let asked_missing = counting
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(&missing[1..]))
        .count();
    assert_eq!(asked_missing, 1);

    let backend = s.metric("narpipe_serve_backend_bytes_total");
    let nar_bytes: u64 = closure_of(&root)
        .iter()
        .map(|p| {
            let info = s.get(&format!("/{}.narinfo", hash_of(p)));
            let n: narpipe::narinfo::NarInfo =
                String::from_utf8(info.body).unwrap().parse().unwrap();
            n.file_size.unwrap()
        })
        .sum();
    assert!(backend >= nar_bytes, "{backend} < {nar_bytes}");
    assert!(s.metric("narpipe_serve_served_bytes_total") >= 2 * nar_bytes);
    assert!(s.metric("narpipe_serve_cache_hits_total") > 0);
    assert!(s.metric("narpipe_serve_cache_misses_total") > 0);
    assert!(s.metric("narpipe_serve_cache_bytes") >= nar_bytes);

    // Kept across a restart.
    drop(s);
    let s = start();
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
    assert_eq!(
        asked(),
        first + 1,
        "only the remembered 404 was asked again"
    );
}

#[test]
fn clients_asking_for_the_same_object_at_once_cost_the_bucket_one_request() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-flights");
    let s3 = Seaweed::start();
    // Every GET held for a while, so that the clients' requests overlap.
    let counting = S3Proxy::start(&s3, &["--slow-gets", "0.5"]);
    let root = build_closure(tmp.path(), "serve-flights", 0, 300_000);
    upload_to(
        &mut s3.upload_cmd(),
        &keys.secret,
        &s3.url("flights", "pre"),
        &closure_of(&root),
    );
    // Under strace, to see that what is kept is fsync'd before it has its name.
    let trace = tmp.path().join("trace");
    let cache_dir = tmp.path().join("cache-dir");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-y", "-qq", "-e", "trace=fsync,rename", "-o"])
        .arg(&trace)
        .arg(SERVE)
        .arg(counting.url("flights", "pre"));
    let s = Served::start(
        tmp.path(),
        cmd.arg("--cache-dir")
            .arg(&cache_dir)
            .env("AWS_ACCESS_KEY_ID", S3_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
            .env_remove("AWS_PROFILE"),
    );
    let at_once = |path: &str| -> Vec<Reply> {
        std::thread::scope(|scope| {
            let asked: Vec<_> = (0..8).map(|_| scope.spawn(|| s.get(path))).collect();
            asked.into_iter().map(|a| a.join().unwrap()).collect()
        })
    };
    let asked_for = |name: &str| {
        counting
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(name))
            .count()
    };
    let narinfo = format!("{}.narinfo", hash_of(&root));
    let replies = at_once(&format!("/{narinfo}"));
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.body == replies[0].body));
    assert_eq!(asked_for(&narinfo), 1, "{:?}", counting.requests());
    let info: narpipe::narinfo::NarInfo = String::from_utf8(replies[0].body.clone())
        .unwrap()
        .parse()
        .unwrap();
    let replies = at_once(&format!("/{}", info.url));
    assert!(replies
        .iter()
        .all(|r| r.status == 200 && r.body == replies[0].body));
    assert_eq!(replies[0].body.len() as u64, info.file_size.unwrap());
    assert_eq!(asked_for(&info.url), 1, "{:?}", counting.requests());
    let kept = cache_dir.canonicalize().unwrap().join(&info.url);
    let calls = traced_calls(&std::fs::read_to_string(&trace).unwrap());
    named_after_sync(&calls, kept.to_str().unwrap());
    // A missing one too: one 404 from the bucket, remembered for the others.
    let missing = "00000000000000000000000000000000.narinfo";
    assert!(at_once(&format!("/{missing}"))
        .iter()
        .all(|r| r.status == 404));
    assert_eq!(asked_for(missing), 1);
    assert_substitutes_from(&s.url(), &root, &keys.public, tmp.path());
}

/// The page at `url` as headless Chromium (Debian's) renders it: its DOM after load.
fn browse(url: &str, profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run chromium ({e}): run scripts/test.sh, which installs Debian's chromium"
            )
        });
    assert!(
        out.status.success(),
        "chromium {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The `href`s in `dom` that start with `prefix`.
fn links(dom: &str, prefix: &str) -> Vec<String> {
    dom.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|h| h.starts_with(prefix))
        .map(|h| h.replace("&amp;", "&"))
        .collect()
}

#[test]
fn the_explorer_in_a_real_browser_searches_and_follows_references() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "serve-explorer");
    let root = build_closure(tmp.path(), "serve-explorer", 2, 5000);
    let cache = tmp.path().join("cache");
    upload_to(
        upload_cmd().arg("--write-nar-listing"),
        &keys.secret,
        cache.to_str().unwrap(),
        &closure_of(&root),
    );
    let s = Served::start(tmp.path(), &mut serve_cmd(cache.to_str().unwrap()));
    let profile = tmp.path().join("chromium");
    let all = closure_of(&root);

    // The index: every path, newest (the root, uploaded last) first, and a search form.
    let index = browse(&s.url(), &profile);
    assert!(
        index.contains(&format!("{} store paths", all.len())),
        "{index}"
    );
    let listed = links(&index, "/path/");
    assert_eq!(listed.len(), all.len(), "{index}");
    assert_eq!(listed[0], format!("/path/{}", hash_of(&root)));
    assert!(
        index.contains("<form method=\"get\" action=\"/\""),
        "{index}"
    );
    assert!(index.contains("name=\"q\""), "{index}");

    // Searching: what submitting the form loads (a GET form: action?q=WORD).
    let left = all.iter().find(|p| p.ends_with("-left")).unwrap();
    let word = &Path::new(left).file_name().unwrap().to_str().unwrap()[33..];
    let found = browse(
        &format!(
            "{}/?{}",
            s.url(),
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("q", word)
                .finish()
        ),
        &profile,
    );
    assert!(
        found.contains("1 store path whose name contains"),
        "{found}"
    );
    assert_eq!(
        links(&found, "/path/"),
        [format!("/path/{}", hash_of(left))]
    );

    // The path's page, as following that link shows it.
    let page = browse(
        &format!("{}{}", s.url(), links(&found, "/path/")[0]),
        &profile,
    );
    let info: narpipe::narinfo::NarInfo = std::fs::read_to_string(narinfo_path(&cache, left))
        .unwrap()
        .parse()
        .unwrap();
    assert!(page.contains(&info.nar_hash.to_string()), "{page}");
    assert!(page.contains(&info.sigs[0]), "{page}");
    assert!(
        page.contains(&format!("({} bytes)", info.nar_size)),
        "{page}"
    );
    assert!(
        page.contains(&format!("References ({})", info.references.len())),
        "{page}"
    );
    assert!(page.contains("Referrers (1)"), "{page}");
    assert!(
        page.contains(&format!("/path/{}", hash_of(&root))),
        "the root refers to it: {page}"
    );
    // Its files, from the .ls listing.
    assert!(page.contains("Files"), "{page}");
    assert!(
        page.contains("blob") && page.contains("executable"),
        "{page}"
    );

    // Following a reference: the referenced path's page names this one as a referrer.
    let reference = info.references.iter().find(|r| **r != info.path).unwrap();
    let href = format!("/path/{}", reference.hash_part());
    assert!(links(&page, "/path/").contains(&href), "{page}");
    let referenced = browse(&format!("{}{href}", s.url()), &profile);
    assert!(referenced.contains(reference.name()), "{referenced}");
    assert!(
        links(&referenced, "/path/").contains(&format!("/path/{}", hash_of(left))),
        "{referenced}"
    );
    // Pages past the last: an empty list, still a page.
    let past = browse(&format!("{}/?page=9", s.url()), &profile);
    assert!(past.contains("page 9 of 1"), "{past}");
    assert!(links(&past, "/path/").is_empty());
}

#[test]
fn the_local_stores_explorer_lists_and_describes_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let root = build_closure(tmp.path(), "serve-explore-local", 1, 100);
    let s = Served::start(tmp.path(), &mut serve_cmd("local"));
    let word = &Path::new(&root).file_name().unwrap().to_str().unwrap()[33..];
    let word = word.strip_suffix("-root").unwrap();
    let found = String::from_utf8(s.get(&format!("/?q={word}")).body).unwrap();
    // Newest first: the root was registered last.
    assert_eq!(
        links(&found, "/path/")[0],
        format!("/path/{}", hash_of(&root)),
        "{found}"
    );
    assert_eq!(
        links(&found, "/path/").len(),
        closure_of(&root).len(),
        "{found}"
    );
    let page = String::from_utf8(s.get(&format!("/path/{}", hash_of(&root))).body).unwrap();
    assert!(page.contains("Referrers (0)"), "{page}");
    assert!(page.contains("References (2)"), "{page}");
    assert!(page.contains("blob"), "the listing's files: {page}");
    let no = Served::start(tmp.path(), serve_cmd("local").arg("--no-explorer"));
    assert_eq!(no.get("/").status, 404);
}
