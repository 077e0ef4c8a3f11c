#!/usr/bin/env python3
"""A/B two (or more) builds of `upload` on the same store paths, alternating.

For engine changes whose effect is smaller than the noise of one run: each round runs
every binary once into a fresh `file://` cache (reversing the order every other
round), and the medians and minimums of wall time and CPU (user+sys, with children,
from `wait4`) are printed with the peak RSS.

  cp target/release/upload /tmp/upload-a    # before the change
  cp target/release/upload /tmp/upload-b    # after it
  python3 bench/ab.py /tmp/upload-a /tmp/upload-b --paths LIST --compression zstd --rounds 9

LIST holds store paths, one per line (e.g. `nix-store -qR ROOT > LIST`). The caches go
under --tmp (default /dev/shm, so that the disk does not add noise) and are removed.
"""
import argparse, os, shutil, statistics, subprocess, tempfile, time


def run(binary, compression, paths, cache):
    env = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
    with open(paths) as stdin:
        t0 = time.monotonic()
        p = subprocess.Popen([binary, "--compression", compression, "--input", "-", "file://" + cache],
                             stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
    if status != 0:
        raise SystemExit("%s failed (status %d): %s" % (binary, status, err.decode(errors="replace")[-2000:]))
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binaries", nargs="+")
    ap.add_argument("--paths", required=True, help="file of store paths, one per line")
    ap.add_argument("--compression", default="zstd")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tmp", default="/dev/shm")
    a = ap.parse_args()
    results = {b: [] for b in a.binaries}
    for r in range(a.rounds):
        for b in a.binaries if r % 2 == 0 else a.binaries[::-1]:
            cache = tempfile.mkdtemp(prefix="narpipe-ab-", dir=a.tmp)
            try:
                results[b].append(run(b, a.compression, a.paths, cache))
                print("  round %d %s: wall %.3f s, CPU %.3f s, peak RSS %.0f MB" % (
                    r + 1, b, results[b][-1][0], results[b][-1][1], results[b][-1][2] * 1.048576), flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    print("%d rounds, --compression %s, %s" % (a.rounds, a.compression, a.paths))
    for b, rs in results.items():
        walls, cpus, rss = zip(*rs)
        print("%-28s wall median %.3f s (min %.3f)  CPU median %.3f s (min %.3f)  peak RSS %.0f MB" % (
            b, statistics.median(walls), min(walls), statistics.median(cpus), min(cpus), max(rss) * 1.048576))


if __name__ == "__main__":
    main()
