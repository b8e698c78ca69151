"""The shard set format: WebDataset tars + per-shard sample index + a manifest written last.

Layout under a shard URL (local directory, file:// or s3:// prefix)::

    shard-000000.tar    WebDataset tar: per sample <key>.jpg, <key>.cls (ASCII int), <key>.json
                        (segmentation: <key>.jpg, <key>.json, <key>.png 8-bit label mask, no .cls)
    shard-000000.idx    little-endian int64[n + 1]: byte offset of each sample's first tar header,
                        then the end of the last sample (where the tar's end-of-archive blocks begin)
    shard-000000.done   JSON completion record of that shard (lets an interrupted build resume)
    manifest.json       written last: shards with counts, bytes, sha256; classes; build parameters
    report.json         inputs that were skipped while building, by reason

The ``.idx`` files are what make exact, cheap mid-epoch resume possible: a reader can fetch any
run of samples with one ranged GET instead of streaming a shard from its start. Plain WebDataset
readers ignore them, so the tars stay usable with ``webdataset.WebDataset``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pretrain import storage
from pretrain.config import StorageConfig

FORMAT = "convnext-pretrain-shards/1"
MANIFEST = "manifest.json"
CLASSIFICATION = "classification"
_TASK_FIELDS = ("task", "reduce_zero_label")
"""Written only for non-classification sets, so classification manifests keep their exact bytes."""
REPORT = "report.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def done_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".done"


def encode_index(offsets: list[int] | np.ndarray) -> bytes:
    return np.asarray(offsets, dtype="<i8").tobytes()


def decode_index(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i8")


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    index_sha256: str = ""


@dataclass
class Manifest:
    num_samples: int
    classes: list[str]
    """Label id -> class name (position = id)."""
    label_source: str
    """'imagenet22k_synsets' (timm's 21,841-synset order), 'sorted' or 'list'."""
    shards: list[ShardInfo]
    build: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    format: str = FORMAT
    task: str = CLASSIFICATION
    """What a sample holds: 'classification' (jpg + cls) or 'segmentation' (jpg + png mask). Manifests
    without the field (older builds) are classification sets."""
    reduce_zero_label: bool = False
    """Segmentation: mask value 0 means "other" and is ignored (0 -> 255, k -> k - 1, ADE20K's
    convention); ``classes`` then names the reduced ids, so ``classes[0]`` is mask value 1."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        data = asdict(self)
        data["num_classes"] = self.num_classes
        if self.task == CLASSIFICATION:
            for key in _TASK_FIELDS:
                data.pop(key)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}; "
                             "build shards with `data-tools make-shards`")
        data.pop("num_classes", None)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        return cls(**data)


def read_manifest(url: str, storage_cfg: StorageConfig | None = None) -> Manifest:
    """The manifest of a shard set; a clear error when the URL holds no (complete) shard set."""
    path = storage.join(url, MANIFEST)
    try:
        text = storage.read_bytes(path, storage_cfg).decode()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {MANIFEST} at {url}: not a shard set, or its build did not finish "
            "(re-run `data-tools make-shards` to complete it)") from None
    return Manifest.from_json(text, where=path)


def read_index(url: str, tar_name: str, storage_cfg: StorageConfig | None = None) -> np.ndarray:
    return decode_index(storage.read_bytes(storage.join(url, index_name(tar_name)), storage_cfg))


def load_synsets(name: str) -> list[str]:
    """One of timm's shipped synset lists ('imagenet22k_synsets', 'imagenet_synsets', ...).

    Read from timm's package directory without importing timm (which would import torch: seconds
    per CLI call for one text file).
    """
    import importlib.util
    import os

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        raise FileNotFoundError("timm is not installed; it ships the ImageNet synset lists")
    path = os.path.join(os.path.dirname(spec.origin), "data", "_info", f"{name}.txt")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]
