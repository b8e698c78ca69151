"""Convert an image dataset into the shard set format of :mod:`pretrain.data.shards`, resumably.

Why this is more than ``webdataset.ShardWriter``: at ImageNet-22k scale (14.2M images, ~1.3 TB) the
conversion runs for hours on many machines, so it has to (1) mix classes in every shard (a seeded
global shuffle before sharding; per-class source tars would otherwise give single-class shards),
(2) survive bad inputs (skipped and counted by reason in ``report.json``, never aborting the job),
(3) resume after interruption, and (4) record the ``.idx`` sample offsets that exact mid-epoch resume
in training relies on. Tars are written with :mod:`tarfile` exactly as ``webdataset.TarWriter`` would
(USTAR, members in sorted extension order, owner ``bigdata``, mode 0444) but with a fixed mtime;
TarWriter itself is not used because importing webdataset imports torch, which costs every pool/Ray
worker seconds and hundreds of MB for ten lines of tarfile calls. The tests read the result back with
``webdataset.WebDataset``.

Determinism and resume. The plan -- listing, shuffle, split, keys, label ids -- is a pure function of
the source listing and the build parameters (seed, split sizes, max side, JPEG quality), and is hashed
per shard and as a whole. Tars carry a fixed mtime (0) and owner, and nothing written (tars, ``.idx``,
``.done``, manifest, report) contains a timestamp, host or worker count, so re-running the same
command keeps complete shards (those with a ``.done`` record of the same plan), builds the missing
ones, and ends byte-identical to a single clean run. A destination holding shards of a different
plan is refused rather than mixed. The manifest is written last; its presence means "complete".

Per sample: ``__key__`` = position in the shuffled order (``%09d``), ``jpg`` = the original bytes for
JPEG inputs (re-encoded at quality 95 only for other formats or when ``max_side`` shrinks the image),
``cls`` = ASCII label id, ``json`` = ``{"class": name, "source": name relative to the source root}``.
Every input is fully decoded once to reject truncated or corrupt files.

Segmentation (``task="segmentation"``, from :func:`data_tools.sources.list_segmentation`): per sample
``jpg`` as above, ``png`` = the 8-bit label mask (the original bytes for an 8-bit greyscale PNG of the
image's size, else re-encoded; resized nearest-neighbour with the image under ``max_side``) and
``json`` = ``{"source", "mask", "h", "w"}``, no ``cls``. A mask that does not decode or is not 8-bit
(``bad_mask``), is not the image's size (``mask_size_mismatch``) or holds values beyond the class list
other than 255 (``bad_label``) skips the sample. Without a class list, every shard's ``.done`` records
its largest mask value and the manifest names ``class_<value>`` up to the largest of all.

Parallelism: a local process pool by default, or Ray tasks (``--ray``), each task building one shard
from the source URL and writing it straight to the destination; reads inside a task are overlapped
with a small thread pool because object-store latency, not CPU, dominates per-image reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_tools.sources import (InputError, Item, Listing, UnreadableMember, list_segmentation, list_source,
                                read_item)
from pretrain import storage
from pretrain.config import StorageConfig
from pretrain.data import shards
from pretrain.data.decode import UndecodableImage, open_image, to_rgb
from pretrain.data.reader import SKIP_BAD_LABEL

DEFAULT_SHARD_SAMPLES = 10_000
DEFAULT_SHARD_BYTES = 1_000_000_000
JPEG_QUALITY = 95
TAR_OVERHEAD = 2048
"""Estimated tar bytes per sample besides the image (3 headers, padding, cls, json)."""
READ_AHEAD = 16
"""Concurrent reads per shard task."""

SKIP_UNREADABLE = "unreadable"
SKIP_UNREADABLE_MEMBER = "unreadable_tar_member"
SKIP_MASK_SIZE = "mask_size_mismatch"
SEGMENTATION = "segmentation"


class ShardBuildError(RuntimeError):
    """Some shards could not be built (storage errors); re-running resumes with those."""


@dataclass(frozen=True)
class BuildParams:
    """Everything that determines the bytes of the output (and nothing that does not)."""

    seed: int = 0
    shard_samples: int = DEFAULT_SHARD_SAMPLES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_side: int = 0
    jpeg_quality: int = JPEG_QUALITY

    def check(self) -> None:
        if self.shard_samples < 1 or self.shard_bytes < 1:
            raise InputError(f"--shard-samples and --shard-bytes must be >= 1, got "
                             f"{self.shard_samples} and {self.shard_bytes}")
        if self.max_side < 0:
            raise InputError(f"--max-side must be >= 0 (0 keeps sizes), got {self.max_side}")


@dataclass
class ShardTask:
    name: str
    dest: str
    keys: list[int]
    items: list[Item]
    labels: list[int]
    params: BuildParams
    shard_sha256: str
    """Hash of this shard's planned items + build parameters."""
    plan_sha256: str
    """Hash of the whole plan; every .done of one shard set carries the same value."""
    storage_cfg: StorageConfig | None = None
    mask_limit: int = 255
    """Segmentation: mask values from here up, except 255, are bad labels."""


@dataclass
class ShardSetPlan:
    listing: Listing
    tasks: list[ShardTask]
    params: BuildParams
    sha256: str
    build: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Planning


def plan_shards(listing: Listing, params: BuildParams, dest: str,
                storage_cfg: StorageConfig | None = None) -> ShardSetPlan:
    """Seeded global shuffle, then split by sample count or estimated bytes, whichever comes first."""
    order = np.random.default_rng(params.seed).permutation(len(listing.items))
    groups: list[list[int]] = [[]]
    nbytes = 0
    for position in range(len(order)):
        item = listing.items[order[position]]
        cost = item.size + (item.mask.size if item.mask else 0) + TAR_OVERHEAD
        if groups[-1] and (len(groups[-1]) >= params.shard_samples or nbytes + cost > params.shard_bytes):
            groups.append([])
            nbytes = 0
        groups[-1].append(position)
        nbytes += cost
    params_json = json.dumps({"format": shards.FORMAT, **asdict(params)}, sort_keys=True)
    whole = hashlib.sha256(params_json.encode())
    labelling = [listing.label_source, listing.classes, listing.skipped]
    if listing.task != "classification":  # classification plans keep the hashes they always had
        labelling += [listing.task, listing.reduce_zero_label]
    whole.update(json.dumps(labelling).encode())
    mask_limit = len(listing.classes) + listing.reduce_zero_label if listing.classes else 255
    tasks = []
    for index, positions in enumerate(groups):
        items = [listing.items[order[p]] for p in positions]
        labels = [listing.label(it) for it in items]
        digest = hashlib.sha256(params_json.encode())
        for key, item, label in zip(positions, items, labels):
            mask = f"\t{item.mask.name}\t{item.mask.size}" if item.mask else ""
            digest.update(f"{key}\t{item.name}\t{item.offset}\t{item.size}\t{label}{mask}\n".encode())
        whole.update(digest.digest())
        tasks.append(ShardTask(shards.shard_name(index), dest, list(positions), items, labels, params,
                               digest.hexdigest(), "", storage_cfg, mask_limit))
    plan_sha = whole.hexdigest()
    for task in tasks:
        task.plan_sha256 = plan_sha
    return ShardSetPlan(listing, tasks, params, plan_sha)


# --------------------------------------------------------------------------------------------------
# Building one shard (runs in pool processes and Ray tasks)


def prepare_image(data: bytes, max_side: int = 0, quality: int = JPEG_QUALITY) -> bytes:
    """Bytes to store as ``jpg``: the input itself for JPEGs within `max_side`, else a re-encode."""
    return _fit(open_image(data), data, max_side, quality)[0]


def _fit(image: Image.Image, data: bytes, max_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """:func:`prepare_image` of an opened image, and the upright (w, h) its bytes decode to."""
    if image.format == "JPEG" and (not max_side or max(image.size) <= max_side):
        return data, _upright_size(image)
    rgb = to_rgb(image)
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), rgb.size


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(w, h) after the EXIF orientation that decode_rgb applies (tags 5-8 turn the image by 90 degrees)."""
    w, h = image.size
    return (h, w) if image.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def prepare_segmentation(image_data: bytes, mask_data: bytes, max_side: int = 0, quality: int = JPEG_QUALITY,
                         mask_limit: int = 255) -> tuple[bytes, bytes, tuple[int, int], int]:
    """(jpg bytes, png mask bytes, stored (w, h), largest mask value other than 255) of one pair; raises
    :class:`UndecodableImage` with the skip reason. The mask must have the size of the upright image (as
    the training decoder sees it) and values below `mask_limit` (or 255)."""
    from pretrain.data.segmentation import IGNORE, REASON_BAD_MASK, open_mask  # torch: segmentation only

    image = open_image(image_data)
    try:
        mask = open_mask(mask_data)
    except UndecodableImage as exc:
        raise UndecodableImage(REASON_BAD_MASK, str(exc)) from None
    size = _upright_size(image)
    if mask.size != size:
        raise UndecodableImage(SKIP_MASK_SIZE, f"mask {mask.size}, image {size}")
    values = np.asarray(mask)
    top = int(np.where(values == IGNORE, 0, values).max(initial=0))
    if top >= mask_limit:
        raise UndecodableImage(SKIP_BAD_LABEL, f"mask value {top}, classes end at {mask_limit - 1}")
    jpg, stored = _fit(image, image_data, max_side, quality)
    if stored == size and mask.format == "PNG" and mask.mode == "L":
        return jpg, mask_data, stored, top
    buf = io.BytesIO()
    Image.fromarray(values).resize(stored, Image.NEAREST).save(buf, format="PNG")
    return jpg, buf.getvalue(), stored, top


def _members(task: ShardTask, item: Item, label: int,
             data: bytes | tuple[bytes, bytes]) -> tuple[list[tuple[str, bytes]], int]:
    """The (extension, bytes) members of one sample, in sorted extension order, and its largest mask
    value (-1 for classification); raises :class:`UndecodableImage` with the skip reason."""
    params = task.params
    if item.mask is None:
        meta = json.dumps({"class": item.class_name, "source": item.name}).encode()
        jpg = prepare_image(data, params.max_side, params.jpeg_quality)
        return [("cls", str(label).encode()), ("jpg", jpg), ("json", meta)], -1
    jpg, png, (w, h), top = prepare_segmentation(*data, params.max_side, params.jpeg_quality, task.mask_limit)
    meta = json.dumps({"source": item.name, "mask": item.mask.name, "h": h, "w": w}).encode()
    return [("jpg", jpg), ("json", meta), ("png", png)], top


def _read(item: Item, storage_cfg: StorageConfig | None) -> bytes | tuple[bytes, bytes] | Exception:
    """Item bytes (with its mask's, for segmentation), or the exception that marks it as a bad input.
    Storage errors on remote sources (throttling, network) propagate: they fail the shard, which a
    re-run rebuilds, instead of silently dropping images from the data set."""
    try:
        data = read_item(item, storage_cfg)
        return data if item.mask is None else (data, read_item(item.mask, storage_cfg))
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnreadableMember) as exc:
        return exc
    except OSError as exc:
        if storage.is_remote(item.url):
            raise
        return exc


def _prefetch(items: list[Item], storage_cfg: StorageConfig | None) -> Iterator[bytes | Exception]:
    """Item bytes in order, with up to 2 x READ_AHEAD reads in flight."""
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        pending: deque[Future] = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(_read, item, storage_cfg))
            if len(pending) >= 2 * READ_AHEAD:
                break
        while pending:
            result = pending.popleft().result()
            item = next(it, None)
            if item is not None:
                pending.append(pool.submit(_read, item, storage_cfg))
            yield result


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
    tar.addfile(info, io.BytesIO(data))


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard's tar, .idx and (last) .done record to the destination; returns the record."""
    skipped: list[tuple[str, str]] = []
    offsets: list[int] = []
    top = -1
    with tempfile.TemporaryDirectory(prefix="make-shards-") as tmp:
        tar_path = os.path.join(tmp, task.name)
        with open(tar_path, "wb") as f, \
                tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, item, label, data in zip(task.keys, task.items, task.labels,
                                              _prefetch(task.items, task.storage_cfg)):
                if isinstance(data, Exception):
                    reason = SKIP_UNREADABLE_MEMBER if isinstance(data, UnreadableMember) else SKIP_UNREADABLE
                    skipped.append((reason, item.name))
                    continue
                try:
                    members, sample_top = _members(task, item, label, data)
                except UndecodableImage as exc:
                    skipped.append((exc.reason, item.name))
                    continue
                offsets.append(tar.offset)
                top = max(top, sample_top)
                for ext, blob in members:
                    _add_member(tar, f"{key:09d}.{ext}", blob)
            offsets.append(tar.offset)
        index = shards.encode_index(offsets)
        record = {
            "shard": task.name,
            "num_samples": len(offsets) - 1,
            "bytes": os.path.getsize(tar_path),
            "sha256": storage.sha256_file(tar_path),
            "index_sha256": hashlib.sha256(index).hexdigest(),
            "skipped": skipped,
            "shard_sha256": task.shard_sha256,
            "plan_sha256": task.plan_sha256,
            "params": asdict(task.params),
        }
        if task.items and task.items[0].mask is not None:
            record["max_mask_value"] = top
        storage.upload_file(tar_path, storage.join(task.dest, task.name), task.storage_cfg)
    storage.write_bytes(storage.join(task.dest, shards.index_name(task.name)), index, task.storage_cfg)
    storage.write_bytes(storage.join(task.dest, shards.done_name(task.name)),
                        json.dumps(record, indent=1).encode(), task.storage_cfg)
    return record


# --------------------------------------------------------------------------------------------------
# Running many shards: local process pool or Ray


class Executor:
    """Ordered `map` and as-completed `run` over a process pool (default) or Ray tasks (`--ray`)."""

    def __init__(self, workers: int, ray_address: str | None = None) -> None:
        self.workers, self.ray_address = max(1, workers), ray_address
        self._pool: ProcessPoolExecutor | None = None
        self._ray_started = False

    def __enter__(self) -> "Executor":
        if self.ray_address is not None:
            import ray

            if not ray.is_initialized():
                # "local": a new Ray on this machine, never one that a stale /tmp/ray file points at
                kwargs: dict[str, Any] = {"address": self.ray_address or "local", "include_dashboard": False,
                                          "logging_level": logging.WARNING, "log_to_driver": False}
                if not self.ray_address:
                    kwargs["num_cpus"] = self.workers
                ray.init(**kwargs)
                self._ray_started = True
        elif self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._ray_started:
            import ray

            ray.shutdown()

    def map(self, fn: Callable, args: Iterable) -> Iterator:
        args = list(args)
        if self.ray_address is not None:
            import ray

            remote = ray.remote(num_cpus=1)(fn)
            return iter(ray.get([remote.remote(a) for a in args]))
        if self._pool is not None and len(args) > 1:
            return self._pool.map(fn, args, chunksize=max(1, len(args) // (8 * self.workers)))
        return map(fn, args)

    def run(self, fn: Callable, args: list) -> Iterator[tuple[int, Any]]:
        """(position, result or exception) as tasks complete."""
        if self.ray_address is not None:
            import ray

            remote = ray.remote(num_cpus=1, max_retries=2)(fn)
            pending = {remote.remote(a): i for i, a in enumerate(args)}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                try:
                    yield i, ray.get(ready[0])
                except Exception as exc:  # report and keep going; a re-run resumes
                    yield i, exc
            return
        if self._pool is None:
            for i, a in enumerate(args):
                try:
                    yield i, fn(a)
                except Exception as exc:
                    yield i, exc
            return
        futures = {self._pool.submit(fn, a): i for i, a in enumerate(args)}
        for fut in as_completed(futures):
            exc = fut.exception()
            yield futures[fut], exc if exc is not None else fut.result()


# --------------------------------------------------------------------------------------------------
# The whole build


def make_shards(src: str, dest: str, *, source_type: str = "auto", labels: str = "auto",
                params: BuildParams = BuildParams(), workers: int = 0, ray_address: str | None = None,
                storage_cfg: StorageConfig | None = None, progress: bool = True,
                log: Callable[[str], None] = print, task: str = "classification", split: str = "training",
                classes_file: str = "", reduce_zero_label: bool | None = None) -> shards.Manifest:
    """Build (or finish building) the shard set at `dest` from `src`; returns its manifest.

    ``task="segmentation"`` pairs images with label masks (an ADE20K root's `split`, or a list file);
    `classes_file` and `reduce_zero_label` (default: on for the ADE layout) as in
    :func:`data_tools.sources.list_segmentation`; `labels` is then unused."""
    params.check()
    if not storage.is_remote(src):
        src = os.path.abspath(src.split("://", 1)[-1])
    workers = workers or len(os.sched_getaffinity(0))
    with Executor(workers, ray_address) as executor:
        if task == SEGMENTATION:
            listing = list_segmentation(src, source_type, split, classes_file, reduce_zero_label, storage_cfg)
        elif task == "classification":
            listing = list_source(src, source_type, labels, storage_cfg, map_fn=executor.map)
        else:
            raise InputError(f"--task must be classification or segmentation, got {task!r}")
        storage.ensure_bucket(dest, storage_cfg)
        storage.makedirs(dest, storage_cfg)
        plan = plan_shards(listing, params, dest, storage_cfg)
        plan.build = {"source": src, "source_type": listing.source_type, "labels": labels,
                      **asdict(params), "num_items": len(listing.items), "plan_sha256": plan.sha256}
        if task == SEGMENTATION:
            plan.build.update(task=task, split=split if listing.source_type == "ade" else "",
                              reduce_zero_label=listing.reduce_zero_label)
        records = _completed(plan, dest, storage_cfg)
        todo = [t for t in plan.tasks if t.name not in records]
        done_items = sum(len(t.items) for t in plan.tasks if t.name in records)
        classes = (f"{len(listing.classes):,} classes" if listing.classes or task != SEGMENTATION
                   else "classes from the masks")
        log(f"{len(listing.items):,} {'image/mask pairs' if task == SEGMENTATION else 'images'} in {classes} "
            f"({listing.label_source}) -> {len(plan.tasks)} shards at {dest}; "
            f"{len(plan.tasks) - len(todo)} already complete")
        failures: list[str] = []
        with tqdm(total=len(listing.items), initial=done_items, unit="img", unit_scale=True,
                  desc="make-shards", disable=not progress, smoothing=0.05) as bar:
            for i, result in executor.run(build_shard, todo):
                shard = todo[i]
                if isinstance(result, Exception):
                    failures.append(f"{shard.name}: {type(result).__name__}: {result}")
                else:
                    records[shard.name] = result
                bar.update(len(shard.items))
    if failures:
        raise ShardBuildError(f"{len(failures)} of {len(plan.tasks)} shards failed (first: {failures[0]}); "
                              "re-run the same command to build them (complete shards are kept)")
    return _finish(plan, records, dest, storage_cfg)


def _completed(plan: ShardSetPlan, dest: str, storage_cfg: StorageConfig | None) -> dict[str, dict[str, Any]]:
    """.done records of shards that are complete under this plan; refuses a different plan's shards."""
    present = set(storage.listdir(dest, storage_cfg))
    planned = {t.name: t for t in plan.tasks}
    if shards.MANIFEST in present:
        old = json.loads(storage.read_bytes(storage.join(dest, shards.MANIFEST), storage_cfg))
        if old.get("build", {}).get("plan_sha256") != plan.sha256:
            _refuse(dest, old.get("build", {}), plan.build)
    stale = sorted(n for n in present if ".tmp-" in n)  # local temp files of an interrupted write
    for name in stale:
        storage.remove_tree(storage.join(dest, name), storage_cfg)
    present -= set(stale)
    foreign = sorted(n for n in present if n.startswith("shard-") and n.split(".")[0] + ".tar" not in planned)
    if foreign:
        _refuse(dest, {}, plan.build, f"it holds {foreign[0]} which this plan ({len(planned)} shards) "
                                      "does not produce")
    records = {}
    for name, task in planned.items():
        if shards.done_name(name) not in present:
            continue
        record = json.loads(storage.read_bytes(storage.join(dest, shards.done_name(name)), storage_cfg))
        if record.get("plan_sha256") != plan.sha256:
            _refuse(dest, record.get("params", {}), asdict(plan.params))
        if (record.get("shard_sha256") == task.shard_sha256 and name in present
                and shards.index_name(name) in present):
            records[name] = record
    return records


def _refuse(dest: str, old: dict[str, Any], new: dict[str, Any], why: str = "") -> None:
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) & set(new))
             if old.get(k) != new.get(k) and k not in ("plan_sha256", "source")]
    detail = why or (f"differences: {', '.join(diffs)}" if diffs else "the source listing differs")
    raise InputError(f"{dest} already holds shards from a different build plan ({detail}); "
                     "re-run with the original source and parameters to resume it, or choose an empty "
                     "destination")


def _finish(plan: ShardSetPlan, records: dict[str, dict[str, Any]], dest: str,
            storage_cfg: StorageConfig | None) -> shards.Manifest:
    skipped = list(plan.listing.skipped)
    for task in plan.tasks:
        skipped += [tuple(s) for s in records[task.name]["skipped"]]
    counts = dict(sorted(Counter(reason for reason, _ in skipped).items()))
    by_reason: dict[str, list[str]] = {}
    for reason, name in sorted(skipped):
        by_reason.setdefault(reason, []).append(name)
    infos = [shards.ShardInfo(t.name, records[t.name]["num_samples"], records[t.name]["bytes"],
                              records[t.name]["sha256"], records[t.name]["index_sha256"]) for t in plan.tasks]
    classes = plan.listing.classes
    if plan.listing.task == SEGMENTATION and not classes:  # named by mask value, up to the largest seen
        top = max(records[t.name].get("max_mask_value", -1) for t in plan.tasks)
        classes = [f"class_{v}" for v in range(int(plan.listing.reduce_zero_label), top + 1)]
    manifest = shards.Manifest(num_samples=sum(s.num_samples for s in infos), classes=classes,
                               label_source=plan.listing.label_source, shards=infos, build=plan.build,
                               skipped=counts, task=plan.listing.task,
                               reduce_zero_label=plan.listing.reduce_zero_label)
    report = {"source": plan.build["source"], "num_items": len(plan.listing.items),
              "num_samples": manifest.num_samples, "skipped": counts, "skipped_items": by_reason}
    storage.write_bytes(storage.join(dest, shards.REPORT), json.dumps(report, indent=1).encode(), storage_cfg)
    storage.write_bytes(storage.join(dest, shards.MANIFEST), manifest.to_json().encode(), storage_cfg)
    return manifest
