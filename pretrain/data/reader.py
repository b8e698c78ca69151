"""Reads runs of samples out of tar shards with ranged GETs.

Why not ``webdataset.WebDataset`` for training: it can only stream a shard from its first byte, so
resuming mid-shard would re-download everything before the cursor. With the ``.idx`` offsets
written by ``data-tools make-shards`` we fetch exactly the samples a window needs, and a failed read
is retried (by :mod:`pretrain.storage`) from the sample where it failed, not from the shard's
start. We still register an ``s3://`` opener with webdataset (over s3fs, no ``aws`` CLI) so the same shards
stream with plain ``webdataset.WebDataset("s3://...")`` for tools and users.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pretrain import storage
from pretrain.config import StorageConfig
from pretrain.data.shards import Manifest, read_index

log = logging.getLogger(__name__)

# Reasons a sample can be skipped; the trainer reports counts per reason.
SKIP_READ_ERROR = "read_error"
SKIP_TRUNCATED = "truncated"
SKIP_DECODE_ERROR = "decode_error"
SKIP_BAD_LABEL = "bad_label"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_MISSING_MASK = "missing_mask"
"""A segmentation sample without its label mask (``png``)."""
SKIP_REASONS = (SKIP_READ_ERROR, SKIP_TRUNCATED, SKIP_DECODE_ERROR, SKIP_BAD_LABEL, SKIP_MISSING_IMAGE,
                SKIP_MISSING_MASK)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
"""Sample fields that hold an image, in the order they are looked for."""


@dataclass
class RawSample:
    key: str
    fields: dict[str, bytes]


@dataclass
class Skipped:
    reason: str


@dataclass
class ShardReader:
    """Ranged reads of one shard set. Storage errors follow :mod:`pretrain.retry_policy`: transient ones
    are retried inside :mod:`pretrain.storage`; a permanent one (403, 404, 416, a deleted shard) or a
    transient one that outlived its retries skips the affected samples at once, counted by reason."""

    url: str
    manifest: Manifest
    storage_cfg: StorageConfig | None = None
    max_cached_indexes: int = 256
    _indexes: OrderedDict = field(default_factory=OrderedDict)
    _warned: set = field(default_factory=set)

    def shard_url(self, shard: int) -> str:
        return storage.join(self.url, self.manifest.shards[shard].name)

    def index(self, shard: int) -> np.ndarray:
        """Sample offsets of `shard`, cut to what the stored tar really holds.

        Opening a shard costs one extra request, a size check: a tar cut short by an interrupted upload
        (its index still pointing past the end) is detected here once, and the samples beyond its end
        are skipped without a request each.
        """
        cached = self._indexes.get(shard)
        if cached is None:
            info = self.manifest.shards[shard]
            cached = read_index(self.url, info.name, self.storage_cfg)
            if len(cached) != info.num_samples + 1:
                raise OSError(f"{self.url}/{info.name}: index has {len(cached) - 1} samples, manifest says "
                              f"{info.num_samples}; run `data-tools verify {self.url}`")
            actual = storage.size(self.shard_url(shard), self.storage_cfg)
            if actual != info.bytes:
                readable = int(np.searchsorted(cached, actual, side="right")) - 1  # samples ending by `actual`
                log.warning("%s: %d bytes, the manifest says %d (an interrupted upload?); reading its first %d of "
                            "%d samples, the other %d are skipped as %r", self.shard_url(shard), actual, info.bytes,
                            max(readable, 0), info.num_samples, info.num_samples - max(readable, 0), SKIP_TRUNCATED)
                self._warned.add(shard)
                cached = cached[: max(readable, 0) + 1].copy()
            self._indexes[shard] = cached
            if len(self._indexes) > self.max_cached_indexes:
                self._indexes.popitem(last=False)
        return cached

    def read(self, shard: int, samples: np.ndarray) -> dict[int, RawSample | Skipped]:
        """Samples (indices within `shard`) -> raw fields, or the reason they must be skipped."""
        out: dict[int, RawSample | Skipped] = {}
        try:
            offsets = self.index(shard)
        except OSError as exc:  # the index or the shard is unreadable: every requested sample is skipped
            self._warn(shard, f"cannot open ({exc})")
            return {int(i): Skipped(SKIP_READ_ERROR) for i in samples}
        readable = len(offsets) - 1
        for first, last in _runs(np.sort(samples)):
            if first >= readable:
                out.update({i: Skipped(SKIP_TRUNCATED) for i in range(first, last + 1)})
                continue
            stop = min(last, readable - 1)
            out.update({i: Skipped(SKIP_TRUNCATED) for i in range(stop + 1, last + 1)})
            start, end = int(offsets[first]), int(offsets[stop + 1])
            url = self.shard_url(shard)
            try:
                blob = storage.read_bytes(url, self.storage_cfg, start, end)
            except OSError as exc:
                self._warn(shard, f"bytes {start}-{end} unreadable ({exc})")
                out.update({i: Skipped(SKIP_READ_ERROR) for i in range(first, stop + 1)})
                continue
            for i in range(first, stop + 1):
                a, b = int(offsets[i]) - start, int(offsets[i + 1]) - start
                out[i] = _parse_sample(blob[a:b]) if b <= len(blob) else Skipped(SKIP_TRUNCATED)
        bad = sorted({r.reason for r in out.values() if isinstance(r, Skipped)})
        if bad:
            self._warn(shard, f"skipping sample(s) ({', '.join(bad)})")
        return out

    def _warn(self, shard: int, what: str) -> None:
        """One warning per shard; later skips in it are only counted."""
        if shard in self._warned:
            return
        self._warned.add(shard)
        log.warning("%s: %s; further skips in this shard are counted, not logged", self.manifest.shards[shard].name,
                    what)


def _runs(sorted_samples: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [first, last] of sample indices."""
    if len(sorted_samples) == 0:
        return []
    breaks = np.nonzero(np.diff(sorted_samples) != 1)[0]
    starts = np.concatenate([[sorted_samples[0]], sorted_samples[breaks + 1]])
    ends = np.concatenate([sorted_samples[breaks], [sorted_samples[-1]]])
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def _parse_sample(blob: bytes) -> RawSample | Skipped:
    """The tar members of one sample (WebDataset convention: key = basename up to the first dot)."""
    fields: dict[str, bytes] = {}
    key = ""
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                prefix = member.name[: len(member.name) - len(base)]
                key = key or prefix + stem
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if len(data) != member.size:
                    return Skipped(SKIP_TRUNCATED)
                fields[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError):
        return Skipped(SKIP_TRUNCATED)
    if not fields:
        return Skipped(SKIP_TRUNCATED)
    return RawSample(key, fields)


def register_s3_with_webdataset(storage_cfg: StorageConfig | None = None) -> None:
    """Let `webdataset.WebDataset("s3://bucket/shard-{000000..000009}.tar")` stream through s3fs."""
    import webdataset

    def open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: object):
        return storage.open_url(url, mode, storage_cfg, block_size=max(bufsize, 1 << 22))

    webdataset.gopen_schemes["s3"] = open_s3  # the dispatch table webdataset.gopen() consults
