"""Atomic, asynchronous, topology-independent checkpoints on any fsspec URL (S3 for clusters).

Layout: ``<run.url>/checkpoints/step_<N>/`` holding, per rank, ``rank_<r>.safetensors`` (fp32 master
fragments, Adam moments, EMA fragments, RNG) and ``rank_<r>.json`` (fragment table, loader cursors,
RNG, engine scalars, file sizes and sha256), then ``manifest.json``.

Commit protocol (DeepSpeed writes local files and a ``latest`` pointer with ``open()``, issue #2701;
Ray can leave partial checkpoint dirs behind, issue #41700):
1. Training blocks only while each rank copies its state into host memory.
2. A background thread per rank serializes it, uploads it with retries and backoff, and writes its
   ``rank_<r>.json`` last: that file is the rank's "done" marker.
3. Rank 0's thread waits for every rank's marker, then writes ``manifest.json`` listing every file
   with size and sha256. Only directories with a manifest are ever loaded; loading re-checks sizes
   and hashes, and startup removes uncommitted leftovers. No collective runs in the background, so
   the upload never races the training step's collectives.
A new save waits for the previous upload (never two at once); a failed upload is raised in the
training loop at the next step, so a checkpoint is never silently lost.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from pretrain import storage
from pretrain.config import CheckpointConfig, StorageConfig

log = logging.getLogger(__name__)

FORMAT = "convnext-pretrain-checkpoint/1"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or committed, or a committed one fails verification."""


@dataclass
class RankSnapshot:
    """One rank's state at a step, already copied off the training tensors."""

    step: int
    rank: int
    world_size: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
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
                 world_size: int, merge_markers: Callable[[list[dict]], dict] | None = None):
        self.root = storage.join(run_url, CHECKPOINTS)
        self.cfg, self.storage_cfg, self.rank, self.world_size = cfg, storage_cfg, rank, world_size
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._staging = cfg.staging_dir or tempfile.mkdtemp(prefix="ckpt-staging-")
        self.last_upload_s = 0.0
        self.last_committed: int | None = None
        # Rank 0 derives manifest fields from all ranks' markers (e.g. the global loader state).
        self.merge_markers = merge_markers

    # ----------------------------------------------------------------------------- saving

    def step_url(self, step: int) -> str:
        return storage.join(self.root, f"step_{step}")

    def save(self, snapshot: RankSnapshot, blocking: bool = False) -> None:
        """Queue an upload of `snapshot`; waits first for the previous one (never two at once)."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(snapshot,), name=f"ckpt-step-{snapshot.step}",
                                        daemon=True)
        self._thread.start()
        if blocking or not self.cfg.async_upload:
            self.wait()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raise in the training loop if a background save failed."""
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"checkpoint could not be committed: {error}") from error

    def _run(self, snap: RankSnapshot) -> None:
        try:
            started = time.monotonic()
            self._upload_rank(snap)
            if snap.rank == 0:
                self._commit(snap)
                self.purge()
            self.last_upload_s = time.monotonic() - started
        except BaseException as exc:  # reported to the training loop by check()
            log.error("checkpoint step %d failed on rank %d: %s", snap.step, snap.rank, exc)
            self._error = exc

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        delay = self.cfg.retry_backoff_s
        for attempt in range(self.cfg.upload_retries + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt == self.cfg.upload_retries:
                    raise CheckpointError(f"{what} failed after {attempt + 1} attempts: {exc}") from exc
                log.warning("%s failed (attempt %d/%d), retrying in %.1fs: %s", what, attempt + 1,
                            self.cfg.upload_retries + 1, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
        raise AssertionError("unreachable")

    def _upload_rank(self, snap: RankSnapshot) -> None:
        step_url = self.step_url(snap.step)
        os.makedirs(self._staging, exist_ok=True)
        name = rank_file(snap.rank, "safetensors")
        local = os.path.join(self._staging, f"step_{snap.step}-{name}")
        save_file(snap.tensors, local)
        entry = {"bytes": os.path.getsize(local), "sha256": storage.sha256_file(local)}
        self._retry(f"upload {name} of step {snap.step}",
                    lambda: storage.upload_file(local, storage.join(step_url, name), self.storage_cfg))
        os.remove(local)
        marker = {"rank": snap.rank, "world_size": snap.world_size, "step": snap.step,
                  "files": {name: entry}, **snap.meta}
        data = json.dumps(marker).encode()
        self._retry(f"upload {rank_file(snap.rank, 'json')} of step {snap.step}",
                    lambda: storage.write_bytes(storage.join(step_url, rank_file(snap.rank, "json")), data,
                                                self.storage_cfg))

    def _commit(self, snap: RankSnapshot) -> None:
        step_url = self.step_url(snap.step)
        deadline = time.monotonic() + self.cfg.commit_timeout_s
        markers: dict[int, dict] = {}
        while len(markers) < snap.world_size:
            for rank in range(snap.world_size):
                if rank in markers:
                    continue
                url = storage.join(step_url, rank_file(rank, "json"))
                try:
                    markers[rank] = json.loads(storage.read_bytes(url, self.storage_cfg))
                except FileNotFoundError:
                    continue
            if len(markers) < snap.world_size:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(snap.world_size)) - set(markers))
                    raise CheckpointError(f"step {snap.step}: ranks {missing} did not finish uploading within "
                                          f"{self.cfg.commit_timeout_s:.0f}s (checkpoint.commit_timeout_s)")
                time.sleep(0.2)
        files: dict[str, dict] = {}
        for rank, marker in sorted(markers.items()):
            files.update(marker["files"])
            raw = json.dumps(marker).encode()
            files[rank_file(rank, "json")] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        manifest = {"format": FORMAT, "step": snap.step, "world_size": snap.world_size,
                    "created_unix": time.time(), "files": files, **snap.run_meta}
        if self.merge_markers is not None:
            manifest.update(self.merge_markers([markers[r] for r in sorted(markers)]))
        data = json.dumps(manifest, indent=1).encode()
        self._retry(f"commit step {snap.step}",
                    lambda: storage.write_bytes(storage.join(step_url, MANIFEST), data, self.storage_cfg))
        self.last_committed = snap.step
        log.info("committed checkpoint %s", step_url)

    # ----------------------------------------------------------------------------- listing

    def _step_dirs(self) -> list[int]:
        steps = []
        for name in storage.listdir(self.root, self.storage_cfg):
            match = _STEP_DIR.match(name)
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def committed_steps(self) -> list[int]:
        return [s for s in self._step_dirs() if storage.exists(storage.join(self.step_url(s), MANIFEST),
                                                               self.storage_cfg)]

    def cleanup_uncommitted(self) -> list[int]:
        """Remove step directories without a manifest (leftovers of an interrupted save). Rank 0, at start."""
        committed = set(self.committed_steps())
        removed = [s for s in self._step_dirs() if s not in committed]
        for step in removed:
            log.warning("removing uncommitted checkpoint leftovers %s", self.step_url(step))
            storage.remove_tree(self.step_url(step), self.storage_cfg)
        return removed

    def purge(self) -> list[int]:
        """Retention: keep the newest `keep_last` (+ every `keep_every_steps`-th); only under checkpoints/."""
        steps = self.committed_steps()
        keep = set(steps[-self.cfg.keep_last:])
        if self.cfg.keep_every_steps:
            keep |= {s for s in steps if s % self.cfg.keep_every_steps == 0}
        removed = [s for s in steps if s not in keep]
        for step in removed:
            url = self.step_url(step)
            assert url.startswith(self.root + "/") or url.startswith(self.root + os.sep)
            storage.remove_tree(url, self.storage_cfg)
        return removed

    # ----------------------------------------------------------------------------- loading

    def read_manifest(self, step: int) -> dict[str, Any]:
        url = storage.join(self.step_url(step), MANIFEST)
        manifest = json.loads(storage.read_bytes(url, self.storage_cfg))
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{url}: unknown checkpoint format {manifest.get('format')!r}")
        for name, entry in manifest["files"].items():
            actual = storage.size(storage.join(self.step_url(step), name), self.storage_cfg)
            if actual != entry["bytes"]:
                raise CheckpointError(f"{self.step_url(step)}/{name}: {actual} bytes, manifest says {entry['bytes']}")
        return manifest

    def fetch(self, step: int, manifest: dict[str, Any], name: str) -> bytes:
        """A checkpoint file's bytes, verified against the manifest's sha256."""
        data = storage.read_bytes(storage.join(self.step_url(step), name), self.storage_cfg)
        entry = manifest["files"][name]
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{self.step_url(step)}/{name} does not match its manifest (corrupted)")
        return data

    def fetch_tensors(self, step: int, manifest: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
        return load_safetensors(self.fetch(step, manifest, rank_file(rank, "safetensors")))

    def fetch_rank_meta(self, step: int, manifest: dict[str, Any], rank: int) -> dict[str, Any]:
        return json.loads(self.fetch(step, manifest, rank_file(rank, "json")))

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if not self.cfg.staging_dir:
                shutil.rmtree(self._staging, ignore_errors=True)


def consolidate(fragment_tables: list[list[list]], tensors_by_rank: Callable[[int], dict[str, torch.Tensor]],
                kind: str) -> dict[str, torch.Tensor]:
    """Full tensors of `kind` ('master' or 'ema') from every rank's fragments (export, evaluation)."""
    shapes: dict[str, tuple[int, ...]] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for rank, table in enumerate(fragment_tables):
        tensors = tensors_by_rank(rank)
        for name, shape, start, numel in table:
            shapes[name] = tuple(shape)
            pieces.setdefault(name, []).append((start, tensors[f"{kind}/{name}#{start}"]))
    out = {}
    for name, shape in shapes.items():
        flat = torch.empty(int(np.prod(shape)), dtype=torch.float32)
        covered = 0
        for start, piece in sorted(pieces[name], key=lambda p: p[0]):
            flat[start:start + piece.numel()] = piece
            covered += piece.numel()
        if covered != flat.numel():
            raise CheckpointError(f"{name}: fragments cover {covered} of {flat.numel()} elements")
        out[name] = flat.view(shape)
    return out
