"""Data: S3-streamed decode + augment per DataLoader worker ÷ torchvision ImageFolder from local disk.

Both sides decode the *same* JPEGs (``data_tools.synth`` images at 384 px, written once to a local
ImageFolder and, byte for byte, into shards in the moto S3 server by ``data_tools.make_shards``) with
the *same* augmentation, the 22k recipe's timm train transform (``configs/convnext_xlarge_in22k.toml``:
RandomResizedCrop 224 bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, RandomErasing 0.25), batched by
32, and each side ends where the batch is ready for the model:

* A, the product path: ``pretrain.data.loader.TrainLoader`` over ``s3://`` (ranged GETs of each
  shuffle window, per-sample seeded augmentation, forkserver worker, ``num_workers=1``) collating uint8
  (N, H, W, 3) crops, then ``DeviceAugment`` (normalize + RandomErasing) in the consuming process, as
  the trainer runs it on its device (here the CPU; on a GPU this part is device work);
* B, the baseline: ``torchvision.datasets.ImageFolder`` + ``torch.utils.data.DataLoader(num_workers=1)``
  from local disk with the same transform ending in ``ToTensor`` + ``Normalize`` + ``RandomErasing``
  in the worker, collating fp32 (N, 3, H, W) (the torchvision reference recipe; timm's own train.py
  with its CUDA prefetcher normalizes on the GPU too).

The figure is what one worker costs the host in **CPU seconds** per image (so images per core): the
CPU time of the processes the side started (its DataLoader worker with its threads; for A also the
idle forkserver) plus the consuming thread's (receiving the batches), read from ``/proc``. A's
DeviceAugment is applied to every batch but its thread time is kept apart: it is device work (on a GPU
node it costs no CPU), while B's normalization runs on the CPU on any node; the ratio with it counted
(what a CPU-only run pays) is in the context, next to the wall-clock rates of the same repetitions.
CPU time does not grow while a process waits for a core, so a load burst on the shared host does not
land on one side of a pair, which wall-clock rates suffer from. The moto server's CPU is not counted (on
a cluster S3 runs elsewhere; here it still competes for the two cores, as the wall-clock rates show).

Both iterators are started once and kept (worker start-up is not a per-sample cost); each repetition
first takes the batches the side's idle worker had prefetched, then measures the next 16 batches (8
with ``--quick``; 16 include two shuffle-window reads on A's side), alternating A, B after 3 warm-up
pairs. The consumer runs one torch thread.
Ratio = B's CPU seconds ÷ A's per pair, i.e. rate(A) ÷ rate(B). The context also gives the CPU time
per image of the work both sides share (decode + augmentation to uint8, in-process) and so the
ratio no loader could pass against this baseline (B's cost ÷ that).

"CPU cores per GPU" = (images/s one GPU trains) ÷ (images/s one loader worker delivers). The GPU
rate is measured when the MFU benchmark ran on a GPU in the same run; otherwise it is timm's
published RTX 3090 AMP figure for convnext_xlarge (116 img/s), labelled as an anchor.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any, Callable, Iterator

from benchmarks.harness import ANCHOR, MEASURED, Context, Goal, PairStats, Row, alternate, fmt_s
from benchmarks.mfu import ANCHOR_IMG_S

NAME = "data_pipeline"
IMAGE_PX = 384
IMAGES = 512
"""Two shuffle windows of 256 (64 per class), one ImageFolder epoch of 16 batches."""
BATCH = 32
CLASSES = 8
PREFETCH = 2
RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "convnext_xlarge_in22k.toml")


def plan(ctx: Context) -> list[Row]:
    return [
        Row("data/s3-vs-imagefolder", NAME, "decode + augment images/s per DataLoader worker (224 px, 22k recipe "
            "transform, batch 32; ours: uint8 batches + DeviceAugment)", Goal(">=", 1.3),
            sides="TrainLoader from S3 ÷ ImageFolder from local disk"),
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
    ctx.log(f"    data: {manifest.num_samples} JPEGs of {IMAGE_PX}px -> {len(manifest.shards)} shards at {url} "
            f"in {time.perf_counter() - t0:.0f}s")
    ctx.shared["data_set"] = (root, url, manifest)
    return root, url, manifest


def _data_config(url: str):
    from pretrain.config import load_config

    cfg = load_config(RECIPE, [f"data.train_url={url}", "data.num_workers=1", f"data.micro_batch_size={BATCH}",
                               "data.shuffle_window=256", f"data.prefetch_factor={PREFETCH}"])
    return cfg.data


class _Side:
    """One loader kept running, with the processes it started. `rep()` returns a repetition's host CPU
    seconds; the thread time of `device_step` (the part that runs on the training device) is kept apart."""

    def __init__(self, start: Callable[[], Iterator], device_step: Callable[[Any], Any], count: int):
        import psutil

        me = psutil.Process()
        before = {p.pid for p in me.children(recursive=True)}
        self.batches, self.device_step, self.count = start(), device_step, count
        next(self.batches)  # worker start-up, S3 connections, page cache
        self.procs = [p for p in me.children(recursive=True) if p.pid not in before]
        self.wall_s: list[float] = []
        self.device_s: list[float] = []

    def _cpu_s(self) -> float:
        return time.thread_time() + sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def _take(self) -> float:
        batch = next(self.batches)
        start = time.thread_time()
        self.device_step(batch)
        return time.thread_time() - start

    def rep(self) -> float:
        for _ in range(PREFETCH):  # ready while the other side ran
            self._take()
        cpu, wall = self._cpu_s(), time.perf_counter()
        device = sum(self._take() for _ in range(self.count))
        self.wall_s.append(time.perf_counter() - wall)
        self.device_s.append(device)
        return self._cpu_s() - cpu - device


def _shared_work_s(folder, transform: Callable, images: int = 256) -> float:
    """CPU seconds per image of the work both sides do alike (JPEG decode + the recipe's augmentation up
    to uint8), in this thread: what a loader that cost nothing else would spend per image."""
    from pretrain.data.decode import decode_rgb

    start = time.thread_time()
    for path, _ in folder.samples[:images]:
        with open(path, "rb") as f:
            transform(decode_rgb(f.read()))
    return (time.thread_time() - start) / images


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(ctx: Context, rows: dict[str, Row]) -> None:
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    from pretrain.data.loader import TrainLoader
    from pretrain.data.transforms import DeviceAugment, build_train_transform
    from pretrain.tasks import ClassDecoder

    count = 8 if ctx.quick else 16
    reps = ctx.pairs(5, 9)
    root, url, manifest = _dataset(ctx, IMAGES)
    cfg = _data_config(url)
    loader = TrainLoader(url, manifest, cfg, None, rank=0, world_size=1, seed=0,
                         decoder=ClassDecoder.of(cfg, CLASSES, train=True))
    augment = DeviceAugment(cfg, torch.device("cpu"))
    folder = ImageFolder(root, transform=build_train_transform(cfg))
    sampler = RandomSampler(folder, num_samples=1 << 40, generator=torch.Generator().manual_seed(0))  # endless
    ours = theirs = None
    try:
        with _torch_threads(1):
            ours = _Side(lambda: iter(loader), lambda batch: augment(batch.image), count)
            theirs = _Side(lambda: iter(DataLoader(folder, batch_size=BATCH, sampler=sampler, num_workers=1,
                                                   drop_last=True, prefetch_factor=PREFETCH)),
                           lambda batch: None, count)
            cpu = alternate(ours.rep, theirs.rep, reps=reps, warmup=3, timer=lambda fn: fn())
            shared_s = _shared_work_s(folder, loader.decoder.transform)
    finally:
        for side in (ours, theirs):
            if side is not None:
                del side.batches  # shuts its worker down
    images = BATCH * count
    stats = PairStats(cpu.b_s, cpu.a_s)  # ratio of rates = B's CPU seconds ÷ A's
    device = ours.device_s[-reps:]
    on_cpu = PairStats(cpu.b_s, [a + d for a, d in zip(cpu.a_s, device)])
    wall_a, wall_b = ours.wall_s[-reps:], theirs.wall_s[-reps:]
    wall = PairStats(wall_b, wall_a)
    rate_a, rate_b = images / cpu.a_median, images / cpu.b_median
    bound = cpu.b_median / images / shared_s
    for i, (a, b, wa, wb) in enumerate(zip(cpu.a_s, cpu.b_s, wall_a, wall_b)):
        ctx.log(f"    pair {i + 1}/{reps}: per CPU-second S3 TrainLoader {images / a:.1f} img/s, ImageFolder "
                f"{images / b:.1f} img/s; wall clock {images / wa:.1f} and {images / wb:.1f} img/s")
    row = rows["data/s3-vs-imagefolder"]
    row.set_pairs(stats)
    row.context = (f"S3 TrainLoader {rate_a:.1f}, ImageFolder {rate_b:.1f} images per host CPU-second ({images} per rep, "
                   f"{IMAGE_PX}px JPEGs of {sum(s.bytes for s in manifest.shards) / manifest.num_samples / 1024:.0f} "
                   f"KiB incl. tar); with DeviceAugment on this CPU counted too ({fmt_s(statistics.median(device) / count)} "
                   f"per batch) {on_cpu.ratio:.3f} ({on_cpu.ratio_min:.3f} – {on_cpu.ratio_max:.3f}); wall clock "
                   f"{images / statistics.median(wall_a):.1f} and {images / statistics.median(wall_b):.1f} img/s, "
                   f"{wall.ratio:.3f} ({wall.ratio_min:.3f} – {wall.ratio_max:.3f}); decode + augment alone (common "
                   f"to both) {fmt_s(shared_s)} CPU per image, so no loader could pass {bound:.2f}")
    row.detail = {"pairs_cpu_ratio": stats.ratios, "s3_host_cpu_s": cpu.a_s, "s3_device_step_cpu_s": device,
                  "imagefolder_cpu_s": cpu.b_s, "pairs_ratio_device_step_on_cpu": on_cpu.ratios,
                  "pairs_wall_ratio": wall.ratios, "s3_wall_s": wall_a, "imagefolder_wall_s": wall_b,
                  "images_per_rep": images, "jpeg_px": IMAGE_PX, "shared_work_cpu_s_per_image": shared_s,
                  "bound_ratio": bound}
    per = rows["data/per-worker-img-s"]
    per.value, per.status = rate_a, MEASURED
    per.context = (f"images per host CPU-second (worker + receiving; DeviceAugment is device work), median over "
                   f"{reps} reps of {images} images")
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
    ctx.log(f"    S3 {rate_a:.1f} img/s, ImageFolder {rate_b:.1f} img/s, ratio {stats.ratio:.3f} "
            f"({stats.ratio_min:.3f} – {stats.ratio_max:.3f})")
