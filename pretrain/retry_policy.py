"""The one retry policy for every storage call: transient errors back off and retry, permanent ones don't.

Shard reads, checkpoint reads and writes, manifests, the lease and TensorBoard mirroring all reach
storage through :mod:`pretrain.storage`, which runs each call under :func:`call`. s3fs and botocore
are configured for a single attempt each (``storage.s3_options``), so this module is the only
place that retries: before, three layers multiplied their attempts and permanent errors such as
HTTP 416 on a truncated shard were retried like throttling.

- **transient**: HTTP 5xx, 429, S3 ``SlowDown``/throttling codes, ``RequestTimeout``,
  ``IncompleteBody``, connection refused/reset/closed, a body cut short, timeouts. Retried with
  capped exponential backoff and full jitter (AWS's recommendation for thundering herds: 128 ranks
  that were throttled together must not retry together).
- **permanent**: every other 4xx (403, 404, 412, 416, ``NoSuchKey``, ``InvalidRange``), missing local
  files, permission errors, a full disk. Raised at once; the caller decides (skip a sample, fall back
  to an older checkpoint, stop the run).

Unrecognised exceptions are permanent: an unknown error retried at cluster scale is a retry storm.
The jitter uses a private RNG, never the global ``random`` state, which checkpoints save and restore.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# S3 error codes that mean "try again later" even when the HTTP status is a 4xx.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
    "IncompleteBody", "XAmzContentSHA256Mismatch", "BadDigest",
})
# Local errno values that a retry cannot fix.
PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                              errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG})
_RNG = random.Random()


class TransientError(OSError):
    """Raised by storage code for a condition it knows a retry fixes (e.g. a multipart upload whose
    completion answer was lost)."""


class RetriesExhausted(OSError):
    """A transient error persisted through every attempt; ``__cause__`` is the last one."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def http_status(exc: BaseException) -> tuple[int | None, str]:
    """(HTTP status, S3 error code) of the first botocore ClientError in the exception chain."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(response["Error"].get("Code", ""))
            if status is None and code.isdigit():
                status = int(code)
            return status, code
    return None, ""


def _is_connection_failure(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError, http.client.IncompleteRead,
                      http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return True
    module = type(e).__module__
    name = type(e).__name__
    if module.startswith("botocore") and name in {
            "HTTPClientError", "ConnectionError", "EndpointConnectionError", "ConnectionClosedError",
            "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
            "ResponseParserError", "ProxyConnectionError"}:
        return True
    if module.startswith("aiohttp") and name in {
            "ClientConnectionError", "ClientConnectionResetError", "ClientOSError", "ClientConnectorError",
            "ServerConnectionError", "ServerDisconnectedError", "ServerTimeoutError", "ConnectionTimeoutError",
            "SocketTimeoutError", "ClientPayloadError"}:
        return True
    return module.startswith("fsspec") and name == "FSTimeoutError"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later can succeed (see the module docstring for the classes)."""
    if isinstance(exc, TransientError):
        return True
    status, code = http_status(exc)
    if status is not None or code:
        return code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS:
            return False
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)):
            return False
        if _is_connection_failure(e):
            return True
    return False


def is_not_found(exc: BaseException) -> bool:
    status, code = http_status(exc)
    return status == 404 or code in ("NoSuchKey", "404") or any(isinstance(e, FileNotFoundError) for e in _chain(exc))


def is_precondition_failed(exc: BaseException) -> bool:
    status, code = http_status(exc)
    return status == 412 or code == "PreconditionFailed"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    """Total tries of one call (1 = no retry)."""
    base_s: float = 0.2
    max_s: float = 20.0

    def delay(self, attempt: int) -> float:
        """Full-jitter backoff before retry number `attempt` (1-based)."""
        return _RNG.uniform(0.0, min(self.max_s, self.base_s * 2 ** (attempt - 1)))


def call(fn: Callable[[], T], what: str, policy: RetryPolicy,
         on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``fn()``; transient failures are retried per `policy`, permanent ones raised unchanged."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts:
                log.error("%s: giving up after %d attempts: %s", what, attempt, _describe(exc))
                raise RetriesExhausted(errno.EIO, f"{what}: transient storage error persisted through "
                                                  f"{attempt} attempts: {_describe(exc)}") from exc
            if on_retry is not None:
                on_retry(exc)
            pause = policy.delay(attempt)
            (log.warning if attempt >= 3 else log.info)("%s: transient error (attempt %d/%d), retrying in %.2fs: %s",
                                                        what, attempt, policy.attempts, pause, _describe(exc))
            time.sleep(pause)
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    status, code = http_status(exc)
    text = str(exc).strip().splitlines()
    head = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    return f"{head} (HTTP {status} {code})" if status or code else head
