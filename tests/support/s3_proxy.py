#!/usr/bin/env python3
"""A proxy in front of an S3 server that logs and counts every request, and can behave
like Amazon S3 where the test server does not.

  --copy-limit BYTES   refuse a copy (PUT with x-amz-copy-source) of an object bigger
                       than BYTES, as S3 refuses one over 5 GiB: 400 InvalidRequest.
                       Sizes are those of the objects written through this proxy.
  --throttle SECONDS   from the first NAR write (a PUT or POST under /nar/) on, answer
                       every request with 429 Too Many Requests for SECONDS;
  --retry-after N      with `Retry-After: N` (seconds).
  --slow-gets SECONDS  hold every GET for SECONDS before passing it on (a slow bucket:
                       requests for the same object overlap).

Everything else is passed on unchanged (signatures included: the Host header is kept).
Each request is logged to LOG as one JSON object a line: method, path, query,
copy_source, status, bytes (request body), start and end (seconds since the epoch).

usage: s3_proxy.py LISTEN_PORT UPSTREAM_PORT LOG [--copy-limit N] [--throttle S --retry-after N]
                   [--slow-gets S]

The tests run it as that program (tests/common/servers.rs, S3Proxy). It is also a
module: bench/requests.py runs a `Proxy` in a thread of its own and reads its counts
by method with `take()`.
"""
import argparse
import http.client
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class Proxy(ThreadingHTTPServer):
    """Listens on 127.0.0.1:`port` (0: any free port; see `server_address`) and passes
    requests on to 127.0.0.1:`upstream`. Each instance keeps its own state."""

    daemon_threads = True

    def __init__(self, port, upstream, log=None, copy_limit=None, throttle=None, retry_after=None,
                 slow_gets=None):
        super().__init__(("127.0.0.1", port), Handler)
        self.slow_gets = slow_gets
        self.upstream = upstream
        self.copy_limit = copy_limit
        self.throttle = throttle
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.log = open(log, "a", buffering=1) if log else None
        self.counts = Counter()  # requests by method since the last take()
        self.sizes = {}  # "/bucket/key" -> bytes, for objects written through here
        self.parts = {}  # upload id -> bytes so far
        self.throttle_until = None  # set at the first NAR write

    def logged(self, entry):
        with self.lock:
            self.counts[entry["method"]] += 1
            if self.log:
                self.log.write(json.dumps(entry) + "\n")

    def take(self):
        """The requests answered since the last take(), by method."""
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def answer(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def relay(self):
        proxy = self.server
        start = time.time()
        body = self.body()
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query, keep_blank_values=True)
        source = self.headers.get("x-amz-copy-source")
        entry = dict(method=self.command, path=path, query=url.query, copy_source=source,
                     bytes=len(body), start=start)
        with proxy.lock:
            writes_nar = self.command in ("PUT", "POST") and "/nar/" in path
            if proxy.throttle and proxy.throttle_until is None and writes_nar:
                proxy.throttle_until = start + proxy.throttle
            throttled = proxy.throttle_until is not None and start < proxy.throttle_until
            too_big = None
            if source and proxy.copy_limit is not None:
                size = proxy.sizes.get("/" + unquote(source).lstrip("/"))
                too_big = size if size is not None and size > proxy.copy_limit else None
        if throttled:
            headers = [("Content-Type", "application/xml")]
            if proxy.retry_after is not None:
                headers.append(("Retry-After", str(proxy.retry_after)))
            data = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            status = 429
        elif too_big is not None:
            headers = [("Content-Type", "application/xml")]
            data = ("<Error><Code>InvalidRequest</Code><Message>The specified copy source is larger "
                    "than the maximum allowable size for a copy source: %d</Message></Error>"
                    % proxy.copy_limit).encode()
            status = 400
        else:
            if proxy.slow_gets and self.command == "GET":
                time.sleep(proxy.slow_gets)
            conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=300)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                status, headers, data = resp.status, resp.getheaders(), resp.read()
            except OSError:  # the server is down, or still starting
                status, headers, data = 502, [], b""
            finally:
                conn.close()
            if 200 <= status < 300:
                self.record(path, query, body, source)
        entry.update(status=status, end=time.time())
        proxy.logged(entry)
        self.answer(status, headers, data)

    def record(self, path, query, body, source):
        """Keeps the sizes of the objects written, to judge copies by."""
        proxy = self.server
        with proxy.lock:
            if self.command == "PUT" and "uploadId" in query:
                upload = query["uploadId"][0]
                proxy.parts[upload] = proxy.parts.get(upload, 0) + len(body)
            elif self.command == "POST" and "uploadId" in query:
                proxy.sizes[path] = proxy.parts.pop(query["uploadId"][0], 0)
            elif self.command == "PUT" and source:
                proxy.sizes[path] = proxy.sizes.get("/" + unquote(source).lstrip("/"), 0)
            elif self.command == "PUT":
                proxy.sizes[path] = len(body)
            elif self.command == "DELETE":
                proxy.sizes.pop(path, None)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("upstream", type=int)
    ap.add_argument("log")
    ap.add_argument("--copy-limit", type=int)
    ap.add_argument("--throttle", type=float)
    ap.add_argument("--retry-after", type=int)
    ap.add_argument("--slow-gets", type=float)
    a = ap.parse_args()
    Proxy(a.port, a.upstream, a.log, a.copy_limit, a.throttle, a.retry_after,
          a.slow_gets).serve_forever()


if __name__ == "__main__":
    main()
