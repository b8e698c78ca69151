"""An HTTP proxy in front of the moto S3 server that injects real network faults for tests.

Clients (s3fs) talk to it exactly as to any S3 endpoint; rules can answer 503 SlowDown, delay a
request, or count the bytes served, per request path.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Rule:
    matches: Callable[[str, str], bool]
    """(method, path) -> whether the rule applies."""
    fail_times: int = 0
    """Answer this many matching requests with 503 SlowDown (-1 = always)."""
    delay_s: float = 0.0


@dataclass
class FaultyS3Proxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    bytes_served: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)

    def start(self) -> "FaultyS3Proxy":
        proxy = self
        target = urlsplit(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                for rule in proxy.rules:
                    if not rule.matches(self.command, self.path):
                        continue
                    if rule.delay_s:
                        time.sleep(rule.delay_s)
                    if rule.fail_times:
                        rule.fail_times -= 1 if rule.fail_times > 0 else 0
                        proxy.failures[self.path.split("?")[0]] += 1
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOW_DOWN)))
                        self.end_headers()
                        self.wfile.write(SLOW_DOWN)
                        return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = target.netloc
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "GET":
                    proxy.bytes_served[self.path.split("?")[0]] += len(data)
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
