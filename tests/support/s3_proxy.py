#!/usr/bin/env python3
"""Test-only proxy in front of an S3 server that behaves like Amazon S3 where the test
server does not, and logs every request.

  --copy-limit BYTES   refuse a copy (PUT with x-amz-copy-source) of an object bigger
                       than BYTES, as S3 refuses one over 5 GiB: 400 InvalidRequest.
                       Sizes are those of the objects written through this proxy.
  --throttle SECONDS   from the first NAR write (a PUT or POST under /nar/) on, answer
                       every request with 429 Too Many Requests for SECONDS;
  --retry-after N      with `Retry-After: N` (seconds).

Everything else is passed on unchanged (signatures included: the Host header is kept).
Each request is logged to LOG as one JSON object a line: method, path, query,
copy_source, status, bytes (request body), start and end (seconds since the epoch).

usage: s3_proxy.py LISTEN_PORT UPSTREAM_PORT LOG [--copy-limit N] [--throttle S --retry-after N]
"""
import argparse
import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

ap = argparse.ArgumentParser()
ap.add_argument("port", type=int)
ap.add_argument("upstream", type=int)
ap.add_argument("log")
ap.add_argument("--copy-limit", type=int)
ap.add_argument("--throttle", type=float)
ap.add_argument("--retry-after", type=int)
ARGS = ap.parse_args()

LOCK = threading.Lock()
LOG = open(ARGS.log, "a", buffering=1)
SIZES = {}  # "/bucket/key" -> bytes, for objects written through here
PARTS = {}  # upload id -> bytes so far
THROTTLE_UNTIL = None  # set at the first NAR write


def log(entry):
    with LOCK:
        LOG.write(json.dumps(entry) + "\n")


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
        global THROTTLE_UNTIL
        start = time.time()
        body = self.body()
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query, keep_blank_values=True)
        source = self.headers.get("x-amz-copy-source")
        entry = dict(method=self.command, path=path, query=url.query, copy_source=source,
                     bytes=len(body), start=start)
        with LOCK:
            writes_nar = self.command in ("PUT", "POST") and "/nar/" in path
            if ARGS.throttle and THROTTLE_UNTIL is None and writes_nar:
                THROTTLE_UNTIL = start + ARGS.throttle
            throttled = THROTTLE_UNTIL is not None and start < THROTTLE_UNTIL
            too_big = None
            if source and ARGS.copy_limit is not None:
                size = SIZES.get("/" + unquote(source).lstrip("/"))
                too_big = size if size is not None and size > ARGS.copy_limit else None
        if throttled:
            headers = [("Content-Type", "application/xml")]
            if ARGS.retry_after is not None:
                headers.append(("Retry-After", str(ARGS.retry_after)))
            data = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            status = 429
        elif too_big is not None:
            headers = [("Content-Type", "application/xml")]
            data = ("<Error><Code>InvalidRequest</Code><Message>The specified copy source is larger "
                    "than the maximum allowable size for a copy source: %d</Message></Error>"
                    % ARGS.copy_limit).encode()
            status = 400
        else:
            conn = http.client.HTTPConnection("127.0.0.1", ARGS.upstream, timeout=300)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                resp = conn.getresponse()
                status, headers, data = resp.status, resp.getheaders(), resp.read()
            except OSError:
                status, headers, data = 502, [], b""
            finally:
                conn.close()
            if 200 <= status < 300:
                self.record(path, query, body, source)
        entry.update(status=status, end=time.time())
        log(entry)
        self.answer(status, headers, data)

    def record(self, path, query, body, source):
        """Keeps the sizes of the objects written, to judge copies by."""
        with LOCK:
            if self.command == "PUT" and "uploadId" in query:
                upload = query["uploadId"][0]
                PARTS[upload] = PARTS.get(upload, 0) + len(body)
            elif self.command == "POST" and "uploadId" in query:
                SIZES[path] = PARTS.pop(query["uploadId"][0], 0)
            elif self.command == "PUT" and source:
                SIZES[path] = SIZES.get("/" + unquote(source).lstrip("/"), 0)
            elif self.command == "PUT":
                SIZES[path] = len(body)
            elif self.command == "DELETE":
                SIZES.pop(path, None)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay


class Server(ThreadingHTTPServer):
    daemon_threads = True


Server(("127.0.0.1", ARGS.port), Handler).serve_forever()
