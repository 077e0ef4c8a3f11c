#!/usr/bin/env python3
"""narpipe's benchmark: upload against `nix copy` on the same data, in one run.

usage: bench/run.py [--root STORE_PATH] [--rounds 5] [--skip-xz] [--out bench/results.md]

Without --root it builds the corpus (bench/make-corpus.py: ~1000 paths, ~800 MB).
Where a measure has a baseline (mostly `nix copy` on the same data), both run in this
run, alternating round by round; the table gives narpipe's figure, the baseline's,
their ratio, the target and whether it is met:
  - push the closure to a fresh file:// cache with zstd and with none (--rounds
    alternating pairs, medians): wall time and CPU time (user+sys of the process and
    its children, from wait4), against `nix copy`
  - the same with xz, one pair only (nix copy takes ~6 min; --skip-xz leaves it out);
    narpipe's side runs with --metrics-listen and a thread GETs /metrics on a fresh
    connection every 100 ms: p50/p99 latency (a 10 s timeout or a failed request
    counts as 10 s). With --skip-xz that latency comes from a separate xz upload of
    the corpus, stopped with SIGTERM after 30 s if still running.
  - a re-run with everything already present (the zstd caches from above)
  - one big store path (512 MiB random + 512 MiB zeros, built by a derivation):
    upload --compression zstd against `nix-store --dump PATH | zstd -3 -T1` and
    against `nix copy`, wall time and peak RSS
  - SIGTERM mid-xz: upload (and nix copy) compressing the big path with xz get
    SIGTERM after 3 s (upload: once its temporary object under nar/ exists, at most
    20 s more); time from the signal until the process has exited, and the files
    left under nar/ (a partial object)
  - peak RSS (largest over the rounds) of the closure pushes; for xz it is shown
    beside jobs × the xz level-6 encoder's memory
  - `send` latency over 1000 calls to a running upload daemon, and end-to-end
    latency of the daemon: send -> narinfo visible, small paths
Above the table, a calibration line, measured at the start and at the end: SHA-256 and
cached-file read speeds, the work both tools share. On the benchmark machines they drift
during a day, and the ratios with them; compare runs with it in mind.
The table is printed and written to --out. MB means 10^6 bytes.
Expects release binaries in target/release and the zstd CLI (bench/run.sh sees to both).
"""
import argparse
import atexit
import hashlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
UPLOAD = os.path.join(TOP, "target/release/upload")
SEND = os.path.join(TOP, "target/release/send")
ENV = dict(os.environ, NIX_CONFIG="substituters =\nexperimental-features = nix-command")

# xz level 6 (upload's and nix's default) needs 94 MiB to compress: the "CompMem" column
# of xz(1)'s preset table, and what `xz -vv -6` prints. xz_encoder_mib() asks xz itself.
XZ6_ENCODER_MIB = 94
METRICS_TIMEOUT = 10.0  # s; a /metrics request that takes longer counts as this
SIGTERM_AFTER = 3.0  # s of xz compression before the signal
PARTIAL_WAIT = 20.0  # s more for upload to have a partial object under nar/ before the signal
KILL_AFTER = 30.0  # s after SIGTERM before SIGKILL (then the measure is "not met")

Run = namedtuple("Run", "wall cpu rss code")  # s, s (user+sys, with children), MB, exit code


# ---- running things -------------------------------------------------------------------

def sh(args, **kw):
    return subprocess.run(args, env=ENV, check=True, text=True, stdout=subprocess.PIPE, **kw).stdout


def launch(args, stdin=None):
    """Starts a command with stderr kept in a temporary file; returns (Popen, t0, errfile)."""
    err = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen(args, env=ENV, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err)
    return p, t0, err


def reap(p, t0, err, check=True):
    """Waits for a launched command: wall since launch, CPU, peak RSS, exit code."""
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if check and p.returncode != 0:
        err.seek(0)
        sys.exit("failed (%d): %s\n%s" % (p.returncode, " ".join(p.args),
                                           err.read().decode(errors="replace")[-2000:]))
    err.close()
    # ru_maxrss is in KiB; for a shell pipeline it is the largest of the reaped children.
    return Run(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024 / 1e6, p.returncode)


def timed(args, stdin=None, check=True):
    p, t0, err = launch(args, stdin)
    return reap(p, t0, err, check)


def upload_paths(cache, paths_file, compression, *extra):
    """Runs upload on the paths listed in a file; returns its Run."""
    with open(paths_file) as fin:
        return timed([UPLOAD, "--compression", compression, *extra, "--input", "-", cache], stdin=fin)


def nix_copy(cache, compression, path):
    return timed(["nix", "copy", "--to", "file://%s?compression=%s" % (cache, compression), path])


def build(expr, tmp):
    f = os.path.join(tmp, "expr-%d.nix" % time.time_ns())
    with open(f, "w") as fh:
        fh.write(expr)
    return sh(["nix-build", f, "--no-out-link", "--quiet"]).strip().splitlines()


def warm(paths_file):
    """Reads every file once so that no tool pays for the first read. Called right
    before each timed run: on the benchmark machine a reclaimer (DAMON `pageout`) drops
    page-cache pages left unread for about a minute, and a cold run reads from disk.
    GNU tar skips file contents when its archive is /dev/null, hence the pipe."""
    with open(paths_file) as fin:
        tar = subprocess.Popen(["tar", "-cf", "-", "--files-from=-"], stdin=fin,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        while tar.stdout.read(1 << 20):
            pass
        if tar.wait() != 0:
            raise SystemExit("tar could not read the paths of %s" % paths_file)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(d):
    """Relative names and sizes of all files below d (none if d is missing)."""
    out = []
    for dirpath, _, names in os.walk(d):
        for n in names:
            f = os.path.join(dirpath, n)
            out.append((os.path.relpath(f, d), os.path.getsize(f)))
    return sorted(out)


def cpu_so_far(pid):
    """User+sys seconds a running process (all its threads) has used, from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def xz_encoder_mib():
    """The xz level-6 encoder's memory, as xz reports it (XZ6_ENCODER_MIB if it can't)."""
    try:
        r = subprocess.run(["xz", "-vv", "-6", "-T1", "-c"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=10)
        m = re.search(r"(\d+) MiB of memory is required", r.stderr)
        if m:
            return int(m.group(1)), "xz -vv -6"
    except (OSError, subprocess.SubprocessError):
        pass
    return XZ6_ENCODER_MIB, "xz(1) preset table"


def median(xs):
    return statistics.median(xs)


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))]


# ---- /metrics poller ------------------------------------------------------------------

class MetricsPoller(threading.Thread):
    """GETs http://127.0.0.1:PORT/metrics on a fresh connection every 100 ms.

    Waits (uncounted) until the first answer, so start-up is not measured; stop() after
    the process has exited. Each sample is (start, latency s, status)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.samples = []
        self.halt = threading.Event()

    def get(self):
        t0 = time.perf_counter()
        deadline = t0 + METRICS_TIMEOUT
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=METRICS_TIMEOUT) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        raise socket.timeout()
                    s.settimeout(left)
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except socket.timeout:
            return t0, METRICS_TIMEOUT, "timeout"
        except OSError as e:
            return t0, time.perf_counter() - t0, type(e).__name__
        ok = data.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"] and b"narpipe_" in data
        return t0, time.perf_counter() - t0, "ok" if ok else "bad answer"

    def run(self):
        while not self.halt.is_set():
            sample = self.get()
            if sample[2] == "ok":
                self.samples.append(sample)
                break
            self.halt.wait(0.02)
        tick = time.perf_counter()
        while True:
            tick = max(tick + 0.1, time.perf_counter())
            if self.halt.wait(tick - time.perf_counter()):
                break
            self.samples.append(self.get())

    def stop(self):
        self.halt.set()
        self.join()

    def summary(self, exited_at):
        """(latencies ms, timeouts, errors). Failed connections in the last second before
        the process exited are its shutdown, not a latency, and are dropped; other
        failures count as the timeout."""
        lat, timeouts, errors = [], 0, 0
        for t0, s, status in self.samples:
            if status not in ("ok", "timeout") and t0 > exited_at - 1.0:
                continue
            if status == "timeout":
                timeouts += 1
            elif status != "ok":
                errors += 1
                s = METRICS_TIMEOUT
            lat.append(s * 1000)
        return lat, timeouts, errors


def metrics_rows(poller, exited_at, how):
    lat, timeouts, errors = poller.summary(exited_at)
    note = "%d requests, %d timeouts, %d failed; %s" % (len(lat), timeouts, errors, how)
    print("  /metrics: %s" % note, file=sys.stderr)
    if not lat:
        return [Row("/metrics latency, p99 (ms): no answer at all (%s)" % how, None, goal=50)]
    return [
        Row("/metrics latency during xz, p50 (ms)", median(lat)),
        Row("/metrics latency during xz, p99 (ms) [%s]" % note, p99(lat), goal=50),
    ]


# ---- the table ------------------------------------------------------------------------

class Row:
    """One line of the table. goal: narpipe ≤ goal; ratio_goal: narpipe ≤ ratio_goal ×
    base. target overrides the target text (then goal/ratio_goal still decide "met")."""

    def __init__(self, name, ours, base=None, goal=None, ratio_goal=None, target=None):
        self.name, self.ours, self.base = name, ours, base
        self.goal, self.ratio_goal, self.target = goal, ratio_goal, target

    def cells(self):
        ratio = self.ours / self.base if self.ours is not None and self.base else None
        if self.ratio_goal is not None:
            met = None if ratio is None else ratio <= self.ratio_goal
            target = "≤ %g× baseline" % self.ratio_goal
        elif self.goal is not None:
            met = None if self.ours is None else self.ours <= self.goal
            target = "≤ %g" % self.goal
        else:
            met, target = None, ""
        if self.target is not None:
            target = self.target
        if self.goal is None and self.ratio_goal is None:
            met_s = ""
        else:
            met_s = "?" if met is None else ("yes" if met else "**no**")
        return [self.name, fmt(self.ours), fmt(self.base),
                "%.2f" % ratio if ratio is not None else "", target, met_s]


def fmt(x):
    if x is None:
        return ""
    if isinstance(x, int):
        return str(x)
    return "%.3f" % x if abs(x) < 10 else "%.1f" % x


def section(title):
    return Row("**%s**" % title, None)


# ---- the measures ---------------------------------------------------------------------

class Bench:
    def __init__(self, a, tmp, root, listing, big_mb):
        self.a, self.tmp, self.root, self.listing, self.big_mb = a, tmp, root, listing, big_mb
        self.rss = {}  # compression -> (narpipe peak RSS MB, nix copy peak RSS MB)
        self.big = None

    def fresh(self, name):
        d = os.path.join(self.tmp, name)
        shutil.rmtree(d, ignore_errors=True)
        return d

    def push_closure(self, comp, rounds, ratio_goal, cpu_goal=None):
        """Alternating pairs of upload / nix copy into fresh caches; the last round's
        caches stay as tmp/ours-COMP and tmp/nix-COMP."""
        ours, theirs = [], []
        for r in range(rounds):
            order = ["ours", "nix"] if r % 2 == 0 else ["nix", "ours"]
            for who in order:
                warm(self.listing)
                if who == "ours":
                    ours.append(upload_paths(self.fresh("ours-" + comp), self.listing, comp))
                else:
                    theirs.append(nix_copy(self.fresh("nix-" + comp), comp, self.root))
            print("  %s round %d: narpipe %.2fs (cpu %.2fs), nix copy %.2fs (cpu %.2fs)" % (
                comp, r + 1, ours[-1].wall, ours[-1].cpu, theirs[-1].wall, theirs[-1].cpu), file=sys.stderr)
        self.rss[comp] = (max(x.rss for x in ours), max(x.rss for x in theirs))
        return [
            Row("push closure, %s: wall (s)" % comp, median([x.wall for x in ours]),
                median([x.wall for x in theirs]), ratio_goal=ratio_goal),
            Row("push closure, %s: CPU user+sys (s)" % comp, median([x.cpu for x in ours]),
                median([x.cpu for x in theirs]), ratio_goal=cpu_goal),
        ]

    def push_closure_xz(self):
        """One pair with xz; narpipe's side also serves /metrics, polled meanwhile."""
        port = free_port()
        warm(self.listing)
        with open(self.listing) as fin:
            p, t0, err = launch([UPLOAD, "--compression", "xz", "--metrics-listen", "127.0.0.1:%d" % port,
                                 "--input", "-", self.fresh("ours-xz")], stdin=fin)
            poller = MetricsPoller(port)
            poller.start()
            ours = reap(p, t0, err)
        exited = time.perf_counter()
        poller.stop()
        print("  xz: narpipe %.1fs (cpu %.1fs)" % (ours.wall, ours.cpu), file=sys.stderr)
        warm(self.listing)
        theirs = nix_copy(self.fresh("nix-xz"), "xz", self.root)
        print("  xz: nix copy %.1fs (cpu %.1fs)" % (theirs.wall, theirs.cpu), file=sys.stderr)
        self.rss["xz"] = (ours.rss, theirs.rss)
        rows = [
            Row("push closure, xz, 1 round: wall (s)", ours.wall, theirs.wall, ratio_goal=0.5),
            Row("push closure, xz, 1 round: CPU user+sys (s)", ours.cpu, theirs.cpu),
        ]
        return rows, metrics_rows(poller, exited, "during the xz push above")

    def metrics_cut_short(self, seconds=30.0):
        """With --skip-xz: an xz upload of the corpus, SIGTERM after `seconds`."""
        port = free_port()
        with open(self.listing) as fin:
            p, t0, err = launch([UPLOAD, "--compression", "xz", "--metrics-listen", "127.0.0.1:%d" % port,
                                 "--input", "-", self.fresh("metrics-xz")], stdin=fin)
            poller = MetricsPoller(port)
            poller.start()
            how = "separate xz push of the corpus, finished by itself in < %gs" % seconds
            try:
                p.wait(timeout=seconds)  # it may finish on its own (a small corpus)
            except subprocess.TimeoutExpired:
                how = "separate xz push of the corpus, SIGTERM after %gs" % seconds
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=KILL_AFTER)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            exited = time.perf_counter()
            err.close()
        poller.stop()
        return metrics_rows(poller, exited, how)

    def rerun_all_present(self):
        """Everything already present (the zstd caches of push_closure)."""
        ours, theirs = [], []
        for _ in range(max(5, self.a.rounds)):
            ours.append(upload_paths(os.path.join(self.tmp, "ours-zstd"), self.listing, "zstd").wall)
            theirs.append(nix_copy(os.path.join(self.tmp, "nix-zstd"), "zstd", self.root).wall)
        return [Row("re-run, all present: wall (s)", median(ours), median(theirs), goal=0.2)]

    def build_big(self):
        """One store path of big_mb MiB: half /dev/urandom, half zeros."""
        half = self.big_mb * 1024 * 1024 // 2
        name = "narpipe-bench-1gib" if self.big_mb == 1024 else "narpipe-bench-%dmib" % self.big_mb
        self.big = build("""derivation { name = "%s"; system = builtins.currentSystem; builder = "/bin/sh";
            PATH = "/usr/bin:/bin"; args = [ "-c" "mkdir $out; head -c %d /dev/urandom > $out/random; head -c %d /dev/zero > $out/zeros" ]; }"""
                         % (name, half, half), self.tmp)[0]
        self.big_list = os.path.join(self.tmp, "big-path")
        with open(self.big_list, "w") as f:
            f.write(self.big + "\n")
        warm(self.big_list)

    def big_path_zstd(self):
        """upload vs `nix-store --dump | zstd -3 -T1` vs nix copy, rotating the order."""
        pipeline = ["bash", "-o", "pipefail", "-c", 'nix-store --dump "$1" | zstd -3 -T1 -q -c > /dev/null', "-", self.big]
        res = {"ours": [], "pipe": [], "nix": []}
        for r in range(self.a.rounds):
            order = ["ours", "pipe", "nix"]
            order = order[r % 3:] + order[:r % 3]
            for who in order:
                warm(self.big_list)
                if who == "ours":
                    res[who].append(upload_paths(self.fresh("big-ours"), self.big_list, "zstd"))
                elif who == "pipe":
                    res[who].append(timed(pipeline))
                else:
                    res[who].append(nix_copy(self.fresh("big-nix"), "zstd", self.big))
            print("  big path round %d: narpipe %.2fs, dump|zstd %.2fs, nix copy %.2fs" % (
                r + 1, res["ours"][-1].wall, res["pipe"][-1].wall, res["nix"][-1].wall), file=sys.stderr)
        wall = {k: median([x.wall for x in v]) for k, v in res.items()}
        rss = {k: max(x.rss for x in v) for k, v in res.items()}
        size = "%d MiB" % self.big_mb
        return [
            Row("one %s path, zstd: wall (s), baseline `nix-store --dump \\| zstd -3 -T1`" % size,
                wall["ours"], wall["pipe"], ratio_goal=0.6),
            Row("one %s path, zstd: wall (s), baseline nix copy" % size, wall["ours"], wall["nix"]),
            Row("one %s path, zstd: peak RSS (MB), baseline nix copy" % size, rss["ours"], rss["nix"], goal=100),
        ]

    def sigterm_one(self, who):
        """Starts an xz push of the big path, SIGTERM after SIGTERM_AFTER s: seconds from
        the signal to exit, files left under nar/."""
        cache = self.fresh("sigterm-" + who)
        if who == "ours":
            stdin = open(self.big_list)
            args = [UPLOAD, "--compression", "xz", "--input", "-", cache]
        else:
            stdin = None
            args = ["nix", "copy", "--to", "file://%s?compression=xz" % cache, self.big]
        p, t0, err = launch(args, stdin)
        if stdin:
            stdin.close()
        time.sleep(SIGTERM_AFTER)
        # upload streams a NAR over 4 MiB into a temporary object under nar/: give it up
        # to PARTIAL_WAIT s more to start one, so that the check below means something.
        # (nix copy compresses into memory and writes the file at the end.)
        deadline = time.perf_counter() + (PARTIAL_WAIT if who == "ours" else 0)
        while not files_under(os.path.join(cache, "nar")) and time.perf_counter() < deadline:
            time.sleep(0.1)
        if os.wait4(p.pid, os.WNOHANG)[0] != 0:
            p.returncode = -1
            err.close()
            print("  SIGTERM %s: finished before the signal, nothing to measure" % who, file=sys.stderr)
            return None, None
        cpu = cpu_so_far(p.pid)
        before = files_under(os.path.join(cache, "nar"))
        done = {}
        waiter = threading.Thread(target=lambda: done.update(run=reap(p, t0, err, check=False)))
        t_sig = time.perf_counter()
        os.kill(p.pid, signal.SIGTERM)
        waiter.start()
        waiter.join(KILL_AFTER)
        killed = waiter.is_alive()
        if killed:
            os.kill(p.pid, signal.SIGKILL)
            waiter.join()
        took = time.perf_counter() - t_sig if killed else t0 + done["run"].wall - t_sig
        left = files_under(os.path.join(cache, "nar"))
        show = lambda files: ", ".join("%s (%d B)" % f for f in files) or "nothing"
        print("  SIGTERM %s: after %.1fs (%.2fs CPU), under nar/: %s" % (
            who, t_sig - t0, cpu, show(before)), file=sys.stderr)
        print("  SIGTERM %s: exit %d after %.3fs%s; left under nar/: %s" % (
            who, done["run"].code, took, " (SIGKILLed)" if killed else "", show(left)), file=sys.stderr)
        return took, left

    def sigterm_mid_xz(self):
        ours, ours_left = self.sigterm_one("ours")
        theirs, theirs_left = self.sigterm_one("nix")
        n = lambda left: None if left is None else len(left)
        return [
            Row("SIGTERM mid-xz (one %d MiB path): to exit (s)" % self.big_mb, ours, theirs, goal=1.0),
            Row("SIGTERM mid-xz: files left under nar/ (partial objects)", n(ours_left), n(theirs_left),
                goal=0, target="0"),
        ]

    def rss_rows(self, jobs, enc_mib, enc_src):
        rows = []
        for comp in ("zstd", "none"):
            if comp in self.rss:
                rows.append(Row("peak RSS, push closure %s (MB), baseline nix copy" % comp, *self.rss[comp], goal=100))
        if "xz" in self.rss:
            ref = jobs * enc_mib * 1024 * 1024 / 1e6
            rows.append(Row("peak RSS, push closure xz (MB), baseline nix copy", *self.rss["xz"],
                            target="(for reference: %d jobs × %d MiB xz -6 encoder [%s] = %.0f MB)"
                            % (jobs, enc_mib, enc_src, ref)))
        return rows

    def daemon_latency(self):
        """Daemon: end-to-end latency (send -> narinfo) and `send` latency."""
        rows = []
        tmp = self.tmp
        fifo = os.path.join(tmp, "fifo")
        os.mkfifo(fifo)
        cache = self.fresh("daemon-cache")
        log = open(os.path.join(tmp, "daemon.log"), "w")
        # The queue on the system's temporary directory, as a real daemon's is on a disk
        # (its commits are fsyncs), whatever --tmp says for the caches.
        state = tempfile.mkdtemp(prefix="narpipe-bench-state-")
        atexit.register(shutil.rmtree, state, True)
        daemon = subprocess.Popen([UPLOAD, "--state-dir", state, "--input", fifo, cache],
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
            rows.append(Row("end-to-end, small path (s)", median(e2e), goal=1.0))
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
            rows.append(Row("send per call, median (ms)", median(lat), goal=3.0))
            rows.append(Row("send per call, p99 (ms)", p99(lat), goal=10.0))
            rows.append(Row("  (spawning /bin/true from this harness, median ms)", median(base)))
        finally:
            subprocess.run([SEND, "-o", fifo, "--finish"])
            daemon.wait(timeout=120)
            log.close()
        return rows


# ---- main -----------------------------------------------------------------------------

def machine_line():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return "machine: %d cores (%s), %s; %s" % (os.cpu_count(), cpu, platform.platform(), sh(["nix", "--version"]).strip())


def calibrated(tmp):
    """`calibrate` in a process of its own: its 64 MiB would raise this process's peak
    RSS, which Linux counts into the peak RSS of every child started after it (a child
    inherits its parent's high-water mark until exec), and so into every RSS row."""
    return sh([sys.executable, os.path.abspath(__file__), "--calibrate", tmp]).strip()


def calibrate(tmp):
    """This machine's speed at the work both tools do, for comparing runs: SHA-256
    (OpenSSL, through hashlib) and reads of a cached file in 64 KiB calls (what `nix
    copy` reads with), best of 3. On the benchmark machines both drift during a day,
    and the ratios with them."""
    buf = os.urandom(64 << 20)
    sha = []
    for _ in range(3):
        t0 = time.perf_counter()
        hashlib.sha256(buf).digest()
        sha.append(len(buf) / (time.perf_counter() - t0) / 1e9)
    path = os.path.join(tmp, "calibrate")
    with open(path, "wb") as f:
        f.write(buf)
    reads = []
    for _ in range(3):
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 10):
                pass
        reads.append(len(buf) / (time.perf_counter() - t0) / 1e9)
    os.unlink(path)
    return "sha256 %.2f GB/s, 64 KiB reads %.2f GB/s" % (max(sha), max(reads))


def default_tmp():
    """tmpfs (/dev/shm) when it has 8 GiB free and the machine 8 GiB of memory
    available (a run's caches take about 6 GB with the corpus), else the system's
    temporary directory. On this project's machines /tmp is
    ext4 without a journal, where creating a file costs ~200 us for minutes after many
    were deleted (ext4 skips recently deleted inodes only without a journal): each
    round's fresh cache paid for the last one's removal, in both tools' sys time."""
    try:
        st = os.statvfs("/dev/shm")
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) << 10 for l in f if l.startswith("MemAvailable:"))
        if st.f_bavail * st.f_frsize >= 8 << 30 and avail >= 8 << 30:
            return "/dev/shm"
    except (OSError, StopIteration):
        pass
    return tempfile.gettempdir()


def main():
    if sys.argv[1:2] == ["--calibrate"]:  # see calibrated()
        print(calibrate(sys.argv[2]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", help="closure to push (default: build the corpus)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating pairs per measure (not xz: 1)")
    ap.add_argument("--skip-xz", action="store_true", help="leave out the xz push against nix copy")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"), help="where the table goes (default: %(default)s)")
    ap.add_argument("--big-mb", type=int, default=1024, help=argparse.SUPPRESS)  # smoke tests only
    ap.add_argument("--tmp", default=default_tmp(),
                    help="where the caches go (default: %(default)s; tmpfs when it has room, see bench/README.md)")
    a = ap.parse_args()
    for b in (UPLOAD, SEND):
        if not os.access(b, os.X_OK):
            sys.exit("%s missing: run bench/run.sh (it builds it)" % b)
    if not shutil.which("zstd"):
        sys.exit("the zstd CLI is missing: run bench/run.sh (it installs it)")
    tmp = tempfile.mkdtemp(prefix="narpipe-bench-", dir=a.tmp)
    atexit.register(shutil.rmtree, tmp, True)  # on tmpfs, what is left holds memory
    root = a.root or sh([sys.executable, os.path.join(HERE, "make-corpus.py")]).strip().splitlines()[-1]
    paths = sh(["nix-store", "-qR", root]).split()
    closure_mb = int(sh(["nix", "path-info", "-S", root]).split()[-1]) / 1e6
    listing = os.path.join(tmp, "paths")
    with open(listing, "w") as f:
        f.write("\n".join(paths) + "\n")
    print("corpus: %s, %d paths, %.0f MB" % (root, len(paths), closure_mb), file=sys.stderr)
    warm(listing)

    at_start = calibrated(tmp)
    b = Bench(a, tmp, root, listing, a.big_mb)
    jobs = os.cpu_count()  # upload's default --jobs
    enc_mib, enc_src = xz_encoder_mib()
    rows = [section("push the closure into a fresh file:// cache; baseline: nix copy")]
    rows += b.push_closure("zstd", a.rounds, ratio_goal=0.4, cpu_goal=0.8)
    rows += b.push_closure("none", a.rounds, ratio_goal=0.35)
    b.fresh("ours-none"), b.fresh("nix-none")  # nothing reads them again: free the memory
    if a.skip_xz:
        metrics = b.metrics_cut_short()
    else:
        xz_rows, metrics = b.push_closure_xz()
        rows += xz_rows
    rows += b.rerun_all_present()
    rows += [section("one big store path (half random, half zeros)")]
    b.build_big()
    rows += b.big_path_zstd()
    rows += b.sigterm_mid_xz()
    rows += [section("peak RSS (largest of the rounds above)")]
    rows += b.rss_rows(jobs, enc_mib, enc_src)
    rows += [section("metrics endpoint while xz compresses (%d jobs)" % jobs)]
    rows += metrics
    rows += [section("daemon")]
    rows += b.daemon_latency()

    lines = [
        "narpipe benchmark, %s" % time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine_line(),
        "calibration, at the start and at the end: %s; %s" % (at_start, calibrated(tmp)),
        "corpus: %d paths, %.0f MB of NAR; medians of %d alternating rounds (xz: %s); caches in %s; MB = 10^6 bytes" % (
            len(paths), closure_mb, a.rounds, "skipped" if a.skip_xz else "1 round", a.tmp),
        "",
        "| measure | narpipe | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| %s |" % " | ".join(r.cells()) for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.out, "w") as f:
        f.write(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
