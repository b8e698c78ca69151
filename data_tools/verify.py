"""Check a shard set end to end before spending cluster hours on it.

For every shard in the manifest: the tar exists, its size and sha256 match, it parses as a tar whose
samples have ``cls`` (an id below ``num_classes``), ``jpg`` and ``json`` members, the sample count
matches, and the ``.idx`` file matches both its recorded sha256 and the sample offsets found in the
tar (so ranged reads land on sample boundaries). A seeded random sample of images is decoded with the
training decoder. Each tar is read once, as a stream, hashing and parsing in the same pass; shards
are checked in parallel threads because remote reads are latency-bound.

Segmentation sets (``manifest.task``) have no ``cls``; every sample needs a ``png`` mask instead, and a
decoded sample's mask must decode as 8-bit L/P, have its image's size and hold only class values
(after ``reduce_zero_label``) or 255.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pretrain import storage
from pretrain.config import StorageConfig
from pretrain.data import shards
from pretrain.data.decode import UndecodableImage, decode_rgb


@dataclass
class ShardCheck:
    name: str
    problems: list[str] = field(default_factory=list)
    num_samples: int = 0
    decoded: int = 0


@dataclass
class VerifyReport:
    url: str
    manifest: shards.Manifest
    checks: list[ShardCheck]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        decoded = sum(c.decoded for c in self.checks)
        total_bytes = sum(s.bytes for s in self.manifest.shards)
        out = [f"{self.url}: {len(self.manifest.shards)} shards, {self.manifest.num_samples:,} samples, "
               f"{total_bytes / 1e9:.3f} GB, {self.manifest.num_classes:,} classes "
               f"({self.manifest.label_source}); {decoded} images decoded"]
        if self.manifest.skipped:
            out.append(f"skipped while building: {self.manifest.skipped} (see {shards.REPORT})")
        out += [f"PROBLEM {p}" for p in self.problems]
        out.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return out


class _HashingReader:
    """File wrapper that hashes and counts every byte read through it (tarfile streams through it)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.count = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 23):
            pass


def check_shard(url: str, info: shards.ShardInfo, num_classes: int, decode: set[int],
                storage_cfg: StorageConfig | None = None, mask_limit: int = 0) -> ShardCheck:
    """All checks for one shard; `decode` holds the sample positions whose image is decoded.
    ``mask_limit > 0``: a segmentation set whose raw mask values must be below it (or 255)."""
    check = ShardCheck(info.name)
    tar_url = storage.join(url, info.name)
    if not storage.exists(tar_url, storage_cfg):
        check.problems.append(f"{info.name}: missing")
        return check
    offsets: list[int] = []
    end = images = masks = 0
    last_key, image_size = None, None
    try:
        with storage.open_url(tar_url, "rb", storage_cfg) as f:
            reader = _HashingReader(f)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    if key != last_key:
                        offsets.append(member.offset)
                        last_key, image_size = key, None
                    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    position = len(offsets) - 1
                    images += ext == "jpg"
                    masks += ext == "png"
                    mask = mask_limit and ext == "png"
                    if ext in ("cls", "json") or (position in decode and (ext == "jpg" or mask)):
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        if mask:
                            problem = _check_mask(data, mask_limit, image_size)
                        else:
                            problem, image_size = _check_field(ext, data, num_classes)
                        if problem:
                            check.problems.append(f"{info.name}: sample {key}: {problem}")
                        check.decoded += ext == "jpg" and not problem
            reader.drain()
    except (tarfile.TarError, OSError, EOFError) as exc:
        check.problems.append(f"{info.name}: unreadable tar ({type(exc).__name__}: {exc})")
        return check
    check.num_samples = len(offsets)
    if reader.count != info.bytes:
        check.problems.append(f"{info.name}: {reader.count} bytes, manifest says {info.bytes}")
    if reader.sha.hexdigest() != info.sha256:
        check.problems.append(f"{info.name}: sha256 mismatch (corrupted or replaced)")
    if len(offsets) != info.num_samples:
        check.problems.append(f"{info.name}: {len(offsets)} samples, manifest says {info.num_samples}")
    if images != len(offsets):
        check.problems.append(f"{info.name}: {len(offsets) - images} sample(s) without a jpg")
    if mask_limit and masks != len(offsets):
        check.problems.append(f"{info.name}: {len(offsets) - masks} sample(s) without a png mask")
    check.problems += _check_index(url, info, offsets + [end], storage_cfg)
    return check


def _check_field(ext: str, data: bytes, num_classes: int) -> tuple[str, tuple[int, int] | None]:
    """(problem or "", the decoded image's (w, h) for a jpg)."""
    if ext == "cls":
        try:
            label = int(data.decode().strip())
        except ValueError:
            return f"cls {data[:20]!r} is not an integer", None
        return "" if 0 <= label < num_classes else f"cls {label} outside 0..{num_classes - 1}", None
    if ext == "json":
        try:
            json.loads(data)
        except ValueError:
            return "json does not parse", None
        return "", None
    try:
        return "", decode_rgb(data).size
    except UndecodableImage as exc:
        return f"image does not decode ({exc})", None


def _check_mask(data: bytes, mask_limit: int, image_size: tuple[int, int] | None) -> str:
    from pretrain.data.segmentation import IGNORE, open_mask  # imports torch: segmentation sets only

    try:
        mask = open_mask(data)
    except UndecodableImage as exc:
        return f"mask does not decode ({exc})"
    if image_size is not None and mask.size != image_size:
        return f"mask {mask.size} is not the image's size {image_size}"
    values = np.asarray(mask)
    top = int(np.where(values == IGNORE, 0, values).max(initial=0))
    return "" if top < mask_limit else f"mask value {top} outside 0..{mask_limit - 1} (and 255)"


def _check_index(url: str, info: shards.ShardInfo, expected: list[int],
                 storage_cfg: StorageConfig | None) -> list[str]:
    name = shards.index_name(info.name)
    try:
        data = storage.read_bytes(storage.join(url, name), storage_cfg)
    except FileNotFoundError:
        return [f"{name}: missing"]
    problems = []
    if info.index_sha256 and hashlib.sha256(data).hexdigest() != info.index_sha256:
        problems.append(f"{name}: sha256 mismatch")
    if len(data) % 8 or not np.array_equal(shards.decode_index(data[: len(data) // 8 * 8]), expected):
        problems.append(f"{name}: offsets do not match the samples in {info.name}")
    return problems


def verify(url: str, decode_sample: int = 64, seed: int = 0, threads: int = 8,
           storage_cfg: StorageConfig | None = None,
           progress: Callable[[ShardCheck], None] | None = None) -> VerifyReport:
    """Verify the shard set at `url`; `decode_sample` images are decoded (-1 = all)."""
    manifest = shards.read_manifest(url, storage_cfg)
    problems = []
    if manifest.num_samples != sum(s.num_samples for s in manifest.shards):
        problems.append(f"manifest: num_samples {manifest.num_samples} != sum over shards")
    starts = np.cumsum([0] + [s.num_samples for s in manifest.shards])
    total = int(starts[-1])
    n = total if decode_sample < 0 else min(decode_sample, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, n, replace=False)) if n else np.array([], int)
    per_shard = [set((chosen[(chosen >= a) & (chosen < b)] - a).tolist()) for a, b in zip(starts, starts[1:])]
    mask_limit = manifest.num_classes + manifest.reduce_zero_label if manifest.task == "segmentation" else 0
    with ThreadPoolExecutor(max(1, threads)) as pool:
        futures = [pool.submit(check_shard, url, info, manifest.num_classes, per_shard[i], storage_cfg,
                               mask_limit) for i, info in enumerate(manifest.shards)]
        checks = []
        for fut in futures:
            checks.append(fut.result())
            if progress:
                progress(checks[-1])
    for check in checks:
        problems += check.problems
    return VerifyReport(url, manifest, checks, problems)
