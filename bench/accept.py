#!/usr/bin/env python3
"""How fast the durable queue accepts paths: send -> FIFO -> committed, per second.

usage: bench/accept.py [--n 2000] [--senders 4] [--before DIR --before-name NAME] [--out FILE]

A post-build-hook runs `send -o FIFO $OUT_PATHS` once per build, so the queue must
take far more single-path calls a second than builds can finish. N distinct paths
(a wide closure from bench/make-wide.py, already in the cache, so that nothing but
acceptance is measured) are sent one per `send` call (then 50 per call, which loads
the queue rather than process start-up) by SENDERS parallel workers to
`upload --input FIFO --state-dir …`; the clock stops when the daemon has accepted,
committed and retired all N (its `narpipe_paths_skipped_total` metric reaches N).
With --before, an older build (its directory holding `upload` and `send`) runs the
same load first, for a before/after line. Writes bench/results-accept.md.
"""
import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from run import machine_line
from wide import ENV, TOP, wide_root

METRIC = "narpipe_paths_skipped_total"


def skipped(port):
    try:
        page = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=2).read().decode()
    except OSError:
        return -1
    # One series per cache (a `cache` label) in newer versions, a bare one before.
    values = [int(line.rsplit(" ", 1)[1]) for line in page.splitlines()
              if line.startswith(METRIC + " ") or line.startswith(METRIC + "{")]
    return sum(values) if values else -1


def measure(bindir, paths, senders, tmp, port, per_call):
    upload, send = os.path.join(bindir, "upload"), os.path.join(bindir, "send")
    work = tempfile.mkdtemp(dir=tmp)
    cache, fifo, state = (os.path.join(work, x) for x in ("cache", "fifo", "state"))
    # Everything present: the daemon only accepts, looks, and retires.
    subprocess.run([upload, "--input", "-", cache], input="\n".join(paths).encode(), env=ENV,
                   check=True, stderr=subprocess.DEVNULL)
    os.mkfifo(fifo)
    log = open(os.path.join(work, "daemon.log"), "w")
    d = subprocess.Popen([upload, "--state-dir", state, "--input", fifo,
                          "--metrics-listen", "127.0.0.1:%d" % port, cache],
                         env=ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    while skipped(port) < 0:
        time.sleep(0.05)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(senders) as pool:
        calls = [paths[i:i + per_call] for i in range(0, len(paths), per_call)]
        list(pool.map(lambda c: subprocess.run([send, "-o", fifo] + c, check=True), calls))
    sent = time.perf_counter() - t0
    while skipped(port) < len(paths):
        time.sleep(0.01)
    done = time.perf_counter() - t0
    subprocess.run([send, "-o", fifo, "--finish"], check=True)
    if d.wait() != 0:
        sys.exit("daemon failed: see %s" % log.name)
    return sent, done


def fs_of(path):
    out = subprocess.run(["df", "-T", path], text=True, stdout=subprocess.PIPE).stdout
    return out.splitlines()[-1].split()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--before", help="a directory with an older build's upload and send")
    ap.add_argument("--before-name", default="before", help="how the older build is named")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--out", default=os.path.join(TOP, "bench/results-accept.md"))
    a = ap.parse_args()
    tmp = a.tmp or tempfile.mkdtemp(prefix="narpipe-accept-")
    os.makedirs(tmp, exist_ok=True)
    keep = os.path.join(os.path.dirname(os.path.abspath(tmp)), "narpipe-wide-roots")
    os.makedirs(keep, exist_ok=True)
    root = wide_root(a.n, keep)
    paths = subprocess.run(["nix-store", "-qR", root], env=ENV, check=True, text=True,
                           stdout=subprocess.PIPE).stdout.split()[: a.n]
    builds = ([(a.before_name, a.before)] if a.before else []) + \
        [("this build", os.path.join(TOP, "target/release"))]
    lines = [
        "narpipe acceptance benchmark, %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine_line(),
        "%d paths, %d senders at once, all already in the cache; state dir in %s "
        "(`df`: %s)" % (len(paths), a.senders, tmp, fs_of(tmp)),
        "",
        "| build | paths per send call | sends done (s) | all committed and retired (s) | paths/s |",
        "|---|---|---|---|---|",
    ]
    port = 9181
    for per_call in (1, 50):
        for name, bindir in builds:
            port += 1
            sent, done = measure(bindir, paths, a.senders, tmp, port, per_call)
            lines.append("| %s | %d | %.2f | %.2f | %.0f |"
                         % (name, per_call, sent, done, len(paths) / done))
            print(lines[-1], flush=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
