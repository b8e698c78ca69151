"""The storage seam: one retry policy (transient vs permanent) and conditional writes, on moto's S3 server
through a fault-injecting proxy, and on a local directory."""

from __future__ import annotations

import errno
import time

import pytest

from pretrain import retry_policy, storage
from pretrain.config import StorageConfig
from reliability.fault_proxy import FaultProxy, Rule

FAST = dict(retries=3, retry_base_s=0.01, retry_max_s=0.05)


def client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.unit
@pytest.mark.parametrize("exc,transient", [
    (client_error(503, "SlowDown"), True), (client_error(500, "InternalError"), True),
    (client_error(429, "TooManyRequests"), True), (client_error(400, "RequestTimeout"), True),
    (client_error(400, "IncompleteBody"), True), (ConnectionResetError(104, "reset"), True),
    (TimeoutError("timed out"), True),
    (client_error(403, "AccessDenied"), False), (client_error(404, "NoSuchKey"), False),
    (client_error(416, "InvalidRange"), False), (client_error(412, "PreconditionFailed"), False),
    (FileNotFoundError("gone"), False), (PermissionError("no"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False), (ValueError("a bug"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_transient_or_permanent(exc, transient):
    assert retry_policy.is_transient(exc) is transient


@pytest.mark.unit
def test_an_error_translated_by_s3fs_keeps_its_cause():
    wrapped = OSError(errno.EBUSY, "Please reduce your request rate.")
    wrapped.__cause__ = client_error(503, "SlowDown")
    assert retry_policy.is_transient(wrapped)
    denied = PermissionError("Access Denied")
    denied.__cause__ = client_error(403, "AccessDenied")
    assert not retry_policy.is_transient(denied)


@pytest.mark.unit
def test_backoff_is_capped_jittered_and_leaves_the_global_rng_alone():
    import random

    state = random.getstate()
    policy = retry_policy.RetryPolicy(attempts=10, base_s=0.1, max_s=1.0)
    delays = [policy.delay(a) for a in range(1, 10) for _ in range(20)]
    assert max(delays) <= 1.0 and len(set(delays)) > 100
    assert random.getstate() == state  # checkpoints save and restore the global RNG: never touch it
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(retry_policy.RetriesExhausted):
        retry_policy.call(flaky, "x", retry_policy.RetryPolicy(attempts=3, base_s=0.001, max_s=0.001))
    assert len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        retry_policy.call(denied, "x", retry_policy.RetryPolicy(attempts=3))
    assert len(calls) == 1


def test_permanent_s3_errors_are_not_retried_and_transient_ones_are(s3_bucket, s3_server):
    url = f"{s3_bucket}/obj"
    storage.write_bytes(url, b"x" * 1000)
    proxy = FaultProxy(s3_server.endpoint, rules=[
        Rule(lambda m, p: m == "GET" and p.endswith("/obj"), fail_times=2, kind="slowdown"),
    ]).start()
    try:
        cfg = StorageConfig(endpoint_url=proxy.url, **FAST)
        assert storage.read_bytes(url, cfg) == b"x" * 1000
        assert proxy.failures[f"/{url[5:]}"] == 2
        proxy.rules[:] = [Rule(lambda m, p: m == "GET" and p.endswith("/obj"), fail_times=-1, status=416)]
        started = time.monotonic()
        with pytest.raises(OSError):
            storage.read_bytes(url, cfg, 0, 10)
        assert proxy.failures[f"/{url[5:]}"] == 3 and time.monotonic() - started < 5  # 416: one request
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"{s3_bucket}/missing", cfg)
    finally:
        proxy.stop()


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, make_bucket):
    return str(tmp_path / "cond") if request.param == "local" else f"{make_bucket('cond')}/dir"


def test_conditional_writes(location):
    url = storage.join(location, "obj.json")
    etag = storage.create_exclusive(url, b"one")
    with pytest.raises(storage.PreconditionFailed):
        storage.create_exclusive(url, b"two")
    data, current = storage.read_with_etag(url)
    assert data == b"one" and current == etag
    newer = storage.replace_if_match(url, b"three", etag)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if_match(url, b"four", etag)  # stale etag
    assert storage.read_with_etag(url) == (b"three", newer)
    with pytest.raises(FileNotFoundError):
        storage.read_with_etag(storage.join(location, "absent.json"))


def test_a_create_whose_answer_was_lost_reports_the_conflict_and_the_object_is_ours(s3_bucket, s3_server):
    """`reset_after`: the PUT is applied, the answer never arrives, the retry is refused (412)."""
    url = f"{s3_bucket}/lease.json"
    proxy = FaultProxy(s3_server.endpoint, rules=[
        Rule(lambda m, p: m == "PUT" and p.endswith("/lease.json"), fail_times=1, kind="reset_after")]).start()
    try:
        cfg = StorageConfig(endpoint_url=proxy.url, **FAST)
        try:
            storage.create_exclusive(url, b"mine", cfg)
        except storage.PreconditionFailed:
            pass  # the caller reads back to tell its own write from someone else's
        assert storage.read_with_etag(url, cfg)[0] == b"mine"
    finally:
        proxy.stop()
