"""Atomic, asynchronous, topology-independent checkpoints on any fsspec URL (S3 for clusters).

Layout: ``<run.url>/checkpoints/step_<N>/`` holding, per rank, ``rank_<r>.safetensors`` (fp32 master
fragments, optimizer moments, EMA fragments, RNG; see :mod:`pretrain.state_format`) and
``rank_<r>.json`` (its private state: RNG, loader cursors, ... plus the file's size and sha256), then
``manifest.json``. A step that must be committed again (its first checkpoint proved unusable and the
run fell back past it) goes to ``step_<N>.<g>``: a committed directory is never written into again.

Commit protocol (DeepSpeed writes local files and a ``latest`` pointer with ``open()``, issue #2701;
Ray can leave partial checkpoint dirs behind, issue #41700):
1. Training blocks only while each rank copies its state into host memory.
2. A background thread per rank serializes it, uploads it, and writes its ``rank_<r>.json`` last:
   that file is the rank's "done" marker, tagged with this save's attempt token.
3. Rank 0's thread waits for every rank's marker of this attempt (one listing per poll), checks the
   fence (the run's lease, :mod:`pretrain.lease`), then creates ``manifest.json`` with a
   create-if-absent write. The manifest lists every file with size and sha256 and carries what a
   resume decides on before reading any rank file: the config, data identity, every rank's fragment
   table and counters. Only directories with a manifest are ever loaded.
4. Retention removes a checkpoint's manifest first, then its files, so an interrupted purge leaves an
   uncommitted directory (removed at the next start), never a committed one with files missing.
No collective runs in the background, so uploads never race the training step's collectives. A new
save waits for the previous upload (never two at once); a failed upload is raised in the training
loop at the next step, so a checkpoint is never silently lost.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from pretrain import storage
from pretrain.config import CheckpointConfig, StorageConfig
from pretrain.run_errors import FatalRunError

log = logging.getLogger(__name__)

FORMAT = "convnext-pretrain-checkpoint/2"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)(?:\.(\d+))?$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or committed, or a committed one fails verification."""


class StagingDiskFull(CheckpointError, FatalRunError):
    """The local staging directory has no space: every retry and restart would fail the same way."""


@dataclass(frozen=True, order=True)
class CheckpointDir:
    """``step_<step>`` (generation 0) or ``step_<step>.<generation>`` under ``<run.url>/checkpoints``."""

    step: int
    generation: int = 0

    @property
    def name(self) -> str:
        return f"step_{self.step}" + (f".{self.generation}" if self.generation else "")

    @classmethod
    def parse(cls, name: str) -> "CheckpointDir | None":
        match = _STEP_DIR.match(name)
        return cls(int(match.group(1)), int(match.group(2) or 0)) if match else None


@dataclass
class RankSnapshot:
    """One rank's state at a step, already copied off the training tensors."""

    step: int
    rank: int
    world_size: int
    tensors: dict[str, torch.Tensor]
    private: dict[str, Any]
    """Only this rank reads it back (RNG state, ...): ``rank_<r>.json``."""
    shared: dict[str, Any] = field(default_factory=dict)
    """Small per-rank facts every rank may need at resume (fragment table, counters): copied into the
    manifest's ``ranks`` list so that a resume reads one manifest instead of every rank's file."""
    run_meta: dict[str, Any] = field(default_factory=dict)
    """Rank 0 only: config, metrics, epoch... copied into the manifest."""


def rank_file(rank: int, ext: str) -> str:
    return f"rank_{rank:05d}.{ext}"


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python/numpy RNG as JSON, torch (and CUDA) RNG as tensors."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"rng/torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state().clone()
    return meta, tensors


def set_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


class CheckpointManager:
    def __init__(self, run_url: str, cfg: CheckpointConfig, storage_cfg: StorageConfig | None, rank: int,
                 world_size: int, fence: Callable[[], None] | None = None):
        self.root = storage.join(run_url, CHECKPOINTS)
        self.cfg, self.storage_cfg, self.rank, self.world_size = cfg, storage_cfg, rank, world_size
        self.fence = fence
        """Rank 0 calls it right before each commit; it raises if this job may no longer write the run."""
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging = cfg.staging_dir or tempfile.mkdtemp(prefix="ckpt-staging-")
        self._taken: dict[int, int] = {}
        """step -> highest generation that exists (any state): new saves of that step go above it."""
        self.last_upload_s = 0.0
        self.last_committed: CheckpointDir | None = None

    # ----------------------------------------------------------------------------- listing

    def url(self, where: CheckpointDir) -> str:
        return storage.join(self.root, where.name)

    def scan(self) -> tuple[list[CheckpointDir], list[CheckpointDir]]:
        """(committed, uncommitted) step directories, from one listing of the checkpoint prefix."""
        dirs: dict[CheckpointDir, bool] = {}
        for path in storage.list_files(self.root, self.storage_cfg):
            top, _, rest = path.partition("/")
            where = CheckpointDir.parse(top)
            if where is not None:
                dirs[where] = dirs.get(where, False) or rest == MANIFEST
        committed = sorted(d for d, has in dirs.items() if has)
        return committed, sorted(d for d, has in dirs.items() if not has)

    def committed(self) -> list[CheckpointDir]:
        return self.scan()[0]

    def committed_steps(self) -> list[int]:
        return sorted({d.step for d in self.committed()})

    def reserve(self, existing: list[CheckpointDir]) -> None:
        """Remember the directories that exist at start: saves never reuse their names."""
        for d in existing:
            self._taken[d.step] = max(self._taken.get(d.step, -1), d.generation)

    def dir_for(self, step: int) -> CheckpointDir:
        """Where a new save of `step` goes (the same on every rank: all reserve the same listing)."""
        return CheckpointDir(step, self._taken[step] + 1) if step in self._taken else CheckpointDir(step)

    def cleanup_uncommitted(self, uncommitted: list[CheckpointDir]) -> list[CheckpointDir]:
        """Remove leftovers of interrupted saves. Rank 0, at start, only while holding the run's lease."""
        for where in uncommitted:
            log.warning("removing uncommitted checkpoint leftovers %s", self.url(where))
            storage.remove_tree(self.url(where), self.storage_cfg)
        return uncommitted

    # ----------------------------------------------------------------------------- saving

    def save(self, snapshot: RankSnapshot, blocking: bool = False) -> None:
        """Queue an upload of `snapshot`; waits first for the previous one (never two at once)."""
        self.wait()
        where = self.dir_for(snapshot.step)
        self._taken[snapshot.step] = where.generation
        self._thread = threading.Thread(target=self._run, args=(snapshot, where), name=f"ckpt-{where.name}",
                                        daemon=True)
        self._thread.start()
        if blocking or not self.cfg.async_upload:
            self.wait()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def take_error(self) -> BaseException | None:
        """The error of a background save that failed and was not raised yet; the caller raises it."""
        error, self._error = self._error, None
        if error is not None and not isinstance(error, (CheckpointError, FatalRunError)):
            wrapped = CheckpointError(f"checkpoint could not be committed: {error}")
            wrapped.__cause__ = error
            return wrapped
        return error

    def check(self) -> None:
        """Raise in the training loop if a background save failed."""
        error = self.take_error()
        if error is not None:
            raise error

    def _run(self, snap: RankSnapshot, where: CheckpointDir) -> None:
        try:
            started = time.monotonic()
            attempt = self._upload_rank(snap, where)
            if snap.rank == 0:
                self._commit(snap, where, attempt)
                self.purge()
            self.last_upload_s = time.monotonic() - started
        except BaseException as exc:  # reported to the training loop by check()
            log.error("checkpoint %s failed on rank %d: %s", where.name, snap.rank, exc)
            self._error = exc
            if snap.rank != 0:  # tell rank 0's commit at once instead of letting it wait for the timeout
                with contextlib.suppress(Exception):
                    failed = {"rank": snap.rank, "world_size": snap.world_size, "step": snap.step,
                              "failed": f"{type(exc).__name__}: {exc}"}
                    storage.write_bytes(storage.join(self.url(where), rank_file(snap.rank, "json")),
                                        json.dumps(failed).encode(), self.storage_cfg)

    def _stage(self, snap: RankSnapshot, where: CheckpointDir) -> str:
        local = os.path.join(self._staging, f"{where.name}-{rank_file(snap.rank, 'safetensors')}")
        try:
            os.makedirs(self._staging, exist_ok=True)
            save_file(snap.tensors, local)
        except Exception as exc:  # safetensors reports I/O errors as SafetensorError with the OS message
            with contextlib.suppress(OSError):
                os.remove(local)
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(exc) \
                    or "No space left" in str(exc):
                raise StagingDiskFull(
                    f"checkpoint staging directory {self._staging} is full while writing {where.name} "
                    f"({exc}); free space there or point checkpoint.staging_dir at a larger disk. The committed "
                    f"checkpoints under {self.root} are intact.") from exc
            raise CheckpointError(f"cannot write the staging file {local}: {exc}") from exc
        return local

    def _upload_rank(self, snap: RankSnapshot, where: CheckpointDir) -> str:
        step_url = self.url(where)
        name = rank_file(snap.rank, "safetensors")
        local = self._stage(snap, where)
        try:
            entry = {"bytes": os.path.getsize(local), "sha256": storage.sha256_file(local)}
            storage.upload_file(local, storage.join(step_url, name), self.storage_cfg)
        finally:
            os.remove(local)
        attempt = uuid.uuid4().hex
        marker = {"rank": snap.rank, "world_size": snap.world_size, "step": snap.step, "attempt": attempt,
                  "files": {name: entry}, "shared": snap.shared, **snap.private}
        storage.write_bytes(storage.join(step_url, rank_file(snap.rank, "json")), json.dumps(marker).encode(),
                            self.storage_cfg)
        return attempt

    def _collect_markers(self, snap: RankSnapshot, where: CheckpointDir) -> dict[int, tuple[dict, bytes]]:
        """Every rank's marker of this save; one listing per poll, one read per marker."""
        step_url = self.url(where)
        deadline = time.monotonic() + self.cfg.commit_timeout_s
        markers: dict[int, tuple[dict, bytes]] = {}
        pause = 0.1
        while len(markers) < snap.world_size:
            present = set(storage.listdir(step_url, self.storage_cfg))
            for rank in range(snap.world_size):
                if rank in markers or rank_file(rank, "json") not in present:
                    continue
                raw = storage.read_bytes(storage.join(step_url, rank_file(rank, "json")), self.storage_cfg)
                marker = json.loads(raw)
                if marker.get("failed"):
                    raise CheckpointError(f"{where.name}: rank {rank} could not save its part: {marker['failed']}")
                if marker.get("step") == snap.step and marker.get("world_size") == snap.world_size:
                    markers[rank] = (marker, raw)
            if len(markers) < snap.world_size:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(snap.world_size)) - set(markers))
                    raise CheckpointError(f"{where.name}: ranks {missing} did not finish uploading within "
                                          f"{self.cfg.commit_timeout_s:.0f}s (checkpoint.commit_timeout_s)")
                time.sleep(pause)
                pause = min(pause * 1.5, 2.0)
        return markers

    def _commit(self, snap: RankSnapshot, where: CheckpointDir, own_attempt: str) -> None:
        markers = self._collect_markers(snap, where)
        if markers[0][0]["attempt"] != own_attempt:
            raise CheckpointError(f"{where.name}: rank 0's marker belongs to another attempt (two writers?)")
        files: dict[str, dict] = {}
        for rank, (marker, raw) in sorted(markers.items()):
            files.update(marker["files"])
            files[rank_file(rank, "json")] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        manifest = {"format": FORMAT, "step": snap.step, "dir": where.name, "world_size": snap.world_size,
                    "created_unix": time.time(), "files": files,
                    "ranks": [markers[r][0]["shared"] for r in range(snap.world_size)], **snap.run_meta}
        data = json.dumps(manifest, indent=1).encode()
        if self.fence is not None:
            self.fence()
        url = storage.join(self.url(where), MANIFEST)
        try:
            storage.create_exclusive(url, data, self.storage_cfg)
        except storage.PreconditionFailed:
            if storage.read_bytes(url, self.storage_cfg) != data:  # not merely our own retried write
                raise CheckpointError(f"{self.url(where)} was committed by another writer; it is left as it is")
        self.last_committed = where
        log.info("committed checkpoint %s", self.url(where))

    def purge(self) -> list[CheckpointDir]:
        """Retention: keep the newest `keep_last` (+ every `keep_every_steps`-th); only under checkpoints/."""
        dirs = self.committed()
        keep = set(dirs[-self.cfg.keep_last:])
        if self.cfg.keep_every_steps:
            keep |= {d for d in dirs if d.step % self.cfg.keep_every_steps == 0}
        removed = [d for d in dirs if d not in keep]
        for where in removed:
            url = self.url(where)
            assert url.startswith(self.root + "/") or url.startswith(self.root + os.sep)
            storage.remove_file(storage.join(url, MANIFEST), self.storage_cfg)  # de-commit first
            storage.remove_tree(url, self.storage_cfg)
        return removed

    # ----------------------------------------------------------------------------- loading

    def read_manifest(self, where: CheckpointDir) -> dict[str, Any]:
        """The manifest of a committed checkpoint (one GET; files are verified when fetched)."""
        url = storage.join(self.url(where), MANIFEST)
        try:
            manifest = json.loads(storage.read_bytes(url, self.storage_cfg))
        except ValueError as exc:
            raise CheckpointError(f"{url}: not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{url}: checkpoint format {manifest.get('format')!r}, this version reads "
                                  f"{FORMAT!r}")
        return manifest

    def fetch(self, where: CheckpointDir, manifest: dict[str, Any], name: str) -> bytes:
        """A checkpoint file's bytes, verified against the manifest's size and sha256."""
        url = storage.join(self.url(where), name)
        entry = manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"{url} is not listed in its manifest")
        try:
            data = storage.read_bytes(url, self.storage_cfg)
        except FileNotFoundError:
            raise CheckpointError(f"{url} is missing") from None
        if len(data) != entry["bytes"]:
            raise CheckpointError(f"{url}: {len(data)} bytes, the manifest says {entry['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{url} does not match its manifest's sha256 (corrupted or tampered with)")
        return data

    def fetch_tensors(self, where: CheckpointDir, manifest: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
        data = self.fetch(where, manifest, rank_file(rank, "safetensors"))
        try:
            return load_safetensors(data)
        except Exception as exc:
            raise CheckpointError(f"{self.url(where)}/{rank_file(rank, 'safetensors')} is unreadable: {exc}") from None

    def fetch_private(self, where: CheckpointDir, manifest: dict[str, Any], rank: int) -> dict[str, Any]:
        return json.loads(self.fetch(where, manifest, rank_file(rank, "json")))

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if not self.cfg.staging_dir:
                shutil.rmtree(self._staging, ignore_errors=True)
