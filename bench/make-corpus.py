#!/usr/bin/env python3
"""Builds a benchmark closure in the local Nix store and prints its root path.

The closure looks like a real system's: N store paths whose sizes follow a long
tail (many small paths, a few of tens of MB), filled with files of this machine
(libraries, binaries, docs: compressible as real packages are) and, in some paths,
incompressible bytes (as bundled archives are). Each path refers to a few earlier
ones, so narinfos carry real References. The plan is written as JSON and read by a
small Nix expression; the same arguments on the same machine give the same paths.

usage: make-corpus.py [--paths 1000] [--mb 1024] [--seed 7] [--name corpus]
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile

NIX = r'''
let
  plan = builtins.fromJSON (builtins.readFile ./plan.json);
  build = acc: node:
    let
      deps = map (i: builtins.elemAt acc i) node.deps;
      drv = derivation {
        name = node.name;
        system = builtins.currentSystem;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        files = node.files;
        noise = toString node.noise;
        inherit deps;
        args = [ "-c" ''
          set -e
          mkdir -p $out/lib $out/nix-support
          i=0
          for f in $files; do i=$((i + 1)); cp "$f" "$out/lib/$i-''${f##*/}"; done
          if [ "$noise" -gt 0 ]; then head -c "$noise" /dev/urandom > $out/lib/bundle.bin; fi
          for d in $deps; do echo "$d" >> $out/nix-support/propagated; done
        '' ];
      };
    in acc ++ [ drv ];
  all = builtins.foldl' build [] plan.nodes;
in builtins.elemAt all (builtins.length all - 1)
'''


def machine_files():
    found = []
    for top in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share/doc", "/usr/lib/python3"):
        for dirpath, _, names in os.walk(top):
            for n in names:
                p = os.path.join(dirpath, n)
                if any(c in p for c in " '\"$`\\\n*?[") or os.path.islink(p):
                    continue
                try:
                    size = os.path.getsize(p)
                except OSError:
                    continue
                if 0 < size < (48 << 20) and os.access(p, os.R_OK):
                    found.append((p, size))
    found.sort()
    return found


def plan(paths, total, seed, name):
    rng = random.Random(seed)
    files = machine_files()
    if not files:
        sys.exit("no readable files found on this machine")
    weights = [math.exp(rng.gauss(11.5, 1.9)) for _ in range(paths)]
    scale = total / sum(weights)
    nodes = []
    pos = rng.randrange(len(files))
    for i, w in enumerate(weights):
        size = max(512, int(w * scale))
        noise = int(size * rng.choice([0, 0, 0, 0.2, 0.5, 1.0]))
        want, got, picked = size - noise, 0, []
        for _ in range(5000):
            if got >= want or len(picked) >= 300:
                break
            p, s = files[pos % len(files)]
            pos += 1 + rng.randrange(5)
            if got + s <= want + 8192:
                picked.append(p)
                got += s
        deps = sorted({rng.randrange(i) for _ in range(rng.randrange(5))}) if i else []
        nodes.append({"name": "%s-%04d" % (name, i), "files": picked, "noise": noise, "deps": deps})
    # The root refers to every path nobody else refers to, so the closure is all of them.
    used = {d for n in nodes for d in n["deps"]}
    nodes.append({"name": name + "-root", "files": [], "noise": 0,
                  "deps": [i for i in range(len(nodes)) if i not in used]})
    return {"nodes": nodes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=1000)
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--name", default="narpipe-corpus")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="narpipe-corpus-")
    with open(os.path.join(work, "plan.json"), "w") as f:
        json.dump(plan(a.paths, a.mb << 20, a.seed, a.name), f)
    with open(os.path.join(work, "default.nix"), "w") as f:
        f.write(NIX)
    env = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")
    out = subprocess.run(["nix-build", work, "--no-out-link", "--quiet", "--cores", "2", "-j", "2"],
                         env=env, check=True, stdout=subprocess.PIPE, text=True)
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
