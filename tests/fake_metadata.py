"""A cloud instance-metadata server on loopback, for the spot watcher (raydiff.spot_watcher): AWS IMDSv2 (a token
is required, as on EC2) and GCP's `instance/preempted` long-poll. Used by tests/test_spot_watcher.py and by the
elastic scenario (tests/elastic_run.py), where the watcher drains a real node."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from raydiff import spot_watcher as sw

WAIT_S = 30  # a bound on the waits below for something that should happen at once; never reached when it works


class Metadata:
    """What the fake metadata server answers, changed by the test; `cond` wakes both the test and long-polls."""

    def __init__(self):
        self.cond = threading.Condition()
        self.tokens: set[str] = set()
        self.refuse_tokens = False  # tokens are handed out but never accepted: every GET gets 401
        self.action: dict | None = None  # the AWS instance-action once a reclaim is scheduled
        self.preempted, self.etag = "FALSE", 1
        self.failures: list[str] = []  # the next GCP requests fail so: "503" or "drop" (no answer)
        self.counts = {"put": 0, "get": 0, "401": 0, "wait": 0}
        self.closing = False

    def count(self, what: str) -> None:
        with self.cond:
            self.counts[what] += 1
            self.cond.notify_all()

    def wait_until(self, condition) -> None:
        with self.cond:
            assert self.cond.wait_for(condition, timeout=WAIT_S)

    def set(self, **values) -> None:
        with self.cond:
            for key, value in values.items():
                setattr(self, key, value)
            if "preempted" in values:
                self.etag += 1
            self.cond.notify_all()


def handler(md: Metadata):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def answer(self, code: int, body: str, headers: dict | None = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def do_PUT(self) -> None:
            ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if self.path != sw.AWS_TOKEN_PATH or not (ttl.isdigit() and 1 <= int(ttl) <= 21600):
                return self.answer(400, "bad token request")
            token = secrets.token_hex(8)
            md.tokens.add(token)
            md.count("put")
            self.answer(200, token)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == sw.AWS_ACTION_PATH:
                return self.aws()
            if url.path == sw.GCP_PREEMPTED_PATH:
                return self.gcp(dict(urllib.parse.parse_qsl(url.query)))
            self.answer(404, "not found")

        def aws(self) -> None:
            token = self.headers.get("X-aws-ec2-metadata-token")
            if token not in md.tokens or md.refuse_tokens:  # IMDSv2: no valid token, no data
                md.count("401")
                return self.answer(401, "")
            md.count("get")
            if md.action is None:
                return self.answer(404, "not found")
            self.answer(200, json.dumps(md.action))

        def gcp(self, query: dict) -> None:
            if self.headers.get("Metadata-Flavor") != "Google":
                return self.answer(403, "Missing Metadata-Flavor:Google header.")
            if md.failures:
                failure = md.failures.pop(0)
                if failure == "drop":
                    self.close_connection = True
                    return None
                return self.answer(int(failure), "unavailable")
            if query.get("wait_for_change") == "true":
                with md.cond:
                    if query.get("last_etag") == str(md.etag):
                        md.counts["wait"] += 1
                        md.cond.notify_all()
                        # The real server waits up to timeout_sec; this one ends each wait early (it may).
                        md.cond.wait_for(lambda: query["last_etag"] != str(md.etag) or md.closing, timeout=0.2)
            self.answer(200, md.preempted, {"ETag": str(md.etag)})

    return Handler


@contextlib.contextmanager
def serving() -> Iterator[Metadata]:
    """A running server; its base URL is the yielded object's `url`."""
    md = Metadata()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(md))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    md.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield md
    finally:
        md.set(closing=True)
        server.shutdown()
        server.server_close()


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
