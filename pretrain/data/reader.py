"""Reads runs of samples out of tar shards with ranged GETs, retrying transient storage errors.

Why not ``webdataset.WebDataset`` for training: it can only stream a shard from its first byte, so
resuming mid-shard would re-download everything before the cursor. With the ``.idx`` offsets
written by ``data-tools make-shards`` we fetch exactly the samples a window needs, and a failed read
is retried from the sample where it failed rather than from the shard's start. We still register an
``s3://`` opener with webdataset (over s3fs, no ``aws`` CLI) so the same shards stream with plain
``webdataset.WebDataset("s3://...")`` for tools and users.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
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


@dataclass
class RawSample:
    key: str
    fields: dict[str, bytes]


@dataclass
class Skipped:
    reason: str


class ReadFailed(RuntimeError):
    """A byte range could not be read after all retries."""


@dataclass
class ShardReader:
    url: str
    manifest: Manifest
    storage_cfg: StorageConfig | None = None
    retries: int = 5
    backoff_s: float = 0.5
    max_cached_indexes: int = 256
    _indexes: OrderedDict = field(default_factory=OrderedDict)
    _warned: set = field(default_factory=set)

    def shard_url(self, shard: int) -> str:
        return storage.join(self.url, self.manifest.shards[shard].name)

    def index(self, shard: int) -> np.ndarray:
        cached = self._indexes.get(shard)
        if cached is None:
            name = self.manifest.shards[shard].name
            cached = self._retry(lambda: read_index(self.url, name, self.storage_cfg), f"{name} index")
            expected = self.manifest.shards[shard].num_samples + 1
            if len(cached) != expected:
                raise ValueError(f"{self.url}/{name}: index has {len(cached) - 1} samples, manifest says "
                                 f"{expected - 1}; re-run `data-tools verify {self.url}`")
            self._indexes[shard] = cached
            if len(self._indexes) > self.max_cached_indexes:
                self._indexes.popitem(last=False)
        return cached

    def read(self, shard: int, samples: np.ndarray) -> dict[int, RawSample | Skipped]:
        """Samples (indices within `shard`) -> raw fields, or the reason they must be skipped."""
        out: dict[int, RawSample | Skipped] = {}
        try:
            offsets = self.index(shard)
        except ReadFailed:
            return {int(i): Skipped(SKIP_READ_ERROR) for i in samples}
        for first, last in _runs(np.sort(samples)):
            start, end = int(offsets[first]), int(offsets[last + 1])
            url = self.shard_url(shard)
            try:
                blob = self._retry(lambda: storage.read_bytes(url, self.storage_cfg, start, end),
                                   f"{url} bytes {start}-{end}")
            except ReadFailed:
                out.update({i: Skipped(SKIP_READ_ERROR) for i in range(first, last + 1)})
                continue
            for i in range(first, last + 1):
                a, b = int(offsets[i]) - start, int(offsets[i + 1]) - start
                out[i] = _parse_sample(blob[a:b]) if b <= len(blob) else Skipped(SKIP_TRUNCATED)
        self._warn_once(shard, out)
        return out

    def _retry(self, fn, what: str):
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
                if attempt == self.retries:
                    log.error("giving up on %s after %d attempts: %s", what, attempt + 1, exc)
                    raise ReadFailed(f"{what}: {exc}") from exc
                log.warning("retrying %s (attempt %d/%d): %s", what, attempt + 1, self.retries, exc)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _warn_once(self, shard: int, results: dict) -> None:
        if shard in self._warned:
            return
        bad = [r.reason for r in results.values() if isinstance(r, Skipped)]
        if bad:
            self._warned.add(shard)
            log.warning("%s: skipping %d sample(s) (%s); further skips in this shard are counted, not logged",
                        self.manifest.shards[shard].name, len(bad), ", ".join(sorted(set(bad))))


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
