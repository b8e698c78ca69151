"""The run lease on moto's S3 server and on local disk: one holder, renewals, takeover, fencing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from pretrain import storage
from pretrain.config import LeaseConfig
from pretrain.lease import LEASE, Lease, LeaseHeld, LeaseLost, LeaseRecord

CFG = LeaseConfig(heartbeat_s=0.2, timeout_s=1.0)


@pytest.fixture(params=["s3", "local"])
def run_url(request, tmp_path, make_bucket):
    return f"{make_bucket('lease')}/run" if request.param == "s3" else str(tmp_path / "run")


def rewrite(run_url: str, **changes) -> None:
    url = storage.join(run_url, LEASE)
    data, etag = storage.read_with_etag(url)
    record = dataclasses.replace(LeaseRecord.from_bytes(data), **changes)
    storage.replace_if_match(url, record.to_bytes(), etag)


def test_a_second_holder_is_refused_with_the_holder_named(run_url):
    first = Lease(run_url, CFG, None, job="job-one").acquire()
    with pytest.raises(LeaseHeld, match=r"held by another job: holder .*job job-one.*last heartbeat \d+s ago"):
        Lease(run_url, CFG, None).acquire()
    first.renew()
    first.verify()
    assert Lease(run_url, CFG, None, holder=first.holder).acquire().holder == first.holder  # re-entrant


def test_a_released_lease_is_taken_at_once(run_url):
    first = Lease(run_url, CFG, None).acquire()
    first.release()
    second = Lease(run_url, CFG, None).acquire()
    second.verify()
    with pytest.raises(LeaseLost):
        first.verify()


def test_a_dead_holder_on_this_host_frees_the_lease(run_url):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Lease(run_url, CFG, None).acquire()
    rewrite(run_url, pid=int(proc.stdout), holder="gone-holder")  # its process has exited
    Lease(run_url, CFG, None).acquire()


def test_takeover_needs_a_stale_heartbeat_and_fences_the_old_holder(run_url):
    old = Lease(run_url, CFG, None).acquire()
    rewrite(run_url, host="another-host")  # cannot be proven dead from here
    with pytest.raises(LeaseHeld):
        Lease(run_url, dataclasses.replace(CFG, takeover=True), None).acquire()  # heartbeat is fresh
    rewrite(run_url, heartbeat_unix=time.time() - 5)
    with pytest.raises(LeaseHeld, match="--takeover"):
        Lease(run_url, CFG, None).acquire()  # stale, but takeover was not asked for
    new = Lease(run_url, dataclasses.replace(CFG, takeover=True), None).acquire()
    with pytest.raises(LeaseLost, match="no longer holds"):
        old.renew()
    with pytest.raises(LeaseLost):
        old.verify()
    new.verify()


def test_the_heartbeat_renews_and_two_renewers_of_one_holder_coexist(run_url):
    driver = Lease(run_url, CFG, None).acquire()
    rank0 = Lease(run_url, CFG, None, holder=driver.holder).adopt()
    driver.start_heartbeat()
    rank0.start_heartbeat()
    time.sleep(1.5)
    driver.stop_heartbeat()
    rank0.stop_heartbeat()
    record = LeaseRecord.from_bytes(storage.read_with_etag(storage.join(run_url, LEASE))[0])
    assert record.renewals >= 6 and time.time() - record.heartbeat_unix < 1.0
    assert driver.lost is None and rank0.lost is None


def test_adopt_refuses_a_lease_held_by_someone_else(run_url):
    Lease(run_url, CFG, None).acquire()
    with pytest.raises(LeaseLost):
        Lease(run_url, CFG, None, holder="not-the-driver").adopt()


@pytest.mark.unit
def test_lease_timeouts_are_validated():
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="lease.timeout_s"):
        LeaseConfig(heartbeat_s=30, timeout_s=60)


def test_the_lease_object_is_plain_json(run_url):
    lease = Lease(run_url, CFG, None, job="sub-1").acquire()
    record = json.loads(storage.read_with_etag(storage.join(run_url, LEASE))[0])
    assert record["holder"] == lease.holder and record["job"] == "sub-1" and record["pid"] == os.getpid()
