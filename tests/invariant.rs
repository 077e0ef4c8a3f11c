//! The closure invariant, watched as it happens: inotify records the moment every
//! object becomes visible under its final name, and no narinfo may appear before its
//! NAR or before the narinfos of its references.

mod common;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use narpipe::narinfo::NarInfo;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// A closure with many paths at once and large NARs, so that uploads finish out of
/// dependency order; the root's NAR is over 8 MiB compressed (multipart path).
fn wide_closure_expr(tag: &str) -> String {
    let word = unique(tag);
    blob_expr(&format!(
        r#"  leaves = builtins.genList (i: mk "{word}-leaf-${{toString i}}" (if i == 0 then 3000000 else 1000 * i) []) 12;
  mids = builtins.genList (i: mk "{word}-mid-${{toString i}}" 200 leaves) 4;
in mk "{word}-root" 9000000 mids
"#
    ))
}

#[test]
fn no_narinfo_is_visible_before_its_nar_and_its_references() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-invariant");
    let root = build_expr(tmp.path(), "wide", &wide_closure_expr("wide"));
    let closure = closure_of(&root);
    assert_eq!(closure.len(), 17);
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(cache.join("nar")).unwrap();

    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    let flags = AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE;
    let root_wd = inotify.add_watch(&cache, flags).unwrap();
    let nar_wd = inotify.add_watch(&cache.join("nar"), flags).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen: Vec<String> = Vec::new();
            loop {
                let finished = done.load(Ordering::SeqCst);
                match inotify.read_events() {
                    Ok(events) => {
                        for e in events {
                            let name = e.name.unwrap_or_else(OsString::new);
                            let name = name.to_string_lossy();
                            if name.contains('#') {
                                continue; // a staging file, not visible under its name
                            }
                            let full = if e.wd == nar_wd {
                                format!("nar/{name}")
                            } else {
                                assert!(e.wd == root_wd);
                                name.to_string()
                            };
                            seen.push(full);
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) if finished => return seen,
                    Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => panic!("inotify: {e}"),
                }
            }
        })
    };

    // Upload the closure roots-first (the worst order for the invariant), four at a time.
    let mut paths = closure.clone();
    paths.reverse();
    let mut child = Command::new(UPLOAD)
        .env("NIX_CONFIG", NIX_CONFIG)
        .args(["--jobs", "4", "--secret-key-file"])
        .arg(&keys.secret)
        .arg(&cache)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for p in &paths {
            writeln!(stdin, "{p}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    done.store(true, Ordering::SeqCst);
    let events = watcher.join().unwrap();

    let when: HashMap<&str, usize> = events
        .iter()
        .enumerate()
        .rev()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut checked = 0;
    for (i, name) in events.iter().enumerate() {
        let Some(hash) = name.strip_suffix(".narinfo") else {
            continue;
        };
        let info: NarInfo = std::fs::read_to_string(cache.join(name))
            .unwrap()
            .parse()
            .unwrap();
        let nar_at = when.get(info.url.as_str()).copied();
        assert!(
            nar_at.is_some_and(|t| t < i),
            "{hash}.narinfo appeared (event {i}) before its NAR {} ({nar_at:?})",
            info.url
        );
        for r in &info.references {
            let r_hash = r.hash_part();
            if r_hash == hash {
                continue;
            }
            let key = format!("{r_hash}.narinfo");
            let r_at = when.get(key.as_str()).copied();
            assert!(
                r_at.is_some_and(|t| t < i),
                "{hash}.narinfo appeared (event {i}) before its reference {r} ({r_at:?})"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 17, "saw {events:?}");
    assert_substitutes(Path::new(&cache), &root, &keys.public, tmp.path());
}
