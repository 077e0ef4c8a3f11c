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
    let narinfo = |p: &str| narinfo_path(&cache, p);
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

#[test]
fn build_deps_land_in_the_cache_and_spare_a_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = keygen(tmp.path(), "narpipe-build-deps");
    let word = unique("bdeps");
    let tool_expr = format!(
        r#"derivation {{ name = "{word}-tool"; system = builtins.currentSystem; builder = "/bin/sh";
             args = [ "-c" "echo tool > $out" ]; }}"#
    );
    // The tool is needed to build, but not referenced by what is built.
    let uses_tool = |name: &str| {
        format!(
            r#"let tool = {tool_expr}; in derivation {{ name = "{word}-{name}"; system = builtins.currentSystem;
                 builder = "/bin/sh"; PATH = "/usr/bin:/bin";
                 args = [ "-c" "cat ${{tool}} > /dev/null; echo {name} > $out" ]; }}"#
        )
    };
    let app = build_expr(tmp.path(), "app", &uses_tool("app"));
    let tool = build_expr(tmp.path(), "tool", &tool_expr);
    assert!(
        closure_of(&app).len() == 1,
        "the tool must be a build-only dependency"
    );
    let cache = tmp.path().join("cache");
    let upload = |extra: &[&str]| {
        let mut c = Command::new(UPLOAD);
        c.env("NIX_CONFIG", NIX_CONFIG)
            .args(extra)
            .arg("--secret-key-file")
            .arg(&keys.secret)
            .arg(&cache)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        writeln!(child.stdin.take().unwrap(), "{app}").unwrap();
        child.wait_with_output().unwrap()
    };
    let narinfo = |p: &str| narinfo_path(&cache, p);
    let out = upload(&[]);
    assert!(out.status.success());
    assert!(narinfo(&app).exists() && !narinfo(&tool).exists());
    let out = upload(&["--include-build-deps"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        narinfo(&tool).exists(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the tool locally, Nix builds another dependent by fetching the tool
    // from the cache instead of building it.
    run_ok(nix("nix-store").arg("--delete").arg(&tool));
    let file = tmp.path().join("other.nix");
    std::fs::write(&file, uses_tool("other")).unwrap();
    let out = nix("nix-build")
        .arg(&file)
        .arg("--no-out-link")
        .arg("--option")
        .arg("substituters")
        .arg(format!("file://{}", cache.display()))
        .arg("--option")
        .arg("trusted-public-keys")
        .arg(&keys.public)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("copying path '{tool}' from 'file://")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("building '") && l.contains("-tool.drv")),
        "the tool was rebuilt: {log}"
    );
}

#[test]
fn import_publishes_nothing_above_an_entry_that_fails_to_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = build_closure(tmp.path(), "import-broken", 2, 100);
    let closure = closure_of(&root);
    let src = tmp.path().join("src");
    run_ok(
        nix("nix")
            .arg("copy")
            .arg("--to")
            .arg(format!("file://{}", src.display()))
            .arg(&root),
    );
    // Corrupt the NAR of the bottom of the chain: everything refers to it.
    let leaf = closure.iter().find(|p| p.ends_with("-0")).unwrap();
    let narinfo = std::fs::read_to_string(narinfo_path(&src, leaf)).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    let mut bytes = std::fs::read(src.join(url)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(src.join(url), bytes).unwrap();
    let dest = tmp.path().join("dest");
    let out = upload_cmd()
        .arg("import")
        .arg(&src)
        .arg(&dest)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("failed {leaf}")), "{log}");
    assert_eq!(
        narinfo_count(&dest),
        0,
        "entries above the broken one were published: {log}"
    );
}
