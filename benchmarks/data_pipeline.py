"""Data: S3-streamed decode + augment per DataLoader worker ÷ torchvision ImageFolder from local disk.

Both sides decode the *same* JPEGs (``data_tools.synth`` images at 384 px, written once to a local
ImageFolder and, byte for byte, into shards in the moto S3 server by ``data_tools.make_shards``) and
apply the *same* transform: the 22k recipe's timm train transform (``build_train_transform`` of
``configs/convnext_xlarge_in22k.toml``: RandomResizedCrop 224 bicubic, flip, RandAugment
rand-m9-mstd0.5-inc1, RandomErasing 0.25), batched by 32.

* A: ``pretrain.data.loader.TrainLoader`` over ``s3://`` (ranged GETs of each shuffle window,
  per-sample seeded augmentation, forkserver worker), ``num_workers=1``;
* B: ``torchvision.datasets.ImageFolder`` + ``torch.utils.data.DataLoader(shuffle=True,
  num_workers=1)`` reading the files from local disk.

Each repetition starts a fresh iterator on each side (alternating A, B), lets 2 batches pass (worker
start-up and the prefetch queue filling are not per-sample costs) and times the next K batches, by
which point the consumer waits on the single worker, so the figure is that worker's rate. The
ratio is rate(A) ÷ rate(B) per pair.

"CPU cores per GPU" = (images/s one GPU trains) ÷ (images/s one loader worker delivers). The GPU
rate is measured when the MFU benchmark ran on a GPU in the same run; otherwise it is timm's
published RTX 3090 AMP figure for convnext_xlarge (116 img/s), labelled as an anchor.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterator

from benchmarks.harness import ANCHOR, MEASURED, Context, Goal, PairStats, Row, fmt_s
from benchmarks.mfu import ANCHOR_IMG_S

NAME = "data_pipeline"
IMAGE_PX = 384
BATCH = 32
CLASSES = 10
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "convnext_xlarge_in22k.toml")


def plan(ctx: Context) -> list[Row]:
    return [
        Row("data/s3-vs-imagefolder", NAME, "decode + augment images/s per DataLoader worker (224 px, 22k recipe "
            "transform, batch 32)", Goal(">=", 1.0), sides="TrainLoader from S3 ÷ ImageFolder from local disk"),
        Row("data/per-worker-img-s", NAME, "TrainLoader images/s per worker (one core)", Goal(""),
            kind="value", unit="img/s"),
        Row("data/cores-per-gpu", NAME, "CPU cores per GPU the 22k recipe needs (GPU img/s ÷ img/s per core)",
            Goal("<=", 10.0, note="(recipe: launch.cpus_per_worker = 10)"), kind="value", unit="cores"),
    ]


def _dataset(ctx: Context, images: int) -> tuple[str, str, object]:
    """(local ImageFolder, s3 URL of its shards, manifest); built once per run."""
    if "data_set" in ctx.shared:
        return ctx.shared["data_set"]
    import uuid

    from data_tools.make_shards import BuildParams, make_shards
    from data_tools.synth import make_dataset
    from pretrain import storage

    ctx.s3()
    root = os.path.join(ctx.workdir, "synth")
    t0 = time.perf_counter()
    make_dataset(root, classes=CLASSES, per_class=images // CLASSES, size=IMAGE_PX, seed=0,
                 workers=ctx.threads)
    url = f"s3://bench-data-{uuid.uuid4().hex[:8]}/train"
    storage.ensure_bucket(url)
    manifest = make_shards(root, url, params=BuildParams(shard_samples=64), workers=ctx.threads,
                           progress=False, log=lambda _: None)
    ctx.log(f"    data: {images} JPEGs of {IMAGE_PX}px -> {len(manifest.shards)} shards at {url} "
            f"in {time.perf_counter() - t0:.0f}s")
    ctx.shared["data_set"] = (root, url, manifest)
    return root, url, manifest


def _data_config(url: str):
    from pretrain.config import load_config

    cfg = load_config(RECIPE, [f"data.train_url={url}", "data.num_workers=1", f"data.micro_batch_size={BATCH}",
                               "data.shuffle_window=256", "data.prefetch_factor=2"])
    return cfg.data


def _timed_batches(make_iter: Callable[[], Iterator], skip: int, count: int) -> Callable[[], float]:
    """A timer-style callable: fresh iterator, skip `skip` batches, return seconds for the next `count`."""

    def measure() -> float:
        it = make_iter()
        for _ in range(skip):
            next(it)
        start = time.perf_counter()
        for _ in range(count):
            next(it)
        elapsed = time.perf_counter() - start
        del it  # shuts the worker down
        return elapsed

    return measure


def run(ctx: Context, rows: dict[str, Row]) -> None:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from pretrain.data.loader import TrainLoader
    from pretrain.data.transforms import build_train_transform

    images = 320
    count = 3 if ctx.quick else 6
    reps = ctx.pairs(5, 7)
    root, url, manifest = _dataset(ctx, images)
    cfg = _data_config(url)
    loader = TrainLoader(url, manifest, cfg, None, rank=0, world_size=1, seed=0, num_classes=CLASSES)
    folder = ImageFolder(root, transform=build_train_transform(cfg))
    gen = torch.Generator().manual_seed(0)

    def ours() -> Iterator:
        return iter(loader)

    def theirs() -> Iterator:
        return iter(DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=1, drop_last=True,
                               prefetch_factor=2, generator=gen))

    a = _timed_batches(ours, skip=2, count=count)
    b = _timed_batches(theirs, skip=2, count=count)
    a(), b()  # warm-up: page cache, forkserver, S3 connections
    a_s, b_s = [], []
    for i in range(reps):
        a_s.append(a())
        b_s.append(b())
        ctx.log(f"    pair {i + 1}/{reps}: S3 TrainLoader {BATCH * count / a_s[-1]:.1f} img/s, "
                f"ImageFolder {BATCH * count / b_s[-1]:.1f} img/s")
    stats = PairStats(b_s, a_s)  # ratio of rates = t_B / t_A
    row = rows["data/s3-vs-imagefolder"]
    row.set_pairs(stats)
    rate_a = BATCH * count / stats.b_median
    rate_b = BATCH * count / stats.a_median
    row.context = (f"S3 TrainLoader {rate_a:.1f} img/s/worker, ImageFolder {rate_b:.1f} img/s/worker "
                   f"({BATCH * count} images timed per rep; {IMAGE_PX}px JPEGs, mean "
                   f"{sum(s.bytes for s in manifest.shards) / manifest.num_samples / 1024:.0f} KiB incl. tar)")
    row.detail = {"pairs_rate_ratio": stats.ratios, "s3_s": a_s, "imagefolder_s": b_s,
                  "images_per_rep": BATCH * count, "jpeg_px": IMAGE_PX}
    per = rows["data/per-worker-img-s"]
    per.value, per.status = rate_a, MEASURED
    per.context = f"median over {reps} reps of {BATCH * count} images; 1 worker process = 1 core"
    ctx.shared["data_img_s_per_core"] = rate_a
    cores = rows["data/cores-per-gpu"]
    gpu_rate = ctx.shared.get("gpu_img_s")
    if gpu_rate:
        cores.value, cores.status = gpu_rate / rate_a, MEASURED
        cores.context = f"GPU {gpu_rate:.0f} img/s measured in this run (MFU row) ÷ {rate_a:.1f} img/s per core"
    else:
        cores.value, cores.status = ANCHOR_IMG_S / rate_a, ANCHOR
        cores.context = (f"anchor {ANCHOR_IMG_S:.0f} img/s/GPU (timm RTX 3090 AMP convnext_xlarge; not measured "
                         f"here) ÷ {rate_a:.1f} img/s per core measured here")
    ctx.log(f"    S3 {rate_a:.1f} img/s, ImageFolder {rate_b:.1f} img/s, ratio {stats.ratio:.3f}; "
            f"{fmt_s(stats.b_median)} per {count} batches")
