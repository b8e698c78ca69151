"""An HTTP proxy in front of an S3 endpoint (moto's server in tests) that injects real network faults.

Faults are made at the HTTP and TCP level (503 SlowDown and 500 InternalError bodies, connection
resets before or after the request reached S3, responses cut off mid-body, delays), so s3fs and
botocore see exactly what they would see from a misbehaving AWS endpoint and their own retry and
error paths run for real; nothing is mocked inside the client.

Random faults are *hashed, not drawn*: whether a request fails (and how) is a pure function of
(seed, op class, path, how many times that op has been sent to that path). A shared RNG consumed in
arrival order would make the faults depend on thread and DataLoader-worker interleaving; hashing
makes a chaos run reproducible from its seed, and a failure seen once can be replayed.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

# --- op classes ---------------------------------------------------------------------------------
GET, RANGED_GET, HEAD, LIST = "GET", "RANGED_GET", "HEAD", "LIST"
PUT, MULTIPART_POST, DELETE = "PUT", "MULTIPART_POST", "DELETE"
OTHER = "OTHER"  # anything else (e.g. an unknown POST): counted, never randomly faulted
READS = (GET, RANGED_GET, HEAD, LIST)
WRITES = (PUT, MULTIPART_POST, DELETE)
OP_CLASSES = READS + WRITES + (OTHER,)

# --- fault kinds --------------------------------------------------------------------------------
SLOWDOWN, INTERNAL, RESET_BEFORE, RESET_AFTER, CUT_BODY, DELAY = (
    "slowdown", "internal", "reset_before", "reset_after", "cut_body", "delay")
KINDS = (SLOWDOWN, INTERNAL, RESET_BEFORE, RESET_AFTER, CUT_BODY, DELAY)
FAILURE_KINDS = tuple(k for k in KINDS if k != DELAY)

# S3's error code and message per status, for answers the proxy makes itself.
ERRORS = {
    400: ("InvalidRequest", "Invalid Request"),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is currently in progress."),
    412: ("PreconditionFailed", "At least one of the pre-conditions you specified did not hold"),
    416: ("InvalidRange", "The requested range is not satisfiable"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented"),
    502: ("BadGateway", "The fault proxy could not reach the upstream endpoint."),
    503: ("SlowDown", "Please reduce your request rate."),
}
KIND_STATUS = {SLOWDOWN: 503, INTERNAL: 500}

# Query parameters left out of the path a decision is hashed on: presigned-URL signatures change
# with time, and upload/version ids are generated afresh by the server on every run.
_VOLATILE_PARAMS = {"x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires",
                    "x-amz-signedheaders", "x-amz-signature", "x-amz-security-token",
                    "awsaccesskeyid", "signature", "expires", "uploadid", "versionid"}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
               "upgrade", "expect", "host"}
_CHUNK = 1 << 20


def classify(method: str, path: str, headers=None) -> tuple[str, str]:
    """(op class, finer detail) of a path-style S3 request, e.g. ("PUT", "UPLOAD_PART")."""
    parts = urlsplit(path)
    query = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)}
    bucket, _, key = parts.path.lstrip("/").partition("/")
    method = method.upper()
    if method == "HEAD":
        return HEAD, "HEAD_OBJECT" if key else "HEAD_BUCKET"
    if method == "GET":
        if not bucket:
            return LIST, "LIST_BUCKETS"
        if not key:
            return LIST, "LIST_OBJECTS" if "list-type" in query or not query else "BUCKET_GET"
        if "uploadid" in query:
            return LIST, "LIST_PARTS"
        if headers is not None and headers.get("Range"):
            return RANGED_GET, "RANGED_GET"
        return GET, "GET_OBJECT"
    if method == "PUT":
        if not key:
            return PUT, "PUT_BUCKET"
        if "partnumber" in query:
            return PUT, "UPLOAD_PART"
        if headers is not None and headers.get("x-amz-copy-source"):
            return PUT, "COPY_OBJECT"
        return PUT, "PUT_OBJECT"
    if method == "POST":
        if "delete" in query:
            return DELETE, "DELETE_OBJECTS"
        if "uploads" in query:
            return MULTIPART_POST, "CREATE_MULTIPART"
        if "uploadid" in query:
            return MULTIPART_POST, "COMPLETE_MULTIPART"
        return OTHER, "POST"
    if method == "DELETE":
        if "uploadid" in query:
            return DELETE, "ABORT_MULTIPART"
        return DELETE, "DELETE_OBJECT" if key else "DELETE_BUCKET"
    return OTHER, method


def decision_path(path: str) -> str:
    """The request path a fault decision is keyed on: volatile query parameters dropped, rest sorted."""
    parts = urlsplit(path)
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if k.lower() not in _VOLATILE_PARAMS)
    return parts.path + ("?" + urlencode(query) if query else "")


def s3_error_body(status: int, code: str | None = None, message: str | None = None,
                  resource: str = "", request_id: str = "") -> bytes:
    default_code, default_message = ERRORS.get(status, ("InternalError", "Injected error"))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code or default_code}</Code><Message>{message or default_message}</Message>"
            f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>").encode()


@dataclass
class Rule:
    """A deterministic fault for requests that `matches`; rules are checked before random faults.

    Every matching request is first delayed by `delay_s`; then, while `fail_times` is nonzero (-1 =
    always), the request is failed with `kind`, or answered with `status` (and S3 error `code`,
    by default the usual one for that status) when `status` is set. Matching rules apply in order
    and the first with failures left fires.
    """

    matches: Callable[[str, str], bool]
    """(method, path with query) -> whether the rule applies."""
    fail_times: int = 0
    delay_s: float = 0.0
    kind: str = SLOWDOWN
    status: int | None = None
    code: str | None = None

    def __post_init__(self):
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"Rule kind must be one of {FAILURE_KINDS} (delays: delay_s), not {self.kind!r}")


@dataclass(frozen=True)
class Injection:
    """One injected fault: the request's op class, decision path, per-(op, path) index, and kind."""

    op: str
    path: str
    n: int
    kind: str
    method: str = ""
    detail: str = ""


@dataclass(eq=False)
class FaultProxy:
    """Proxy in front of `upstream` (e.g. "http://127.0.0.1:5000"); `start()` sets `self.url`.

    Random faults hit a request with probability `read_fault_rate` or `write_fault_rate` (by op
    class) if `match(method, path)` allows it (None: all), picking a kind from `kinds`, all hashed
    from `seed`. Counters: `requests[op]`, `requests_detail[detail]`, `injected[(op, kind)]`,
    `bytes_served[path]` (GET bodies relayed), `failures[path]` (faults other than delay), the list
    `injections`, and `connections`.
    """

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    seed: int = 0
    read_fault_rate: float = 0.0
    write_fault_rate: float = 0.0
    kinds: tuple[str, ...] = KINDS
    delay_s: float = 0.3
    match: Callable[[str, str], bool] | None = None
    upstream_timeout_s: float = 120.0

    requests: Counter = field(default_factory=Counter, init=False)
    requests_detail: Counter = field(default_factory=Counter, init=False)
    injected: Counter = field(default_factory=Counter, init=False)
    bytes_served: Counter = field(default_factory=Counter, init=False)
    failures: Counter = field(default_factory=Counter, init=False)
    injections: list[Injection] = field(default_factory=list, init=False)
    log: list[tuple[str, str]] = field(default_factory=list, init=False)
    """(op class, decision path) of every request, in arrival order (request counting in tests)."""
    connections: int = field(default=0, init=False)
    """Client TCP connections accepted (keep-alive clients reuse one until a fault breaks it)."""

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {KINDS}")
        for rate in (self.read_fault_rate, self.write_fault_rate):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rates must lie in [0, 1], got {rate}")
        self._lock = threading.Lock()
        self._seen: Counter = Counter()
        self._clients: set[socket.socket] = set()
        self.server = None
        self.url = ""

    # --- decisions and counters ----------------------------------------------------------------
    def decision(self, op: str, path: str, n: int) -> str | None:
        """The random fault kind for the `n`-th (0-based) `op` request to decision path `path`, or None."""
        rate = self.read_fault_rate if op in READS else self.write_fault_rate if op in WRITES else 0.0
        if rate <= 0.0:
            return None
        digest = hashlib.blake2b(f"{self.seed}\0{op}\0{path}\0{n}".encode(), digest_size=16).digest()
        if int.from_bytes(digest[:8], "big") / 2.0**64 >= rate:
            return None
        return self.kinds[int.from_bytes(digest[8:], "big") % len(self.kinds)]

    def summary(self) -> dict:
        """Per op class seen: requests, injected faults by kind, and the injected fraction."""
        with self._lock:
            out = {}
            for op in OP_CLASSES:
                if not self.requests[op]:
                    continue
                by_kind = {kind: c for (o, kind), c in sorted(self.injected.items()) if o == op and c}
                out[op] = {"requests": self.requests[op], "injected": by_kind,
                           "injected_fraction": sum(by_kind.values()) / self.requests[op]}
            return out

    def reset_counts(self) -> None:
        """Zero every counter and the per-path request indices the random decisions are keyed on."""
        with self._lock:
            for counter in (self.requests, self.requests_detail, self.injected, self.bytes_served,
                            self.failures, self._seen):
                counter.clear()
            self.injections.clear()
            self.log.clear()
            self.connections = 0

    def _arrive(self, op: str, detail: str, path: str) -> int:
        with self._lock:
            self.requests[op] += 1
            self.requests_detail[detail] += 1
            self.log.append((op, path))
            n = self._seen[(op, path)]
            self._seen[(op, path)] += 1
            return n

    def _fault_for(self, method: str, raw_path: str, op: str, detail: str, path: str, n: int):
        """(kind, status, code) to apply, or None; rule delays are slept here."""
        for rule in self.rules:
            if not rule.matches(method, raw_path):
                continue
            if rule.delay_s:
                self._record(op, path, n, DELAY, method, detail)
                time.sleep(rule.delay_s)
            with self._lock:
                if not rule.fail_times:
                    continue
                if rule.fail_times > 0:
                    rule.fail_times -= 1
            return rule.kind, rule.status, rule.code
        if self.match is not None and not self.match(method, raw_path):
            return None
        kind = self.decision(op, path, n)
        return (kind, None, None) if kind else None

    def _record(self, op: str, path: str, n: int, kind: str, method: str, detail: str = "") -> None:
        with self._lock:
            self.injected[(op, kind)] += 1
            self.injections.append(Injection(op, path, n, kind, method, detail))
            if kind != DELAY:
                self.failures[path.split("?")[0]] += 1

    # --- server --------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self, urlsplit(self.upstream)))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name="fault-proxy").start()
        return self

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for sock in clients:  # kept-alive client connections would otherwise go on being served
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_for(proxy: FaultProxy, target):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive; answers Expect: 100-continue itself

        def log_message(self, *args):  # quiet
            pass

        def setup(self):
            super().setup()
            with proxy._lock:
                proxy._clients.add(self.connection)
                proxy.connections += 1

        def finish(self):
            with proxy._lock:
                proxy._clients.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        # --- request side ----------------------------------------------------------------------
        def _read_body(self, half: bool = False) -> bytes | None:
            """The request body (de-chunked), None if it has none; `half`: read only half, then stop."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._read_chunked(half)
            length = self.headers.get("Content-Length")
            if length is None:
                return None
            length = int(length) // 2 if half else int(length)
            body = self.rfile.read(length)
            if len(body) < length:
                raise ConnectionError("client closed the connection mid-body")
            return body

        def _read_chunked(self, half: bool) -> bytes:
            pieces = []
            self._raw_chunked = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed the connection mid-body")
                self._raw_chunked += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, up to the blank line
                        trailer = self.rfile.readline(65537)
                        self._raw_chunked += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return b"".join(pieces)
                data = self.rfile.read(size // 2 if half else size)
                if half:
                    return data
                pieces.append(data)
                self._raw_chunked += data + self.rfile.readline(65537)

        # --- upstream --------------------------------------------------------------------------
        def _forward(self, body: bytes | None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=proxy.upstream_timeout_s)
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", target.netloc)
            aws_chunked = "aws-chunked" in self.headers.get("Content-Encoding", "").lower()
            for key, value in self.headers.items():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    conn.putheader(key, value)
            if body is not None and aws_chunked and self._raw_chunked is not None:
                # aws-chunked framing is part of the signed payload: relay it as sent.
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders(bytes(self._raw_chunked))
            else:
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
            return conn, conn.getresponse()

        def _send_head(self, resp: http.client.HTTPResponse, chunked: bool) -> None:
            self.send_response_only(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _relay(self, resp: http.client.HTTPResponse, cut: bool = False) -> None:
            """Send the upstream answer on, streaming the body; `cut`: only half the body, then reset."""
            has_body = self.command != "HEAD" and resp.status >= 200 and resp.status not in (204, 304)
            length = resp.getheader("Content-Length")
            if not has_body:
                if cut:
                    return self._reset()
                self._send_head(resp, chunked=False)
                return
            if length is None:  # chunked or close-delimited upstream
                if cut:  # the client must be told a full length for a cut to be visible: buffer
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self._send_part_and_reset(data[: len(data) // 2])
                self._send_head(resp, chunked=True)
                while piece := resp.read1(_CHUNK):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self._count(len(piece))
                self.wfile.write(b"0\r\n\r\n")
                return
            length = int(length)
            if cut and length == 0:
                return self._reset()
            self._send_head(resp, chunked=False)
            remaining = length // 2 if cut else length
            while remaining > 0:
                piece = resp.read(min(_CHUNK, remaining))
                if not piece:
                    break
                self.wfile.write(piece)
                self._count(len(piece))
                remaining -= len(piece)
            if cut:
                self._drain()
                self._reset()
            elif remaining > 0:  # upstream died mid-body: pass the breakage on
                self._reset()

        def _send_part_and_reset(self, data: bytes) -> None:
            self.wfile.write(data)
            self._count(len(data))
            self._drain()
            self._reset()

        def _count(self, n: int) -> None:
            if self.command == "GET":
                with proxy._lock:
                    proxy.bytes_served[self.path.split("?")[0]] += n

        # --- answers the proxy makes itself ----------------------------------------------------
        def _answer_error(self, status: int, code: str | None) -> None:
            bucket_level = "/" not in urlsplit(self.path).path.lstrip("/")
            if status == 404 and code is None and bucket_level:
                code = "NoSuchBucket"
            request_id = f"FAULTPROXY{time.monotonic_ns():X}"
            body = s3_error_body(status, code, resource=urlsplit(self.path).path, request_id=request_id)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-amz-request-id", request_id)
            if status == 503:
                self.send_header("Retry-After", "1")
            if self.command == "HEAD":  # S3 sends no error body for HEAD; botocore uses the status
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def _drain(self, timeout_s: float = 5.0) -> None:
            """Wait (bounded) for the client to take what was sent, so a reset cannot discard it."""
            self.wfile.flush()
            try:
                import fcntl
                import termios

                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    unsent = struct.unpack("i", fcntl.ioctl(self.connection.fileno(), termios.TIOCOUTQ,
                                                            b"\0\0\0\0"))[0]
                    if unsent == 0:
                        return
                    time.sleep(0.005)
            except (ImportError, OSError, AttributeError):
                time.sleep(0.05)

        def _reset(self) -> None:
            """Abort the client connection with a TCP RST (SO_LINGER 0): the client sees ECONNRESET."""
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()  # drop the makefile's reference so close() really closes the socket
                self.connection.close()
            except OSError:
                pass

        # --- dispatch --------------------------------------------------------------------------
        def _handle(self):
            method, raw_path = self.command, self.path
            op, detail = classify(method, raw_path, self.headers)
            path = decision_path(raw_path)
            n = proxy._arrive(op, detail, path)
            conn, self._raw_chunked = None, None
            try:
                fault = proxy._fault_for(method, raw_path, op, detail, path, n)
                kind, status, code = fault if fault else (None, None, None)
                if kind is not None:
                    proxy._record(op, path, n, f"status_{status}" if status else kind, method, detail)
                if status:
                    self._read_body()
                    return self._answer_error(status, code)
                if kind in KIND_STATUS:
                    self._read_body()
                    return self._answer_error(KIND_STATUS[kind], None)
                if kind == CUT_BODY and method == "PUT":
                    self._read_body(half=True)  # a broken upload: nothing reaches upstream
                    return self._reset()
                if kind == RESET_BEFORE or (kind == CUT_BODY and method in ("HEAD", "DELETE")):
                    self._read_body()
                    return self._reset()
                if kind == DELAY:
                    time.sleep(proxy.delay_s)
                body = self._read_body()
                try:
                    conn, resp = self._forward(body)
                except (OSError, http.client.HTTPException):
                    return self._answer_error(502, None)
                if kind == RESET_AFTER:
                    if op in WRITES:
                        resp.read()  # the write has been applied upstream; the client never hears
                    return self._reset()
                self._relay(resp, cut=kind == CUT_BODY)
            except (ConnectionError, socket.timeout, http.client.HTTPException, ValueError):
                self.close_connection = True  # client or upstream went away mid-request
            finally:
                if conn is not None:
                    conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
