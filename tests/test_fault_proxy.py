"""The fault proxy against the real moto server: each fault kind as boto3 and s3fs see it, op
classification, hashed (interleaving-proof) random faults, and deterministic rules."""

from __future__ import annotations

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import boto3
import botocore.config
import botocore.exceptions
import pytest
import s3fs

from reliability.fault_proxy import (DELETE, GET, HEAD, LIST, MULTIPART_POST, PUT, RANGED_GET, FaultProxy,
                                     Rule, classify, decision_path)

pytestmark = pytest.mark.integration

OBJ_BYTES = 200_000
ONE_ATTEMPT = botocore.config.Config(retries={"total_max_attempts": 1})  # {"max_attempts": 1} allows a retry


@pytest.fixture(scope="module")
def direct(s3_server):
    """A boto3 client straight to moto, for seeding and for checking what really reached S3."""
    return boto3.client("s3", endpoint_url=s3_server.endpoint)


@pytest.fixture(scope="module")
def bucket(direct):
    """A fresh bucket holding `obj`; made with boto3 directly so that only the proxy is under test."""
    name = f"faultproxy-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(Bucket=name)
    body = bytes(range(256)) * (OBJ_BYTES // 256) + b"!" * (OBJ_BYTES % 256)
    direct.put_object(Bucket=name, Key="obj", Body=body)
    return name


@pytest.fixture
def proxies(s3_server):
    """``proxies(**kwargs)`` starts a FaultProxy in front of moto; all are stopped at teardown."""
    started = []

    def make(**kwargs) -> FaultProxy:
        started.append(FaultProxy(s3_server.endpoint, **kwargs).start())
        return started[-1]

    yield make
    for proxy in started:
        proxy.stop()


def client(proxy: FaultProxy):
    return boto3.client("s3", endpoint_url=proxy.url, config=ONE_ATTEMPT)


def exists(direct, bucket, key) -> bool:
    try:
        direct.head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as e:
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return False


def error_of(call) -> tuple[str, int]:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        call()
    return info.value.response["Error"]["Code"], info.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_error_kinds_answer_s3_errors_without_forwarding(proxies, direct, bucket):
    proxy = proxies(rules=[Rule(lambda m, p: m == "GET", fail_times=1, kind="slowdown"),
                           Rule(lambda m, p: m == "PUT", fail_times=1, kind="internal"),
                           Rule(lambda m, p: m == "HEAD", fail_times=1, kind="slowdown")])
    s3 = client(proxy)
    assert error_of(lambda: s3.get_object(Bucket=bucket, Key="obj")) == ("SlowDown", 503)
    assert error_of(lambda: s3.put_object(Bucket=bucket, Key="internal", Body=b"x")) == ("InternalError", 500)
    # HEAD errors carry no body, so botocore's error code is the status.
    assert error_of(lambda: s3.head_object(Bucket=bucket, Key="obj")) == ("503", 503)
    assert not exists(direct, bucket, "internal")
    assert s3.get_object(Bucket=bucket, Key="obj")["Body"].read()[:3] == b"\x00\x01\x02"  # rules spent
    assert proxy.failures == {f"/{bucket}/obj": 2, f"/{bucket}/internal": 1}
    assert proxy.injected == {(GET, "slowdown"): 1, (PUT, "internal"): 1, (HEAD, "slowdown"): 1}


def test_resets_are_connection_errors_and_reset_after_applies_the_write(proxies, direct, bucket):
    proxy = proxies(rules=[Rule(lambda m, p: m == "GET", fail_times=1, kind="reset_before"),
                           Rule(lambda m, p: p.endswith("/before"), fail_times=1, kind="reset_before"),
                           Rule(lambda m, p: p.endswith("/after"), fail_times=1, kind="reset_after")])
    s3 = client(proxy)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.get_object(Bucket=bucket, Key="obj")
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="before", Body=b"b")
    assert not exists(direct, bucket, "before")
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        s3.put_object(Bucket=bucket, Key="after", Body=b"a", IfNoneMatch="*")
    assert direct.get_object(Bucket=bucket, Key="after")["Body"].read() == b"a"  # applied, never acknowledged
    # ...so the client's retry of the conditional write is refused: the idempotency trap.
    assert error_of(lambda: s3.put_object(Bucket=bucket, Key="after", Body=b"a", IfNoneMatch="*")) == (
        "PreconditionFailed", 412)
    assert proxy.injected == {(GET, "reset_before"): 1, (PUT, "reset_before"): 1, (PUT, "reset_after"): 1}


def test_cut_body_breaks_reads_mid_body_and_uploads_mid_request(proxies, direct, bucket):
    proxy = proxies(rules=[Rule(lambda m, p: m == "GET", fail_times=1, kind="cut_body"),
                           Rule(lambda m, p: m == "PUT", fail_times=1, kind="cut_body"),
                           Rule(lambda m, p: m == "HEAD", fail_times=1, kind="cut_body")])
    s3 = client(proxy)
    resp = s3.get_object(Bucket=bucket, Key="obj")  # status and headers arrive whole...
    assert resp["ContentLength"] == OBJ_BYTES
    with pytest.raises((botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError)):
        resp["Body"].read()  # ...the body stops halfway with a reset
    assert proxy.bytes_served[f"/{bucket}/obj"] == OBJ_BYTES // 2
    with pytest.raises(botocore.exceptions.ConnectionClosedError):  # 100-continue, half the body, reset
        s3.put_object(Bucket=bucket, Key="cut", Body=io.BytesIO(b"c" * 3_000_000))
    assert not exists(direct, bucket, "cut")
    with pytest.raises(botocore.exceptions.ConnectionClosedError):  # HEAD has no body: reset instead
        s3.head_object(Bucket=bucket, Key="obj")
    assert len(s3.get_object(Bucket=bucket, Key="obj")["Body"].read()) == OBJ_BYTES


def test_delay_is_injected_but_not_a_failure(proxies, bucket, direct):
    proxy = proxies(read_fault_rate=1.0, kinds=("delay",), delay_s=0.5)
    s3 = client(proxy)
    start = time.monotonic()
    assert s3.head_object(Bucket=bucket, Key="obj")["ContentLength"] == OBJ_BYTES
    assert time.monotonic() - start >= 0.5
    s3.put_object(Bucket=bucket, Key="undelayed", Body=b"u")  # write rate 0
    assert proxy.injected == {(HEAD, "delay"): 1} and not proxy.failures


def test_classification_of_a_full_request_sequence(proxies, direct, bucket):
    proxy = proxies()
    s3 = client(proxy)
    s3.put_object(Bucket=bucket, Key="seq/a", Body=b"a" * 1000)
    s3.get_object(Bucket=bucket, Key="seq/a")["Body"].read()
    s3.get_object(Bucket=bucket, Key="seq/a", Range="bytes=10-19")["Body"].read()
    s3.head_object(Bucket=bucket, Key="seq/a")
    s3.list_objects_v2(Bucket=bucket, Prefix="seq/")
    upload = s3.create_multipart_upload(Bucket=bucket, Key="seq/mpu")["UploadId"]
    mpu = {"Bucket": bucket, "Key": "seq/mpu", "UploadId": upload}
    parts = [{"PartNumber": n, "ETag": s3.upload_part(**mpu, PartNumber=n, Body=body)["ETag"]}
             for n, body in ((1, b"m" * (5 << 20)), (2, b"tail"))]
    s3.complete_multipart_upload(**mpu, MultipartUpload={"Parts": parts})
    s3.delete_object(Bucket=bucket, Key="seq/a")
    s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "seq/mpu"}]})
    assert proxy.requests == {PUT: 3, GET: 1, RANGED_GET: 1, HEAD: 1, LIST: 1, MULTIPART_POST: 2, DELETE: 2}
    assert proxy.requests_detail == {"PUT_OBJECT": 1, "UPLOAD_PART": 2, "GET_OBJECT": 1, "RANGED_GET": 1,
                                     "HEAD_OBJECT": 1, "LIST_OBJECTS": 1, "CREATE_MULTIPART": 1,
                                     "COMPLETE_MULTIPART": 1, "DELETE_OBJECT": 1, "DELETE_OBJECTS": 1}
    assert proxy.bytes_served[f"/{bucket}/seq/a"] == 1010
    assert proxy.connections == 1  # botocore kept one connection alive throughout (100-continue included)
    assert not direct.list_objects_v2(Bucket=bucket, Prefix="seq/").get("Contents")
    assert proxy.summary()[PUT] == {"requests": 3, "injected": {}, "injected_fraction": 0.0}
    proxy.reset_counts()
    assert not proxy.requests and proxy.summary() == {} and proxy.connections == 0


def test_classify_and_decision_path():
    assert classify("GET", "/b?list-type=2&prefix=x") == (LIST, "LIST_OBJECTS")
    assert classify("GET", "/b") == (LIST, "LIST_OBJECTS")
    assert classify("GET", "/") == (LIST, "LIST_BUCKETS")
    assert classify("GET", "/b/k", {"Range": "bytes=0-1"}) == (RANGED_GET, "RANGED_GET")
    assert classify("PUT", "/b/k?partNumber=3&uploadId=u") == (PUT, "UPLOAD_PART")
    assert classify("POST", "/b/k?uploads") == (MULTIPART_POST, "CREATE_MULTIPART")
    assert classify("POST", "/b/k?uploadId=u") == (MULTIPART_POST, "COMPLETE_MULTIPART")
    assert classify("POST", "/b?delete") == (DELETE, "DELETE_OBJECTS")
    assert classify("DELETE", "/b/k?uploadId=u") == (DELETE, "ABORT_MULTIPART")
    # Signatures and server-generated ids do not enter the decision.
    path = "/b/k?uploadId=XYZ&partNumber=2&X-Amz-Signature=s&X-Amz-Date=d"
    assert decision_path(path) == "/b/k?partNumber=2"


def _random_run(proxy: FaultProxy, bucket: str, threads: int) -> set:
    config = botocore.config.Config(retries={"total_max_attempts": 1}, max_pool_connections=16)
    s3 = boto3.client("s3", endpoint_url=proxy.url, config=config)

    def request(i: int) -> None:
        try:
            if i % 2:
                s3.head_object(Bucket=bucket, Key="obj")
            else:
                s3.put_object(Bucket=bucket, Key=f"rand/{i % 10}", Body=b"r")
        except (botocore.exceptions.ClientError, botocore.exceptions.ConnectionClosedError):
            pass

    # Each path's requests are sequential (per-path order is what the decisions are keyed on);
    # different paths run interleaved across threads.
    def lane(lane_id: int) -> None:
        for i in range(lane_id, 200, 10):
            request(i)

    if threads == 1:
        for lane_id in range(10):
            lane(lane_id)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lane, range(10)))
    return {(i.op, i.path, i.n, i.kind) for i in proxy.injections}


def test_random_faults_are_hashed_reproducible_and_at_the_rate(proxies, bucket, direct):
    kinds = ("slowdown", "internal", "reset_before")

    def make(seed: int) -> FaultProxy:
        return proxies(seed=seed, read_fault_rate=0.3, write_fault_rate=0.3, kinds=kinds,
                       match=lambda m, p: "/rand/" in p or p.endswith("/obj"))

    first = make(7)
    serial = _random_run(first, bucket, threads=1)
    again = make(7)
    interleaved = _random_run(again, bucket, threads=8)
    assert serial == interleaved and serial
    other = make(8)
    assert _random_run(other, bucket, threads=8) != serial
    total = sum(s["requests"] for s in first.summary().values())
    assert total == 200
    fraction = len(serial) / total
    assert 0.18 <= fraction <= 0.42, first.summary()
    assert {kind for *_, kind in serial} == set(kinds)
    for op, path, n, kind in serial:  # the decision is a pure function of (seed, op, path, n)
        assert first.decision(op, path, n) == kind
    summary = first.summary()
    assert set(summary) == {HEAD, PUT}
    assert summary[HEAD]["injected_fraction"] == sum(summary[HEAD]["injected"].values()) / 100
    assert sum(first.failures.values()) == len(serial)


def test_rules_with_custom_statuses(proxies, bucket, direct):
    proxy = proxies(rules=[
        Rule(lambda m, p: m == "GET", fail_times=1, status=416),
        Rule(lambda m, p: m == "GET", fail_times=1, status=404),
        Rule(lambda m, p: m == "PUT", fail_times=-1, status=403),
        Rule(lambda m, p: m == "HEAD", fail_times=2, status=404),
        Rule(lambda m, p: m == "DELETE", fail_times=1, status=409, code="OperationAborted"),
    ])
    s3 = client(proxy)
    ranged = lambda: s3.get_object(Bucket=bucket, Key="obj", Range="bytes=0-9")  # noqa: E731
    assert error_of(ranged) == ("InvalidRange", 416)
    assert error_of(lambda: s3.get_object(Bucket=bucket, Key="obj")) == ("NoSuchKey", 404)
    assert len(s3.get_object(Bucket=bucket, Key="obj")["Body"].read()) == OBJ_BYTES
    for _ in range(3):
        assert error_of(lambda: s3.put_object(Bucket=bucket, Key="denied", Body=b"d")) == (
            "AccessDenied", 403)
    assert error_of(lambda: s3.head_object(Bucket=bucket, Key="obj")) == ("404", 404)
    assert error_of(lambda: s3.head_object(Bucket=bucket, Key="obj")) == ("404", 404)
    assert s3.head_object(Bucket=bucket, Key="obj")["ContentLength"] == OBJ_BYTES
    assert error_of(lambda: s3.delete_object(Bucket=bucket, Key="obj")) == ("OperationAborted", 409)
    assert not exists(direct, bucket, "denied") and exists(direct, bucket, "obj")
    assert proxy.injected[(PUT, "status_403")] == 3 and proxy.injected[(RANGED_GET, "status_416")] == 1


def test_s3fs_sees_the_faults_and_aiohttp_resends_idempotent_requests(proxies, bucket, direct):
    proxy = proxies(rules=[Rule(lambda m, p: m == "GET", fail_times=1, kind="cut_body"),
                           Rule(lambda m, p: m == "PUT" and p.endswith("/fs/excl"), fail_times=1,
                                kind="reset_after")])
    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, config_kwargs={"retries": {"total_max_attempts": 1}},
                           skip_instance_cache=True, use_listings_cache=False)
    fs.retries = 1  # a class attribute, not an argument: s3fs hands unknown kwargs to AioSession

    with pytest.raises(aiohttp.ClientPayloadError):  # s3fs counts it retryable; no retries left
        fs.cat_file(f"{bucket}/obj", start=0, end=1000)
    assert fs.cat_file(f"{bucket}/obj", start=0, end=1000) == direct.get_object(
        Bucket=bucket, Key="obj", Range="bytes=0-999")["Body"].read()
    big = b"B" * (6 << 20)
    fs.pipe_file(f"{bucket}/fs/big", big)
    assert fs.cat_file(f"{bucket}/fs/big") == big
    # aiohttp silently resends an idempotent request (PUT too) once after a reset, whatever botocore's
    # retry config: the write applied before the reset then makes the conditional retry fail.
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/fs/excl", b"e", mode="create")
    assert proxy.requests_detail["PUT_OBJECT"] == 3  # big, excl, excl again
    assert direct.get_object(Bucket=bucket, Key="fs/excl")["Body"].read() == b"e"
