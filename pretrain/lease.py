"""One job per run.url: a lease object written with conditional writes, renewed by heartbeats.

``<run.url>/lease.json`` names the job that may write the run (holder id, host, pid, job/submission
id, heartbeat time). It is created with S3's ``If-None-Match: *`` and every renewal is an
``If-Match: <etag>`` PUT (:func:`pretrain.storage.create_exclusive` / ``replace_if_match``), so two
jobs can never both believe they hold it. The driver acquires it before Ray starts and hands the
holder id to the workers; the driver and rank 0 renew it (several renewers of one holder are fine:
a lost race is re-read and retried). Ray's restarts of the same job keep the lease.

- A second job on a held run.url stops at once, before Ray starts, naming the holder and its last
  heartbeat (:class:`LeaseHeld`, exit code 2).
- A lease is free when released (the holder ended: finished, preempted, failed), when its holder
  process is provably gone (same host, its pid no longer runs), or, with ``lease.takeover``
  (``pretrain train --takeover``), when its heartbeat is older than ``lease.timeout_s``.
- Checkpoint commits are fenced: rank 0 verifies the lease right before each manifest write, and a
  holder that finds its lease taken stops (:class:`LeaseLost`). The manifest write is itself a
  create-if-absent, so a committed step can never be overwritten.

Stores: AWS S3, MinIO and moto 5 honour both conditional headers (checked by the tests against
moto's server). A store that ignores them gets best-effort exclusion only: every acquire and renew
reads the lease back and compares the holder, which catches all but races within one round trip.
Local run.urls use an exclusive hard link and an ``flock`` (one host).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from pretrain import storage
from pretrain.config import LeaseConfig, StorageConfig
from pretrain.run_errors import FatalRunError

log = logging.getLogger(__name__)

LEASE = "lease.json"
HOLDER_ENV = "PRETRAIN_LEASE_HOLDER"


class LeaseHeld(FatalRunError):
    """Another job holds the run.url."""


class LeaseLost(FatalRunError):
    """This job's lease was taken over (or released) by someone else: it must not write any more."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    host: str
    pid: int
    pid_started: float
    job: str
    acquired_unix: float
    heartbeat_unix: float
    released: bool = False
    renewals: int = 0

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise LeaseHeld(f"the lease object is not readable ({exc}); if no job runs on this run.url, delete "
                            f"{LEASE} under it") from None

    def describe(self, now: float) -> str:
        return (f"holder {self.holder} (job {self.job or '?'}, host {self.host}, pid {self.pid}), last heartbeat "
                f"{now - self.heartbeat_unix:.0f}s ago")


def new_holder_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _process_started(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


def _holder_gone(record: LeaseRecord) -> bool:
    """The holder ran on this host and its process is gone (or the pid now belongs to another process)."""
    if record.host != socket.gethostname():
        return False
    started = _process_started(record.pid)
    return started == 0.0 or abs(started - record.pid_started) > 1.0


class Lease:
    def __init__(self, run_url: str, cfg: LeaseConfig, storage_cfg: StorageConfig | None, holder: str = "",
                 job: str = ""):
        self.url = storage.join(run_url, LEASE)
        self.cfg, self.storage_cfg = cfg, storage_cfg
        self.holder = holder or new_holder_id()
        self.job = job or os.environ.get("PRETRAIN_SUBMISSION_ID", "")
        self._etag = ""
        self._record: LeaseRecord | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    # ----------------------------------------------------------------------------------- acquire

    def acquire(self) -> "Lease":
        """Take the lease or raise :class:`LeaseHeld`; re-entrant for the same holder id."""
        now = time.time()
        mine = LeaseRecord(self.holder, socket.gethostname(), os.getpid(), _process_started(os.getpid()), self.job,
                           now, now)
        for _ in range(8):  # each round is lost only to a concurrent writer; it then re-reads
            try:
                self._etag = storage.create_exclusive(self.url, mine.to_bytes(), self.storage_cfg)
                self._record = mine
                return self._confirmed()
            except storage.PreconditionFailed:
                pass
            try:
                data, etag = storage.read_with_etag(self.url, self.storage_cfg)
            except FileNotFoundError:
                continue
            current = LeaseRecord.from_bytes(data)
            if current.holder == self.holder and not current.released:  # our own create whose answer was lost
                self._etag, self._record = etag, current
                return self._confirmed()
            reason = self._free_because(current, time.time())
            if not reason:
                raise LeaseHeld(self._held_message(current))
            try:
                self._etag = storage.replace_if_match(self.url, mine.to_bytes(), etag, self.storage_cfg)
            except storage.PreconditionFailed:
                continue
            self._record = mine
            log.warning("took the lease of %s: %s (%s)", self.url, reason, current.describe(time.time()))
            return self._confirmed()
        raise LeaseHeld(f"could not acquire {self.url}: it kept changing under concurrent writers")

    def adopt(self) -> "Lease":
        """Continue a lease the driver acquired for this holder id (a worker, possibly after a restart)."""
        data, etag = storage.read_with_etag(self.url, self.storage_cfg)
        current = LeaseRecord.from_bytes(data)
        if current.holder != self.holder or current.released:
            raise LeaseLost(f"{self.url} is no longer held by this job: {current.describe(time.time())}"
                            f"{' (released)' if current.released else ''}")
        self._etag, self._record = etag, current
        return self

    def _free_because(self, current: LeaseRecord, now: float) -> str:
        if current.released:
            return "it was released"
        if _holder_gone(current):
            return "its holder process is gone"
        if now - current.heartbeat_unix > self.cfg.timeout_s and self.cfg.takeover:
            return f"its heartbeat is older than lease.timeout_s={self.cfg.timeout_s:.0f}s and takeover was asked"
        return ""

    def _held_message(self, current: LeaseRecord) -> str:
        now = time.time()
        stale = now - current.heartbeat_unix > self.cfg.timeout_s
        hint = ("its heartbeat is older than lease.timeout_s, so if that job is gone, rerun with --takeover "
                "(or --set lease.takeover=true)" if stale else
                f"wait for it to end, stop it, or use another run.url; a lease whose heartbeat is older than "
                f"lease.timeout_s={self.cfg.timeout_s:.0f}s can be taken with --takeover")
        return f"run.url {self.url.rsplit('/', 1)[0]} is held by another job: {current.describe(now)}; {hint}"

    def _confirmed(self) -> "Lease":
        """Read back: a store that ignored the conditional header would show another holder here."""
        data, etag = storage.read_with_etag(self.url, self.storage_cfg)
        current = LeaseRecord.from_bytes(data)
        if current.holder != self.holder:
            raise LeaseHeld(self._held_message(current))
        self._etag, self._record = etag, current
        return self

    # ----------------------------------------------------------------------------------- renew

    def renew(self) -> None:
        """Heartbeat; raises :class:`LeaseLost` if another holder took the lease."""
        with self._lock:
            for _ in range(4):
                assert self._record is not None, "renew() before acquire()/adopt()"
                record = replace(self._record, heartbeat_unix=time.time(), renewals=self._record.renewals + 1)
                try:
                    self._etag = storage.replace_if_match(self.url, record.to_bytes(), self._etag, self.storage_cfg)
                    self._record = record
                    return
                except storage.PreconditionFailed:
                    try:
                        data, etag = storage.read_with_etag(self.url, self.storage_cfg)
                    except FileNotFoundError:
                        raise self._lost("the lease object was deleted") from None
                    current = LeaseRecord.from_bytes(data)
                    if current.holder != self.holder or current.released:
                        raise self._lost(current.describe(time.time()))
                    self._etag, self._record = etag, current  # another renewer of this job, or our lost answer
            raise self._lost("it kept changing under concurrent renewals")

    def verify(self) -> None:
        """Raise :class:`LeaseLost` unless this job still holds the lease (fences checkpoint commits)."""
        if self.lost is not None:
            raise self.lost
        data, _ = storage.read_with_etag(self.url, self.storage_cfg)
        current = LeaseRecord.from_bytes(data)
        if current.holder != self.holder or current.released:
            raise self._lost(current.describe(time.time()))

    def _lost(self, detail: str) -> LeaseLost:
        self.lost = LeaseLost(f"this job no longer holds {self.url} ({detail}); it stops without writing")
        return self.lost

    def release(self) -> None:
        """Mark the lease released so that the next job (a resubmission) takes it at once."""
        self.stop_heartbeat()
        if self._record is None or self.lost is not None:
            return
        try:
            with self._lock:
                record = replace(self._record, released=True, heartbeat_unix=time.time())
                storage.replace_if_match(self.url, record.to_bytes(), self._etag, self.storage_cfg)
                self._record = None
        except Exception as exc:  # the holder process is ending; the lease then frees by pid or timeout
            log.warning("could not release %s: %s", self.url, exc)

    # ----------------------------------------------------------------------------------- heartbeat

    def start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # storage down for longer than the retry policy: keep trying
                log.warning("lease heartbeat failed (will retry): %s", exc)

    def check(self) -> None:
        """Raise in the training loop once the heartbeat found the lease taken."""
        if self.lost is not None:
            raise self.lost
