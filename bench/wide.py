#!/usr/bin/env python3
"""narpipe at scale: wide synthetic closures against `nix copy`, in one run.

usage: bench/wide.py [--sizes 20000,100000] [--tmp DIR] [--out bench/results-wide.md]

For each size N, bench/make-wide.py registers (once; reused through a GC root in
--tmp's parent) a closure of N tiny paths with <= 3 references each, no builds. Then:
  - one-shot: `upload --input -` with the whole closure on stdin into a fresh file://
    cache (wall, CPU user+sys, peak RSS), against `nix copy --to file://…?compression=zstd
    ROOT` into another;
  - root only: `echo ROOT | upload` (planning walks the closure itself);
  - re-run with everything present (the one-shot cache, closure on stdin);
  - daemon: `upload --input FIFO --state-dir …` fed by `send` in chunks of 500 paths,
    then `send --finish`: total time and the daemon's peak RSS.
Targets (issue 11): one-shot wall <= 0.5x nix copy; peak RSS <= 150 MB for 100,000
paths; re-run <= 0.5 s at 100,000. Expects release binaries (bench/run.sh builds them).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from run import machine_line, warm  # bench/run.py: one way to name the machine, to warm the page cache

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
UPLOAD = os.path.join(TOP, "target/release/upload")
SEND = os.path.join(TOP, "target/release/send")
ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
CHUNK = 500


def run(args, stdin=None):
    """Wall seconds, CPU seconds (user+sys, children included) and peak RSS in MB."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, env=ENV, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit("failed: %s\n%s" % (" ".join(args[:4]), err.read().decode(errors="replace")[-2000:]))
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1000


def wide_root(n, keep):
    gcroot = os.path.join(keep, "wide-%d.root" % n)
    if os.path.exists(gcroot):
        return os.path.realpath(gcroot)
    out = subprocess.run([sys.executable, os.path.join(HERE, "make-wide.py"), "--n", str(n),
                          "--tag", "bench%d" % n, "--gcroot", gcroot],
                         env=ENV, check=True, text=True, stdout=subprocess.PIPE).stdout
    return out.strip().splitlines()[-1]


def daemon(listing, tmp):
    """Feeds the closure to a daemon through `send`, CHUNK paths a call."""
    fifo = os.path.join(tmp, "fifo")
    os.mkfifo(fifo)
    cache = os.path.join(tmp, "daemon-cache")
    with open(listing) as f:
        paths = f.read().split()
    t0 = time.perf_counter()
    log = open(os.path.join(tmp, "daemon.log"), "w")
    d = subprocess.Popen([UPLOAD, "--state-dir", os.path.join(tmp, "state"), "--input", fifo, cache],
                         env=ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    for i in range(0, len(paths), CHUNK):
        subprocess.run([SEND, "-o", fifo] + paths[i:i + CHUNK], check=True)
    subprocess.run([SEND, "-o", fifo, "--finish"], check=True)
    _, status, ru = os.wait4(d.pid, 0)
    log.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("daemon failed: see %s" % log.name)
    return time.perf_counter() - t0, ru.ru_maxrss / 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--tmp", default=None, help="where the caches go (default: a new dir in $TMPDIR)")
    ap.add_argument("--out", default=os.path.join(HERE, "results-wide.md"))
    a = ap.parse_args()
    keep = os.path.join(tempfile.gettempdir(), "narpipe-wide-roots")
    os.makedirs(keep, exist_ok=True)
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        root = wide_root(n, keep)
        tmp = tempfile.mkdtemp(prefix="narpipe-wide-", dir=a.tmp)
        listing = os.path.join(tmp, "paths")
        with open(listing, "w") as f:
            subprocess.run(["nix-store", "-qR", root], env=ENV, check=True, stdout=f)
        print("N=%d: %s" % (n, root), file=sys.stderr)
        # Each timed run starts with the page cache warm (see run.warm: it does not stay).
        warm(listing)
        with open(listing) as fin:
            ours = run([UPLOAD, "--input", "-", os.path.join(tmp, "ours")], stdin=fin)
        warm(listing)
        theirs = run(["nix", "copy", "--to", "file://%s?compression=zstd" % os.path.join(tmp, "nix"), root])
        print("  one-shot: narpipe %.1fs, nix copy %.1fs" % (ours[0], theirs[0]), file=sys.stderr)
        warm(listing)
        p = subprocess.Popen(["echo", root], stdout=subprocess.PIPE)
        root_only = run([UPLOAD, "--input", "-", os.path.join(tmp, "root-only")], stdin=p.stdout)
        warm(listing)
        with open(listing) as fin:
            rerun = run([UPLOAD, "--input", "-", os.path.join(tmp, "ours")], stdin=fin)
        warm(listing)
        d_wall, d_rss = daemon(listing, tmp)
        print("  root only %.1fs, re-run %.2fs, daemon %.1fs" % (root_only[0], rerun[0], d_wall), file=sys.stderr)
        rss_goal = "≤ 150" if n >= 100000 else ""
        rows += [
            ("%d paths, one-shot on stdin: wall (s)" % n, ours[0], theirs[0], ours[0] / theirs[0], "≤ 0.5× nix copy",
             ours[0] / theirs[0] <= 0.5),
            ("%d paths, one-shot: CPU user+sys (s)" % n, ours[1], theirs[1], ours[1] / theirs[1], "", None),
            ("%d paths, one-shot: peak RSS (MB)" % n, ours[2], theirs[2], None, rss_goal,
             ours[2] <= 150 if rss_goal else None),
            ("%d paths, root only: wall (s)" % n, root_only[0], theirs[0], root_only[0] / theirs[0], "", None),
            ("%d paths, root only: peak RSS (MB)" % n, root_only[2], None, None, rss_goal,
             root_only[2] <= 150 if rss_goal else None),
            ("%d paths, re-run, all present: wall (s)" % n, rerun[0], None, None,
             "≤ 0.5" if n >= 100000 else "", rerun[0] <= 0.5 if n >= 100000 else None),
            ("%d paths, daemon fed by send, %d a call: wall (s)" % (n, CHUNK), d_wall, None, None, "", None),
            ("%d paths, daemon: peak RSS (MB)" % n, d_rss, None, None, rss_goal, d_rss <= 150 if rss_goal else None),
        ]
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "narpipe wide-closure benchmark, %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine_line(),
        "closures: bench/make-wide.py (tiny paths, <= 3 references); caches in %s; MB = 10^6 bytes"
        % (a.tmp or tempfile.gettempdir()),
        "",
        "| measure | narpipe | nix copy | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, ours, theirs, ratio, goal, met in rows:
        lines.append("| %s | %.2f | %s | %s | %s | %s |" % (
            name, ours, "%.2f" % theirs if theirs is not None else "",
            "%.2f" % ratio if ratio is not None else "", goal,
            "" if met is None else ("yes" if met else "**no**")))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
