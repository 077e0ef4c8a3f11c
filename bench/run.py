#!/usr/bin/env python3
"""narpipe's benchmark: upload against `nix copy` on the same closure, in one run.

usage: bench/run.py [--root STORE_PATH] [--rounds 3] [--out bench/results.md]

Without --root it builds the corpus (bench/make-corpus.py: ~1000 paths, ~800 MB).
Measures, alternating the tools round by round on this machine:
  - pushing the closure to a fresh file:// cache, zstd and none
  - a re-run with everything already present
  - `send` latency over 1000 calls to a running upload daemon
  - end-to-end latency of the daemon: send -> narinfo visible, small paths
  - peak RSS of upload for the corpus and for one 1 GiB store path
and prints a table of medians with the ratio to nix copy, also written to --out.
Expects release binaries in target/release (bench/run.sh builds them).
"""
import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
UPLOAD = os.path.join(TOP, "target/release/upload")
SEND = os.path.join(TOP, "target/release/send")
ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")


def sh(args, **kw):
    return subprocess.run(args, env=ENV, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def timed(args, stdin=None):
    """Wall seconds and peak RSS (KiB) of one command."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(args, env=ENV, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            sys.exit("failed: %s\n%s" % (" ".join(args), err.read().decode(errors="replace")[-2000:]))
    return wall, usage.ru_maxrss


def build(expr, tmp):
    f = os.path.join(tmp, "expr-%d.nix" % time.time_ns())
    with open(f, "w") as fh:
        fh.write(expr)
    return sh(["nix-build", f, "--no-out-link", "--quiet"]).strip().splitlines()


def median(xs):
    return statistics.median(xs)


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    a = ap.parse_args()
    for b in (UPLOAD, SEND):
        if not os.access(b, os.X_OK):
            sys.exit("%s missing: run bench/run.sh (it builds it)" % b)
    tmp = tempfile.mkdtemp(prefix="narpipe-bench-")
    root = a.root or sh([sys.executable, os.path.join(HERE, "make-corpus.py")]).strip().splitlines()[-1]
    paths = sh(["nix-store", "-qR", root]).split()
    info = sh(["nix", "path-info", "-S", root]).split()
    closure_mb = int(info[-1]) / 1e6
    listing = os.path.join(tmp, "paths")
    with open(listing, "w") as f:
        f.write("\n".join(paths) + "\n")
    print("corpus: %s, %d paths, %.0f MB" % (root, len(paths), closure_mb), file=sys.stderr)
    # Warm the page cache so that neither tool pays for the first read.
    with open(listing) as fin:
        subprocess.run(["tar", "-cf", "/dev/null", "--files-from=-"], stdin=fin, check=True,
                       stderr=subprocess.DEVNULL)

    results = {}  # measure -> (narpipe list, nixcopy list)

    def fresh(name):
        d = os.path.join(tmp, name)
        shutil.rmtree(d, ignore_errors=True)
        return d

    for comp in ("zstd", "none"):
        ours, theirs = [], []
        for r in range(a.rounds):
            runs = [("ours", comp), ("nix", comp)]
            if r % 2:
                runs.reverse()
            for who, c in runs:
                if who == "ours":
                    d = fresh("ours-" + c)
                    with open(listing) as fin:
                        w, _ = timed([UPLOAD, "--compression", c, "--input", "-", d], stdin=fin)
                    ours.append(w)
                else:
                    d = fresh("nix-" + c)
                    w, _ = timed(["nix", "copy", "--to", "file://%s?compression=%s" % (d, c), root])
                    theirs.append(w)
            print("  %s round %d: narpipe %.2fs, nix copy %.2fs" % (comp, r + 1, ours[-1], theirs[-1]), file=sys.stderr)
        results["push closure, " + comp] = (ours, theirs)

    # Everything already present (the zstd caches from above).
    ours, theirs = [], []
    for _ in range(max(5, a.rounds)):
        with open(listing) as fin:
            ours.append(timed([UPLOAD, "--input", "-", os.path.join(tmp, "ours-zstd")], stdin=fin)[0])
        theirs.append(timed(["nix", "copy", "--to", "file://%s?compression=zstd" % os.path.join(tmp, "nix-zstd"), root])[0])
    results["re-run, all present"] = (ours, theirs)

    # Daemon: send latency and end-to-end latency.
    fifo = os.path.join(tmp, "fifo")
    os.mkfifo(fifo)
    cache = fresh("daemon-cache")
    log = open(os.path.join(tmp, "daemon.log"), "w")
    daemon = subprocess.Popen([UPLOAD, "--state-dir", os.path.join(tmp, "state"), "--input", fifo, cache],
                              env=ENV, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        word = "bench-e2e-%d" % time.time_ns()
        small = build("""builtins.genList (i: derivation { name = "%s-${toString i}"; system = builtins.currentSystem;
            builder = "/bin/sh"; args = [ "-c" "echo ${toString i} > $out" ]; }) 30""" % word, tmp)
        time.sleep(0.5)
        e2e = []
        for p in small[:20]:
            narinfo = os.path.join(cache, os.path.basename(p)[:32] + ".narinfo")
            t0 = time.perf_counter()
            subprocess.run([SEND, "-o", fifo, p], check=True)
            while not os.path.exists(narinfo):
                time.sleep(0.001)
            e2e.append(time.perf_counter() - t0)
        results["end-to-end, small path (s)"] = (e2e, None)
        lat, base = [], []
        target = small[-1]
        for _ in range(1000):
            t0 = time.perf_counter()
            subprocess.run([SEND, "-o", fifo, target], check=True)
            lat.append((time.perf_counter() - t0) * 1000)
        for _ in range(200):
            t0 = time.perf_counter()
            subprocess.run(["/bin/true"], check=True)
            base.append((time.perf_counter() - t0) * 1000)
        results["send per call, median (ms)"] = ([median(lat)], None)
        results["send per call, p99 (ms)"] = ([p99(lat)], None)
        results["  (spawning /bin/true from this harness, median ms)"] = ([median(base)], None)
    finally:
        subprocess.run([SEND, "-o", fifo, "--finish"])
        daemon.wait(timeout=120)
        log.close()

    # Peak RSS.
    d = fresh("rss-corpus")
    with open(listing) as fin:
        _, rss = timed([UPLOAD, "--input", "-", d], stdin=fin)
    results["upload peak RSS, corpus (MB)"] = ([rss / 1024], None)
    big = build("""derivation { name = "narpipe-bench-1gib"; system = builtins.currentSystem; builder = "/bin/sh";
        PATH = "/usr/bin:/bin"; args = [ "-c" "mkdir $out; head -c 536870912 /dev/urandom > $out/random; head -c 536870912 /dev/zero > $out/zeros" ]; }""", tmp)[0]
    d = fresh("rss-big")
    p = subprocess.Popen(["echo", big], stdout=subprocess.PIPE)
    _, rss = timed([UPLOAD, "--input", "-", d], stdin=p.stdout)
    results["upload peak RSS, one 1 GiB path (MB)"] = ([rss / 1024], None)

    targets = {
        "push closure, zstd": ("ratio", 0.5),
        "push closure, none": ("ratio", 0.5),
        "re-run, all present": ("abs", 0.2),
        "end-to-end, small path (s)": ("abs", 1.0),
        "send per call, median (ms)": ("abs", 3.0),
        "send per call, p99 (ms)": ("abs", 10.0),
        "upload peak RSS, corpus (MB)": ("abs", 100),
        "upload peak RSS, one 1 GiB path (MB)": ("abs", 100),
    }
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "narpipe benchmark, %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine: %d cores (%s), %s; %s" % (os.cpu_count(), cpu, platform.platform(), sh(["nix", "--version"]).strip()),
        "corpus: %d paths, %.0f MB of NAR; medians of %d alternating rounds" % (len(paths), closure_mb, a.rounds),
        "",
        "| measure | narpipe | nix copy | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, (ours, theirs) in results.items():
        m = median(ours)
        t = median(theirs) if theirs else None
        ratio = m / t if t else None
        kind, goal = targets.get(name, (None, None))
        if kind == "ratio":
            met, goal_s = ratio <= goal, "≤ %.1f× nix copy" % goal
        elif kind == "abs":
            met, goal_s = m <= goal, "≤ %g" % goal
        else:
            met, goal_s = None, ""
        lines.append("| %s | %s | %s | %s | %s | %s |" % (
            name,
            "%.3f" % m if m < 10 else "%.1f" % m,
            "%.3f" % t if t is not None else "",
            "%.2f" % ratio if ratio is not None else "",
            goal_s,
            "" if met is None else ("yes" if met else "**no**"),
        ))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
