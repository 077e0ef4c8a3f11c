#!/usr/bin/env python3
"""Test-only proxy that lets object_store's GCS client (XML API) talk to fake-gcs-server.

fake-gcs-server serves XML-API reads and listings, but not XML-API uploads, copies or
multipart uploads. This proxy passes reads through and turns each write into the
equivalent JSON-API call:

  PUT    /B/O                         media upload  POST /upload/storage/v1/b/B/o?uploadType=media&name=O
  PUT    /B/O  x-goog-copy-source     copy          POST /storage/v1/b/SB/o/SO/copyTo/b/B/o/O
  DELETE /B/O                         delete        DELETE /storage/v1/b/B/o/O
  POST   /B/O?uploads                 start a multipart upload (parts kept in temp files here)
  PUT    /B/O?partNumber=N&uploadId=U store part N
  POST   /B/O?uploadId=U              join the listed parts, one media upload
  DELETE /B/O?uploadId=U              drop the parts

`x-goog-if-generation-match: 0` (create only if absent) is honoured with a look-up
first; that is racy between processes, which is fine for a test double.

usage: gcs_xml_proxy.py LISTEN_PORT UPSTREAM_PORT
"""
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

UPSTREAM = ("127.0.0.1", int(sys.argv[2]))
SPOOL = tempfile.mkdtemp(prefix="gcs-proxy-")
UPLOADS = {}  # upload id -> dict(bucket, name, content_type, dir)
UPLOADS_LOCK = threading.Lock()


def call(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*UPSTREAM, timeout=300)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def enc(name):
    return quote(name, safe="")


def exists(bucket, name):
    status, _, _ = call("GET", "/storage/v1/b/%s/o/%s" % (enc(bucket), enc(name)))
    return status == 200


def object_headers(meta_json):
    meta = json.loads(meta_json)
    etag = meta.get("etag") or meta.get("md5Hash") or uuid.uuid4().hex
    return [("ETag", '"%s"' % etag.strip('"')), ("x-goog-generation", str(meta.get("generation", "1")))]


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # --- plumbing -------------------------------------------------------------
    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status, headers=(), body=b""):
        self.send_response(status)
        skip = {"content-length", "transfer-encoding", "connection", "date", "server"}
        for k, v in headers:
            if k.lower() not in skip:
                self.send_header(k, v)
        if status in (204, 304):
            self.end_headers()  # no body, and no Content-Length (RFC 9110)
        elif self.command == "HEAD":
            length = next((v for k, v in headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
            self.end_headers()
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def target(self):
        parts = urlsplit(self.path)
        bucket, _, name = parts.path.lstrip("/").partition("/")
        return unquote(bucket), unquote(name), parse_qs(parts.query, keep_blank_values=True)

    def pass_through(self, body=None):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        self.answer(*call(self.command, self.path, body, headers))

    def create_only_conflict(self, bucket, name):
        return self.headers.get("x-goog-if-generation-match") == "0" and exists(bucket, name)

    def media_upload(self, bucket, name, body, content_type):
        status, headers, data = call(
            "POST",
            "/upload/storage/v1/b/%s/o?uploadType=media&name=%s" % (enc(bucket), enc(name)),
            body,
            {"Content-Type": content_type or "application/octet-stream"},
        )
        if status != 200:
            return status, headers, data
        return 200, object_headers(data), b""

    # --- verbs -----------------------------------------------------------------
    def do_GET(self):
        self.pass_through()

    def do_HEAD(self):
        self.pass_through()

    def do_PUT(self):
        bucket, name, query = self.target()
        body = self.read_body()
        if "uploadId" in query:
            upload = UPLOADS.get(query["uploadId"][0])
            if upload is None:
                return self.answer(404, body=b"NoSuchUpload")
            number = int(query["partNumber"][0])
            with open(os.path.join(upload["dir"], "%08d" % number), "wb") as f:
                f.write(body)
            return self.answer(200, [("ETag", '"%s"' % hashlib.md5(body).hexdigest())])
        if self.create_only_conflict(bucket, name):
            return self.answer(412, body=b"PreconditionFailed")
        source = self.headers.get("x-goog-copy-source")
        if source:
            src_bucket, _, src_name = unquote(source).lstrip("/").partition("/")
            status, headers, data = call(
                "POST",
                "/storage/v1/b/%s/o/%s/copyTo/b/%s/o/%s"
                % (enc(src_bucket), enc(src_name), enc(bucket), enc(name)),
                b"",
                {"Content-Type": "application/json"},
            )
            if status != 200:
                return self.answer(status, headers, data)
            return self.answer(200, object_headers(data))
        self.answer(*self.media_upload(bucket, name, body, self.headers.get("Content-Type")))

    def do_POST(self):
        bucket, name, query = self.target()
        body = self.read_body()
        if "uploads" in query:
            upload_id = uuid.uuid4().hex
            with UPLOADS_LOCK:
                UPLOADS[upload_id] = {
                    "bucket": bucket,
                    "name": name,
                    "content_type": self.headers.get("Content-Type"),
                    "dir": tempfile.mkdtemp(dir=SPOOL),
                }
            xml = (
                "<InitiateMultipartUploadResult><Bucket>%s</Bucket><Key>%s</Key>"
                "<UploadId>%s</UploadId></InitiateMultipartUploadResult>" % (bucket, name, upload_id)
            )
            return self.answer(200, [("Content-Type", "application/xml")], xml.encode())
        if "uploadId" in query:
            with UPLOADS_LOCK:
                upload = UPLOADS.pop(query["uploadId"][0], None)
            if upload is None:
                return self.answer(404, body=b"NoSuchUpload")
            numbers = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
            data = b"".join(
                open(os.path.join(upload["dir"], "%08d" % n), "rb").read() for n in numbers
            )
            shutil.rmtree(upload["dir"], ignore_errors=True)
            status, headers, reply = self.media_upload(bucket, name, data, upload["content_type"])
            if status != 200:
                return self.answer(status, headers, reply)
            etag = dict(headers)["ETag"]
            xml = "<CompleteMultipartUploadResult><ETag>%s</ETag></CompleteMultipartUploadResult>" % etag
            return self.answer(200, headers + [("Content-Type", "application/xml")], xml.encode())
        self.pass_through(body)

    def do_DELETE(self):
        bucket, name, query = self.target()
        if "uploadId" in query:
            with UPLOADS_LOCK:
                upload = UPLOADS.pop(query["uploadId"][0], None)
            if upload:
                shutil.rmtree(upload["dir"], ignore_errors=True)
            return self.answer(204)
        status, headers, data = call("DELETE", "/storage/v1/b/%s/o/%s" % (enc(bucket), enc(name)))
        self.answer(204 if status in (200, 204) else status, headers, data)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Proxy)
    server.daemon_threads = True
    try:
        server.serve_forever()
    finally:
        shutil.rmtree(SPOOL, ignore_errors=True)
