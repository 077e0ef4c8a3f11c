#!/usr/bin/env python3
"""How fast `serve` answers: narinfos from a folder cache under load, NARs from the
local store against `nix-store --dump PATH | cat`.

usage: bench/serve.py [--n 2000] [--seconds 10] [--connections 64] [--nar-mb 512]
                      [--rounds 3] [--out FILE]

- narinfo: a folder cache of N narinfos (a wide closure from bench/make-wide.py pushed
  by `upload`), served by `serve`; `oha` (crates.io, installed into
  target/bench-tools) keeps CONNECTIONS connections busy for SECONDS, first on one
  narinfo, then on narinfos spread over the whole cache (`--urls-from-file`, every
  request another path); requests/s, p50, p99. Goal: p50 <= 1 ms, p99 <= 5 ms.
- NAR: a store path of NAR_MB MiB (half random, half zeros) served by `serve local`,
  fetched whole by `curl -o /dev/null`, against `nix-store --dump PATH | cat >
  /dev/null`, ROUNDS alternating pairs, medians. Goal: >= 0.8x the dump's throughput.

Builds the release binaries and installs oha when missing. Writes
bench/results-serve.md (date, machine) unless --out says otherwise.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from run import machine_line, warm
from wide import ENV, TOP

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(TOP, "target/bench-tools")
OHA = os.path.join(TOOLS, "bin/oha")
SERVE = os.path.join(TOP, "target/release/serve")
UPLOAD = os.path.join(TOP, "target/release/upload")


def sh(args, **kw):
    return subprocess.run(args, env=ENV, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def ensure_tools():
    if not os.path.exists(OHA):
        print("== installing oha into %s (cargo install, a few minutes)" % TOOLS, file=sys.stderr)
        subprocess.run(["cargo", "install", "oha", "--locked", "--root", TOOLS], check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "serve", "--bin", "upload"],
                   cwd=TOP, check=True)


class Served:
    """`serve` on a port of its choosing, stopped on exit."""

    def __init__(self, args, work):
        self.log = open(os.path.join(work, "serve-%d.log" % time.monotonic_ns()), "w+")
        self.p = subprocess.Popen([SERVE, "--listen", "127.0.0.1:0"] + args, env=ENV,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 30
        while True:
            self.log.seek(0)
            text = self.log.read()
            if " on http://" in text:
                self.url = text.split(" on ", 1)[1].split()[0]
                return
            if self.p.poll() is not None or time.time() > deadline:
                sys.exit("serve did not start: " + text)
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.p.terminate()
        self.p.wait()


def oha(args, seconds, connections):
    out = sh([OHA, "--no-tui", "--output-format", "json", "-c", str(connections),
              "-z", "%ds" % seconds] + args)
    r = json.loads(out)
    codes = r.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    bad = sum(v for k, v in codes.items() if k != "200")
    pct = r["latencyPercentiles"]
    return {
        "rps": r["summary"]["requestsPerSec"],
        "p50": pct["p50"] * 1000,
        "p99": pct["p99"] * 1000,
        "ok": ok,
        # Requests still in flight when the time is up are aborted by oha: not errors.
        "bad": bad + sum(v for k, v in r.get("errorDistribution", {}).items()
                         if "deadline" not in k),
    }


def wide_root(n, keep):
    """A wide closure of N tiny paths of this benchmark's own (bench/make-wide.py)."""
    gcroot = os.path.join(keep, "wide-%d.root" % n)
    if not os.path.exists(gcroot):
        tag = "serve%d-%d" % (n, time.time_ns())
        sh([sys.executable, os.path.join(HERE, "make-wide.py"), "--n", str(n), "--tag", tag,
            "--gcroot", gcroot])
    return os.path.realpath(gcroot)


def narinfo_rows(n, seconds, connections, keep, work):
    root = wide_root(n, keep)
    paths = sh(["nix-store", "-qR", root]).split()
    cache = os.path.join(work, "cache")
    subprocess.run([UPLOAD, "--no-upstream", "--input", "-", cache], input="\n".join(paths),
                   text=True, env=ENV, check=True, stderr=subprocess.DEVNULL)
    rows = []
    with Served([cache], work) as s:
        one = "%s/%s.narinfo" % (s.url, os.path.basename(root)[:32])
        urllib.request.urlopen(one).read()
        r = oha([one], seconds, connections)
        rows.append(("one narinfo, over and over", r))
        urls = os.path.join(work, "urls")
        with open(urls, "w") as f:
            for p in paths:
                f.write("%s/%s.narinfo\n" % (s.url, os.path.basename(p)[:32]))
        r = oha(["--urls-from-file", urls], seconds, connections)
        rows.append(("%d narinfos, each request another" % len(paths), r))
        # For scale: one connection, one request at a time (no queueing in the figures).
        r = oha(["--urls-from-file", urls], seconds, 1)
        rows.append(("%d narinfos, each request another, 1 connection" % len(paths), r))
    return len(paths), rows


def big_path(mb, work):
    expr = os.path.join(work, "big.nix")
    with open(expr, "w") as f:
        f.write('derivation { name = "serve-bench-big-%d"; system = builtins.currentSystem; '
                'builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = [ "-c" '
                '"mkdir $out; head -c %d /dev/urandom > $out/random; head -c %d /dev/zero > $out/zeros" ]; }'
                % (mb, (mb << 20) // 2, (mb << 20) // 2))
    return sh(["nix-build", expr, "--no-out-link", "--quiet"]).strip()


def timed(args):
    t0 = time.perf_counter()
    subprocess.run(args, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def nar_rows(mb, rounds, work):
    path = big_path(mb, work)
    size = int(sh(["nix", "path-info", "--json", path]).split('"narSize":')[1].split(",")[0].split("}")[0])
    with Served(["local"], work) as s:
        info = urllib.request.urlopen("%s/%s.narinfo" % (s.url, os.path.basename(path)[:32])).read().decode()
        url = s.url + "/" + next(l[5:] for l in info.splitlines() if l.startswith("URL: "))
        listed = os.path.join(work, "nar-path")
        with open(listed, "w") as f:
            f.write(path + "\n")
        ours, dump = [], []
        for _ in range(rounds):
            warm(listed)
            ours.append(timed(["curl", "-sf", "-o", "/dev/null", url]))
            warm(listed)
            dump.append(timed(["sh", "-c", 'nix-store --dump "$0" | cat > /dev/null', path]))
    return size, statistics.median(ours), statistics.median(dump)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--nar-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results-serve.md"))
    a = ap.parse_args()
    ensure_tools()
    keep = "/tmp/narpipe-bench-serve"
    os.makedirs(keep, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=keep) as work:
        n, rows = narinfo_rows(a.n, a.seconds, a.connections, keep, work)
        size, ours, dump = nar_rows(a.nar_mb, a.rounds, work)
    lines = [
        "narpipe serve benchmark, %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine_line(),
        "oha %s; the machine is shared with other work while this runs: figures are what"
        " this run saw, not the machine's best." % sh([OHA, "--version"]).split()[-1],
        "",
        "| narinfo load (folder cache, %d connections unless said, %d s each) | requests/s | p50 (ms) | p99 (ms) | 200s | other | goal met |"
        % (a.connections, a.seconds),
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        met = "yes" if r["p50"] <= 1 and r["p99"] <= 5 and r["bad"] == 0 else "**no**"
        if name.endswith("1 connection"):
            met = "(not the goal's load)"
        lines.append("| %s | %.0f | %.3f | %.3f | %d | %d | %s |"
                     % (name, r["rps"], r["p50"], r["p99"], r["ok"], r["bad"], met))
    mbs = lambda t: size / t / 1e6
    ratio = dump / ours
    lines += [
        "",
        "| NAR of %d MB (half random, half zeros), medians of %d | seconds | MB/s |" % (size // 1000000, a.rounds),
        "|---|---|---|",
        "| `serve local`, `curl -o /dev/null` | %.3f | %.0f |" % (ours, mbs(ours)),
        "| `nix-store --dump PATH \\| cat > /dev/null` | %.3f | %.0f |" % (dump, mbs(dump)),
        "| serve against the dump (goal >= 0.8) | %.2f | %s |" % (ratio, "yes" if ratio >= 0.8 else "**no**"),
        "",
        "At %d connections the latency is mostly queueing: by Little's law a p50 of 1 ms"
        " needs about %d requests/s, with oha itself on the same 2 cores." % (a.connections, a.connections * 1000),
        "A folder's narinfos are held in memory for 1 s after a read (src/serve/bucket.rs):"
        " under this load nearly every answer is from memory; each narinfo is read from"
        " the folder at most once a second.",
        "",
        "harmonia and nix-serve-ng: neither is in the registries this machine reaches"
        " (crates.io's `harmonia` is a music-theory crate), so there is no row for them.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
